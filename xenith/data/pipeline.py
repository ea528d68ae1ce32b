"""The data pipeline's entry point: an experiment config -> tokenizer and batches.

  documents (Shakespeare or a folder) -> passages -> TFDS array_record
  -> tfds.data_source -> grain (shard, shuffle per epoch, repeat, tokenize,
  concat-then-split packing, batch)

Each batch is a dict of int32 arrays [per_process_batch, max_seq_len]: `inputs`
(each document is BOS + tokens + EOS), `segment_ids` and `positions` (see
`packing.py`), and with language adapters on `languages`: each token's document's
language id (`language_ids`; 0 in padding and for documents without a language). The
trainer predicts inputs[t+1] from inputs[..t] where segment ids agree, so there are no
separate targets.

Everything runs in the calling process (no grain worker processes), so an
iterator restored from `get_state()` continues exactly where it stopped.
"""

import dataclasses
import itertools
import os
from typing import Any, Iterator

import grain
import numpy as np

from xenith import storage
from xenith.data import cache as cache_lib
from xenith.data import language_id
from xenith.data import packing
from xenith.data import sources
from xenith.data import text_dataset
from xenith.data import tokenizer as tokenizer_lib
from xenith.data import unigram
from xenith.errors import DataError

Batch = dict[str, np.ndarray]  # Each value: int32 [per_process_batch, max_seq_len].
FEATURES = ('inputs', 'segment_ids', 'positions')  # Plus 'languages' with language adapters.

# Tokenization runs ahead of the train loop in background threads (the state
# still records exactly which passages were consumed).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)


def language_ids(config) -> dict[str, int] | None:
  """{language name: id} for `languages` (the i-th name of
  config.model.language_adapters.languages has id i, as in
  xenith/model/language_adapters.py); None when the adapters are off (no `languages`)."""
  settings = config.model.get('language_adapters')
  names = settings.languages if settings is not None else ()
  return {name: i for i, name in enumerate(names, 1)} if names else None


def _check_languages(config, data: text_dataset.PreparedData) -> None:
  """Every document's language is in the config's list (or absent)."""
  ids = language_ids(config)
  unknown = sorted(set(data.languages) - set(ids or {}) - {''})
  if ids is not None and unknown:
    raise DataError(f'The data has documents in languages {unknown} that '
                    'config.model.language_adapters.languages='
                    f'{tuple(ids)} does not list; add them there.')


def _as_str(value) -> str:
  # A TFDS data source gives bytes; tfds.testing.mock_data gives str.
  return value.decode() if isinstance(value, bytes) else value


class _Tokenize:
  """{'text': bytes, ...} -> {'inputs': int32 [n + 2]}: BOS + tokens + EOS; with
  `language_tags`, BOS + the detected tag (<HIN>/<ENG>/<MIX>) + tokens + EOS; with
  `languages` ({name: id}) also {'languages': int32 [n + 2]}, the record's language id
  at every token (0 for a record without one)."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer,
               languages: dict[str, int] | None = None, language_tags: bool = False):
    self._tokenizer = tokenizer
    self._languages = languages
    self._tags = ({lang: tokenizer.piece_id(tag) for lang, tag in language_id.TAGS.items()}
                  if language_tags else None)

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    text = _as_str(record['text'])
    tok = self._tokenizer
    # The tag is its id, not text: '<HIN>' + text would change how the text's start encodes.
    tag = [self._tags[language_id.detect(text)]] if self._tags else []
    ids = np.asarray([tok.bos_id, *tag, *tok.encode(text), tok.eos_id], np.int32)
    if self._languages is None:
      return {'inputs': ids}
    # `_check_languages` has rejected names that are not in the list.
    language = self._languages.get(_as_str(record.get('language', '')), 0)
    return {'inputs': ids, 'languages': np.full_like(ids, language)}


@dataclasses.dataclass(frozen=True)
class Datasets:
  """What the trainer needs from the data.

  Attributes:
    tokenizer: encodes/decodes text; `vocab_size` <= config.model.vocab_size.
    train: `iter(train)` is an infinite, checkpointable grain DatasetIterator
      of this process's rows of each global batch (`get_state()` / `set_state()`, or Orbax with
      `grain.checkpoint.CheckpointSave` / `CheckpointRestore`).
    unigram_loss: validation cross-entropy (nats per predicted token) under the
      train split's add-one smoothed unigram distribution; the baseline to beat.
    stats: counts: documents, skipped_empty_documents, train_passages,
      validation_passages, train_tokens, validation_tokens (no BOS/EOS).
    fingerprint: names the prepared dataset under `<cache>/tfds/`.
    batch_size: rows per batch in this process (global_batch_size // processes).
    seq_len: tokens per row (config.max_seq_len).
  """
  tokenizer: tokenizer_lib.Tokenizer
  train: grain.IterDataset
  unigram_loss: float
  stats: dict[str, int]
  fingerprint: str
  batch_size: int
  seq_len: int
  _validation_rows: grain.IterDataset = dataclasses.field(repr=False)
  _process_index: int = dataclasses.field(repr=False)
  _process_count: int = dataclasses.field(repr=False)

  def eval_batches(self, num_batches: int = -1) -> Iterator[Batch]:
    """A fresh, finite, deterministic iterator over the validation split.

    The split is packed the same way in every process, and global batches are
    cut from it row by row; each process yields its slice of each, so all
    processes see the same number of batches. The last batch is padded with
    all-zero rows (segment_ids 0: nothing to score).

    Args:
      num_batches: at most this many batches; -1 for the whole split.
    """
    rows = iter(self._validation_rows)
    global_rows = self.batch_size * self._process_count
    first = self._process_index * self.batch_size
    for _ in itertools.count() if num_batches < 0 else range(num_batches):
      chunk = list(itertools.islice(rows, global_rows))
      if not chunk:
        return
      mine = chunk[first:first + self.batch_size]
      batch = {k: np.zeros((self.batch_size, self.seq_len), np.int32)
               for k in chunk[0]}  # FEATURES, and 'languages' if the rows have it.
      for i, row in enumerate(mine):
        for k in batch:
          batch[k][i] = row[k]
      yield batch


class _Rows:
  """A global batch -> rows [start, stop) of it (this process's share)."""

  def __init__(self, start: int, stop: int):
    self._start, self._stop = start, stop

  def __call__(self, batch: Batch) -> Batch:
    return {k: v[self._start:self._stop] for k, v in batch.items()}


def _features(languages) -> tuple[str, ...]:
  return ('inputs',) if languages is None else ('inputs', 'languages')


def _train_batches(split, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                   process_index: int, process_count: int,
                   languages: dict[str, int] | None = None,
                   language_tags: bool = False) -> grain.IterDataset:
  """Infinite packed batches, reshuffled every epoch: this process's rows of each
  global batch.

  Every process shuffles, tokenizes and packs the whole split in the same order and
  keeps only its rows, so the global batch of step s is the same however many
  processes feed it (a run resumed on another process count sees the same data), and
  every process's iterator position is the same.
  """
  ds = grain.MapDataset.source(split)
  # shuffle -> repeat: epoch e shuffles with shuffle_seed + e, so the order
  # changes every epoch. Hashing config.seed keeps runs with seeds s and s + 1
  # from replaying each other's epochs one epoch apart.
  shuffle_seed = int(np.random.SeedSequence(seed % 2**64).generate_state(1)[0])
  ds = ds.shuffle(seed=shuffle_seed).repeat().map(
      _Tokenize(tokenizer, languages, language_tags))
  rows = packing.pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len, _features(languages))
  batches = rows.batch(batch_size * process_count, drop_remainder=True)
  if process_count == 1:
    return batches
  first = process_index * batch_size
  return batches.map(_Rows(first, first + batch_size))


def _validation_rows(split, tokenizer, seq_len: int,
                     languages: dict[str, int] | None = None,
                     language_tags: bool = False) -> grain.IterDataset:
  ds = grain.MapDataset.source(split).map(_Tokenize(tokenizer, languages, language_tags))
  return packing.pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len, _features(languages))


def _check_settings(config, process_index: int, process_count: int) -> None:
  """Fails fast on settings that would only break after long preparation."""
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is not in [0, '
                    f'{process_count}).')
  if config.global_batch_size % process_count:
    raise DataError(f'config.global_batch_size={config.global_batch_size} is not '
                    f'divisible by the {process_count} processes.')
  if config.max_seq_len < 2:
    raise DataError(f'config.max_seq_len={config.max_seq_len} must be at least 2.')
  spec = config.data.tokenizer
  if spec == 'mixtral' and config.model.vocab_size < tokenizer_lib.MIXTRAL_VOCAB:
    raise DataError(f"config.data.tokenizer='mixtral' has "
                    f'{tokenizer_lib.MIXTRAL_VOCAB} pieces, more than '
                    f'config.model.vocab_size={config.model.vocab_size}.')
  if spec not in ('train', 'mixtral'):
    tokenizer_lib.check_model_path(spec)


def create_datasets(config, *, process_index: int = 0, process_count: int = 1,
                    tokenizer: tokenizer_lib.Tokenizer | None = None) -> Datasets:
  """Prepares (or reuses) the data and tokenizer named by `config`.

  Args:
    config: the experiment config; reads `config.data.*`,
      `config.model.vocab_size`, `config.max_seq_len`,
      `config.global_batch_size` and `config.seed`.
    process_index: which block of rows of each global batch this process feeds:
      rows [process_index * b, (process_index + 1) * b), b = global_batch_size //
      process_count (`sharding.process_rows` finds it from the batch sharding).
    process_count: how many blocks the global batch is cut into (the number of
      processes when each feeds its own rows).
    tokenizer: the tokenizer to use (a workdir's pinned copy); None = the one
      `config.data.tokenizer` names.

  Returns:
    The tokenizer, the train batches, validation batches and the baseline loss.

  Raises:
    DataError: bad data or settings, before any long work starts.
  """
  _check_settings(config, process_index, process_count)
  if config.data.source == 'passkey':  # Synthetic examples, one a row (passkey_source.py).
    from xenith.data import passkey_source  # pylint: disable=g-import-not-at-top
    return passkey_source.create_datasets(config, Datasets, process_index=process_index,
                                          process_count=process_count, tokenizer=tokenizer)
  cache = cache_lib.cache_dir(config.data)
  data = _prepare(config, cache)
  _check_languages(config, data)
  tokenizer = tokenizer or _text_tokenizer(config, cache, data)
  token_stats = unigram.token_stats(data.train, data.validation, tokenizer,
                                    cache, data.fingerprint)
  batch_size = config.global_batch_size // process_count
  train = _train_batches(
      data.train, tokenizer, seq_len=config.max_seq_len, batch_size=batch_size,
      seed=config.seed, process_index=process_index,
      process_count=process_count, languages=language_ids(config),
      language_tags=_language_tags(config))
  return Datasets(
      tokenizer=tokenizer,
      train=train,
      unigram_loss=token_stats['unigram_loss'],
      stats={**data.stats, 'train_tokens': token_stats['train_tokens'],
             'validation_tokens': token_stats['validation_tokens']},
      fingerprint=data.fingerprint,
      batch_size=batch_size,
      seq_len=config.max_seq_len,
      _validation_rows=_validation_rows(_eval_split(config, data), tokenizer,
                                        config.max_seq_len, language_ids(config),
                                        _language_tags(config)),
      _process_index=process_index,
      _process_count=process_count,
  )


def _eval_split(config, data: text_dataset.PreparedData):
  """The prepared split `eval_batches` reads: config.data.eval_split's."""
  name = config.data.get('eval_split', 'validation')
  if name not in ('train', 'validation'):
    raise DataError(f"config.data.eval_split={name!r}: this source has 'train' and "
                    "'validation'.")
  return getattr(data, name)


def load_tokenizer(config, workdir: str | None = None) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, without building any batches: the copy pinned in `workdir`
  (`<workdir>/tokenizer.model`, written when a run starts) if there is one, else the one
  `config.data.tokenizer` names. For generation, export and evaluation of a run.

  'mixtral' and a .model file load directly; 'train' is the one trained on the prepared
  data (the cached model, the data prepared first if it is not cached yet); the passkey
  source has its own.
  """
  pinned = storage.path(workdir, '--workdir') / PINNED_TOKENIZER if workdir else None
  if pinned and storage.is_file(pinned):  # Local or gs:// (storage.py).
    return tokenizer_lib.Tokenizer(pinned.read_bytes(), name=os.fspath(pinned))
  _check_settings(config, 0, 1)
  cache = cache_lib.cache_dir(config.data)
  if config.data.source == 'passkey':
    from xenith.data import passkey_source  # pylint: disable=g-import-not-at-top
    return passkey_source.load_tokenizer(config, cache)
  data = _prepare(config, cache) if config.data.tokenizer == 'train' else None
  return _text_tokenizer(config, cache, data)


PINNED_TOKENIZER = 'tokenizer.model'  # A run's tokenizer, copied into its workdir.


def _prepare(config, cache) -> text_dataset.PreparedData:
  """The text source's train/validation splits (prepared once, then cached)."""
  source = sources.make_source(config.data, cache)
  return text_dataset.prepare(source, config.data.validation_fraction, cache)


def _language_tags(config) -> bool:
  return bool(config.data.get('language_tags', False))


def _text_tokenizer(config, cache, data) -> tokenizer_lib.Tokenizer:
  """The tokenizer of a text source; `data` (its prepared splits) only for 'train'."""
  return tokenizer_lib.load_tokenizer(
      config.data.tokenizer, vocab_size=config.model.vocab_size, cache=cache,
      train_split=None if data is None else data.train,
      fingerprint=None if data is None else data.fingerprint,
      language_tags=_language_tags(config))
