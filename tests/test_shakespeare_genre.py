"""The Shakespeare genre task: Folio labels, the split by play, no title lines in passages,
the cached folders, the experiment config, and the benchmark's baselines."""

import collections
import json
import os
import pathlib
import re
import sys

import pytest

from experiments import shakespeare_genre as genre_experiment
from xenith.data import shakespeare_genre as genre
from xenith.data import documents
from xenith.data import sources
from xenith.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The First Folio's catalogue (1623), by section, as corpus file names; typed from the
# Folio, not from the module. Troilus and Cressida, missing from the catalogue, is
# headed 'The Tragedie of Troylus and Cressida'.
FOLIO_COMEDIES = {
    'tempest', 'two_gentlemen_of_verona', 'merry_wives_of_windsor', 'measure_for_measure',
    'comedy_of_errors', 'much_ado_about_nothing', 'loves_labours_lost',
    'midsummer_nights_dream', 'merchant_of_venice', 'as_you_like_it',
    'taming_of_the_shrew', 'alls_well_that_ends_well', 'twelfth_night', 'winters_tale'}
FOLIO_HISTORIES = {
    'john', 'richard_ii', 'henry_iv_part_1', 'henry_iv_part_2', 'henry_v',
    'henry_vi_part_1', 'henry_vi_part_2', 'henry_vi_part_3', 'richard_iii', 'henry_viii'}
FOLIO_TRAGEDIES = {
    'troilus_and_cressida', 'coriolanus', 'tragedy_of_titus_andronicus', 'romeo_and_juliet',
    'timon_of_athens', 'julius_caesar', 'macbeth', 'hamlet', 'lear', 'othello',
    'antony_and_cleopatra', 'cymbeline'}
NOT_PLAYS = {'sonnets', 'lovers_complaint', 'passionate_pilgrim', 'phoenix_and_the_turtle',
             'rape_of_lucrece'}

# Passages per split and genre (docs/classification.md's table); changes with
# genre.VERSION.
COUNTS = {('train', 'comedy'): 1657, ('train', 'history'): 1397, ('train', 'tragedy'): 1628,
          ('validation', 'comedy'): 271, ('validation', 'history'): 318,
          ('validation', 'tragedy'): 303}

# Headings the corpus carries besides each text's first line.
HEADINGS = {'by william shakespeare', 'the end', 'troilus and cressida',
            'king richard the second'}
# A heading that would name a genre: 'THE TRAGEDY OF ...', 'THE LIFE AND DEATH OF ...'.
GENRE_HEADING = re.compile(r'^(THE )?(TRAGEDY|TRAGEDIE|COMEDY|COMEDIE|HISTORY|HISTORIE|LIFE)'
                           r'\b.* OF ')


@pytest.fixture(scope='module')
def corpus() -> pathlib.Path:
  """The session-wide corpus (the cache the other data tests use; downloaded once)."""
  cache = (os.environ.get('XENITH_TEST_CACHE') or os.environ.get('XENITH_CACHE')
           or '~/.cache/xenith')
  return sources.shakespeare_folder(pathlib.Path(cache).expanduser())


@pytest.fixture(scope='module')
def cache(corpus, tmp_path_factory) -> pathlib.Path:
  """A fresh cache whose corpus is the session-wide one (a link: nothing downloaded)."""
  root = tmp_path_factory.mktemp('cache')
  (root / 'corpora').mkdir()
  (root / 'corpora' / corpus.name).symlink_to(corpus, target_is_directory=True)
  return root


@pytest.fixture(scope='module')
def built(cache) -> dict[str, list[dict]]:
  folder = genre.build(cache)
  return {split: [json.loads(line) for line in
                  (folder / f'{split}.jsonl').read_text(encoding='utf-8').splitlines()]
          for split in ('train', 'validation')}


def _stems(corpus: pathlib.Path) -> set[str]:
  return {p.name.removesuffix('_gut.txt') for p in corpus.glob('*_gut.txt')}


def test_every_play_has_its_folio_genre_and_every_text_is_covered_once(corpus):
  labelled = list(genre.GENRES)
  excluded = [*genre.POEMS, *genre.NOT_IN_FOLIO]
  assert len(labelled) + len(excluded) == len(set(labelled) | set(excluded)) == 42
  assert set(labelled) | set(excluded) == _stems(corpus)
  assert set(genre.POEMS) == NOT_PLAYS and set(genre.NOT_IN_FOLIO) == {'pericles'}
  assert {p for p, g in genre.GENRES.items() if g == 'comedy'} == FOLIO_COMEDIES
  assert {p for p, g in genre.GENRES.items() if g == 'history'} == FOLIO_HISTORIES
  assert {p for p, g in genre.GENRES.items() if g == 'tragedy'} == FOLIO_TRAGEDIES
  assert genre.LABELS == ('comedy', 'history', 'tragedy')


def test_the_split_is_by_play_with_every_genre_in_validation(built):
  plays = {split: {row['play'] for row in rows} for split, rows in built.items()}
  assert not plays['train'] & plays['validation']
  assert plays['validation'] == set(genre.VALIDATION_PLAYS)
  assert plays['train'] | plays['validation'] == set(genre.GENRES)
  # Stratified: two plays of each genre held out.
  held_out = collections.Counter(genre.GENRES[p] for p in plays['validation'])
  assert held_out == {'comedy': 2, 'history': 2, 'tragedy': 2}
  for split, rows in built.items():
    assert {row['label'] for row in rows} == {'comedy', 'history', 'tragedy'}, split
    for row in rows:
      assert set(row) == {'text', 'label', 'play'}
      assert row['label'] == genre.GENRES[row['play']]


def test_passages_per_split_and_genre(built):
  counts = collections.Counter((split, row['label']) for split, rows in built.items()
                               for row in rows)
  assert counts == COUNTS
  for rows in built.values():
    assert all(0 < len(row['text']) <= genre.PASSAGE_CHARS for row in rows)


def test_no_passage_holds_a_title_line(built, corpus):
  titles = {next(l for l in p.read_text().splitlines() if l.strip()).strip().lower()
            for p in corpus.glob('*_gut.txt')}
  assert 'the tragedy of king richard the second' in titles  # A history's title.
  forbidden = titles | HEADINGS
  for rows in built.values():
    for row in rows:
      for line in row['text'].splitlines():
        assert line.strip().lower() not in forbidden, (row['play'], line)
        assert not GENRE_HEADING.match(line.strip()), (row['play'], line)


def test_passages_keep_all_the_text_but_the_title_lines(built, corpus):
  """Only the few words of titles, bylines and 'THE END' are lost, none invented."""
  by_play = collections.defaultdict(list)
  for rows in built.values():
    for row in rows:
      by_play[row['play']].append(row['text'])
  for play, texts in by_play.items():
    raw = collections.Counter((corpus / f'{play}_gut.txt').read_text().split())
    kept = collections.Counter(' '.join(texts).split())
    assert not kept - raw, play
    lost = raw - kept
    assert 'Shakespeare' in lost and sum(lost.values()) <= 20, (play, lost)


def test_build_runs_once_and_leaves_no_partial_folder(cache, built):
  del built
  folder = genre.build(cache)
  stamp = (folder / 'train.jsonl').stat().st_mtime_ns
  assert genre.build(cache) == folder
  assert (folder / 'train.jsonl').stat().st_mtime_ns == stamp
  assert sorted(p.name for p in folder.iterdir()) == ['train.jsonl', 'validation.jsonl']
  assert not [p for p in folder.parent.iterdir() if p.name.startswith('.build-')]


def test_lm_corpus_holds_every_text_but_the_validation_plays(cache, corpus):
  folder = genre.build_lm_corpus(cache)
  names = {p.name.removesuffix('_gut.txt') for p in folder.iterdir()}
  assert names == _stems(corpus) - set(genre.VALIDATION_PLAYS)
  assert len(names) == 36 and 'pericles' in names and 'sonnets' in names
  assert (folder / 'hamlet_gut.txt').read_bytes() == (corpus / 'hamlet_gut.txt').read_bytes()
  # What data.source='folder' reads of it: every file, one document each.
  assert len(documents.list_files(folder)) == 36


def test_a_corpus_that_differs_is_refused(tmp_path, corpus):
  fake = tmp_path / 'corpora' / corpus.name
  fake.mkdir(parents=True)
  for p in corpus.glob('*_gut.txt'):
    if p.name != 'pericles_gut.txt':
      (fake / p.name).symlink_to(p)
  (fake / 'edward_iii_gut.txt').write_text('EDWARD III\n')
  with pytest.raises(DataError, match=r"edward_iii.*delete the corpus folder"):
    genre.build(tmp_path)


def test_experiment_config():
  scratch = genre_experiment.get_config()
  assert scratch.task == 'classification'
  assert scratch.data.source == 'shakespeare_genre'
  assert scratch.init_from_checkpoint == '' and scratch.model.lora.rank == 0
  # The default experiment's small model, so its LM checkpoint loads.
  from experiments import default  # pylint: disable=g-import-not-at-top
  assert scratch.model.to_dict() == default.get_config().model.to_dict()
  full = genre_experiment.get_config('base=runs/lm')
  assert full.init_from_checkpoint == 'runs/lm'
  assert full.data.tokenizer == os.path.join('runs/lm', 'tokenizer.model')
  assert full.optimizer.learning_rate < scratch.optimizer.learning_rate
  lora = genre_experiment.get_config('base=runs/lm,lora=4')
  assert (lora.model.lora.rank, lora.model.lora.alpha) == (4, 8.0)
  assert lora.model.lora.train_only_adapters
  with pytest.raises(ValueError, match='base='):
    genre_experiment.get_config('lora=8')
  with pytest.raises(ValueError, match='known: base, lora, size'):
    genre_experiment.get_config('rank=8')


def _bench():
  sys.path.insert(0, str(ROOT / 'bench'))
  import shakespeare_genre as bench  # pylint: disable=g-import-not-at-top
  return bench


def test_baselines_on_a_hand_checked_example():
  bench = _bench()
  # Train majority is 'comedy' (3 of 5); validation's is 'history' (2 of 4).
  train = [('merry jest wedding', 'comedy'), ('jest wedding', 'comedy'),
           ('merry wedding', 'comedy'), ('king crown england', 'history'),
           ('death poison grave', 'tragedy')]
  validation = [('merry jest', 'comedy'), ('crown of england', 'history'),
                ('king of england', 'history'), ('poison and grave', 'tragedy')]
  majority = bench.majority_baseline(train, validation)
  # Accuracy 1/4. F1: comedy 2pr/(p+r) with p = 1/4, r = 1: 2/5; the others 0.
  assert majority == {'accuracy': pytest.approx(0.25), 'macro_f1': pytest.approx(2 / 15)}
  words = bench.bag_of_words_baseline(train, validation, c=10.0)
  assert words == {'accuracy': 1.0, 'macro_f1': 1.0}


def test_xenith_rows_run_main_py_per_the_contract(tmp_path, monkeypatch):
  """The LM on the LM corpus, then three classifiers (the last two from the LM), each
  scored from its workdir's final_metrics.json; a finished run is not run again."""
  bench = _bench()
  commands = []

  def fake_run(cmd, check, cwd):
    assert check and cwd == str(ROOT) == bench.ROOT
    commands.append(cmd)
    workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
    os.makedirs(workdir)
    metrics = {'eval/loss': 3.0} if workdir.endswith('lm') else {
        'eval/accuracy': len(commands) / 10, 'eval/macro_f1': len(commands) / 20}
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(metrics, f)

  monkeypatch.setattr(bench.subprocess, 'run', fake_run)
  lm_metrics, rows = bench.xenith_rows(str(tmp_path), '/corpus')
  lm = str(tmp_path / 'lm')
  experiment = str(ROOT / 'experiments' / 'shakespeare_genre.py')
  assert [c[2:] for c in commands] == [
      [f'--config={ROOT}/experiments/default.py', f'--workdir={lm}',
       '--config.data.source=folder', '--config.data.path=/corpus'],
      [f'--config={experiment}', f'--workdir={tmp_path}/scratch'],
      [f'--config={experiment}:base={lm}', f'--workdir={tmp_path}/finetune'],
      [f'--config={experiment}:base={lm},lora=8', f'--workdir={tmp_path}/lora']]
  assert all(c[:2] == [sys.executable, str(ROOT / 'main.py')] for c in commands)
  assert lm_metrics['eval/loss'] == 3.0
  assert [(r['accuracy'], r['macro_f1']) for r in rows] == [(0.2, 0.1), (0.3, 0.15),
                                                            (0.4, 0.2)]
  assert all(r['wall_s'] is not None for r in rows)
  commands.clear()
  again = bench.xenith_rows(str(tmp_path), '/corpus')[1]
  assert not commands and [r['accuracy'] for r in again] == [0.2, 0.3, 0.4]
  assert all(r['wall_s'] is None for r in again)
