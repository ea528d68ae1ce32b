"""Labelled documents for classification: label set, tokenized examples, bucketed batches.

`config.data.path` (source 'folder') holds one of:
  train.jsonl + validation.jsonl   one {"text": str, "label": str} object per line
                                   (other fields are ignored);
  train/ + validation/             one sub-folder per label, of .txt / .jsonl documents;
  only *.jsonl files, or only      no validation split given: `config.data.validation_fraction`
  label sub-folders                of each label is held out (seeded, at least one each).
A built-in task (`BUILT_IN`) writes such a folder into the cache.

Every check runs before any tokenization or compile: a bad or missing label names its
file and line, a validation label the train split lacks is an error, and so is a label
of `config.classification.labels` without training examples.

Batches hold one document per row, BOS + tokens + EOS (the first max_seq_len - 2 tokens
of a longer one; the count is logged), padded with zeros to the shortest length bucket
that fits the longest row (`bucket_lengths`), so a batch of short documents costs a
short step. Each batch is a dict: `inputs`, `segment_ids` (1 on the document, 0 on
padding), `positions` int32 [batch, bucket]; `labels` int32 [batch] (-1 = an empty
padding row, which counts nowhere); with language adapters on, `languages` [batch,
bucket] (each row's "language" field's id, 0 on padding and for none).
"""

import dataclasses
import hashlib
import importlib
import json
import math
import pathlib
from typing import Any, Iterator

from absl import logging
import numpy as np

from xenith.data import cache as cache_lib
from xenith.data import documents
from xenith.data import pipeline
from xenith.data import tokenizer as tokenizer_lib
from xenith.errors import DataError

SPLITS = ('train', 'validation')
# Built-in labelled tasks: config.data.source -> the module whose `build(cache)` writes
# their folder.
BUILT_IN = {'shakespeare_genre': 'xenith.data.shakespeare_genre',
            'hinglish_langid': 'xenith.data.hinglish'}
# Training batches are cut from windows of this many batches' worth of examples, sorted
# by length: rows of a batch have similar lengths (little padding), while the shuffle
# across windows and of the batch order keeps the label mix of batches random.
_WINDOW_BATCHES = 32
_MIN_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Example:
  text: str
  label: str
  where: str  # 'file:line' or a file path, for error messages.
  language: str = ''  # A .jsonl record's "language" (picks its language adapter), or ''.


def data_folder(data_config, cache: pathlib.Path) -> pathlib.Path:
  """The labelled folder `config.data` names (a built-in task's is built on first use)."""
  if data_config.source in BUILT_IN:
    return importlib.import_module(BUILT_IN[data_config.source]).build(cache)
  if data_config.source != 'folder':
    raise DataError(f"config.task='classification' reads labelled documents: "
                    f"config.data.source must be 'folder' or one of {sorted(BUILT_IN)}, "
                    f'not {data_config.source!r}.')
  if not data_config.path:
    raise DataError("config.data.path is empty; source='folder' needs a folder of "
                    'labelled documents.')
  folder = pathlib.Path(data_config.path).expanduser().absolute()
  if not folder.is_dir():
    raise DataError(f'Data folder {str(folder)!r} does not exist or is not a folder '
                    '(config.data.path).')
  return folder


def _jsonl_examples(path: pathlib.Path) -> list[Example]:
  examples = []
  text = documents.decode_file(path)
  for lineno, record in documents.jsonl_records(path, text):
    where = f'{path}:{lineno}'
    for field in ('text', 'label'):
      value = record.get(field)
      if not isinstance(value, str) or (field == 'label' and not value.strip()):
        got = 'missing' if field not in record else f'{type(value).__name__} {value!r}'
        raise DataError(f'{where}: "{field}" must be a {"non-empty " * (field == "label")}'
                        f'string (got {got}).')
    examples.append(Example(record['text'], record['label'].strip(), where,
                            documents.record_language(where, record)))
  return examples


def _label_folders(folder: pathlib.Path) -> list[Example]:
  """One sub-folder per label, each of .txt / .jsonl documents (`documents.read_folder`)."""
  examples = []
  for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.')):
    for doc in documents.read_folder(sub):
      examples.append(Example(doc.text, sub.name, str(sub / doc.source)))
  return examples


def _read(path: pathlib.Path) -> list[Example]:
  if path.is_dir():
    return _label_folders(path)
  return _jsonl_examples(path)


def read_splits(folder: pathlib.Path, validation_fraction: float,
                seed: int) -> dict[str, list[Example]]:
  """{'train': [...], 'validation': [...]} from a labelled folder (see the module doc)."""
  given = {}
  for split in SPLITS:
    for candidate in (folder / f'{split}.jsonl', folder / split):
      if candidate.exists():
        given[split] = candidate
  if len(given) == 1:
    raise DataError(f'{folder} has a {next(iter(given))} split but not the other; give '
                    'both train and validation, or neither (then validation_fraction of '
                    'each label is held out).')
  if given:
    splits = {split: _read(given[split]) for split in SPLITS}
  else:
    files = sorted(folder.glob('*.jsonl'))
    examples = [e for f in files for e in _jsonl_examples(f)] or _label_folders(folder)
    if not examples:
      raise DataError(f'{folder} holds no labelled documents: expected train.jsonl + '
                      'validation.jsonl, train/ + validation/, *.jsonl files or one '
                      'sub-folder per label.')
    splits = _hold_out(examples, validation_fraction, seed)
  if not splits['train']:
    raise DataError(f'{folder}: the train split has no documents.')
  return splits


def _hold_out(examples, fraction: float, seed: int) -> dict[str, list[Example]]:
  """A stratified, seeded split: round(fraction * n) of each label (at least one, when
  the label has two or more examples) goes to validation."""
  rng = np.random.default_rng(seed)
  train, validation = [], []
  for label in sorted({e.label for e in examples}):
    mine = [e for e in examples if e.label == label]
    order = rng.permutation(len(mine))
    held = min(len(mine) - 1, max(1, round(fraction * len(mine))))
    validation += [mine[i] for i in order[:held]]
    train += [mine[i] for i in sorted(order[held:])]
  return {'train': train, 'validation': validation}


def label_set(splits: dict[str, list[Example]], configured: tuple[str, ...]) -> list[str]:
  """The label names in output order; raises DataError on any inconsistency."""
  train_labels = {e.label for e in splits['train']}
  if configured:
    labels = [str(label) for label in configured]
    if len(set(labels)) != len(labels):
      raise DataError(f'config.classification.labels={labels} repeats a label.')
    for e in splits['train'] + splits['validation']:
      if e.label not in labels:
        raise DataError(f'{e.where}: label {e.label!r} is not in '
                        f'config.classification.labels {labels}.')
    empty = [label for label in labels if label not in train_labels]
    if empty:
      raise DataError(f'Label {empty[0]!r} of config.classification.labels has no '
                      'examples in the train split.')
  else:
    labels = sorted(train_labels)
    for e in splits['validation']:
      if e.label not in train_labels:
        raise DataError(f'{e.where}: label {e.label!r} does not occur in the train split '
                        f'(its labels: {labels}).')
  if len(labels) < 2:
    raise DataError(f'Classification needs at least two labels; the train split has '
                    f'{labels}.')
  return labels


def bucket_lengths(max_seq_len: int, multiple: int = 1) -> list[int]:
  """Row lengths batches are padded to: powers of two from 32 (multiples of `multiple`,
  e.g. a memory model's chunk) up to max_seq_len, and max_seq_len itself."""
  lengths, n = set(), _MIN_BUCKET
  while n < max_seq_len:
    lengths.add(math.ceil(n / multiple) * multiple)
    n *= 2
  return sorted(x for x in lengths | {max_seq_len} if x <= max_seq_len)


def pad_batch(rows: list[np.ndarray], labels: list[int], size: int, buckets: list[int],
              languages: list[int] | None = None):
  """Rows (token arrays) and labels -> a padded batch of `size` rows (see module doc);
  with `languages` (an id per row) also `languages` [size, length] (0 on padding)."""
  longest = max((len(r) for r in rows), default=1)
  length = next(b for b in buckets if b >= longest)
  batch = {k: np.zeros((size, length), np.int32) for k in ('inputs', 'segment_ids',
                                                          'positions')}
  batch['labels'] = np.full((size,), -1, np.int32)
  if languages is not None:
    batch['languages'] = np.zeros((size, length), np.int32)
  for i, (row, label) in enumerate(zip(rows, labels)):
    if languages is not None:
      batch['languages'][i, :len(row)] = languages[i]
    batch['inputs'][i, :len(row)] = row
    batch['segment_ids'][i, :len(row)] = 1
    batch['positions'][i, :len(row)] = np.arange(len(row))
    batch['labels'][i] = label
  return batch


class TrainIterator:
  """Infinite, length-bucketed training batches (this process's rows of each global
  batch); `get_state()` / `set_state()` give a JSON position the checkpoint keeps.

  The example stream is the concatenation of per-epoch permutations (seeded by the seed
  and epoch); window w takes stream positions [w * W, (w + 1) * W), W = _WINDOW_BATCHES
  global batches, sorts them by length, cuts them into batches and shuffles their order.
  """

  def __init__(self, examples: 'Encoded', global_batch: int, first: int, size: int,
               buckets: list[int], seed: int):
    self._ex, self._global, self._first, self._size = examples, global_batch, first, size
    self._buckets, self._seed = buckets, seed
    self._window, self._index = 0, 0
    self._batches = None

  def _plan(self, window: int) -> list[np.ndarray]:
    n, size = len(self._ex.rows), self._global * _WINDOW_BATCHES
    positions = np.arange(window * size, (window + 1) * size)
    epochs = positions // n
    order = {e: np.random.default_rng([self._seed, int(e)]).permutation(n)
             for e in np.unique(epochs)}
    ids = np.array([order[e][p % n] for e, p in zip(epochs, positions)])
    ids = ids[np.argsort([len(self._ex.rows[i]) for i in ids], kind='stable')]
    batches = ids.reshape(_WINDOW_BATCHES, self._global)
    shuffle = np.random.default_rng([self._seed, int(window), 1]).permutation(_WINDOW_BATCHES)
    return [batches[j] for j in shuffle]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batches is None:
      self._batches = self._plan(self._window)
    ids = self._batches[self._index][self._first:self._first + self._size]
    self._index += 1
    if self._index == _WINDOW_BATCHES:
      self._window, self._index, self._batches = self._window + 1, 0, None
    return pad_batch([self._ex.rows[i] for i in ids], [self._ex.labels[i] for i in ids],
                     self._size, self._buckets, self._ex.languages_of(ids))

  def get_state(self) -> dict[str, int]:
    return {'window': self._window, 'batch': self._index}

  def set_state(self, state: dict[str, Any]) -> None:
    self._window, self._index = int(state['window']), int(state['batch'])
    self._batches = None


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A split tokenized: rows [BOS, tokens..., EOS] (int32) and label ids."""
  rows: list[np.ndarray]
  labels: list[int]
  truncated: int  # Documents cut to max_seq_len.
  languages: list[int] | None = None  # Language ids per row, with language adapters on.

  def languages_of(self, ids) -> list[int] | None:
    return None if self.languages is None else [self.languages[i] for i in ids]


def encode(examples: list[Example], labels: list[str], tokenizer, max_seq_len: int,
           split: str, languages: dict[str, int] | None = None) -> Encoded:
  """Tokenizes `examples`; `languages` ({name: id}, `pipeline.language_ids`) gives each
  its language adapter's id (0 for none)."""
  index = {label: i for i, label in enumerate(labels)}
  ids = tokenizer.encode_batch([e.text for e in examples])
  keep = max_seq_len - 2
  rows = [np.asarray([tokenizer.bos_id, *t[:keep], tokenizer.eos_id], np.int32) for t in ids]
  truncated = sum(len(t) > keep for t in ids)
  if truncated:
    logging.warning('%d of %d %s documents are longer than max_seq_len=%d tokens: '
                    'truncated to their first %d tokens.', truncated, len(ids), split,
                    max_seq_len, keep)
  ids_of = None if languages is None else [languages.get(e.language, 0) for e in examples]
  return Encoded(rows, [index[e.label] for e in examples], truncated, ids_of)


@dataclasses.dataclass(frozen=True)
class Datasets:
  """What the trainer needs from labelled data (the classification `pipeline.Datasets`).

  Attributes:
    tokenizer: encodes the documents.
    labels: label names; a label's id is its index.
    train: `iter(train)` gives a `TrainIterator`.
    stats: per-split document counts, truncations and label counts.
    fingerprint: hash of the examples and labels (the run record's data identity).
    majority: the train split's most frequent label id (ties: the first), the baseline.
  """
  tokenizer: Any
  labels: list[str]
  train: Any
  stats: dict[str, Any]
  fingerprint: str
  majority: int
  batch_size: int
  _validation: Encoded = dataclasses.field(repr=False)
  _buckets: list[int] = dataclasses.field(repr=False)
  _process_index: int = dataclasses.field(repr=False)
  _process_count: int = dataclasses.field(repr=False)

  def eval_batches(self, num_batches: int = -1) -> Iterator[dict[str, np.ndarray]]:
    """The validation split in length order (deterministic), this process's rows of
    each global batch; the last is padded with empty rows (label -1)."""
    val = self._validation
    order = np.argsort([len(r) for r in val.rows], kind='stable')
    global_rows = self.batch_size * self._process_count
    first = self._process_index * self.batch_size
    count = math.ceil(len(order) / global_rows)
    for b in range(count if num_batches < 0 else min(count, num_batches)):
      ids = order[b * global_rows:(b + 1) * global_rows][first:first + self.batch_size]
      yield pad_batch([val.rows[i] for i in ids], [val.labels[i] for i in ids],
                      self.batch_size, self._buckets, val.languages_of(ids))

  @property
  def validation_labels(self) -> np.ndarray:
    return np.asarray(self._validation.labels, np.int32)


def _fingerprint(splits, labels) -> str:
  h = hashlib.sha256(json.dumps(labels).encode())
  for split in SPLITS:
    for e in splits[split]:
      h.update(f'{split}\0{e.label}\0{e.language}\0{e.text}\0'.encode())
  return h.hexdigest()[:32]


def create_datasets(config, *, process_index: int = 0, process_count: int = 1,
                    tokenizer=None, bucket_multiple: int = 1) -> Datasets:
  """Reads, checks and tokenizes the labelled data `config.data` names.

  tokenizer: the tokenizer to use (the workdir's, or the base model's); None = the one
  `config.data.tokenizer` names ('train' trains one on the train split's texts).
  bucket_multiple: every row length is a multiple of it (a memory model's chunk size).
  """
  cache = cache_lib.cache_dir(config.data)
  folder = data_folder(config.data, cache)
  splits = read_splits(folder, config.data.validation_fraction, config.seed)
  labels = label_set(splits, tuple(config.classification.labels))
  languages = pipeline.language_ids(config)
  if languages is not None:
    for e in splits['train'] + splits['validation']:
      if e.language and e.language not in languages:
        raise DataError(f'{e.where}: language {e.language!r} is not in '
                        f'config.model.language_adapters.languages {tuple(languages)}.')
  fingerprint = _fingerprint(splits, labels)
  if tokenizer is None:
    records = [{'text': e.text.encode()} for e in splits['train']]
    tokenizer = tokenizer_lib.load_tokenizer(
        config.data.tokenizer, vocab_size=config.model.vocab_size, cache=cache,
        train_split=records, fingerprint=f'labelled-{fingerprint}')
  train = encode(splits['train'], labels, tokenizer, config.max_seq_len, 'train', languages)
  validation = encode(splits['validation'], labels, tokenizer, config.max_seq_len,
                      'validation', languages)
  counts = {split: {label: 0 for label in labels} for split in SPLITS}
  for split, enc in (('train', train), ('validation', validation)):
    for i in enc.labels:
      counts[split][labels[i]] += 1
  majority = int(np.argmax([counts['train'][label] for label in labels]))
  stats = {f'{split}_documents': len(splits[split]) for split in SPLITS}
  stats.update(train_truncated=train.truncated, validation_truncated=validation.truncated,
               label_counts=counts)
  logging.info('Labelled data %s: %d labels, %s', folder, len(labels), stats)
  batch_size = config.global_batch_size // process_count
  buckets = bucket_lengths(config.max_seq_len, bucket_multiple)
  return Datasets(
      tokenizer=tokenizer, labels=labels,
      train=_Train(train, config.global_batch_size, process_index * batch_size, batch_size,
                   buckets, config.seed),
      stats=stats, fingerprint=fingerprint, majority=majority, batch_size=batch_size,
      _validation=validation, _buckets=buckets, _process_index=process_index,
      _process_count=process_count)


@dataclasses.dataclass(frozen=True)
class _Train:
  """`iter()` gives a fresh `TrainIterator` at the stream's start."""
  examples: Encoded
  global_batch: int
  first: int
  size: int
  buckets: list[int]
  seed: int

  def __iter__(self) -> TrainIterator:
    return TrainIterator(self.examples, self.global_batch, self.first, self.size,
                         self.buckets, self.seed)
