"""Default experiment: a small dense Xenith decoder on the embedded Shakespeare corpus.

The fields and their meaning are those of the library's defaults (xenith/config_defaults.py,
each commented there); this file adds the size presets. Other experiments start from
`get_config()` and change what they need.

  python main.py --config=experiments/default.py --workdir=runs/default
  python main.py --config=experiments/default.py:size=tiny --workdir=runs/tiny
  python main.py --config=experiments/default.py --config.model.num_layers=6 ...
"""

import ml_collections

from xenith import config_defaults

# Model sizes selected by the config argument (`experiments/default.py:size=base`).
# tiny: seconds on a CPU (tests); small: the library's defaults (xenith/config_defaults.py),
# trains on 2 CPU cores in < 10 min; base: a GPU-sized model (~125M parameters).
SIZES = {
    'tiny': dict(embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, vocab_size=512, max_seq_len=64, global_batch_size=8),
    'small': dict(embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                  mlp_dim=768, vocab_size=2048, max_seq_len=128, global_batch_size=32),
    'base': dict(embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                 mlp_dim=2048, vocab_size=32000, max_seq_len=1024, global_batch_size=32),
}

LOGICAL_AXIS_RULES = config_defaults.LOGICAL_AXIS_RULES

# config.model fields each size sets (besides global_batch_size and max_seq_len).
_MODEL_SIZE_FIELDS = ('vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'num_kv_heads',
                      'head_dim', 'mlp_dim')


def parse_arg(arg: str | None) -> dict[str, str]:
  """Parses a config argument `k1=v1,k2=v2` into a dict."""
  if not arg:
    return {}
  out = {}
  for item in arg.split(','):
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'Config argument {item!r} is not of the form key=value.')
    out[key.strip()] = value.strip()
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; `arg` picks a size, e.g. `size=tiny`."""
  args = parse_arg(arg)
  size = args.pop('size', 'small')
  if args:
    raise ValueError(f'Unknown config argument(s) {sorted(args)}; known: size.')
  if size not in SIZES:
    raise ValueError(f'Unknown size {size!r}; choose one of {sorted(SIZES)}.')
  s = SIZES[size]

  config = config_defaults.get_config()
  config.size = size
  config.global_batch_size = s['global_batch_size']
  config.max_seq_len = s['max_seq_len']
  for field in _MODEL_SIZE_FIELDS:
    config.model[field] = s[field]
  # The defaults derive these from max_seq_len; they follow the size's.
  config.model.attention.window_reference_length = s['max_seq_len']
  config.model.rope_scaling.original_max_position = s['max_seq_len']
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """Learning-rate x width sweep (4 points); the size comes from `arg`. See launch/sweep.py."""
  del arg
  # Imported here so that building a config loads no more of the library than its defaults.
  from xenith import sweeps  # pylint: disable=g-import-not-at-top
  return sweeps.product({
      'optimizer.learning_rate': [1e-3, 3e-3],
      'model.embed_dim': [64, 128],
  })
