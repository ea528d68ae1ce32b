"""Files of a Hugging Face checkpoint directory: config.json and *.safetensors.

Tensors are read and written with the `safetensors` library (numpy framework; bfloat16 as
`ml_dtypes.bfloat16`), one tensor at a time on access, from one file or the shards that
model.safetensors.index.json names. Every file is checked when it is opened (JSON that
parses to an object; a safetensors header that fits the file and data that covers every
tensor), so a damaged checkpoint fails with an HfFormatError naming the file before any
tensor is read.
"""

from collections.abc import Iterator, Mapping
import json
import os
import struct
from typing import Any

import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from xenith import atomic_files
from xenith import storage
from xenith.errors import HfFormatError

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def read_json_object(filename: str) -> dict[str, Any]:
  """The JSON object in `filename`; HfFormatError if it is not valid JSON or no object."""
  try:
    with storage.path(filename).open('rb') as f:  # Local or gs://.
      value = json.loads(f.read().decode('utf-8'))
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError.
    raise HfFormatError(f'{filename} is not valid JSON (truncated?): {e}.') from None
  if not isinstance(value, dict):
    raise HfFormatError(f'{filename} holds a JSON {type(value).__name__}; expected an '
                        'object ({...}).')
  return value


def read_config(path: str) -> dict[str, Any]:
  """`path`/config.json as a dict; HfFormatError if `path` is no checkpoint directory."""
  if not storage.path(path, 'the Hugging Face folder').is_dir():
    raise HfFormatError(f'{path} is not a directory.')
  config_file = os.path.join(path, CONFIG_FILE)
  if not storage.is_file(storage.path(config_file)):
    raise HfFormatError(f'{path} has no {CONFIG_FILE}; expected a Hugging Face checkpoint '
                        'directory (config.json + *.safetensors).')
  return read_json_object(config_file)


def _check_layout(filename: str) -> None:
  """HfFormatError unless `filename`'s header fits the file and its data every tensor.

  Read here before the library maps the file, so that a damaged file is named with what
  is wrong: too short, a header length beyond the end (garbage), a header that is no
  JSON, tensor data cut off (truncated).
  """
  size = os.path.getsize(filename)
  with open(filename, 'rb') as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise HfFormatError(f'{filename} is not a safetensors file: {size} bytes, shorter '
                          'than the 8-byte header length.')
    (header_len,) = struct.unpack('<Q', prefix)
    if header_len > size - 8:
      raise HfFormatError(
          f'{filename} is not a safetensors file or is truncated: its header length field '
          f'says {header_len} bytes, the file has {size - 8} after it.')
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise HfFormatError(f'{filename} is not a safetensors file: its header is not '
                          f'JSON ({e}).') from None
  if not isinstance(header, dict):
    raise HfFormatError(f'{filename} is not a safetensors file: its header is no object.')
  data = size - 8 - header_len
  for name, info in header.items():
    end = info.get('data_offsets', [0, 0])[-1] if isinstance(info, dict) else 0
    if name != '__metadata__' and isinstance(end, int) and end > data:
      raise HfFormatError(
          f'{filename} is truncated: tensor {name} {info.get("shape")} ends at data byte '
          f'{end}, the file has {data} bytes of data.')


def _open(filename: str):
  """A `safe_open` handle of `filename`, checked; HfFormatError naming what is wrong."""
  _check_layout(filename)
  try:
    return safetensors.safe_open(filename, framework='numpy')
  except safetensors.SafetensorError as e:
    raise HfFormatError(f'{filename} is not a valid safetensors file: {e}.') from None


class Tensors(Mapping):
  """name -> np.ndarray of a checkpoint's tensors, each read from its file when asked for.

  `shapes` (name -> shape) and `filename(name)` come from the headers alone; `source`
  names the file (or index) the tensors come from, for messages.
  """

  def __init__(self, filenames: list[str], source: str):
    self.source = source
    self._files = {}  # Tensor name -> its open file.
    self._filenames = {}  # Tensor name -> the file's name.
    self.shapes = {}
    for filename in filenames:
      handle = _open(filename)
      for name in handle.keys():
        if name in self._files:
          raise HfFormatError(f'Tensor {name} is in both {self._filenames[name]} and '
                              f'{filename}; remove the stale file.')
        self._files[name], self._filenames[name] = handle, filename
        self.shapes[name] = tuple(handle.get_slice(name).get_shape())

  def filename(self, name: str) -> str:
    return self._filenames[name]

  def __getitem__(self, name: str) -> np.ndarray:
    return self._files[name].get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


def _shard_map(index: str) -> dict[str, str]:
  """tensor name -> shard file of the index file `index` (`weight_map`), checked."""
  weight_map = read_json_object(index).get('weight_map')
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise HfFormatError(f'{index} has no "weight_map" object (tensor name -> shard file).')
  return weight_map


def read_tensors(path: str) -> Tensors:
  """The tensors of the checkpoint directory `path`.

  From model.safetensors, or the shards named by model.safetensors.index.json, or every
  *.safetensors file; HfFormatError if there are none, a listed shard is missing or lacks
  a tensor the index puts there, or a file is damaged.
  """
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = _shard_map(index)
    for name, shard in sorted(weight_map.items()):
      if not os.path.isfile(os.path.join(path, shard)):
        raise HfFormatError(f'{os.path.join(path, shard)} is missing; {index} names it for '
                            f'tensor {name}.')
    names, source = sorted(set(weight_map.values())), index
  else:
    weight_map = {}
    names = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
    if not names:
      raise HfFormatError(f'{path} has no *.safetensors weights (PyTorch .bin files are '
                          'not supported; convert them with transformers save_pretrained).')
    source = os.path.join(path, names[0]) if len(names) == 1 else path
  tensors = Tensors([os.path.join(path, name) for name in names], source)
  for name, shard in sorted(weight_map.items()):
    if name not in tensors or tensors.filename(name) != os.path.join(path, shard):
      raise HfFormatError(f'{os.path.join(path, shard)} has no tensor {name}, which {index} '
                          'puts there.')
  return tensors


def _old_shards(index: str) -> set[str]:
  """The shard files (in its folder) that the index file `index` names, if any."""
  try:
    shards = set(_shard_map(index).values()) if storage.is_file(storage.path(index)) else set()
  except HfFormatError:  # A damaged index: only the index goes.
    return set()
  return {s for s in shards if s == os.path.basename(s) and s != SAFETENSORS_FILE}


def write(path: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """Writes `path`/config.json and `path`/model.safetensors (one file, no shards).

  Both go to temporary names first and are renamed when both are complete, the tensors
  before the config: a failed export leaves the directory as it was (or, killed between
  the two renames, new tensors beside the old config), never a config.json without its
  tensors. An earlier sharded checkpoint's index and shards are removed.
  """
  index = os.path.join(path, INDEX_FILE)
  stale = _old_shards(index)
  config_file, tensors_file = (os.path.join(path, CONFIG_FILE),
                               os.path.join(path, SAFETENSORS_FILE))
  with atomic_files.replacing(config_file) as config_tmp:
    with atomic_files.replacing(tensors_file) as tensors_tmp:
      # transformers 4.x refuses safetensors files without the 'format' metadata.
      safetensors_numpy.save_file(
          {name: np.ascontiguousarray(x) for name, x in tensors.items()}, tensors_tmp,
          metadata={'format': 'pt'})
      with open(config_tmp, 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2, sort_keys=True)
      # Before the renames: killed now, the old shards still load, without the index.
      storage.path(index).unlink(missing_ok=True)
  for shard in sorted(stale):
    storage.path(os.path.join(path, shard)).unlink(missing_ok=True)
