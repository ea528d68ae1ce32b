"""Shared pieces of the model's layers: compute dtype and a partitioned linear map
(with optional LoRA adapters, see `lora.py`)."""

from collections.abc import Sequence
import functools
import math

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import lora

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


def _contract(x: jax.Array, kernel: jax.Array, n_in: int, out_dtype) -> jax.Array:
  batch = x.ndim - n_in
  return jax.lax.dot_general(
      x, kernel, ((tuple(range(batch, x.ndim)), tuple(range(n_in))), ((), ())),
      preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear(x: jax.Array, kernel: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
  """x [..., *in] @ kernel [*in, *out] -> [..., *out] (the last `n_in` axes of x
  contracted), with a backward pass written out.

  Autodiff would compute the kernel's gradient as (g^T x)^T: on XLA:CPU that puts a
  transposed copy of g ([out, tokens], with the activation's backward fused into
  the copy's strided loop) in front of every weight-gradient matmul, which cost 40
  ms per MLP layer at the default shape. Here the operand with fewer features is the
  one transposed (x^T g, or (g^T x)^T when g is narrower, as for the MLP's down
  projection). The numbers and dtypes are autodiff's.
  """
  return _contract(x, kernel, n_in, out_dtype)


def _linear_fwd(x, kernel, n_in, out_dtype):
  return _contract(x, kernel, n_in, out_dtype), (x, kernel)


def _linear_bwd(n_in, out_dtype, residuals, g):
  del out_dtype
  x, kernel = residuals
  batch = x.ndim - n_in
  # dx [..., *in] = g [..., *out] . kernel [*in, *out], over the out axes.
  g = g.astype(x.dtype)  # The compute dtype, as autodiff's transpose computes in.
  dx = jax.lax.dot_general(
      g, kernel, ((tuple(range(batch, g.ndim)), tuple(range(n_in, kernel.ndim))),
                  ((), ())))
  # dkernel [*in, *out] = x [..., *in] . g [..., *out], over the leading axes. The
  # operand with fewer features goes first: it is the one transposed for the matmul.
  over_batch = (tuple(range(batch)), tuple(range(batch)))
  if math.prod(x.shape[batch:]) <= math.prod(g.shape[batch:]):
    dkernel = jax.lax.dot_general(x, g, (over_batch, ((), ())))
  else:  # [*out, *in], then the (small) kernel-sized transpose.
    dkernel = jax.lax.dot_general(g, x, (over_batch, ((), ())))
    n_out = kernel.ndim - n_in
    dkernel = dkernel.transpose(tuple(range(n_out, kernel.ndim)) + tuple(range(n_out)))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class DenseGeneral(nn.Module):
  """Bias-free linear map contracting `axis` of the input with a multi-axis kernel.

  Unlike `nn.DenseGeneral`, the kernel is initialized at its real shape (not
  flattened to 2-D first), so a logically partitioned initializer works under
  a mesh; fan-in is the product of the contracted axes (e.g. heads * head_dim
  for the attention output), which keeps activations at unit scale.

  With `lora_rank > 0` the layer adds a low-rank adapter (see `lora.py`):
  `lora_a` [*contracted, rank] and `lora_b` [rank, *features] (zero-initialised),
  output `x @ kernel + lora_alpha / lora_rank * dropout(x) @ lora_a @ lora_b`. The
  adapter dropout runs when the module is applied with a 'dropout' rng (training),
  so the call signature stays the base layer's.

  Attributes:
    features: output feature shape, e.g. `(num_heads, head_dim)`.
    names: logical names of the kernel axes: contracted axes, then features.
    axis: input axes contracted with the kernel.
    dtype: compute dtype (inputs and kernel are cast to it).
    out_dtype: dtype the matmul accumulates into and returns; None = `dtype`.
    lora_rank: adapter rank; 0 = no adapter.
    lora_alpha: adapter output scale numerator (the scale is alpha / rank).
    lora_dropout: dropout rate on the adapter's input.
  """

  features: int | Sequence[int]
  names: Sequence[str | None]
  axis: int | Sequence[int] = -1
  dtype: jnp.dtype = jnp.float32
  out_dtype: jnp.dtype | None = None
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_dropout: float = 0.0

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
    contract = ((axis, tuple(range(n_in))), ((), ()))
    if axis == tuple(range(x.ndim - n_in, x.ndim)):  # Trailing axes: every caller today.
      y = linear(x, kernel, n_in, self.out_dtype)
    else:
      y = jax.lax.dot_general(x, kernel, contract, preferred_element_type=self.out_dtype)
    if not self.lora_rank:
      return y

    names = tuple(self.names)
    # A like the kernel (fan-in scaling: x @ A is unit scale); B = 0, so the
    # adapted layer starts as the base layer.
    init_a = nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal',
        in_axis=tuple(range(n_in)), out_axis=(n_in,))
    lora_a = self.param(
        'lora_a',
        nn.with_logical_partitioning(init_a, names[:n_in] + (lora.RANK_AXIS,)),
        kernel_shape[:n_in] + (self.lora_rank,),
        PARAM_DTYPE,
    )
    lora_b = self.param(
        'lora_b',
        nn.with_logical_partitioning(
            nn.initializers.zeros, (lora.RANK_AXIS,) + names[n_in:]),
        (self.lora_rank,) + features,
        PARAM_DTYPE,
    )
    if self.lora_dropout:
      x = nn.Dropout(self.lora_dropout)(
          x, deterministic=not self.has_rng('dropout'))
    # Scaling the [..., rank] activations is cheaper than scaling the output.
    h = jax.lax.dot_general(x, lora_a.astype(self.dtype), contract)  # [..., rank]
    h = h * jnp.asarray(self.lora_alpha / self.lora_rank, self.dtype)
    delta = jax.lax.dot_general(
        h, lora_b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=self.out_dtype)  # [..., *features]
    return y + delta

  def merged_kernel(self) -> jax.Array:
    """The kernel with its adapter folded in (W + alpha / rank * A @ B), in `dtype`.

    Reads the existing params, so only in `apply` (after the layer was built by a
    call); adapter dropout cannot apply to a kernel, so a layer with it refuses.
    """
    kernel = nn.unbox(self.get_variable('params', 'kernel'))
    if self.lora_rank:
      if self.lora_dropout:
        raise ValueError('merged_kernel of a layer with LoRA dropout: apply the layer '
                         'instead (dropout acts on its input).')
      a, b = (nn.unbox(self.get_variable('params', n)) for n in lora.ADAPTER_PARAMS)
      kernel = lora.adapted_weight(kernel, a, b, self.lora_alpha / self.lora_rank)
    return kernel.astype(self.dtype)


def dense(
    features: int | Sequence[int],
    names: Sequence[str | None],
    config: ml_collections.FrozenConfigDict,
    *,
    axis: int | Sequence[int] = -1,
    out_dtype: jnp.dtype | None = None,
    name: str | None = None,
) -> DenseGeneral:
  """A `DenseGeneral` in the config's compute dtype; see its attributes.

  The layer gets a LoRA adapter of rank `lora.layer_rank(config, name)` (its target's
  `config.lora.target_ranks` entry, or `config.lora.rank` for `config.lora.targets`) when
  that is > 0.
  """
  rank = lora.layer_rank(config, name)
  return DenseGeneral(
      features=features,
      names=tuple(names),
      axis=axis,
      dtype=compute_dtype(config),
      out_dtype=out_dtype,
      lora_rank=rank,
      lora_alpha=config.lora.alpha if rank else 1.0,
      lora_dropout=config.lora.dropout if rank else 0.0,
      name=name,
  )
