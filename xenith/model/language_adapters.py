"""Per-language bottleneck adapters, chosen per token by a language id.

With `config.language_adapters.languages = (name_1, ..., name_L)` every block adds, on
its MLP (or MoE) branch h [batch, seq, embed], one adapter per language (Pfeiffer et al.:
after the feed-forward sublayer, inside its residual):

  h + relu(h @ down_l) @ up_l,  down_l: [embed, b], up_l: [b, embed],

where l is the token's language id from `languages` [batch, seq] int32: 0 = no adapter
(the branch is unchanged), i = the adapter of `languages[i - 1]`. The choice is per
token, so a packed row holding documents of several languages gets each document's own
adapter and a mixed batch computes what each example computes alone. `up` starts at
zero, so a new adapter leaves the model exactly as it was.

The params live beside the block's MLP, `.../language_adapter/{adapter_down,
adapter_up}` ([L, embed, b] and [L, b, embed]; a scanned stack adds its layer axis in
front). Their names are adapter params for `lora.is_adapter`, so a frozen base
(`train_only_adapters`: `lora.frozen_base`, the optimizer's adapter-only updates) and
`init_from_checkpoint` (fresh adapters on a trained base) work as they do for LoRA.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

# Param names (`lora.LANGUAGE_ADAPTER_PARAMS`, which makes them adapter params).
DOWN, UP = 'adapter_down', 'adapter_up'
LANGUAGE_AXIS = 'adapter_languages'  # Logical axis of the languages (replicated).
BOTTLENECK_AXIS = 'adapter_bottleneck'  # Logical axis of the bottleneck (replicated).


def _settings(model_config):
  # Configs built before language adapters existed (or by hand) have no block: off.
  return model_config.get('language_adapters') if hasattr(model_config, 'get') else None


def enabled(model_config: ml_collections.ConfigDict) -> bool:
  """Whether the model has language adapters (a non-empty `languages` list)."""
  settings = _settings(model_config)
  return bool(settings and settings.languages)


class LanguageAdapter(nn.Module):
  """The per-language adapters of one block (module docstring)."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, languages: jax.Array | None) -> jax.Array:
    """x: [batch, seq, embed]; languages: [batch, seq] int32 or None (= all 0).

    The params are created whether or not `languages` is given (init needs no ids).
    """
    cfg = self.config
    num, dim = len(cfg.language_adapters.languages), cfg.language_adapters.bottleneck_dim
    # Fan-in per language (the language axis is a batch axis), as the kernels beside it.
    init = nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal', in_axis=1, out_axis=2, batch_axis=(0,))
    down = self.param(DOWN, nn.with_logical_partitioning(
        init, (LANGUAGE_AXIS, 'embed', BOTTLENECK_AXIS)), (num, cfg.embed_dim, dim),
                      jnp.float32)
    up = self.param(UP, nn.with_logical_partitioning(
        nn.initializers.zeros, (LANGUAGE_AXIS, BOTTLENECK_AXIS, 'embed')),
                    (num, dim, cfg.embed_dim), jnp.float32)
    if languages is None:
      return x
    if languages.shape != x.shape[:2]:
      raise ValueError(f'languages has shape {languages.shape}; the tokens are '
                       f'{x.shape[:2]}.')
    # Every language's bottleneck, then the token's own kept (one-hot of id - 1: id 0 and
    # the others give exact zeros): a few small matmuls instead of a gather of weights.
    select = jax.nn.one_hot(languages - 1, num, dtype=x.dtype)  # [batch, seq, L]
    hidden = jnp.einsum('bse,lef->bslf', x, down.astype(x.dtype))  # [batch, seq, L, b]
    hidden = jax.nn.relu(hidden) * select[..., None]
    return x + jnp.einsum('bslf,lfe->bse', hidden, up.astype(x.dtype)).astype(x.dtype)
