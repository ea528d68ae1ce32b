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
