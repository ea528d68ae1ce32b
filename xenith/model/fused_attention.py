"""Vendor attention kernels behind the mask of `masks.make_attention_mask`.

- `cudnn_attention`: `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA
  GPUs): causal, with the sliding window as cuDNN's `sliding_window_length`. Global
  tokens are not expressible there (`supports_cudnn`); packed rows pass the segment
  mask densely ([batch, 1, seq, seq], so prefer blockwise for long packed rows).
- `splash_attention`: the Pallas TPU splash-attention kernel: causal / local masks
  OR-ed with a global-token mask, segment ids natively; every pattern is supported.
  Runs in Pallas's interpreter on CPU (`interpret=True`), which the tests use.

Both take and return the layouts of `attention.dot_product_attention` (queries
[batch, seq, heads, head_dim], keys/values with kv_heads) and equal it within float
tolerance on the same mask.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def supports_cudnn(num_global: int) -> bool:
  """Whether the cuDNN kernel can express the mask: no global tokens."""
  return num_global == 0


def cudnn_attention(query, key, value, segment_ids, *, window: int | None,
                    implementation: str = 'cudnn') -> jax.Array:
  """Causal (windowed) attention through `jax.nn.dot_product_attention`.

  Args:
    query: [batch, seq, heads, head_dim]; key, value: [batch, seq, kv_heads, head_dim].
    segment_ids: [batch, seq] packed-document ids (0 = padding) or None.
    window: each query sees its `window` most recent keys; None = all earlier ones.
    implementation: 'cudnn'; 'xla' runs jax's reference of the same call (tests).
  """
  mask = None
  if segment_ids is not None:  # Packed documents: cuDNN takes them as a dense mask.
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      query, key, value, mask=mask, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)


def _splash_mask(seq_len: int, heads: int, window: int | None, num_global: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_mask as mask_lib)
  shape = (seq_len, seq_len)
  if window is None:
    mask = mask_lib.CausalMask(shape)
  else:
    mask = mask_lib.LocalMask(shape, (window - 1, 0), offset=0)
    if num_global:
      q = np.arange(seq_len)[:, None]
      k = np.arange(seq_len)[None, :]
      mask = mask_lib.LogicalOr(mask, mask_lib.NumpyMask((k < num_global) & (k <= q)))
  return mask_lib.MultiHeadMask([mask] * heads)


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq_len, heads, window, num_global, block_size, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib)
  block = min(max(block_size, 128), seq_len)  # TPU tiles are multiples of 128 lanes.
  sizes = kernel_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return kernel_lib.make_splash_mha(
      _splash_mask(seq_len, heads, window, num_global), block_sizes=sizes, head_shards=1,
      q_seq_shards=1, interpret=interpret)


def splash_attention(query, key, value, segment_ids, *, window: int | None,
                     num_global: int, block_size: int = 512,
                     interpret: bool = False) -> jax.Array:
  """Causal (windowed, global-token) attention with the TPU splash kernel.

  Shapes as `cudnn_attention`; seq must be a multiple of 128 (the TPU lane width).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib)
  batch, seq, heads, dim = query.shape
  if seq % 128:
    raise ValueError(f'splash attention needs a sequence length divisible by 128, got {seq}.')
  kernel = _splash_kernel(seq, heads, window, num_global, block_size, interpret)
  if segment_ids is None:
    segment_ids = jnp.ones((batch, seq), jnp.int32)
  # The kernel takes [heads, seq, head_dim] per example and does not scale the scores.
  q = (query * jnp.asarray(dim**-0.5, query.dtype)).transpose(0, 2, 1, 3)
  k, v = (x.transpose(0, 2, 1, 3) for x in (key, value))
  segments = kernel_lib.SegmentIds(q=segment_ids, kv=segment_ids)
  out = jax.vmap(kernel)(q, k, v, segment_ids=segments)
  return out.transpose(0, 2, 1, 3)
