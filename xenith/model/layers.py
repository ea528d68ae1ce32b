"""Shared pieces of the model's layers: compute dtype and a partitioned linear map."""

from collections.abc import Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Parameters are always stored in float32; only the compute dtype follows the config.
PARAM_DTYPE = jnp.float32


def compute_dtype(config: ml_collections.FrozenConfigDict) -> jnp.dtype:
  """The activation dtype named by `config.dtype` ('float32' or 'bfloat16')."""
  try:
    return _DTYPES[config.dtype]
  except KeyError:
    raise ValueError(
        f'Unknown model dtype {config.dtype!r}; choose one of {sorted(_DTYPES)}.'
    ) from None


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)


class DenseGeneral(nn.Module):
  """Bias-free linear map contracting `axis` of the input with a multi-axis kernel.

  Unlike `nn.DenseGeneral`, the kernel is initialized at its real shape (not
  flattened to 2-D first), so a logically partitioned initializer works under
  a mesh; fan-in is the product of the contracted axes (e.g. heads * head_dim
  for the attention output), which keeps activations at unit scale.

  Attributes:
    features: output feature shape, e.g. `(num_heads, head_dim)`.
    names: logical names of the kernel axes: contracted axes, then features.
    axis: input axes contracted with the kernel.
    dtype: compute dtype (inputs and kernel are cast to it).
    out_dtype: dtype the matmul accumulates into and returns; None = `dtype`.
  """

  features: int | Sequence[int]
  names: Sequence[str | None]
  axis: int | Sequence[int] = -1
  dtype: jnp.dtype = jnp.float32
  out_dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., *contracted] -> [..., *features]."""
    features = _as_tuple(self.features)
    axis = tuple(a % x.ndim for a in _as_tuple(self.axis))
    n_in = len(axis)
    kernel_shape = tuple(x.shape[a] for a in axis) + features
    if len(self.names) != len(kernel_shape):
      raise ValueError(
          f'{len(self.names)} axis names {self.names} for a kernel of shape '
          f'{kernel_shape}.')
    init = nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal',
        in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, len(kernel_shape))),
    )
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(init, tuple(self.names)),
        kernel_shape,
        PARAM_DTYPE,
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    return jax.lax.dot_general(
        x, kernel, ((axis, tuple(range(n_in))), ((), ())),
        preferred_element_type=self.out_dtype)


def dense(
    features: int | Sequence[int],
    names: Sequence[str | None],
    config: ml_collections.FrozenConfigDict,
    *,
    axis: int | Sequence[int] = -1,
    out_dtype: jnp.dtype | None = None,
    name: str | None = None,
) -> DenseGeneral:
  """A `DenseGeneral` in the config's compute dtype; see its attributes."""
  return DenseGeneral(
      features=features,
      names=tuple(names),
      axis=axis,
      dtype=compute_dtype(config),
      out_dtype=out_dtype,
      name=name,
  )
