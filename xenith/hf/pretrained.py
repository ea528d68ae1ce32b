"""The Python API: `from_pretrained`, `load_config`, `save_pretrained`.

  module, params = xenith.from_pretrained(src)             # Mixtral, Mistral or native
  logits = module.apply({'params': params}, tokens)        # [batch, seq, vocab]
  xenith.save_pretrained(out, module, params, hf_config=xenith.load_config(src))

`save_pretrained` writes the HF format when Mistral/Mixtral can express the model, else
Xenith's native format (native.py), which `from_pretrained` reads back exactly.
"""

from typing import Any

import ml_collections
import numpy as np

from xenith.hf import configs
from xenith.hf import convert
from xenith.hf import safetensors_io
from xenith.hf import weights
from xenith.hf import workdir


def from_pretrained(path: str, *, dtype: str | None = None,
                    scan_layers: bool | None = None, moe_dispatch: str | None = None):
  """(module, params) from a HF Mixtral/Mistral directory, a `save_pretrained` export
  (HF or native format), or a workdir written by `main.py --mode=import_hf`.

  `module.apply({'params': params}, tokens)` gives logits [batch, seq, vocab] float32.
  A native export gives the model it was saved from: same config and params, so the same
  logits (a memory model's `MemoryDecoder` starts from an empty memory state; its bank is
  no param: keep it with `xenith.model.memory.save_bank`).
  dtype: the compute dtype ('float32' or 'bfloat16'; params are float32 either way);
    None: a native export's own, else float32.
  scan_layers: stack the blocks (`config.model.scan_layers`); None: a native export as it
    was saved (it loads in that layout only), else False.
  moe_dispatch: overrides `config.model.moe.dispatch` (e.g. 'dense' as a reference).
  The HF config, which `save_pretrained` takes to keep its fields, is `load_config(path)`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from xenith.model import build  # pylint: disable=g-import-not-at-top

  if workdir.is_import(path):
    model = workdir.read_config(path).model
    params = weights.restack(workdir.load_params(path, model), model, bool(scan_layers))
    model.scan_layers = bool(scan_layers)
    model.dtype = 'float32'
  else:
    model, params, config_json = convert.load(path, scan_layers=scan_layers)
    if not configs.is_native(config_json):
      model.dtype = 'float32'
  if dtype:
    model.dtype = dtype
  if moe_dispatch:
    model.moe.dispatch = moe_dispatch
  return build.make_model(model), jax.tree.map(jnp.asarray, params)


def load_config(path: str) -> dict[str, Any]:
  """The HF config (config.json as a dict) of the model `from_pretrained(path)` loads.

  `path`/config.json (that of a native export too); for an import_hf workdir, the
  config.json it was imported from.
  """
  if workdir.is_import(path):
    config = workdir.read_config(path)
    # Every import keeps its config.json; one made from the model stands in if it is gone.
    return (workdir.find_hf_config(path, config)
            or configs.hf_config_from_model(config.model))
  hf_config = safetensors_io.read_config(path)
  if not configs.is_native(hf_config):
    configs.architecture(hf_config)
  return hf_config


def save_pretrained(path: str, module, params: dict, *,
                    hf_config: dict[str, Any] | None = None, dtype: str | None = None,
                    native: bool | None = None, tokenizer=None) -> list[str]:
  """Writes `module` (any Xenith decoder) with `params` as a checkpoint directory.

  config.json + model.safetensors. When Mistral/Mixtral can express the model, the HF
  format, loadable by transformers (MixtralForCausalLM for MoE models, MistralForCausalLM
  otherwise) and by `from_pretrained`. Otherwise (LoRA adapters, chunk-summary memory,
  several windows or global tokens, shared experts, dense layers between MoE layers,
  LayerNorm, YaRN, ...) Xenith's native format, with one logged line saying why:
  config.json names XenithForCausalLM and holds the whole `config.model`, model.safetensors
  every param by its Flax path ('block_0/attn/query/kernel'); `from_pretrained` reads it
  back exactly, transformers cannot. A memory model's bank is not saved (`save_bank`).
  hf_config: the HF config to start from, e.g. `load_config(src)` for a model loaded with
    `from_pretrained(src)`; its fields Xenith has no counterpart for (token ids,
    max_position_embeddings, ...) and its dtype are kept (the native format keeps only
    the dtype). None: a config from the model.
  dtype: of the saved tensors; default the one `hf_config` names, else float32.
  native: None picks the format as above; True always writes the native format; False
    the HF one, or raises HfFormatError naming why HF cannot express the model.
  tokenizer: a `xenith.data.tokenizer` tokenizer (e.g. `pipeline.load_tokenizer(config,
    workdir)`) to write beside the model, its token ids in config.json and
    generation_config.json (tokenizer_files.py); None: no tokenizer files.
  Returns why HF cannot express the model: [] when the HF format was written.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  # A copy: `FrozenConfigDict.as_configdict()` returns the frozen config's own mutable
  # twin, which a module may have changed while tracing (MoeBlock's shared experts do).
  model = ml_collections.ConfigDict(module.config.to_dict())
  return convert.save(path, model, jax.tree.map(np.asarray, nn.meta.unbox(params)),
                      hf_config, dtype, native, tokenizer)
