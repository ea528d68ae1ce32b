"""Blockwise (flash-style) causal attention in pure JAX, with sliding windows and global keys.

The sequence is cut into blocks of `block_size` tokens. Each query block visits only
the key blocks its mask can reach: the global blocks (keys with index < num_global
that lie before the window) and then the blocks of its window, the last one on the
diagonal. A running max and sum (the online softmax) combine the blocks, so no
[q_len, kv_len] matrix ever exists: memory is O(seq), and time is
O(seq * (window + num_global)) for a window, O(seq^2 / 2) for full causal attention
(blocks above the diagonal are skipped, not masked).

The mask is `masks.make_attention_mask`'s: query i sees key j iff j <= i, both are in
the same segment, and i - j < window or j < num_global. The backward pass is
hand-written: it recomputes each block's probabilities from the saved log-sum-exp
(as FlashAttention does) instead of storing them. Runs on any backend and is the CPU
default; tests/test_attention.py checks it against the dense masked reference.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

# Masked scores and the running max start here: finite, so exp(s - max) never makes NaN.
_NEG = -1e30


def _visit_plan(num_blocks: int, block: int, window: int | None, num_global: int):
  """Static description of which key blocks a query block visits.

  Returns (window_blocks, global_blocks): query block i visits key blocks
  [lo, i] with lo = max(0, i - window_blocks) (window_blocks = num_blocks for full
  attention) and, before them, global blocks [0, min(global_blocks, lo)).
  """
  window_blocks = num_blocks if window is None else -(-(window - 1) // block)
  global_blocks = -(-num_global // block)
  return window_blocks, global_blocks


def _block_index(i, t, window_blocks, global_blocks):
  """(number of key blocks query block i visits, key block of its t-th visit)."""
  lo = jnp.maximum(0, i - window_blocks)
  num_global = jnp.minimum(global_blocks, lo)
  return num_global + i - lo + 1, jnp.where(t < num_global, t, lo + t - num_global)


def _block_mask(i, j, block, group, seg_q, seg_k, seq_len, window, num_global):
  """[batch, 1, group * block, block] bool mask of query block i against key block j.

  seg_q, seg_k: [batch, block] segment ids of the two blocks.
  """
  q = i * block + jnp.arange(block)[:, None]
  k = j * block + jnp.arange(block)[None, :]
  allowed = (k <= q) & (k < seq_len)
  if window is not None:
    allowed &= (q - k < window) | (k < num_global)
  allowed = allowed[None] & (seg_q[:, :, None] == seg_k[:, None, :])  # [b, bq, bk]
  return jnp.tile(allowed, (1, group, 1))[:, None]


def _layout(query, key, value, segment_ids, block):
  """Pads to whole blocks and moves KV heads forward.

  Returns q: [blocks, batch, kv_heads, group * block, head_dim] (query block i's rows
  in (group, position) order), k, v: [batch, kv_heads, padded, head_dim],
  seg: [batch, padded] (padding gets segment -1: no real query sees it).
  """
  batch, seq, heads, dim = query.shape
  kv_heads = key.shape[2]
  group = heads // kv_heads
  padded = -(-seq // block) * block
  pad = [(0, 0), (0, padded - seq), (0, 0), (0, 0)]
  query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
  seg = jnp.pad(segment_ids, [(0, 0), (0, padded - seq)], constant_values=-1)
  q = query.reshape(batch, padded // block, block, kv_heads, group, dim)
  q = q.transpose(1, 0, 3, 4, 2, 5).reshape(padded // block, batch, kv_heads,
                                            group * block, dim)
  k, v = (x.transpose(0, 2, 1, 3) for x in (key, value))
  return q, k, v, seg


def _unlayout(x, batch, seq, heads, block):
  """Inverse of `_layout`'s query layout: -> [batch, seq, heads, head_dim]."""
  num_blocks, _, kv_heads, _, dim = x.shape
  group = heads // kv_heads
  x = x.reshape(num_blocks, batch, kv_heads, group, block, dim)
  x = x.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_blocks * block, heads, dim)
  return x[:, :seq]


def _slice(x, j, block, axis):
  return lax.dynamic_slice_in_dim(x, j * block, block, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(query, key, value, segment_ids, window, num_global, block):
  return _forward(query, key, value, segment_ids, window, num_global, block)[0]


def _forward(query, key, value, segment_ids, window, num_global, block):
  batch, seq, heads, dim = query.shape
  q, k, v, seg = _layout(query * jnp.asarray(dim**-0.5, query.dtype), key, value,
                         segment_ids, block)
  num_blocks, _, kv_heads, rows, _ = q.shape
  group = rows // block
  window_blocks, global_blocks = _visit_plan(num_blocks, block, window, num_global)

  def query_block(_, xs):
    i, qi = xs  # qi: [batch, kv_heads, group * block, dim]
    seg_q = _slice(seg, i, block, 1)
    count, _ = _block_index(i, 0, window_blocks, global_blocks)

    def visit(t, carry):
      acc, row_max, row_sum = carry
      _, j = _block_index(i, t, window_blocks, global_blocks)
      kj, vj = _slice(k, j, block, 2), _slice(v, j, block, 2)
      mask = _block_mask(i, j, block, group, seg_q, _slice(seg, j, block, 1), seq,
                         window, num_global)
      s = jnp.einsum('bkqd,bksd->bkqs', qi, kj, preferred_element_type=jnp.float32)
      s = jnp.where(mask, s, _NEG)
      new_max = jnp.maximum(row_max, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - new_max[..., None]), 0.0)
      correction = jnp.exp(row_max - new_max)
      acc = acc * correction[..., None] + jnp.einsum(
          'bkqs,bksd->bkqd', p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
      return acc, new_max, row_sum * correction + p.sum(-1)

    init = (jnp.zeros(qi.shape, jnp.float32),
            jnp.full(qi.shape[:-1], _NEG, jnp.float32),
            jnp.zeros(qi.shape[:-1], jnp.float32))
    acc, row_max, row_sum = lax.fori_loop(0, count, visit, init)
    # Every real query sees itself, so row_sum > 0 except in padding rows.
    row_sum = jnp.maximum(row_sum, 1e-30)
    return None, ((acc / row_sum[..., None]).astype(value.dtype),
                  row_max + jnp.log(row_sum))

  _, (out, lse) = lax.scan(query_block, None, (jnp.arange(num_blocks), q))
  residuals = (query, key, value, segment_ids, out, lse)
  return _unlayout(out, batch, seq, heads, block), residuals


def _backward(window, num_global, block, residuals, d_out):
  query, key, value, segment_ids, out, lse = residuals
  batch, seq, heads, dim = query.shape
  scale = dim**-0.5
  q, k, v, seg = _layout(query * jnp.asarray(scale, query.dtype), key, value,
                         segment_ids, block)
  do = _layout(d_out, key, value, segment_ids, block)[0]
  num_blocks, _, kv_heads, rows, _ = q.shape
  group = rows // block
  window_blocks, global_blocks = _visit_plan(num_blocks, block, window, num_global)
  # delta_r = sum_d dO_rd * O_rd, the softmax backward's row term.
  delta = jnp.einsum('nbkqd,nbkqd->nbkq', do.astype(jnp.float32), out.astype(jnp.float32))

  def query_block(carry, xs):
    dk, dv = carry  # [batch, kv_heads, padded, dim] float32
    i, qi, doi, lse_i, delta_i = xs
    seg_q = _slice(seg, i, block, 1)
    count, _ = _block_index(i, 0, window_blocks, global_blocks)

    def visit(t, carry):
      dq, dk, dv = carry
      _, j = _block_index(i, t, window_blocks, global_blocks)
      kj, vj = _slice(k, j, block, 2), _slice(v, j, block, 2)
      mask = _block_mask(i, j, block, group, seg_q, _slice(seg, j, block, 1), seq,
                         window, num_global)
      s = jnp.einsum('bkqd,bksd->bkqs', qi, kj, preferred_element_type=jnp.float32)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
      dp = jnp.einsum('bkqd,bksd->bkqs', doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])
      f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
      dq = dq + f32('bkqs,bksd->bkqd', ds.astype(kj.dtype), kj)
      dk_j = _slice(dk, j, block, 2) + f32('bkqs,bkqd->bksd', ds.astype(qi.dtype), qi)
      dv_j = _slice(dv, j, block, 2) + f32('bkqs,bkqd->bksd', p.astype(doi.dtype), doi)
      return (dq, lax.dynamic_update_slice_in_dim(dk, dk_j, j * block, 2),
              lax.dynamic_update_slice_in_dim(dv, dv_j, j * block, 2))

    dq, dk, dv = lax.fori_loop(0, count, visit,
                               (jnp.zeros(qi.shape, jnp.float32), dk, dv))
    return (dk, dv), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = lax.scan(query_block, (zeros, zeros),
                          (jnp.arange(num_blocks), q, do, lse, delta))
  dq = _unlayout(dq * scale, batch, seq, heads, block).astype(query.dtype)
  # dk was accumulated against the scaled queries, so it needs no extra factor.
  dk, dv = (x.transpose(0, 2, 1, 3)[:, :seq].astype(y.dtype)
            for x, y in ((dk, key), (dv, value)))
  return dq, dk, dv, None


_attention.defvjp(_forward, _backward)


def blockwise_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    window: int | None = None,
    num_global: int = 0,
    block_size: int = 256,
) -> jax.Array:
  """Causal grouped-query self-attention, computed block by block.

  Args:
    query: [batch, seq, heads, head_dim].
    key, value: [batch, seq, kv_heads, head_dim]; heads is a multiple of kv_heads.
    segment_ids: [batch, seq] int packed-document ids (0 = padding) or None.
    window: a query sees the `window` most recent keys (itself included); None = all.
    num_global: keys at indices < num_global are seen by every later query in their
      segment, whatever the window.
    block_size: tokens per block (shrunk to the sequence for short inputs).

  Returns:
    [batch, seq, heads, head_dim] in the dtype of `value`; equal (up to float
    rounding) to `attention.dot_product_attention` with the same mask.
  """
  batch, seq, heads, _ = query.shape
  if heads % key.shape[2]:
    raise ValueError(f'heads ({heads}) must be a multiple of kv_heads ({key.shape[2]}).')
  if window is not None and window < 1:
    raise ValueError(f'window must be >= 1 or None, got {window}.')
  if segment_ids is None:
    segment_ids = jnp.ones((batch, seq), jnp.int32)
  block = min(block_size, 8 * math.ceil(seq / 8))
  if window is not None and window >= seq:
    window = None  # The window covers everything: plain causal attention.
  return _attention(query, key, value, segment_ids.astype(jnp.int32), window,
                    int(num_global), int(block))
