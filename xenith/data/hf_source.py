"""`data.source='hf'`: a Hugging Face `datasets` dataset on local disk.

`data.path` is a folder written by `save_to_disk` (a Dataset or a DatasetDict), or a
.parquet / .arrow / .json / .jsonl file or a folder of them (`load_dataset(<format>,
...)`, which names splits after the files: train*.parquet, validation*.parquet, ...).
Nothing is downloaded: the hub is offline and `datasets` caches under
`<Xenith cache>/hf`, never in ~/.cache/huggingface.
"""

import os
import pathlib

from xenith.data import documents
from xenith.data import record_splits
from xenith.data import text_dataset
from xenith.errors import DataError

FORMATS = {'.parquet': 'parquet', '.arrow': 'arrow', '.json': 'json', '.jsonl': 'json',
           '.json.gz': 'json', '.jsonl.gz': 'json'}


def _format(path: pathlib.Path) -> str | None:
  name = path.name.lower()
  return next((f for ext, f in FORMATS.items() if name.endswith(ext)), None)


def _files(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in ([root] if root.is_file() else root.rglob('*'))
                if p.is_file() and not any(s.startswith('.') for s in p.relative_to(
                    root.parent if root.is_file() else root).parts))


class _Column:
  """Random access to one column of a `datasets.Dataset`: i -> {key: value}."""

  def __init__(self, dataset, key: str):
    self._dataset = dataset.select_columns([key]) if key in dataset.column_names else dataset

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, i: int):
    return self._dataset[int(i)]


def open_splits(data_config, cache: pathlib.Path) -> tuple[dict, dict]:
  """(identity, {split: random-access records}) of the dataset at config.data.path.

  Raises:
    DataError: a missing path, no readable files, or a format `datasets` cannot read.
  """
  if not data_config.path:
    raise DataError("config.data.path is empty; source='hf' needs a dataset folder or files.")
  root = pathlib.Path(data_config.path).expanduser().absolute()
  if not root.exists():
    raise DataError(f'Hugging Face dataset {str(root)!r} does not exist (config.data.path).')
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # Read before `datasets` is imported.
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  import datasets  # pylint: disable=g-import-not-at-top
  saved = root.is_dir() and any((root / f).exists() for f in ('dataset_dict.json',
                                                              'state.json'))
  try:
    if saved:
      loaded = datasets.load_from_disk(os.fspath(root))
    else:
      formats = {_format(p) for p in _files(root)} - {None}
      if len(formats) != 1:
        raise DataError(f'{root}: expected files of one of {sorted(set(FORMATS))} (or a '
                        f'save_to_disk folder); found formats {sorted(formats)}.')
      where = ({'data_dir': os.fspath(root)} if root.is_dir()
               else {'data_files': os.fspath(root)})
      loaded = datasets.load_dataset(formats.pop(), **where,
                                     cache_dir=os.fspath(cache / 'hf'))
  except DataError:
    raise
  except Exception as e:  # `datasets` raises many kinds; the first line says which.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'{root}: not readable as a Hugging Face dataset: {reason}') from None
  named = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {'train': loaded}
  key = data_config.get('text_key', 'text') or 'text'
  splits = {name: _Column(ds, key) for name, ds in named.items()}
  # Paths, sizes and modification times of every file (no file is read).
  fingerprint = documents.stat_fingerprint(root, _files(root))
  return {'name': os.fspath(root), 'files': fingerprint}, splits


def prepare(data_config, cache) -> text_dataset.PreparedData:
  """The train split and config.data.eval_split of the dataset, as passages."""
  identity, splits = open_splits(data_config, cache)
  return record_splits.prepare('hf', identity, splits, data_config, cache)
