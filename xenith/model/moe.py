"""Mixture-of-Experts feed-forward layer: router, routed SwiGLU experts, shared expert.

`config.model.moe` (see xenith/config_defaults.py) configures it. A `MoeBlock` returns its
output and a dict of router statistics; the decoder returns those of all MoE layers in
its output's `moe_stats` (`Decoder.forward`; a return value rather than a mutable collection,
so the model also applies under LoRA's `nn.map_variables`), and `aux_loss_and_metrics`
turns them into the auxiliary loss added to the training loss and the metrics written
to TensorBoard.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import layers
from xenith.model import lora
from xenith.model import mlp
from xenith.model import moe_dispatch

# Per-layer statistics averaged over the MoE layers into the run-level metrics.
_LAYER_MEANS = ('aux_loss', 'load_balance_loss', 'router_z_loss', 'router_entropy',
                'dropped_fraction')


def enabled(config: ml_collections.FrozenConfigDict) -> bool:
  """Whether `config` (a model config) has MoE layers."""
  return 'moe' in config and config.moe.num_experts > 0


def is_moe_layer(config: ml_collections.FrozenConfigDict, layer: int) -> bool:
  """After the first `first_dense_layers`, every `moe_every`-th layer (the last of each group)."""
  if not enabled(config):
    return False
  offset = layer - config.moe.first_dense_layers
  return offset >= 0 and (offset + 1) % config.moe.moe_every == 0


def expert_mlp_dim(config: ml_collections.FrozenConfigDict) -> int:
  return config.moe.expert_mlp_dim or config.mlp_dim


class Experts(nn.Module):
  """E SwiGLU experts: gate, up [exp, embed, mlp] and down [exp, mlp, embed].

  With the LoRA target 'experts' (rank r = `lora.layer_rank(cfg, 'experts')`) each weight
  `<w>` gets per-expert adapters `<w>_lora_a` [exp, in, r] (initialised like `<w>`) and
  `<w>_lora_b` [exp, r, out] (zeros), and the experts compute with `<w> + alpha / r * A @ B`
  (see lora.py).
  """

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x, expert_index, weights):
    """x: [tokens, embed]; expert_index, weights: [tokens, k] -> (y, kept).

    See `moe_dispatch.dispatch`; kept: [tokens, k] is False for dropped assignments.
    """
    cfg = self.config
    num_experts, embed, hidden = cfg.moe.num_experts, cfg.embed_dim, expert_mlp_dim(cfg)
    # Fan-in per expert: the expert axis is a batch axis of the initializer.
    init = nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal', in_axis=1, out_axis=2, batch_axis=(0,))

    rank = lora.layer_rank(cfg, 'experts')
    dtype = layers.compute_dtype(cfg)

    def param(name, shape, names):
      """The weight `name` in the compute dtype, with its adapter folded in if any."""
      w = self.param(name, nn.with_logical_partitioning(init, names), shape,
                     layers.PARAM_DTYPE)
      if not rank:
        return w.astype(dtype)
      # A like the weight (fan-in per expert); B = 0: a fresh adapter changes nothing.
      a = self.param(
          f'{name}_lora_a',
          nn.with_logical_partitioning(init, names[:2] + (lora.RANK_AXIS,)),
          shape[:2] + (rank,), layers.PARAM_DTYPE)
      b = self.param(
          f'{name}_lora_b',
          nn.with_logical_partitioning(nn.initializers.zeros,
                                       (names[0], lora.RANK_AXIS, names[2])),
          (shape[0], rank, shape[2]), layers.PARAM_DTYPE)
      return lora.adapted_weight(w, a, b, lora.scale(cfg, 'experts'), dtype)

    gate = param('gate', (num_experts, embed, hidden), ('exp', 'embed', 'mlp'))
    up = param('up', (num_experts, embed, hidden), ('exp', 'embed', 'mlp'))
    down = param('down', (num_experts, hidden, embed), ('exp', 'mlp', 'embed'))
    return moe_dispatch.dispatch(
        cfg.moe.dispatch, x.astype(dtype), expert_index, weights, gate, up, down,
        capacity_factor=cfg.moe.capacity_factor, block_size=cfg.moe.block_size)


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """Top-k routing. logits: [tokens, experts] -> (expert_index, weights), each [tokens, k].

  weights are the softmax probabilities of the chosen experts, renormalised to sum to 1
  when `normalize` (Mixtral), else as they are (Switch, DeepSeek-V2).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  weights, expert_index = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return expert_index, weights


def router_stats(logits, expert_index, kept, valid) -> dict[str, jax.Array]:
  """Router losses and load statistics over the valid (non-padding) tokens.

  logits: [tokens, experts] float32; expert_index, kept: [tokens, k]; valid: [tokens].
  - load_balance_loss: Switch Transformer's E * sum_e f_e * P_e, f_e the fraction of
    top-k assignments (before any drop) to expert e, P_e its mean router probability;
    1 when both are uniform.
  - router_z_loss: ST-MoE's mean squared log-partition function of the logits.
  - router_entropy: mean entropy of the per-token router distribution (nats).
  - expert_fraction [experts]: f_e; max/min_load_ratio: max/min of E * f_e (1 = balanced).
  - dropped_fraction: share of assignments dropped by capacity limits.
  """
  num_experts = logits.shape[-1]
  k = expert_index.shape[-1]
  valid_f = valid.astype(jnp.float32)
  num_valid = jnp.maximum(valid_f.sum(), 1.0)
  mean = lambda v: jnp.sum(v * valid_f) / num_valid  # v: [tokens]
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  assigned = jax.nn.one_hot(expert_index, num_experts).sum(axis=1)  # [tokens, experts]
  fraction = jnp.einsum('te,t->e', assigned, valid_f) / (num_valid * k)
  mean_probs = jnp.einsum('te,t->e', probs, valid_f) / num_valid
  dropped = (~kept & valid[:, None]).astype(jnp.float32).sum() / (num_valid * k)
  load = jax.lax.stop_gradient(fraction) * num_experts
  return {
      'load_balance_loss': num_experts * jnp.sum(fraction * mean_probs),
      'router_z_loss': mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
      'router_entropy': mean(-jnp.sum(probs * log_probs, axis=-1)),
      'expert_fraction': jax.lax.stop_gradient(fraction),
      'max_load_ratio': load.max(),
      'min_load_ratio': load.min(),
      'dropped_fraction': dropped,
  }


class MoeBlock(nn.Module):
  """Routed experts plus optional shared experts, in place of the dense `Mlp`."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None):
    """x: [batch, seq, embed]; segment_ids: [batch, seq] (0 = padding) or None.

    Returns (y [batch, seq, embed], stats): stats as in `router_stats`, plus
    'aux_loss', the weighted router losses this layer adds to the training loss.
    Padding tokens are not routed (no expert output, no share of any statistic).
    """
    cfg, moe = self.config, self.config.moe
    batch, seq, embed = x.shape
    tokens = x.reshape(batch * seq, embed)
    valid = (jnp.ones((batch * seq,), bool) if segment_ids is None
             else segment_ids.reshape(-1) > 0)

    # The router runs in float32: its softmax and z-loss are sensitive to rounding.
    logits = layers.DenseGeneral(moe.num_experts, ('embed', None), dtype=jnp.float32,
                                 name='router')(tokens)  # [tokens, experts]
    expert_index, weights = route(logits, moe.num_experts_per_token, moe.normalize_top_k)
    expert_index = jnp.where(valid[:, None], expert_index, moe.num_experts)
    weights = jnp.where(valid[:, None], weights, 0.0)
    y, kept = Experts(cfg, name='experts')(tokens, expert_index, weights)
    y = y.reshape(batch, seq, embed)

    if moe.num_shared_experts:
      # k shared experts of width m equal one SwiGLU of width k * m (hidden units concat).
      # A copy: as_configdict() returns the frozen config's own mutable dict.
      shared_cfg = ml_collections.ConfigDict(cfg.to_dict())
      shared_cfg.mlp_dim = moe.num_shared_experts * expert_mlp_dim(cfg)
      y = y + mlp.Mlp(ml_collections.FrozenConfigDict(shared_cfg), name='shared')(x)

    stats = router_stats(logits, expert_index, kept, valid)
    stats['aux_loss'] = (moe.load_balance_loss_weight * stats['load_balance_loss']
                         + moe.router_z_loss_weight * stats['router_z_loss']
                         + moe.router_entropy_loss_weight * stats['router_entropy'])
    return y.astype(x.dtype), stats


def aux_loss_and_metrics(
    per_layer: dict[str, dict[str, jax.Array]],
) -> tuple[jax.Array | None, dict[str, jax.Array]]:
  """From the decoder's `DecoderOutput.moe_stats` {'layer_<i>': stats}.

  Returns (aux_loss: the mean over MoE layers of their weighted router losses, or None
  for a dense model; metrics: layer means under their own names and per-layer values
  under 'layer_<i>/<name>'). expert_fraction stays a [experts] vector.
  """
  if not per_layer:
    return None, {}
  metrics = {name: jnp.mean(jnp.stack([s[name] for s in per_layer.values()]))
             for name in _LAYER_MEANS}
  for layer, stats in per_layer.items():
    for name, value in stats.items():
      if name != 'aux_loss':
        metrics[f'{layer}/{name}'] = jax.lax.stop_gradient(value)
  aux_loss = metrics['aux_loss']
  metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
  return aux_loss, metrics
