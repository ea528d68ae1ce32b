"""The jitted train and eval steps, and the next-token loss they share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xenith.metrics import EvalMetrics, TrainMetrics
from xenith.train_state import TrainState


def next_token_losses(logits: jax.Array, inputs: jax.Array, segment_ids: jax.Array):
  """Per-token cross-entropy of predicting inputs[t+1] from positions <= t.

  logits: [batch, seq, vocab]; inputs, segment_ids: [batch, seq].
  Returns (nll, correct, weights), each [batch, seq - 1]; weights are 1 where t and t+1
  belong to the same (non-padding) packed document.
  """
  targets = inputs[:, 1:]
  weights = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
  logits = logits[:, :-1].astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
  correct = jnp.argmax(logits, axis=-1) == targets
  return nll, correct, weights.astype(jnp.float32)


def _model_inputs(batch):
  return dict(segment_ids=batch['segment_ids'], positions=batch['positions'])


def make_loss_fn(model: nn.Module):
  """Returns loss_fn(params, batch, dropout_key) -> mean next-token loss (training mode)."""

  def loss_fn(params, batch: dict, dropout_key: jax.Array) -> jax.Array:
    logits = model.apply({'params': params}, batch['inputs'], **_model_inputs(batch),
                         deterministic=False, rngs={'dropout': dropout_key})
    nll, _, weights = next_token_losses(logits, batch['inputs'], batch['segment_ids'])
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)

  return loss_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, skip_nonfinite: bool):
  """Returns train_step(state, batch, dropout_key) -> (state, TrainMetrics)."""
  loss_fn = make_loss_fn(model)

  def train_step(state: TrainState, batch: dict, dropout_key: jax.Array):
    key = jax.random.fold_in(dropout_key, state.step)  # Same key on resume.
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # Keep the old params and optimizer state; only the step advances.
      new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                         new_state, state.replace(step=new_state.step))
    metrics = TrainMetrics.single_from_model_output(
        loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
        finite=finite)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module):
  """Returns eval_step(params, batch) -> EvalMetrics over the batch's predicted tokens."""

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['inputs'], **_model_inputs(batch))
    nll, correct, weights = next_token_losses(logits, batch['inputs'], batch['segment_ids'])
    return EvalMetrics.single_from_model_output(loss=nll, correct=correct, mask=weights)

  return eval_step
