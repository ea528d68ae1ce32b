"""Orbax checkpoints of the train state plus the data iterator's position."""

import errno
import json
import os
import signal
import time
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from xenith import distributed
from xenith import storage
from xenith.errors import CheckpointMismatchError
from xenith.errors import CheckpointSaveError
from xenith.errors import WorkdirError
from xenith.model import build
from xenith.model import lora
from xenith.model import memory
from xenith.train import checksum
from xenith.train.train_state import TrainState


# Test-only: a process saving the step named here kills itself (SIGKILL) while the save's
# files are being written, as a preemption at the worst moment would.
KILL_IN_SAVE_ENV = 'XENITH_TEST_KILL_IN_SAVE_AT_STEP'


class _KeepSteps:
  """Orbax preservation policy: keep the steps in `steps` (a set the owner updates)."""

  def __init__(self, steps: set[int]):
    self._steps = steps

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [c.step in self._steps for c in checkpoints]


class Checkpointer:
  """Saves asynchronously, keeps the newest `keep`, restores state and iterator together.

  Each step holds three items: `state` (the `TrainState`), `data` (the iterator's
  position) and `extra` (JSON: the state's checksums, whether the step is `clean`, i.e.
  no update was skipped since the previous save, and the train metrics accumulated
  since the last log). The newest clean step is never deleted, however many steps are
  saved after it. Restore takes the newest step that reads back whole (its checksums
  match); a damaged one is moved to `<workdir>/damaged_checkpoints/`, with a warning.
  """

  def __init__(self, workdir: str, keep: int):
    self.workdir = storage.check_supported(workdir, '--workdir')  # Local or gs://.
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self._protected: set[int] = set()
    self._in_flight: int | None = None  # The step of the async save not yet waited for.
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(keep), _KeepSteps(self._protected)])
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=True, preservation_policy=policy,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._committed))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'extra': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator, *, clean: bool = True,
           notes: dict[str, Any] | None = None) -> None:
    """Starts an async save; returns once the arrays are copied off the devices.

    clean: no update was skipped since the previous save. notes: JSON-able values
    restored with the step (the loop's metrics accumulated since the last log). Raises
    CheckpointSaveError when this save, or the previous one, cannot be written.
    """
    self.wait()  # A failure of the previous save surfaces here, named by its step.
    # The iterator position is taken now, synchronously, so it matches `state` exactly.
    extra = {**(notes or {}), 'checksums': checksum.checksums(state), 'clean': clean}
    self._in_flight = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(_data_state(data_iterator)),
          extra=ocp.args.JsonSave(extra)), force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_error(e) from e
    if clean:
      self._protected.clear()
      self._protected.add(step)
    logging.info('Saving checkpoint for step %d to %s', step, self.directory)
    if os.environ.get(KILL_IN_SAVE_ENV) == str(step):  # Tests: die while it is written.
      os.kill(os.getpid(), signal.SIGKILL)

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes are to save `step` and stop (a SIGTERM reached one of them:
    JAX's preemption sync point, the same step on every process)."""
    return self._manager.reached_preemption(step)

  def _committed(self) -> None:
    logging.info('Checkpoint for step %s committed.', self._in_flight)

  def _save_error(self, error: Exception) -> CheckpointSaveError:
    """`error` of the save in flight as one line: the step, the reason, the path."""
    cause, path = error, self.directory
    while cause is not None:
      if isinstance(cause, OSError):
        path = cause.filename or path
        break
      cause = cause.__cause__ or cause.__context__
    text = str(cause or error)
    if (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or (
        'No space left on device' in str(error)):
      reason = 'no space left on device'
    else:
      reason = (text.strip().splitlines() or [type(error).__name__])[0]
    step, self._in_flight = self._in_flight, None
    return CheckpointSaveError(
        f'checkpoint save of step {step} failed: {reason} ({path}). The older '
        'checkpoints are intact; run the same command again to resume from the newest.')

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

  def restore_latest(self, abstract_state: TrainState,
                     data_iterator) -> tuple[TrainState, dict[str, Any]] | None:
    """The newest step that reads back whole, into `abstract_state`'s shardings, with its
    `extra` item ({} for steps saved before it existed); rewinds `data_iterator`.

    None when there is no checkpoint. A step that cannot be read is moved aside with a
    warning and the next older one is tried; WorkdirError when none is left.
    CheckpointMismatchError (a checkpoint of another model) is raised as it is.
    """
    moved = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, extra = self._restore(step, abstract_state, data_iterator)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = self._move_aside(step)
        logging.warning('Checkpoint step %d cannot be read (%s: %s); moved it to %s and '
                        'trying the next older step.', step, type(e).__name__, reason, where)
        moved.append(f'step {step} ({reason})')
        continue
      if moved:
        self._manager.reload()
      self._protect_newest_clean(step, extra)
      return state, extra
    if moved:
      raise WorkdirError(
          f'No readable checkpoint in {self.directory}: {"; ".join(moved)}. The damaged '
          f'steps are in {os.path.join(self.workdir, "damaged_checkpoints")}; use a new '
          '--workdir to start over.')
    return None

  def _restore(self, step, abstract_state, data_iterator):
    """One step's state and extra item; raises on anything unreadable or changed."""
    self._check_fits(step, abstract_state)
    has_extra = storage.path(os.path.join(self.directory, str(step), 'extra')).is_dir()
    args = {'state': ocp.args.StandardRestore(abstract_state),
            'data': ocp.args.JsonRestore()}
    if has_extra:
      args['extra'] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except ValueError as e:  # Orbax: shapes or tree structure differ from the config's.
      if 'shape' not in str(e) and 'structure' not in str(e):
        raise
      raise CheckpointMismatchError(
          f'The checkpoint at step {step} in {self.directory} does not match this '
          f'config ({str(e).splitlines()[0]}). Use a new --workdir for a different '
          'model; the checkpoint was left untouched.') from e
    extra = restored['extra'] if has_extra else {}
    saved = extra.get('checksums')
    if saved is not None:
      difference = checksum.first_difference(saved, checksum.checksums(restored['state']))
      if difference:
        raise ValueError(f'checksum mismatch: {difference}')
    data_iterator.set_state(_own_data_state(restored['data'], step))
    logging.info('Restored checkpoint for step %d from %s', step, self.directory)
    return restored['state'], extra

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of `checkpoints/` (never deletes it); its new path.

    Process 0 moves it; every process finds the same step damaged and waits for it.
    """
    target = os.path.join(self.workdir, 'damaged_checkpoints', str(step))
    if jax.process_index() == 0:
      if storage.path(target).exists():
        target += f'-{int(time.time())}'
      storage.path(target).parent.mkdir(parents=True, exist_ok=True)
      storage.path(os.path.join(self.directory, str(step))).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'xenith_move_aside_{step}')
    return target

  def _protect_newest_clean(self, restored: int, extra: dict[str, Any]) -> None:
    """After a restore: keep the newest clean step (the restored one, or an older one
    when the restored step was saved while updates were being skipped)."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      if step > restored:
        continue
      info = extra if step == restored else _read_extra(self.directory, step)
      if info.get('clean', True):
        self._protected.clear()
        self._protected.add(step)
        return

  def wait(self) -> None:
    """Waits for the save in flight; CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_error(e) from e

  def close(self) -> None:
    """Waits for the save in flight (never abandon one), then releases the manager."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    try:
      self.close()
    except CheckpointSaveError:
      if exc_type is None:
        raise
      logging.exception('The checkpoint save in flight failed too.')  # Keep the first.


_PER_PROCESS = 'per_process'  # The data item of a multi-process save: every process's state.


def _data_state(data_iterator) -> Any:
  """The data item to save: the iterator's state; with several processes, every process's
  state under _PER_PROCESS (JSON items are written by process 0 alone, so each process's
  own position would otherwise be lost). A collective when there are several processes."""
  state = data_iterator.get_state()
  if jax.process_count() == 1:
    return state
  return {_PER_PROCESS: distributed.gather_json(state)}


def _own_data_state(saved: Any, step: int) -> Any:
  """This process's iterator state from a saved data item (`_data_state`)."""
  if not (isinstance(saved, dict) and _PER_PROCESS in saved):
    return saved  # Saved by one process: the position of the one global stream.
  states = saved[_PER_PROCESS]
  if len(states) == jax.process_count():
    return states[jax.process_index()]
  if all(state == states[0] for state in states):
    return states[0]  # Every process was at the same position: any count can resume.
  raise WorkdirError(
      f'Checkpoint step {step} holds the data positions of {len(states)} processes, which '
      f'differ; resume it with {len(states)} processes, not {jax.process_count()}.')


def _read_extra(directory: str, step: int) -> dict[str, Any]:
  """A step's `extra` item read directly ({} if it has none or it cannot be read)."""
  try:
    with storage.path(os.path.join(directory, str(step), 'extra', 'metadata')).open() as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def committed_steps(checkpoints) -> list[int]:
  """The steps saved in a `checkpoints/` folder, ascending ([] when there is none): only
  committed saves have a plain number for a name."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(d.name) for d in checkpoints.iterdir() if d.name.isdigit())


def params_dir(path: str) -> str:
  """The Orbax item holding `{'params': ...}` that `path` names.

  `path` is a workdir, its `checkpoints/` (the newest step is used), one step of it, or
  an item written by `save_params` (e.g. merged LoRA params).
  """
  path = storage.path(path, 'the checkpoint path')  # Local or gs://.
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  steps = committed_steps(path)
  if steps:
    path = path / str(steps[-1])
  if (path / 'state').is_dir():
    path = path / 'state'
  if not storage.is_file(path / '_METADATA'):
    raise CheckpointMismatchError(
        f'{path} holds no checkpoint (expected a workdir, its checkpoints/ folder, a step '
        'folder or saved params).')
  return os.fspath(path)


def _is_adapter_key(key: tuple[str, ...]) -> bool:
  """Params new beside a base model: LoRA factors and heads trained with them."""
  return any(lora.is_adapter_name(k) for k in key)


def _is_lora_key(key: tuple[str, ...]) -> bool:
  return any(lora.is_lora_factor_name(k) for k in key)


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


# Params that hold one row per vocabulary entry: [vocab, embed] and the untied head's
# [embed, vocab]. A tokenizer extended with new pieces (ids appended) grows them.
_VOCAB_AXES = {('embed', 'embedding'): 0, ('head', 'kernel'): 1}
_LM_HEAD = 'head'  # The untied language-model head, which a classifier replaces.


def _resize_vocab(key, saved_value: np.ndarray, shape) -> np.ndarray:
  """A vocabulary param grown to `shape`: the saved rows kept at their ids, new rows the
  mean of the saved ones (so new pieces start as an average token, not noise)."""
  axis = _VOCAB_AXES[key]
  extra = shape[axis] - saved_value.shape[axis]
  mean = saved_value.mean(axis=axis, keepdims=True)
  return np.concatenate([saved_value, np.repeat(mean, extra, axis=axis)], axis=axis)


def load_base_params(path: str, params: dict[str, Any]) -> dict[str, Any]:
  """`params` with every base (non-adapter) param replaced by the checkpoint's at `path`.

  For starting a run from a trained model (`config.init_from_checkpoint`): LoRA
  adapters (and a classifier's new head) keep their fresh values, optimizer state and step
  are not read, arrays are restored into the shardings of `params`. A classifier drops
  the checkpoint's untied LM head. A model whose vocabulary grew (a tokenizer extended
  with new pieces, ids appended) gets the saved embedding (and untied head) rows at their
  ids and the mean saved row for each new id. Raises CheckpointMismatchError, naming the
  first difference, for anything else that differs.
  """
  item = params_dir(path)
  saved = _saved_shapes(item)
  flat = traverse_util.flatten_dict(params)
  base = {k: x for k, x in flat.items() if not _is_adapter_key(k)}
  adapters = sorted('/'.join(k) for k in saved if _is_lora_key(k))
  classifier = any(_is_adapter_key(k) and not _is_lora_key(k) for k in flat)
  if classifier:  # The LM head has no use under a label head.
    saved = {k: v for k, v in saved.items() if k[0] != _LM_HEAD or k in base}
  saved = {k: v for k, v in saved.items() if not _is_adapter_key(k) or _is_lora_key(k)}
  grown = {k for k in base if k in saved and k in _VOCAB_AXES
           and _grows(saved[k], tuple(base[k].shape), _VOCAB_AXES[k])}
  if adapters:
    reason = (f'it has LoRA adapters ({adapters[0]}, ...); merge them into the base first '
              'with launch/merge_lora.py')
  else:
    reason = _difference(saved, {k: saved[k] if k in grown else tuple(x.shape)
                                 for k, x in base.items()})
  if reason:
    raise CheckpointMismatchError(
        f'Cannot initialise from {item}: it does not match this config ({reason}).')
  same = {k: x for k, x in base.items() if k not in grown}
  flat.update(_restore(item, same))
  if grown:
    # Read whole on one local device (the saved shape need not divide the mesh), then
    # placed into the new shape's sharding.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    small = _restore(item, {k: jax.ShapeDtypeStruct(saved[k], base[k].dtype, sharding=local)
                            for k in grown})
    for k in grown:
      value = _resize_vocab(k, np.asarray(jax.device_get(small[k])), base[k].shape)
      value = value.astype(base[k].dtype)
      flat[k] = jax.make_array_from_callback(value.shape, base[k].sharding,
                                             lambda index, v=value: v[index])
      logging.info('%s grew from %s to %s rows: new rows start at the mean saved row.',
                   '/'.join(k), saved[k][_VOCAB_AXES[k]], base[k].shape[_VOCAB_AXES[k]])
  logging.info('Initialised %d base params from %s', len(base), item)
  return traverse_util.unflatten_dict(flat)


def _grows(saved_shape, shape, axis) -> bool:
  """Whether `shape` is `saved_shape` with more entries along `axis` only."""
  return (len(saved_shape) == len(shape) and shape[axis] > saved_shape[axis]
          and all(a == b for i, (a, b) in enumerate(zip(saved_shape, shape)) if i != axis))


def save_params(path: str, params: Any) -> None:
  """Writes `{'params': params}` as an Orbax item that `load_base_params` reads."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(storage.path(path), {'params': params})
