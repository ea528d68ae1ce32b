"""Train and eval metric collections (clu.metrics), accumulated on device."""

from typing import Any

import flax
from clu import metrics
import jax
import jax.numpy as jnp
import numpy as np


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
class MoeAverage(metrics.Metric):
  """Per-step average of each model metric: MoE router losses and loads
  (`moe.aux_loss_and_metrics`), memory bank use (`memory.bank.metrics`); empty when the
  model has neither.

  Steps with `finite` False (skipped non-finite steps) are left out, as for the loss.
  """
  totals: dict[str, jax.Array]
  count: jax.Array

  @classmethod
  def from_model_output(cls, moe=None, finite=None, **_) -> 'MoeAverage':
    ok = jnp.ones((), bool) if finite is None else finite
    totals = {k: jnp.where(ok, v.astype(jnp.float32), 0.0) for k, v in (moe or {}).items()}
    return cls(totals=totals, count=ok.astype(jnp.float32))

  def merge(self, other: 'MoeAverage') -> 'MoeAverage':
    return type(self)(totals=jax.tree_util.tree_map(jnp.add, self.totals, other.totals),
                      count=self.count + other.count)

  def compute(self) -> dict[str, jax.Array]:
    return {k: v / jnp.maximum(self.count, 1.0) for k, v in self.totals.items()}


def moe_scalars(split: str, values: dict[str, Any]) -> dict[str, float]:
  """TensorBoard scalars from a computed `MoeAverage` of split 'train' or 'eval'.

  Layer means go to '<split>/<name>' (e.g. 'train/aux_loss'); per-layer values to
  'moe/layer_<i>/<name>' for train and 'moe_eval/layer_<i>/<name>' for eval, with the
  expert-fraction vector as one scalar per expert ('.../expert_<e>_fraction').
  """
  group = 'moe' if split == 'train' else f'moe_{split}'
  out = {}
  for name, value in values.items():
    value = np.asarray(value)
    if '/' not in name:
      out[f'{split}/{name}'] = float(value)
    elif name.endswith('/expert_fraction'):
      layer = name.rsplit('/', 1)[0]
      out.update({f'{group}/{layer}/expert_{e}_fraction': float(v)
                  for e, v in enumerate(value)})
    else:
      out[f'{group}/{name}'] = float(value)
  return out


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Per-step scalars of the train step, averaged over a logging interval."""
  loss: metrics.Average.from_fun(_finite_steps('loss'))
  grad_norm: metrics.Average.from_fun(_finite_steps('grad_norm'))
  param_norm: metrics.LastValue.from_output('param_norm')
  nonfinite_steps: Sum.from_fun(lambda finite, **_: (~finite).astype(jnp.float32)[None])
  moe: MoeAverage  # MoE router losses and loads, memory bank use; see `moe_scalars`.


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  """Token-level validation metrics; `mask` marks the predicted tokens."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('correct')
  moe: MoeAverage  # Router losses and expert loads of a MoE model (per batch).


def to_json(collection: metrics.Collection) -> dict[str, Any]:
  """A metrics collection (e.g. `TrainMetrics` accumulated so far) as JSON-able lists,
  keyed by each array's path, so that a checkpoint can carry it across a restart."""
  return {jax.tree_util.keystr(path): np.asarray(x).tolist()
          for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(collection))}


def from_json(like: metrics.Collection, saved: dict[str, Any]) -> metrics.Collection:
  """`to_json`'s output as a collection of `like`'s structure, shapes and dtypes."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.asarray(saved[jax.tree_util.keystr(path)], x.dtype).reshape(x.shape)
      for path, x in leaves])
