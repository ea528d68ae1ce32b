"""Rotary position embedding (RoPE) from integer positions.

Features are paired in the "half-split" layout (feature i with feature
i + head_dim/2), the layout of Hugging Face Llama/Mistral checkpoints, so their
q/k kernels load without a permutation.

Frequencies come from a separate function so that context-extension schemes
(YaRN, linear/NTK scaling) can be added as other frequency functions without
touching `apply_rope`.
"""

import jax
import jax.numpy as jnp
import ml_collections


def default_inv_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Standard RoPE inverse frequencies: [head_dim // 2] float32, theta^(-2i/d)."""
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}.')
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta**exponents)


def inv_frequencies(config: ml_collections.FrozenConfigDict) -> jax.Array:
  """The inverse frequencies [head_dim // 2] for `config` (YaRN will branch here)."""
  return default_inv_frequencies(config.head_dim, config.rope_theta)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array
) -> jax.Array:
  """Rotates feature pairs of `x` by angle position * frequency.

  Args:
    x: [batch, seq, heads, head_dim] queries or keys.
    positions: [batch, seq] integer token positions.
    inv_freq: [head_dim // 2] inverse frequencies.

  Returns:
    [batch, seq, heads, head_dim], same dtype as `x`; the rotation is done in
    float32 because bf16 angles lose relative-position information quickly.
  """
  # angles: [batch, seq, 1, head_dim // 2], broadcast over heads.
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
