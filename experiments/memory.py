"""Chunk-summary memory (xenith/model/memory/) on the default decoder.

Each training sequence is read as chunks of `chunk_size` tokens; every chunk attends to
itself, the keys/values of the stream's last `short_term_tokens` tokens before it and, in
the layers listed in `memory.layers`, to a bank of summaries written by the summarizer
after each earlier chunk. Gradients reach back `tbptt_chunks` chunks.

  python main.py --config=experiments/memory.py:size=tiny --workdir=runs/memory_tiny
  python main.py --config=experiments/memory.py --workdir=runs/memory
"""

import ml_collections

from experiments import default

# Memory fields per size (the rest of the model is default.SIZES[size]).
MEMORY_SIZES = {
    'tiny': dict(chunk_size=16, summary_tokens=2, summarizer_heads=4, bank_size=8,
                 layers=(1,), tbptt_chunks=2, short_term_tokens=4),
    'small': dict(chunk_size=32, summary_tokens=4, summarizer_heads=4, bank_size=16,
                  layers=(2, 3), tbptt_chunks=2, short_term_tokens=8),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config of `arg`'s size (tiny or small) with chunk-summary memory on."""
  size = default.parse_arg(arg).get('size', 'small')
  if size not in MEMORY_SIZES:
    raise ValueError(f'Unknown size {size!r} for the memory experiment; choose one of '
                     f'{sorted(MEMORY_SIZES)}.')
  config = default.get_config(arg)
  config.model.memory.update(MEMORY_SIZES[size])
  return config
