"""Hinglish language identification: each sentence labelled hin / eng / mix.

The built-in task of xenith/data/hinglish.py (docs/hinglish.md): a generated train split
and a validation split of real text the automatic tagger's word lists and rules did not
produce. A small classifier from scratch, with a SentencePiece tokenizer trained on the
train sentences (Devanagari, romanized Hindi and English alike);
bench/hinglish_langid.py runs it beside the baselines.

  python main.py --config=experiments/hinglish_langid.py --workdir=runs/langid
"""

import ml_collections

from experiments import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: optionally `size=tiny|small` (small)."""
  args = default.parse_arg(arg)
  size = args.pop('size', 'small')
  if args:
    raise ValueError(f'Unknown config argument(s) {sorted(args)}; known: size.')
  config = default.get_config(f'size={size}')
  config.task = 'classification'
  config.data.source = 'hinglish_langid'
  # Sentences are short (a few to ~40 words): 64 tokens keep nearly all of each.
  config.max_seq_len = 64
  config.num_train_steps = 150  # 4,800 sentences: most of one epoch of the 6,000.
  config.optimizer.warmup_steps = 15
  config.optimizer.learning_rate = 1e-3  # A third of the LM's peak; not tuned.
  config.eval_every_steps = 75  # Evaluate on the whole validation split, midway and at the end.
  config.num_eval_batches = -1
  config.log_every_steps = 25
  config.checkpoint_every_steps = 150
  return config
