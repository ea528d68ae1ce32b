"""A sequence classifier: the decoder, its final hidden states pooled per row, a label head.

The classifier is the language model's decoder class (plain, memory, frozen-base) with
its output head replaced: the final norm as before, then one vector per row (`pool`),
then a dense layer to `num_labels` logits. Every other param keeps the language
model's name and shape, so a trained LM checkpoint initialises it
(`config.init_from_checkpoint`; `checkpointing.load_base_params` drops the LM's untied
head and keeps the new head's fresh init).

Rows hold one document each (`xenith/data/labelled.py`): segment_ids 1 on its tokens, 0
on the padding after them.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import build
from xenith.model import lora
from xenith.model import norms
from xenith.model import transformer

POOLINGS = ('last', 'mean')
HEAD = 'classifier'  # The head's module name; it trains with a frozen base (lora.py).


def pool(x: jax.Array, segment_ids: jax.Array | None, pooling: str) -> jax.Array:
  """One vector per row of x [batch, seq, embed] -> [batch, embed] float32.

  'last': the last non-padding position (the EOS after the text, which has seen all
  of it); 'mean': the mean over the non-padding positions. segment_ids [batch, seq]
  (0 = padding; None = no padding).
  """
  x = x.astype(jnp.float32)
  batch, seq_len = x.shape[:2]
  mask = (jnp.ones((batch, seq_len), bool) if segment_ids is None else segment_ids > 0)
  if pooling == 'mean':
    weights = mask.astype(jnp.float32)
    return (x * weights[..., None]).sum(1) / jnp.maximum(weights.sum(1), 1.0)[:, None]
  if pooling == 'last':
    # Index of the last True per row (0 for an all-padding row, whose logits are unused).
    last = jnp.max(jnp.where(mask, jnp.arange(seq_len), 0), axis=1)  # [batch]
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f'Unknown pooling {pooling!r}; choose one of {POOLINGS}.')


class ClassifierHead(nn.Module):
  """Final norm, pooling and a dense layer: `DecoderOutput.class_logits` [batch, labels]."""

  config: ml_collections.FrozenConfigDict
  num_labels: int
  pooling: str

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    pooled = pool(x, segment_ids, self.pooling)  # [batch, embed] float32
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(
            nn.initializers.normal(stddev=self.config.embed_dim ** -0.5), ('embed', None)),
        (self.config.embed_dim, self.num_labels), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                      (self.num_labels,), jnp.float32)
    return pooled @ kernel + bias


def _classifier_class(decoder: type[nn.Module], num_labels: int,
                      pooling: str) -> type[nn.Module]:
  """`decoder` with the label head in place of the language-model head."""

  class Classifier(decoder):  # pylint: disable=missing-class-docstring

    def output_head(self, x, embed, features_only, segment_ids=None):
      del embed, features_only  # No vocabulary projection.
      x = norms.make_norm(self.config, 'final_norm')(x)
      logits = ClassifierHead(self.config, num_labels, pooling, name=HEAD)(x, segment_ids)
      return transformer.DecoderOutput(class_logits=logits)

  Classifier.__name__ = f'{decoder.__name__}Classifier'
  return Classifier


def freezes_base(config: ml_collections.ConfigDict) -> bool:
  """Whether the base gets no updates: adapters on a frozen base (any task), or a
  classifier's linear probe (`classification.freeze_base`: only the head trains)."""
  probe = config.get('task') == 'classification' and config.classification.freeze_base
  return bool(probe) or lora.trains_only_adapters(config.model)


def make_classifier(config: ml_collections.ConfigDict, num_labels: int) -> nn.Module:
  """The classifier for an experiment `config` (`config.model`, `config.classification`)
  with `num_labels` outputs; with `freezes_base` the decoder's params get no gradients."""
  model_config = ml_collections.FrozenConfigDict(config.model)
  decoder = build.decoder_class(model_config)
  classifier = _classifier_class(decoder, num_labels, config.classification.pooling)
  if freezes_base(config):
    classifier = lora.frozen_base(classifier)
  return classifier(config=model_config)
