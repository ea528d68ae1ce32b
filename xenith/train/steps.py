"""The jitted train and eval steps, and the next-token loss they share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xenith import sharding
from xenith.train.metrics import EvalMetrics, TrainMetrics
from xenith.model import chunked_loss
from xenith.model import lora
from xenith.model import memory
from xenith.model import moe
from xenith.model.memory import bank
from xenith.train.train_state import TrainState


def next_token_targets(inputs: jax.Array, segment_ids: jax.Array):
  """What each position predicts: the next token of its document.

  inputs, segment_ids: [batch, seq]. Returns (targets int32, weights float32), each
  [batch, seq]: targets[t] = inputs[t + 1]; weights are 1 where t and t + 1 belong to
  the same (non-padding) packed document, else 0 (always 0 at the last position).
  """
  targets = jnp.pad(inputs[:, 1:], ((0, 0), (0, 1)))
  next_segment = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
  weights = (next_segment == segment_ids) & (segment_ids > 0)
  return targets.astype(jnp.int32), weights.astype(jnp.float32)


def next_token_losses(logits: jax.Array, inputs: jax.Array, segment_ids: jax.Array):
  """Per-position cross-entropy of the next token from full logits.

  logits: [batch, seq, vocab]; inputs, segment_ids: [batch, seq].
  Returns (nll, correct, weights), each [batch, seq] (see `next_token_targets`).
  """
  targets, weights = next_token_targets(inputs, segment_ids)
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
  correct = jnp.argmax(logits, axis=-1) == targets
  return nll, correct, weights


def _model_inputs(batch):
  inputs = dict(segment_ids=batch['segment_ids'], positions=batch['positions'])
  if 'languages' in batch:  # Language adapters' ids (language_adapters.py).
    inputs['languages'] = batch['languages']
  return inputs


def loss_chunk_size(model: nn.Module) -> int:
  """Positions per chunk of the fused head + loss (`chunked_loss.py`); 0 = full logits.

  Full logits when `config.loss_chunk_size` is 0 or the head has LoRA dropout (which
  acts on the head's input, so the head cannot be folded into one matrix).
  """
  cfg = model.config
  chunk = cfg.get('loss_chunk_size', 0)
  if chunk and lora.layer_rank(cfg, 'head') and cfg.lora.dropout:
    return 0
  return chunk


def apply_model(model: nn.Module, params, batch: dict, **kwargs):
  """(logits, (hidden, head) with `features_only`, or a classifier's label logits),
  (MoE aux loss or None, model metrics: MoE router losses and loads, memory bank use)."""
  out = model.apply({'params': params}, batch['inputs'], **_model_inputs(batch),
                    method='forward', **kwargs)
  outputs = next(o for o in (out.class_logits, out.logits, out.features) if o is not None)
  aux_loss, model_metrics = None, {}
  if moe.enabled(model.config):
    aux_loss, model_metrics = moe.aux_loss_and_metrics(out.moe_stats)
  if memory.enabled(model.config):
    model_metrics = {**model_metrics, **bank.metrics(out.memory)}
  return outputs, (aux_loss, model_metrics)


def make_loss_fn(model: nn.Module, with_aux: bool = False):
  """Returns loss_fn(params, batch, dropout_key) -> training loss (training mode).

  The loss is the mean next-token loss plus, for a MoE model, the weighted router losses.
  With `with_aux` it returns (loss, (next-token loss, MoE metrics)).
  """
  chunk = loss_chunk_size(model)

  def loss_fn(params, batch: dict, dropout_key: jax.Array):
    outputs, (aux_loss, moe_metrics) = apply_model(
        model, params, batch, deterministic=False, rngs={'dropout': dropout_key},
        features_only=bool(chunk))
    if chunk:
      targets, weights = next_token_targets(batch['inputs'], batch['segment_ids'])
      total = chunked_loss.weighted_cross_entropy(*outputs, targets, weights, chunk)
    else:
      nll, _, weights = next_token_losses(outputs, batch['inputs'], batch['segment_ids'])
      total = (nll * weights).sum()
    lm_loss = total / jnp.maximum(weights.sum(), 1.0)
    loss = lm_loss if aux_loss is None else lm_loss + aux_loss
    return (loss, (lm_loss, moe_metrics)) if with_aux else loss

  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, skip_nonfinite: bool,
                    loss_fn=None):
  """Returns train_step(state, batch, dropout_key) -> (state, TrainMetrics).

  loss_fn: as `make_loss_fn(model, with_aux=True)` returns it (the default), e.g. the
  classifier's (`classification.make_loss_fn`).
  """
  loss_fn = loss_fn or make_loss_fn(model, with_aux=True)

  def train_step(state: TrainState, batch: dict, dropout_key: jax.Array):
    key = jax.random.fold_in(dropout_key, state.step)  # Same key on resume.
    (total, (loss, moe_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    # The updated params too: a finite gradient can still overflow them.
    finite = (jnp.isfinite(total) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.global_norm(new_state.params)))
    if skip_nonfinite:  # Keep the old params and optimizer state; only the step advances.
      new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                         new_state, state.replace(step=new_state.step))
    metrics = TrainMetrics.single_from_model_output(
        loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
        finite=finite, moe=moe_metrics)
    return new_state, metrics

  return train_step


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, config, mesh,
                   state_shardings, batch_sharding, loss_fn=None):
  """`make_train_step` jitted as the train loop runs it: sharded state (donated) and batch,
  replicated key and metrics. `--mode=describe --compile` compiles this same function."""
  replicated = sharding.replicated(mesh)
  return jax.jit(
      make_train_step(model, tx, skip_nonfinite=config.on_nonfinite == 'skip',
                      loss_fn=loss_fn),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(model: nn.Module):
  """Returns eval_step(params, batch) -> EvalMetrics over the batch's predicted tokens.

  For a MoE model the metrics include the router losses and loads (`moe`).
  """

  chunk = loss_chunk_size(model)

  def eval_step(params, batch):
    outputs, (_, moe_metrics) = apply_model(model, params, batch, features_only=bool(chunk))
    if chunk:
      targets, weights = next_token_targets(batch['inputs'], batch['segment_ids'])
      nll, correct = chunked_loss.nll_and_correct(*outputs, targets, chunk)
    else:
      nll, correct, weights = next_token_losses(outputs, batch['inputs'], batch['segment_ids'])
    return EvalMetrics.single_from_model_output(loss=nll, correct=correct, mask=weights,
                                                moe=moe_metrics)

  return eval_step
