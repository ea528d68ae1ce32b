"""The cluster launchers (launch/slurm.py, tpu_vm.py, kubernetes.py): what --dry_run prints,
and what runs when the cluster's own tool (srun, gcloud, kubectl) is a stand-in that
records its input. tests/test_slurm.py runs launch/slurm.py on a real Slurm cluster."""

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from xenith import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ['--config=experiments/default.py:size=tiny', '--workdir=gs://bucket/run']
# Quoting must survive every layer: a shell, ssh's remote shell, YAML.
ODD_FLAG = """--config.data.path=/data/it's "odd": a # b $HOME"""
MAIN = ['main.py', *RUN, '--config.num_train_steps=7', ODD_FLAG]


def _launch(name, *args, env=None, check=True):
  result = subprocess.run([sys.executable, f'launch/{name}.py', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env,
                          check=False)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _stand_in(folder, name, body):
  """An executable `name` in `folder`: a Python script that gets argv and stdin."""
  path = os.path.join(folder, name)
  with open(path, 'w') as f:
    f.write(f'#!{sys.executable}\nimport json, os, subprocess, sys\n{body}')
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


# SLURM


def _sbatch(*args):
  return _launch('slurm', '--dry_run', *RUN, *args, '--config.num_train_steps=7', '--',
                 ODD_FLAG).stdout


def test_slurm_script_srun_runs_the_main_line(tmp_path):
  script = _sbatch('--nodes=2', '--time=1:00:00', '--partition=gpu',
                   '--sbatch_arg=--qos=high', '--env=XLA_FLAGS=--a --b')
  assert script.startswith('#!/bin/bash\n')
  options = [line.split(' ', 1)[1] for line in script.splitlines()
             if line.startswith('#SBATCH ')]
  assert options == ['--job-name=xenith', '--nodes=2', '--ntasks-per-node=1',
                     '--time=1:00:00', '--partition=gpu', f'--chdir={ROOT}',
                     '--output=%x-%j.out', '--qos=high']
  assert script.splitlines()[-1] == '# command: sbatch --parsable  (the text above on its stdin)'
  # Run the script with an srun stand-in: the tasks' command and environment.
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _stand_in(bin_dir, 'srun', 'print(json.dumps({"argv": sys.argv[1:], "env": {k: '
            'os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PROCESS_ID", '
            '"JAX_LOCAL_DEVICE_IDS")}}))\n')
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', JAX_PROCESS_ID='3')
  result = subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True,
                          check=True)
  ran = json.loads(result.stdout)
  assert ran['argv'] == ['--kill-on-bad-exit=1', '--label', '.venv/bin/python', *MAIN]
  # A stray JAX_PROCESS_ID would override what JAX's SLURM detection finds.
  assert ran['env'] == {'XLA_FLAGS': '--a --b', 'JAX_PROCESS_ID': None,
                        'JAX_LOCAL_DEVICE_IDS': None}


def test_slurm_one_process_per_node_sees_all_its_gpus():
  script = _sbatch('--nodes=4', '--gpus_per_node=8', '--cpus_per_task=32')
  assert '#SBATCH --gpus-per-node=8\n' in script
  assert '#SBATCH --ntasks-per-node=1\n' in script
  # JAX would otherwise give the node's only process GPU SLURM_LOCALID = 0.
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n' in script
  assert '\nsrun --kill-on-bad-exit=1 --label --cpus-per-task=32 .venv/bin/python' in script


def test_slurm_one_process_per_gpu():
  script = _sbatch('--nodes=2', '--gpus_per_node=8', '--tasks_per_node=8',
                   '--coordinator_port=7777', '--wait')
  assert '#SBATCH --ntasks-per-node=8\n' in script
  assert 'JAX_LOCAL_DEVICE_IDS' not in script  # Each task: the GPU SLURM_LOCALID.
  assert 'export JAX_COORDINATOR_PORT=7777\n' in script
  assert 'one main.py process per GPU, 16 in all' in script
  assert script.endswith('# command: sbatch --parsable --wait  (the text above on its '
                         'stdin)\n')


@pytest.mark.parametrize('args, message', [
    (['--gpus_per_node=8', '--tasks_per_node=4'], 'use 1 (one process per node) or 8'),
    (['--nodes=0'], '--nodes=0 must be at least 1'),
    (['--env=1X=2'], '--env=1X=2: expected NAME=VALUE'),
    (['--', '--workdir=elsewhere'], 'give --config/--workdir to the launcher'),
])
def test_slurm_bad_flags(args, message):
  result = _launch('slurm', '--dry_run', *RUN, *args, check=False)
  assert result.returncode == 2 and message in result.stderr
  assert not result.stdout


def test_docs_show_what_the_launcher_prints():
  with open(os.path.join(ROOT, 'docs', 'launchers.md'), encoding='utf-8') as f:
    example = '#!/bin/bash' + f.read().split('```bash\n#!/bin/bash', 1)[1].split('```')[0]
  printed = _launch('slurm', '--dry_run', '--nodes=2', '--gpus_per_node=8',
                    '--time=24:00:00', '--partition=gpu', '--python=.venv/bin/python',
                    '--code_dir=/home/me/xenith', '--config=experiments/default.py:size=base',
                    '--workdir=/shared/runs/base', '--', '--config.mesh.data=2',
                    '--config.mesh.fsdp=8').stdout
  assert printed == example


# Cloud TPU VM


def _tpu(*args, env=None):
  return _launch('tpu_vm', '--name=slice', '--zone=us-central2-b', *RUN, *args,
                 '--config.num_train_steps=7', '--', ODD_FLAG, env=env)


def test_tpu_vm_dry_run_commands():
  lines = _tpu('--dry_run', '--steps=create,install,delete', '--spot',
               '--project=p').stdout.splitlines()
  create, install, delete = lines
  assert create == ('gcloud compute tpus tpu-vm create slice --accelerator-type=v4-32 '
                    '--version=tpu-ubuntu2204-base --spot --zone=us-central2-b --project=p')
  assert install.startswith('gcloud compute tpus tpu-vm ssh slice --worker=all '
                            "'--command=if ! command -v python3.11 ")
  assert install.endswith("&& cd xenith && ./launch/setup.sh --tpu' "
                          '--zone=us-central2-b --project=p')
  assert delete == ('gcloud compute tpus tpu-vm delete slice --quiet --zone=us-central2-b '
                    '--project=p')
  clone = _tpu('--dry_run', '--steps=code', '--git_url=https://example.com/x.git',
               '--git_ref=v1').stdout.splitlines()
  assert len(clone) == 1 and '--worker=all' in clone[0]
  assert 'git clone --quiet https://example.com/x.git xenith' in clone[0]
  assert 'checkout --quiet --detach v1' in clone[0]


def test_tpu_vm_bad_step():
  result = _launch('tpu_vm', '--dry_run', '--name=s', '--zone=z', *RUN, '--steps=run,go',
                   check=False)
  assert result.returncode == 2 and '--steps: unknown go' in result.stderr


# A gcloud stand-in for a 2-worker slice: `ssh --worker=all` runs the command with bash
# in each worker's home folder (its `hostname` says worker-<i>), `scp --worker=all`
# copies into each home.
_GCLOUD = """
root = os.environ['FAKE_SLICE']
args = sys.argv[1:]
command = [a.split('=', 1)[1] for a in args if a.startswith('--command=')]
assert args[:3] == ['compute', 'tpus', 'tpu-vm'] and '--worker=all' in args, args
codes = []
for worker in range(2):
  home = os.path.join(root, f'worker-{worker}')
  if args[3] == 'scp':
    subprocess.run(['cp', args[4], os.path.join(home, args[5].split(':', 1)[1])], check=True)
    continue
  env = dict(os.environ, HOME=home, WORKER=str(worker),
             PATH=os.path.join(root, 'bin') + ':' + os.environ['PATH'])
  codes.append(subprocess.run(['bash', '-c', command[0]], cwd=home, env=env).returncode)
sys.exit(max(codes, default=0))
"""

# What `launch/setup.sh --tpu` would have installed: a python that records its
# arguments, prints two lines and fails on worker 1; with UNTIL_SIGTERM set it waits for
# a SIGTERM and exits 0 (main.py after its preemption checkpoint).
_PYTHON = """
import signal, time
with open('ran.json', 'w') as f:
  json.dump({'argv': sys.argv[1:], 'A': os.environ.get('A')}, f)
print('hello from', os.environ['WORKER'], flush=True)
if os.environ.get('UNTIL_SIGTERM'):
  signal.signal(signal.SIGTERM, lambda *_: (print('stopped', flush=True), sys.exit(0)))
  time.sleep(120)
print('bye', flush=True)
sys.exit(3 if os.environ['WORKER'] == '1' else 0)
"""


@pytest.fixture
def fake_slice(tmp_path):
  """(environment for the launcher, the workers' home folders)."""
  (tmp_path / 'bin').mkdir()
  _stand_in(tmp_path / 'bin', 'gcloud', _GCLOUD)
  (tmp_path / 'bin' / 'hostname').write_text('#!/bin/sh\necho worker-$WORKER\n')
  (tmp_path / 'bin' / 'hostname').chmod(0o755)
  homes = [tmp_path / f'worker-{worker}' for worker in range(2)]
  for home in homes:
    venv = home / 'xenith' / '.venv' / 'bin'
    venv.mkdir(parents=True)
    _stand_in(venv, 'python', _PYTHON)
  env = dict(os.environ, FAKE_SLICE=str(tmp_path),
             PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}')
  yield env, homes
  for home in homes:  # A failed test must not leave a stand-in main.py behind.
    pid_file = home / 'xenith' / 'logs' / 'main.pid'
    if not (pid_file.exists() and pid_file.read_text().strip()):
      continue
    pid = int(pid_file.read_text())
    with contextlib.suppress(OSError):  # Gone; or the pid is reused: leave that alone.
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if str(home).encode() in f.read():
          os.kill(pid, signal.SIGKILL)


def _tpu_run(env, *args):
  return subprocess.run(
      [sys.executable, 'launch/tpu_vm.py', '--name=slice', '--zone=z', *RUN, *args,
       '--config.num_train_steps=7', '--', ODD_FLAG], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=120, check=False)


def test_tpu_vm_copies_runs_and_follows_every_worker(fake_slice):
  env, homes = fake_slice
  result = _tpu_run(env, '--steps=code,run,logs', '--env=A=1 2')
  # Worker 1's main.py failed: the logs step, and the launcher, report it.
  assert result.returncode == 3, result.stderr
  for worker, home in enumerate(homes):
    code = home / 'xenith'
    with open(os.path.join(ROOT, 'launch', 'tpu_vm.py')) as f:
      assert (code / 'launch' / 'tpu_vm.py').read_text() == f.read()
    assert not (code / '.git').exists()
    ran = json.loads((code / 'ran.json').read_text())
    assert ran == {'argv': MAIN, 'A': '1 2'}
    assert (code / 'logs' / 'main.exit').read_text().strip() == str(3 * worker)
    assert (f'[worker-{worker}] hello from {worker}\n[worker-{worker}] bye\n'
            in result.stdout), result.stdout


def test_tpu_vm_stops_every_worker(fake_slice):
  env, homes = fake_slice
  assert _tpu_run(env, '--steps=run', '--env=UNTIL_SIGTERM=1').returncode == 0
  logs = [home / 'xenith' / 'logs' / 'main.log' for home in homes]
  deadline = time.monotonic() + 60
  while not all(log.exists() and 'hello' in log.read_text() for log in logs):
    assert time.monotonic() < deadline, 'main.py did not start'
    time.sleep(0.1)
  # A second run while the first lives is refused.
  again = _tpu_run(env, '--steps=run')
  assert again.returncode == 1
  assert 'worker-0: main.py of --log_name=main is still running' in again.stderr
  result = _tpu_run(env, '--steps=stop,logs')
  assert result.returncode == 0, result.stderr
  for worker in range(2):
    assert f'[worker-{worker}] stopped\n' in result.stdout, result.stdout


# Kubernetes


def _manifest(*args):
  text = _launch('kubernetes', '--dry_run', '--name=moe-run', '--image=registry/x:1',
                 '--num_hosts=4', *args, *RUN, '--config.num_train_steps=7', '--',
                 ODD_FLAG).stdout
  assert text.splitlines()[-1] == '# command: kubectl apply -f -  (the text above on its stdin)'
  return text


def test_kubernetes_manifest():
  service, job = yaml.safe_load_all(_manifest(
      '--tpu_accelerator=tpu-v4-podslice', '--tpu_topology=2x2x4', '--chips_per_host=4',
      '--memory=64Gi', '--env=NOTE=a: "b" # c', '--port=8476'))
  assert (service['kind'], service['metadata']['name']) == ('Service', 'moe-run')
  assert service['spec']['clusterIP'] == 'None'  # Headless: one DNS name per pod.
  assert service['spec']['selector'] == {'job-name': 'moe-run'}
  assert job['kind'] == 'Job' and job['metadata']['name'] == 'moe-run'
  spec = job['spec']
  assert (spec['completionMode'], spec['completions'], spec['parallelism']) == (
      'Indexed', 4, 4)
  pod = spec['template']['spec']
  # Pod i of an Indexed Job is named moe-run-<i>; under the Service's subdomain pod 0 is
  # moe-run-0.moe-run.
  assert pod['subdomain'] == service['metadata']['name']
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v4-podslice',
                                 'cloud.google.com/gke-tpu-topology': '2x2x4'}
  (container,) = pod['containers']
  assert container['image'] == 'registry/x:1' and container['workingDir'] == '/xenith'
  assert container['command'] == ['python', *MAIN]
  assert container['resources'] == {'limits': {'google.com/tpu': 4},
                                    'requests': {'memory': '64Gi'}}
  env = {e['name']: e.get('value', e.get('valueFrom')) for e in container['env']}
  # The variables main.py reads (xenith/distributed.py).
  assert env == {
      distributed.ENV_COORDINATOR: 'moe-run-0.moe-run:8476',
      distributed.ENV_NUM_PROCESSES: '4',
      distributed.ENV_PROCESS_ID: {'fieldRef': {'fieldPath': "metadata.annotations['batch."
                                                              "kubernetes.io/job-completion-"
                                                              "index']"}},
      'NOTE': 'a: "b" # c'}


def test_kubernetes_gpu_manifest():
  _, job = yaml.safe_load_all(_manifest('--gpus_per_host=8', '--cpu=16',
                                        '--node_selector=pool=a100', '--python=/v/python'))
  pod = job['spec']['template']['spec']
  assert pod['nodeSelector'] == {'pool': 'a100'}
  (container,) = pod['containers']
  assert container['resources'] == {'limits': {'nvidia.com/gpu': 8},
                                    'requests': {'cpu': '16'}}
  assert container['command'][0] == '/v/python'


def test_kubernetes_applies_the_manifest(tmp_path):
  _stand_in(tmp_path, 'kubectl', 'open(os.environ["SAVE_TO"], "w").write(json.dumps('
            '[sys.argv[1:], sys.stdin.read()]))\n')
  env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}',
             SAVE_TO=str(tmp_path / 'applied.json'))
  _launch('kubernetes', '--name=moe-run', '--image=registry/x:1', '--num_hosts=4', *RUN,
          '--config.num_train_steps=7', '--', ODD_FLAG, env=env)
  argv, manifest = json.loads((tmp_path / 'applied.json').read_text())
  assert argv == ['apply', '-f', '-']
  assert manifest == _manifest().rsplit('# command:', 1)[0]


@pytest.mark.parametrize('args, message', [
    (['--name=Bad_Name'], 'must be a DNS label'),
    (['--env=JAX_PROCESS_ID=1'], 'the manifest sets it'),
    (['--num_hosts=0'], '--num_hosts=0 must be positive'),
])
def test_kubernetes_bad_flags(args, message):
  result = _launch('kubernetes', '--dry_run', '--image=x', *RUN, *args, check=False)
  assert result.returncode == 2 and message in result.stderr


def test_launchers_need_only_the_standard_library():
  """A login node or laptop runs them with any Python 3, without Xenith's venv."""
  for name in ('slurm', 'tpu_vm', 'kubernetes'):
    # -S: no site-packages.
    result = subprocess.run([sys.executable, '-S', f'launch/{name}.py', '--help'], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and 'usage:' in result.stdout, result.stderr
