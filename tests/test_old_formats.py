"""Runs, checkpoints and memory banks written before issue 11's refactor still load, and
continue exactly as the code that wrote them did.

The fixture (tests/fixtures/old_memory_run, its README.txt says how it was made, at commit
a6bf3b5) is a 2-step run of a tiny memory model, a memory bank saved by --mode=generate,
and what that old code printed and saved next. The import_hf workdir of the same era is
tests/fixtures/old_import_hf (test_hf.py).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from xenith.model import memory
from helpers import single_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / 'tests' / 'fixtures' / 'old_memory_run'


def _main(*args) -> subprocess.CompletedProcess:
  expected = json.loads((FIXTURE / 'expected.json').read_text())
  result = subprocess.run(
      [sys.executable, 'main.py', f'--config={expected["config"]}', *expected['overrides'],
       *args], cwd=ROOT, env={**single_device_env(), 'PYTHONIOENCODING': 'utf-8'},
      capture_output=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr.decode(errors='replace')[-4000:]
  return result


@pytest.fixture
def old_run(tmp_path):
  """A copy of the fixture (never written to in place) and what the old code did next."""
  shutil.copytree(FIXTURE, tmp_path / 'run')
  return tmp_path / 'run', json.loads((FIXTURE / 'expected.json').read_text())


@pytest.mark.slow
def test_an_old_memory_bank_and_checkpoint_generate_what_the_old_code_did(old_run):
  run, expected = old_run
  bank = run / 'bank.npz'
  generate = expected['generate']
  result = _main(f'--workdir={run / "workdir"}', '--mode=generate',
                 f'--prompt={generate["prompt"]}',
                 f'--max_new_tokens={generate["max_new_tokens"]}', f'--memory_bank={bank}')
  assert result.stdout == bytes.fromhex(generate['stdout_bytes_hex'])
  new, old = memory.load_bank(str(bank)), memory.load_bank(str(run / 'bank_after.npz'))
  # The old fields as the old code saved them, plus the fields added since (last_read,
  # global_*: `memory.state.LATER_FIELDS`, filled in when an old file is loaded).
  old_fields = set(np.load(run / 'bank_after.npz').files)
  assert set(np.load(bank).files) == old_fields | set(memory.state.LATER_FIELDS)
  for k, v in old.arrays().items():
    if k in old_fields:
      np.testing.assert_allclose(getattr(new, k), v, atol=1e-5, rtol=1e-5, err_msg=k)
  assert int(new.position) > int(memory.load_bank(str(FIXTURE / 'bank.npz')).position)


@pytest.mark.slow
def test_an_old_run_resumes_where_it_stopped(old_run):
  run, expected = old_run
  workdir = run / 'workdir'
  result = _main(f'--workdir={workdir}', '--config.num_train_steps=3',
                 '--config.eval_every_steps=3', '--config.checkpoint_every_steps=3')
  assert b'Restored checkpoint for step 2' in result.stderr
  metrics = json.loads((workdir / 'final_metrics.json').read_text())
  assert metrics['step'] == 3
  for name, value in expected['resume_to_step_3'].items():
    assert metrics[name] == pytest.approx(value, rel=1e-5), name
  assert os.path.isdir(workdir / 'checkpoints' / '3')
