"""Normalization layers: RMSNorm and LayerNorm, picked by `config.norm`."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import layers


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale; statistics in float32."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., features] in `dtype`."""
    scale = self.param(
        'scale',
        nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        (x.shape[-1],),
        layers.PARAM_DTYPE,
    )
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(mean_square + self.epsilon)
    return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """Mean/variance norm with a learned scale and bias; statistics in float32."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., features] in `dtype`."""
    features = x.shape[-1]
    scale = self.param(
        'scale',
        nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        (features,),
        layers.PARAM_DTYPE,
    )
    bias = self.param(
        'bias',
        nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
        (features,),
        layers.PARAM_DTYPE,
    )
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(variance + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


NORMS = {'rmsnorm': RMSNorm, 'layernorm': LayerNorm}


def make_norm(config: ml_collections.FrozenConfigDict, name: str) -> nn.Module:
  """The norm named by `config.norm`, with `config.norm_eps` and the compute dtype."""
  try:
    cls = NORMS[config.norm]
  except KeyError:
    raise ValueError(
        f'Unknown norm {config.norm!r}; choose one of {sorted(NORMS)}.'
    ) from None
  return cls(
      epsilon=config.norm_eps, dtype=layers.compute_dtype(config), name=name
  )
