"""How a process decides to join a multi-process run, and bad settings (issue 13).

The real multi-process runs are in test_multihost.py; these are the fast checks of the
decisions taken before anything waits on a coordinator.
"""

import os
import subprocess
import sys

import jax
import pytest

from helpers import single_device_env
from xenith import distributed
from xenith.errors import FlagError
from xenith.train import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLUSTER_ENV = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                'SLURM_LOCALID', 'OMPI_MCA_orte_hnp_uri', 'KUBERNETES_SERVICE_HOST',
                distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                distributed.ENV_PROCESS_ID, distributed.ENV_HEARTBEAT)


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
  for name in _CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)


def test_one_process_is_not_distributed():
  settings = distributed.Settings.from_flags(None, None, None)
  assert settings == distributed.Settings()
  assert not distributed.spans_processes(settings)
  assert not distributed.initialize(settings)  # Nothing to join: returns at once.
  assert not distributed.spans_processes(distributed.Settings(num_processes=1))


def test_flags_win_over_environment(monkeypatch):
  monkeypatch.setenv(distributed.ENV_COORDINATOR, 'envhost:1234')
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '4')
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, '3')
  monkeypatch.setenv(distributed.ENV_HEARTBEAT, '7')
  assert distributed.Settings.from_flags(None, None, None) == distributed.Settings(
      'envhost:1234', 4, 3, 7)
  assert distributed.Settings.from_flags('flaghost:99', 2, 1) == distributed.Settings(
      'flaghost:99', 2, 1, 7)
  assert distributed.spans_processes(distributed.Settings.from_flags(None, None, None))


def test_slurm_job_is_detected(monkeypatch):
  for name, value in (('SLURM_JOB_ID', '77'), ('SLURM_STEP_NODELIST', 'node[003-004]'),
                      ('SLURM_NTASKS', '2'), ('SLURM_PROCID', '1'), ('SLURM_LOCALID', '0')):
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() == distributed.Cluster('slurm', 2, 1)
  settings = distributed.Settings()
  assert distributed.spans_processes(settings) and distributed.process_id(settings) == 1
  monkeypatch.setenv('SLURM_NTASKS', '1')  # One task: a plain run.
  assert distributed.detected_cluster() is None
  assert not distributed.spans_processes(settings)


@pytest.mark.parametrize('settings, message', [
    (distributed.Settings('h:1', 2, 2), r'--process_id=2 is not in \[0, 2\)'),
    (distributed.Settings(None, 2, 0), '--num_processes=2 needs --coordinator_address'),
    (distributed.Settings('h:1', 2, None), 'needs --process_id'),
    (distributed.Settings('nohostport', 2, 0), "must be host:port"),
    (distributed.Settings('h:1', 2, 0, 0), 'must be positive'),
])
def test_bad_settings_fail_before_any_wait(settings, message):
  with pytest.raises(FlagError, match=message):
    distributed.spans_processes(settings)


def test_bad_environment_value(monkeypatch):
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, 'two')
  with pytest.raises(FlagError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.Settings.from_flags(None, None, None)


def test_main_reports_bad_settings_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny',
       f'--workdir={tmp_path}', '--num_processes=2', '--process_id=0'], cwd=ROOT,
      env=single_device_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'Invalid flags: --num_processes=2 needs --coordinator_address (or their '
      'environment variables JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID) outside a cluster '
      'JAX detects.')
  result = subprocess.run(
      [sys.executable, 'main.py', '--mode=export_hf', f'--workdir={tmp_path}',
       f'--hf_dir={tmp_path}/hf', '--num_processes=2', '--process_id=0',
       '--coordinator_address=localhost:1'], cwd=ROOT, env=single_device_env(),
      capture_output=True, text=True, timeout=120)
  assert 'Invalid flags: --mode=export_hf runs in one process' in result.stderr


def test_gather_json_in_one_process():
  assert distributed.gather_json({'a': [1, 2]}) == [{'a': [1, 2]}]


def test_each_process_restores_its_own_data_position(monkeypatch):
  own = checkpointing._own_data_state  # pylint: disable=protected-access
  assert own({'step': 5}, 5) == {'step': 5}  # Saved by one process.
  saved = {'per_process': [{'step': 5}, {'step': 6}]}
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert own(saved, 5) == {'step': 6}
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  with pytest.raises(checkpointing.WorkdirError, match='resume it with 2 processes'):
    own(saved, 5)
  assert own({'per_process': [{'step': 5}] * 2}, 5) == {'step': 5}  # Same everywhere.
