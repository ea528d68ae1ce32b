"""The bank's updates: writing summaries (evicting by policy), usage, reads, a closed chunk.

After each chunk the summarizer's S summaries go into the bank (`write`): free slots
first, else, by `memory.eviction`, the least-used summaries ('least_used': attention mass
received, decayed by `usage_decay` per chunk) or the least recently read ones ('lru': a
slot is read in a chunk when its mean attention probability per query and memory layer
exceeds `lru_read_threshold`); ties: the oldest. `close_chunk` is everything that happens
to the state when a chunk is complete, whether it came whole or token by token.
"""

import jax
import jax.numpy as jnp

from xenith.model.memory.state import MemoryState


EVICTIONS = ('least_used', 'lru')


def write(state: MemoryState, new_summaries: jax.Array,
          eviction: str = 'least_used') -> MemoryState:
  """Writes S new summaries [batch, S, embed] (S <= M) into the bank.

  Slots are chosen per row: free slots first (lowest index first), then valid slots by
  ascending usage ('least_used') or descending `last_read` ('lru': the least recently
  read first), ties broken by age (oldest first), then slot index. Every existing slot
  ages by one; new slots get usage 0, age 0 and last_read 0.
  """
  valid, usage, age = state.valid, state.usage, state.age
  num_new = new_summaries.shape[1]
  if num_new > valid.shape[1]:
    raise ValueError(f'{num_new} summaries do not fit a bank of {valid.shape[1]} slots.')
  if eviction not in EVICTIONS:
    raise ValueError(f'eviction={eviction!r} is not one of {EVICTIONS}.')
  if eviction == 'lru':
    primary = jnp.where(valid, -state.last_read.astype(jnp.float32), -jnp.inf)
  else:
    primary = jnp.where(valid, usage, -jnp.inf)
  secondary = jnp.where(valid, -age, 0)
  # lexsort: the last key is the primary one; stable, so equal keys keep slot order.
  order = jnp.lexsort((secondary, primary), axis=-1)
  slots = order[:, :num_new]  # [batch, S], distinct per row.

  def put(row, index, values):
    return row.at[index].set(values)

  return state.replace(
      summaries=jax.vmap(put)(state.summaries, slots,
                              new_summaries.astype(state.summaries.dtype)),
      valid=jax.vmap(put)(valid, slots, jnp.ones(slots.shape, bool)),
      usage=jax.vmap(put)(usage, slots, jnp.zeros(slots.shape, usage.dtype)),
      last_read=jax.vmap(put)(state.last_read, slots,
                              jnp.zeros(slots.shape, state.last_read.dtype)),
      age=jax.vmap(put)(jnp.where(valid, age + 1, 0), slots,
                        jnp.zeros(slots.shape, age.dtype)))


def add_usage(state: MemoryState, mass: jax.Array, decay: float) -> MemoryState:
  """usage = decay * usage + mass on valid slots (mass: [batch, M] attention mass)."""
  return state.replace(usage=jnp.where(state.valid, decay * state.usage + mass, 0.0))


def mark_reads(state: MemoryState, mass: jax.Array, num_queries: int,
               threshold: float) -> MemoryState:
  """last_read = 0 on valid slots read in this chunk, + 1 on the others (free: 0).

  mass: [batch, M] the attention mass the bank received in the chunk, summed over its
  queries and memory layers (mean over heads); `num_queries` = C x the number of memory
  layers, so mass / num_queries is the mean probability per query and memory layer,
  whatever the chunk length. A slot is read when that exceeds `threshold`.
  """
  read = mass / max(num_queries, 1) > threshold
  return state.replace(last_read=jnp.where(
      state.valid, jnp.where(read, 0, state.last_read + 1), 0).astype(state.last_read.dtype))


def keep_global_tokens(state: MemoryState, keys: jax.Array, values: jax.Array,
                       stream_positions: jax.Array, segments: jax.Array) -> dict:
  """The global_* fields after a chunk: slot j < G takes the chunk's token at stream
  position j if the chunk holds it (its first token is at `state.position`).

  keys, values: [layers, batch, C, kv_heads, head_dim]; stream_positions, segments:
  [batch, C]. Returns {field: new array}.
  """
  num_global, chunk = state.global_positions.shape[1], stream_positions.shape[1]
  index = jnp.arange(num_global, dtype=jnp.int32) - state.position  # [G] in the chunk.
  here = (index >= 0) & (index < chunk)
  index = jnp.clip(index, 0, chunk - 1)

  def take(old, new, axis):  # new's token index along `axis` -> the global slots.
    taken = jnp.take(new, index, axis=axis).astype(old.dtype)
    shape = [1] * old.ndim
    shape[axis] = num_global
    return jnp.where(here.reshape(shape), taken, old)

  return dict(global_keys=take(state.global_keys, keys, 2),
              global_values=take(state.global_values, values, 2),
              global_positions=take(state.global_positions, stream_positions, 1),
              global_segments=take(state.global_segments, segments, 1))


def close_chunk(state: MemoryState, mass: jax.Array, summaries: jax.Array, keys: jax.Array,
                values: jax.Array, stream_positions: jax.Array, segments: jax.Array,
                mem) -> MemoryState:
  """The state after a finished chunk of C tokens; chunk_* fields come back empty.

  mass: [batch, M] the attention mass the bank received during the chunk (all its
  queries and memory layers); summaries: [batch, S, embed] the summarizer's output;
  keys, values: [layers, batch, C, kv_heads, head_dim] the chunk's; stream_positions,
  segments: [batch, C]; mem: `config.memory`. Usage decays and adds `mass`, and the
  slots read in the chunk are marked (`mark_reads`), before the write, so the new
  summaries start unused and just read; the chunk's global tokens (stream positions
  < G) join the global_* fields; the short-term memory becomes the last R tokens of
  (the old short-term memory, the chunk): R may exceed C, spanning several chunks.
  """
  keep = state.short_positions.shape[1]
  chunk = stream_positions.shape[1]

  def last(old, new, axis):  # The last R of [old short-term (R), the chunk (C)].
    both = jnp.concatenate([old, new.astype(old.dtype)], axis=axis)
    return jax.lax.slice_in_dim(both, chunk, chunk + keep, axis=axis)

  state = add_usage(state, mass, mem.usage_decay)
  state = mark_reads(state, mass, chunk * len(tuple(mem.layers)),
                     mem.get('lru_read_threshold', 0.01))
  new = write(state, summaries.astype(jnp.float32), mem.get('eviction', 'least_used'))
  return new.replace(
      short_keys=last(state.short_keys, keys, 2),
      short_values=last(state.short_values, values, 2),
      short_positions=last(state.short_positions, stream_positions, 1),
      short_segments=last(state.short_segments, segments, 1),
      **keep_global_tokens(state, keys, values, stream_positions, segments),
      position=state.position + chunk,
      chunk_keys=jnp.zeros_like(state.chunk_keys),
      chunk_values=jnp.zeros_like(state.chunk_values),
      chunk_hidden=jnp.zeros_like(state.chunk_hidden),
      chunk_mass=jnp.zeros_like(state.chunk_mass))


def metrics(state: MemoryState) -> dict[str, jax.Array]:
  """Scalars on how the bank is used, after a batch (train/eval metrics, TensorBoard).

  memory_bank_fill: share of slots holding a summary; memory_bank_usage: mean usage
  (decayed attention mass) of the filled slots; memory_chunks_since_read: mean chunks
  since a filled slot was last read (`lru_read_threshold`), large when the model
  ignores its bank.
  """
  filled = state.valid.astype(jnp.float32)
  count = jnp.maximum(filled.sum(), 1.0)
  return {'memory_bank_fill': filled.mean(),
          'memory_bank_usage': (state.usage * filled).sum() / count,
          'memory_chunks_since_read': (state.last_read * filled).sum() / count}
