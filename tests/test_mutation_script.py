"""launch/mutation.py: which mutants it leaves out, its early errors, and a real run of
cosmic-ray on a small sample in a scratch copy (the checkout itself is never edited)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'mutation.py')
sys.path.insert(0, os.path.join(ROOT, 'launch'))
import mutation  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('operator,excluded', [
    ('core/ReplaceBinaryOperator_Add_BitAnd', True),  # Arithmetic -> bitwise.
    ('core/ReplaceBinaryOperator_MatMult_BitXor', True),
    ('core/ReplaceBinaryOperator_Mul_LShift', True),  # Anything -> shift.
    ('core/ReplaceBinaryOperator_BitAnd_RShift', True),
    ('core/ReplaceBinaryOperator_BitAnd_BitOr', False),  # A mask's `&` -> `|` is kept.
    ('core/ReplaceBinaryOperator_Add_Sub', False),
    ('core/ReplaceBinaryOperator_Add_Mul', False),
    ('core/ReplaceComparisonOperator_Lt_LtE', False),
])
def test_excluded_operators(operator, excluded):
  assert bool(mutation.EXCLUDED_OPERATORS.match(operator)) == excluded


def test_annotation_spans_cover_every_annotation_and_nothing_else(tmp_path):
  path = tmp_path / 'm.py'
  path.write_text('def f(x: int | None, *, y: str = "a") -> list[int]:\n'
                  '  z: dict = {}\n'
                  '  return [x + 1]\n')
  assert sorted(mutation._annotation_spans(str(path))) == [  # pylint: disable=protected-access
      ((1, 9), (1, 19)),  # int | None
      ((1, 27), (1, 30)),  # str
      ((1, 41), (1, 50)),  # list[int]
      ((2, 5), (2, 9)),  # dict
  ]


def _init_session(tmp_path) -> str:
  """cosmic-ray's mutants of a small module with annotations and an addition."""
  (tmp_path / 'm.py').write_text('def f(a: int | None, b: int) -> int:\n'
                                 '  return a + b * 2\n')
  (tmp_path / 'cr.toml').write_text(
      '[cosmic-ray]\nmodule-path = "m.py"\ntimeout = 10\nexcluded-modules = []\n'
      'test-command = "true"\n[cosmic-ray.distributor]\nname = "local"\n')
  session = str(tmp_path / 'session.sqlite')
  subprocess.run([sys.executable, '-m', 'cosmic_ray.cli', 'init', 'cr.toml', session],
                 cwd=tmp_path, check=True, capture_output=True)
  return session


def _pending(session) -> list:
  from cosmic_ray.work_db import use_db, WorkDB  # pylint: disable=g-import-not-at-top
  with use_db(session, WorkDB.Mode.open) as db:
    return [w.mutations[0] for w in db.pending_work_items]


@pytest.mark.parametrize('lines', [None, {2}])
def test_the_sample_leaves_out_annotations_and_excluded_operators(tmp_path, lines):
  session = _init_session(tmp_path)
  everything = _pending(session)
  spans = mutation._annotation_spans(str(tmp_path / 'm.py'))  # pylint: disable=protected-access
  inside = lambda m: any(s <= m.start_pos and m.end_pos <= e for s, e in spans)
  kept = [m for m in everything
          if not inside(m) and not mutation.EXCLUDED_OPERATORS.match(m.operator_name)]
  # Both kinds exist before sampling, so leaving them out is checked, not assumed.
  assert any(inside(m) for m in everything)
  assert any(mutation.EXCLUDED_OPERATORS.match(m.operator_name) for m in everything)
  total, chosen = mutation._sample(session, 0, 0, lines, spans)  # pylint: disable=protected-access
  # With `--since`, only mutants on the changed lines: here the `return` line.
  wanted = [m for m in kept if not lines or m.start_pos[0] in lines]
  assert 0 < len(wanted) < len(everything)
  key = lambda ms: sorted((m.operator_name, m.occurrence) for m in ms)
  assert total == len(kept)
  assert chosen == len(wanted) and key(_pending(session)) == key(wanted)


def test_the_same_seed_samples_the_same_mutants(tmp_path):
  picks = []
  for seed in (0, 0, 1):
    workdir = tmp_path / str(len(picks))
    workdir.mkdir()
    session = _init_session(workdir)
    mutation._sample(session, 3, seed, None, [])  # pylint: disable=protected-access
    picks.append(sorted((m.operator_name, m.occurrence) for m in _pending(session)))
  assert len(picks[0]) == 3 and picks[0] == picks[1] and picks[0] != picks[2]


def _run(*args, timeout=60):
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def test_bad_arguments_fail_before_any_work(tmp_path):
  result = _run('xenith/no_such_module.py', f'--workdir={tmp_path / "w"}')
  assert result.returncode != 0 and 'not a Python file of this checkout' in result.stderr
  result = _run('README.md', f'--workdir={tmp_path / "w"}')
  assert result.returncode != 0 and 'not a Python file of this checkout' in result.stderr
  result = _run('xenith/sizing/flops.py', f'--workdir={tmp_path / "w"}')
  assert result.returncode != 0 and 'No covering tests are listed' in result.stderr
  (tmp_path / 'exists').mkdir()
  result = _run('xenith/train/steps.py', f'--workdir={tmp_path / "exists"}')
  assert result.returncode != 0 and 'exists: remove it' in result.stderr
  assert not os.listdir(tmp_path / 'exists')


def test_a_seeded_sample_runs_in_a_scratch_copy(tmp_path):
  module = 'xenith/sweeps.py'
  with open(os.path.join(ROOT, module), 'rb') as f:
    before = hashlib.sha256(f.read()).hexdigest()
  tests = [f'tests/test_sweep.py::{name}' for name in (
      'test_product_is_cartesian_and_last_field_varies_fastest',
      'test_zip_pairs_values_and_needs_equal_lengths')]
  reports = []
  for run in ('a', 'b'):  # The same seed samples the same mutants.
    workdir = tmp_path / run
    result = _run(module, '--sample=3', '--seed=1', f'--workdir={workdir}', '--tests', *tests,
                  timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(workdir / 'report.json') as f:
      reports.append(json.load(f))
    assert os.path.isfile(workdir / 'src' / module)  # The scratch copy it mutated.
  report = reports[0]
  assert report['module'] == module and report['sampled'] == 3 and report['mutants'] > 3
  assert report['tests'] == tests and not report['stopped_by_budget']
  outcomes = [m['outcome'] for m in report['mutants_run']]
  assert len(outcomes) == 3
  assert set(outcomes) <= {'killed', 'killed (timeout)', 'survived', 'incompetent'}
  assert all(m['diff'] and f'a/{module}' in m['diff'] for m in report['mutants_run'])
  killed = sum(o.startswith('killed') for o in outcomes)
  scored = killed + outcomes.count('survived')
  assert report['counts'].get('killed', 0) == killed
  if scored:
    assert report['score'] == pytest.approx(killed / scored)
  key = lambda r: [(m['line'], m['operator'], m['occurrence']) for m in r['mutants_run']]
  assert key(reports[0]) == key(reports[1])
  with open(os.path.join(ROOT, module), 'rb') as f:
    assert hashlib.sha256(f.read()).hexdigest() == before  # The checkout is untouched.
