"""Passages stored as a TFDS `array_record` dataset, read back with random access.

`prepare(...)` turns a `Source` into passages, splits them into 'train' and
'validation', writes both with TFDS under `<cache>/tfds/<fingerprint>/` and
returns `tfds.data_source` readers. The fingerprint covers the source's identity,
the validation fraction and the passage length, so changed data (or settings)
prepares a new copy and unchanged data is reused without reading a file.
"""

import dataclasses
import hashlib
import json
import pathlib

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from xenith.data import cache as cache_lib
from xenith.data import documents
from xenith.data import passages as passages_lib
from xenith.errors import DataError
from xenith.data.sources import Source

# Bump when the stored format or the passage / split rules change.
FORMAT_VERSION = 2  # 2: each passage stores its document's language.


def _passages(folder: pathlib.Path, **read_options):
  """Yields (source, passage, language) for each passage of the folder's documents."""
  for doc in documents.read_folder(folder, **read_options):
    for passage in passages_lib.split_passages(doc.text):
      yield doc.source, passage, doc.language


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """What a first, validating pass over the documents found.

  Attributes:
    fraction: config.data.validation_fraction.
    forced_validation: (source, passage hash) of the one passage sent to
      validation when the hash test picked none; None when it picked some.
    stats: counts, stored as the dataset's metadata.
    languages: the documents' "language" names, sorted ('' for documents without one).
  """
  fraction: float
  forced_validation: tuple[str, float] | None
  stats: dict[str, int]
  languages: tuple[str, ...] = ()

  def is_validation(self, source: str, text: str) -> bool:
    h = passages_lib.passage_hash(source, text)
    return h < self.fraction or (source, h) == self.forced_validation


def plan_splits(folder: pathlib.Path, fraction: float, text_key: str = 'text') -> SplitPlan:
  """Reads every document once: validates, counts, ensures a validation passage.

  Raises:
    DataError: on bad input, or when there are fewer than two passages.
  """
  doc_stats = documents.DocumentStats()
  counts = {'train': 0, 'validation': 0}
  smallest = None  # (hash, source) of the passage most eligible for validation.
  languages = set()
  for source, text, language in _passages(folder, stats=doc_stats, text_key=text_key):
    languages.add(language)
    h = passages_lib.passage_hash(source, text)
    counts['validation' if h < fraction else 'train'] += 1
    if smallest is None or h < smallest[0]:
      smallest = (h, source)
  total = counts['train'] + counts['validation']
  if total < 2:
    raise DataError(f'{folder}: {total} passage(s) of text; need at least 2 '
                    '(one for training, one for validation).')
  forced = None
  if counts['validation'] == 0:
    forced = (smallest[1], smallest[0])
    counts = {'train': total - 1, 'validation': 1}
  if counts['train'] == 0:
    raise DataError(f'config.data.validation_fraction={fraction} leaves no '
                    'training passages.')
  stats = {
      'documents': doc_stats.documents,
      'skipped_empty_documents': doc_stats.skipped_empty,
      'train_passages': counts['train'],
      'validation_passages': counts['validation'],
  }
  return SplitPlan(fraction, forced, stats, tuple(sorted(languages)))


class XenithPassages(tfds.core.GeneratorBasedBuilder):
  """Text passages with the name of the file they came from."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Passages of local or embedded text.'}

  # TFDS looks for this file's folder through `importlib_resources`, which is
  # not among our dependencies; the answer is simply this file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, folder: pathlib.Path | None = None,
               plan: SplitPlan | None = None, text_key: str = 'text', **kwargs):
    # Reading an already prepared dataset (tfds.data_source) passes neither.
    self._folder = folder
    self._plan = plan
    self._text_key = text_key
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Passages of text, split at blank lines.',
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'source': tfds.features.Text(),
            'language': tfds.features.Text(),  # The document's ('' = none).
        }),
        # Records keep document order; grain shuffles at read time.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded through TFDS.
    if self._folder is None or self._plan is None:
      raise DataError('XenithPassages can only be prepared through prepare().')
    self.info.metadata.update(self._plan.stats)
    self.info.metadata['languages'] = list(self._plan.languages)
    return {
        'train': self._generate_examples(validation=False),
        'validation': self._generate_examples(validation=True),
    }

  def _generate_examples(self, validation: bool):
    for i, (source, text, language) in enumerate(
        _passages(self._folder, log_skips=False, text_key=self._text_key)):
      if self._plan.is_validation(source, text) == validation:
        yield i, {'text': text, 'source': source, 'language': language}


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The prepared splits (random-access sequences of {'text', 'source', 'language'}
  bytes); `languages`: the documents' language names ('' = none), sorted."""
  fingerprint: str
  train: object
  validation: object
  stats: dict[str, int]
  languages: tuple[str, ...] = ()


def fingerprint(source: Source, validation_fraction: float) -> str:
  """Names the prepared copy of `source` under these settings."""
  key = json.dumps({
      'format': FORMAT_VERSION,
      'source': source.fingerprint,
      'validation_fraction': validation_fraction,
      'passage_chars': passages_lib.PASSAGE_CHARS,
  }, sort_keys=True)
  return f'{source.kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}'


def prepare(source: Source, validation_fraction: float,
            cache: pathlib.Path) -> PreparedData:
  """Prepares `source` as array_record (once per fingerprint) and opens it.

  Safe when several processes share the cache: one prepares under a file lock
  (TFDS itself writes into a temporary folder and renames it), the rest wait
  and then read.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise DataError('config.data.validation_fraction must be in [0, 1), got '
                    f'{validation_fraction}.')
  fp = fingerprint(source, validation_fraction)
  data_dir = cache / 'tfds' / fp
  if not XenithPassages(data_dir=data_dir).is_prepared():
    with cache_lib.file_lock(cache, f'tfds-{fp}'):
      if not XenithPassages(data_dir=data_dir).is_prepared():
        folder = source.folder()
        plan = plan_splits(folder, validation_fraction, source.text_key)
        logging.info('Preparing %s from %s into %s: %s', fp, folder, data_dir,
                     plan.stats)
        builder = XenithPassages(data_dir=data_dir, folder=folder, plan=plan,
                                 text_key=source.text_key, file_format='array_record')
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
  splits = tfds.data_source('xenith_passages', data_dir=data_dir,
                            download=False)
  builder = XenithPassages(data_dir=data_dir)
  metadata = dict(builder.info.metadata)
  languages = tuple(metadata.pop('languages', ()))
  stats = {k: int(v) for k, v in metadata.items()}
  stats['train_passages'] = len(splits['train'])
  stats['validation_passages'] = len(splits['validation'])
  return PreparedData(fp, splits['train'], splits['validation'], stats, languages)
