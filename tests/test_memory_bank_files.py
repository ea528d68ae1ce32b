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


def test_save_and_load_round_trip_last_read(tmp_path):
  """last_read (what eviction='lru' evicts by) is saved and read back."""
  path = str(tmp_path / 'bank.npz')
  last_read = np.arange(_like().last_read.size, dtype=np.int32).reshape(_like().last_read.shape)
  memory.save_bank(path, _like().replace(last_read=last_read))
  np.testing.assert_array_equal(memory.load_bank(path, like=_like()).last_read, last_read)


def test_a_bank_written_before_last_read_existed_still_loads(tmp_path):
  """A file without last_read (written before LRU eviction) loads with last_read 0
  everywhere (every slot counts as just read, so 'lru' first evicts the oldest); its
  other fields are as written."""
  path = tmp_path / 'old.npz'
  age = np.arange(_SUMMARIES[1], dtype=np.int32)[None]
  _with_arrays(path, last_read=None, age=age)
  state = memory.load_bank(str(path), like=_like())
  np.testing.assert_array_equal(state.last_read, np.zeros(_SUMMARIES[:2], np.int32))
  assert state.last_read.dtype == np.int32
  np.testing.assert_array_equal(state.age, age)


def _global_like():
  """A state of the tiny memory model with windows and 3 global tokens (batch 1)."""
  config = _config()
  config.model.attention.window_sizes = (8,)
  config.model.attention.num_global_tokens = 3
  return memory.init_state(config.model, 1)


def test_global_tokens_round_trip_and_older_files(tmp_path):
  """global_* fields are saved and read back. A file written before they existed loads
  into a model with global tokens only at stream position 0 (empty slots, position -1);
  a document already under way is refused (its global tokens were never saved)."""
  like = _global_like()
  assert like.global_keys.shape[2] == 3 and _like().global_keys.shape[2] == 0
  path = str(tmp_path / 'bank.npz')
  keys = np.random.default_rng(0).standard_normal(like.global_keys.shape).astype(np.float32)
  memory.save_bank(path, like.replace(global_keys=keys, global_positions=np.array(
      [[0, 1, 2]], np.int32), position=np.int32(9)))
  state = memory.load_bank(path, like=like)
  np.testing.assert_array_equal(state.global_keys, keys)
  np.testing.assert_array_equal(state.global_positions, [[0, 1, 2]])
  old = tmp_path / 'old.npz'
  _with_arrays(old, global_keys=None, global_values=None, global_positions=None,
               global_segments=None, last_read=None)
  assert memory.load_bank(str(old)).global_keys.shape[2] == 0  # Without like: G = 0.
  state = memory.load_bank(str(old), like=like)
  np.testing.assert_array_equal(state.global_positions, [[-1, -1, -1]])
  assert state.global_keys.shape == like.global_keys.shape
  _with_arrays(old, global_keys=None, global_values=None, global_positions=None,
               global_segments=None, position=np.int32(5))
  with pytest.raises(MemoryBankError, match='written without global tokens .* keeps its '
                                            'first 3 tokens.* 5 tokens in'):
    memory.load_bank(str(old), like=like)


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
