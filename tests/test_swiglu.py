"""`mlp.swiglu`, silu(gate) * up with a written-out backward pass (issue 14), against
NumPy (float64, the derivative by hand and by central differences), in bfloat16, and
the memory it saves inside a jitted gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from xenith.model import mlp


def _numpy_swiglu(gate, up, d_out):
  """(out, d_gate, d_up) in float64: silu(g) = g * sigmoid(g)."""
  g, u, d = (np.asarray(a, np.float64) for a in (gate, up, d_out))
  sig = 1 / (1 + np.exp(-g))
  return g * sig * u, d * u * (sig + g * sig * (1 - sig)), d * g * sig


def test_swiglu_and_its_gradients_match_numpy():
  rng = np.random.default_rng(0)
  gate, up, d_out = (rng.normal(scale=3, size=(3, 5, 16)).astype(np.float32)
                     for _ in range(3))
  out, vjp = jax.vjp(mlp.swiglu, jnp.asarray(gate), jnp.asarray(up))
  d_gate, d_up = vjp(jnp.asarray(d_out))
  want_out, want_d_gate, want_d_up = _numpy_swiglu(gate, up, d_out)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_gate, want_d_gate, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_up, want_d_up, rtol=1e-5, atol=1e-6)


def test_gate_gradient_matches_central_differences():
  rng = np.random.default_rng(1)
  gate = rng.normal(scale=2, size=(7,))
  up = rng.normal(size=(7,))
  eps = 1e-6
  numeric = (_numpy_swiglu(gate + eps, up, 1)[0] - _numpy_swiglu(gate - eps, up, 1)[0]) / (2 * eps)
  d_gate, _ = jax.grad(lambda g, u: mlp.swiglu(g, u).sum(), argnums=(0, 1))(
      jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32))
  np.testing.assert_allclose(d_gate, numeric, rtol=1e-4, atol=1e-5)


def test_bfloat16_in_bfloat16_out_float32_inside():
  rng = np.random.default_rng(2)
  gate, up, d_out = (jnp.asarray(rng.normal(size=(4, 32)), jnp.bfloat16) for _ in range(3))
  out, vjp = jax.vjp(mlp.swiglu, gate, up)
  d_gate, d_up = vjp(d_out)
  assert out.dtype == d_gate.dtype == d_up.dtype == jnp.bfloat16
  want = _numpy_swiglu(*(np.asarray(a, np.float32) for a in (gate, up, d_out)))
  for got, ref in zip((out, d_gate, d_up), want):
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_keeps_no_sigmoid_for_the_backward_pass():
  """The jitted gradient of down(swiglu(x W_g, x W_u)) needs less temporary memory
  than with autodiff's silu, which keeps the sigmoid and silu for the backward pass."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(512, 64)), jnp.float32)
  w_g, w_u = (jnp.asarray(rng.normal(size=(64, 256)), jnp.float32) for _ in range(2))
  w_d = jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)

  def temp_bytes(product):
    loss = lambda ws: jnp.sum(jnp.tanh(product(x @ ws[0], x @ ws[1]) @ ws[2]))
    compiled = jax.jit(jax.grad(loss)).lower((w_g, w_u, w_d)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  hidden = 512 * 256 * 4  # One [tokens, mlp] float32 array.
  autodiff = temp_bytes(lambda g, u: jax.nn.silu(g) * u)
  written_out = temp_bytes(mlp.swiglu)
  assert written_out <= autodiff - hidden, (written_out, autodiff)
