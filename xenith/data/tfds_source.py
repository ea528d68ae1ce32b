"""`data.source='tfds'`: a TFDS dataset already prepared on disk as array_record.

Read in place with `tfds.data_source` (Xenith never downloads or prepares it), by
`data.tfds_name` ('name[/config][:version]') under `data.tfds_data_dir` ('' = TFDS's
default, ~/tensorflow_datasets), with the text in feature `data.text_key`.
"""

import os
import pathlib

from xenith.data import record_splits
from xenith.data import text_dataset
from xenith.errors import DataError


def _prepared_names(data_dir: str) -> list[str]:
  """The dataset folders under `data_dir` (what a wrong name might have meant)."""
  root = pathlib.Path(data_dir).expanduser()
  if not root.is_dir():
    return []
  # name/version/ or name/config/version/ holds a prepared dataset's dataset_info.json.
  return sorted(p.name for p in root.iterdir() if p.is_dir() and (
      any(p.glob('*/dataset_info.json')) or any(p.glob('*/*/dataset_info.json'))))


def open_splits(data_config) -> tuple[dict, dict]:
  """(identity, {split: random-access records}) of the configured TFDS dataset.

  Raises:
    DataError: no such prepared dataset, or not stored as array_record.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_config.get('tfds_name', '')
  if not name:
    raise DataError("config.data.tfds_name is empty; source='tfds' needs a dataset name.")
  data_dir = data_config.get('tfds_data_dir', '') or os.fspath(
      pathlib.Path('~/tensorflow_datasets').expanduser())
  try:
    splits = tfds.data_source(name, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several kinds for "not there" / "not array_record".
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'TFDS dataset {name!r} is not prepared as array_record in {data_dir} '
                    f'(it has {_prepared_names(data_dir)}): {reason}') from None
  splits = dict(splits)
  info = next(iter(splits.values())).dataset_info if splits else None
  identity = {'name': name, 'data_dir': os.path.abspath(data_dir),
              'version': str(info.version) if info else '',
              'examples': {s: len(v) for s, v in sorted(splits.items())}}
  return identity, splits


def prepare(data_config, cache) -> text_dataset.PreparedData:
  """The train split and config.data.eval_split of the TFDS dataset, as passages."""
  identity, splits = open_splits(data_config)
  return record_splits.prepare('tfds', identity, splits, data_config, cache)
