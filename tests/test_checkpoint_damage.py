"""A damaged newest checkpoint: restore logs one warning naming the step, moves the step
aside (never deletes it) and falls back to the next older one. Each part of a step is
damaged in turn, on real Orbax files; bytes changed inside an array are caught by the
saved checksums. Also: the newest clean save survives any number of later saves, and a
save that cannot be written is one line naming the step."""

import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from xenith.errors import CheckpointSaveError, WorkdirError
from xenith.train.checkpointing import Checkpointer
from xenith.train.train_state import TrainState


class _Iterator:
  """Stands in for the data iterator: a position Orbax saves as JSON."""

  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = int(state['position'])


def _state(step: int) -> TrainState:
  params = {'w': jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * (step + 1),
            'b': jnp.full((64,), float(step))}
  return TrainState(step=jnp.int32(step), params=params,
                    opt_state={'mu': jnp.ones((64, 64)) * step})


def _save_steps(workdir, steps=(10, 20), keep=3):
  with Checkpointer(str(workdir), keep) as checkpointer:
    for step in steps:
      checkpointer.save(step, _state(step), _Iterator(step * 100))
  return pathlib.Path(workdir) / 'checkpoints'


def _restore(workdir):
  iterator = _Iterator()
  with Checkpointer(str(workdir), 3) as checkpointer:
    restored = checkpointer.restore_latest(_state(0), iterator)
    remaining = checkpointer.latest_step()
  return restored, iterator, remaining


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip_bytes(step_dir):
  """Bytes changed inside the array data, the file size kept: reads without error."""
  path = _largest_array_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for i in range(middle, middle + 8):
    data[i] ^= 0x40
  path.write_bytes(bytes(data))


DAMAGE = {
    'truncated array file': _truncate,
    'bytes changed inside an array': _flip_bytes,
    'missing _METADATA': lambda d: (d / 'state' / '_METADATA').unlink(),
    'missing state item': lambda d: shutil.rmtree(d / 'state'),
    'missing data item': lambda d: shutil.rmtree(d / 'data'),
    'empty step folder': lambda d: (shutil.rmtree(d), d.mkdir()),
    'garbage iterator JSON': lambda d: (d / 'data' / 'metadata').write_bytes(b'{"posit\x00'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_newest_step_falls_back_to_the_older_one(tmp_path, damage, caplog):
  checkpoints = _save_steps(tmp_path)
  DAMAGE[damage](checkpoints / '20')
  with caplog.at_level(logging.WARNING):
    (state, extra), iterator, latest = _restore(tmp_path)
  assert int(state.step) == 10 and iterator.position == 1000 and latest == 10
  np.testing.assert_array_equal(state.params['w'], _state(10).params['w'])
  assert extra['clean'] is True
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and 'Checkpoint step 20 cannot be read' in r.getMessage()]
  assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
  assert (tmp_path / 'damaged_checkpoints' / '20').exists()  # Moved aside, not deleted.
  assert not (checkpoints / '20').exists()


def test_the_checksum_names_the_changed_array(tmp_path, caplog):
  checkpoints = _save_steps(tmp_path)
  _flip_bytes(checkpoints / '20')
  with caplog.at_level(logging.WARNING):
    _restore(tmp_path)
  assert any('checksum mismatch' in r.getMessage() for r in caplog.records), [
      r.getMessage() for r in caplog.records]


def test_every_step_damaged_is_one_error_and_nothing_is_deleted(tmp_path):
  checkpoints = _save_steps(tmp_path)
  for step in ('10', '20'):
    _truncate(checkpoints / step)
  with pytest.raises(WorkdirError, match=r'No readable checkpoint .* step 20 .* step 10'):
    _restore(tmp_path)
  assert sorted(os.listdir(tmp_path / 'damaged_checkpoints')) == ['10', '20']


def test_an_undamaged_workdir_restores_the_newest(tmp_path):
  _save_steps(tmp_path)
  (state, _), iterator, _ = _restore(tmp_path)
  assert int(state.step) == 20 and iterator.position == 2000
  assert not (tmp_path / 'damaged_checkpoints').exists()


def test_the_newest_clean_save_outlives_later_saves(tmp_path):
  """keep=2: saves 10 (clean), then 20, 30, 40, 50 made while updates were skipped.
  Step 10 stays; after a restore (which finds 10 as the newest clean one) too."""
  with Checkpointer(str(tmp_path), 2) as checkpointer:
    checkpointer.save(10, _state(10), _Iterator())
    for step in (20, 30, 40, 50):
      checkpointer.save(step, _state(step), _Iterator(), clean=False)
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps == [10, 40, 50]
  with Checkpointer(str(tmp_path), 2) as checkpointer:
    (state, extra), = [checkpointer.restore_latest(_state(0), _Iterator())]
    assert int(state.step) == 50 and extra['clean'] is False
    checkpointer.save(60, _state(60), _Iterator(), clean=False)
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps == [10, 50, 60]


def _mount_tmpfs(path: pathlib.Path, size: str) -> bool:
  """A small tmpfs at `path` (a real full disk); False where this user cannot mount."""
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, check=False)
  return result.returncode == 0


_SAVE_BIG_STATE = """
import sys
sys.path.insert(0, {tests!r})
import jax.numpy as jnp
import numpy as np
from test_checkpoint_damage import _Iterator, _state
from xenith.errors import CheckpointSaveError
from xenith.train.checkpointing import Checkpointer
noise = np.random.default_rng(0).random((1024, 1024), np.float32)  # 4 MB, incompressible.
try:
  with Checkpointer({workdir!r}, 3) as checkpointer:
    checkpointer.save(20, _state(20).replace(opt_state={{'mu': jnp.asarray(noise)}}),
                      _Iterator())
except CheckpointSaveError as e:
  print(e)
"""


def _limit_file_size():
  """In the child: files may not grow past 1 MB (writes fail with EFBIG, no signal)."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


@pytest.mark.parametrize('disk', ['tmpfs', 'file size limit'])
def test_a_failed_save_is_one_line_and_keeps_the_older_checkpoints(tmp_path, disk):
  """A 4 MB save fails with one line naming the step, on a 1 MB tmpfs (a full disk,
  where the test can mount one) or under a 1 MB file-size limit (a failing write at
  the same call); the older checkpoint stays whole and restores."""
  workdir = tmp_path / 'disk'
  workdir.mkdir()
  mounted = disk == 'tmpfs' and _mount_tmpfs(workdir, '1m')
  try:
    _save_steps(workdir, steps=(10,))
    script = _SAVE_BIG_STATE.format(tests=str(pathlib.Path(__file__).parent),
                                    workdir=str(workdir))
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=300, check=False,
                            preexec_fn=None if mounted else _limit_file_size)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert message.startswith('checkpoint save of step 20 failed: '), (message,
                                                                        result.stderr[-3000:])
    assert '\n' not in message
    reason = 'no space left on device' if mounted else 'File too large'
    assert reason in message, message
    (state, _), _, _ = _restore(workdir)
    assert int(state.step) == 10
  finally:
    if mounted:
      subprocess.run(['umount', str(workdir)], check=False)
