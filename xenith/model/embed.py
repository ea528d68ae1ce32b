"""Token embedding table, shared with the output head when embeddings are tied."""

from flax import linen as nn
import jax
import jax.numpy as jnp

from xenith.model import layers


class Embed(nn.Module):
  """[vocab, embed] table: `__call__` looks tokens up, `attend` scores every token.

  Initialized at unit scale so AdamW's per-step relative change stays small;
  the tied head in `Decoder` rescales logits by 1/sqrt(embed).
  """

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ('vocab', 'embed')),
        (self.num_embeddings, self.features),
        layers.PARAM_DTYPE,
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """inputs: [batch, seq] int -> [batch, seq, embed] in `dtype`."""
    # Gather the FSDP shards of the embed axis before the lookup (keeping vocab
    # sharded); gathering from a table sharded on both axes makes XLA replicate
    # the looked-up activations.
    table = nn.with_logical_constraint(self.embedding, ('vocab', None))
    return jnp.take(table, inputs, axis=0).astype(self.dtype)

  def attend(self, query: jax.Array) -> jax.Array:
    """query: [batch, seq, embed] -> logits [batch, seq, vocab] float32.

    The matmul runs in `dtype` but accumulates into float32, so bf16 models do
    not round their logits to bf16.
    """
    return jnp.einsum(
        'bse,ve->bsv',
        query.astype(self.dtype),
        self.embedding.astype(self.dtype),
        preferred_element_type=jnp.float32,
    )
