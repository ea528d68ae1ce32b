"""Sweeps: declaring points, naming them, validating them, summaries, launch/sweep.py."""

import csv
import glob
import logging
import math
import os
import subprocess
import sys
import textwrap

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.plugins.hparams import metadata

from xenith import sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ('--config.num_train_steps=6', '--config.optimizer.warmup_steps=1',
        '--config.log_every_steps=3', '--config.eval_every_steps=6',
        '--config.num_eval_batches=1', '--config.checkpoint_every_steps=6')


def _experiment(tmp_path, sweep_body, name='exp.py'):
  """Writes an experiment file: the default config plus the given get_sweep body."""
  path = tmp_path / name
  path.write_text(textwrap.dedent(f'''\
      import os, sys
      sys.path.insert(0, {ROOT!r})  # Loaded by path: make the repo importable.
      from experiments.default import get_config
      from xenith import sweeps

      def get_sweep(arg=None):
      ''') + textwrap.indent(textwrap.dedent(sweep_body), '  '))
  return str(path)


_CONFIG_FILE = """\
import ml_collections

def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.steps = 10
  config.flag = False
  config.name = 'a'
  config.shape = (1, 2)
  config.opt = ml_collections.ConfigDict({'learning_rate': 0.1})
  config.model = ml_collections.ConfigDict({'dropout_rate': 0.0})
  config.data = ml_collections.ConfigDict({'dropout_rate': 0.0})
  return config
"""


def _config():
  scope = {}
  exec(_CONFIG_FILE, scope)  # pylint: disable=exec-used
  return scope['get_config']()


def _launch(*args, timeout=60):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # One device per run.
  if os.environ.get('XENITH_TEST_CACHE'):
    env['XENITH_CACHE'] = os.environ['XENITH_TEST_CACHE']
  return subprocess.run([sys.executable, 'launch/sweep.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_product_is_cartesian_and_last_field_varies_fastest():
  assert sweeps.product({'a': [1, 2], 'b': ['x', 'y']}) == [
      {'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}]
  assert sweeps.product({}) == [{}]


def test_zip_pairs_values_and_needs_equal_lengths():
  assert sweeps.zip_({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  with pytest.raises(sweeps.SweepError, match='one length'):
    sweeps.zip_({'a': [1, 2], 'b': [3]})


def test_point_names_are_short_readable_and_safe():
  assert sweeps.point_name({'optimizer.learning_rate': 1e-3, 'model.embed_dim': 64}) == (
      'learning_rate=0.001,embed_dim=64')
  assert sweeps.point_name({'a.lr': 1e-5, 'a.on': True}) == 'lr=1e-05,on=True'
  assert sweeps.point_name({'data.path': '/x y/z'}) == 'path=_x_y_z'
  assert sweeps.point_name({}) == 'default'


def test_point_names_fall_back_to_dotted_fields_and_stay_unique():
  names = sweeps.point_names([{'model.dropout_rate': 0.1, 'data.dropout_rate': 0.2}])
  assert names == ['model.dropout_rate=0.1,data.dropout_rate=0.2']
  # 'a/b' and 'a_b' both sanitise to 'a_b'; 'X' and 'x' clash on macOS.
  points = [{'d.s': 'a/b'}, {'d.s': 'a_b'}, {'d.s': 'X'}, {'d.s': 'x'}, {'d.s': 'c'}]
  names = sweeps.point_names(points)
  assert len({n.lower() for n in names}) == 5
  assert names[-1] == 's=c'
  assert names == sweeps.point_names(points)  # Stable, so that a rerun finds its runs.
  long = sweeps.point_names([{'d.s': 'v' * 500}])[0]
  assert len(long) < 255


@pytest.mark.parametrize('field,value', [
    ('steps', 7), ('opt.learning_rate', 1e-3), ('opt.learning_rate', 3e-7),
    ('opt.learning_rate', 2), ('flag', True), ('name', 'x,y z=1'), ('shape', (3, 4))])
def test_values_on_the_command_line_parse_back_to_the_field_type(tmp_path, field, value):
  path = tmp_path / 'cfg.py'
  path.write_text(_CONFIG_FILE)
  point = sweeps.validate(_config(), [{field: value}])[0]
  argv = ['prog', f'--config={path}', f'--config.{field}={sweeps.format_value(point[field])}']
  flag_values = flags.FlagValues()  # main.py's parsing, on private flags.
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  parsed = flag_values.config
  for part in field.split('.'):
    parsed = parsed[part]
  assert (parsed, type(parsed)) == (value, type(point[field]))


def test_validate_returns_values_typed_like_the_fields():
  points = sweeps.validate(_config(), [{'opt.learning_rate': 1}, {'shape': [5, 6]}])
  assert points == [{'opt.learning_rate': 1.0}, {'shape': (5, 6)}]
  assert isinstance(points[0]['opt.learning_rate'], float)


@pytest.mark.parametrize('points,message', [
    ([{'opt.learnin_rate': 0.1}], r"'opt.learnin_rate'.*config.opt.learnin_rate does not"),
    ([{'optim.learning_rate': 0.1}], r'config.optim does not exist'),
    ([{'steps.x': 1}], r'config.steps.x does not exist'),
    ([{'opt': 0.1}], 'group of fields'),
    ([{'steps': 0.5}], r"'steps': 0.5 does not fit the field's int"),
    ([{'steps': True}], 'does not fit'),
    ([{'flag': 1}], 'does not fit'),
    ([{'steps': 1}, {'steps': 1}], 'points 0 and 1 are the same'),
    ([], 'non-empty list'),
    ({'steps': [1, 2]}, 'non-empty list'),
    ([['steps', 1]], 'point 0 is not a dict'),
])
def test_validation_errors_name_the_problem(points, message):
  with pytest.raises(sweeps.SweepError, match=message):
    sweeps.validate(_config(), points)


def test_load_sweep_of_the_default_experiment():
  points = sweeps.load_sweep(os.path.join(ROOT, 'experiments/default.py:size=tiny'))
  assert len(points) == 4 and points[0] == {'optimizer.learning_rate': 1e-3,
                                            'model.embed_dim': 64}


def test_load_sweep_errors(tmp_path):
  no_sweep = tmp_path / 'no_sweep.py'
  no_sweep.write_text('def get_config(arg=None):\n  return None\n')
  with pytest.raises(sweeps.SweepError, match='defines no get_sweep'):
    sweeps.load_sweep(str(no_sweep))
  with pytest.raises(sweeps.SweepError, match='no such experiment file'):
    sweeps.load_sweep(str(tmp_path / 'missing.py'))
  bad = _experiment(tmp_path, "return [{'model.embed_dims': 64}]")
  with pytest.raises(sweeps.SweepError, match='config.model.embed_dims does not exist'):
    sweeps.load_sweep(bad + ':size=tiny')


def test_summary_tables(tmp_path):
  points = [{'opt.learning_rate': 0.001, 'model.embed_dim': 64},
            {'opt.learning_rate': 0.003, 'model.embed_dim': 64},
            {'opt.learning_rate': 0.01, 'model.embed_dim': 64}]
  names = sweeps.point_names(points)
  (tmp_path / names[0]).mkdir()
  (tmp_path / names[0] / 'final_metrics.json').write_text(
      '{"step": 6, "train/loss": 6.5, "eval/loss": 6.75, "eval/perplexity": 854.06, '
      '"train/tokens_per_sec": 16227.9, "train/mfu": 0.2}')
  table = sweeps.write_summary(str(tmp_path), points, names, ['ok', 'failed', 'unfinished'],
                               [0, 1, None])
  assert table == (tmp_path / 'summary.md').read_text()
  lines = table.splitlines()
  assert lines[0] == ('| learning_rate | embed_dim | status | step | train/loss | eval/loss '
                      '| eval/perplexity | train/tokens_per_sec |')
  assert lines[2] == '| 0.001 | 64 | ok | 6 | 6.5 | 6.75 | 854.1 | 16228 |'
  assert lines[3] == '| 0.003 | 64 | failed (exit 1) |  |  |  |  |  |'
  assert lines[4].startswith('| 0.01 | 64 | unfinished |')
  with open(tmp_path / 'summary.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['point'] for r in rows] == names
  assert rows[0]['opt.learning_rate'] == '0.001' and rows[0]['train/mfu'] == '0.2'
  assert [(r['status'], r['exit_code']) for r in rows] == [
      ('ok', '0'), ('failed', '1'), ('unfinished', '')]


@pytest.mark.parametrize('content', [b'', b'{"step": 6, "train/lo', b'\xff\xfe{}', b'[6]',
                                     b'{"step": "six"}', None],
                         ids=['empty', 'truncated', 'not_utf8', 'not_a_dict', 'bad_step',
                              'folder'])
def test_an_empty_or_unreadable_final_metrics_is_an_unfinished_run(tmp_path, caplog, content):
  """Not a crash: {} (the point runs again), a warning naming the file, and summaries
  written atomically (no temporary file left beside them)."""
  points = [{'opt.learning_rate': 0.001}, {'opt.learning_rate': 0.003}]
  names = sweeps.point_names(points)
  for name in names:
    (tmp_path / name).mkdir()
  (tmp_path / names[0] / 'final_metrics.json').write_text('{"step": 6, "eval/loss": 6.5}')
  bad = tmp_path / names[1] / 'final_metrics.json'
  if content is None:
    bad.mkdir()
  else:
    bad.write_bytes(content)
  with caplog.at_level(logging.WARNING):
    assert sweeps.read_final_metrics(str(tmp_path / names[1])) == {}
    table = sweeps.write_summary(str(tmp_path), points, names, ['ok', 'unfinished'],
                                 [0, 0])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings and all(str(bad) in w and 'treating the run as not finished' in w
                          for w in warnings)
  assert table.splitlines()[2:] == ['| 0.001 | ok | 6 | 6.5 |', '| 0.003 | unfinished |  |  |']
  assert sorted(os.listdir(tmp_path)) == sorted([*names, 'summary.csv', 'summary.md'])


def test_dry_run_reruns_a_point_whose_final_metrics_is_empty(tmp_path):
  workdir = tmp_path / 'sweep'
  for name, text in [('learning_rate=0.001,embed_dim=128', ''),
                     ('learning_rate=0.003,embed_dim=128', '{"step": 6}')]:
    (workdir / name).mkdir(parents=True)
    (workdir / name / 'final_metrics.json').write_text(text)
  result = _launch('--config=experiments/default.py:size=tiny', f'--workdir={workdir}',
                   '--dry_run', '--points=1,3', '--config.num_train_steps=6',
                   '--config.optimizer.warmup_steps=1')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == '[1] learning_rate=0.001,embed_dim=128'  # To run (again).
  assert lines[2] == '[3] learning_rate=0.003,embed_dim=128 (finished)'
  assert 'final_metrics.json is unreadable' in result.stderr


def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
  workdir = tmp_path / 'sweep'
  result = _launch('--config=experiments/default.py:size=tiny', f'--workdir={workdir}',
                   '--dry_run', '--points=1,3', '--config.num_train_steps=6',
                   '--config.optimizer.warmup_steps=1', '--', '--config.seed=2')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == '[1] learning_rate=0.001,embed_dim=128'
  assert lines[1].split()[1:] == [
      'main.py', f'--config={ROOT}/experiments/default.py:size=tiny',
      f'--workdir={workdir}/learning_rate=0.001,embed_dim=128',
      '--config.optimizer.learning_rate=0.001', '--config.model.embed_dim=128',
      '--config.num_train_steps=6', '--config.optimizer.warmup_steps=1', '--config.seed=2']
  assert lines[2].startswith('[3] learning_rate=0.003,embed_dim=128')
  assert not workdir.exists()


@pytest.mark.parametrize('args,message', [
    (('--config=experiments/default.py:size=tiny', '--points=4'), 'out of range'),
    (('--config=experiments/default.py:size=tiny', '--config.model.embed_dim=32'),
     'config.model.embed_dim is swept'),
    (('--config=experiments/default.py:size=tiny', '--', '--workdir=x'), 'sets --workdir'),
    (('--config=main.py:x', 'stray'), 'Unexpected arguments'),
    (('--config=experiments/default.py:size=tiny', '--', '--config.num_trian_steps=5'),
     'config.num_trian_steps: no such field; did you mean num_train_steps?'),
    (('--config=experiments/default.py:size=tiny', '--config.model.num_layers=2.5'),
     'flag --config.model.num_layers=2.5: invalid literal for int()'),
])
def test_cli_errors_before_any_run(tmp_path, args, message):
  result = _launch(f'--workdir={tmp_path}/sweep', *args)
  assert result.returncode != 0 and message in result.stderr, result.stderr
  assert not (tmp_path / 'sweep').exists()


def test_cli_rejects_an_unknown_field_before_any_run(tmp_path):
  bad = _experiment(tmp_path, "return [{'optimizer.lr': 1e-3}]")
  result = _launch(f'--config={bad}:size=tiny', f'--workdir={tmp_path}/sweep')
  assert result.returncode == 1
  assert result.stderr.strip() == (
      "Invalid sweep: sweep field 'optimizer.lr': config.optimizer.lr does not exist in "
      "the experiment config")
  assert not (tmp_path / 'sweep').exists()


def test_every_point_is_validated_before_any_run(tmp_path):
  # Point 0 is fine; point 1 fails main.py's validation: no run may start.
  bad = _experiment(tmp_path, "return [{'optimizer.warmup_steps': 2}, "
                              "{'optimizer.warmup_steps': 6}]")
  result = _launch(f'--config={bad}:size=tiny', f'--workdir={tmp_path}/sweep',
                   '--config.num_train_steps=6')
  assert result.returncode == 1
  assert result.stderr.strip() == (
      'Invalid sweep: point warmup_steps=6: config.optimizer.warmup_steps: 6 must be in '
      '[0, num_train_steps)')
  assert not (tmp_path / 'sweep').exists()


def _hparams(run_dir):
  """The hyperparameters of a run's TensorBoard HParams session."""
  for path in glob.glob(os.path.join(run_dir, 'events.out.tfevents.*')):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        if value.tag == metadata.SESSION_START_INFO_TAG:
          info = metadata.parse_session_start_info_plugin_data(
              value.metadata.plugin_data.content)
          return {k: v.number_value for k, v in info.hparams.items()}
  return None


@pytest.mark.slow
def test_parallel_sweep_end_to_end(tmp_path):
  # Two points that train, and one that fails when it runs: its mesh needs two devices
  # and each run has one (device counts are the one check the sweep leaves to the runs).
  experiment = _experiment(
      tmp_path, "return sweeps.product({'model.embed_dim': [64, 96]}) + "
      "[{'model.embed_dim': 64, 'mesh.data': 2}]")
  workdir = tmp_path / 'sweep'
  args = (f'--config={experiment}:size=tiny', f'--workdir={workdir}', '--parallel=2', *TINY)
  result = _launch(*args, timeout=300)
  assert result.returncode == 1, result.stdout + result.stderr
  assert '1 of 3 points failed' in result.stderr
  assert 'larger than the 1 available' in result.stdout  # The failed run's log tail.

  ok_names = ['embed_dim=64', 'embed_dim=96']
  for name, width in zip(ok_names, [64, 96]):
    run_dir = workdir / name
    assert (run_dir / 'final_metrics.json').exists()
    assert 'Saving checkpoint for step 6' in (run_dir / 'log.txt').read_text()
    hparams = _hparams(str(run_dir))
    assert hparams['model.embed_dim'] == width and hparams['num_train_steps'] == 6
  with open(workdir / 'summary.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['point'] for r in rows] == [
      *ok_names, 'embed_dim=64,data=2']
  assert [r['model.embed_dim'] for r in rows] == ['64', '96', '64']
  assert [r['status'] for r in rows] == ['ok', 'ok', 'failed']
  for row in rows[:2]:
    assert row['step'] == '6' and math.isfinite(float(row['eval/loss']))
  table = (workdir / 'summary.md').read_text()
  assert table in result.stdout
  assert '| 96 |  | ok | 6 |' in table and '| 64 | 2 | failed (exit 1) |' in table

  # A rerun skips the finished points and retries only the failed one.
  again = _launch(*args, timeout=300)
  assert '2 already finished' in again.stdout
  assert 'start   embed_dim=64,data=2' in again.stdout
  assert 'start   embed_dim=64\n' not in again.stdout
  assert (workdir / 'summary.md').read_text() == table
