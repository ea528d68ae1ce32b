"""Files of a Hugging Face checkpoint directory: config.json and *.safetensors.

Tensors are read and written with the `safetensors` library (numpy framework; bfloat16 as
`ml_dtypes.bfloat16`), one tensor at a time on access, from one file or the shards that
model.safetensors.index.json names.
"""

from collections.abc import Iterator, Mapping
import json
import os
from typing import Any

import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from xenith.errors import HfFormatError

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def read_config(path: str) -> dict[str, Any]:
  """`path`/config.json as a dict; HfFormatError if `path` is no checkpoint directory."""
  if not os.path.isdir(path):
    raise HfFormatError(f'{path} is not a directory.')
  config_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise HfFormatError(f'{path} has no {CONFIG_FILE}; expected a Hugging Face checkpoint '
                        'directory (config.json + *.safetensors).')
  with open(config_file) as f:
    return json.load(f)


class Tensors(Mapping):
  """name -> np.ndarray of a checkpoint's tensors, each read from its file when asked for."""

  def __init__(self, filenames: list[str]):
    self._files = {}  # Tensor name -> its open file.
    for filename in filenames:
      if not os.path.isfile(filename):
        raise HfFormatError(f'{filename}, listed in {INDEX_FILE}, is missing.')
      try:
        handle = safetensors.safe_open(filename, framework='numpy')
      except safetensors.SafetensorError as e:
        raise HfFormatError(f'{filename} is not a safetensors file: {e}') from e
      self._files.update(dict.fromkeys(handle.keys(), handle))

  def __getitem__(self, name: str) -> np.ndarray:
    return self._files[name].get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


def read_tensors(path: str) -> Tensors:
  """The tensors of the checkpoint directory `path`.

  From model.safetensors, or the shards named by model.safetensors.index.json, or every
  *.safetensors file; HfFormatError if there are none or a listed shard is missing.
  """
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
  else:
    names = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
  if not names:
    raise HfFormatError(f'{path} has no *.safetensors weights (PyTorch .bin files are not '
                        'supported; convert them with transformers save_pretrained).')
  return Tensors([os.path.join(path, name) for name in names])


def write(path: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """Writes `path`/config.json and `path`/model.safetensors (one file, no shards)."""
  os.makedirs(path, exist_ok=True)
  # transformers 4.x refuses safetensors files without the 'format' metadata.
  safetensors_numpy.save_file(
      {name: np.ascontiguousarray(x) for name, x in tensors.items()},
      os.path.join(path, SAFETENSORS_FILE), metadata={'format': 'pt'})
  with open(os.path.join(path, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  # An index left from an earlier sharded checkpoint would point readers at old shards.
  stale = os.path.join(path, INDEX_FILE)
  if os.path.exists(stale):
    os.remove(stale)
