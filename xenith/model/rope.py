"""Rotary position embedding (RoPE) from integer positions, with YaRN context extension.

Features are paired in the "half-split" layout (feature i with feature
i + head_dim/2), the layout of Hugging Face Llama/Mistral checkpoints, so their
q/k kernels load without a permutation.

Frequencies come from separate functions, so that context-extension schemes
change only the frequencies and a scale, never `apply_rope`:
- `default_inv_frequencies`: theta^(-2i/d), the original RoPE.
- `yarn_inv_frequencies` + `yarn_attention_factor`: YaRN (Peng et al. 2023,
  arXiv:2309.00071), computed as Hugging Face transformers'
  `_compute_yarn_parameters` does (tests/test_rope.py checks it against them).
`inv_frequencies(config)` and `attention_factor(config)` pick by
`config.rope_scaling.type` ('none' or 'yarn').
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROPE_SCALING_TYPES = ('none', 'yarn')


def default_inv_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Standard RoPE inverse frequencies: [head_dim // 2] float32, theta^(-2i/d)."""
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}.')
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta**exponents)


def _yarn_correction_dim(rotations: float, head_dim: int, theta: float,
                         original_max_position: int) -> float:
  """The (fractional) dimension index whose wavelength fits `rotations` times
  into `original_max_position` tokens."""
  return (head_dim * math.log(original_max_position / (rotations * 2 * math.pi))
          / (2 * math.log(theta)))


def yarn_inv_frequencies(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_position: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> jax.Array:
  """YaRN inverse frequencies: [head_dim // 2] float32.

  Each frequency blends extrapolation (the original theta^(-2i/d)) with
  interpolation (the original divided by `factor`). Dimensions that turn more
  than `beta_fast` times over the original context (high frequencies, local
  order) keep their frequency; those that turn fewer than `beta_slow` times
  (low frequencies) are interpolated; a linear ramp joins the two.

  Args:
    head_dim: width of a head (even).
    theta: RoPE base wavelength.
    factor: context extension ratio, new context / original context (>= 1).
    original_max_position: context length the model was trained at.
    beta_fast: rotations at which the ramp starts (pure extrapolation below
      the corresponding dimension).
    beta_slow: rotations at which the ramp ends (pure interpolation above).
    truncate: round the ramp ends outward to whole dimensions (floor / ceil),
      as the YaRN paper and Hugging Face do by default.
  """
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}.')
  low = _yarn_correction_dim(beta_fast, head_dim, theta, original_max_position)
  high = _yarn_correction_dim(beta_slow, head_dim, theta, original_max_position)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # A zero-width ramp would divide by zero.

  # Constants of the config, so computed in NumPy float32: element by element
  # in the order Hugging Face uses, with no fused multiply-adds, which keeps the
  # result within an ulp of theirs.
  f32 = np.float32
  pos_freqs = f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))
  extrapolation = f32(1) / pos_freqs
  interpolation = f32(1) / (f32(factor) * pos_freqs)
  # ramp: 0 at and below dimension index `low`, 1 at and above `high`.
  ramp = np.clip(
      (np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
  extrapolation_weight = f32(1) - ramp
  return jnp.asarray(interpolation * (f32(1) - extrapolation_weight)
                     + extrapolation * extrapolation_weight)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  if factor <= 1:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(
    factor: float,
    attention_factor: float = 0.0,
    mscale: float = 0.0,
    mscale_all_dim: float = 0.0,
) -> float:
  """YaRN's scale on cos/sin (so q.k is scaled by its square).

  `attention_factor` > 0 is used as given. Otherwise, with both `mscale` and
  `mscale_all_dim` > 0 (DeepSeek-style configs) it is
  mscale(factor, mscale) / mscale(factor, mscale_all_dim), else the paper's
  0.1 * ln(factor) + 1 (1 for factor <= 1).
  """
  if attention_factor:
    return float(attention_factor)
  if mscale and mscale_all_dim:
    return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
  return _yarn_mscale(factor)


def _scaling(config: ml_collections.FrozenConfigDict):
  scaling = config.rope_scaling
  if scaling.type not in ROPE_SCALING_TYPES:
    raise ValueError(f'Unknown rope_scaling.type {scaling.type!r}; choose one of '
                     f'{ROPE_SCALING_TYPES}.')
  return scaling


def inv_frequencies(config: ml_collections.FrozenConfigDict) -> jax.Array:
  """The inverse frequencies [head_dim // 2] for a model config."""
  scaling = _scaling(config)
  if scaling.type == 'yarn':
    return yarn_inv_frequencies(
        config.head_dim, config.rope_theta, scaling.factor,
        scaling.original_max_position, scaling.beta_fast, scaling.beta_slow,
        scaling.truncate)
  return default_inv_frequencies(config.head_dim, config.rope_theta)


def attention_factor(config: ml_collections.FrozenConfigDict) -> float:
  """The scale `apply_rope` puts on rotated q and k (1.0 without YaRN)."""
  scaling = _scaling(config)
  if scaling.type == 'yarn':
    return yarn_attention_factor(
        scaling.factor, scaling.attention_factor, scaling.mscale,
        scaling.mscale_all_dim)
  return 1.0


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0
) -> jax.Array:
  """Rotates feature pairs of `x` by angle position * frequency.

  Args:
    x: [batch, seq, heads, head_dim] queries or keys.
    positions: [batch, seq] integer token positions.
    inv_freq: [head_dim // 2] inverse frequencies.
    scale: multiplies cos and sin, hence the output (YaRN's attention factor,
      applied to both q and k as Hugging Face does, so q.k gets scale^2).

  Returns:
    [batch, seq, heads, head_dim], same dtype as `x`; the rotation is done in
    float32 because bf16 angles lose relative-position information quickly.
  """
  # angles: [batch, seq, 1, head_dim // 2], broadcast over heads.
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if scale != 1.0:
    sin, cos = sin * scale, cos * scale
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
