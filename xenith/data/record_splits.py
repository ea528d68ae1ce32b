"""Named splits of text records read in place (TFDS, Hugging Face) as passages.

The records are not copied: one pass cuts each record's text into passages
(`passages.py`) and stores only an index, (record, passage number) per passage, in
`<cache>/record_index/<fingerprint>.npz`; reads re-split the record. A dataset with a
'validation' split keeps its named splits; one without is split by passage hash
(`data.validation_fraction`) into 'train' and 'validation', as a folder is.
"""

import functools
import hashlib
import io
import json
import pathlib

import numpy as np

from xenith import atomic_files
from xenith.data import cache as cache_lib
from xenith.data import passages as passages_lib
from xenith.data import text_dataset
from xenith.errors import DataError

FORMAT_VERSION = 1  # Bump when the index or the split rule changes.


def record_text(record, text_key: str, where: str) -> str:
  """The text field of a record (str or bytes); DataError naming the fields there are."""
  if text_key not in record:
    raise DataError(f'{where}: no field {text_key!r} (config.data.text_key); the '
                    f'records have {sorted(record)}.')
  value = record[text_key]
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if not isinstance(value, str):
    raise DataError(f'{where}: field {text_key!r} is {type(value).__name__}, not text.')
  return value


class Passages:
  """Random access to passages of `records`: item i -> {'text', 'source', 'language'}
  bytes, as a prepared folder gives them; `index` int64 [n, 2] is (record, passage)."""

  def __init__(self, records, text_key: str, index: np.ndarray, where: str):
    self._records, self._key, self._index, self._where = records, text_key, index, where
    # Shuffled reads revisit a record once per passage; keep a few split.
    self._split = functools.lru_cache(maxsize=64)(self._passages_of)

  def _passages_of(self, r: int) -> list[str]:
    return passages_lib.split_passages(
        record_text(self._records[r], self._key, f'{self._where} record {r}'))

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict[str, bytes]:
    r, k = self._index[i]
    return {'text': self._split(int(r))[int(k)].encode(), 'source': b'', 'language': b''}


def _build_index(splits, text_key: str, hashed: bool, fraction: float, where: str):
  """{split: int64 [n, 2]} and the number of records without text."""
  index, empty = {}, 0
  for name, records in splits.items():
    rows, val = [], []
    held_out = hashed and name == 'train'  # Its validation passages are drawn by hash.
    for r in range(len(records)):
      passages = passages_lib.split_passages(
          record_text(records[r], text_key, f'{where} split {name!r} record {r}'))
      empty += not passages
      for k, p in enumerate(passages):
        to_val = held_out and passages_lib.passage_hash(str(r), p) < fraction
        (val if to_val else rows).append((r, k))
    index[name] = np.asarray(rows, np.int64).reshape(-1, 2)
    if held_out:
      if not val and len(rows) > 1:  # As for a folder: always one validation passage.
        val.append(rows.pop())
      index['validation'] = np.asarray(val, np.int64).reshape(-1, 2)
  return index, empty


def prepare(kind: str, identity: dict, splits: dict, data_config,
            cache: pathlib.Path) -> text_dataset.PreparedData:
  """Indexes `splits` ({name: random-access records}) once and opens the train split
  and config.data.eval_split as passages.

  Args:
    kind: 'tfds' or 'hf' (prefixes the fingerprint).
    identity: JSON-able; changes whenever the records may have changed.
    splits: the dataset's named splits.
    data_config: config.data (text_key, eval_split, validation_fraction).
    cache: the Xenith cache.

  Raises:
    DataError: no 'train' split, no such eval split, a missing text field.
  """
  where = f'{kind} dataset {identity.get("name", "")}'.rstrip()
  text_key = data_config.get('text_key', 'text') or 'text'
  eval_split = data_config.get('eval_split', 'validation')
  if 'train' not in splits:
    raise DataError(f'{where} has splits {sorted(splits)}; training reads a "train" split.')
  if len(splits['train']):
    record_text(splits['train'][0], text_key, where)  # The field check, before the pass.
  hashed = 'validation' not in splits
  fraction = data_config.validation_fraction if hashed else None
  names = sorted(set(splits) | ({'validation'} if hashed else set()))
  if eval_split not in names:
    raise DataError(f'config.data.eval_split={eval_split!r}: {where} has splits {names}.')
  key = json.dumps({'format': FORMAT_VERSION, 'identity': identity, 'text_key': text_key,
                    'validation_fraction': fraction,
                    'passage_chars': passages_lib.PASSAGE_CHARS}, sort_keys=True)
  fp = f'{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}'
  path = cache / 'record_index' / f'{fp}.npz'
  if not path.exists():
    with cache_lib.file_lock(cache, f'index-{fp}'):
      if not path.exists():
        index, empty = _build_index(splits, text_key, hashed, fraction, where)
        buf = io.BytesIO()
        np.savez(buf, empty=np.int64(empty), **index)
        atomic_files.write_bytes(path, buf.getvalue())
  with np.load(path) as stored:
    index = {name: stored[name] for name in names}
    empty = int(stored['empty'])
  if len(index['train']) == 0 or len(index[eval_split]) == 0:
    raise DataError(f'{where}: no passages of text in split '
                    f'{"train" if len(index["train"]) == 0 else eval_split!r}.')

  def view(name):
    return Passages(splits['train' if hashed and name == 'validation' else name],
                    text_key, index[name], f'{where} split {name!r}')

  stats = {'documents': len(splits['train']), 'skipped_empty_documents': empty,
           'train_passages': len(index['train']),
           'validation_passages': len(index[eval_split])}
  return text_dataset.PreparedData(fp, view('train'), view(eval_split), stats)
