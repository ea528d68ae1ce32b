"""Workdirs: `main.py --mode=import_hf` and `--mode=export_hf`.

An import writes into a new workdir:
  checkpoints/0/state  the params (Orbax); a fine-tune's `config.init_from_checkpoint`
  xenith_config.json   the config, flattened: the fields that differ from the defaults
  config.py            the same config as a `main.py --config` file
  hf_config.json       the imported config.json, whose other fields an export keeps
The defaults are xenith/config_defaults.py's; the config.py of workdirs imported before it
existed builds on experiments/default.py, whose default size is the same config.
"""

import json
import os
from typing import Any

from flax import traverse_util
import ml_collections
import numpy as np

from xenith import atomic_files
from xenith import config_defaults
from xenith import storage
from xenith.errors import HfFormatError
from xenith.hf import convert
from xenith.hf import native
from xenith.hf import safetensors_io

CONFIG_JSON = 'xenith_config.json'
CONFIG_PY = 'config.py'
HF_CONFIG_JSON = 'hf_config.json'
IMPORT_STEP = 0

_CONFIG_PY_TEMPLATE = '''"""Xenith config of the Hugging Face checkpoint {source}.

Written by main.py --mode=import_hf. Fine-tune the imported weights in a new workdir:

  python main.py --config={config_py} --workdir=<new run dir>

config.init_from_checkpoint loads them; the data's tokenizer must match the model's
vocabulary (config.data.tokenizer).
"""

import json

from xenith import config_defaults

OVERRIDES = json.loads(r\'\'\'{overrides}\'\'\')


def get_config():
  config = config_defaults.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  return config
'''


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {'.'.join(k): v for k, v in traverse_util.flatten_dict(config.to_dict()).items()}


def config_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields of `config` that differ from the defaults, flattened ('model.num_layers')."""
  base = _flat_config(config_defaults.get_config())
  return {k: v for k, v in _flat_config(config).items() if base.get(k) != v}


def config_from_overrides(overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The defaults with `overrides` (as `config_overrides` returns them) applied."""
  config = config_defaults.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def import_to_workdir(hf_dir: str, workdir: str) -> ml_collections.ConfigDict:
  """HF checkpoint -> `workdir`/checkpoints/0 (Orbax params) + config files; the config.

  Nothing is written unless the whole checkpoint is read (HfFormatError otherwise). The
  config files are written atomically, xenith_config.json (which marks an import) last.
  """
  from xenith.train import checkpointing  # pylint: disable=g-import-not-at-top

  workdir = storage.check_supported(workdir, '--workdir')  # Local or gs://.
  step_dir = os.path.join(workdir, 'checkpoints', str(IMPORT_STEP))
  if storage.path(step_dir).exists():
    raise HfFormatError(f'{step_dir} exists already; import into a new --workdir.')
  model, params, hf_config = convert.load_hf(hf_dir)
  config = config_defaults.get_config()
  config.model = model
  if model.vocab_size == 32000:  # Mistral-7B v0.1 / Mixtral-8x7B's SentencePiece model.
    config.data.tokenizer = 'mixtral'
  config.init_from_checkpoint = step_dir
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  checkpointing.save_params(os.path.join(step_dir, 'state'), params)
  overrides = config_overrides(config)
  atomic_files.write_json(os.path.join(workdir, HF_CONFIG_JSON), hf_config, indent=2,
                          sort_keys=True)
  config_py = os.path.join(workdir, CONFIG_PY)
  atomic_files.write_text(config_py, _CONFIG_PY_TEMPLATE.format(
      source=f'imported from {storage.check_supported(hf_dir)}', config_py=config_py,
      overrides=json.dumps(overrides, indent=2, sort_keys=True)))
  atomic_files.write_json(os.path.join(workdir, CONFIG_JSON), overrides, indent=2,
                          sort_keys=True)
  return config


def is_import(path: str) -> bool:
  """Whether `path` is a workdir written by `import_to_workdir`."""
  return storage.is_file(storage.path(path) / CONFIG_JSON)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the import in `workdir` (from its xenith_config.json)."""
  config_json = os.path.join(storage.check_supported(workdir), CONFIG_JSON)
  if not storage.is_file(storage.path(config_json)):
    raise HfFormatError(f'{workdir} has no {CONFIG_JSON} (not an import); pass the '
                        "run's --config.")
  return config_from_overrides(safetensors_io.read_json_object(config_json))


def find_hf_config(workdir: str, config: ml_collections.ConfigDict
                   ) -> dict[str, Any] | None:
  """The imported config.json behind `workdir`; None for a run that started afresh.

  That of an import, or, for a fine-tune of an import, that of the import it started from
  (`init_from_checkpoint` = <import>/checkpoints/0).
  """
  init = config.get('init_from_checkpoint')
  started_from = (os.path.dirname(os.path.dirname(storage.check_supported(init))) if init
                  else workdir)
  for d in (workdir, started_from):
    name = os.path.join(d, HF_CONFIG_JSON)
    if storage.is_file(storage.path(name)):
      return safetensors_io.read_json_object(name)
  return None


def load_params(workdir: str, model: ml_collections.ConfigDict) -> dict:
  """The newest params in `workdir` (NumPy arrays), laid out as `model` says."""
  import jax  # pylint: disable=g-import-not-at-top
  from xenith.train import checkpointing  # pylint: disable=g-import-not-at-top

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = native.unflatten(native.param_shapes(model))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
  return jax.tree.map(np.asarray, checkpointing.load_params(workdir, abstract))


def export_from_workdir(workdir: str, hf_dir: str,
                        config: ml_collections.ConfigDict | None = None,
                        dtype: str | None = None) -> list[str]:
  """The newest params in `workdir` (a train run or an import) -> checkpoint `hf_dir`.

  The HF format when Mistral/Mixtral can express the model, else Xenith's native one
  (`convert.save`). config: the run's config; default `workdir`/xenith_config.json
  (written by the import). dtype: of the tensors; default that of the imported checkpoint,
  else float32. The tokenizer pinned in `workdir` (a train run's) goes with it
  (tokenizer_files.py); an import has none and keeps its config.json's token ids.
  Returns why HF cannot express the model ([] for the HF format).
  """
  from xenith.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  workdir = storage.check_supported(workdir, '--workdir')  # Local or gs://.
  if config is None:
    config = read_config(workdir)
  return convert.save(hf_dir, config.model, load_params(workdir, config.model),
                      find_hf_config(workdir, config), dtype,
                      tokenizer=tokenizer_lib.read_pinned(workdir))
