"""Shakespeare genre classification: passages labelled comedy / tragedy / history.

The built-in task of xenith/data/shakespeare_genre.py (the First Folio's genres, split
by play). From scratch, or fine-tuned from a language model trained without the
validation plays (its corpus: `shakespeare_genre.build_lm_corpus`), in full or with
LoRA; bench/shakespeare_genre.py runs all of them and the baselines.

  python main.py --config=experiments/shakespeare_genre.py --workdir=runs/genre
  python main.py --config=experiments/shakespeare_genre.py:base=runs/genre_lm \
      --workdir=runs/genre_finetune
  python main.py --config=experiments/shakespeare_genre.py:base=runs/genre_lm,lora=8 \
      --workdir=runs/genre_lora

`base` is the language model's workdir (experiments/default.py of the same `size`);
its LM head is dropped and a fresh classifier head added.
"""

import os

import ml_collections

from experiments import default

# Per size: (max_seq_len, global_batch_size). `small`: a passage is at most 1,000
# characters, ~400 tokens at a 2k vocabulary, so 512 keeps nearly all of every passage
# (an LM trained at 128 positions adapts in fine-tuning); 16 rows of ~350 tokens are
# ~1.3x the LM's tokens per step. `tiny`: its LM's, for quick tests.
SEQUENCES = {'tiny': (64, 8), 'small': (512, 16)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: optionally `base=<LM workdir>`, `lora=<rank>` (with base), `size=` (small)."""
  args = default.parse_arg(arg)
  base = args.pop('base', '')
  lora = int(args.pop('lora', '0'))
  size = args.pop('size', 'small')
  if args:
    raise ValueError(f'Unknown config argument(s) {sorted(args)}; known: base, lora, size.')
  if size not in SEQUENCES:
    raise ValueError(f'Unknown size {size!r} for the genre task; choose one of '
                     f'{sorted(SEQUENCES)}.')
  if lora and not base:
    raise ValueError('lora=R adapts a trained model: give its workdir too, e.g. '
                     'experiments/shakespeare_genre.py:base=runs/genre_lm,lora=8')
  # The default experiment's model of that size, so the LM checkpoint's weights fit.
  config = default.get_config(f'size={size}')

  config.task = 'classification'
  config.data.source = 'shakespeare_genre'
  config.max_seq_len, config.global_batch_size = SEQUENCES[size]  # Truncation, rows.
  # About 5 minutes on 2 CPU cores for `small` (estimated: ~2 s a step); 2,400 passages,
  # half an epoch of the train plays.
  config.num_train_steps = 150
  config.optimizer.warmup_steps = 15
  # Evaluate on the whole validation split (~900 passages), midway and at the end.
  config.eval_every_steps = 75
  config.num_eval_batches = -1
  config.log_every_steps = 25
  config.checkpoint_every_steps = 150
  # From scratch: a third of the LM's peak. A guess, not tuned (tuning on the
  # validation plays would flatter the result).
  config.optimizer.learning_rate = 1e-3

  if base:
    config.init_from_checkpoint = base
    # The LM's own tokenizer (pinned in its workdir): its embeddings are indexed by it.
    config.data.tokenizer = os.path.join(base, 'tokenizer.model')
    # Full fine-tuning: a tenth of the LM's peak, so the pretrained weights are kept
    # near where they were while the new head learns.
    config.optimizer.learning_rate = 3e-4
  if lora:
    config.model.lora.rank = lora
    config.model.lora.alpha = 2.0 * lora  # alpha / rank = 2, as lora_finetune.py's 16 / 8.
    config.model.lora.targets = ('query', 'key', 'value', 'out', 'gate', 'up', 'down')
    config.model.lora.train_only_adapters = True  # The LM's weights stay frozen.
    # Adapters start at B = 0, exactly the base: the LoRA fine-tune rate of lora_finetune.py.
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0  # Decay would pull the adapters to the base model.
  return config
