"""Orbax checkpoints of the train state plus the data iterator's position."""

import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from xenith.train_state import TrainState


class Checkpointer:
  """Saves asynchronously, keeps the newest `keep`, restores state and iterator together."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator) -> None:
    """Starts an async save; returns once the arrays are copied off the devices."""
    # The iterator position is taken now, synchronously, so it matches `state` exactly.
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_iterator.get_state())), force=True)
    logging.info('Saving checkpoint for step %d to %s', step, self.directory)

  def restore(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
    """Restores `step` into `abstract_state`'s shardings and rewinds `data_iterator`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    data_iterator.set_state(restored['data'])
    logging.info('Restored checkpoint for step %d from %s', step, self.directory)
    return restored['state']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state) -> TrainState:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
