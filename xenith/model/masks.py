"""Attention masks: causal structure combined with packed-document segments.

Kept apart from the attention math so blockwise / cuDNN / splash kernels, which
take segment ids rather than a dense mask, can reuse the same inputs.
"""

import jax
import jax.numpy as jnp


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
  """[q_len, kv_len] bool: query i sees key j iff j <= i (both from index 0)."""
  q_index = jnp.arange(q_len)[:, None]
  kv_index = jnp.arange(kv_len)[None, :]
  return kv_index <= q_index


def segment_mask(
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array
) -> jax.Array:
  """[batch, q_len, kv_len] bool: query and key belong to the same segment.

  Padding (segment 0) only sees padding, so real tokens never see it while
  every padding query still has itself to attend to (no empty softmax rows).

  Args:
    q_segment_ids: [batch, q_len] int segment ids of the queries.
    kv_segment_ids: [batch, kv_len] int segment ids of the keys.
  """
  return q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]


def make_attention_mask(
    seq_len: int,
    segment_ids: jax.Array | None = None,
    *,
    window: int | None = None,
    num_global: int = 0,
) -> jax.Array:
  """Causal self-attention mask within packed documents, optionally windowed.

  Args:
    seq_len: sequence length (queries and keys are the same tokens).
    segment_ids: [batch, seq_len] int document ids, 0 = padding; None means one
      document per row without padding.
    window: query i sees key j only if i - j < window (itself and the
      window - 1 keys before it); None = no limit.
    num_global: keys j < num_global stay visible to every later query whatever
      the window (global tokens; causality and segments still apply).

  Returns:
    [batch or 1, seq_len, seq_len] bool, True where attention is allowed.
  """
  mask = causal_mask(seq_len, seq_len)
  if window is not None:
    q_index = jnp.arange(seq_len)[:, None]
    kv_index = jnp.arange(seq_len)[None, :]
    mask &= (q_index - kv_index < window) | (kv_index < num_global)
  mask = mask[None]
  if segment_ids is not None:
    mask = mask & segment_mask(segment_ids, segment_ids)
  return mask
