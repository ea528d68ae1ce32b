"""Tests for the data sources beyond a plain folder: TFDS, Hugging Face datasets,
.gz and other text fields in folders, pre-tokenized corpora, mixtures and eval_split.

Every source gets data this file writes; the references are the texts written (encoded
by the tokenizer), read back by the library that owns each file format.
"""

import gzip
import json
import math
import pathlib
import random

import numpy as np
import pytest

from tests.test_data import make_config
from xenith import config_validation
from xenith.data import documents
from xenith.data import pipeline
from xenith.data import pretokenized
from xenith.data import tokenizer as tokenizer_lib
from xenith.errors import ConfigError, DataError

VOCAB = 300
_WORDS = ('the king queen fool lord lady sword crown night day love death speak hear '
          'thee thou my our what why when where good ill fair').split()


def _texts(seed: int, n: int, tag: str) -> list[str]:
  """n distinct one-paragraph texts (each one passage: short, no blank lines)."""
  rng = random.Random(seed)
  return [f'{tag} {i} ' + ' '.join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30)))
          for i in range(n)]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def tok_path(tmp_path_factory, cache):
  """A SentencePiece model trained once on all the words used here."""
  split = [{'text': t.encode()} for t in _texts(99, 200, 'train validation test')]
  tok = tokenizer_lib.train_tokenizer(split, VOCAB, cache, 'test-data-sources')
  path = tmp_path_factory.mktemp('tok') / 'spm.model'
  path.write_bytes(tok.model_proto)
  return path


def _config(cache, tok_path, **data):
  return make_config(cache, tokenizer=str(tok_path), **data)


def _documents(rows, tok) -> list[tuple[int, ...]]:
  """The token ids of each whole document (BOS .. EOS, stripped) in packed rows."""
  docs, current = [], []
  for batch in rows:
    for row, seg in zip(batch['inputs'], batch['segment_ids']):
      for t in row[seg > 0]:
        current.append(int(t))
        if t == tok.eos_id:
          assert current[0] == tok.bos_id
          docs.append(tuple(current[1:-1]))
          current = []
  return docs


def _train_documents(ds, n: int):
  """The first n documents of the train stream."""
  it, docs, rows = iter(ds.train), [], []
  while len(docs) < n:
    rows.append(next(it))
    docs = _documents(rows, ds.tokenizer)
  return docs[:n]


def _encoded(tok, texts) -> list[tuple[int, ...]]:
  return sorted(tuple(tok.encode(t)) for t in texts)


def _assert_resumes_exactly(ds, k: int = 3, n: int = 5):
  it = iter(ds.train)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # As Orbax stores it.
  expected = [next(it) for _ in range(n)]
  resumed = iter(ds.train)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


# Folder: .gz files and text_key.


def test_folder_reads_gz_files_and_any_text_key(tmp_path, cache, tok_path):
  texts = _texts(1, 6, 'gz')
  (tmp_path / 'a.txt.gz').write_bytes(gzip.compress(texts[0].encode()))
  lines = ''.join(json.dumps({'body': t, 'n': i}) + '\n' for i, t in enumerate(texts[1:]))
  (tmp_path / 'b.jsonl.gz').write_bytes(gzip.compress(lines.encode()))
  got = [d.text for d in documents.read_folder(tmp_path, text_key='body')]
  assert got == texts
  with pytest.raises(DataError, match=r'b\.jsonl\.gz:1: expected a JSON object with a '
                     r'"text" field .*\[\'body\', \'n\'\]'):
    list(documents.read_folder(tmp_path))
  by_split = {}
  for split in ('train', 'validation'):
    ds = pipeline.create_datasets(_config(cache, tok_path, path=str(tmp_path),
                                          text_key='body', eval_split=split))
    by_split[split] = _documents(ds.eval_batches(), ds.tokenizer)
  # eval_split picks which side of the hash split evaluation reads; together, all texts.
  assert by_split['train'] and by_split['validation']
  assert sorted(by_split['train'] + by_split['validation']) == _encoded(ds.tokenizer, texts)
  assert sorted(_train_documents(ds, len(by_split['train']))) == sorted(by_split['train'])


# TFDS: a dataset prepared on disk by a builder this file defines.


def _tfds_builder(texts_by_split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  class TinyStories(tfds.core.GeneratorBasedBuilder):
    """Texts in a 'story' feature, beside an int 'label'."""
    VERSION = tfds.core.Version('1.2.0')

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return epath.Path(__file__)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'story': tfds.features.Text(), 'label': tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(texts) for name, texts in texts_by_split.items()}

    def _generate_examples(self, texts):
      for i, t in enumerate(texts):
        yield i, {'story': t, 'label': i}

  return TinyStories


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  texts = {'train': _texts(2, 40, 'train'), 'validation': _texts(3, 8, 'validation'),
           'test': _texts(4, 6, 'test')}
  data_dir = tmp_path_factory.mktemp('tfds')
  builder = _tfds_builder(texts)(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir, texts


def test_tfds_source_reads_named_splits_and_resumes(tfds_dir, cache, tok_path):
  data_dir, texts = tfds_dir
  config = _config(cache, tok_path, source='tfds', tfds_name='tiny_stories:1.2.0',
                   tfds_data_dir=str(data_dir), text_key='story', eval_split='test')
  config_validation.validate(config, num_devices=1)
  ds = pipeline.create_datasets(config)
  tok = ds.tokenizer
  assert sorted(_documents(ds.eval_batches(), tok)) == _encoded(tok, texts['test'])
  # One epoch of the train stream is the train split, each text once.
  assert sorted(_train_documents(ds, 40)) == _encoded(tok, texts['train'])
  assert ds.stats['train_passages'] == 40 and ds.stats['validation_passages'] == 6
  _assert_resumes_exactly(ds)


@pytest.mark.parametrize('fields, message', [
    (dict(tfds_name='no_such_set'), r"TFDS dataset 'no_such_set' is not prepared .* "
     r"\(it has \['tiny_stories'\]\)"),
    (dict(eval_split='dev'), r"eval_split='dev': tfds dataset tiny_stories has splits "
     r"\['test', 'train', 'validation'\]"),
    (dict(text_key='text'), r"no field 'text' .* the records have \['label', 'story'\]"),
])
def test_tfds_source_errors_name_what_exists(tfds_dir, cache, tok_path, fields, message):
  data = dict(source='tfds', tfds_name='tiny_stories', tfds_data_dir=str(tfds_dir[0]),
              text_key='story')
  with pytest.raises(DataError, match=message):
    pipeline.create_datasets(_config(cache, tok_path, **{**data, **fields}))
