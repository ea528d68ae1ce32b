"""Grouped-query self-attention with RoPE, its implementations, and the reference kernel.

`config.model.attention.implementation` picks how the masked softmax is computed:
'dense' (`dot_product_attention` on a materialised mask, O(seq^2) memory: the
reference), 'blockwise' (`blockwise_attention.py`, pure JAX, linear memory), 'cudnn'
and 'splash' (`fused_attention.py`), or 'auto': splash on TPU, cuDNN on GPU when it
can express the layer's mask (else blockwise), blockwise on CPU. The layer's mask
(window per KV-head group, global tokens) comes from `attention_pattern.py`.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import attention_pattern
from xenith.model import blockwise_attention
from xenith.model import fused_attention
from xenith.model import kv_cache
from xenith.model import layers
from xenith.model import masks
from xenith.model import rope

IMPLEMENTATIONS = ('auto', 'dense', 'blockwise', 'cudnn', 'splash')

# Finite rather than -inf so that a fully masked row (never produced by
# `masks.make_attention_mask`, but possible with hand-made masks) gives a
# uniform distribution instead of NaNs.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)

_Q_NAMES = ('activation_batch', 'activation_length', 'activation_heads', None)
_KV_NAMES = ('activation_batch', 'activation_length', 'activation_kv_heads', None)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Reference softmax attention with grouped KV heads; O(q_len * kv_len) memory.

  Query head h uses KV head h // (heads // kv_heads), the grouping of Hugging
  Face's `repeat_kv`. Scores and softmax are float32 whatever the input dtype.

  Args:
    query: [batch, q_len, heads, head_dim].
    key: [batch, kv_len, kv_heads, head_dim].
    value: [batch, kv_len, kv_heads, head_dim].
    mask: [batch or 1, q_len, kv_len] bool, True = may attend; None = all.

  Returns:
    [batch, q_len, heads, head_dim] in the dtype of `value`.
  """
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(
        f'heads ({num_heads}) must be a multiple of kv_heads ({num_kv_heads}).'
    )
  group = num_heads // num_kv_heads
  # query: [batch, q_len, kv_heads, group, head_dim]
  query = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
  # scores: [batch, kv_heads, group, q_len, kv_len]
  scores = jnp.einsum(
      'bqkgd,bskd->bkgqs', query, key, preferred_element_type=jnp.float32
  )
  scores = scores * (head_dim**-0.5)
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs, value)
  return out.reshape(batch, q_len, num_heads, head_dim)


def resolve_implementation(implementation: str, num_global: int, seq_len: int) -> str:
  """The concrete kernel for `implementation` on the default backend (for `seq_len`
  tokens: splash needs multiples of 128, so 'auto' uses blockwise on TPU otherwise)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {implementation!r}; choose one '
                     f'of {IMPLEMENTATIONS}.')
  if implementation != 'auto':
    return implementation
  backend = jax.default_backend()
  if backend == 'tpu':
    return 'splash' if seq_len % 128 == 0 else 'blockwise'
  if backend == 'gpu' and fused_attention.supports_cudnn(num_global):
    return 'cudnn'
  return 'blockwise'


def attend(
    implementation: str,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array | None,
    *,
    window: int | None = None,
    num_global: int = 0,
    block_size: int = 128,
) -> jax.Array:
  """Causal attention within documents with `masks.make_attention_mask`'s mask.

  query: [batch, seq, heads, head_dim]; key, value: [batch, seq, kv_heads, head_dim]
  -> [batch, seq, heads, head_dim]. `implementation` as in the module docstring.
  """
  implementation = resolve_implementation(implementation, num_global, query.shape[1])
  if window is not None and window >= query.shape[1]:
    window = None  # The window covers the whole sequence.
  if window is None:
    num_global = 0  # Full causal attention already sees every earlier token.
  if implementation == 'dense':
    mask = masks.make_attention_mask(query.shape[1], segment_ids, window=window,
                                     num_global=num_global)
    return dot_product_attention(query, key, value, mask)
  if implementation == 'blockwise':
    return blockwise_attention.blockwise_attention(
        query, key, value, segment_ids, window=window, num_global=num_global,
        block_size=block_size)
  if implementation == 'cudnn':
    if not fused_attention.supports_cudnn(num_global):
      raise ValueError('The cudnn attention kernel cannot express global tokens; use '
                       "implementation 'blockwise' or 'auto'.")
    return fused_attention.cudnn_attention(query, key, value, segment_ids, window=window)
  return fused_attention.splash_attention(query, key, value, segment_ids, window=window,
                                          num_global=num_global, block_size=block_size)


def attend_head_groups(attend_group, groups, query, key, value):
  """Attention split by KV-head group (heads sharing a window), query heads following
  their KV head; the groups' outputs are concatenated back over heads.

  query: [batch, q, heads, d]; key, value: [batch, k, kv_heads, d]. `attend_group(n,
  group, query_g, key_g, value_g)` gets group n's heads and returns its output [batch, q,
  group heads, d], or None (creating a KV cache). Returns [batch, q, heads, d] or None.
  """
  q_per_kv = query.shape[2] // key.shape[2]
  outs = []
  for n, g in enumerate(groups):
    out = attend_group(n, g, query[:, :, g.kv_start * q_per_kv:g.kv_end * q_per_kv],
                       key[:, :, g.kv_start:g.kv_end], value[:, :, g.kv_start:g.kv_end])
    if out is not None:
      outs.append(out)
  if not outs:
    return None
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


class Attention(nn.Module):
  """Causal grouped-query self-attention within packed documents.

  Kernels keep head axes separate (query [embed, heads, head_dim], key/value
  [embed, kv_heads, head_dim], out [heads, head_dim, embed]) so tensor
  parallelism can shard heads. `layer` (the block's index) selects the layer's
  pattern of windows and global tokens (`attention_pattern.py`).
  """

  config: ml_collections.FrozenConfigDict
  layer: int = 0

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      segment_ids: jax.Array | None,
      positions: jax.Array,
      cache_length: int = 0,
  ) -> jax.Array:
    """Self-attention over x: [batch, seq, embed] -> [batch, seq, embed].

    Args:
      x: [batch, seq, embed] normalized residual stream.
      segment_ids: [batch, seq] document ids (0 = padding), or None.
      positions: [batch, seq] positions for RoPE (absolute ones when decoding).
      cache_length: > 0 decodes with the 'cache' collection (`kv_cache.py`): x are
        the next tokens after the cached ones, one document per row.
    """
    query, key, value, _ = self.project(x)
    query, key = self.rotate(query, positions), self.rotate(key, positions)
    if cache_length and not self.is_initializing():
      out = self._attend_cached(query, key, value, positions, cache_length)
    else:
      if cache_length:  # Creating the cache: its buffers, then plain attention.
        self._attend_cached(query, key, value, positions, cache_length)
      out = self._attend_groups(query, key, value, segment_ids)
    return self.project_out(out)

  def project(self, x: jax.Array):
    """x: [batch, seq, embed] -> query [batch, seq, heads, head_dim], key, value [batch,
    seq, kv_heads, head_dim] (no RoPE yet), and the key and value layers themselves
    (memory attention projects the bank's summaries with them too)."""
    cfg = self.config
    query = layers.dense(
        (cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'head_dim'), cfg, name='query')(x)
    key_proj, value_proj = (
        layers.dense((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'),
                     cfg, name=name) for name in ('key', 'value'))
    query = nn.with_logical_constraint(query, _Q_NAMES)
    key = nn.with_logical_constraint(key_proj(x), _KV_NAMES)
    value = nn.with_logical_constraint(value_proj(x), _KV_NAMES)
    return query, key, value, (key_proj, value_proj)

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """RoPE on x: [batch, seq, heads, head_dim] at positions [batch, seq].

    With YaRN (config.rope_scaling) the frequencies are rescaled and q, k both carry its
    attention factor; without it the factor is 1.
    """
    cfg = self.config
    return rope.apply_rope(x, positions, rope.inv_frequencies(cfg), rope.attention_factor(cfg))

  def project_out(self, out: jax.Array) -> jax.Array:
    """out: [batch, seq, heads, head_dim] -> [batch, seq, embed]."""
    out = nn.with_logical_constraint(out, _Q_NAMES)
    return layers.dense(self.config.embed_dim, ('heads', 'head_dim', 'embed'), self.config,
                        axis=(-2, -1), name='out')(out)

  def _attend_groups(self, query, key, value, segment_ids):
    """The layer's pattern: one kernel call per KV-head group sharing a window."""
    cfg = self.config
    settings = attention_pattern.settings(cfg)
    implementation = settings.implementation if settings else 'auto'
    block_size = settings.block_size if settings else 128
    groups = attention_pattern.layer_head_groups(cfg, self.layer, query.shape[1])
    num_global = attention_pattern.num_global_tokens(cfg, self.layer)
    return attend_head_groups(
        lambda n, g, q, k, v: attend(implementation, q, k, v, segment_ids, window=g.window,
                                     num_global=num_global, block_size=block_size),
        groups, query, key, value)

  def _attend_cached(self, query, key, value, positions, cache_length):
    """Attention of the new tokens to the layer's KV cache, which it then updates.

    positions: [batch, L] absolute positions of the new tokens (negative = padding).
    """
    cfg = self.config
    groups = attention_pattern.layer_head_groups(cfg, self.layer, cache_length)
    num_global = attention_pattern.num_global_tokens(cfg, self.layer)
    batch, _, _, head_dim = key.shape

    def attend_group(n, g, q, k, v):
      window = g.window if g.window is not None and g.window < cache_length else None
      globals_ = num_global if window is not None else 0
      slots = kv_cache.num_slots(cache_length, window, globals_)
      shape = (batch, slots, g.kv_end - g.kv_start, head_dim)
      cached_key = self.variable('cache', f'key_{n}', jnp.zeros, shape, key.dtype)
      cached_value = self.variable('cache', f'value_{n}', jnp.zeros, shape, key.dtype)
      cached_positions = self.variable('cache', f'positions_{n}',
                                       lambda: jnp.full((batch, slots), -1, jnp.int32))
      if self.is_initializing():
        return None
      keys, values, mask = kv_cache.keys_and_mask(
          k, v, positions, cached_key.value, cached_value.value, cached_positions.value,
          window=window, num_global=globals_)
      cached_key.value, cached_value.value, cached_positions.value = kv_cache.write(
          cached_key.value, cached_value.value, cached_positions.value, k, v, positions,
          window=window, num_global=globals_)
      return dot_product_attention(q, keys, values, mask)

    return attend_head_groups(attend_group, groups, query, key, value)
