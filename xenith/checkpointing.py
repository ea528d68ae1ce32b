"""Orbax checkpoints of the train state plus the data iterator's position."""

import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from xenith.train_state import TrainState


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint does not fit the config (another model, another workdir?)."""


class Checkpointer:
  """Saves asynchronously, keeps the newest `keep`, restores state and iterator together."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator) -> None:
    """Starts an async save; returns once the arrays are copied off the devices."""
    # The iterator position is taken now, synchronously, so it matches `state` exactly.
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_iterator.get_state())), force=True)
    logging.info('Saving checkpoint for step %d to %s', step, self.directory)

  def _check_fits(self, step: int, abstract_state: TrainState) -> None:
    """Compares saved and expected param shapes from metadata, before reading any array."""
    saved = self._manager.item_metadata(step)['state']['params']
    saved = {jax.tree_util.keystr(p): tuple(m.shape)
             for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    wanted = {jax.tree_util.keystr(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(abstract_state.params)}
    if saved == wanted:
      return
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing or extra:
      reason = f'params missing from it: {missing[:3]}; params only in it: {extra[:3]}'
    else:
      name = next(k for k in wanted if wanted[k] != saved[k])
      reason = f'params{name} has shape {saved[name]} there, {wanted[name]} here'
    raise CheckpointMismatchError(
        f'The checkpoint at step {step} in {self.directory} does not match this config '
        f'({reason}). Use a new --workdir for a different model; the checkpoint was left '
        'untouched.')

  def restore(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
    """Restores `step` into `abstract_state`'s shardings and rewinds `data_iterator`."""
    self._check_fits(step, abstract_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore()))
    except ValueError as e:  # Orbax: shapes or tree structure differ from the config's.
      reason = str(e).splitlines()[0]
      raise CheckpointMismatchError(
          f'The checkpoint at step {step} in {self.directory} does not match this '
          f'config ({reason}). Use a new --workdir for a different model; the '
          'checkpoint was left untouched.') from e
    data_iterator.set_state(restored['data'])
    logging.info('Restored checkpoint for step %d from %s', step, self.directory)
    return restored['state']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight (never abandon one), then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

