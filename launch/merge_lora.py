r"""Merges a LoRA run's adapters into its base weights: params of the plain model.

  python launch/merge_lora.py --config=experiments/lora_finetune.py:base=runs/default \
      --workdir=runs/lora_finetune --out=runs/lora_merged

Reads the newest checkpoint of `--workdir` (trained with `--config`, the same config
and overrides as the run), folds every adapter into its kernel (W + alpha / r * A B, r
the rank of that layer's target, `xenith.model.lora.merge_lora`), checks that the plain
model's logits equal the adapted model's on a random batch, and writes
`{'params': merged}` to `--out` (an Orbax item) with the plain model's config in
`--out/model_config.json`. The merged params start a new run without adapters, e.g. to
evaluate or fine-tune further:

  python main.py --config=experiments/default.py --workdir=runs/after_lora \
      --config.init_from_checkpoint=runs/lora_merged
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # Run as a script: make `xenith` and `experiments` importable.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from xenith import sharding
from xenith import storage
from xenith.train import checkpointing
from xenith.model import lora
from xenith.model.build import make_model

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The LoRA run\'s experiment config (with the same overrides).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The LoRA run\'s workdir.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the merged params (must not exist).')
flags.mark_flags_as_required(['config', 'workdir', 'out'])


def merge_checkpoint(config, workdir: str, out: str) -> float:
  """Merges the newest checkpoint of `workdir` into `out`; returns the logits' max
  absolute difference between the merged and the adapted model on a random batch."""
  if not lora.enabled(config.model):
    raise ValueError('The config has no adapters (config.model.lora.rank and every '
                     'config.model.lora.target_ranks are 0 or unset).')
  out_path = storage.path(out, '--out')  # Local or gs:// (xenith/storage.py).
  if out_path.exists():
    raise FileExistsError(f'{out} exists; choose a new --out.')
  model = make_model(config.model)
  tokens = jnp.zeros((1, config.max_seq_len), jnp.int32)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      sharding.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)['params']))
  params = checkpointing.load_params(workdir, abstract)
  merged = lora.merge_lora(params, config.model)

  plain_config = lora.plain_config(config.model)
  batch = jax.random.randint(
      jax.random.key(0), (2, config.max_seq_len), 0, config.model.vocab_size)
  adapted_logits = jax.jit(model.apply)({'params': params}, batch)
  plain_logits = jax.jit(make_model(plain_config).apply)({'params': merged}, batch)
  max_diff = float(np.abs(np.asarray(adapted_logits - plain_logits)).max())

  checkpointing.save_params(out, merged)
  (out_path / 'model_config.json').write_text(plain_config.to_json(indent=2))
  return max_diff


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs a dozen lines per save.
  try:
    max_diff = merge_checkpoint(_CONFIG.value, _WORKDIR.value, _OUT.value)
  except (ValueError, FileExistsError) as e:  # CheckpointMismatchError, StorageError too.
    sys.exit(f'{type(e).__name__}: {e}')
  print(f'Merged {_WORKDIR.value} into {_OUT.value}; the merged model\'s logits differ '
        f'from the adapted model\'s by at most {max_diff:.2e}.')


if __name__ == '__main__':
  app.run(main)
