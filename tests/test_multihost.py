"""Multi-host training with real processes on this machine (issue 13).

Two `main.py` processes with 4 simulated CPU devices each join one JAX runtime
(`jax.distributed`, gloo collectives) and train the tiny model on one 8-device mesh
(data=2, fsdp=2, tensor=2) that spans both. The reference is the same config in one
process with 8 devices:

- per-step train loss and the eval loss equal the reference's; only process 0 writes
  TensorBoard and final_metrics.json;
- each process feeds only its rows of each global batch, and together the rows they fed
  are the reference's (row hashes from XENITH_BATCH_LOG);
- a process SIGKILLed inside a checkpoint save takes the other down within a bounded time
  (the coordination service's heartbeat), and restarting both resumes and logs exactly
  the reference's per-step losses;
- SIGTERM to both (a preempted pod): they stop at one agreed step, save it, exit 0;
- a config error that depends on the (global) device count is reported once;
- `--mode=describe` and a sweep point run as two processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import event_files
from helpers import single_device_env
from xenith.train.batch_log import ENV as BATCH_LOG_ENV
from xenith.train.checkpointing import KILL_IN_SAVE_ENV

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
CONFIG = '--config=experiments/default.py:size=tiny'
FLAGS = (f'--config.num_train_steps={STEPS}', '--config.log_every_steps=1',
         '--config.eval_every_steps=6', '--config.num_eval_batches=2',
         '--config.checkpoint_every_steps=3', '--config.optimizer.warmup_steps=2',
         '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')
HEARTBEAT_S = 10


def _env(devices: int, batch_log=None, **extra) -> dict:
  env = single_device_env()
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', XENITH_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S), **extra)
  if batch_log:
    env[BATCH_LOG_ENV] = str(batch_log)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class _Pair:
  """Two processes of one run, started with the same command line."""

  def __init__(self, command, logs_dir, envs):
    port = _free_port()
    os.makedirs(logs_dir, exist_ok=True)
    self.logs = [os.path.join(logs_dir, f'process{i}.log') for i in range(2)]
    self.processes = []
    for i in range(2):
      with open(self.logs[i], 'a') as log:
        self.processes.append(subprocess.Popen(
            [*command, f'--coordinator_address=localhost:{port}', '--num_processes=2',
             f'--process_id={i}'], cwd=ROOT, env=envs[i], stdout=log,
            stderr=subprocess.STDOUT))

  def wait(self, timeout=600) -> list[int]:
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(1, deadline - time.time())) for p in self.processes]
    finally:
      self.kill()

  def kill(self):
    for p in self.processes:
      if p.poll() is None:
        p.kill()
        p.wait()

  def log(self, i) -> str:
    with open(self.logs[i], errors='replace') as f:
      return f.read()


def _train_pair(workdir, logs_dir, *flags, batch_log=None, envs=None):
  command = [sys.executable, 'main.py', CONFIG, f'--workdir={workdir}', *FLAGS, *flags]
  return _Pair(command, logs_dir, envs or [_env(4, batch_log)] * 2)


def _losses(workdir, tag='train/loss'):
  return event_files.last_per_step(event_files.read_scalars(str(workdir))[tag])


def _fed_rows(folder, process):
  """{step: [row hash, ...]} that `process` fed (the last time, after a resume)."""
  rows = {}
  with open(os.path.join(folder, f'process-{process}.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      rows[record['step']] = record['rows']
  return rows


def _assert_close(got, want, rel=1e-5):
  assert sorted(got) == sorted(want)
  for step in want:
    assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The run in one process with 8 devices: (workdir, batch log folder)."""
  root = tmp_path_factory.mktemp('reference')
  result = subprocess.run(
      [sys.executable, 'main.py', CONFIG, f'--workdir={root / "run"}', *FLAGS], cwd=ROOT,
      env=_env(8, root / 'fed'), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return root / 'run', root / 'fed'


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """The same run as two processes of 4 devices: (workdir, batch log folder, pair)."""
  root = tmp_path_factory.mktemp('pair')
  pair = _train_pair(root / 'run', root / 'logs', batch_log=root / 'fed')
  assert pair.wait() == [0, 0], pair.log(0)[-3000:] + pair.log(1)[-3000:]
  return root / 'run', root / 'fed', pair


def test_two_processes_log_the_one_process_losses(reference, two_processes):
  workdir, _, pair = two_processes
  _assert_close(_losses(workdir), _losses(reference[0]))
  assert len(_losses(workdir)) == STEPS
  _assert_close(_losses(workdir, 'eval/loss'), _losses(reference[0], 'eval/loss'))
  # Process 0 alone writes TensorBoard and final_metrics.json; both log with their index.
  assert len([f for f in os.listdir(workdir) if f.startswith('events.out')]) == 1
  with open(workdir / 'final_metrics.json') as f:
    assert json.load(f)['step'] == STEPS
  assert '[process 0/2]' in pair.log(0) and '[process 1/2]' in pair.log(1)
  assert 'Process 1 of 2; 4 of 8 devices are local.' in pair.log(1)


def test_each_process_feeds_only_its_own_rows(reference, two_processes):
  one = _fed_rows(reference[1], 0)
  mine, theirs = (_fed_rows(two_processes[1], i) for i in range(2))
  assert sorted(one) == sorted(mine) == sorted(theirs) == list(range(1, STEPS + 1))
  for step, rows in one.items():
    assert len(mine[step]) == len(theirs[step]) == len(rows) // 2
    assert mine[step] + theirs[step] == rows  # Process 0 the first half, 1 the second.
  fed = [{r for step in mine for r in mine[step]}, {r for step in theirs for r in theirs[step]}]
  assert fed[0] and fed[1] and not fed[0] & fed[1]
  assert fed[0] | fed[1] == {r for rows in one.values() for r in rows}


def test_a_killed_process_stops_the_other_and_both_resume(reference, tmp_path):
  workdir, fed = tmp_path / 'run', tmp_path / 'fed'
  # Process 1 dies (SIGKILL) while writing step 6's checkpoint.
  envs = [_env(4, fed), _env(4, fed, **{KILL_IN_SAVE_ENV: '6'})]
  pair = _train_pair(workdir, tmp_path / 'logs', envs=envs)
  assert pair.processes[1].wait(timeout=600) == -signal.SIGKILL, pair.log(1)[-3000:]
  died = time.time()
  code = pair.processes[0].wait(timeout=6 * HEARTBEAT_S + 30)
  assert code != 0
  assert time.time() - died < 6 * HEARTBEAT_S + 30
  assert 'another task died' in pair.log(0), pair.log(0)[-3000:]

  resumed = _train_pair(workdir, tmp_path / 'logs2', batch_log=fed)
  assert resumed.wait() == [0, 0], resumed.log(0)[-3000:]
  assert 'Restored checkpoint for step 3' in resumed.log(0)
  assert 'Restored checkpoint for step 3' in resumed.log(1)
  _assert_close(_losses(workdir), _losses(reference[0]))
  _assert_close(_losses(workdir, 'eval/loss'), _losses(reference[0], 'eval/loss'))
  one = _fed_rows(reference[1], 0)
  for step in one:  # The resumed processes fed the uninterrupted run's rows.
    assert _fed_rows(fed, 0)[step] + _fed_rows(fed, 1)[step] == one[step]


def test_sigterm_to_both_saves_one_agreed_step_and_exits_0(tmp_path):
  workdir = tmp_path / 'run'
  pair = _train_pair(workdir, tmp_path / 'logs', '--config.num_train_steps=100000')
  deadline = time.time() + 600
  while not (workdir / 'checkpoints' / '3').is_dir():
    assert time.time() < deadline and all(p.poll() is None for p in pair.processes), (
        pair.log(0)[-3000:])
    time.sleep(0.1)
  for p in pair.processes:
    p.send_signal(signal.SIGTERM)
  assert pair.wait(timeout=300) == [0, 0], pair.log(0)[-3000:] + pair.log(1)[-3000:]
  stops = []
  for i in range(2):
    lines = [l for l in pair.log(i).splitlines() if 'Stopping at step' in l]
    assert len(lines) == 1, pair.log(i)[-3000:]
    stops.append(int(lines[0].split('Stopping at step ')[1].split()[0]))
  assert stops[0] == stops[1] >= 3
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert saved[-1] == stops[0]


def test_device_count_error_is_reported_once(tmp_path):
  # 8 devices in all cannot make a mesh with data=3: only the global count shows it.
  pair = _train_pair(tmp_path / 'run', tmp_path / 'logs', '--config.mesh.data=3')
  codes = pair.wait(timeout=300)
  assert codes[0] != 0 and codes[1] != 0
  assert 'Invalid config' in pair.log(0) and '8 devices' in pair.log(0), pair.log(0)[-2000:]
  assert 'Invalid config' not in pair.log(1)


def test_describe_as_two_processes(tmp_path):
  pair = _Pair([sys.executable, 'main.py', CONFIG, '--mode=describe', *FLAGS],
               tmp_path, [_env(4)] * 2)
  assert pair.wait(timeout=300) == [0, 0], pair.log(0)[-3000:]
  table = 'per device on 8 devices (data=2 x fsdp=2 x tensor=2 x expert=1)'
  assert table in pair.log(0) and 'total parameters' not in pair.log(1), pair.log(0)[-2000:]


def test_sweep_point_as_two_processes(tmp_path):
  port = _free_port()
  command = [sys.executable, 'launch/sweep.py', CONFIG, f'--workdir={tmp_path / "sweep"}',
             '--points=0', '--', *FLAGS, f'--coordinator_address=localhost:{port}',
             '--num_processes=2']
  processes = [subprocess.Popen([*command, f'--process_id={i}'], cwd=ROOT, env=_env(4),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  run = tmp_path / 'sweep' / 'learning_rate=0.001,embed_dim=64'
  assert sorted(f for f in os.listdir(run) if f.startswith('log')) == [
      'log.process1.txt', 'log.txt']
  with open(tmp_path / 'sweep' / 'summary.md') as f:
    assert '| 0.001 | 64 | ok | 12 |' in f.read()
