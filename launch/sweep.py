"""Runs every point of an experiment's sweep as its own `main.py` run, then tabulates them.

  python launch/sweep.py --config=experiments/default.py:size=tiny --workdir=runs/sweep \
      --parallel=2 -- --config.num_train_steps=300

The experiment file's `get_sweep(arg)` lists the points (see xenith/sweeps.py). Point
`p` trains in `<workdir>/<name of p>` with its log in `log.txt` there; flags after `--`
(and any `--config.<field>=<value>`) go to every run. Running the same command again
skips finished points and resumes the others from their checkpoints. At the end
`<workdir>/summary.csv` and `summary.md` hold one row per point;
`tensorboard --logdir <workdir>` compares the runs in its HParams view.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # Run as a script: make `xenith` importable.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from xenith import sweeps

_CONFIG = flags.DEFINE_string(
    'config', None, 'Experiment file that defines get_sweep(), optionally with an '
    'argument: experiments/default.py:size=tiny.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; one run folder per point.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Points that run at once, each in its own '
                                 'process.', lower_bound=1)
_POINTS = flags.DEFINE_list('points', None, 'Indices of the points to run, e.g. 0,2 '
                            '(default: all).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the points and commands; run nothing.')
flags.mark_flags_as_required(['config', 'workdir'])

_MARKER = 'sweep_point.json'  # Written into a run folder when its process exits.


def parse_flags(argv):
  """absl flags; `--config.<field>=<value>` and everything after `--` go to main.py."""
  extra = []
  if '--' in argv:
    argv, extra = argv[:argv.index('--')], argv[argv.index('--') + 1:]
  ours = [a for a in argv if not a.startswith('--config.')]
  extra = [a for a in argv if a.startswith('--config.')] + extra
  try:
    rest = flags.FLAGS(ours)
  except flags.Error as e:
    sys.exit(f'Invalid flags: {e}')
  if len(rest) > 1:
    sys.exit(f'Unexpected arguments {rest[1:]}; put flags for main.py after --.')
  return rest + extra


def _check_extra(extra, fields):
  for arg in extra:
    name = arg.split('=', 1)[0].lstrip('-')
    if name in ('config', 'workdir'):
      raise sweeps.SweepError(f'{arg}: the sweep sets --{name} of each run itself')
    if name.startswith('config.') and name[len('config.'):] in fields:
      raise sweeps.SweepError(f'{arg}: config.{name[len("config."):]} is swept; '
                              f'drop it or change get_sweep()')


def _command(spec, run_dir, point, extra):
  return [sys.executable, 'main.py', f'--config={spec}', f'--workdir={run_dir}',
          *(f'--config.{k}={sweeps.format_value(v)}' for k, v in point.items()), *extra]


def _marker(run_dir):
  try:
    with open(os.path.join(run_dir, _MARKER)) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _finished(run_dir, command):
  """Whether this exact command already ran to completion in `run_dir`."""
  marker = _marker(run_dir)
  # Compared without the interpreter path, so a moved virtualenv does not rerun.
  return (marker is not None and marker['exit_code'] == 0 and
          marker['command'][1:] == command[1:] and
          bool(sweeps.read_final_metrics(run_dir)))


def _log_tail(path, lines=5):
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


class _Runner:
  """Runs commands as subprocesses from the repo root, `parallel` at a time."""

  def __init__(self, parallel):
    self.parallel = parallel
    self.running = {}  # index -> (process, log file, start time)
    self.stopping = False
    self.env = dict(os.environ)
    if parallel > 1:  # JAX would otherwise give each process most of the GPU memory.
      self.env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

  def start(self, i, command, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    log = open(os.path.join(run_dir, 'log.txt'), 'a')
    log.write(f'# {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(command)}\n')
    log.flush()
    process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log,
                               stderr=subprocess.STDOUT)
    self.running[i] = (process, log, time.time())

  def poll(self):
    """Yields (index, exit code, seconds) of the processes that have exited."""
    for i, (process, log, start) in list(self.running.items()):
      if process.poll() is not None:
        log.close()
        del self.running[i]
        yield i, process.returncode, time.time() - start

  def stop(self):
    """SIGTERM: each run checkpoints at its next step and exits."""
    self.stopping = True
    for process, _, _ in self.running.values():
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)


def run_sweep(spec, workdir, points, names, indices, extra, parallel):
  """Runs the points at `indices`; returns the exit code of every point (None: not run)."""
  commands = [_command(spec, os.path.join(workdir, n), p, extra)
              for n, p in zip(names, points)]
  codes = [(_marker(os.path.join(workdir, n)) or {}).get('exit_code') for n in names]
  todo = [i for i in indices if not _finished(os.path.join(workdir, names[i]), commands[i])]
  print(f'Sweep: {len(indices)} of {len(points)} points, {len(indices) - len(todo)} already '
        f'finished, {parallel} at a time, in {workdir}', flush=True)
  runner = _Runner(parallel)
  previous = signal.signal(signal.SIGTERM, lambda *_: runner.stop())
  try:
    while (todo and not runner.stopping) or runner.running:
      while todo and len(runner.running) < parallel and not runner.stopping:
        i = todo.pop(0)
        print(f'start   {names[i]}', flush=True)
        runner.start(i, commands[i], os.path.join(workdir, names[i]))
      for i, code, seconds in runner.poll():
        run_dir = os.path.join(workdir, names[i])
        codes[i] = code
        with open(os.path.join(run_dir, _MARKER), 'w') as f:
          json.dump({'overrides': points[i], 'command': commands[i], 'exit_code': code}, f,
                    indent=2)
        status = 'ok' if code == 0 else f'FAILED (exit {code})'
        print(f'{status:<7} {names[i]} ({seconds:.0f} s)', flush=True)
        if code:
          print(_log_tail(os.path.join(run_dir, 'log.txt')), end='', flush=True)
      time.sleep(0.2)
  except KeyboardInterrupt:
    print('Interrupted: waiting for running points to checkpoint and exit ...', flush=True)
    runner.stop()
    for i, (process, log, _) in runner.running.items():
      codes[i] = process.wait()
      log.close()
  finally:
    signal.signal(signal.SIGTERM, previous)
  return codes


def main(argv):
  extra = argv[1:]
  path, *arg = _CONFIG.value.split(':', 1)
  spec = ':'.join([os.path.abspath(path), *arg])  # Runs start in the repo root.
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    points = sweeps.load_sweep(spec)
    _check_extra(extra, sweeps.sweep_fields(points))
    indices = list(range(len(points)))
    if _POINTS.value is not None:
      try:
        indices = [int(i) for i in _POINTS.value]
      except ValueError:
        raise sweeps.SweepError(f'--points={",".join(_POINTS.value)}: not integers') from None
      bad = [i for i in indices if not 0 <= i < len(points)]
      if bad:
        raise sweeps.SweepError(f'--points: {bad} out of range; the sweep has '
                                f'{len(points)} points (0 to {len(points) - 1})')
  except sweeps.SweepError as e:
    sys.exit(f'Invalid sweep: {e}')
  names = sweeps.point_names(points)

  if _DRY_RUN.value:
    for i in indices:
      run_dir = os.path.join(workdir, names[i])
      command = _command(spec, run_dir, points[i], extra)
      done = ' (finished)' if _finished(run_dir, command) else ''
      print(f'[{i}] {names[i]}{done}\n    {shlex.join(command)}')
    return

  os.makedirs(workdir, exist_ok=True)
  codes = run_sweep(spec, workdir, points, names, indices, extra, _PARALLEL.value)
  print('\n' + sweeps.write_summary(workdir, points, names, codes))
  print(f'Summary: {os.path.join(workdir, "summary.md")} and summary.csv; '
        f'TensorBoard: tensorboard --logdir {workdir}')
  failed = [names[i] for i in indices if codes[i] != 0]
  if failed:
    sys.exit(f'{len(failed)} of {len(indices)} points failed or did not finish: '
             f'{", ".join(failed)} (see log.txt in each run folder)')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
