r"""Runs every point of an experiment's sweep as its own `main.py` run, then tabulates them.

  python launch/sweep.py --config=experiments/default.py:size=tiny --workdir=runs/sweep \
      --parallel=2 -- --config.num_train_steps=300

The experiment file's `get_sweep(arg)` lists the points (see xenith/sweeps.py). Point
`p` trains in `<workdir>/<name of p>` with its log in `log.txt` there; flags after `--`
(and any `--config.<field>=<value>`) go to every run. Running the same command again
skips finished points and resumes the others from their checkpoints. At the end
`<workdir>/summary.csv` and `summary.md` hold one row per point;
`tensorboard --logdir <workdir>` compares the runs in its HParams view.
"""

import contextlib
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
from ml_collections import config_flags

from xenith import atomic_files
from xenith import config_errors
from xenith import distributed
from xenith import errors
from xenith import storage
from xenith import sweeps
from xenith.config_validation import validate

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


def _processes(extra):
  """(this process's index, whether each run spans processes), from the main.py flags in
  `extra` (--coordinator_address, --num_processes, --process_id), their environment
  variables or the cluster JAX detects: on a pod every host runs this same sweep."""
  given = dict(arg[2:].split('=', 1) for arg in extra if arg.startswith(
      ('--coordinator_address=', '--num_processes=', '--process_id=')))
  try:
    settings = distributed.Settings.from_flags(
        given.get('coordinator_address'),
        *(int(given[k]) if k in given else None for k in ('num_processes', 'process_id')))
    return distributed.process_id(settings), distributed.spans_processes(settings)
  except (ValueError, distributed.FlagError) as e:
    raise sweeps.SweepError(f'multi-process flags: {e}') from None


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


def _run_config(command):
  """The config that main.py will build from `command`, by the same flag parsing."""
  argv = ['main.py'] + [a for a in command[2:] if a.startswith('--config')]
  flag_values = flags.FlagValues()  # Private: the sweep's own --config is a string.
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  try:
    flag_values(argv)
    return flag_values.config
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):  # get_config(arg) raised.
      raise sweeps.SweepError(config_errors.config_file_error(e, command[2][9:])) from None
    raise sweeps.SweepError(str(e).splitlines()[0]) from None
  except (AttributeError, KeyError) as e:  # A --config.<field> names no field.
    raise sweeps.SweepError(config_errors.unknown_field(e, argv)) from None


def _check_point(name, config):
  """main.py's validation of one point's config, so that a bad point stops the sweep
  before any point starts. The device checks (mesh size, batch divisibility) are left to
  each run: counting devices here would claim the accelerators the runs need."""
  try:
    validate(config, num_devices=None)
  except errors.ConfigError as e:
    raise sweeps.SweepError(f'point {name}: {e}') from None


def _marker(run_dir):
  """The run's marker dict; None when it is absent, empty or unreadable."""
  try:
    with open(os.path.join(run_dir, _MARKER), encoding='utf-8') as f:
      marker = json.load(f)
  except (OSError, ValueError):  # ValueError: bad JSON or bytes that are not UTF-8.
    return None
  return marker if isinstance(marker, dict) else None


def _finished(run_dir, num_train_steps):
  """Whether the run reached its last step (a run stopped by SIGTERM exits 0 earlier)."""
  return sweeps.read_final_metrics(run_dir).get('step', -1) >= num_train_steps


def _status(run_dir, num_train_steps, code):
  """'ok', 'failed', 'unfinished' or 'not run', and the exit code (None: from the marker)."""
  if not os.path.isdir(run_dir):
    return 'not run', None
  if code is None:
    code = (_marker(run_dir) or {}).get('exit_code')
  if code:
    return 'failed', code
  return ('ok' if _finished(run_dir, num_train_steps) else 'unfinished'), code


def _log_tail(path, lines=5):
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


class _Runner:
  """Runs commands as subprocesses from the repo root, `parallel` at a time; process
  `process` of a multi-process sweep logs to its own file."""

  def __init__(self, parallel, process=0):
    self.parallel = parallel
    self.log_name = 'log.txt' if process == 0 else f'log.process{process}.txt'
    self.running = {}  # index -> (process, log file, start time)
    self.stopping = False
    self.env = dict(os.environ)
    if parallel > 1:  # JAX would otherwise give each process most of the GPU memory.
      self.env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

  def start(self, i, command, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # An earlier sweep's outcome.
      os.remove(os.path.join(run_dir, _MARKER))
    log = open(os.path.join(run_dir, self.log_name), 'a')
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


def run_sweep(workdir, names, commands, todo, parallel, process=0):
  """Runs `commands[i]` for i in `todo`; returns {i: exit code}, None where we stopped it.
  Process 0 of a multi-process sweep writes the markers."""
  codes = {}
  runner = _Runner(parallel, process)
  previous = signal.signal(signal.SIGTERM, lambda *_: runner.stop())
  todo = list(todo)
  try:
    while (todo and not runner.stopping) or runner.running:
      while todo and len(runner.running) < parallel and not runner.stopping:
        i = todo.pop(0)
        print(f'start   {names[i]}', flush=True)
        runner.start(i, commands[i], os.path.join(workdir, names[i]))
      for i, code, seconds in runner.poll():
        run_dir = os.path.join(workdir, names[i])
        codes[i] = None if runner.stopping else code
        if process == 0:
          atomic_files.write_json(os.path.join(run_dir, _MARKER),
                                  {'command': commands[i], 'exit_code': codes[i]}, indent=2)
        status = ('stopped' if runner.stopping else 'ok' if code == 0 else
                  f'FAILED (exit {code})')
        print(f'{status:<7} {names[i]} ({seconds:.0f} s)', flush=True)
        if code and not runner.stopping:
          print(_log_tail(os.path.join(run_dir, runner.log_name)), end='', flush=True)
      time.sleep(0.2)
  except KeyboardInterrupt:
    print('Interrupted: waiting for running points to checkpoint and exit ...', flush=True)
    runner.stop()
    for i, (process, log, _) in runner.running.items():
      process.wait()
      log.close()
      codes[i] = None
  finally:
    signal.signal(signal.SIGTERM, previous)
  return codes


def main(argv):
  extra = argv[1:]
  path, *arg = _CONFIG.value.split(':', 1)
  spec = ':'.join([os.path.abspath(path), *arg])  # Runs start in the repo root.
  try:
    workdir = storage.check_local(_WORKDIR.value, '--workdir',
                                  "each point's log.txt is written beside its run")
    points = sweeps.load_sweep(spec)
    _check_extra(extra, sweeps.sweep_fields(points))
    process, spans_processes = _processes(extra)
    if spans_processes and _PARALLEL.value > 1:
      raise sweeps.SweepError(
          f'--parallel={_PARALLEL.value}: the runs span processes (hosts), which share '
          'one coordinator; run the points one at a time (--parallel=1)')
    indices = list(range(len(points)))
    if _POINTS.value is not None:
      try:
        indices = list(dict.fromkeys(int(i) for i in _POINTS.value))  # Each once.
      except ValueError:
        raise sweeps.SweepError(f'--points={",".join(_POINTS.value)}: not integers') from None
      bad = [i for i in indices if not 0 <= i < len(points)]
      if bad:
        raise sweeps.SweepError(f'--points: {bad} out of range; the sweep has '
                                f'{len(points)} points (0 to {len(points) - 1})')
    names = sweeps.point_names(points)
    run_dirs = [os.path.join(workdir, name) for name in names]
    commands = [_command(spec, d, p, extra) for d, p in zip(run_dirs, points)]
    # Parsed and validated now, so that a bad flag or point fails before any run starts.
    configs = [_run_config(c) for c in commands]
    for name, config in zip(names, configs):
      _check_point(name, config)
    num_steps = [config.num_train_steps for config in configs]
  except (sweeps.SweepError, storage.StorageError) as e:
    sys.exit(f'Invalid sweep: {e}')
  todo = [i for i in indices if not _finished(run_dirs[i], num_steps[i])]

  if _DRY_RUN.value:
    for i in indices:
      done = '' if i in todo else ' (finished)'
      print(f'[{i}] {names[i]}{done}\n    {shlex.join(commands[i])}')
    return

  print(f'Sweep: {len(indices)} of {len(points)} points, {len(indices) - len(todo)} already '
        f'finished, {_PARALLEL.value} at a time, in {workdir}', flush=True)
  codes = run_sweep(workdir, names, commands, todo, _PARALLEL.value, process)
  if process != 0:  # Process 0 writes the summary.
    failed = [names[i] for i in indices if codes.get(i)]
    sys.exit(f'Process {process}: {", ".join(failed)} failed (see '
             f'log.process{process}.txt in each run folder)' if failed else 0)
  results = [_status(d, n, codes.get(i)) for i, (d, n) in enumerate(zip(run_dirs, num_steps))]
  table = sweeps.write_summary(workdir, points, names, *zip(*results))
  print(f'\n{table}\nSummary: {os.path.join(workdir, "summary.md")} and summary.csv; '
        f'TensorBoard: tensorboard --logdir {workdir}')
  not_ok = [names[i] for i in indices if results[i][0] != 'ok']
  if not_ok:
    sys.exit(f'{len(not_ok)} of {len(indices)} points failed or did not finish: '
             f'{", ".join(not_ok)} (see log.txt in each run folder)')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
