"""Xenith's native checkpoint format: any Xenith model, also those HF cannot express.

`save_pretrained` writes it when Mistral/Mixtral have no equivalent of the model
(`configs.export_problems`: LoRA adapters, chunk-summary memory, several windows, shared
experts, LayerNorm, YaRN, ...), or when asked to (`native=True`). A directory of:
  config.json        {"architectures": ["XenithForCausalLM"], "model_type": "xenith",
                      "xenith_format": 1, "xenith_version": "0.1.0", "dtype": "float32",
                      "xenith_model_config": {the whole config.model}, "note": "..."}
  model.safetensors  every param, named by its flattened Flax path
                     ('block_0/attn/query/kernel'), float params in "dtype"
The tree is stored as the model holds it: a scan_layers model's stacks keep their leading
layer axis, a memory model's summarizer is under `summarizer/...`. The memory state (the
bank) is no param: `memory.save_bank` keeps it. transformers cannot load the directory;
`from_pretrained` builds the model from the saved config (fields it lacks, from an older
Xenith, take today's defaults) and refuses tensors that do not fit it: missing, extra or
of another shape, all named.
"""

import importlib.metadata
import os
from typing import Any

from flax import traverse_util
import ml_collections
import ml_dtypes
import numpy as np

from xenith import config_defaults
from xenith import storage
from xenith.errors import HfFormatError
from xenith.hf import configs
from xenith.hf import safetensors_io
from xenith.hf import weights

FORMAT_VERSION = 1  # Of the layout above; raised when it changes incompatibly.
_SEPARATOR = '/'
_NAMES_SHOWN = 6  # Problems named in one message; the rest are counted.


def xenith_version() -> str:
  try:
    return importlib.metadata.version('xenith')
  except importlib.metadata.PackageNotFoundError:  # Run from a checkout, not installed.
    return 'unknown'


def native_config(model: ml_collections.ConfigDict, dtype: str, why: str) -> dict[str, Any]:
  """The config.json of a native checkpoint of `model` (a `config.model`)."""
  return {
      'architectures': [configs.NATIVE_ARCHITECTURE],
      'model_type': configs.NATIVE_MODEL_TYPE,
      'xenith_format': FORMAT_VERSION,
      'xenith_version': xenith_version(),
      'dtype': dtype,
      'xenith_model_config': model.to_dict(),
      'note': ('A Xenith-native checkpoint: load it with xenith.from_pretrained; Hugging '
               f'Face transformers cannot. Not in the Hugging Face format: {why}.'),
  }


def _overlay(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str,
             filename: str) -> None:
  """Sets `values` (nested) on the config `node`, each field checked."""
  for key, value in values.items():
    field = f'{prefix}.{key}'
    if key not in node and len(node):  # An empty ConfigDict is an open mapping.
      raise HfFormatError(f'{filename}: {field} is no field of this Xenith\'s config.model '
                          '(saved by a newer Xenith?); upgrade Xenith to load it.')
    if key in node and isinstance(node[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise HfFormatError(f'{filename}: {field} must be an object, found {value!r}.')
      _overlay(node[key], value, field, filename)
      continue
    try:
      node[key] = value  # ml_collections checks the type (lists become tuples).
    except (TypeError, ValueError) as e:
      raise HfFormatError(f'{filename}: {field}={value!r} does not fit the field: '
                          f'{e}') from None


def model_config(config_json: dict[str, Any], filename: str) -> ml_collections.ConfigDict:
  """The `config.model` a native config.json describes: the defaults with its fields.

  HfFormatError for a newer format, a missing or malformed xenith_model_config, or a
  field this Xenith does not have or whose value does not fit it.
  """
  version = config_json.get('xenith_format')
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise HfFormatError(f'{filename}: "xenith_format" must be a positive integer, found '
                        f'{version!r}.')
  if version > FORMAT_VERSION:
    raise HfFormatError(
        f'{filename}: written in Xenith-native format {version} (by Xenith '
        f'{config_json.get("xenith_version")}); this Xenith reads format {FORMAT_VERSION}'
        ' and older: upgrade Xenith.')
  values = config_json.get('xenith_model_config')
  if not isinstance(values, dict):
    raise HfFormatError(f'{filename}: "xenith_model_config" must be an object (the '
                        f'model config), found {type(values).__name__}.')
  model = config_defaults.get_config().model
  _overlay(model, values, 'xenith_model_config', filename)
  return model


def param_shapes(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """tensor name -> jax.ShapeDtypeStruct of every param the model of `model` has.

  From `jax.eval_shape` of its init: nothing is allocated or compiled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from xenith.model import build  # pylint: disable=g-import-not-at-top

  # A memory model reads whole chunks.
  length = model.memory.chunk_size if model.get('memory') and model.memory.chunk_size else 8
  # Built from a copy: the frozen config shares its nested fields with the one it was
  # made from, and a module may change them while tracing (MoeBlock's shared experts).
  module = build.make_model(ml_collections.ConfigDict(model.to_dict()))
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, length), jnp.int32))['params']
  return flatten(nn.meta.unbox(shapes))


def flatten(params: dict) -> dict[str, Any]:
  """tensor name ('block_0/attn/query/kernel') -> leaf of a nested param dict."""
  flat = traverse_util.flatten_dict(params)
  for path in flat:
    if any(_SEPARATOR in part for part in path):  # Would not unflatten to the same tree.
      raise HfFormatError(f'Param {path} has a {_SEPARATOR!r} in its name.')
  return {_SEPARATOR.join(path): leaf for path, leaf in flat.items()}


def unflatten(tensors: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split(_SEPARATOR)): v
                                       for k, v in tensors.items()})


def _shape(shape) -> str:
  return '[' + ', '.join(map(str, shape)) + ']'


def mismatches(found: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """Each tensor name missing from `found`, extra in it or of another shape, described."""
  problems = [f'missing {n} {_shape(expected[n])}' for n in sorted(set(expected) - set(found))]
  problems += [f'unexpected {n} {_shape(found[n])}' for n in sorted(set(found) - set(expected))]
  problems += [f'{n} has shape {_shape(found[n])}, the model\'s is {_shape(expected[n])}'
               for n in sorted(set(found) & set(expected))
               if tuple(found[n]) != tuple(expected[n])]
  return problems


def describe_mismatches(problems: list[str]) -> str:
  shown = '; '.join(problems[:_NAMES_SHOWN])
  more = len(problems) - _NAMES_SHOWN
  return shown + (f'; and {more} more' if more > 0 else '')


def check_params(params: dict, model: ml_collections.ConfigDict) -> None:
  """HfFormatError naming every param of `params` that the model of `model` lacks, has
  not, or has in another shape."""
  expected = {n: s.shape for n, s in param_shapes(model).items()}
  problems = mismatches({n: np.shape(x) for n, x in flatten(params).items()}, expected)
  if problems:
    raise HfFormatError(f'The params do not fit the module\'s config ({len(problems)} '
                        f'problems): {describe_mismatches(problems)}.')


def save(path: str, model: ml_collections.ConfigDict, params: dict, dtype: str,
         why: str) -> None:
  """Writes `model` (a `config.model`) and every one of `params` as a native checkpoint.

  Float params are written in `dtype` ('float32', 'bfloat16' or 'float16'), others as
  they are. why: the reason for the native format, kept in config.json's note.
  HfFormatError, before anything is written, unless `params` fit `model` exactly.
  """
  config = native_config(model, dtype, why)
  check_params(params, model)
  np_dtype = weights.NUMPY_DTYPES[dtype]
  tensors = {}
  for name, x in flatten(params).items():
    x = np.asarray(x)
    is_float = np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16
    tensors[name] = x.astype(np_dtype) if is_float else x
  safetensors_io.write(path, config, tensors)


def load(path: str) -> tuple[ml_collections.ConfigDict, dict, dict[str, Any]]:
  """(`config.model`, params as NumPy arrays, config.json) of the native checkpoint `path`.

  Params have the dtypes of the model's own (float32). HfFormatError, before any tensor
  is read, unless the tensors are exactly the params of the model the config describes.
  """
  config_json = safetensors_io.read_config(path)
  config_file = os.path.join(path, safetensors_io.CONFIG_FILE)
  model = model_config(config_json, config_file)
  expected = param_shapes(model)
  # safetensors maps its files into memory: a gs:// folder is read from a local copy.
  with storage.local_copy(path) as local:
    try:
      tensors = safetensors_io.read_tensors(local)
      problems = mismatches(tensors.shapes, {n: s.shape for n, s in expected.items()})
      if problems:
        raise HfFormatError(
            f'{tensors.source}: {len(problems)} tensors do not fit the model {config_file} '
            f'describes: {describe_mismatches(problems)}.')
      params = unflatten({n: np.asarray(tensors[n], expected[n].dtype) for n in expected})
    except HfFormatError as e:  # Name the files as the user gave them.
      raise HfFormatError(str(e).replace(local, os.fspath(path).rstrip('/'))) from None
  return model, params, config_json
