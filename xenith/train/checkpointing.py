"""Orbax checkpoints of the train state plus the data iterator's position."""

import os
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from xenith.errors import CheckpointMismatchError
from xenith.model import build
from xenith.model import lora
from xenith.model import memory
from xenith.train.train_state import TrainState


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



def params_dir(path: str) -> str:
  """The Orbax item holding `{'params': ...}` that `path` names.

  `path` is a workdir, its `checkpoints/` (the newest step is used), one step of it, or
  an item written by `save_params` (e.g. merged LoRA params).
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  if steps:  # Only committed saves have a plain number for a name.
    path = os.path.join(path, str(max(steps)))
  if os.path.isdir(os.path.join(path, 'state')):
    path = os.path.join(path, 'state')
  if not os.path.isfile(os.path.join(path, '_METADATA')):
    raise CheckpointMismatchError(
        f'{path} holds no checkpoint (expected a workdir, its checkpoints/ folder, a step '
        'folder or saved params).')
  return path


def _is_adapter_key(key: tuple[str, ...]) -> bool:
  return any(lora.is_adapter_name(k) for k in key)


def _saved_shapes(item: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  saved = ocp.StandardCheckpointHandler().metadata(epath.Path(item))['params']
  return {k: tuple(m.shape) for k, m in traverse_util.flatten_dict(saved).items()}


def _difference(saved, wanted) -> str | None:
  """The first difference of two {key: shape} dicts, in words; None if equal."""
  if saved == wanted:
    return None
  name = lambda k: '/'.join(k)
  missing = sorted(name(k) for k in wanted.keys() - saved.keys())
  extra = sorted(name(k) for k in saved.keys() - wanted.keys())
  if missing or extra:
    return '; '.join(f'{what}: {names[:3]}' for what, names in (
        ('params missing from it', missing), ('params only in it', extra)) if names)
  key = next(k for k in wanted if wanted[k] != saved[k])
  return f'{name(key)} has shape {saved[key]} there, {wanted[key]} here'


def _restore(item: str, flat_like: dict[tuple[str, ...], jax.Array]) -> dict:
  """Reads only the params in `flat_like` (flat dict) into their shapes and shardings."""
  abstract = {'params': traverse_util.unflatten_dict({
      k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      for k, x in flat_like.items()})}
  restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  return traverse_util.flatten_dict(restored['params'])


def load_params(path: str, params_like: dict[str, Any]) -> dict[str, Any]:
  """The params saved at `path` (see `params_dir`), shaped and sharded like `params_like`
  (arrays or `jax.ShapeDtypeStruct`s with shardings); nothing else is read."""
  item = params_dir(path)
  flat = traverse_util.flatten_dict(params_like)
  reason = _difference(_saved_shapes(item), {k: tuple(x.shape) for k, x in flat.items()})
  if reason:
    raise CheckpointMismatchError(f'{item} does not match this config ({reason}).')
  return traverse_util.unflatten_dict(_restore(item, flat))


def load_model(model_config, path: str) -> tuple[nn.Module, dict[str, Any]]:
  """(`build.make_model(model_config)`, the params saved at `path` (see `params_dir`)),
  for generating from or evaluating a trained run."""
  item = params_dir(path)  # Fails before the model is built when there is no checkpoint.
  model = build.make_model(model_config)
  length = model_config.memory.chunk_size if memory.enabled(model_config) else 8
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, length), jnp.int32))
  return model, load_params(item, nn.unbox(params)['params'])


def load_base_params(path: str, params: dict[str, Any]) -> dict[str, Any]:
  """`params` with every base (non-LoRA) param replaced by the checkpoint's at `path`.

  For starting a run from a trained model (`config.init_from_checkpoint`): LoRA
  adapters keep their fresh values, optimizer state and step are not read, arrays are
  restored into the shardings of `params`. Raises CheckpointMismatchError, naming the
  first difference, unless the checkpoint has exactly the base params at the same shapes.
  """
  item = params_dir(path)
  saved = _saved_shapes(item)
  flat = traverse_util.flatten_dict(params)
  base = {k: x for k, x in flat.items() if not _is_adapter_key(k)}
  adapters = sorted('/'.join(k) for k in saved if _is_adapter_key(k))
  if adapters:
    reason = (f'it has LoRA adapters ({adapters[0]}, ...); merge them into the base first '
              'with launch/merge_lora.py')
  else:
    reason = _difference(saved, {k: tuple(x.shape) for k, x in base.items()})
  if reason:
    raise CheckpointMismatchError(
        f'Cannot initialise from {item}: it does not match this config ({reason}).')
  flat.update(_restore(item, base))
  logging.info('Initialised %d base params from %s', len(base), item)
  return traverse_util.unflatten_dict(flat)


def save_params(path: str, params: Any) -> None:
  """Writes `{'params': params}` as an Orbax item that `load_base_params` reads."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), {'params': params})
