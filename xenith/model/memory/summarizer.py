"""The summarizer: S learned queries that read a chunk's final hidden states."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import layers
from xenith.model import norms

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


class Summarizer(nn.Module):
  """S learned queries cross-attending to a chunk's hidden states -> [batch, S, embed].

  `summarizer_layers` pre-norm layers (with `summarizer_self_attention`, first
  bidirectional self-attention among the S queries; then cross-attention to the chunk;
  both with `summarizer_heads` heads of width embed / heads; then a GELU MLP of width
  mlp_dim), then a final norm, so the
  summaries enter the memory layers' key/value projections at the scale of their
  normalised inputs. Padding tokens (segment 0) are not attended to.
  """

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, hidden: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """hidden: [batch, C, embed], segment_ids: [batch, C] or None -> [batch, S, embed]."""
    cfg = self.config
    mem = cfg.memory
    dtype = layers.compute_dtype(cfg)
    embed = cfg.embed_dim
    heads = mem.summarizer_heads
    head_dim = embed // heads
    batch = hidden.shape[0]
    queries = self.param('queries', nn.initializers.normal(1.0),
                         (mem.summary_tokens, embed), layers.PARAM_DTYPE)
    x = jnp.broadcast_to(queries.astype(dtype), (batch,) + queries.shape)

    def dense(features, names, name, axis=-1):
      return layers.DenseGeneral(features=features, names=names, axis=axis, dtype=dtype,
                                 name=name)

    def attend(q, k, v, mask):
      """q: [batch, S, heads, hd], k, v: [batch, n, heads, hd], mask: [batch, n] or None."""
      scores = jnp.einsum('bshd,bchd->bhsc', q, k,
                          preferred_element_type=jnp.float32) * head_dim**-0.5
      if mask is not None:
        scores = jnp.where(mask[:, None, None, :], scores, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
      return jnp.einsum('bhsc,bchd->bshd', probs, v)

    for i in range(mem.summarizer_layers):
      if mem.get('summarizer_self_attention', False):  # The summaries read each other.
        h = norms.make_norm(cfg, f'self_norm_{i}')(x)
        q, k, v = (dense((heads, head_dim), ('embed', 'heads', 'head_dim'), f'{n}_{i}')(h)
                   for n in ('self_q', 'self_k', 'self_v'))
        x = x + dense(embed, ('heads', 'head_dim', 'embed'), f'self_o_{i}',
                      axis=(-2, -1))(attend(q, k, v, None))
      q = norms.make_norm(cfg, f'query_norm_{i}')(x)
      ctx = norms.make_norm(cfg, f'context_norm_{i}')(hidden)
      q = dense((heads, head_dim), ('embed', 'heads', 'head_dim'), f'q_{i}')(q)
      k = dense((heads, head_dim), ('embed', 'heads', 'head_dim'), f'k_{i}')(ctx)
      v = dense((heads, head_dim), ('embed', 'heads', 'head_dim'), f'v_{i}')(ctx)
      attn = attend(q, k, v, None if segment_ids is None else segment_ids > 0)
      x = x + dense(embed, ('heads', 'head_dim', 'embed'), f'o_{i}', axis=(-2, -1))(attn)
      h = norms.make_norm(cfg, f'mlp_norm_{i}')(x)
      h = dense(cfg.mlp_dim, ('embed', 'mlp'), f'up_{i}')(h)
      h = dense(embed, ('mlp', 'embed'), f'down_{i}')(nn.gelu(h))
      x = x + h
    return norms.make_norm(cfg, 'out_norm')(x)
