"""The bank's updates: writing summaries (evicting the least used), usage, a closed chunk.

After each chunk the summarizer's S summaries go into the bank (`write`): free slots
first, else the least-used summaries (attention mass received, decayed by `usage_decay`
per chunk; ties: the oldest) are evicted. `close_chunk` is everything that happens to the
state when a chunk is complete, whether it came whole or token by token.
"""

import jax
import jax.numpy as jnp

from xenith.model.memory.state import MemoryState


def write(state: MemoryState, new_summaries: jax.Array) -> MemoryState:
  """Writes S new summaries [batch, S, embed] (S <= M) into the bank.

  Slots are chosen per row: free slots first (lowest index first), then valid slots by
  ascending usage, ties broken by age (oldest first). Every existing slot ages by one;
  new slots get usage 0 and age 0.
  """
  valid, usage, age = state.valid, state.usage, state.age
  num_new = new_summaries.shape[1]
  if num_new > valid.shape[1]:
    raise ValueError(f'{num_new} summaries do not fit a bank of {valid.shape[1]} slots.')
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
      age=jax.vmap(put)(jnp.where(valid, age + 1, 0), slots,
                        jnp.zeros(slots.shape, age.dtype)))


def add_usage(state: MemoryState, mass: jax.Array, decay: float) -> MemoryState:
  """usage = decay * usage + mass on valid slots (mass: [batch, M] attention mass)."""
  return state.replace(usage=jnp.where(state.valid, decay * state.usage + mass, 0.0))


def close_chunk(state: MemoryState, mass: jax.Array, summaries: jax.Array, keys: jax.Array,
                values: jax.Array, stream_positions: jax.Array, segments: jax.Array,
                usage_decay: float) -> MemoryState:
  """The state after a finished chunk of C tokens; chunk_* fields come back empty.

  mass: [batch, M] the attention mass the bank received during the chunk (all its
  queries and memory layers); summaries: [batch, S, embed] the summarizer's output;
  keys, values: [layers, batch, C, kv_heads, head_dim] the chunk's; stream_positions,
  segments: [batch, C]. Usage decays and adds `mass` before the write, so the new
  summaries start unused; the short-term memory becomes the last R tokens of (the old
  short-term memory, the chunk): R may exceed C, spanning several earlier chunks.
  """
  keep = state.short_positions.shape[1]
  chunk = stream_positions.shape[1]

  def last(old, new, axis):  # The last R of [old short-term (R), the chunk (C)].
    both = jnp.concatenate([old, new.astype(old.dtype)], axis=axis)
    return jax.lax.slice_in_dim(both, chunk, chunk + keep, axis=axis)

  new = write(add_usage(state, mass, usage_decay), summaries.astype(jnp.float32))
  return new.replace(
      short_keys=last(state.short_keys, keys, 2),
      short_values=last(state.short_values, values, 2),
      short_positions=last(state.short_positions, stream_positions, 1),
      short_segments=last(state.short_segments, segments, 1),
      position=state.position + chunk,
      chunk_keys=jnp.zeros_like(state.chunk_keys),
      chunk_values=jnp.zeros_like(state.chunk_values),
      chunk_hidden=jnp.zeros_like(state.chunk_hidden),
      chunk_mass=jnp.zeros_like(state.chunk_mass))
