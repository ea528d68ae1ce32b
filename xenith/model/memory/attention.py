"""Attention of a chunk's tokens to the bank, the short-term memory and themselves.

Each chunk attends

- to itself, causally (with the layer's sliding windows, measured in stream positions),
- to the layer's past keys/values: the stream's last `short_term_tokens` tokens before
  the chunk (any number, spanning several chunks; and, when decoding token by token, the
  current chunk's earlier tokens), masked by stream position, window and document like
  the KV cache,
- in windowed layers with global tokens, to the stream's first G tokens whatever the
  window (from the local keys where they hold them, else from the state's global_*
  fields, so each key is seen once),
- in the layers listed in `memory.layers`, to the summaries in the bank (long-term
  memory), in the same softmax as the local keys, masked by the bank's `valid`.

`MemoryAttention` is `attention.Attention` with these keys: the same params (query, key,
value, out), so a model trained without memory loads into one with memory.
"""

from typing import NamedTuple

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from xenith.model import attention
from xenith.model import attention_pattern
from xenith.model import layers

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@struct.dataclass
class LayerMemory:
  """What one layer's new tokens (L of them) attend to besides themselves."""

  stream_positions: jax.Array  # [batch, L] int32: the new tokens' stream positions.
  segments: jax.Array          # [batch, L] int32: their documents.
  past_keys: jax.Array         # [batch, P, kv_heads, head_dim]: earlier keys (with RoPE).
  past_values: jax.Array       # [batch, P, kv_heads, head_dim].
  past_positions: jax.Array    # [batch, P] int32: stream positions (-1 = empty).
  past_segments: jax.Array     # [batch, P] int32.
  summaries: jax.Array | None = None  # [batch, M, embed]; None: not a memory layer.
  valid: jax.Array | None = None      # [batch, M] bool.
  # The stored global tokens (keys with RoPE, values [batch, G, kv_heads, head_dim],
  # stream positions (-1 = empty) and documents [batch, G]) of earlier chunks; None:
  # the layer has none (full attention, or G = 0).
  global_keys: jax.Array | None = None
  global_values: jax.Array | None = None
  global_positions: jax.Array | None = None
  global_segments: jax.Array | None = None


class Record(NamedTuple):
  """What a layer leaves for the state: the new tokens' keys (with RoPE) and values
  [batch, L, kv_heads, head_dim], and the attention mass per summary [batch, M] (None
  outside memory layers)."""

  keys: jax.Array
  values: jax.Array
  mass: jax.Array | None


def attention_with_memory(query, key, value, mask, mem_query, mem_key, mem_value,
                          mem_valid):
  """Dense softmax attention over [memory keys, local keys]; also the memory's mass.

  query: [batch, q, heads, d] (with RoPE), key/value: [batch, k, kv_heads, d],
  mask: [batch or 1, kv_heads or 1, q, k] bool. mem_query: [batch, q, heads, d] (the
  same queries without RoPE; memory keys carry no position), mem_key/mem_value:
  [batch, M, kv_heads, d] or None, mem_valid: [batch, M] bool.
  Returns (out [batch, q, heads, d], mass [batch, M] float32 or None): mass is the
  probability each memory slot receives, summed over queries, mean over heads.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_heads = key.shape[2]
  group = num_heads // kv_heads
  q = query.reshape(batch, q_len, kv_heads, group, head_dim)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', q, key, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, :, None], scores * head_dim**-0.5, _MASK_VALUE)
  values = value
  num_mem = 0
  if mem_key is not None:
    num_mem = mem_key.shape[1]
    mq = mem_query.reshape(batch, q_len, kv_heads, group, head_dim)
    mem_scores = jnp.einsum('bqkgd,bskd->bkgqs', mq, mem_key,
                            preferred_element_type=jnp.float32) * head_dim**-0.5
    mem_scores = jnp.where(mem_valid[:, None, None, None, :], mem_scores, _MASK_VALUE)
    scores = jnp.concatenate([mem_scores, scores], axis=-1)
    values = jnp.concatenate([mem_value.astype(value.dtype), value], axis=1)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs.astype(value.dtype), values)
  out = out.reshape(batch, q_len, num_heads, head_dim)
  mass = None
  if num_mem:
    mass = probs[..., :num_mem].sum(axis=3).mean(axis=(1, 2))  # [batch, M]
  return out, mass


def local_mask(q_pos, k_pos, q_seg, k_seg, window, num_global=0):
  """[batch, q, k] bool: key valid (pos >= 0), not later, same document, in the window.

  Positions are stream positions (they order tokens across chunks). Keys at positions
  < num_global (global tokens) are seen whatever the window.
  """
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  mask = (k >= 0) & (k <= q) & (q_seg[:, :, None] == k_seg[:, None, :])
  if window is not None:
    mask &= (q - k < window) | (k < num_global)
  return mask


def global_mask(q_pos, g_pos, q_seg, g_seg, held_from):
  """[batch, q, G] bool: the stored global tokens a query sees.

  Those at stream positions >= held_from [batch, q] (the first short-term position) are
  also local keys (the short-term memory holds the R positions before the chunk), which
  `local_mask` shows whatever the window, so each key is counted once.
  """
  q = q_pos[:, :, None]
  k = g_pos[:, None, :]
  return ((k >= 0) & (k <= q) & (q_seg[:, :, None] == g_seg[:, None, :])
          & (k < held_from[:, :, None]))


class MemoryAttention(attention.Attention):
  """`Attention` over [bank summaries], the layer's past keys and the new tokens (dense).

  Memory keys/values are the bank's summaries through this layer's own key and value
  projections, without RoPE; they are scored against the queries without RoPE (as if
  each summary sat at the query's own position).
  """

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               memory: LayerMemory) -> tuple[jax.Array, Record]:
    """x: [batch, L, embed], positions: [batch, L] RoPE positions -> (out, `Record`)."""
    cfg = self.config
    plain_query, key, value, (key_proj, value_proj) = self.project(x)
    query, key = self.rotate(plain_query, positions), self.rotate(key, positions)
    chunk = cfg.memory.chunk_size  # Not L: decoding feeds 1 token at a time.
    groups = attention_pattern.layer_head_groups(cfg, self.layer, chunk)
    q_per_kv = cfg.num_heads // cfg.num_kv_heads
    num_global = attention_pattern.num_global_tokens(cfg, self.layer)
    has_global = num_global > 0 and memory.global_keys is not None
    # Keys: [stored global tokens (G, windowed layers only), past (P), new (L)].
    past_k = [memory.global_keys, memory.past_keys] if has_global else [memory.past_keys]
    past_v = ([memory.global_values, memory.past_values] if has_global
              else [memory.past_values])
    keys = jnp.concatenate([a.astype(key.dtype) for a in past_k] + [key], axis=1)
    values = jnp.concatenate([a.astype(value.dtype) for a in past_v] + [value], axis=1)
    k_pos = jnp.concatenate([memory.past_positions, memory.stream_positions], axis=1)
    k_seg = jnp.concatenate([memory.past_segments, memory.segments], axis=1)
    q_pos, q_seg = memory.stream_positions, memory.segments
    # The short-term memory holds the R stream positions before the query's chunk
    # (chunks start at multiples of C); stored global tokens before those are not local.
    held_from = q_pos - q_pos % chunk - cfg.memory.short_term_tokens
    mem_key = mem_value = None
    if memory.summaries is not None:
      summaries = memory.summaries.astype(layers.compute_dtype(cfg))
      mem_key, mem_value = key_proj(summaries), value_proj(summaries)
    masses = []

    def attend_group(n, g, q, k, v):
      del n
      # Always masked: with R > C the short-term keys reach back past 2 chunks.
      mask = local_mask(q_pos, k_pos, q_seg, k_seg, g.window, num_global)
      if has_global:  # Earlier chunks' global tokens that are not local keys.
        far = global_mask(q_pos, memory.global_positions, q_seg, memory.global_segments,
                          held_from)
        if g.window is None:  # (Not in sparse layers.) Local keys show what is there.
          far = jnp.zeros_like(far)
        mask = jnp.concatenate([far, mask], axis=-1)
      mask = mask[:, None]
      hs, ks = slice(g.kv_start * q_per_kv, g.kv_end * q_per_kv), slice(g.kv_start, g.kv_end)
      out, m = attention_with_memory(
          q, k, v, mask, plain_query[:, :, hs],
          None if mem_key is None else mem_key[:, :, ks],
          None if mem_value is None else mem_value[:, :, ks], memory.valid)
      if m is not None:  # Mean over heads: weight each group by its share of heads.
        masses.append(m * ((g.kv_end - g.kv_start) / cfg.num_kv_heads))
      return out

    out = attention.attend_head_groups(attend_group, groups, query, keys, values)
    mass = sum(masses[1:], masses[0]) if masses else None
    return self.project_out(out), Record(key, value, mass)
