"""SwiGLU feed-forward block, and the SwiGLU product it (and the MoE experts) use."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import layers


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, elementwise; float32 inside, the inputs' dtype out.

  The backward pass is written out so that it keeps only `gate` and `up` (which
  exist anyway) and recomputes the sigmoid in one fused pass. Autodiff keeps the
  sigmoid, the silu and their products as separate [tokens, mlp] arrays: 2-3 more
  per layer, each a pass over memory in the forward and held until the backward.
  """
  return _swiglu(gate, up)[0]


def _swiglu(gate, up):
  g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  silu = g * sig
  return (silu * u).astype(gate.dtype), (g, u, sig, silu)


def _swiglu_fwd(gate, up):
  return _swiglu(gate, up)[0], (gate, up)


def _swiglu_bwd(residuals, d_out):
  # The barrier keeps XLA from merging this recomputation with the forward's (CSE),
  # which would bring back the stored sigmoid and silu.
  gate, up = jax.lax.optimization_barrier(residuals)
  _, (g, u, sig, silu) = _swiglu(gate, up)
  d = d_out.astype(jnp.float32)
  # silu'(g) = sig * (1 + g * (1 - sig)).
  d_gate = d * u * sig * (1 + g * (1 - sig))
  return d_gate.astype(gate.dtype), (d * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
  """down(silu(gate(x)) * up(x)) with hidden width `config.mlp_dim`, no biases."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, embed] -> [batch, seq, embed]."""
    cfg = self.config
    gate = layers.dense(cfg.mlp_dim, ('embed', 'mlp'), cfg, name='gate')(x)
    up = layers.dense(cfg.mlp_dim, ('embed', 'mlp'), cfg, name='up')(x)
    hidden = swiglu(gate, up)  # [batch, seq, mlp]
    hidden = nn.with_logical_constraint(
        hidden, ('activation_batch', 'activation_length', 'activation_mlp'))
    return layers.dense(cfg.embed_dim, ('mlp', 'embed'), cfg, name='down')(hidden)
