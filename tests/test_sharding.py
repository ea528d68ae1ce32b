"""Sharded training steps equal the single-device step (8 simulated CPU devices)."""

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import default
from xenith.train import optimizer
from xenith import sharding
from xenith.config_validation import ConfigError
from xenith.model.build import make_model
from xenith.train.steps import make_loss_fn, make_train_step
from xenith.train.train_state import abstract_train_state, init_train_state


def _config(**mesh):
  config = default.get_config('size=tiny')
  config.global_batch_size = 8
  config.max_seq_len = 32
  config.optimizer.warmup_steps = 0
  config.model.num_heads, config.model.num_kv_heads = 4, 2
  for axis in sharding.MESH_AXES:
    config.mesh[axis] = mesh.get(axis, 1)
  return config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, l = config.global_batch_size, config.max_seq_len
  inputs = rng.integers(0, config.model.vocab_size, (b, l), dtype=np.int32)
  # Two packed documents per row, the tail of some rows padding.
  split = rng.integers(4, l - 4, b)
  pos = np.arange(l)[None]
  segment_ids = np.where(pos < split[:, None], 1, 2).astype(np.int32)
  segment_ids[::3, -3:] = 0
  positions = np.where(segment_ids == 1, pos, pos - split[:, None]).astype(np.int32)
  positions[segment_ids == 0] = 0
  return {'inputs': inputs, 'segment_ids': segment_ids, 'positions': positions}


def _run_steps(config, devices, num_steps=2):
  """On a mesh over `devices`: the first batch's gradients, then `num_steps` train steps.

  Returns (gradients, losses, grad norms, final state).
  """
  rules = config.logical_axis_rules
  mesh = sharding.create_mesh(config.mesh, devices)
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = abstract_train_state(model, tx, config.max_seq_len, mesh, rules)
    state = init_train_state(model, tx, config.max_seq_len, jax.random.key(0), shardings)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    grad_fn = jax.jit(jax.grad(make_loss_fn(model)),
                      in_shardings=(shardings.params, batch_sharding, None),
                      out_shardings=shardings.params)
    grads = grad_fn(state.params, sharding.global_batch(_batch(config), batch_sharding),
                    jax.random.key(1))
    step = jax.jit(make_train_step(model, tx, skip_nonfinite=False),
                   in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    losses, grad_norms = [], []
    for i in range(num_steps):
      batch = sharding.global_batch(_batch(config, i), batch_sharding)
      state, metrics = step(state, batch, jax.random.key(1))
      out = metrics.compute()
      losses.append(float(out['loss']))
      grad_norms.append(float(out['grad_norm']))
  return grads, losses, grad_norms, state


MESHES = {
    'data': dict(data=8),
    'fsdp': dict(fsdp=8),
    'tensor': dict(data=4, tensor=2),
    'mixed': dict(data=2, fsdp=2, tensor=2),
}


@functools.cache
def _single_device_reference(scan_layers):
  config = _config()
  config.model.scan_layers = scan_layers
  return _run_steps(config, jax.devices()[:1])


@pytest.mark.parametrize('mesh_name,scan_layers', [
    ('data', False), ('fsdp', False), ('tensor', False), ('mixed', False), ('mixed', True)])
def test_sharded_step_matches_single_device(mesh_name, scan_layers):
  assert jax.device_count() == 8, 'conftest sets 8 simulated CPU devices'
  config = _config(**MESHES[mesh_name])
  config.model.scan_layers = scan_layers
  ref_grads, ref_losses, ref_norms, ref_state = _single_device_reference(scan_layers)
  grads, losses, norms, state = _run_steps(config, jax.devices())

  # Stated tolerance: float32 sums in another order; 1e-5 relative on losses and norms,
  # gradients within 1e-5 of their tensor's largest entry.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)

  def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())

  jax.tree_util.tree_map(close, grads, ref_grads)
  # Adam normalises tiny gradients to unit steps, so compare params loosely.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=1e-4), state.params, ref_state.params)
  # The state really is split over the mesh: some parameter is not fully replicated.
  shards = [x.sharding.shard_shape(x.shape) != x.shape
            for x in jax.tree_util.tree_leaves(state.params)]
  if mesh_name != 'data':
    assert any(shards), f'no parameter is sharded under mesh {MESHES[mesh_name]}'


def test_mesh_fill_and_errors():
  config = _config(data=-1, tensor=2)
  assert sharding.mesh_shape(config.mesh, 8) == dict(data=4, fsdp=1, tensor=2, expert=1)
  with pytest.raises(ConfigError, match='larger than the 8 available'):
    sharding.mesh_shape(_config(data=4, tensor=4).mesh, 8)
  with pytest.raises(ConfigError, match='only one mesh axis may be -1'):
    sharding.mesh_shape(_config(data=-1, fsdp=-1).mesh, 8)
  with pytest.raises(ConfigError, match=r'mesh.data.*cannot fill'):
    sharding.mesh_shape(_config(data=-1, tensor=3).mesh, 8)


def test_indivisible_parameter_is_named_before_compiling():
  config = _config(data=2, tensor=4)  # 2 KV heads cannot be split 4 ways.
  rules = config.logical_axis_rules
  mesh = sharding.create_mesh(config.mesh)
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  with pytest.raises(ConfigError, match=r'kv?.*cannot be split 4 ways'):
    abstract_train_state(model, tx, config.max_seq_len, mesh, rules)
