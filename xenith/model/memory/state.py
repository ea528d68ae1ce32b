"""`MemoryState`: what a memory model carries between chunks and calls, and its .npz file.

Every array has a fixed shape (M = bank_size, R = short_term_tokens, C = chunk_size), so
the state is a jit-friendly pytree. The chunk_* fields hold a partly decoded chunk
(`MemoryDecoder` with `decode=True` feeds tokens one at a time, from any stream
position); whole-chunk calls leave them empty. `save_bank` / `load_bank` write and read
the state as a NumPy .npz with one array per field, so a later process continues where a
call stopped, mid-chunk included. The file is written atomically (a kill leaves the old
bank or none, never a partial one), and `load_bank` refuses a damaged or foreign file with
one `MemoryBankError` naming the path and the problem.
"""

import dataclasses
import io
import zipfile

from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xenith import atomic_files
from xenith import storage
from xenith.errors import MemoryBankError
from xenith.model.memory import config as memory_config


@struct.dataclass
class MemoryState:
  """The memory of `batch` rows (shapes below); a pytree of arrays."""

  summaries: jax.Array       # [batch, M, embed] float32: the bank's summary vectors.
  valid: jax.Array           # [batch, M] bool: the slot holds a summary.
  usage: jax.Array           # [batch, M] float32: decayed attention mass received.
  age: jax.Array             # [batch, M] int32: writes since filled (larger = older).
  # [batch, M] int32: chunks since the slot was last read (0: read in the latest chunk or
  # just written; see bank.mark_reads); what eviction='lru' evicts by.
  last_read: jax.Array
  position: jax.Array        # [] int32: stream position of the next token.
  # [layers, batch, R, kv_heads, head_dim] float32 (keys already carry RoPE).
  short_keys: jax.Array
  short_values: jax.Array
  short_positions: jax.Array  # [batch, R] int32: stream position (-1 = empty).
  short_segments: jax.Array   # [batch, R] int32: document.
  # [layers, batch, G, kv_heads, head_dim] float32: the keys (with RoPE) and values of
  # the stream's first G tokens (global tokens of the windowed layers), slot j = stream
  # position j, once its chunk is complete.
  global_keys: jax.Array
  global_values: jax.Array
  global_positions: jax.Array  # [batch, G] int32: stream position (-1 = not yet seen).
  global_segments: jax.Array   # [batch, G] int32: document.
  # [layers, batch, C, kv_heads, head_dim] float32: the current chunk's keys (with
  # RoPE) and values so far, when decoding.
  chunk_keys: jax.Array
  chunk_values: jax.Array
  chunk_hidden: jax.Array     # [batch, C, embed] float32: its final hidden states.
  chunk_mass: jax.Array       # [batch, M] float32: attention mass the bank got in it.

  def arrays(self) -> dict[str, jax.Array]:
    """{field name: array}, in field order."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS = tuple(f.name for f in dataclasses.fields(MemoryState))



def _no_global_tokens(arrays, like, k, fill):
  """An older file's global_* field: no global tokens kept (G = 0, or `like`'s G empty)."""
  if like is not None:
    return np.full(getattr(like, k).shape, fill, np.asarray(getattr(like, k)).dtype)
  shape = np.shape(arrays['short_keys' if k in ('global_keys', 'global_values')
                          else 'short_positions'])
  shape = shape[:-3] + (0,) + shape[-2:] if len(shape) == 5 else shape[:-1] + (0,)
  return np.full(shape, fill, np.float32 if k in ('global_keys', 'global_values')
                 else np.int32)


# Fields added after banks were first written: {field: its value for an older file, from
# that file's arrays and `like`}. last_read 0: every slot counts as just read, so 'lru'
# eviction first falls back to age (the oldest). global_*: no global tokens kept (older
# files come from models without them; one continuing a document past its global tokens
# is refused in `load_bank`).
LATER_FIELDS = {
    'last_read': lambda a, like: np.zeros(np.shape(a['age']), np.int32),
    'global_keys': lambda a, like: _no_global_tokens(a, like, 'global_keys', 0),
    'global_values': lambda a, like: _no_global_tokens(a, like, 'global_values', 0),
    'global_positions': lambda a, like: _no_global_tokens(a, like, 'global_positions', -1),
    'global_segments': lambda a, like: _no_global_tokens(a, like, 'global_segments', 0),
}


def state_shapes(config: ml_collections.FrozenConfigDict, batch: int) -> dict:
  """{field: (shape, dtype)} of the memory state of `batch` rows."""
  mem = config.memory
  m, r, g = mem.bank_size, mem.short_term_tokens, memory_config.num_global_tokens(config)
  kv = (config.num_layers, batch, r, config.num_kv_heads, config.head_dim)
  global_kv = (config.num_layers, batch, g, config.num_kv_heads, config.head_dim)
  chunk_kv = (config.num_layers, batch, mem.chunk_size, config.num_kv_heads,
              config.head_dim)
  return {
      'summaries': ((batch, m, config.embed_dim), np.float32),
      'valid': ((batch, m), np.bool_),
      'usage': ((batch, m), np.float32),
      'age': ((batch, m), np.int32),
      'last_read': ((batch, m), np.int32),
      'position': ((), np.int32),
      'short_keys': (kv, np.float32),
      'short_values': (kv, np.float32),
      'short_positions': ((batch, r), np.int32),
      'short_segments': ((batch, r), np.int32),
      'global_keys': (global_kv, np.float32),
      'global_values': (global_kv, np.float32),
      'global_positions': ((batch, g), np.int32),
      'global_segments': ((batch, g), np.int32),
      'chunk_keys': (chunk_kv, np.float32),
      'chunk_values': (chunk_kv, np.float32),
      'chunk_hidden': ((batch, mem.chunk_size, config.embed_dim), np.float32),
      'chunk_mass': ((batch, m), np.float32),
  }


def init_state(config: ml_collections.ConfigDict, batch: int) -> MemoryState:
  """An empty memory state: no summaries, no short-term tokens, position 0."""
  config = ml_collections.FrozenConfigDict(config)
  arrays = {k: jnp.zeros(s, d) for k, (s, d) in state_shapes(config, batch).items()}
  arrays['short_positions'] = jnp.full_like(arrays['short_positions'], -1)
  arrays['global_positions'] = jnp.full_like(arrays['global_positions'], -1)
  return MemoryState(**arrays)


def check_state(config: ml_collections.FrozenConfigDict, state: MemoryState,
                batch: int) -> None:
  """Raises ValueError if `state` does not match the model's memory shapes."""
  if not isinstance(state, MemoryState):
    raise ValueError(f'memory= takes a MemoryState (init_state, load_bank, or a previous '
                     f'call\'s output), not {type(state).__name__}.')
  for k, (shape, _) in state_shapes(config, batch).items():
    if tuple(getattr(state, k).shape) != tuple(shape):
      raise ValueError(f'Memory state {k!r} has shape {tuple(getattr(state, k).shape)}; '
                       f'this model and batch need {tuple(shape)} (config.model.memory, '
                       f'batch={batch}).')


def save_bank(path: str, state: MemoryState) -> None:
  """Writes a memory state (bank + short-term + position) to `path` (.npz), atomically.

  Written through an open file, so the name is `path` as given (np.savez would append
  .npz to a path without that suffix).
  """
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in state.arrays().items()}
  with atomic_files.replacing(path) as tmp, open(tmp, 'wb') as f:
    np.savez(f, **arrays)


def _read_arrays(path: str) -> dict[str, np.ndarray]:
  """The arrays of the .npz at `path`; MemoryBankError if it is not a readable one."""
  if storage.path(path, '--memory_bank').is_dir():
    raise MemoryBankError(f'{path}: is a folder, not a memory bank file (.npz)')
  try:
    with storage.path(path).open('rb') as f:  # Local or gs://.
      data = f.read()
      head = data[:4]
  except OSError as e:
    raise MemoryBankError(f'{path}: cannot read the memory bank file ({e.strerror})') from None
  if not head:
    raise MemoryBankError(f'{path}: the memory bank file is empty')
  if not head.startswith(b'PK'):  # Every .npz is a zip archive.
    raise MemoryBankError(f'{path}: not a memory bank file (a NumPy .npz archive written by '
                          f'save_bank; this one starts with {head!r})')
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
      return {k: np.asarray(arrays[k]) for k in arrays.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise MemoryBankError(f'{path}: the memory bank file is truncated or damaged '
                          f'({type(e).__name__}: {e})') from None


def load_bank(path: str, like: MemoryState | None = None) -> MemoryState:
  """Reads a state written by `save_bank`; with `like` (e.g. `init_state(...)`) checks it.

  A file written before a field of `LATER_FIELDS` existed gets that field's default.
  Raises MemoryBankError (a ValueError) naming the path and the problem: a missing,
  empty, truncated or non-.npz file, a folder, a field missing or extra, non-finite
  values in a float field, or (with `like`) a field of another shape or dtype.
  """
  arrays = _read_arrays(path)
  if set(FIELDS) - set(LATER_FIELDS) <= set(arrays):  # An older file: fill the newer.
    missing = [k for k in LATER_FIELDS if k not in arrays]
    if ('global_keys' in missing and like is not None and like.global_positions.shape[1]
        and int(arrays['position']) > 0):
      raise MemoryBankError(
          f'{path}: written without global tokens (an older bank file), but this model '
          f'keeps its first {like.global_positions.shape[1]} tokens\' keys and the '
          f'document is {int(arrays["position"])} tokens in; start it again.')
    for k in missing:
      arrays[k] = LATER_FIELDS[k](arrays, like)
  if set(arrays) != set(FIELDS):
    raise MemoryBankError(f'{path}: memory fields {sorted(arrays)} differ from the expected '
                          f'{sorted(FIELDS)}.')
  for k, v in arrays.items():
    if v.dtype.kind not in 'biuf':
      raise MemoryBankError(f'{path}: memory field {k!r} holds {v.dtype} data, not numbers.')
    if v.dtype.kind == 'f' and not np.isfinite(v).all():
      raise MemoryBankError(f'{path}: memory field {k!r} holds {np.isnan(v).sum()} NaN and '
                            f'{np.isinf(v).sum()} infinite values; the bank is damaged.')
  arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
  if like is not None:
    for k, v in like.arrays().items():
      if tuple(arrays[k].shape) != tuple(v.shape) or arrays[k].dtype != v.dtype:
        raise MemoryBankError(f'{path}: memory field {k!r} is {arrays[k].dtype}'
                              f'{tuple(arrays[k].shape)}, expected {v.dtype}'
                              f'{tuple(v.shape)} (another config.model.memory or batch '
                              'size?).')
  return MemoryState(**arrays)
