"""KV cache for incremental decoding: ring buffers for windowed heads, kept global tokens.

Each attention layer keeps, per KV-head group (`attention_pattern.HeadGroup`), a
buffer of `slots` keys and values per row with the absolute position of each slot
(-1 = empty):

- a full-attention group keeps every position: slots = the cache length, slot = position;
- a windowed group keeps its G global tokens in slots [0, G) for good and the most
  recent `window` positions in a ring, slot = G + (position - G) mod window, so its
  buffer never grows past G + window whatever the length decoded.

A call appends L >= 1 tokens (a prompt, then one token at a time): the new queries
attend to the cached keys plus the new keys, masked by absolute positions exactly as
`masks.make_attention_mask` masks the one-shot forward pass (causal, window, global),
and then the new keys are written. One document per row, no packing. Rows advance
together (one token each per step) but may sit at different positions: prompts of
different lengths are left-padded, and padding tokens get negative positions, which
nothing attends to and which are never cached.
"""

import jax
import jax.numpy as jnp


def num_slots(cache_length: int, window: int | None, num_global: int) -> int:
  """Buffer size of one KV-head group for a cache of `cache_length` positions."""
  if window is None:
    return cache_length
  return min(cache_length, num_global + window)


def slot_of(positions: jax.Array, window: int | None, num_global: int) -> jax.Array:
  """The buffer slot holding each absolute position."""
  if window is None:
    return positions
  ring = num_global + (positions - num_global) % window
  return jnp.where(positions < num_global, positions, ring)


def keys_and_mask(key, value, positions, cached_key, cached_value, cached_positions,
                  *, window: int | None, num_global: int):
  """The keys and values new tokens attend to (the cache, then themselves), and the mask.

  key, value: [batch, L, kv_heads, head_dim] of the new tokens; positions: [batch, L]
  their absolute positions (negative = padding); cached_*: [batch, slots, kv_heads,
  head_dim] and [batch, slots] (-1 = empty). Returns (keys, values [batch, slots + L,
  kv_heads, head_dim], mask [batch, L, slots + L] bool) for
  `attention.dot_product_attention`.
  """
  keys = jnp.concatenate([cached_key, key.astype(cached_key.dtype)], axis=1)
  values = jnp.concatenate([cached_value, value.astype(cached_value.dtype)], axis=1)
  key_pos = jnp.concatenate([cached_positions, positions], axis=1)  # [batch, slots + L]
  q = positions[:, :, None]
  k = key_pos[:, None, :]
  mask = (k >= 0) & (k <= q)
  if window is not None:
    mask &= (q - k < window) | (k < num_global)
  return keys, values, mask


def write_slots(positions: jax.Array, slots: int, *, window: int | None,
                num_global: int) -> jax.Array:
  """The slot each new position is written to; `slots` (out of range) = not written.

  positions: [batch, L]. Per row only the positions the buffer keeps are written (the
  globals and the last `window`; never padding), so no two writes share a slot: a
  scatter with repeated indices may apply them in any order on an accelerator.
  """
  last = positions[:, -1:]
  keep = positions < num_global
  if window is None:
    keep = positions < slots
  else:
    keep |= positions > last - window
  keep &= positions >= 0
  return jnp.where(keep, slot_of(positions, window, num_global), slots)


def write(cached_key, cached_value, cached_positions, key, value, positions, *,
          window: int | None, num_global: int):
  """Stores the new keys and values (`write_slots`); returns the updated (key, value,
  positions)."""
  slots = cached_positions.shape[1]
  target = write_slots(positions, slots, window=window, num_global=num_global)
  rows = jnp.arange(positions.shape[0])[:, None]
  cached_key = cached_key.at[rows, target].set(key.astype(cached_key.dtype), mode='drop')
  cached_value = cached_value.at[rows, target].set(value.astype(cached_value.dtype),
                                                   mode='drop')
  cached_positions = cached_positions.at[rows, target].set(positions, mode='drop')
  return cached_key, cached_value, cached_positions


def init_cache(model, batch: int, cache_length: int) -> dict:
  """An empty cache for `model` (a `Decoder`) decoding up to `cache_length` tokens.

  Built from shapes only (`jax.eval_shape` of the model's init), without running the
  model: keys and values 0, positions -1 (empty), the position counter 0.
  """
  tokens = jax.ShapeDtypeStruct((batch, cache_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda t: model.init(jax.random.key(0), t, cache_length=cache_length), tokens)

  def empty(path, leaf):
    fill = -1 if path[-1].key.startswith('positions') else 0
    return jnp.full(leaf.shape, fill, leaf.dtype)
  return jax.tree_util.tree_map_with_path(empty, shapes['cache'])
