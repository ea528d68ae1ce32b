"""Passkey retrieval with and without chunk-summary memory, on the tiny model, on CPU.

Trains on `config.data.source='passkey'` (xenith/data/passkey_source.py: one passkey example
of max_seq_len=256 tokens per row) and evaluates passkey retrieval in the loop at 256 (the
training length) and beyond (512, 1024).

Both variants read with the same local reach of one chunk (C=64 tokens):
  memory=1: chunk-summary memory, chunks of 64 tokens, no short-term keys, a bank of
            summaries in every layer: text further back than the current chunk is
            reachable only through the bank;
  memory=0: the same decoder without memory, every layer a 64-token sliding window and no
            global tokens: text more than 64 tokens back is not reachable at all.
(The sliding window reaches a full 64 tokens back from every position; inside a memory
chunk a position sees only the chunk's earlier tokens, so locally memory=0 sees at least as
much as memory=1.)

  python main.py --config=experiments/passkey_memory.py:memory=1 --workdir=runs/pk_mem
  python main.py --config=experiments/passkey_memory.py:memory=0 --workdir=runs/pk_nomem
"""

import ml_collections

from experiments import default

CHUNK = 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`memory=1` (default) or `memory=0`."""
  args = default.parse_arg(arg)
  memory = args.pop('memory', '1')
  if args or memory not in ('0', '1'):
    raise ValueError(f'Config argument {arg!r}: only memory=0 or memory=1 is known.')
  config = default.get_config('size=tiny')
  config.data.source = 'passkey'
  config.max_seq_len = 256
  config.global_batch_size = 16
  config.num_train_steps = 5000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.num_eval_batches = 4
  config.checkpoint_every_steps = 500
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 50
  config.model.attention.window_sizes = (CHUNK,)
  config.model.attention.num_global_tokens = 0
  if memory == '1':
    config.model.memory.update(dict(
        chunk_size=CHUNK, summary_tokens=4, summarizer_heads=4, bank_size=64,
        layers=(0, 1), tbptt_chunks=0, short_term_tokens=0))
  config.passkey.lengths = (256, 512, 1024)
  config.passkey.num_examples = 100
  config.passkey.batch_size = 20
  config.passkey.every_steps = 500
  return config


def split_by_reach(workdir: str, memory: str, lengths=(256, 512, 1024), num_examples=100):
  """Passkey scores of a trained run, split by whether the key is within local reach.

  'far': the passkey line ends more than num_layers * CHUNK tokens before the first
  answer token. Then neither model can reach it locally: the sliding windows of the
  memory=0 model stack to a receptive field of num_layers * CHUNK tokens, and a memory=1
  position sees only its own chunk; only memory can bring it. 'near': the rest. Uses the in-loop evaluation's examples (config.passkey.seed).

    python -m experiments.passkey_memory /tmp/pk_mem 1
  """
  # Imported here so the config stays importable without the library.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from xenith import checkpointing, passkey  # pylint: disable=g-import-not-at-top
  from xenith.data import pipeline  # pylint: disable=g-import-not-at-top
  from xenith.model import build  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  config = get_config(f'memory={memory}')
  reach = config.model.num_layers * CHUNK  # The windows' stacked receptive field.
  tokenizer = pipeline.create_datasets(config).tokenizer
  model = build.make_model(config.model)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, config.max_seq_len),
                                                                  jnp.int32))['params'])
  params = checkpointing.load_base_params(workdir, params)
  predict = jax.jit(passkey.make_predict_fn(model))
  out = {}
  for length in lengths:
    examples = passkey.make_examples(tokenizer, length, num_examples,
                                     seed=config.passkey.seed, digits=config.passkey.digits)
    def far(e):
      line_end = e.passkey_start + len(tokenizer.encode(passkey.passkey_line(e.passkey)))
      return line_end <= e.answer_start - reach

    for name, want_far in (('near', False), ('far', True)):
      subset = [e for e in examples if far(e) == want_far]
      if subset:
        r = passkey.evaluate_length(lambda t, p: predict(params, t, p), subset, 20)
        out[f'{name}_{length}'] = dict(n=len(subset), **r)
  return out


if __name__ == '__main__':
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  print(json.dumps(split_by_reach(sys.argv[1], sys.argv[2]), indent=1))
