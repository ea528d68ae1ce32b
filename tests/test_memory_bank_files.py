"""Memory bank files (`memory.save_bank` / `load_bank`, `main.py --memory_bank`): written
atomically; every damaged or foreign file is refused with one MemoryBankError naming it."""

import os

import numpy as np
import pytest

from experiments import memory as memory_experiment
from tests import test_generate
from xenith.errors import MemoryBankError
from xenith.model import memory
from xenith.model.memory import state as state_lib


def _config():
  return memory_experiment.get_config('size=tiny')


def _like():
  return memory.init_state(_config().model, 1)


def _good_bank(path):
  """A bank as `--mode=generate` writes it (batch 1), with a nonzero position."""
  memory.save_bank(str(path), _like().replace(position=np.int32(37)))
  return str(path)


def test_save_bank_writes_the_path_as_given_and_round_trips(tmp_path):
  path = tmp_path / 'sub' / 'bank'  # No .npz suffix: np.savez alone would add one.
  _good_bank(path)
  assert sorted(os.listdir(tmp_path / 'sub')) == ['bank']  # No temporary file left.
  assert int(memory.load_bank(str(path), like=_like()).position) == 37


def test_a_failed_save_leaves_the_old_bank(tmp_path, monkeypatch):
  path = _good_bank(tmp_path / 'bank.npz')

  def fail_halfway(file, **arrays):
    file.write(b'PK\x03\x04 partial')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(state_lib.np, 'savez', fail_halfway)
  with pytest.raises(OSError, match='No space left'):
    memory.save_bank(path, _like())
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ['bank.npz']
  assert int(memory.load_bank(path, like=_like()).position) == 37


def _truncated(path):
  data = open(_good_bank(path), 'rb').read()
  path.write_bytes(data[:len(data) // 2])


def _with_arrays(path, **changes):
  """A bank whose fields are changed (None removes one)."""
  arrays = {k: np.asarray(v) for k, v in _like().arrays().items()}
  arrays.update(changes)
  with open(path, 'wb') as f:
    np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


_SUMMARIES = _like().summaries.shape


@pytest.mark.parametrize('damage,message', [
    (_truncated, r'the memory bank file is truncated or damaged \(BadZipFile'),
    (lambda p: p.write_text('not a bank\n'), r"not a memory bank file \(a NumPy .npz archive "
                                             r"written by save_bank; this one starts with "
                                             r"b'not '\)"),
    (lambda p: p.write_bytes(b''), 'the memory bank file is empty'),
    (lambda p: p.mkdir(), 'is a folder, not a memory bank file'),
    (lambda p: np.save(open(p, 'wb'), np.zeros(3)), 'not a memory bank file'),  # An .npy.
    (lambda p: _with_arrays(p, usage=np.full(_SUMMARIES[:2], np.nan, np.float32)),
     r"memory field 'usage' holds \d+ NaN and 0 infinite values; the bank is damaged"),
    (lambda p: _with_arrays(p, summaries=np.full(_SUMMARIES, np.inf, np.float32)),
     r"memory field 'summaries' holds 0 NaN and \d+ infinite values"),
    (lambda p: _with_arrays(p, age=None), r"memory fields \[.*\] differ from the expected"),
    (lambda p: _with_arrays(p, extra=np.zeros(1)), r"memory fields \[.*'extra'.*\] differ"),
    (lambda p: _with_arrays(p, summaries=np.zeros((2, *_SUMMARIES[1:]), np.float32)),
     r"memory field 'summaries' is float32\(2, .*\), expected float32\(1, .*\) \(another "
     r'config.model.memory or batch size\?\)'),
    (lambda p: _with_arrays(p, valid=np.zeros(_SUMMARIES[:2], np.int32)),
     r"memory field 'valid' is int32\(1, 8\), expected bool\(1, 8\)"),
    (lambda p: _with_arrays(p, position=np.asarray('x')), r"memory field 'position' holds "
                                                          r'<U1 data, not numbers'),
], ids=['truncated', 'text', 'empty', 'folder', 'npy', 'nan', 'inf', 'missing_field',
        'extra_field', 'wrong_shape', 'wrong_dtype', 'strings'])
def test_load_bank_refuses_a_damaged_file_naming_it(tmp_path, damage, message):
  path = tmp_path / 'bank.npz'
  damage(path)
  with pytest.raises(MemoryBankError, match=message) as error:
    memory.load_bank(str(path), like=_like())
  assert str(error.value).startswith(f'{path}: ')
  assert isinstance(error.value, ValueError)  # What callers caught before.


def test_load_bank_of_a_missing_file(tmp_path):
  with pytest.raises(MemoryBankError, match='cannot read the memory bank file '
                                            r'\(No such file or directory\)'):
    memory.load_bank(str(tmp_path / 'none.npz'))


def test_main_generate_with_a_damaged_bank_prints_one_line(tmp_path):
  """A truncated --memory_bank: exit 1 and one line naming the file, no traceback; the
  file is left as it was."""
  test_generate._save_fresh_params(_config(), tmp_path, length=16)
  bank = tmp_path / 'bank.npz'
  _truncated(bank)
  before = bank.read_bytes()
  result = test_generate._main('--config=experiments/memory.py:size=tiny',
                               f'--workdir={tmp_path}', '--mode=generate',
                               f'--memory_bank={bank}', '--max_new_tokens=4',
                               '--prompt=ROMEO:')
  stderr = result.stderr.decode(errors='replace')
  assert result.returncode == 1, stderr[-2000:]
  assert 'Traceback' not in stderr
  assert stderr.strip().splitlines()[-1].startswith(
      f'MemoryBankError: {bank}: the memory bank file is truncated or damaged (BadZipFile: ')
  assert bank.read_bytes() == before
