"""End-to-end training with real processes: resume after SIGKILL and SIGTERM is exact,
non-finite losses never reach a checkpoint, metrics land in TensorBoard."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import event_files
from helpers import single_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 120
TRAIN_TAGS = ('train/loss', 'train/learning_rate', 'train/grad_norm', 'train/param_norm',
              'train/tokens_per_sec', 'train/step_time', 'train/mfu', 'steps_per_sec')
EVAL_TAGS = ('eval/loss', 'eval/perplexity')


def _command(workdir, *overrides):
  return [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny',
          f'--workdir={workdir}', f'--config.num_train_steps={NUM_STEPS}',
          '--config.log_every_steps=1', '--config.eval_every_steps=60',
          '--config.num_eval_batches=2', '--config.checkpoint_every_steps=10',
          '--config.optimizer.warmup_steps=10', '--config.model.dropout_rate=0.1',
          *overrides]


def _run(workdir, *overrides, check=True):
  result = subprocess.run(_command(workdir, *overrides), cwd=ROOT, env=single_device_env(),
                          capture_output=True, text=True, timeout=900)
  if check and result.returncode:
    raise AssertionError(f'run failed:\n{result.stderr[-4000:]}')
  return result


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _start_and_signal(workdir, sig, after_checkpoint=30):
  """Starts a run and sends `sig` once checkpoint `after_checkpoint` is committed."""
  process = subprocess.Popen(_command(workdir), cwd=ROOT, env=single_device_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not any(s >= after_checkpoint for s in _checkpoint_steps(workdir)):
    assert process.poll() is None, process.stderr.read()[-4000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  process.send_signal(sig)
  stderr = process.communicate(timeout=300)[1]
  return process.returncode, stderr


def _losses(workdir):
  return event_files.last_per_step(event_files.read_scalars(workdir)['train/loss'])


_STDERR = {}  # workdir -> the stderr of the fixture's run.


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  _STDERR[workdir] = _run(workdir).stderr
  return workdir


@pytest.mark.slow
def test_terminal_shows_one_short_line_per_log_step(uninterrupted):
  lines = _STDERR[uninterrupted].splitlines()
  clock = re.compile(r'^\d\d:\d\d:\d\d ')
  assert all(clock.match(line) for line in lines), [l for l in lines if not clock.match(l)]
  scalars = event_files.read_scalars(uninterrupted)
  tb = {tag: event_files.last_per_step(scalars[tag])
        for tag in ('train/loss', 'train/learning_rate', 'train/tokens_per_sec',
                    'eval/loss', 'eval/perplexity')}
  step_line = re.compile(r'step +(\d+)/120 \| loss ([\d.]+) \| lr ([\d.e+-]+)'
                         r'(?: \| ([\d.]+)(k?) tok/s \| MFU [\d.]+%)?(?: \| ETA (\S+))?$')
  steps = {}
  for line in lines:
    match = step_line.search(line)
    if match:
      step = int(match.group(1))
      steps[step] = match
  assert sorted(steps) == list(range(1, NUM_STEPS + 1))  # log_every_steps=1.
  for step, match in steps.items():
    assert float(match.group(2)) == pytest.approx(tb['train/loss'][step], abs=6e-5)
    assert float(match.group(3)) == pytest.approx(tb['train/learning_rate'][step], rel=6e-3)
    if step > 1:  # The first step compiles: it has no throughput.
      scale = 1000 if match.group(5) else 1
      assert float(match.group(4)) * scale == pytest.approx(
          tb['train/tokens_per_sec'][step], rel=0.06)
    # An estimate from the second step (the first compiles) until the last.
    assert (match.group(6) is None) == (step in (1, NUM_STEPS))
  evals = [re.search(r'eval +(\d+)/120 \| loss ([\d.]+) \| ppl ([\d.]+)', line)
           for line in lines]
  evals = {int(m.group(1)): m for m in evals if m}
  assert sorted(evals) == [60, 120]
  for step, match in evals.items():
    assert float(match.group(2)) == pytest.approx(tb['eval/loss'][step], abs=6e-5)
    assert float(match.group(3)) == pytest.approx(tb['eval/perplexity'][step], abs=0.06)
  # Little else: no config dump, no copies of the scalars, no library chatter.
  other = [line for line in lines if not re.search(
      r' (step|eval) +\d+/120 | (Saving checkpoint|Checkpoint) for step \d+', line)]
  assert len(other) <= 6, other  # Devices, mesh, config, parameters...
  config_line = next(line for line in lines if ' Config: ' in line)
  path = config_line.split(' Config: ', 1)[1]
  assert path == os.path.join(uninterrupted, 'config.txt')
  with open(path) as f:
    text = f.read()
  assert 'num_train_steps = 120\n' in text and "data.source = 'shakespeare'\n" in text


@pytest.mark.slow
def test_tensorboard_tags_and_final_metrics(uninterrupted):
  scalars = event_files.read_scalars(uninterrupted)
  for tag in TRAIN_TAGS:
    steps = [s for s, _ in scalars[tag]]
    assert steps[-1] == NUM_STEPS, tag
  for tag in EVAL_TAGS:
    assert [s for s, _ in scalars[tag]] == [60, 120], tag
  loss = dict(scalars['eval/loss'])
  np.testing.assert_allclose(dict(scalars['eval/perplexity'])[120], np.exp(loss[120]),
                             rtol=1e-5)
  assert loss[120] < loss[60] < scalars['train/loss'][0][1], 'training must reduce the loss'
  assert 0 < dict(scalars['train/mfu'])[NUM_STEPS] < 1
  with open(os.path.join(uninterrupted, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == NUM_STEPS
  assert final['eval/loss'] == pytest.approx(loss[120])
  # Running a finished workdir again trains nothing and keeps its final metrics.
  _run(uninterrupted)
  with open(os.path.join(uninterrupted, 'final_metrics.json')) as f:
    assert json.load(f) == final
  # Hyperparameters for TensorBoard's HParams view.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in os.listdir(uninterrupted):
    if path.startswith('events.out'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(uninterrupted, path)):
        tags.update(v.metadata.plugin_data.plugin_name for v in event.summary.value)
  assert 'hparams' in tags


@pytest.mark.slow
def test_sigkill_then_resume_logs_identical_losses(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  code, _ = _start_and_signal(workdir, signal.SIGKILL)
  assert code == -signal.SIGKILL
  killed_at = max(_checkpoint_steps(workdir))
  assert killed_at < NUM_STEPS, 'the run finished before it was killed'
  result = _run(workdir)
  assert f'Restored checkpoint for step {killed_at}' in result.stderr
  expected, resumed = _losses(uninterrupted), _losses(workdir)
  assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
  # Exact: same data, same dropout keys, same compiled program.
  assert resumed == expected


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_exact(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  code, stderr = _start_and_signal(workdir, signal.SIGTERM)
  assert code == 0, stderr[-3000:]
  assert 'after SIGTERM' in stderr
  saved = max(_checkpoint_steps(workdir))
  logged = max(_losses(workdir))
  assert saved == logged < NUM_STEPS, 'SIGTERM must checkpoint the step it stopped at'
  _run(workdir)
  assert _losses(workdir) == _losses(uninterrupted)


@pytest.mark.slow
def test_nonfinite_loss_or_other_model_never_touch_checkpoints(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  _run(workdir, '--config.num_train_steps=20', '--config.optimizer.warmup_steps=5')
  assert _checkpoint_steps(workdir) == [10, 20]
  before = {d: os.path.getmtime(os.path.join(workdir, 'checkpoints', str(d)))
            for d in (10, 20)}
  # Resume the same weights with an absurd learning rate: the loss overflows.
  # (This run's steps and schedule differ from the first's: allowed.)
  allow = '--allow_changes=num_train_steps,optimizer'
  result = _run(workdir, '--config.optimizer.learning_rate=1e30', allow, check=False)
  assert result.returncode != 0
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('NonFiniteError: Non-finite loss'), last_line
  assert 'the last checkpoint (step 20) is intact' in last_line
  assert _checkpoint_steps(workdir) == [10, 20]
  assert before == {d: os.path.getmtime(os.path.join(workdir, 'checkpoints', str(d)))
                    for d in (10, 20)}
  # A different model in the same workdir: a clear error, checkpoints untouched; first
  # the workdir's record names the change, then (allowed) the checkpoint the param.
  result = _run(workdir, '--config.model.embed_dim=32', allow, check=False)
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('WorkdirError: This workdir was trained with another setup; '
                              'changed: config.model.embed_dim (64 -> 32)'), last_line
  assert last_line.endswith('--allow_changes=model.embed_dim.'), last_line
  result = _run(workdir, '--config.model.embed_dim=32', allow + ',model', check=False)
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('CheckpointMismatchError: The checkpoint at step 20'), last_line
  assert before == {d: os.path.getmtime(os.path.join(workdir, 'checkpoints', str(d)))
                    for d in (10, 20)}


@pytest.mark.slow
def test_nonfinite_steps_can_be_skipped(tmp_path):
  workdir = str(tmp_path)
  _run(workdir, '--config.num_train_steps=20', '--config.optimizer.warmup_steps=5',
       '--config.optimizer.learning_rate=1e30', '--config.on_nonfinite=skip')
  scalars = event_files.read_scalars(workdir)
  assert sum(v for _, v in scalars['train/nonfinite_steps']) > 0
  assert _checkpoint_steps(workdir) == [10, 20]
  # The skipped updates never reached the weights: the saved params are all finite.
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '20', 'state'))
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state['params'])]
  assert leaves and all(np.isfinite(x).all() for x in leaves)
