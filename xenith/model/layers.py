"""Shared pieces of the model's layers: compute dtype, initializers, partitioned linear maps."""

from collections.abc import Sequence

from flax import linen as nn
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


def kernel_init(names: Sequence[str | None]) -> nn.initializers.Initializer:
  """Fan-in scaled truncated normal, boxed with logical axis `names`.

  `nn.DenseGeneral` flattens multi-axis kernels to 2-D before calling the
  initializer, so fan-in is the product of the contracted axes (e.g. heads *
  head_dim for the attention output), which keeps activations at unit scale.
  """
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
      tuple(names),
  )


def dense(
    features: int | Sequence[int],
    names: Sequence[str | None],
    config: ml_collections.FrozenConfigDict,
    *,
    axis: int | Sequence[int] = -1,
    name: str | None = None,
) -> nn.DenseGeneral:
  """A bias-free `nn.DenseGeneral` whose kernel carries logical axis `names`.

  Args:
    features: output feature shape, e.g. `(num_heads, head_dim)`.
    names: logical names of the kernel axes: contracted axes, then features.
    config: model config (for the compute dtype).
    axis: input axes contracted with the kernel.
    name: submodule name (the param path).
  """
  return nn.DenseGeneral(
      features=features,
      axis=axis,
      use_bias=False,
      dtype=compute_dtype(config),
      param_dtype=PARAM_DTYPE,
      kernel_init=kernel_init(names),
      name=name,
  )
