"""Train and eval metric collections (clu.metrics), accumulated on device."""

from typing import Any

import flax
from clu import metrics
import jax.numpy as jnp


@flax.struct.dataclass
class Sum(metrics.Average):
  """Sum of the values over all steps (Average keeps the sum; report it, not the mean)."""

  def compute(self) -> Any:
    return self.total


def _finite_steps(name):
  # A skipped non-finite step must not turn the interval's average into NaN.
  def fun(finite, **outputs):
    return dict(values=outputs[name][None], mask=finite[None])
  return fun


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Per-step scalars of the train step, averaged over a logging interval."""
  loss: metrics.Average.from_fun(_finite_steps('loss'))
  grad_norm: metrics.Average.from_fun(_finite_steps('grad_norm'))
  param_norm: metrics.LastValue.from_output('param_norm')
  nonfinite_steps: Sum.from_fun(lambda finite, **_: (~finite).astype(jnp.float32)[None])


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  """Token-level validation metrics; `mask` marks the predicted tokens."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('correct')
