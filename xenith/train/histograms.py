"""Histograms of the params and of the gradients, every `config.log_histograms_every_steps`.

The train step does not return gradients (that would keep a params-sized tree alive on
every step); at a histogram step a separate jitted function computes them from the
step's batch and the params before the update, with the step's dropout key: the
gradient that step applied (before clipping). Tags: `params/<path>`, `grads/<path>`,
one per param leaf; the params are those after the step.
"""

import jax
from jax.experimental import multihost_utils
import numpy as np

from xenith import sharding
from xenith.train import classification
from xenith.train import steps

NUM_BUCKETS = 30  # Per histogram (TensorBoard's default).


def _tags(prefix: str, tree) -> dict[str, np.ndarray]:
  # Every process gathers (params may be sharded across hosts); process 0 writes.
  leaves = jax.tree_util.tree_leaves_with_path(multihost_utils.process_allgather(tree))
  return {prefix + '/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
          for path, leaf in leaves}


class HistogramWriter:
  """`grads(step, state, batch, dropout_key)` before the step, `write(...)` after it."""

  def __init__(self, config, model, mesh, state_shardings, batch_sharding):
    self._every = config.get('log_histograms_every_steps', 0)
    if not self._every:
      return
    make = (classification.make_loss_fn if config.get('task') == 'classification'
            else steps.make_loss_fn)
    loss_fn = make(model, with_aux=True)

    def grads(params, batch, dropout_key, step):
      key = jax.random.fold_in(dropout_key, step)  # The key the train step folds in.
      return jax.grad(lambda p: loss_fn(p, batch, key)[0])(params)

    replicated = sharding.replicated(mesh)
    self._grad_fn = jax.jit(grads, in_shardings=(state_shardings.params, batch_sharding,
                                                 replicated, replicated),
                            out_shardings=state_shardings.params)
    self._pending = None

  def due(self, step: int) -> bool:
    return bool(self._every) and step % self._every == 0

  def grads(self, step: int, state, batch, dropout_key) -> None:
    """Call before train step `step` (the state is donated to it)."""
    if self.due(step):
      self._pending = self._grad_fn(state.params, batch, dropout_key, state.step)

  def write(self, writer, step: int, state) -> None:
    """Call after train step `step`."""
    if not self.due(step):
      return
    arrays = {**_tags('params/', state.params), **_tags('grads/', self._pending)}
    self._pending = None
    writer.write_histograms(step, arrays,
                            num_buckets={tag: NUM_BUCKETS for tag in arrays})
