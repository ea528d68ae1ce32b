"""`data.source='tokens'`: a corpus tokenized once, stored as array_record token ids.

A folder `data.path` holds, per split, `<split>.array_record`: one record per
document (passage), its token ids without BOS/EOS as little-endian int32; and
`metadata.json`:

  {"format": "xenith-token-ids", "version": 1, "vocab_size": V, "max_id": m,
   "tokenizer_digest": ..., "bos_id": b, "eos_id": e,
   "splits": {"train": {"documents": n, "tokens": t}, ...}}

plus the tokenizer's own files (`tokenizer.model`, or tokenizer.json +
tokenizer_config.json), so `data.tokenizer` can name the folder.
`xenith.data.tokenize_corpus.write(config, out)` (or `python launch/pretokenize.py`)
makes one from any text source. The
pipeline adds BOS/EOS and packs as for text. A corpus whose tokenizer is not
`data.tokenizer`, or with ids >= model.vocab_size, stops the run before training.
"""

import hashlib
import json
import os
import pathlib

import numpy as np

from xenith import atomic_files
from xenith.data import documents
from xenith.data import text_dataset
from xenith.errors import DataError

FORMAT = 'xenith-token-ids'
VERSION = 1
METADATA = 'metadata.json'
_SUFFIX = '.array_record'


def write_split(path: pathlib.Path, docs) -> dict[str, int]:
  """Writes an iterable of token-id sequences to `path`, one record each; returns
  {'documents', 'tokens', 'max_id'}."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
  counts = {'documents': 0, 'tokens': 0, 'max_id': -1}
  try:
    for ids in docs:
      ids = np.asarray(ids, np.int64)
      if len(ids) and (ids.min() < 0 or ids.max() >= 2**31):
        raise DataError(f'{path}: token ids must be in [0, 2**31).')
      writer.write(ids.astype('<i4').tobytes())
      counts['documents'] += 1
      counts['tokens'] += len(ids)
      counts['max_id'] = max(counts['max_id'], int(ids.max()) if len(ids) else -1)
  finally:
    writer.close()
  return counts


def write_corpus(data: text_dataset.PreparedData, tokenizer, out: str,
                 eval_split: str) -> dict:
  """Writes `data`'s train split and its validation split (named `eval_split`), encoded
  with `tokenizer`, into the new folder `out`; returns the metadata. The folder then also
  names the tokenizer (its files are copied there), for data.tokenizer."""
  root = pathlib.Path(out).expanduser()
  if (root / METADATA).exists():
    raise DataError(f'{root} already holds a tokenized corpus; choose a new folder.')
  root.mkdir(parents=True, exist_ok=True)
  splits, max_id = {}, -1
  for name, split in (('train', data.train), (eval_split, data.validation)):
    texts = (split[i]['text'].decode() for i in range(len(split)))
    counts = write_split(root / f'{name}{_SUFFIX}', (tokenizer.encode(t) for t in texts))
    max_id = max(max_id, counts.pop('max_id'))
    splits[name] = counts
  # The tokenizer's own files (tokenizer.model, or tokenizer.json + tokenizer_config.json).
  for name, content in tokenizer.files().items():
    atomic_files.write_bytes(root / name, content)
  metadata = {'format': FORMAT, 'version': VERSION, 'vocab_size': tokenizer.vocab_size,
              'max_id': max_id, 'tokenizer_digest': tokenizer.digest,
              'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id,
              'source_fingerprint': data.fingerprint, 'splits': splits}
  atomic_files.write_json(root / METADATA, metadata, indent=1)
  return metadata


class _Ids:
  """Random access to a split's documents: i -> {'ids': int32 [n]}."""

  def __init__(self, path: pathlib.Path):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._source = array_record_data_source.ArrayRecordDataSource([os.fspath(path)])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {'ids': np.frombuffer(self._source[int(i)], '<i4').astype(np.int32)}


def metadata(path: str) -> dict:
  """The corpus's metadata.json (DataError when it is not a tokenized corpus)."""
  file = pathlib.Path(path).expanduser() / METADATA
  try:
    meta = json.loads(file.read_text())
  except (OSError, ValueError):
    raise DataError(f'{file} is missing or not JSON: config.data.path must be a folder '
                    "written by launch/pretokenize.py (source='tokens').") from None
  if meta.get('format') != FORMAT or meta.get('version') != VERSION:
    raise DataError(f'{file}: not a {FORMAT} v{VERSION} corpus.')
  return meta


def check(data_config, vocab_size: int, tokenizer=None) -> dict:
  """Fails fast when the corpus cannot feed this model: ids >= `vocab_size`
  (config.model.vocab_size), data.tokenizer='train', or a tokenizer other than
  `tokenizer` (when given)."""
  path = data_config.path
  meta = metadata(path)
  if meta['max_id'] >= vocab_size or meta['vocab_size'] > vocab_size:
    raise DataError(f'{path}: token ids up to {meta["max_id"]} (a {meta["vocab_size"]}-'
                    f'piece tokenizer) do not fit config.model.vocab_size={vocab_size}.')
  if data_config.tokenizer == 'train':
    raise DataError(f"config.data.tokenizer='train' cannot train on token ids; set it to "
                    f"the corpus's tokenizer, the folder {path} itself.")
  if data_config.get('language_tags'):
    raise DataError('config.data.language_tags needs text; the corpus is token ids.')
  if tokenizer is not None and meta['max_id'] >= tokenizer.vocab_size:
    raise DataError(f'{path}: token ids up to {meta["max_id"]}, beyond the '
                    f'{tokenizer.vocab_size} pieces of tokenizer {tokenizer.name!r}.')
  if tokenizer is not None and tokenizer.digest != meta['tokenizer_digest']:
    raise DataError(f'{path} was tokenized with tokenizer {meta["tokenizer_digest"][:12]}, '
                    f'but the run uses {tokenizer.name!r} ({tokenizer.digest[:12]}); set '
                    f'config.data.tokenizer to the one it was tokenized with.')
  return meta


def prepare(data_config, cache) -> text_dataset.PreparedData:
  """Opens the train split and config.data.eval_split (no copy is made)."""
  del cache  # Nothing to prepare.
  root = pathlib.Path(data_config.path).expanduser().absolute()
  meta = metadata(data_config.path)
  eval_split = data_config.get('eval_split', 'validation')
  names = sorted(p.name[:-len(_SUFFIX)] for p in root.glob(f'*{_SUFFIX}'))
  for name in ('train', eval_split):
    if name not in names:
      raise DataError(f'{root} has splits {names}; config.data.eval_split or training '
                      f'needs {name!r}.')
  files = documents.stat_fingerprint(root, [root / f'{n}{_SUFFIX}' for n in names])
  h = hashlib.sha256(json.dumps({'metadata': meta, 'files': files}, sort_keys=True).encode())
  train, validation = _Ids(root / f'train{_SUFFIX}'), _Ids(root / f'{eval_split}{_SUFFIX}')
  stats = {'documents': len(train), 'skipped_empty_documents': 0,
           'train_passages': len(train), 'validation_passages': len(validation)}
  return text_dataset.PreparedData(f'tokens-{h.hexdigest()[:16]}', train, validation, stats)
