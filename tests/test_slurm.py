"""launch/slurm.py on a real (one-node, localhost) Slurm cluster: a 2-task job whose tasks
join one 8-device JAX runtime through JAX's SLURM detection, and a 2-task training job
submitted by the launcher that logs the per-step losses of a 1-process run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import event_files
import slurm_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each task simulates 4 CPU devices: 2 tasks form the same 8-device mesh as the reference.
TASK_ENV = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
RUN_FLAGS = ('--config.num_train_steps=6', '--config.optimizer.warmup_steps=2',
             '--config.log_every_steps=1', '--config.eval_every_steps=6',
             '--config.num_eval_batches=1', '--config.checkpoint_every_steps=6',
             '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')
CONFIG = 'experiments/default.py:size=tiny'

# Run by each task: auto-detected jax.distributed, then a psum over all 8 devices.
PSUM_SCRIPT = """
import json
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize()
mesh = jax.make_mesh((jax.device_count(),), ('x',))
x = jax.make_array_from_callback((8,), NamedSharding(mesh, P('x')),
                                 lambda index: np.arange(8.0)[index])
total = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b, 'x'), mesh=mesh,
                              in_specs=P('x'), out_specs=P()))(x)
print(json.dumps({'process': jax.process_index(), 'processes': jax.process_count(),
                  'devices': jax.device_count(), 'local': jax.local_device_count(),
                  'sum': float(np.asarray(total.addressable_data(0))[0])}), flush=True)
"""


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  with slurm_cluster.local_cluster(str(tmp_path_factory.mktemp('slurm')), cpus=2) as env:
    yield env


def _data_env(env):
  env = dict(env)
  if os.environ.get('XENITH_TEST_CACHE'):
    env['XENITH_CACHE'] = os.environ['XENITH_TEST_CACHE']
  return env


def _srun(cluster, *command):
  # srun passes its own environment on to the tasks.
  result = subprocess.run(['srun', '--ntasks=2', *command], env=cluster | TASK_ENV,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


@pytest.mark.slow
def test_two_tasks_form_one_jax_runtime(cluster, tmp_path):
  assert _srun(cluster, 'hostname').split() == [os.uname().nodename.split('.')[0]] * 2
  script = tmp_path / 'psum.py'
  script.write_text(PSUM_SCRIPT)
  lines = [json.loads(line) for line in _srun(cluster, sys.executable, str(script))
           .splitlines() if line.startswith('{')]
  assert sorted(line['process'] for line in lines) == [0, 1]
  for line in lines:
    assert (line['processes'], line['devices'], line['local']) == (2, 8, 4)
    assert line['sum'] == sum(range(8))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The 1-process run over 8 simulated devices."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  env = _data_env(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  result = subprocess.run([sys.executable, 'main.py', f'--config={CONFIG}',
                           f'--workdir={workdir}', *RUN_FLAGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir


def _per_step(workdir, tag):
  return event_files.last_per_step(event_files.read_scalars(workdir)[tag])


@pytest.mark.slow
def test_launcher_job_matches_one_process(cluster, reference, tmp_path):
  workdir, log = tmp_path / 'two_tasks', tmp_path / 'job-%j.out'
  port = slurm_cluster.free_port()
  result = subprocess.run(
      [sys.executable, 'launch/slurm.py', '--wait', '--tasks_per_node=2',
       f'--python={sys.executable}', f'--output={log}', f'--coordinator_port={port}',
       *(f'--env={k}={v}' for k, v in TASK_ENV.items()),
       f'--config={CONFIG}', f'--workdir={workdir}', '--', *RUN_FLAGS],
      cwd=ROOT, env=_data_env(cluster), capture_output=True, text=True, timeout=600,
      check=False)
  job_id = result.stdout.strip()
  logs = list(tmp_path.glob('job-*.out'))
  output = logs[0].read_text(errors='replace') if logs else '(no job log)'
  assert result.returncode == 0, f'{result.stderr[-2000:]}\n{output[-6000:]}'
  assert logs == [tmp_path / f'job-{job_id}.out']
  # Both tasks trained, as processes 0 and 1 of one run (srun's --label, main.py's prefix).
  for task in (0, 1):
    assert f'{task}: ' in output and f'[process {task}/2]' in output, output[-6000:]
  for tag, steps in (('train/loss', [1, 2, 3, 4, 5, 6]), ('eval/loss', [6])):
    want, got = _per_step(reference, tag), _per_step(workdir, tag)
    assert sorted(want) == steps and sorted(got) == steps, tag
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps],
                               rtol=1e-5, err_msg=tag)
  assert json.loads((workdir / 'final_metrics.json').read_text())['step'] == 6
