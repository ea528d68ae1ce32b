"""SwiGLU feed-forward block."""

from flax import linen as nn
import jax
import ml_collections

from xenith.model import layers


class Mlp(nn.Module):
  """down(silu(gate(x)) * up(x)) with hidden width `config.mlp_dim`, no biases."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, embed] -> [batch, seq, embed]."""
    cfg = self.config
    gate = layers.dense(cfg.mlp_dim, ('embed', 'mlp'), cfg, name='gate')(x)
    up = layers.dense(cfg.mlp_dim, ('embed', 'mlp'), cfg, name='up')(x)
    hidden = nn.silu(gate) * up  # [batch, seq, mlp]
    hidden = nn.with_logical_constraint(
        hidden, ('activation_batch', 'activation_length', 'activation_mlp'))
    return layers.dense(cfg.embed_dim, ('mlp', 'embed'), cfg, name='down')(hidden)
