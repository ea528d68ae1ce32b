"""A checkpoint directory <-> (Xenith `config.model`, params as NumPy arrays).

The directory is a HF Mistral/Mixtral one when HF can express the model, else Xenith's
native format (native.py); `save` picks, `load` reads either.
"""

import os
from typing import Any

from absl import logging
import ml_collections

from xenith import storage
from xenith.errors import HfFormatError
from xenith.hf import configs
from xenith.hf import native
from xenith.hf import safetensors_io
from xenith.hf import tokenizer_files
from xenith.hf import weights


def load_hf(path: str, *, scan_layers: bool = False
            ) -> tuple[ml_collections.ConfigDict, dict, dict[str, Any]]:
  """(Xenith `config.model`, float32 params, HF config dict) of the HF directory `path`.

  HfFormatError naming the file for a damaged or unsupported config.json, a damaged
  safetensors file or index, or a tensor that does not fit the config; all are checked
  before the first tensor is read.
  """
  hf_config = safetensors_io.read_config(path)
  # Translated first, so that an unsupported architecture fails before any weight is read.
  try:
    model = configs.model_config_from_hf(hf_config)
  except HfFormatError as e:
    raise HfFormatError(f'{os.path.join(path, safetensors_io.CONFIG_FILE)}: {e}') from None
  model.scan_layers = scan_layers
  # safetensors maps its files into memory: a gs:// folder is read from a local copy.
  with storage.local_copy(path) as local:
    try:
      params = weights.hf_to_params(safetensors_io.read_tensors(local), model)
    except HfFormatError as e:  # Name the files as the user gave them.
      raise HfFormatError(str(e).replace(local, os.fspath(path).rstrip('/'))) from None
  return model, params, hf_config


def save_hf(path: str, model: ml_collections.ConfigDict, params: dict,
            hf_config: dict[str, Any] | None = None, dtype: str | None = None) -> None:
  """Writes `model` with `params` to `path` as config.json + model.safetensors.

  hf_config: config.json fields to keep (see `configs.hf_config_from_model`). dtype: of
  the tensors; default the one `hf_config` names, else float32. HfFormatError if `model`
  has no Mistral/Mixtral equivalent.
  """
  dtype = dtype or (configs.tensor_dtype(hf_config) if hf_config else 'float32')
  config = configs.hf_config_from_model(model, hf_config, dtype)  # Checks exportability.
  safetensors_io.write(path, config, weights.params_to_hf(params, model, dtype))


def save(path: str, model: ml_collections.ConfigDict, params: dict,
         hf_config: dict[str, Any] | None = None, dtype: str | None = None,
         native_format: bool | None = None, tokenizer=None) -> list[str]:
  """Writes `model` with `params` to `path`: HF format if it can express them, else native.

  native_format: None picks; True always writes the native format; False writes HF or
  raises HfFormatError. hf_config, dtype: as in `save_hf` (the native format keeps only
  the dtype). tokenizer: written beside the model, its token ids in config.json
  (tokenizer_files.py); None: no tokenizer files. Returns why HF cannot express the model
  ([] when HF format was written): `configs.export_problems`, and any params no HF tensor
  holds (none is dropped).
  """
  if tokenizer is not None:
    hf_config = tokenizer_files.with_token_ids(hf_config, tokenizer)
  problems = _save_model(path, model, params, hf_config, dtype, native_format)
  if tokenizer is not None:
    tokenizer_files.write(path, tokenizer)
  return problems


def _save_model(path, model, params, hf_config, dtype, native_format) -> list[str]:
  """`save` without the tokenizer."""
  dtype = dtype or (configs.tensor_dtype(hf_config) if hf_config else 'float32')
  problems = configs.export_problems(model)
  if not problems:
    unmapped = weights.unmapped_params(params, model)
    if unmapped:
      problems.append(f'{len(unmapped)} params without a Mistral/Mixtral tensor '
                      f'({", ".join(unmapped[:3])}{", ..." if len(unmapped) > 3 else ""})')
  if native_format is False and problems:
    raise HfFormatError('This model has no Mistral/Mixtral equivalent: ' + '; '.join(problems))
  if not problems and not native_format:
    save_hf(path, model, params, hf_config, dtype)
    return []
  why = '; '.join(problems) or 'asked for (native=True)'
  if problems and not native_format:
    logging.warning('Mistral/Mixtral cannot express this model (%s): writing %s in '
                    "Xenith's native format, which xenith.from_pretrained loads and "
                    'transformers does not.', why, path)
  native.save(path, model, params, dtype, why)
  return problems


def load(path: str, *, scan_layers: bool | None = None
         ) -> tuple[ml_collections.ConfigDict, dict, dict[str, Any]]:
  """(`config.model`, float32 params, config.json) of the HF or native checkpoint `path`.

  scan_layers: the layout of the params; None = that of a native checkpoint as saved
  (HfFormatError if it is given and differs), False for HF.
  """
  config_json = safetensors_io.read_config(path)
  if not configs.is_native(config_json):
    return load_hf(path, scan_layers=bool(scan_layers))
  model, params, config_json = native.load(path)
  if scan_layers is not None and scan_layers != model.scan_layers:
    raise HfFormatError(
        f'{path} was saved with scan_layers={model.scan_layers}; a native checkpoint loads '
        'in the layout it was saved in (pass scan_layers=None).')
  return model, params, config_json
