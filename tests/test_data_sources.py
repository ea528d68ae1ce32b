"""Tests for the data sources beyond a plain folder: TFDS, Hugging Face datasets,
.gz and other text fields in folders, pre-tokenized corpora, mixtures and eval_split.

Every source gets data this file writes; the references are the texts written (encoded
by the tokenizer), read back by the library that owns each file format.
"""

import collections
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
from xenith.data import tokenize_corpus
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
  return make_config(cache, **{'tokenizer': str(tok_path), **data})


def _documents(rows, tok, current=None) -> list[tuple[int, ...]]:
  """The token ids of each whole document (BOS .. EOS, stripped) in packed rows;
  `current` carries an unfinished document over from earlier rows."""
  docs, current = [], [] if current is None else current
  for batch in rows:
    for row, seg in zip(batch['inputs'], batch['segment_ids']):
      for t in row[seg > 0]:
        current.append(int(t))
        if t == tok.eos_id:
          assert current[0] == tok.bos_id
          docs.append(tuple(current[1:-1]))
          current.clear()
  return docs


def _train_documents(ds, n: int):
  """The first n documents of the train stream."""
  it, docs, current = iter(ds.train), [], []
  while len(docs) < n:
    docs += _documents([next(it)], ds.tokenizer, current)
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


# Hugging Face datasets: save_to_disk, and parquet / json files.


def test_hf_saved_dataset_dict_keeps_its_named_splits(tmp_path, cache, tok_path):
  import datasets  # pylint: disable=g-import-not-at-top
  texts = {'train': _texts(5, 30, 'train'), 'validation': _texts(6, 7, 'validation')}
  datasets.DatasetDict({
      name: datasets.Dataset.from_dict({'body': t, 'id': list(range(len(t)))})
      for name, t in texts.items()}).save_to_disk(tmp_path / 'saved')
  config = _config(cache, tok_path, source='hf', path=str(tmp_path / 'saved'),
                   text_key='body')
  config_validation.validate(config, num_devices=1)
  ds = pipeline.create_datasets(config)
  tok = ds.tokenizer
  assert sorted(_documents(ds.eval_batches(), tok)) == _encoded(tok, texts['validation'])
  assert sorted(_train_documents(ds, 30)) == _encoded(tok, texts['train'])
  _assert_resumes_exactly(ds)
  # data.tokenizer='train' trains on the train split's text.
  config.data.tokenizer = 'train'
  trained = pipeline.create_datasets(config)
  tok = trained.tokenizer
  assert tok.vocab_size <= VOCAB and tok.digest != ds.tokenizer.digest
  assert [tok.decode(tok.encode(t)) for t in texts['train']] == texts['train']
  assert trained.stats['train_tokens'] == sum(len(tok.encode(t)) for t in texts['train'])


@pytest.mark.parametrize('fmt', ['parquet', 'jsonl'])
def test_hf_files_without_validation_are_split_by_hash(tmp_path, cache, tok_path, fmt):
  import datasets  # pylint: disable=g-import-not-at-top
  texts = _texts(7, 50, fmt)
  table = datasets.Dataset.from_dict({'content': texts})
  folder = tmp_path / 'files'
  folder.mkdir()
  if fmt == 'parquet':
    table.to_parquet(folder / 'part-0.parquet')
  else:
    (folder / 'part-0.jsonl').write_text(
        ''.join(json.dumps({'content': t}) + '\n' for t in texts))
  docs = {}
  for split in ('train', 'validation'):
    ds = pipeline.create_datasets(_config(cache, tok_path, source='hf', path=str(folder),
                                          text_key='content', eval_split=split))
    docs[split] = _documents(ds.eval_batches(), ds.tokenizer)
  # A hash split as a folder's: both sides non-empty, disjoint, together every text;
  # the share held out is near validation_fraction=0.2 (binomial, 50 draws).
  assert sorted(docs['train'] + docs['validation']) == _encoded(ds.tokenizer, texts)
  assert abs(len(docs['validation']) / 50 - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 50)
  assert ds.stats['train_passages'] == len(docs['train'])
  assert any((cache / 'hf').iterdir())  # `datasets` caches in the Xenith cache.
  with pytest.raises(DataError, match=r"eval_split='test': hf dataset .* has splits "
                     r"\['train', 'validation'\]"):
    pipeline.create_datasets(_config(cache, tok_path, source='hf', path=str(folder),
                                     text_key='content', eval_split='test'))


# Pre-tokenized corpora.


def _read_array_record(path) -> list[tuple[int, ...]]:
  """Every record of an array_record file as int32 ids, read with array_record itself."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return [tuple(np.frombuffer(r, '<i4').tolist()) for r in reader.read_all()]
  finally:
    reader.close()


@pytest.fixture(scope='module')
def text_folder(tmp_path_factory):
  texts = _texts(8, 40, 'tokens')
  folder = tmp_path_factory.mktemp('text')
  (folder / 'docs.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  return folder, texts


@pytest.fixture(scope='module')
def tokens_dir(tmp_path_factory, cache, tok_path, text_folder):
  out = tmp_path_factory.mktemp('tokens') / 'corpus'
  meta = tokenize_corpus.write(_config(cache, tok_path, path=str(text_folder[0])), str(out))
  return out, meta


def test_pretokenized_corpus_is_written_and_trains(tokens_dir, text_folder, cache):
  out, meta = tokens_dir
  tok = tokenizer_lib.Tokenizer((out / 'tokenizer.model').read_bytes(), 'written')
  train, val = (_read_array_record(out / f'{s}.array_record') for s in ('train', 'validation'))
  assert sorted(train + val) == _encoded(tok, text_folder[1])
  assert train and val
  assert meta == json.loads((out / 'metadata.json').read_text())
  assert meta['max_id'] == max(max(d) for d in train + val)
  assert (meta['vocab_size'], meta['bos_id'], meta['eos_id']) == (VOCAB, tok.bos_id, tok.eos_id)
  assert meta['splits']['train'] == {'documents': len(train),
                                     'tokens': sum(map(len, train))}
  config = _config(cache, out / 'tokenizer.model', source='tokens', path=str(out))
  config_validation.validate(config, num_devices=1)
  ds = pipeline.create_datasets(config)
  assert sorted(_documents(ds.eval_batches(), tok)) == sorted(val)
  assert sorted(_train_documents(ds, len(train))) == sorted(train)
  # The baseline from the stored ids: add-one smoothed unigram of train (tokens + EOS).
  def counts(docs):
    c = np.bincount([t for d in docs for t in d], minlength=VOCAB).astype(float)
    c[tok.eos_id] += len(docs)
    return c
  p = (counts(train) + 1) / (counts(train).sum() + VOCAB)
  assert ds.unigram_loss == pytest.approx(
      -(counts(val) * np.log(p)).sum() / counts(val).sum(), rel=1e-9)
  assert ds.stats['train_tokens'] == sum(map(len, train))
  _assert_resumes_exactly(ds)


def test_pretokenized_corpus_rejects_what_does_not_fit(tokens_dir, cache, tok_path,
                                                      text_folder):
  out, meta = tokens_dir
  config = _config(cache, out / 'tokenizer.model', source='tokens', path=str(out))
  config.model.vocab_size = meta['max_id']  # One too few for the largest id.
  with pytest.raises(DataError, match=rf"token ids up to {meta['max_id']} .* do not fit "
                     rf"config.model.vocab_size={meta['max_id']}"):
    pipeline.create_datasets(config)
  # Ids beyond the model's vocabulary, though the tokenizer itself fits.
  _id_corpus(out.parent / 'big_ids', meta, 310, 4, 0)  # Ids 310..349.
  config = _config(cache, out / 'tokenizer.model', source='tokens',
                   path=str(out.parent / 'big_ids'))
  with pytest.raises(DataError, match=r'token ids up to 349 .* do not fit '
                     r'config.model.vocab_size=300'):
    pipeline.create_datasets(config)
  # Another tokenizer (trained on other text): a different digest.
  other = tokenizer_lib.train_tokenizer(
      [{'text': t.encode()} for t in _texts(11, 300, 'other words here')], VOCAB, cache,
      'test-other-tokenizer')
  (out.parent / 'other.model').write_bytes(other.model_proto)
  with pytest.raises(DataError, match=r'was tokenized with tokenizer .* but the run uses'):
    pipeline.create_datasets(_config(cache, out.parent / 'other.model', source='tokens',
                                     path=str(out)))
  config = _config(cache, tok_path, source='tokens', path=str(out), tokenizer='train')
  with pytest.raises(ConfigError, match=r"data.tokenizer.*'train' cannot train on token"):
    config_validation.validate(config, num_devices=1)
  with pytest.raises(DataError, match=r"tokenizer='train' cannot train on token ids"):
    pipeline.create_datasets(config)


# Mixtures.


def _id_corpus(out: pathlib.Path, meta: dict, low: int, docs: int, seed: int):
  """A pre-tokenized corpus of `docs` 6-token documents, ids in [low, low + 40)."""
  rng = np.random.default_rng(seed)
  out.mkdir()
  splits = {}
  for name, n in (('train', docs), ('validation', 3)):
    ids = rng.integers(low, low + 40, (n, 6))
    splits[name] = [tuple(d) for d in ids.tolist()]
    pretokenized.write_split(out / f'{name}.array_record', ids)
  (out / 'metadata.json').write_text(json.dumps(
      {**meta, 'max_id': low + 39, 'vocab_size': VOCAB,
       'splits': {k: {'documents': len(v), 'tokens': 6 * len(v)} for k, v in splits.items()}}))
  return splits


@pytest.fixture(scope='module')
def mixed(tmp_path_factory, tokens_dir, text_folder, cache):
  """A mixture of two id corpora and a text folder, 3:1:1."""
  out, meta = tokens_dir
  root = tmp_path_factory.mktemp('mix')
  a = _id_corpus(root / 'a', meta, 100, 50, 0)
  b = _id_corpus(root / 'b', meta, 200, 30, 1)
  config = _config(cache, out / 'tokenizer.model', mixture=(
      dict(source='tokens', path=str(root / 'a'), weight=3.0),
      dict(source='tokens', path=str(root / 'b'), weight=1),
      dict(source='folder', path=str(text_folder[0]), weight=1.0)))
  config_validation.validate(config, num_devices=1)
  return pipeline.create_datasets(config), a, b


def test_mixture_draws_sources_by_weight(mixed, text_folder):
  ds, a, b = mixed
  n = 1000
  docs = _train_documents(ds, n)
  a_docs, b_docs = set(a['train']), set(b['train'])
  counts = collections.Counter(
      'a' if d in a_docs else 'b' if d in b_docs else 'text' for d in docs)
  for name, p in (('a', 0.6), ('b', 0.2), ('text', 0.2)):
    # Within 4 binomial standard deviations of the weight's share.
    assert abs(counts[name] / n - p) < 4 * math.sqrt(p * (1 - p) / n), counts
  # Each id corpus's documents are its own (and each appears over its epochs).
  assert a_docs <= set(docs) and b_docs <= set(docs)
  text_ids = set(_encoded(ds.tokenizer, text_folder[1]))
  assert {d for d in docs if d not in a_docs | b_docs} <= text_ids
  # Evaluation reads every source's validation split.
  eval_docs = _documents(ds.eval_batches(), ds.tokenizer)
  assert sorted(d for d in eval_docs if d not in text_ids) == sorted(
      a['validation'] + b['validation'])
  assert len(eval_docs) == ds.stats['validation_passages']


def test_mixture_position_is_checkpointed(mixed):
  ds = mixed[0]
  _assert_resumes_exactly(ds, k=7, n=6)
  it = iter(ds.train)
  next(it)
  assert it.get_state() != iter(ds.train).get_state()


@pytest.mark.parametrize('mixture, message', [
    ((dict(source='tokens', path='x', weight=0),), r'data.mixture\[0\].weight.*must be a '
     r'number > 0'),
    ((dict(source='folder', path='x', weight=1, colour='red'),),
     r"data.mixture\[0\].*unknown fields \['colour'\]"),
    ((dict(source='tfds', weight=1),), r'data.mixture\[0\].tfds_name.*is empty'),
])
def test_bad_mixtures_are_config_errors(cache, tok_path, mixture, message):
  with pytest.raises(ConfigError, match=message):
    config_validation.validate(_config(cache, tok_path, mixture=mixture), num_devices=1)


def test_a_changed_source_changes_the_fingerprint(tmp_path, cache, tok_path, tokens_dir):
  import datasets  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  parquet = tmp_path / 'hf' / 'train.parquet'
  parquet.parent.mkdir()
  corpus = tmp_path / 'tokens'
  shutil.copytree(tokens_dir[0], corpus)
  configs = (_config(cache, tok_path, source='hf', path=str(parquet.parent)),
             _config(cache, corpus / 'tokenizer.model', source='tokens', path=str(corpus)))

  def fingerprints():
    return [pipeline.text_data(c).fingerprint for c in configs]

  datasets.Dataset.from_dict({'text': _texts(12, 30, 'hf')}).to_parquet(parquet)
  before = fingerprints()
  assert fingerprints() == before  # Unchanged data: the same (the run record accepts it).
  datasets.Dataset.from_dict({'text': _texts(13, 30, 'hf')}).to_parquet(parquet)
  pretokenized.write_split(corpus / 'train.array_record', [[5, 6, 7]])
  after = fingerprints()
  assert after[0] != before[0] and after[1] != before[1]


# End to end: training on a mixture of a TFDS dataset, HF files and token ids.


@pytest.mark.slow
def test_training_on_a_mixture_and_a_changed_source_is_detected(
    tmp_path, tfds_dir, tokens_dir, cache):
  from xenith.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  from xenith.train import loop  # pylint: disable=g-import-not-at-top
  import datasets  # pylint: disable=g-import-not-at-top
  out, _ = tokens_dir
  parquet = tmp_path / 'hf' / 'train.parquet'
  parquet.parent.mkdir()
  datasets.Dataset.from_dict({'text': _texts(12, 30, 'hf')}).to_parquet(parquet)
  config = _config(cache, out / 'tokenizer.model', mixture=(
      dict(source='tfds', tfds_name='tiny_stories', tfds_data_dir=str(tfds_dir[0]),
           text_key='story', weight=2.0),
      dict(source='hf', path=str(parquet.parent), weight=1.0),
      dict(source='tokens', path=str(out), weight=1.0)))
  config.global_batch_size = 8  # conftest's 8 CPU devices.
  config.num_train_steps = 1
  config.optimizer.warmup_steps = 0
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
  config.num_eval_batches = 1
  config_validation.validate(config, num_devices=8)
  workdir = str(tmp_path / 'run')
  final = loop.train_and_evaluate(config, workdir)
  assert final['step'] == 1
  assert np.isfinite(final['train/loss']) and np.isfinite(final['eval/loss'])
  # A resume over changed data stops before training (the run record's fingerprint).
  datasets.Dataset.from_dict({'text': _texts(13, 30, 'hf')}).to_parquet(parquet)
  config.num_train_steps = 2
  with pytest.raises(WorkdirError, match=r'changed: the data \(mix-'):
    loop.train_and_evaluate(config, workdir, allow_changes=('num_train_steps',))


@pytest.mark.slow
def test_pretokenize_script_writes_a_corpus(tmp_path, cache, tok_path, text_folder):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.helpers import single_device_env  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'out'
  args = [sys.executable, 'launch/pretokenize.py', '--config=experiments/default.py:size=tiny',
          '--config.data.source=folder', f'--config.data.path={text_folder[0]}',
          f'--config.data.tokenizer={tok_path}', f'--config.data.cache_dir={cache}',
          f'--config.model.vocab_size={VOCAB}', f'--out={out}']
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(args, cwd=root, env=single_device_env(), capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  tok = tokenizer_lib.Tokenizer(tok_path.read_bytes(), 'spm')
  docs = [d for s in ('train', 'validation') for d in _read_array_record(
      out / f'{s}.array_record')]
  assert sorted(docs) == _encoded(tok, text_folder[1])
  assert f'Wrote {out}: train ' in result.stdout
  again = subprocess.run(args, cwd=root, env=single_device_env(), capture_output=True,
                         text=True, timeout=300, check=False)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == (
      f'DataError: {out} already holds a tokenized corpus; choose a new folder.')
