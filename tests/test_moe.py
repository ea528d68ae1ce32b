"""Tests of the Mixture-of-Experts layer (xenith/model/moe.py, moe_dispatch.py).

Dispatch methods against the compute-all-experts reference, capacity drops, router
losses against hand computation, padding, layer layouts, the train/eval steps' aux
losses and metrics, expert parallelism on 8 simulated devices, and a MoE experiment run
end to end through main.py (slow).
"""

import functools
import os
import subprocess
import sys

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import default
from experiments import moe as moe_experiment
from tests import test_sharding
import event_files
from xenith.train import metrics as metrics_lib
from xenith import sharding
from xenith.config_validation import ConfigError, validate
from xenith.model import moe
from xenith.model import moe_dispatch
from xenith.model import build
from xenith.train.steps import make_eval_step, make_loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPLESS = ('dropless_gather', 'dropless_ragged')


def _key(seed):
  return jax.random.key(seed, impl='rbg')


def _model_config(**moe_fields) -> ml_collections.ConfigDict:
  """Tiny model config with 4 experts, top-2, plus `moe_fields`."""
  cfg = default.get_config('size=tiny').model
  cfg.vocab_size = 128
  cfg.moe.num_experts = 4
  cfg.moe.expert_mlp_dim = 24
  for field, value in moe_fields.items():
    cfg.moe[field] = value
  return cfg


def _block(**moe_fields):
  return moe.MoeBlock(ml_collections.FrozenConfigDict(_model_config(**moe_fields)))


def _inputs(batch=3, seq=10, embed=64):
  x = jax.random.normal(jax.random.key(0), (batch, seq, embed))
  segment_ids = jnp.ones((batch, seq), jnp.int32).at[0, -3:].set(0).at[2, :2].set(0)
  return x, segment_ids


@functools.cache
def _block_params(num_shared_experts=0):
  x, segment_ids = _inputs()
  block = _block(num_shared_experts=num_shared_experts)
  return nn.unbox(jax.jit(block.init)(_key(0), x, segment_ids))['params']


@functools.cache
def _block_outputs(dispatch, num_shared_experts=0, **moe_fields):
  """(y, stats, grads of a loss through y and aux_loss wrt (params, x)) for a dispatch."""
  block = _block(dispatch=dispatch, num_shared_experts=num_shared_experts, **moe_fields)
  x, segment_ids = _inputs()

  def loss(params, x):
    y, stats = block.apply({'params': params}, x, segment_ids)
    return jnp.sum(jnp.sin(y) * jnp.cos(x)) + 10.0 * stats['aux_loss'], (y, stats)

  grads, (y, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
      _block_params(num_shared_experts), x)
  return y, stats, grads


def _assert_trees_close(actual, desired, rtol=1e-5):
  def close(a, b):
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.abs(b).max(), 1e-6))
  jax.tree.map(close, actual, desired)


@pytest.mark.parametrize('dispatch,num_shared', [
    ('dropless_gather', 0), ('dropless_ragged', 0), ('capacity', 0),
    ('dropless_gather', 2)])
def test_dispatch_matches_dense_forward_and_gradients(dispatch, num_shared):
  # capacity_factor = E / k: every expert could take every token, nothing drops.
  extra = dict(capacity_factor=2.0) if dispatch == 'capacity' else {}
  y_ref, stats_ref, grads_ref = _block_outputs('dense', num_shared)
  y, stats, grads = _block_outputs(dispatch, num_shared, **extra)
  _assert_trees_close(y, y_ref)
  _assert_trees_close(stats, stats_ref)
  _assert_trees_close(grads, grads_ref)
  assert float(stats['dropped_fraction']) == 0.0
  # Every parameter, router included, receives a gradient.
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads[0]))
  if num_shared:
    assert grads[0]['shared']['up']['kernel'].shape == (64, num_shared * 24)


def test_gather_blocks_smaller_than_expert_groups():
  # Blocks of 8 rows: every expert's rows span several blocks plus a padded tail.
  y_ref, _, grads_ref = _block_outputs('dense')
  y, _, grads = _block_outputs('dropless_gather', block_size=8)
  _assert_trees_close(y, y_ref)
  _assert_trees_close(grads, grads_ref)


def test_auto_dispatch_picks_gather_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert moe_dispatch.resolve('auto') == 'dropless_gather'
  with pytest.raises(ValueError, match='Unknown MoE dispatch'):
    moe_dispatch.resolve('megablox')


def test_gather_block_size_shrinks_to_a_multiple_of_8_covering_an_experts_share():
  # (tokens, k, experts, block_size) -> rows per block: the even per-expert share
  # ceil(tokens * k / experts) rounded up to a multiple of 8, at most block_size, at least 8.
  for args, want in (((24, 2, 4, 256), 16), ((100, 2, 8, 256), 32), ((3, 1, 8, 256), 8),
                     ((4096, 2, 8, 256), 256), ((4096, 2, 8, 64), 64), ((64, 2, 4, 32), 32)):
    assert moe_dispatch.gather_block_size(*args) == want, args


@pytest.mark.parametrize('method', ['dense', 'dropless_gather', 'dropless_ragged', 'capacity'])
def test_dispatch_runs_the_method_it_is_asked_for(method, monkeypatch):
  """Every method gives dense's numbers, so a dispatch that ran dense (or any other)
  instead would pass the agreement tests: here every other method raises."""
  methods = ('dense', 'dropless_gather', 'dropless_ragged', 'capacity')
  for other in methods:
    if other != method:
      monkeypatch.setattr(moe_dispatch, other, functools.partial(_must_not_run, other))
  gate, up, down = _expert_weights()
  x = jax.random.normal(jax.random.key(4), (6, 4))
  index = jnp.array([[0, 1]] * 6)
  y, kept = moe_dispatch.dispatch(method, x, index, jnp.full((6, 2), 0.5), gate, up, down)
  assert y.shape == (6, 4) and kept.shape == (6, 2)


def _must_not_run(name, *args, **kwargs):
  raise AssertionError(f'dispatch ran {name}')


def _expert_weights(num_experts=2, embed=4, mlp=6):
  keys = jax.random.split(jax.random.key(3), 3)
  return (jax.random.normal(keys[0], (num_experts, embed, mlp)),
          jax.random.normal(keys[1], (num_experts, embed, mlp)),
          jax.random.normal(keys[2], (num_experts, mlp, embed)))


def test_capacity_drops_overflow_in_priority_order_and_counts_it():
  gate, up, down = _expert_weights()
  x = jax.random.normal(jax.random.key(4), (6, 4))
  # First choices: five tokens on expert 0, one on expert 1; second choices the other.
  first = jnp.array([0, 0, 0, 1, 0, 0])
  expert_index = jnp.stack([first, 1 - first], axis=1)  # [6, 2]
  weights = jnp.full((6, 2), 0.5)
  # capacity = ceil(0.5 * 6 * 2 / 2) = 3 slots per expert.
  capacity = jax.jit(moe_dispatch.capacity, static_argnums=6)  # Eager ops compile slowly.
  y, kept = capacity(x, expert_index, weights, gate, up, down, 0.5)
  # Expert 0 keeps the first three first choices (tokens 0, 1, 2); tokens 4 and 5's
  # first choices overflow. Expert 1 takes token 3's first choice, then the second
  # choices of tokens 0 and 1; those of 2, 4 and 5 overflow.
  np.testing.assert_array_equal(kept, [[1, 1], [1, 1], [1, 0], [1, 0], [0, 0], [0, 0]])
  expert = lambda e, t: moe_dispatch._swiglu(x[t], gate[e], up[e], down[e])
  expected = [0.5 * (expert(0, t) + expert(1, t)) for t in (0, 1)]
  expected += [0.5 * expert(0, 2), 0.5 * expert(1, 3), jnp.zeros(4), jnp.zeros(4)]
  np.testing.assert_allclose(y, jnp.stack(expected), rtol=1e-5, atol=1e-5)
  logits = jnp.zeros((6, 2))
  router_stats = jax.jit(moe.router_stats)
  stats = router_stats(logits, expert_index, kept, jnp.ones(6, bool))
  np.testing.assert_allclose(stats['dropped_fraction'], 6 / 12)
  # A padding token's drops are not counted: its assignments do not exist.
  valid = jnp.array([1, 1, 1, 1, 1, 0], bool)
  stats = router_stats(logits, expert_index, kept, valid)
  np.testing.assert_allclose(stats['dropped_fraction'], 4 / 10)

  # Dropless gather on the same routing drops nothing and equals dense.
  y_gather, kept_gather = jax.jit(moe_dispatch.dropless_gather, static_argnums=6)(
      x, expert_index, weights, gate, up, down, 8)
  y_dense, _ = jax.jit(moe_dispatch.dense)(x, expert_index, weights, gate, up, down)
  assert kept_gather.all()
  np.testing.assert_allclose(y_gather, y_dense, rtol=1e-5, atol=1e-5)


def test_small_capacity_in_the_layer_reports_drops():
  _, stats, _ = _block_outputs('capacity', capacity_factor=0.5)
  # 25 valid tokens x 2 assignments; capacity ceil(0.5 * 30 * 2 / 4) = 8 per expert
  # (padding tokens take no slot), so each expert drops what it got beyond 8.
  per_expert = np.asarray(stats['expert_fraction']) * 50
  np.testing.assert_allclose(per_expert, np.round(per_expert), atol=1e-4)
  expected = np.maximum(np.round(per_expert) - 8, 0).sum() / 50
  assert expected >= 18 / 50
  np.testing.assert_allclose(stats['dropped_fraction'], expected, rtol=1e-6)


def test_router_losses_equal_hand_computation():
  logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 1.0, 1.5],
                     [5.0, 5.0, -5.0]], np.float32)
  valid = np.array([True, True, True, False])
  expert_index, weights = moe.route(jnp.asarray(logits), 2, normalize=True)
  np.testing.assert_array_equal(expert_index[:3], [[0, 1], [2, 1], [2, 1]])
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(weights[0], probs[0, :2] / probs[0, :2].sum(), rtol=1e-6)
  _, raw = moe.route(jnp.asarray(logits), 2, normalize=False)
  np.testing.assert_allclose(raw[0], probs[0, :2], rtol=1e-6)

  stats = moe.router_stats(jnp.asarray(logits), expert_index,
                           jnp.ones((4, 2), bool), jnp.asarray(valid))
  # Over the 3 valid tokens, 6 assignments: expert 0 once, expert 1 three times, 2 twice.
  fraction = np.array([1, 3, 2]) / 6
  mean_probs = probs[:3].mean(0)
  np.testing.assert_allclose(stats['expert_fraction'], fraction, rtol=1e-6)
  np.testing.assert_allclose(stats['load_balance_loss'], 3 * (fraction * mean_probs).sum(),
                             rtol=1e-6)
  lse = np.log(np.exp(logits[:3]).sum(-1))
  np.testing.assert_allclose(stats['router_z_loss'], (lse**2).mean(), rtol=1e-6)
  entropy = -(probs[:3] * np.log(probs[:3])).sum(-1).mean()
  np.testing.assert_allclose(stats['router_entropy'], entropy, rtol=1e-6)
  np.testing.assert_allclose(stats['max_load_ratio'], 3 * 3 / 6, rtol=1e-6)
  np.testing.assert_allclose(stats['min_load_ratio'], 3 * 1 / 6, rtol=1e-6)
  assert float(stats['dropped_fraction']) == 0.0


def test_block_aux_loss_is_the_weighted_sum_and_padding_is_not_routed():
  block = _block(load_balance_loss_weight=0.1, router_z_loss_weight=0.01,
                 router_entropy_loss_weight=-0.5)
  x, segment_ids = _inputs()
  y, stats = jax.jit(block.apply)({'params': _block_params()}, x, segment_ids)
  expected = (0.1 * stats['load_balance_loss'] + 0.01 * stats['router_z_loss']
              - 0.5 * stats['router_entropy'])
  np.testing.assert_allclose(stats['aux_loss'], expected, rtol=1e-6)
  # Padding tokens get no expert output and change no statistic.
  pad = np.asarray(segment_ids) == 0
  assert np.all(np.asarray(y)[pad] == 0) and np.abs(np.asarray(y)[~pad]).min() > 0
  other_pad = jnp.where(segment_ids[..., None] > 0, x, 7.0)
  y2, stats2 = jax.jit(block.apply)({'params': _block_params()}, other_pad, segment_ids)
  np.testing.assert_allclose(y2, y, rtol=1e-6)
  _assert_trees_close(stats2, stats, rtol=1e-6)
  assert abs(float(stats['expert_fraction'].sum()) - 1) < 1e-6


def test_layer_pattern_param_names_and_logical_axes():
  cfg = ml_collections.FrozenConfigDict(_model_config(first_dense_layers=1, moe_every=2))
  assert [moe.is_moe_layer(cfg, i) for i in range(6)] == [False, False, True, False,
                                                           True, False]
  cfg = _model_config(first_dense_layers=1, num_shared_experts=1)
  cfg.num_layers = 3
  boxed = jax.eval_shape(build.make_model(cfg).init, _key(0),
                         jnp.zeros((1, 8), jnp.int32))
  flat = flax.traverse_util.flatten_dict(boxed['params'], sep='/')
  assert 'block_0/mlp/gate/kernel' in flat and 'block_0/moe/router/kernel' not in flat
  names = {'block_1/moe/experts/gate': ('exp', 'embed', 'mlp'),
           'block_2/moe/experts/up': ('exp', 'embed', 'mlp'),
           'block_1/moe/experts/down': ('exp', 'mlp', 'embed'),
           'block_1/moe/router/kernel': ('embed', None),
           'block_2/moe/shared/gate/kernel': ('embed', 'mlp')}
  for path, axes in names.items():
    assert flat[path].names == axes, path
  assert flat['block_1/moe/experts/down'].value.shape == (4, 24, 64)
  assert flat['block_2/moe/shared/down/kernel'].value.shape == (24, 64)
  # One expert (top-1) is still a MoE layer: a router and an expert of expert_mlp_dim.
  one = _model_config(num_experts=1, num_experts_per_token=1)
  assert moe.enabled(one) and moe.is_moe_layer(ml_collections.FrozenConfigDict(one), 0)
  flat = flax.traverse_util.flatten_dict(jax.eval_shape(
      build.make_model(one).init, _key(0), jnp.zeros((1, 8), jnp.int32))['params'],
      sep='/')
  assert flat['block_0/moe/experts/gate'].value.shape == (1, 64, 24)
  assert not moe.enabled(_model_config(num_experts=0))


def test_expert_weights_are_initialised_by_each_experts_fan_in():
  """gate / up [exp, embed, mlp] have std 1/sqrt(embed), down [exp, mlp, embed]
  1/sqrt(mlp), expert by expert (the expert axis is not part of the fan-in)."""
  cfg = _model_config(num_experts=4, expert_mlp_dim=96)
  params = jax.jit(moe.Experts(ml_collections.FrozenConfigDict(cfg)).init)(
      _key(0), jnp.zeros((8, 64)), jnp.zeros((8, 2), jnp.int32), jnp.zeros((8, 2)))
  params = nn.unbox(params)['params']
  for name, fan_in in (('gate', 64), ('up', 64), ('down', 96)):
    for e in range(4):  # 6,144 weights each: the std is known to about 1%.
      std = float(np.std(np.asarray(params[name][e])))
      assert abs(std * np.sqrt(fan_in) - 1) < 0.06, (name, e, std)


def _stack(params, layers):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f'block_{i}'] for i in layers])


def test_scan_layout_matches_loop():
  loop_cfg = _model_config(first_dense_layers=1)
  loop_cfg.num_layers = 3
  scan_cfg = _model_config(first_dense_layers=1)
  scan_cfg.num_layers, scan_cfg.scan_layers = 3, True
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 128)
  segment_ids = jnp.ones((2, 12), jnp.int32).at[1, 9:].set(0)
  loop, scan = build.make_model(loop_cfg), build.make_model(scan_cfg)
  params = nn.unbox(jax.jit(loop.init)(_key(0), tokens))['params']
  scan_params = {k: v for k, v in params.items() if not k.startswith('block_')}
  scan_params['dense_layers'] = _stack(params, [0])
  scan_params['moe_layers'] = _stack(params, [1, 2])

  def run(model, p):
    out = jax.jit(functools.partial(model.apply, method='forward'))(
        {'params': p}, tokens, segment_ids=segment_ids)
    return out.logits, out.moe_stats

  (loop_logits, loop_stats), (scan_logits, scan_stats) = run(loop, params), run(scan, scan_params)
  np.testing.assert_allclose(scan_logits, loop_logits, rtol=1e-5, atol=1e-5)
  # Applied plainly a MoE model returns its logits alone, like a dense one.
  plain = jax.jit(loop.apply)({'params': params}, tokens, segment_ids=segment_ids)
  np.testing.assert_array_equal(plain, loop_logits)
  loop_aux, loop_metrics = moe.aux_loss_and_metrics(loop_stats)
  scan_aux, scan_metrics = moe.aux_loss_and_metrics(scan_stats)
  assert sorted(loop_metrics) == sorted(scan_metrics)
  assert {'layer_1/max_load_ratio', 'layer_2/expert_fraction'} <= set(loop_metrics)
  _assert_trees_close(scan_metrics, loop_metrics)
  np.testing.assert_allclose(scan_aux, loop_aux, rtol=1e-5)


def test_aux_loss_and_metrics_names_and_means():
  """Layer means under their own names, every per-layer stat but aux_loss under
  'layer_<i>/<name>' (aux_loss is the training loss's, not a metric per layer)."""
  stat_names = ('load_balance_loss', 'router_z_loss', 'router_entropy', 'expert_fraction',
                'max_load_ratio', 'min_load_ratio', 'dropped_fraction', 'aux_loss')
  rng = np.random.default_rng(0)
  per_layer = {f'layer_{i}': {n: jnp.asarray(rng.random(4 if n == 'expert_fraction' else ()),
                                             jnp.float32) for n in stat_names}
               for i in (1, 3)}
  aux, metrics = moe.aux_loss_and_metrics(per_layer)
  means = ('aux_loss', 'load_balance_loss', 'router_z_loss', 'router_entropy',
           'dropped_fraction')
  assert set(metrics) == set(means) | {f'layer_{i}/{n}' for i in (1, 3)
                                       for n in stat_names if n != 'aux_loss'}
  for name in means:
    np.testing.assert_allclose(metrics[name], (per_layer['layer_1'][name]
                                               + per_layer['layer_3'][name]) / 2, rtol=1e-6)
  np.testing.assert_allclose(aux, metrics['aux_loss'], rtol=1e-6)
  np.testing.assert_array_equal(metrics['layer_3/expert_fraction'],
                                per_layer['layer_3']['expert_fraction'])
  assert moe.aux_loss_and_metrics({}) == (None, {})


def test_loss_adds_mean_layer_aux_loss_and_eval_reports_it():
  cfg = _model_config(load_balance_loss_weight=0.5)
  cfg.num_layers = 2
  model = build.make_model(cfg)
  batch = test_sharding._batch(ml_collections.ConfigDict(
      dict(global_batch_size=4, max_seq_len=16, model=dict(vocab_size=128))))
  params = nn.unbox(jax.jit(model.init)(_key(0), batch['inputs']))['params']
  total, (lm_loss, metrics) = jax.jit(make_loss_fn(model, with_aux=True))(
      params, batch, jax.random.key(0))
  layer_aux = [0.5 * metrics[f'layer_{i}/load_balance_loss']
               + 0.001 * metrics[f'layer_{i}/router_z_loss'] for i in (0, 1)]
  np.testing.assert_allclose(total - lm_loss, np.mean(layer_aux), rtol=1e-5)
  np.testing.assert_allclose(metrics['aux_loss'], np.mean(layer_aux), rtol=1e-5)
  assert float(jax.jit(make_loss_fn(model))(params, batch, jax.random.key(0))) == float(total)

  eval_metrics = jax.jit(make_eval_step(model))(params, batch)
  result = jax.device_get(eval_metrics.merge(eval_metrics).compute())
  tags = metrics_lib.moe_scalars('eval', result['moe'])
  assert tags['eval/aux_loss'] == pytest.approx(float(metrics['aux_loss']), rel=1e-5)
  assert {'eval/load_balance_loss', 'eval/router_z_loss', 'eval/router_entropy',
          'eval/dropped_fraction', 'moe_eval/layer_1/max_load_ratio',
          'moe_eval/layer_0/expert_3_fraction'} <= set(tags)
  fractions = [tags[f'moe_eval/layer_0/expert_{e}_fraction'] for e in range(4)]
  assert sum(fractions) == pytest.approx(1.0)
  assert set(metrics_lib.moe_scalars('train', result['moe'])) >= {
      'train/aux_loss', 'moe/layer_0/min_load_ratio'}


def _sharded_config(dispatch='auto', **mesh):
  config = test_sharding._config(**mesh)
  config.model.num_layers = 1  # One MoE layer: the test is about its sharding.
  config.model.moe.num_experts = 4
  config.model.moe.expert_mlp_dim = 32
  config.model.moe.dispatch = dispatch
  # 'capacity': 247 routed tokens x 2 > 4 experts x ceil(0.5 * 256 * 2 / 4) slots: drops.
  config.model.moe.capacity_factor = 0.5
  return config


@functools.cache
def _single_device_moe(dispatch, num_steps):
  return test_sharding._run_steps(_sharded_config(dispatch), jax.devices()[:1], num_steps)


@pytest.mark.parametrize('dispatch,mesh', [
    ('auto', dict(data=2, expert=4)), ('auto', dict(data=2, expert=2, tensor=2)),
    # One mesh each, gradients only (no train step to compile): the costly part is XLA.
    ('capacity', dict(data=2, expert=4)),
    ('dropless_ragged', dict(data=2, expert=2, tensor=2))],
    ids=lambda v: v if isinstance(v, str) else '-'.join(f'{a}{n}' for a, n in v.items()))
def test_expert_parallel_step_matches_single_device(dispatch, mesh):
  assert jax.device_count() == 8, 'conftest sets 8 simulated CPU devices'
  num_steps = 2 if dispatch == 'auto' else 0
  ref_grads, ref_losses, ref_norms, _ = _single_device_moe(dispatch, num_steps)
  grads, losses, norms, state = test_sharding._run_steps(
      _sharded_config(dispatch, **mesh), jax.devices(), num_steps)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  _assert_trees_close(grads, ref_grads)
  gate = state.params['block_0']['moe']['experts']['gate']
  assert gate.sharding.spec[0] == 'expert'
  assert gate.sharding.shard_shape(gate.shape)[0] == 4 // mesh['expert']


def _valid_config(**moe_fields):
  config = moe_experiment.get_config('size=tiny')
  for field, value in moe_fields.items():
    config.model.moe[field] = value
  return config


@pytest.mark.parametrize('fields,match', [
    (dict(num_experts_per_token=5), r'num_experts_per_token: 5 must be an int in \[1, '),
    (dict(first_dense_layers=2), r'first_dense_layers: 2 must be in \[0, num_layers=2\)'),
    (dict(dispatch='megablox'), r'dispatch: .megablox. must be one of'),
    (dict(capacity_factor=0.0), r'capacity_factor: 0.0 must be > 0'),
    (dict(moe_every=3), r'moe_every: 3 leaves no MoE layer'),
])
def test_invalid_moe_config_is_named(fields, match):
  validate(_valid_config(), 1)
  with pytest.raises(ConfigError, match=match):
    validate(_valid_config(**fields), 1)


def test_moe_experiment_config():
  config = moe_experiment.get_config('size=small')
  assert config.model.moe.num_experts > 0 and config.model.moe.dispatch == 'auto'
  validate(config, 1)
  with pytest.raises(ValueError, match='Unknown size'):
    moe_experiment.get_config('size=huge')
  # The dense default is untouched.
  assert default.get_config().model.moe.num_experts == 0


@pytest.mark.slow
def test_moe_experiment_trains_with_router_metrics_in_tensorboard(tmp_path):
  workdir = str(tmp_path)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # One CPU device.
  if os.environ.get('XENITH_TEST_CACHE'):
    env['XENITH_CACHE'] = os.environ['XENITH_TEST_CACHE']
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/moe.py:size=tiny',
       f'--workdir={workdir}', '--config.num_train_steps=6', '--config.log_every_steps=3',
       '--config.eval_every_steps=6', '--config.num_eval_batches=2',
       '--config.checkpoint_every_steps=6', '--config.optimizer.warmup_steps=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  scalars = event_files.read_scalars(workdir)
  config = moe_experiment.get_config('size=tiny').model
  moe_layers = [i for i in range(config.num_layers)
                if moe.is_moe_layer(ml_collections.FrozenConfigDict(config), i)]
  assert moe_layers
  for split, group in (('train', 'moe'), ('eval', 'moe_eval')):
    for name in ('aux_loss', 'load_balance_loss', 'router_z_loss', 'router_entropy',
                 'dropped_fraction'):
      assert f'{split}/{name}' in scalars, (split, name)
    for i in moe_layers:
      for name in ('max_load_ratio', 'min_load_ratio', 'router_entropy',
                   'dropped_fraction', 'load_balance_loss', 'expert_0_fraction'):
        assert f'{group}/layer_{i}/{name}' in scalars, (group, i, name)
  assert [s for s, _ in scalars['train/aux_loss']] == [3, 6]
  # Balanced routing gives a load-balance loss near 1 (its minimum).
  assert 0.9 < scalars['train/load_balance_loss'][-1][1] < 2.0
  assert all(np.isfinite(v) for _, v in scalars['eval/aux_loss'])


def test_lora_fine_tuning_of_a_moe_model_trains_only_adapters():
  config = moe_experiment.get_config('size=tiny')
  config.model.lora.rank = 2
  model = build.make_model(config.model)
  batch = test_sharding._batch(ml_collections.ConfigDict(
      dict(global_batch_size=2, max_seq_len=16, model=dict(vocab_size=512))))
  params = nn.unbox(jax.jit(model.init)(_key(0), batch['inputs']))['params']
  (_, (_, metrics)), grads = jax.jit(jax.value_and_grad(
      make_loss_fn(model, with_aux=True), has_aux=True))(params, batch, jax.random.key(0))
  assert 'layer_1/router_z_loss' in metrics
  moe_grads = grads['block_1']['moe']
  assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(moe_grads))  # Frozen base.
  assert np.abs(grads['block_1']['attn']['out']['lora_b']).max() > 0
