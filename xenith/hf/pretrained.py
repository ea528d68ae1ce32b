"""The Python API: `from_pretrained`, `load_config`, `save_pretrained`.

  module, params = xenith.from_pretrained(src)             # Mixtral or Mistral
  logits = module.apply({'params': params}, tokens)        # [batch, seq, vocab]
  xenith.save_pretrained(out, module, params, hf_config=xenith.load_config(src))
"""

from typing import Any

import numpy as np

from xenith.hf import configs
from xenith.hf import convert
from xenith.hf import safetensors_io
from xenith.hf import weights
from xenith.hf import workdir


def from_pretrained(path: str, *, dtype: str = 'float32', scan_layers: bool = False,
                    moe_dispatch: str | None = None):
  """(module, params) from a HF Mixtral/Mistral directory, a `save_pretrained` export, or
  a workdir written by `main.py --mode=import_hf`.

  `module.apply({'params': params}, tokens)` gives logits [batch, seq, vocab] float32.
  dtype: the compute dtype ('float32' or 'bfloat16'; params are float32 either way).
  moe_dispatch: overrides `config.model.moe.dispatch` (e.g. 'dense' as a reference).
  The HF config, which `save_pretrained` takes to keep its fields, is `load_config(path)`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from xenith.model import build  # pylint: disable=g-import-not-at-top

  if workdir.is_import(path):
    model = workdir.read_config(path).model
    params = weights.restack(workdir.load_params(path, model), model, scan_layers)
    model.scan_layers = scan_layers
  else:
    model, params, _ = convert.load_hf(path, scan_layers=scan_layers)
  model.dtype = dtype
  if moe_dispatch:
    model.moe.dispatch = moe_dispatch
  return build.make_model(model), jax.tree.map(jnp.asarray, params)


def load_config(path: str) -> dict[str, Any]:
  """The HF config (config.json as a dict) of the model `from_pretrained(path)` loads.

  `path`/config.json; for an import_hf workdir, the config.json it was imported from.
  """
  if workdir.is_import(path):
    config = workdir.read_config(path)
    # Every import keeps its config.json; one made from the model stands in if it is gone.
    return (workdir.find_hf_config(path, config)
            or configs.hf_config_from_model(config.model))
  hf_config = safetensors_io.read_config(path)
  configs.architecture(hf_config)
  return hf_config


def save_pretrained(path: str, module, params: dict, *,
                    hf_config: dict[str, Any] | None = None, dtype: str | None = None
                    ) -> None:
  """Writes `module` (a Xenith `Decoder`) with `params` as a HF checkpoint directory.

  config.json + model.safetensors, loadable by transformers (MixtralForCausalLM for MoE
  models, MistralForCausalLM otherwise) and by `from_pretrained`.
  hf_config: the HF config to start from, e.g. `load_config(src)` for a model loaded with
    `from_pretrained(src)`; its fields Xenith has no counterpart for (token ids,
    max_position_embeddings, ...) and its dtype are kept. None: a config from the model.
  dtype: of the saved tensors; default the one `hf_config` names, else float32.
  Raises HfFormatError for models HF cannot express (LoRA adapters, shared experts...).
  """
  import jax  # pylint: disable=g-import-not-at-top
  convert.save_hf(path, module.config.as_configdict(), jax.tree.map(np.asarray, params),
                  hf_config, dtype)
