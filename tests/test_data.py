"""Tests for xenith/data: documents, passages, TFDS preparation, tokenizers, batches."""

import collections
import json
import logging
import math
import os
import pathlib
import random
import subprocess
import sys

import grain
import numpy as np
import pytest

from experiments import default
from tests.helpers import single_device_env
from xenith.data import documents
from xenith.data import passages
from xenith.data import pipeline
from xenith.data import text_dataset
from xenith.data import tokenizer as tokenizer_lib
from xenith.data import unigram
from xenith.errors import ConfigError
from xenith.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 32
BATCH = 4
VOCAB = 300
_WORDS = ('the king queen fool lord lady sword crown night day love death '
          'speak hear thee thou my our what why when where good ill fair').split()


def _paragraph(rng: random.Random, words: int) -> str:
  lines, line = [], []
  for _ in range(words):
    line.append(rng.choice(_WORDS))
    if len(line) >= rng.randint(5, 9):
      lines.append(' '.join(line) + rng.choice(',.;'))
      line = []
  lines.append(' '.join(line or ['fin']) + '.')
  return '\n'.join(lines)


def write_corpus(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A small folder corpus: .txt plays, a .jsonl, empty docs and ignored files."""
  rng = random.Random(seed)
  root.mkdir(parents=True, exist_ok=True)
  (root / 'sub').mkdir(exist_ok=True)
  (root / '.hidden').mkdir(exist_ok=True)
  for i in range(5):
    paras = [_paragraph(rng, rng.randint(20, 120)) for _ in range(12)]
    (root / f'play{i}.txt').write_text('\n\n\n'.join(paras) + '\n')
  # One paragraph longer than a passage: cut at line ends.
  (root / 'sub' / 'long.txt').write_text(_paragraph(rng, 900))
  records = [{'text': _paragraph(rng, 40)} for _ in range(4)]
  records.insert(2, {'text': '   \n '})  # Empty: skipped and counted.
  (root / 'sub' / 'letters.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in records) + '\n\n')
  (root / 'empty.txt').write_text('')  # Empty: skipped and counted.
  (root / 'notes.md').write_text('not a document')
  (root / '.hidden' / 'secret.txt').write_text('hidden files are ignored')
  return root


def make_config(cache: pathlib.Path, path: pathlib.Path | str = '', **data):
  config = default.get_config('size=tiny')
  config.model.vocab_size = VOCAB
  config.max_seq_len = SEQ_LEN
  config.global_batch_size = BATCH
  config.data.source = 'folder'
  config.data.path = str(path)
  config.data.cache_dir = str(cache)
  config.data.validation_fraction = 0.2
  for k, v in data.items():
    config.data[k] = v
  return config


def expected_passages(folder: pathlib.Path, fraction: float):
  """(train, validation) passage lists computed straight from the files."""
  train, val = [], []
  for source, text in passages.iter_passages(documents.read_folder(folder)):
    (val if passages.is_validation(source, text, fraction) else train).append(text)
  return train, val


def split_documents(token_rows, tok) -> list[list[int]]:
  """Cuts the concatenated non-padding tokens of packed rows at EOS."""
  docs, current = [], []
  for row, seg in token_rows:
    for t in row[seg > 0]:
      current.append(int(t))
      if t == tok.eos_id:
        docs.append(current)
        current = []
  return docs


def take_documents(it, n: int, tok):
  """(inputs, segment_ids) rows from `it` until `n` documents have ended."""
  rows, ended = [], 0
  while ended < n:
    batch = next(it)
    ended += int(np.sum(batch['inputs'][batch['segment_ids'] > 0] == tok.eos_id))
    rows.extend(zip(batch['inputs'], batch['segment_ids']))
  return rows


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus'))


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def config(cache, corpus):
  return make_config(cache, corpus)


@pytest.fixture(scope='module')
def ds(config):
  return pipeline.create_datasets(config)


# Passages.


def test_split_passages_at_blank_lines_and_within_limit():
  paras = [f'para {i}\n' + 'x' * 300 for i in range(20)]
  text = '\n\n  \n'.join(paras)
  out = passages.split_passages(text, max_chars=1000)
  assert all(len(p) <= 1000 for p in out)
  assert len(out) > 1
  # Nothing but blank lines is lost; paragraphs stay whole.
  assert '\n\n'.join(out) == '\n\n'.join(paras)


def test_split_passages_cuts_long_paragraphs_at_line_ends():
  lines = [f'line {i} ' + 'y' * 50 for i in range(100)]
  out = passages.split_passages('\n'.join(lines), max_chars=500)
  assert all(len(p) <= 500 for p in out)
  assert '\n'.join(out).split('\n') == lines
  assert passages.split_passages(' \n\n \n') == []


# Batches.


def test_batches_are_packed_consistently(ds):
  tok = ds.tokenizer
  it = iter(ds.train)
  for _ in range(20):
    batch = next(it)
    assert set(batch) == {'inputs', 'segment_ids', 'positions'}
    for v in batch.values():
      assert v.shape == (BATCH, SEQ_LEN) and v.dtype == np.int32
    for inputs, seg, pos in zip(batch['inputs'], batch['segment_ids'],
                                batch['positions']):
      assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
      assert np.all(inputs[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
      for s in np.unique(seg[seg > 0]):
        np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
        piece = inputs[seg == s]
        # BOS only ever opens a document, EOS only closes one.
        assert tok.bos_id not in piece[1:] and tok.eos_id not in piece[:-1]
  assert ds.tokenizer.vocab_size <= VOCAB
  assert ds.tokenizer.pad_id == 0


def test_train_rows_carry_no_padding_across_epochs(ds):
  """The train stream repeats before packing: no row pads, not even at an epoch's end."""
  rows_per_epoch = ds.stats['train_tokens'] / (BATCH * SEQ_LEN)
  it = iter(ds.train)
  for i in range(math.ceil(2.5 * rows_per_epoch) + 1):  # Across two epoch boundaries.
    batch = next(it)
    assert np.all(batch['segment_ids'] > 0), f'padding in train batch {i}'


def _pack_reference(docs, seq_len):
  """Concat-then-split by hand: rows of seq_len tokens cut from all documents in order;
  a document cut by a row's end goes on as a new segment (positions from 0); only the
  last row pads."""
  rows, row = [], []
  for doc in docs:
    position = 0
    for token in doc:
      if len(row) == seq_len:
        rows.append(row)
        row, position = [], 0  # The rest of this document starts the next row.
      segment = (row[-1][1] + (position == 0)) if row else 1
      row.append((token, segment, position))
      position += 1
  rows.append(row + [(0, 0, 0)] * (seq_len - len(row)))
  return [{'inputs': [t for t, _, _ in r], 'segment_ids': [s for _, s, _ in r],
           'positions': [p for _, _, p in r]} for r in rows]


@pytest.mark.parametrize('seed', [0, 1])
def test_packing_a_finite_stream_equals_a_hand_packer(seed):
  """Documents shorter, equal to and longer than a row; only the final row pads."""
  from xenith.data import packing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  seq_len = 8
  lengths = [8, 3, 1, 13, 5, 17, 2, 8, 4]
  docs = [rng.integers(1, 100, n).astype(np.int32) for n in lengths]
  source = grain.MapDataset.source([{'inputs': d} for d in docs]).to_iter_dataset()
  got = [{k: v.tolist() for k, v in row.items()} for row in packing.pack(source, seq_len)]
  assert got == _pack_reference([d.tolist() for d in docs], seq_len)


def test_packed_stream_resumes_after_a_json_round_trip_at_every_row():
  """Resuming after each row from its JSON-stored state (as Orbax keeps it) continues
  with exactly the remaining rows, also where a row ended on a document's end (no
  partial document pending)."""
  from xenith.data import packing  # pylint: disable=g-import-not-at-top
  seq_len, lengths = 8, [8, 3, 5, 8, 2, 6, 11, 5]  # Rows 1, 2, 3 and 4 end on a document.
  rng = np.random.default_rng(0)
  source = grain.MapDataset.source(
      [{'inputs': rng.integers(1, 100, n).astype(np.int32)} for n in lengths])
  packed = packing.pack(source.to_iter_dataset(), seq_len)
  rows = list(packed)
  for k in range(len(rows)):
    it = iter(packed)
    for _ in range(k):
      next(it)
    resumed = iter(packed)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    _assert_same_batches(list(resumed), rows[k:])


def test_no_text_lost_in_train_and_validation(ds, corpus):
  tok = ds.tokenizer
  train, val = expected_passages(corpus, 0.2)
  assert ds.stats['train_passages'] == len(train)
  assert ds.stats['validation_passages'] == len(val) >= 1
  # Two epochs of the infinite train stream: each is every passage once.
  rows = take_documents(iter(ds.train), 2 * len(train), tok)
  docs = split_documents(rows, tok)
  assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
  epochs = [docs[:len(train)], docs[len(train):2 * len(train)]]
  for epoch in epochs:
    assert sorted(tok.decode(d) for d in epoch) == sorted(train)
  assert epochs[0] != epochs[1]  # Reshuffled every epoch.
  # Validation: the whole split, in stored order, nothing lost.
  eval_rows = [r for b in ds.eval_batches(-1)
               for r in zip(b['inputs'], b['segment_ids'])]
  assert sorted(tok.decode(d) for d in split_documents(eval_rows, tok)) == sorted(val)


def test_train_deterministic_for_seed(config, ds):
  again = pipeline.create_datasets(config)
  other = pipeline.create_datasets(_with_seed(config, 1))
  a, b, c = iter(ds.train), iter(again.train), iter(other.train)
  first = [next(a)['inputs'] for _ in range(5)]
  assert all(np.array_equal(x, next(b)['inputs']) for x in first)
  assert not all(np.array_equal(x, next(c)['inputs']) for x in first)


def _with_seed(config, seed):
  config = config.copy_and_resolve_references()
  config.seed = seed
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('k', [1, 2, 3, 7])
def test_iterator_state_resumes_exactly(ds, k):
  it = iter(ds.train)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # As Orbax stores it.
  expected = _take(it, 6)
  resumed = iter(ds.train)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 6), expected)


def test_iterator_checkpoint_with_orbax(ds, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = iter(ds.train)
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 6)
  resumed = iter(ds.train)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    assert mngr.latest_step() == 5
    mngr.restore(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(_take(resumed, 6), expected)


def test_processes_feed_their_rows_of_the_one_process_batches(config, ds):
  # Two processes: process i feeds rows [i * B/2, (i + 1) * B/2) of each global batch,
  # so together they train on exactly the one-process batches.
  whole = _take(iter(ds.train), 5)
  shards = []
  for index in range(2):
    shard = pipeline.create_datasets(config, process_index=index, process_count=2)
    assert shard.batch_size == BATCH // 2
    shards.append(_take(iter(shard.train), 5))
  for step, batch in enumerate(whole):
    for k in batch:
      np.testing.assert_array_equal(
          batch[k], np.concatenate([shards[0][step][k], shards[1][step][k]]))
  rows = [{r.tobytes() for b in shard for r in b['inputs']} for shard in shards]
  assert rows[0] and rows[1] and not rows[0] & rows[1]


def test_eval_batches_finite_deterministic_padded(config, ds):
  full = list(ds.eval_batches(-1))
  _assert_same_batches(full, list(ds.eval_batches(-1)))
  _assert_same_batches(full[:2], list(ds.eval_batches(2)))
  last = full[-1]
  empty_rows = ~last['segment_ids'].any(axis=1)
  for k in last:
    assert not last[k][empty_rows].any()
  # Two processes: same number of batches, and their rows make up the whole.
  shards = [list(pipeline.create_datasets(
      config, process_index=i, process_count=2).eval_batches(-1))
            for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(full)
  for i, b in enumerate(full):
    np.testing.assert_array_equal(
        b['inputs'], np.concatenate([shards[0][i]['inputs'],
                                     shards[1][i]['inputs']]))


# Caching and preparation.


def test_prepared_data_is_reused_and_reprepared_on_change(tmp_path, monkeypatch):
  folder = write_corpus(tmp_path / 'corpus', seed=1)
  config = make_config(tmp_path / 'cache', folder)
  first = pipeline.create_datasets(config)
  calls = []
  real_plan = text_dataset.plan_splits
  monkeypatch.setattr(text_dataset, 'plan_splits',
                      lambda *a: calls.append(a) or real_plan(*a))
  again = pipeline.create_datasets(config)
  assert not calls and again.fingerprint == first.fingerprint
  with open(folder / 'play0.txt', 'a') as f:
    f.write('\n\nexit the fool, pursued by a bear.\n')
  changed = pipeline.create_datasets(config)
  assert len(calls) == 1 and changed.fingerprint != first.fingerprint
  tokens = lambda d: d.stats['train_tokens'] + d.stats['validation_tokens']
  assert tokens(changed) > tokens(first)


def test_at_least_one_validation_passage(tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  rng = random.Random(3)
  (folder / 'a.txt').write_text(
      '\n\n'.join(_paragraph(rng, 400) for _ in range(3)))  # 3 passages.
  ds = pipeline.create_datasets(
      make_config(tmp_path / 'cache', folder, validation_fraction=0.0))
  assert (ds.stats['train_passages'], ds.stats['validation_passages']) == (2, 1)
  eos = sum(int(np.sum(b['inputs'] == ds.tokenizer.eos_id))
            for b in ds.eval_batches(-1))
  assert eos == 1


def test_concurrent_processes_prepare_once(tmp_path):
  folder = write_corpus(tmp_path / 'corpus', seed=2)
  script = (
      'import sys; sys.path.insert(0, sys.argv[1]); '
      'from tests.test_data import make_config; '
      'from xenith.data import pipeline; '
      'ds = pipeline.create_datasets(make_config(sys.argv[2], sys.argv[3])); '
      'print(ds.fingerprint, ds.unigram_loss)')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen(
      [sys.executable, '-c', script, str(REPO), str(tmp_path / 'cache'),
       str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  # TFDS prints progress to stdout; the last line is ours.
  results = [o[0].strip().splitlines()[-1] for o in outs]
  assert results[0] == results[1]
  assert len(list((tmp_path / 'cache' / 'tfds').iterdir())) == 1


# Bad input.


def test_empty_documents_are_counted_and_logged(ds, config, caplog):
  assert ds.stats['skipped_empty_documents'] == 2
  assert ds.stats['documents'] == 5 + 1 + 4
  with caplog.at_level(logging.WARNING):
    list(documents.read_folder(config.data.path))
  assert sum('Skipping empty document' in r.getMessage()
             for r in caplog.records) == 2


@pytest.mark.parametrize('name,content,message', [
    ('bad.txt', b'good text\n\xff\xfe more', r'bad.txt: not valid UTF-8 at byte offset 10'),
    ('latin1.txt', 'à bientôt\n'.encode('latin-1'), r'latin1.txt: not valid UTF-8 at byte'),
    ('zeros.txt', b'\0' * 64, r'zeros.txt: a binary file, not text \(NUL byte at offset 0\)'),
    ('noise.jsonl', b'{"text": "ok"}\n\x00\x01', r'noise.jsonl: a binary file, not text '
                                                  r'\(NUL byte at offset 15\)'),
    ('noise.txt', random.Random(0).randbytes(4096).replace(b'\0', b'\1'),
     r'noise.txt: a binary file, not text \(\d+ of its first \d+ characters are not text\)'),
    ('bad.jsonl', b'{"text": "ok"}\n{"text": "broken\n', r'bad.jsonl:2: malformed JSON'),
    ('bad.jsonl', b'{"text": "ok"}\n\n{"body": "x"}\n', r'bad.jsonl:3: .*"text" field'),
    ('bad.jsonl', b'{"text": 7}\n', r'bad.jsonl:1: field "text" must be a string'),
], ids=['not_utf8', 'latin1', 'nul_bytes', 'nul_in_jsonl', 'random_bytes', 'malformed_json',
        'no_text_field', 'text_not_a_string'])
def test_bad_files_raise_data_error(tmp_path, name, content, message):
  folder = write_corpus(tmp_path / 'corpus')
  (folder / name).write_bytes(content)
  with pytest.raises(DataError, match=message):
    pipeline.create_datasets(make_config(tmp_path / 'cache', folder))
  assert not (tmp_path / 'cache' / 'tfds').exists() or not any(
      (tmp_path / 'cache' / 'tfds').rglob('*.array_record*'))


def test_main_rejects_a_binary_file_in_one_line(tmp_path):
  """A .txt of NUL bytes in a folder source: main.py stops before any preparation with one
  DataError line naming the file as binary."""
  folder = write_corpus(tmp_path / 'corpus')
  (folder / 'sub' / 'zeros.txt').write_bytes(b'\0' * 4096)
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny',
       f'--workdir={tmp_path / "run"}', '--config.data.source=folder',
       f'--config.data.path={folder}', f'--config.data.cache_dir={tmp_path / "cache"}'],
      cwd=REPO, capture_output=True, text=True, env=single_device_env(), timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'DataError: {folder / "sub" / "zeros.txt"}: a binary file, not text (NUL byte at '
      'offset 0); remove it from the data folder (config.data.path).')
  assert not any((tmp_path / 'cache').rglob('*.array_record*'))


def test_bad_folders_and_settings_raise_data_error(tmp_path, corpus):
  cache = tmp_path / 'cache'
  with pytest.raises(DataError, match='does not exist'):
    pipeline.create_datasets(make_config(cache, tmp_path / 'missing'))
  (tmp_path / 'nodocs').mkdir()
  (tmp_path / 'nodocs' / 'readme.md').write_text('hi')
  with pytest.raises(DataError, match='no .txt or .jsonl files'):
    pipeline.create_datasets(make_config(cache, tmp_path / 'nodocs'))
  with pytest.raises(DataError, match='config.data.path is empty'):
    pipeline.create_datasets(make_config(cache, ''))
  with pytest.raises(DataError, match='Unknown config.data.source'):
    pipeline.create_datasets(make_config(cache, corpus, source='web'))
  with pytest.raises(DataError, match='validation_fraction'):
    pipeline.create_datasets(make_config(cache, corpus, validation_fraction=1.0))
  with pytest.raises(DataError, match='is not .train., .mixtral., an existing SentencePiece'):
    pipeline.create_datasets(make_config(cache, corpus, tokenizer='nope.model'))
  config = make_config(cache, corpus)
  config.global_batch_size = 3
  with pytest.raises(DataError, match='not divisible'):
    pipeline.create_datasets(config, process_count=2)


def test_tokenizer_larger_than_vocab_size_is_rejected(ds, config, tmp_path):
  path = tmp_path / 'tok.model'
  path.write_bytes(ds.tokenizer.model_proto)
  small = make_config(pathlib.Path(config.data.cache_dir), config.data.path,
                      tokenizer=str(path))
  small.model.vocab_size = ds.tokenizer.vocab_size - 1
  with pytest.raises(ConfigError, match='config.model.vocab_size'):
    pipeline.create_datasets(small)
  # The same file within the limit loads and matches.
  small.model.vocab_size = ds.tokenizer.vocab_size
  assert pipeline.create_datasets(small).tokenizer.encode('the fool') == \
      ds.tokenizer.encode('the fool')


# Tokenizers and the baseline.


def test_trained_tokenizer_round_trips_and_is_cached(ds, config):
  tok = ds.tokenizer
  text = '  the KING, ¿qué?\n\n\tthou fool — 42 ✓'
  assert tok.decode(tok.encode(text)) == text  # Byte fallback: nothing is lost.
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  models = list((pathlib.Path(config.data.cache_dir) / 'tokenizers').glob('*.model'))
  assert len(models) == 1


def test_unigram_loss_matches_hand_computation(ds, corpus):
  assert unigram.unigram_loss(np.array([3, 1, 0]), np.array([1, 1, 1])) == \
      pytest.approx(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
  tok = ds.tokenizer
  train, val = expected_passages(corpus, 0.2)
  counts = collections.Counter()
  for p in train:
    counts.update(tok.encode(p) + [tok.eos_id])
  n = sum(counts.values())
  val_ids = [i for p in val for i in tok.encode(p) + [tok.eos_id]]
  expected = -sum(math.log((counts[i] + 1) / (n + tok.vocab_size))
                  for i in val_ids) / len(val_ids)
  assert math.isfinite(ds.unigram_loss)
  assert ds.unigram_loss == pytest.approx(expected, rel=1e-9)
  assert ds.unigram_loss < math.log(tok.vocab_size)
  assert ds.stats['train_tokens'] == n - len(train)


@pytest.mark.slow
def test_mixtral_tokenizer(tmp_path):
  cache = pathlib.Path(os.environ.get('XENITH_CACHE', '~/.cache/xenith'))
  tok = tokenizer_lib.load_tokenizer('mixtral', vocab_size=32000,
                                     cache=cache.expanduser())
  assert tok.vocab_size == 32000
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  text = 'To be, or not to be: that is the question.\nनमस्ते दुनिया 🙂'
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ConfigError, match='config.model.vocab_size: 2048 is less'):
    tokenizer_lib.load_tokenizer('mixtral', vocab_size=2048,
                                 cache=cache.expanduser())


def test_shakespeare_corpus():
  """The embedded corpus (downloaded once into the default cache)."""
  config = default.get_config('size=tiny')
  config.global_batch_size = 2
  ds = pipeline.create_datasets(config)
  assert ds.stats['documents'] == 42
  assert ds.stats['validation_passages'] >= 1
  batch = next(iter(ds.train))
  assert batch['inputs'].shape == (2, config.max_seq_len)
  assert 0 < ds.unigram_loss < math.log(ds.tokenizer.vocab_size)
