"""`MemoryState`: what a memory model carries between chunks and calls, and its .npz file.

Every array has a fixed shape (M = bank_size, R = short_term_tokens, C = chunk_size), so
the state is a jit-friendly pytree. The chunk_* fields hold a partly decoded chunk
(`MemoryDecoder` with `decode=True` feeds tokens one at a time, from any stream
position); whole-chunk calls leave them empty. `save_bank` / `load_bank` write and read
the state as a NumPy .npz with one array per field, so a later process continues where a
call stopped, mid-chunk included.
"""

import dataclasses
import os

from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@struct.dataclass
class MemoryState:
  """The memory of `batch` rows (shapes below); a pytree of arrays."""

  summaries: jax.Array       # [batch, M, embed] float32: the bank's summary vectors.
  valid: jax.Array           # [batch, M] bool: the slot holds a summary.
  usage: jax.Array           # [batch, M] float32: decayed attention mass received.
  age: jax.Array             # [batch, M] int32: writes since filled (larger = older).
  position: jax.Array        # [] int32: stream position of the next token.
  # [layers, batch, R, kv_heads, head_dim] float32 (keys already carry RoPE).
  short_keys: jax.Array
  short_values: jax.Array
  short_positions: jax.Array  # [batch, R] int32: stream position (-1 = empty).
  short_segments: jax.Array   # [batch, R] int32: document.
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


def state_shapes(config: ml_collections.FrozenConfigDict, batch: int) -> dict:
  """{field: (shape, dtype)} of the memory state of `batch` rows."""
  mem = config.memory
  m, r = mem.bank_size, mem.short_term_tokens
  kv = (config.num_layers, batch, r, config.num_kv_heads, config.head_dim)
  chunk_kv = (config.num_layers, batch, mem.chunk_size, config.num_kv_heads,
              config.head_dim)
  return {
      'summaries': ((batch, m, config.embed_dim), np.float32),
      'valid': ((batch, m), np.bool_),
      'usage': ((batch, m), np.float32),
      'age': ((batch, m), np.int32),
      'position': ((), np.int32),
      'short_keys': (kv, np.float32),
      'short_values': (kv, np.float32),
      'short_positions': ((batch, r), np.int32),
      'short_segments': ((batch, r), np.int32),
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
  """Writes a memory state (bank + short-term + position) to `path` (.npz)."""
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in state.arrays().items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def load_bank(path: str, like: MemoryState | None = None) -> MemoryState:
  """Reads a state written by `save_bank`; with `like` (e.g. `init_state(...)`) checks it.

  Raises ValueError naming the field when a field is missing, extra, or (with `like`) of
  another shape or dtype.
  """
  with np.load(path) as data:
    arrays = {k: jnp.asarray(data[k]) for k in data.files}
  if set(arrays) != set(FIELDS):
    raise ValueError(f'{path}: memory fields {sorted(arrays)} differ from the expected '
                     f'{sorted(FIELDS)}.')
  if like is not None:
    for k, v in like.arrays().items():
      if tuple(arrays[k].shape) != tuple(v.shape) or arrays[k].dtype != v.dtype:
        raise ValueError(f'{path}: memory field {k!r} is {arrays[k].dtype}'
                         f'{tuple(arrays[k].shape)}, expected {v.dtype}{tuple(v.shape)} '
                         '(another config.model.memory or batch size?).')
  return MemoryState(**arrays)
