"""A HF checkpoint directory <-> (Xenith `config.model`, params as NumPy arrays)."""

import os
from typing import Any

import ml_collections

from xenith import storage
from xenith.errors import HfFormatError
from xenith.hf import configs
from xenith.hf import safetensors_io
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
