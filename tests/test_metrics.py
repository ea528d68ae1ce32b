"""Metric aggregation (xenith/train/metrics.py and the loop's evaluation) against hand sums.

- Evaluation over several batches is one token-weighted mean of all their predicted
  tokens (not a mean of batch means), as `train._evaluate` merges it.
- A logging interval's train metrics: the mean loss and gradient norm of its finite steps,
  the last param norm, the count of non-finite steps, MoE metrics over finite steps.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import default
from xenith.train import metrics
from xenith import sharding
from xenith.train import steps
from xenith.train import loop as train
from xenith.model.build import make_model

VOCAB = 64


def _batches():
  """Two eval batches of 8 rows with very different numbers of predicted tokens."""
  rng = np.random.default_rng(0)
  out = []
  for length in (30, 5):  # Tokens of the one document in each row; padding after it.
    inputs = rng.integers(1, VOCAB, (8, 32)).astype(np.int32)
    segments = np.zeros((8, 32), np.int32)
    segments[:, :length] = 1
    positions = np.where(segments > 0, np.arange(32), 0).astype(np.int32)
    out.append({'inputs': np.where(segments > 0, inputs, 0), 'segment_ids': segments,
                'positions': positions})
  return out


def test_evaluation_over_batches_is_one_token_weighted_mean():
  config = default.get_config('size=tiny')
  config.model.vocab_size = VOCAB
  model = make_model(config.model)
  batches = _batches()
  params = jax.tree.map(lambda x: 3 * getattr(x, 'value', x),
                        model.init(jax.random.key(0), batches[0]['inputs'])['params'],
                        is_leaf=lambda x: hasattr(x, 'value'))
  # By hand: every predicted token's NLL and correctness, summed over both batches.
  nll_sum = correct_sum = count = 0.0
  for b in batches:
    logits = np.asarray(model.apply({'params': params}, b['inputs'],
                                    segment_ids=b['segment_ids'],
                                    positions=b['positions']), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    for row in range(8):
      length = int(b['segment_ids'][row].sum())
      for t in range(length - 1):  # Position t predicts token t + 1 of the document.
        target = b['inputs'][row, t + 1]
        nll_sum -= log_probs[row, t, target]
        correct_sum += logits[row, t].argmax() == target
        count += 1

  mesh = sharding.create_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  datasets = types.SimpleNamespace(eval_batches=lambda n: iter(batches[:n]))
  with jax.set_mesh(mesh):
    result = train._evaluate(jax.jit(steps.make_eval_step(model)), params, datasets, 2,
                             sharding.batch_sharding(mesh, rules))
  assert result['eval/loss'] == pytest.approx(nll_sum / count, rel=1e-5)
  assert result['eval/accuracy'] == pytest.approx(correct_sum / count, rel=1e-6)
  assert result['eval/perplexity'] == pytest.approx(np.exp(nll_sum / count), rel=1e-5)


def test_a_logging_interval_averages_its_finite_steps():
  # (loss, grad_norm, param_norm, finite, moe aux_loss) per step of one interval.
  steps_ = [(2.0, 1.0, 10.0, True, 0.5), (np.nan, np.inf, 11.0, False, np.nan),
            (4.0, 3.0, 12.0, True, 0.25), (3.0, 8.0, 13.0, True, 0.75)]
  total = None
  for loss, grad_norm, param_norm, finite, aux in steps_:
    m = metrics.TrainMetrics.single_from_model_output(
        loss=jnp.float32(loss), grad_norm=jnp.float32(grad_norm),
        param_norm=jnp.float32(param_norm), finite=jnp.bool_(finite),
        moe={'aux_loss': jnp.float32(aux)})
    total = m if total is None else total.merge(m)
  result = jax.device_get(total.compute())
  assert result['loss'] == pytest.approx((2.0 + 4.0 + 3.0) / 3)
  assert result['grad_norm'] == pytest.approx((1.0 + 3.0 + 8.0) / 3)
  assert result['param_norm'] == 13.0  # The last step's.
  assert result['nonfinite_steps'] == 1
  assert result['moe']['aux_loss'] == pytest.approx((0.5 + 0.25 + 0.75) / 3)
