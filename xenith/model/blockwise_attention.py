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

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

# Masked scores and the running max start here: finite, so exp(s - max) never makes NaN.
_NEG = -1e30


def _pad(x, block, value=0):
  """x: [batch, seq, ...] padded with `value` to whole blocks along seq."""
  pad = -x.shape[1] % block
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _layout_q(x, kv_heads, block):
  """[batch, seq, heads, head_dim] -> [blocks, batch, kv_heads, group * block, head_dim]
  (query block i's rows in (group, position) order)."""
  x = _pad(x, block)
  batch, padded, heads, dim = x.shape
  group = heads // kv_heads
  x = x.reshape(batch, padded // block, block, kv_heads, group, dim)
  return x.transpose(1, 0, 3, 4, 2, 5).reshape(padded // block, batch, kv_heads,
                                               group * block, dim)


def _unlayout(x, seq, group, block):
  """Inverse of `_layout_q`: -> [batch, seq, heads, head_dim]."""
  num_blocks, batch, kv_heads, _, dim = x.shape
  x = x.reshape(num_blocks, batch, kv_heads, group, block, dim)
  x = x.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_blocks * block, kv_heads * group, dim)
  return x[:, :seq]


def _slice(x, j, block, axis):
  return lax.dynamic_slice_in_dim(x, j * block, block, axis)


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """Laid-out keys, values and segments, and which key blocks each query block visits.

  Query block i visits key blocks [lo, i], lo = max(0, i - window_blocks)
  (window_blocks = all blocks for full attention), after the global blocks
  [0, min(global_blocks, lo)) that the window does not reach.
  """
  k: jax.Array  # [batch, kv_heads, padded, head_dim]
  v: jax.Array
  seg: jax.Array  # [batch, padded]
  seq: int  # Unpadded length.
  block: int
  group: int  # Query heads per KV head.
  window: int | None
  num_global: int

  @property
  def window_blocks(self) -> int:
    if self.window is None:
      return self.seg.shape[1] // self.block
    return -(-(self.window - 1) // self.block)

  def _visit(self, i, t):
    """(number of key blocks query block i visits, key block of its t-th visit)."""
    lo = jnp.maximum(0, i - self.window_blocks)
    num_global = jnp.minimum(-(-self.num_global // self.block), lo)
    return num_global + i - lo + 1, jnp.where(t < num_global, t, lo + t - num_global)

  def num_visits(self, i):
    return self._visit(i, 0)[0]

  def _mask(self, i, j):
    """[batch, 1, group * block, block] bool mask of query block i against key block j."""
    block = self.block
    q = i * block + jnp.arange(block)[:, None]
    k = j * block + jnp.arange(block)[None, :]
    allowed = (k <= q) & (k < self.seq)
    if self.window is not None:
      allowed &= (q - k < self.window) | (k < self.num_global)
    seg_q, seg_k = _slice(self.seg, i, block, 1), _slice(self.seg, j, block, 1)
    allowed = allowed[None] & (seg_q[:, :, None] == seg_k[:, None, :])  # [b, bq, bk]
    return jnp.tile(allowed, (1, self.group, 1))[:, None]

  def scores(self, i, t, qi):
    """For query block i's t-th visit: (key block j, its keys and values, the mask, the
    float32 scores qi . k_j) with qi: [batch, kv_heads, group * block, head_dim]."""
    _, j = self._visit(i, t)
    kj, vj = _slice(self.k, j, self.block, 2), _slice(self.v, j, self.block, 2)
    s = jnp.einsum('bkqd,bksd->bkqs', qi, kj, preferred_element_type=jnp.float32)
    return j, kj, vj, self._mask(i, j), s


def _prepare(query, key, value, segment_ids, window, num_global, block):
  """(q laid out by `_layout_q` and scaled by 1/sqrt(head_dim), the `_Blocks`: keys
  and values [batch, kv_heads, padded, head_dim], segments padded with -1, which no
  real query sees)."""
  kv_heads = key.shape[2]
  q = _layout_q(query * jnp.asarray(query.shape[-1]**-0.5, query.dtype), kv_heads, block)
  k, v = (_pad(x, block).transpose(0, 2, 1, 3) for x in (key, value))
  seg = _pad(segment_ids, block, value=-1)
  return q, _Blocks(k, v, seg, query.shape[1], block, query.shape[2] // kv_heads, window,
                    num_global)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(query, key, value, segment_ids, window, num_global, block):
  return _forward(query, key, value, segment_ids, window, num_global, block)[0]


def _forward(query, key, value, segment_ids, window, num_global, block):
  q, blocks = _prepare(query, key, value, segment_ids, window, num_global, block)

  def query_block(_, xs):
    i, qi = xs  # qi: [batch, kv_heads, group * block, dim]

    def visit(t, carry):
      acc, row_max, row_sum = carry
      _, _, vj, mask, s = blocks.scores(i, t, qi)
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
    acc, row_max, row_sum = lax.fori_loop(0, blocks.num_visits(i), visit, init)
    # Every real query sees itself, so row_sum > 0 except in padding rows.
    row_sum = jnp.maximum(row_sum, 1e-30)
    return None, ((acc / row_sum[..., None]).astype(value.dtype),
                  row_max + jnp.log(row_sum))

  _, (out, lse) = lax.scan(query_block, None, (jnp.arange(q.shape[0]), q))
  # The laid-out inputs are the residuals: the backward pass needs no second layout.
  residuals = (q, blocks.k, blocks.v, blocks.seg, segment_ids, out, lse)
  return _unlayout(out, query.shape[1], blocks.group, block), residuals


def _backward(window, num_global, block, residuals, d_out):
  q, k, v, seg, segment_ids, out, lse = residuals
  seq = segment_ids.shape[1]
  group = d_out.shape[2] // k.shape[1]
  blocks = _Blocks(k, v, seg, seq, block, group, window, num_global)
  do = _layout_q(d_out, k.shape[1], block)
  # delta_r = sum_d dO_rd * O_rd, the softmax backward's row term.
  delta = jnp.einsum('nbkqd,nbkqd->nbkq', do.astype(jnp.float32), out.astype(jnp.float32))
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def query_block(carry, xs):
    dk, dv = carry  # [batch, kv_heads, padded, dim] float32
    i, qi, doi, lse_i, delta_i = xs

    def visit(t, carry):
      dq, dk, dv = carry
      j, kj, vj, mask, s = blocks.scores(i, t, qi)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
      dp = f32('bkqd,bksd->bkqs', doi, vj)
      ds = p * (dp - delta_i[..., None])
      dq = dq + f32('bkqs,bksd->bkqd', ds.astype(kj.dtype), kj)
      dk_j = _slice(dk, j, block, 2) + f32('bkqs,bkqd->bksd', ds.astype(qi.dtype), qi)
      dv_j = _slice(dv, j, block, 2) + f32('bkqs,bkqd->bksd', p.astype(doi.dtype), doi)
      return (dq, lax.dynamic_update_slice_in_dim(dk, dk_j, j * block, 2),
              lax.dynamic_update_slice_in_dim(dv, dv_j, j * block, 2))

    dq, dk, dv = lax.fori_loop(0, blocks.num_visits(i), visit,
                               (jnp.zeros(qi.shape, jnp.float32), dk, dv))
    return (dk, dv), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = lax.scan(query_block, (zeros, zeros),
                          (jnp.arange(q.shape[0]), q, do, lse, delta))
  scale = d_out.shape[-1]**-0.5
  dq = _unlayout(dq * scale, seq, group, block).astype(q.dtype)
  # dk was accumulated against the scaled queries, so it needs no extra factor.
  dk, dv = (x.transpose(0, 2, 1, 3)[:, :seq].astype(y.dtype) for x, y in ((dk, k), (dv, v)))
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
