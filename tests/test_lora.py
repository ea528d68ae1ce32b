"""LoRA (xenith/model/lora.py): adapters start as the base model, merge exactly, train
alone with a frozen base, seed runs from trained checkpoints; end to end via main.py."""

import functools
import json
import math
import os
import subprocess
import sys

from absl import flags
from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import default
from experiments import lora_finetune
from experiments import moe as moe_experiment
from xenith.train import checkpointing
from xenith import config_validation
from xenith.train import optimizer
from xenith.config_validation import ConfigError, validate
from xenith.model import layers
from xenith.model import lora
from xenith.model.build import make_model
from xenith.sizing import describe
from xenith.train.steps import make_loss_fn, make_train_step
from xenith.train.train_state import init_train_state
from helpers import single_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
ALL_TARGETS = lora.TARGETS  # 'head' included: the test models are untied.


def _key(seed):
  return jax.random.key(seed, impl='rbg')  # Faster init compiles on CPU.


def _config(rank=4, targets=ALL_TARGETS, **model_overrides):
  """Tiny experiment config, untied head, small vocab, LoRA of `rank` on `targets`."""
  config = default.get_config('size=tiny')
  config.global_batch_size = 4
  config.max_seq_len = 16
  config.optimizer.warmup_steps = 0
  config.model.vocab_size = VOCAB
  config.model.tie_embeddings = False
  config.model.lora.rank = rank
  config.model.lora.targets = tuple(targets)
  for field, value in model_overrides.items():
    assert field in config.model, field
    setattr(config.model, field, value)
  return config


def _with_moe(config):
  """`config` with the tiny MoE layers (block_1 is MoE; 'experts' is in ALL_TARGETS)."""
  config.model.moe.update(moe_experiment.MOE_SIZES['tiny'])
  config.model.moe.num_experts_per_token = 2
  return config


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(model.apply, static_argnames='deterministic')


def _init(model, seed=0):
  return nn.unbox(jax.jit(model.init)(_key(seed), jnp.zeros((1, 16), jnp.int32)))['params']


def _flat(params):
  return traverse_util.flatten_dict(params, sep='/')


def _tokens(shape=(2, 16), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


def _with_base(lora_params, base_params):
  """`lora_params` with the base params replaced by `base_params` (same keys)."""
  flat = _flat(lora_params)
  flat.update(_flat(base_params))
  return traverse_util.unflatten_dict(flat, sep='/')


def _random_adapters(params, seed=2):
  """`params` with random B (A is random from init): adapters that change the output."""
  flat = _flat(params)
  for i, (name, x) in enumerate(sorted(flat.items())):
    if name.endswith('lora_b'):
      flat[name] = 0.1 * jax.random.normal(jax.random.key(seed + i), x.shape)
  return traverse_util.unflatten_dict(flat, sep='/')


@pytest.mark.parametrize('scan_layers,with_moe', [
    (False, False), (True, False), (False, True), (True, True)])
def test_zero_b_equals_base_and_merged_equals_unmerged(scan_layers, with_moe):
  config = _config(scan_layers=scan_layers)
  if with_moe:  # Expert adapters too, under block_1 or the scanned moe_layers.
    _with_moe(config)
  plain_model = make_model(lora.plain_config(config.model))
  lora_model = make_model(config.model)
  base = _init(plain_model)
  params = _with_base(_init(lora_model, seed=1), base)
  assert lora.num_adapter_params(params) > 0
  assert any(k.endswith('experts/down_lora_b') for k in _flat(params)) == with_moe
  assert all(not x.any() for k, x in _flat(params).items() if k.endswith('lora_b'))
  tokens = _tokens()
  base_logits = _apply(plain_model)({'params': base}, tokens)
  # B = 0: exactly the base model, whatever A is.
  np.testing.assert_array_equal(_apply(lora_model)({'params': params}, tokens), base_logits)

  params = _random_adapters(params)
  adapted = _apply(lora_model)({'params': params}, tokens)
  assert np.abs(adapted - base_logits).max() > 1e-2  # The adapters do something.
  merged = lora.merge_lora(params, config.model)
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, base)
  np.testing.assert_allclose(
      _apply(plain_model)({'params': merged}, tokens), adapted, atol=2e-5, rtol=1e-5)


def test_targets_select_exactly_the_named_layers():
  config = _config(targets=('query', 'down', 'head'))
  boxed = jax.eval_shape(make_model(config.model).init, _key(0),
                         jnp.zeros((1, 8), jnp.int32))['params']
  flat = traverse_util.flatten_dict(boxed, sep='/')
  adapted = {k.rsplit('/', 1)[0] for k in flat if k.rsplit('/', 1)[1] in lora.ADAPTER_PARAMS}
  assert adapted == {'block_0/attn/query', 'block_1/attn/query', 'block_0/mlp/down',
                     'block_1/mlp/down', 'head'}
  m, r = config.model, config.model.lora.rank
  # Shapes [*contracted, rank] / [rank, *features], with logical axis names from the rules.
  assert flat['block_0/attn/query/lora_a'].value.shape == (m.embed_dim, r)
  assert flat['block_0/attn/query/lora_b'].value.shape == (r, m.num_heads, m.head_dim)
  assert flat['block_0/attn/query/lora_b'].names == ('lora_rank', 'heads', 'head_dim')
  assert flat['block_0/mlp/down/lora_a'].names == ('mlp', 'lora_rank')
  assert flat['head/lora_b'].names == ('lora_rank', 'vocab')
  known = {name for name, _ in config.logical_axis_rules}
  assert all(set(x.names) <= known for x in flat.values())

  out = _config(targets=('out',))
  flat = traverse_util.flatten_dict(jax.eval_shape(
      make_model(out.model).init, _key(0), jnp.zeros((1, 8), jnp.int32))['params'], sep='/')
  assert flat['block_0/attn/out/lora_a'].names == ('heads', 'head_dim', 'lora_rank')
  # Rank 0: exactly the plain model's params.
  plain = jax.eval_shape(make_model(_config(rank=0).model).init, _key(0),
                         jnp.zeros((1, 8), jnp.int32))
  assert not any(k.endswith(('lora_a', 'lora_b'))
                 for k in traverse_util.flatten_dict(plain['params'], sep='/'))


def test_expert_adapters_have_an_expert_axis():
  config = _with_moe(_config(targets=('experts',)))
  flat = traverse_util.flatten_dict(jax.eval_shape(
      make_model(config.model).init, _key(0), jnp.zeros((1, 8), jnp.int32))['params'],
      sep='/')
  assert {k for k in flat if lora.is_adapter_name(k.rsplit('/', 1)[1])} == {
      f'block_1/moe/experts/{w}_lora_{ab}' for w in ('gate', 'up', 'down') for ab in 'ab'}
  m, r = config.model, config.model.lora.rank
  e, h = m.moe.num_experts, m.moe.expert_mlp_dim
  experts = {k.rsplit('/', 1)[1]: x for k, x in flat.items() if '/experts/' in k}
  assert experts['gate_lora_a'].value.shape == (e, m.embed_dim, r)
  assert experts['gate_lora_a'].names == ('exp', 'embed', 'lora_rank')
  assert experts['up_lora_b'].value.shape == (e, r, h)
  assert experts['up_lora_b'].names == ('exp', 'lora_rank', 'mlp')
  assert experts['down_lora_a'].names == ('exp', 'mlp', 'lora_rank')
  assert experts['down_lora_b'].value.shape == (e, r, m.embed_dim)
  assert experts['down_lora_b'].names == ('exp', 'lora_rank', 'embed')
  known = {name for name, _ in config.logical_axis_rules}
  assert all(set(x.names) <= known for x in experts.values())


def test_adapter_dropout_runs_only_with_a_dropout_rng():
  layer = layers.DenseGeneral(
      features=32, names=('embed', 'mlp'), lora_rank=4, lora_alpha=8.0, lora_dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 16))
  variables = nn.unbox(layer.init(_key(0), x))
  variables = {'params': _random_adapters(variables['params'])}
  params = variables['params']
  expected = x @ params['kernel'] + 2.0 * (x @ params['lora_a']) @ params['lora_b']
  np.testing.assert_allclose(layer.apply(variables, x), expected, atol=1e-5)
  dropped = layer.apply(variables, x, rngs={'dropout': jax.random.key(1)})
  assert np.abs(dropped - expected).max() > 1e-3


@pytest.mark.parametrize('rate', [0.25, 0.5])
def test_adapter_dropout_zeroes_inputs_and_scales_the_rest_on_the_adapter_only(rate):
  """With A = B = identity the adapter's output is alpha / rank * dropout(x): every
  input is either dropped (0) or kept and scaled by 1 / (1 - rate), about `rate` of them
  dropped; the base path sees x whole. With B = 0 the output is exactly the base's."""
  width, alpha = 8, 4.0
  layer = layers.DenseGeneral(features=width, names=('embed', 'mlp'), lora_rank=width,
                              lora_alpha=alpha, lora_dropout=rate)
  x = jax.random.normal(jax.random.key(0), (512, width)) + 3.0  # No zeros in x.
  params = nn.unbox(layer.init(_key(0), x))['params']
  kernel = np.asarray(params['kernel'])
  base = np.asarray(x) @ kernel
  identity = {**params, 'lora_a': jnp.eye(width), 'lora_b': jnp.eye(width)}
  out = np.asarray(layer.apply({'params': identity}, x, rngs={'dropout': jax.random.key(3)}))
  kept = (out - base) / (alpha / width) / np.asarray(x)  # dropout(x) / x per element.
  dropped = np.isclose(kept, 0.0, atol=1e-4)
  assert np.all(dropped | np.isclose(kept, 1 / (1 - rate), rtol=1e-4))
  assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / dropped.size)
  zero_b = {**params, 'lora_b': jnp.zeros_like(params['lora_b'])}
  np.testing.assert_array_equal(
      layer.apply({'params': zero_b}, x, rngs={'dropout': jax.random.key(3)}),
      layer.apply({'params': zero_b}, x))
  np.testing.assert_allclose(layer.apply({'params': zero_b}, x), base, rtol=1e-5, atol=1e-5)


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  shape = (config.global_batch_size, config.max_seq_len)
  return {'inputs': rng.integers(0, VOCAB, shape, dtype=np.int32),
          'segment_ids': np.ones(shape, np.int32),
          'positions': np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)}


@pytest.mark.parametrize('with_moe', [False, True])
def test_lora_train_steps_change_only_adapters(with_moe):
  config = _config()
  # Expert adapters (in ALL_TARGETS) take no dropout: config_validation rejects it.
  config.model.lora.dropout = 0.0 if with_moe else 0.1
  if with_moe:  # Experts and router stay frozen too (and the router stats still flow).
    _with_moe(config)
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  state = init_train_state(model, tx, config.max_seq_len, _key(0), None)
  params = state.params
  assert any('/moe/' in k for k in _flat(params)) == with_moe
  assert any(k.endswith('experts/gate_lora_b') for k in _flat(params)) == with_moe
  adapter_size = lora.num_adapter_params(params)
  # No optimizer state for the base: Adam's moments exist for the adapters only.
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * adapter_size
  # The frozen base gets zero gradients (not merely zero updates).
  grads = jax.jit(jax.grad(make_loss_fn(model)))(params, _batch(config), jax.random.key(0))
  for name, g in _flat(grads).items():  # dL/dA is 0 too while B = 0.
    assert bool(np.abs(g).max() > 0) == name.endswith('lora_b'), name

  train_step = jax.jit(make_train_step(model, tx, skip_nonfinite=False))
  for i in range(3):
    state, metrics = train_step(state, _batch(config, seed=i), jax.random.key(1))
  summary = metrics.compute()
  assert np.isfinite(summary['loss']) and summary['grad_norm'] > 0
  before, after = _flat(params), _flat(state.params)
  for name in before:  # Expert adapters (experts/<w>_lora_a, _lora_b) included.
    if name.endswith(lora.ADAPTER_PARAMS):
      assert np.abs(after[name] - before[name]).max() > 0, name
    else:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_train_only_adapters_off_trains_everything():
  config = _config()
  config.model.lora.train_only_adapters = False
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  state = init_train_state(model, tx, config.max_seq_len, _key(0), None)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in moments) == 2 * num_params
  new_state, _ = jax.jit(make_train_step(model, tx, skip_nonfinite=False))(
      state, _batch(config), jax.random.key(1))
  before, after = _flat(state.params), _flat(new_state.params)
  changed = {k for k in before if np.abs(after[k] - before[k]).max() > 0}
  assert changed >= {k for k in before if not k.endswith(lora.ADAPTER_PARAMS)}


class _NoData:
  def get_state(self):
    return {}


def _save_checkpoint(workdir, config, step=3, seed=0):
  """A real train-state checkpoint of `config` in `workdir` (what main.py writes)."""
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  state = init_train_state(model, tx, config.max_seq_len, _key(seed), None)
  with checkpointing.Checkpointer(str(workdir), keep=1) as checkpointer:
    checkpointer.save(step, state, _NoData())
  return state.params


def test_init_from_checkpoint_restores_base_and_keeps_fresh_adapters(tmp_path):
  base = _save_checkpoint(tmp_path / 'base', _config(rank=0))
  config = _config()
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  fresh = init_train_state(model, tx, config.max_seq_len, _key(7), None).params
  for path in (tmp_path / 'base', tmp_path / 'base' / 'checkpoints',
               tmp_path / 'base' / 'checkpoints' / '3'):
    params = checkpointing.load_base_params(str(path), fresh)
    for name, x in _flat(params).items():
      expected = _flat(fresh if name.endswith(lora.ADAPTER_PARAMS) else base)[name]
      np.testing.assert_array_equal(x, expected, err_msg=name)

  # Another model: a clear error naming the first difference.
  wide = _config(embed_dim=32)
  fresh_wide = init_train_state(make_model(wide.model), optimizer.create_optimizer(wide),
                                wide.max_seq_len, _key(7), None).params
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'Cannot initialise from .* does not match this config '
                           r'\(block_0/attn/key/kernel has shape \(64, 2, 16\) there, '
                           r'\(32, 2, 16\) here\)'):
    checkpointing.load_base_params(str(tmp_path / 'base'), fresh_wide)
  assert checkpointing._difference(  # pylint: disable=protected-access
      {('embed', 'embedding'): (8, 4)},
      {('embed', 'embedding'): (8, 4), ('block_2', 'kernel'): (4, 4)},
  ) == "params missing from it: ['block_2/kernel']"
  # A LoRA checkpoint as the base: its adapters would be lost, so merge first.
  _save_checkpoint(tmp_path / 'lora', config)
  with pytest.raises(checkpointing.CheckpointMismatchError, match='merge them'):
    checkpointing.load_base_params(str(tmp_path / 'lora'), fresh)
  with pytest.raises(checkpointing.CheckpointMismatchError, match='holds no checkpoint'):
    checkpointing.load_base_params(str(tmp_path), fresh)


@pytest.mark.parametrize('field,value,message', [
    ('model.lora.rank', -1, r'config.model.lora.rank: -1 must be an int >= 0'),
    ('model.lora.alpha', 0.0, r'config.model.lora.alpha'),
    ('model.lora.dropout', 1.0, r'config.model.lora.dropout'),
    ('model.lora.targets', ('query', 'router'), r"\['router'\] are not LoRA targets"),
    ('model.lora.targets', (), r'config.model.lora.targets: \(\) must be a non-empty'),
    ('model.lora.targets', ('head',), r"'head' needs config.model.tie_embeddings=False"),
    ('init_from_checkpoint', '/no/such/run', r'config.init_from_checkpoint'),
])
def test_invalid_lora_fields_are_named(field, value, message):
  config = default.get_config('size=tiny')
  config.model.lora.rank = 4
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate(config, num_devices=8)


def test_expert_adapters_reject_dropout():
  config = default.get_config('size=tiny')
  config.model.lora.rank = 4
  config.model.lora.dropout = 0.05
  validate(config, num_devices=8)  # Dropout on the other targets is fine.
  config.model.lora.targets = ('query', 'experts')
  with pytest.raises(ConfigError, match=r"config.model.lora.dropout: 0.05 must be 0 with "
                                        r"adapters on 'experts' \(config.model.lora.targets; "
                                        r'expert adapters are folded into the expert weights'):
    validate(config, num_devices=8)
  config.model.lora.dropout = 0.0
  validate(config, num_devices=8)


def test_configs_and_target_lists_agree():
  assert config_validation.LORA_TARGETS == lora.TARGETS
  assert set(default.get_config().model.lora.target_ranks) == set(lora.TARGETS)
  validate(lora_finetune.get_config(f'base={ROOT},size=tiny'), num_devices=8)
  with pytest.raises(ValueError, match='needs the base run'):
    lora_finetune.get_config('size=tiny')


# Per-target ranks (config.model.lora.target_ranks).

# rank 2 on ('query', 'key', 'down', 'experts'); target_ranks: query 6 and experts 3
# override it, key 0 removes it, head 3 adds a target; down follows rank.
_PER_TARGET_RANKS = {'query': 6, 'down': 2, 'head': 3, 'experts': 3}


def _per_target_config(with_moe=False, scan_layers=False):
  """Tiny (embed 32) model with the ranks of `_PER_TARGET_RANKS`."""
  config = _config(rank=2, targets=('query', 'key', 'down', 'experts'), embed_dim=32,
                   scan_layers=scan_layers)
  ranks = config.model.lora.target_ranks
  ranks.query, ranks.key, ranks.head, ranks.experts = 6, 0, 3, 3
  return _with_moe(config) if with_moe else config


def _adapter_shapes(config):
  flat = traverse_util.flatten_dict(jax.eval_shape(
      make_model(config.model).init, _key(0), jnp.zeros((1, 8), jnp.int32))['params'],
      sep='/')
  return {k: x.value.shape for k, x in flat.items() if k.endswith(lora.ADAPTER_PARAMS)}


@pytest.mark.parametrize('with_moe', [False, True])
def test_per_target_ranks_give_exactly_the_expected_adapters(with_moe):
  config = _per_target_config(with_moe)
  validate(config, num_devices=1)
  m = config.model
  d, h, hd, v, e = m.embed_dim, m.num_heads, m.head_dim, m.vocab_size, m.moe.num_experts
  q, r_head, r_down, r_exp = 6, 3, 2, 3
  expected = {'head/lora_a': (d, r_head), 'head/lora_b': (r_head, v)}
  for layer in ('block_0', 'block_1'):
    expected[f'{layer}/attn/query/lora_a'] = (d, q)
    expected[f'{layer}/attn/query/lora_b'] = (q, h, hd)
  expected['block_0/mlp/down/lora_a'] = (m.mlp_dim, r_down)
  expected['block_0/mlp/down/lora_b'] = (r_down, d)
  if with_moe:  # block_1 is MoE: expert adapters at their own rank, no dense 'down'.
    x = m.moe.expert_mlp_dim
    for w, (n_in, n_out) in {'gate': (d, x), 'up': (d, x), 'down': (x, d)}.items():
      expected[f'block_1/moe/experts/{w}_lora_a'] = (e, n_in, r_exp)
      expected[f'block_1/moe/experts/{w}_lora_b'] = (e, r_exp, n_out)
  else:
    expected['block_1/mlp/down/lora_a'] = (m.mlp_dim, r_down)
    expected['block_1/mlp/down/lora_b'] = (r_down, d)
  assert _adapter_shapes(config) == expected
  assert lora.ranks(m) == _PER_TARGET_RANKS

  # The seed's xenith_beast pattern: no global rank, queries and head only.
  beast_like = _config(rank=0, embed_dim=32)
  beast_like.model.lora.target_ranks.query = 8
  beast_like.model.lora.target_ranks.head = 4
  validate(beast_like, num_devices=1)
  assert lora.enabled(beast_like.model) and lora.trains_only_adapters(beast_like.model)
  assert _adapter_shapes(beast_like) == {
      'block_0/attn/query/lora_a': (d, 8), 'block_0/attn/query/lora_b': (8, h, hd),
      'block_1/attn/query/lora_a': (d, 8), 'block_1/attn/query/lora_b': (8, h, hd),
      'head/lora_a': (d, 4), 'head/lora_b': (4, v)}
  # All 0 / -1 with rank 0: no adapters at all.
  plain = lora.plain_config(beast_like.model)
  assert not lora.enabled(plain) and not lora.trains_only_adapters(plain)


def _numpy_merge(params, ranks, alpha):
  """W + alpha / r_t * A B in float64 for every adapter, r_t the rank of its module's
  target; leading axes (scan layers, experts) are batch axes. Flat '/' keys."""
  flat = {k: np.asarray(x, np.float64) for k, x in _flat(params).items()}
  merged = {k: x for k, x in flat.items() if not k.endswith(lora.ADAPTER_PARAMS)}
  for name_a in [k for k in flat if k.endswith('lora_a')]:
    owner, leaf = name_a.rsplit('/', 1)
    target = owner.rsplit('/', 1)[-1]
    weight = f'{owner}/kernel' if leaf == 'lora_a' else f'{owner}/{leaf[:-len("_lora_a")]}'
    a, b, w = flat[name_a], flat[name_a[:-1] + 'b'], flat[weight]
    lead = a.ndim + b.ndim - w.ndim - 2  # A: [*lead, *in, r]; B: [*lead, r, *out].
    assert a.shape[-1] == b.shape[lead] == ranks[target], name_a
    product = np.matmul(a.reshape(*a.shape[:lead], -1, a.shape[-1]),
                        b.reshape(*b.shape[:lead + 1], -1))
    merged[weight] = w + alpha / ranks[target] * product.reshape(w.shape)
  return merged


@pytest.mark.parametrize('scan_layers,with_moe', [(False, True), (True, False)])
def test_per_target_adapters_compute_w_plus_alpha_over_their_own_rank(scan_layers, with_moe):
  """The adapted model equals the plain model on W + alpha / r_t * A B merged in NumPy
  (r_t: each target's own rank, not `lora.rank`), and so does `merge_lora`'s output."""
  config = _per_target_config(with_moe, scan_layers)
  config.model.lora.alpha = 5.0
  lora_model, plain_model = make_model(config.model), make_model(
      lora.plain_config(config.model))
  params = _random_adapters(_init(lora_model))
  ranks = {t: r for t, r in _PER_TARGET_RANKS.items() if with_moe or t != 'experts'}
  expected = _numpy_merge(params, ranks, alpha=5.0)

  merged = _flat(lora.merge_lora(params, config.model))
  assert set(merged) == set(expected)
  other = config.model.copy_and_resolve_references()  # Queries at another rank: refused.
  other.lora.target_ranks.query = 5
  with pytest.raises(ValueError, match=r"query/lora_a has rank 6; the config gives 'query' "
                                       'rank 5'):
    lora.merge_lora(params, other)
  for name, x in merged.items():
    np.testing.assert_allclose(x, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
  tokens = _tokens()
  adapted = _apply(lora_model)({'params': params}, tokens)
  from_numpy = traverse_util.unflatten_dict(
      {k: jnp.asarray(x, jnp.float32) for k, x in expected.items()}, sep='/')
  np.testing.assert_allclose(_apply(plain_model)({'params': from_numpy}, tokens), adapted,
                             rtol=1e-4, atol=1e-4)
  base = {k: x for k, x in _flat(params).items() if not k.endswith(lora.ADAPTER_PARAMS)}
  base_logits = _apply(plain_model)({'params': traverse_util.unflatten_dict(base, sep='/')},
                                    tokens)
  assert np.abs(adapted - base_logits).max() > 1e-2  # The adapters do something.


def test_per_target_training_reaches_only_adapters_and_describe_counts_them():
  """Gradients reach every adapter (random B, so A's too) and no base param; Adam keeps
  moments for the adapters only; describe's counts equal the real trees and a hand count."""
  config = _per_target_config(with_moe=True)
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  state = init_train_state(model, tx, config.max_seq_len, _key(0), None)
  params = _random_adapters(state.params)
  grads = jax.jit(jax.grad(make_loss_fn(model)))(params, _batch(config), jax.random.key(0))
  for name, g in _flat(grads).items():
    assert bool(np.abs(g).max() > 0) == name.endswith(lora.ADAPTER_PARAMS), name

  m = config.model
  d, x, e = m.embed_dim, m.moe.expert_mlp_dim, m.moe.num_experts
  by_target = {  # Two layers; block_0 dense, block_1 MoE (4 experts of width 64).
      'query': 2 * (d * 6 + 6 * m.num_heads * m.head_dim),
      'down': m.mlp_dim * 2 + 2 * d,
      'head': d * 3 + 3 * m.vocab_size,
      'experts': e * 2 * (d * 3 + 3 * x) + e * (x * 3 + 3 * d)}
  real = {}
  for name, value in _flat(state.params).items():
    if name.endswith(lora.ADAPTER_PARAMS):
      target = name.rsplit('/', 2)[-2]
      real[target] = real.get(target, 0) + value.size
  assert real == by_target
  total = sum(v.size for v in jax.tree.leaves(state.params))
  moments = sum(v.size for v in jax.tree.leaves(state.opt_state) if v.ndim > 0)
  assert moments == 2 * sum(by_target.values())

  summary = describe.describe(config, 1)
  assert summary['adapter_params_by_target'] == by_target
  assert summary['adapter_params'] == summary['trained_params'] == sum(by_target.values())
  assert summary['adapter_ranks'] == _PER_TARGET_RANKS
  assert summary['total_params'] == total
  assert summary['optimizer_state_gib'] * describe.GIB == 4 * moments
  assert summary['per_device_train_state_gib'] * describe.GIB == 4 * (total + 1.5 * moments)
  text = describe.format_description('per-target', summary)
  assert 'query (rank 6)' in text and 'experts (rank 3)' in text
  config.model.lora.train_only_adapters = False  # Then everything trains.
  assert describe.describe(config, 1)['optimizer_state_gib'] * describe.GIB == 8 * total


def test_init_from_checkpoint_with_per_target_ranks_keeps_fresh_adapters(tmp_path):
  config = _per_target_config()
  base_config = _per_target_config()
  base_config.model = lora.plain_config(config.model)
  base = _flat(_save_checkpoint(tmp_path / 'base', base_config))
  fresh = init_train_state(make_model(config.model), optimizer.create_optimizer(config),
                           config.max_seq_len, _key(7), None).params
  params = _flat(checkpointing.load_base_params(str(tmp_path / 'base'), fresh))
  adapters = {k for k in params if k.endswith(lora.ADAPTER_PARAMS)}
  assert set(params) - adapters == set(base)
  assert {k.rsplit('/', 2)[-2] for k in adapters} == {'query', 'down', 'head'}
  for name, value in params.items():
    want = _flat(fresh)[name] if name in adapters else base[name]
    np.testing.assert_array_equal(value, want, err_msg=name)


def test_target_ranks_from_the_command_line_beast_example():
  """The docs' xenith_beast command line: rank 256 on the queries and the head only."""
  argv = ['main.py', f'--config={ROOT}/experiments/xenith_beast.py',
          '--config.model.lora.rank=0', '--config.model.lora.target_ranks.query=256',
          '--config.model.lora.target_ranks.head=256']
  flag_values = flags.FlagValues()  # main.py's parsing, on private flags.
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  validate(config, num_devices=64)
  assert lora.ranks(config.model) == {'query': 256, 'head': 256}
  m = config.model
  summary = describe.describe(config, 64)
  assert summary['adapter_params_by_target'] == {
      'query': m.num_layers * (m.embed_dim + m.num_heads * m.head_dim) * 256,
      'head': (m.embed_dim + m.vocab_size) * 256}


@pytest.mark.parametrize('overrides,message', [
    ({'target_ranks.query': -2},
     r"config.model.lora.target_ranks.query: -2 must be an int >= -1 \(-1 = lora.rank if "
     r"'query' is in lora.targets, 0 = no adapter, > 0 = that rank\)"),
    ({'target_ranks.head': 4}, r"config.model.lora.target_ranks.head: 'head' needs "
                               r'config.model.tie_embeddings=False'),
    ({'target_ranks.experts': 4, 'dropout': 0.1},
     r"config.model.lora.dropout: 0.1 must be 0 with adapters on 'experts' "
     r'\(config.model.lora.target_ranks.experts; expert adapters are folded'),
    # tiny: embed 64, 4 query heads and 2 kv heads of 16, mlp 128.
    ({'target_ranks.query': 65},
     r"config.model.lora.target_ranks.query: 65 exceeds 64, the smaller dimension "
     r"\(min\(inputs, outputs\)\) of the 'query' layers"),
    ({'rank': 33, 'targets': ('value',)},
     r"config.model.lora.rank: 33 exceeds 32, the smaller dimension .* 'value' layers"),
    ({'rank': 8, 'targets': ('up',), 'target_ranks.up': 129},
     r"config.model.lora.target_ranks.up: 129 exceeds 64"),
])
def test_invalid_target_ranks_are_named(overrides, message):
  config = default.get_config('size=tiny')  # Tied head; rank 0: no adapters yet.
  for field, value in overrides.items():
    node = config.model.lora
    *parents, leaf = field.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate(config, num_devices=8)


def test_unknown_target_rank_and_rank_limits_agree_with_the_model():
  config = default.get_config('size=tiny')
  config.model.lora.target_ranks.router = 4  # Not a target (added in Python).
  with pytest.raises(ConfigError, match=r"config.model.lora.target_ranks: \['router'\] are "
                                        'not LoRA targets'):
    validate(config, num_devices=8)
  # The limits are the smaller dimensions of the real kernels: dense prefix, MoE experts,
  # shared experts of another width, head; every rank up to them passes.
  config = _with_moe(_config(rank=1, embed_dim=128, mlp_dim=48))
  config.model.vocab_size = 100
  config.model.moe.num_shared_experts = 2  # One Mlp of width 2 * 64 = 128.
  config.model.moe.expert_mlp_dim = 64
  flat = traverse_util.flatten_dict(jax.eval_shape(
      make_model(config.model).init, _key(0), jnp.zeros((1, 8), jnp.int32))['params'],
      sep='/')
  smallest = {}
  for name, a in flat.items():
    if name.endswith('lora_a'):  # A: [*in, r]; B: [r, *out] (plus a leading expert axis).
      lead = 1 if '/experts/' in name else 0
      b = flat[name[:-1] + 'b']
      dims = min(math.prod(a.value.shape[lead:-1]), math.prod(b.value.shape[lead + 1:]))
      target = name.rsplit('/', 2)[-2]
      smallest[target] = min(smallest.get(target, dims), dims)
  limits = config_validation._lora_rank_limits(config.model)  # pylint: disable=protected-access
  assert limits == smallest == {'query': 64, 'out': 64, 'key': 32, 'value': 32, 'gate': 48,
                                'up': 48, 'down': 48, 'head': 100, 'experts': 64}
  for target, limit in limits.items():
    config.model.lora.target_ranks[target] = limit
  validate(config, num_devices=1)


# End to end, with real processes, as a user runs it.

def _run(*args, script='main.py'):
  result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=single_device_env(),
                          capture_output=True, text=True, timeout=900)
  if result.returncode:
    raise AssertionError(f'{script} {args} failed:\n{result.stderr[-4000:]}')
  return result


_SHORT = ('--config.log_every_steps=1', '--config.eval_every_steps=4',
          '--config.num_eval_batches=1', '--config.checkpoint_every_steps=4',
          '--config.optimizer.warmup_steps=1', '--config.num_train_steps=4')


def _saved_params(workdir, step=4):
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return _flat(state['params']), state['opt_state']


@pytest.mark.slow
def test_lora_finetune_of_a_trained_checkpoint_through_main(tmp_path):
  base_dir, lora_dir = str(tmp_path / 'base'), str(tmp_path / 'lora')
  _run('--config=experiments/default.py:size=tiny', f'--workdir={base_dir}', *_SHORT)
  # Per-target ranks from the command line: queries at 4 (the rest of the targets at the
  # experiment's rank 8), keys without adapters.
  ranks = ('--config.model.lora.target_ranks.query=4', '--config.model.lora.target_ranks.key=0')
  result = _run(f'--config=experiments/lora_finetune.py:base={base_dir},size=tiny',
                f'--workdir={lora_dir}', *ranks, *_SHORT)
  assert 'Initialised 20 base params from' in result.stderr

  base, _ = _saved_params(base_dir)
  tuned, opt_state = _saved_params(lora_dir)
  adapters = {k for k in tuned if k.endswith(lora.ADAPTER_PARAMS)}
  assert adapters and set(tuned) - adapters == set(base)
  assert {k.rsplit('/', 2)[-2] for k in adapters} == {'query', 'value', 'out', 'gate', 'up',
                                                      'down'}
  assert {tuned[k].shape[-1] for k in adapters if '/query/lora_a' in k} == {4}
  for name in base:  # The frozen base is bit-identical to the trained checkpoint.
    np.testing.assert_array_equal(tuned[name], base[name], err_msg=name)
  for name in adapters:
    if name.endswith('lora_b'):  # B starts at 0; training moved it.
      assert np.abs(tuned[name]).max() > 0, name
  moments = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
  assert sum(x.size for x in moments) == 2 * sum(tuned[k].size for k in adapters)
  with open(os.path.join(lora_dir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 4
  assert np.isfinite(final['train/loss']) and np.isfinite(final['eval/loss'])

  # Merge, then start a plain run from the merged weights.
  merged_dir = str(tmp_path / 'merged')
  result = _run(f'--config=experiments/lora_finetune.py:base={base_dir},size=tiny',
                f'--workdir={lora_dir}', f'--out={merged_dir}', *ranks,
                script='launch/merge_lora.py')
  max_diff = float(result.stdout.split('by at most ')[1].rstrip('.\n'))
  assert max_diff < 1e-4
  config = lora_finetune.get_config(f'base={base_dir},size=tiny')
  config.model.lora.target_ranks.query, config.model.lora.target_ranks.key = 4, 0
  merged = checkpointing.load_params(merged_dir, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding
                                     .SingleDeviceSharding(jax.devices()[0])),
      traverse_util.unflatten_dict(base, sep='/')))
  # Every merged kernel is W + alpha / r * A @ B (r = 4 for queries, 8 for the rest), in
  # NumPy from the trained adapters.
  flat_merged = _flat(merged)
  assert set(flat_merged) == set(base)
  for name in base:
    owner = name[:-len('kernel')]
    want = np.asarray(tuned[name], np.float64)
    if owner + 'lora_a' in tuned:
      a, b = (np.asarray(tuned[owner + n], np.float64) for n in ('lora_a', 'lora_b'))
      factor = config.model.lora.alpha / (4 if owner.endswith('/query/') else 8)
      want = want + factor * np.tensordot(a, b, axes=1)
    np.testing.assert_allclose(flat_merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  # The merged plain model and the adapted model, both run here, give the same logits.
  tokens = _tokens((2, config.max_seq_len), seed=5)
  adapted = make_model(config.model).apply(
      {'params': traverse_util.unflatten_dict(tuned, sep='/')}, tokens)
  plain = make_model(lora.plain_config(config.model)).apply({'params': merged}, tokens)
  assert np.abs(adapted - make_model(lora.plain_config(config.model)).apply(
      {'params': traverse_util.unflatten_dict(base, sep='/')}, tokens)).max() > 1e-4
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)
