"""The jitted train step (xenith/train/steps.py) against one optax update done by hand.

A step computes the loss and its gradient, applies the optimizer's update, advances the
step counter and reports the loss, the gradient norm before clipping and the new params'
norm; a non-finite step under `on_nonfinite='skip'` keeps params and optimizer state but
still advances and is counted; dropout draws depend on the step, so a resumed step
repeats exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import default
from xenith.train import optimizer
from xenith.train import steps
from xenith.model.build import make_model
from xenith.train.train_state import TrainState
from helpers import two_document_batch


DROPOUT = 0.3  # One model for every test (one compile per step variant); the hand update
# below draws the same dropout masks as the step (the key folded with step 0).


@functools.cache
def _setup(dropout_rate=DROPOUT):
  config = default.get_config('size=tiny')
  config.model.vocab_size = 64
  config.model.dropout_rate = dropout_rate
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.5  # Below the gradient's norm: clipping acts.
  model = make_model(config.model)
  batch = two_document_batch(10, 6, vocab=64)
  params = jax.tree.map(lambda x: getattr(x, 'value', x),
                        jax.jit(model.init)(jax.random.key(0), batch['inputs'])['params'],
                        is_leaf=lambda x: hasattr(x, 'value'))
  tx = optimizer.create_optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return model, tx, state, batch


def _step(skip_nonfinite=False):
  return _compiled_step(bool(skip_nonfinite))


@functools.cache
def _compiled_step(skip_nonfinite):
  model, tx, _, _ = _setup()
  return jax.jit(steps.make_train_step(model, tx, skip_nonfinite=skip_nonfinite))


def test_a_step_applies_one_optimizer_update_and_counts_it():
  model, tx, state, batch = _setup()
  key = jax.random.key(7)
  loss, grads = jax.jit(jax.value_and_grad(steps.make_loss_fn(model)))(
      state.params, batch, jax.random.fold_in(key, 0))
  updates, opt_state = jax.jit(tx.update)(grads, state.opt_state, state.params)
  want_params = optax.apply_updates(state.params, updates)

  new_state, metrics = _step()(state, batch, key)
  out = jax.device_get(metrics.compute())
  assert int(new_state.step) == 1
  # Adam's first step is about lr * sign(g) = 3e-3 per weight; float noise in tiny
  # gradients moves it by far less than that.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               new_state.params, want_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8),
               new_state.opt_state, opt_state)
  np.testing.assert_allclose(out['loss'], loss, rtol=1e-6)
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  assert norm > 0.5  # The clip acted, yet the metric is the norm before clipping.
  np.testing.assert_allclose(out['grad_norm'], norm, rtol=1e-5)
  np.testing.assert_allclose(out['param_norm'], np.sqrt(sum(
      np.sum(np.square(p)) for p in jax.tree.leaves(want_params))), rtol=1e-5)
  assert out['nonfinite_steps'] == 0
  again, _ = _step()(new_state, batch, key)
  assert int(again.step) == 2


@pytest.mark.parametrize('skip', [True, False])
def test_a_nonfinite_step_is_counted_and_skipped_only_when_asked(skip):
  _, _, state, batch = _setup()
  bad = jax.tree.map(lambda x: x, state.params)
  bad['final_norm']['scale'] = bad['final_norm']['scale'].at[0].set(jnp.nan)
  state = state.replace(params=bad)
  new_state, metrics = _step(skip_nonfinite=skip)(state, batch, jax.random.key(7))
  out = jax.device_get(metrics.compute())
  assert int(new_state.step) == 1 and out['nonfinite_steps'] == 1
  if skip:  # The old params and optimizer state, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, state.opt_state)
  else:
    assert not np.isfinite(np.asarray(new_state.params['embed']['embedding'])).all()


def test_dropout_draws_depend_on_the_step_so_a_resumed_step_repeats():
  _, _, state, batch = _setup()
  step = _step()
  key = jax.random.key(7)
  at = lambda n: jax.device_get(step(state.replace(step=jnp.int32(n)), batch, key)[1]
                                .compute()['loss'])
  assert at(5) == at(5)  # The same step from the same state: the same draws.
  assert at(5) != at(6)  # Another step: other draws.
