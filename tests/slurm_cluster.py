"""A one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd run in
the foreground as this test's children, with their config, key, state and logs in one
temporary folder, and are stopped (jobs cancelled first) when the context ends.

Debian's packages are installed when slurmctld is missing, so the test runs rather than
skips on a fresh CI machine. Needs root (apt-get, and the daemons run as SlurmUser=root).
"""

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge')
_DAEMONS = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'srun', 'sinfo')


def install() -> None:
  """apt-get installs Slurm and munge unless every daemon and client is there."""
  if all(shutil.which(name) or os.path.exists(f'/usr/sbin/{name}') for name in _DAEMONS):
    return
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  command = ['apt-get', 'install', '-y', '-q', '--no-install-recommends', *PACKAGES]
  if subprocess.run(command, env=env, capture_output=True, check=False).returncode:
    # The package lists may be missing or stale on a fresh machine.
    subprocess.run(['apt-get', 'update', '-q'], env=env, capture_output=True, check=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
      raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-3000:]}')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _binary(name: str) -> str:
  return shutil.which(name) or f'/usr/sbin/{name}'


def _slurm_conf(folder: str, node: str, cpus: int) -> str:
  # No cgroups, accounting or MPI: the sandbox need not allow them, and jax.distributed
  # needs only the SLURM_* variables srun sets.
  return f"""\
ClusterName=xenith-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _log_tails(folder: str) -> str:
  tails = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(('.log', '.out')):
      with open(os.path.join(folder, name), errors='replace') as f:
        tails.append(f'--- {name}\n' + ''.join(f.readlines()[-15:]))
  return '\n'.join(tails)


@contextlib.contextmanager
def local_cluster(folder: str, cpus: int = 2) -> Iterator[dict]:
  """Starts the cluster in `folder`; yields the environment for its clients (SLURM_CONF).

  `cpus` is what slurmd announces (at least the tasks a job asks for); it may exceed
  the machine's cores, the tasks then share them.
  """
  install()
  # munged refuses a key or socket folder that others can write to.
  os.chmod(folder, 0o755)
  for sub in ('state', 'spool'):
    os.makedirs(os.path.join(folder, sub))
  key = os.path.join(folder, 'munge.key')
  with open(key, 'wb') as f:
    f.write(os.urandom(1024))
  os.chmod(key, 0o400)
  conf = os.path.join(folder, 'slurm.conf')
  node = socket.gethostname().split('.')[0]
  with open(conf, 'w') as f:
    f.write(_slurm_conf(folder, node, max(cpus, 1)))
  env = dict(os.environ, SLURM_CONF=conf)
  daemons = []

  def start(name, *args):
    with open(os.path.join(folder, f'{name}.out'), 'wb') as out:
      daemons.append(subprocess.Popen([_binary(name), *args], env=env, stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

  try:
    start('munged', '--foreground', '--force', f'--socket={folder}/munge.socket',
          f'--key-file={key}', f'--pid-file={folder}/munged.pid',
          f'--seed-file={folder}/munged.seed', f'--log-file={folder}/munged.log')
    _wait(lambda: os.path.exists(f'{folder}/munge.socket'), 'munged', folder, daemons)
    start('slurmctld', '-D', '-i', '-f', conf)
    start('slurmd', '-D', '-f', conf, '-N', node)
    _wait(lambda: _node_state(env) == 'idle', 'an idle node', folder, daemons)
    yield env
  finally:
    _stop(daemons, env)


def _node_state(env: dict) -> str:
  result = subprocess.run(['sinfo', '--noheader', '--format=%t'], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
  return result.stdout.strip()


def _wait(ready, what: str, folder: str, daemons: list, timeout: float = 60) -> None:
  deadline = time.monotonic() + timeout
  while not ready():
    dead = [d.args[0] for d in daemons if d.poll() is not None]
    if dead or time.monotonic() > deadline:
      raise RuntimeError(f'Slurm test cluster: no {what} ({", ".join(dead) or "timeout"} '
                         f'exited).\n{_log_tails(folder)}')
    time.sleep(0.2)


def _stop(daemons: list, env: dict) -> None:
  """Cancels what still runs, then stops the daemons this context started."""
  if any(d.args[0].endswith('slurmctld') and d.poll() is None for d in daemons):
    subprocess.run(['scancel', f'--user={getpass.getuser()}'], env=env, capture_output=True,
                   timeout=30, check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      result = subprocess.run(['squeue', '--noheader'], env=env, capture_output=True,
                              text=True, timeout=30, check=False)
      if result.returncode or not result.stdout.strip():
        break
      time.sleep(0.5)
  for daemon in reversed(daemons):  # slurmd first, munged last.
    if daemon.poll() is None:
      daemon.terminate()
      try:
        daemon.wait(timeout=15)
      except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(timeout=15)
