"""`layers.linear`, the linear map with a written-out backward pass (issue 14), against
NumPy: outputs and both gradients, for one and two contracted axes, float32 and
bfloat16, and under a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xenith.model import layers


def _numpy_grads(x, kernel, g, n_in):
  """(y, dx, dkernel) of y = x . kernel over the last n_in axes of x, with upstream g."""
  x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
  batch_shape, in_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  out_shape = kernel.shape[n_in:]
  x2 = x.reshape(-1, int(np.prod(in_shape)))
  k2 = kernel.reshape(int(np.prod(in_shape)), -1)
  g2 = g.reshape(-1, int(np.prod(out_shape)))
  return ((x2 @ k2).reshape(*batch_shape, *out_shape), (g2 @ k2.T).reshape(x.shape),
          (x2.T @ g2).reshape(kernel.shape))


@pytest.mark.parametrize('x_shape, kernel_shape, n_in', [
    ((3, 5, 8), (8, 6), 1),            # [batch, seq, embed] @ [embed, mlp]
    ((2, 4, 3, 5), (3, 5, 7), 2),      # [batch, seq, heads, head_dim] @ [heads, head_dim, embed]
    ((6, 8), (8, 2, 3), 1),            # [tokens, embed] @ [embed, heads, head_dim]
])
def test_linear_and_its_gradients_match_numpy(x_shape, kernel_shape, n_in):
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  kernel = rng.normal(size=kernel_shape).astype(np.float32)
  out_shape = x_shape[:len(x_shape) - n_in] + kernel_shape[n_in:]
  g = rng.normal(size=out_shape).astype(np.float32)
  y, vjp = jax.vjp(lambda a, b: layers.linear(a, b, n_in), jnp.asarray(x), jnp.asarray(kernel))
  dx, dkernel = vjp(jnp.asarray(g))
  want_y, want_dx, want_dkernel = _numpy_grads(x, kernel, g, n_in)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-5, atol=1e-5)
  assert dx.shape == x.shape and dkernel.shape == kernel.shape


def test_bfloat16_gradients_keep_the_input_dtypes():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16)
  y, vjp = jax.vjp(lambda a, b: layers.linear(a, b, 1, jnp.float32), x, kernel)
  dx, dkernel = vjp(g.astype(jnp.float32))
  assert y.dtype == jnp.float32 and dx.dtype == dkernel.dtype == jnp.bfloat16
  _, want_dx, want_dkernel = _numpy_grads(x.astype(jnp.float32), kernel.astype(jnp.float32),
                                          g.astype(jnp.float32), 1)
  np.testing.assert_allclose(np.asarray(dkernel, np.float32), want_dkernel, rtol=2e-2,
                             atol=5e-2)
  np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, rtol=2e-2, atol=5e-2)


def test_sharded_gradients_equal_unsharded():
  # Auto axes, as sharding.create_mesh makes them.
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 6, 16)).astype(np.float32)
  kernel = rng.normal(size=(16, 10)).astype(np.float32)
  spec = jax.sharding.PartitionSpec
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec('data', None, None)))
  ks = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, spec(None, 'tensor')))
  loss = lambda a, b: jnp.sum(jnp.sin(layers.linear(a, b)))
  sharded = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, ks)
  plain = jax.grad(lambda a, b: jnp.sum(jnp.sin(a @ b)), argnums=(0, 1))(x, kernel)
  for got, want in zip(sharded, plain):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
