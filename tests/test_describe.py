"""`--mode=describe`: sizes from eval_shape agree with real params and with hand counts."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from experiments import default
from experiments import memory as memory_experiment
from experiments import moe as moe_experiment
from experiments import xenith_beast
from experiments import xenith_mini
from xenith.sizing import compiled
from xenith.sizing import describe
from xenith.sizing import flops
from xenith.train import optimizer
from xenith import sharding
from xenith.model import layer_stacks
from xenith.model.build import make_model
from xenith.train.train_state import abstract_train_state, init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hand_count(config):
  """Total and active params of a (MoE, memory) decoder from its shapes, by hand."""
  m, moe = config.model, config.model.moe
  d = m.embed_dim
  attention = d * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  norms = 2 * d
  dense_mlp = 3 * d * m.mlp_dim
  expert = 3 * d * moe.expert_mlp_dim
  shared = moe.num_shared_experts * expert
  router = d * moe.num_experts
  moe_layers = m.num_layers - moe.first_dense_layers
  embed = m.vocab_size * d * (1 if m.tie_embeddings else 2)
  common = m.num_layers * (attention + norms) + moe.first_dense_layers * dense_mlp
  common += moe_layers * (router + shared) + embed + d
  mem = m.memory
  if mem.chunk_size:  # The summarizer: S learned queries, L layers, a final norm.
    layer = 4 * d * d + 3 * d + 2 * d * m.mlp_dim  # Cross-attention, 3 norms, MLP.
    if mem.summarizer_self_attention:
      layer += 4 * d * d + d  # Self-attention and its norm.
    common += mem.summary_tokens * d + mem.summarizer_layers * layer + d
  total = common + moe_layers * moe.num_experts * expert
  active = common + moe_layers * moe.num_experts_per_token * expert
  return total, active


@pytest.mark.parametrize('module,devices', [(xenith_mini, 16), (xenith_beast, 64)])
def test_seed_configs_match_hand_counts(module, devices):
  config = module.get_config()
  d = describe.describe(config, devices)
  total, active = _hand_count(config)
  assert d['total_params'] == total
  assert d['active_params'] == pytest.approx(active)


@pytest.mark.parametrize('module', [xenith_mini, xenith_beast])
def test_train_mfu_flops_count_moe_layers_as_describe_does(module):
  """`flops.train_flops_per_token` (train/mfu) counts k of E experts, like describe."""
  config = module.get_config()
  d = describe.describe(config, 8)
  assert flops.train_flops_per_token(config.model, config.max_seq_len) == pytest.approx(
      d['train_flops_per_token'], rel=1e-9)


def test_attention_flops_count_windows():
  model = default.get_config('size=tiny').model
  full = flops.attention_flops_per_token(model, 1024)
  assert full == 2 * 4 * model.num_heads * model.head_dim * 1024  # 2 layers, all keys.
  model.attention.window_sizes = (128,)
  model.attention.num_global_tokens = 64
  model.attention.full_attention_layers = 1
  assert flops.attention_flops_per_token(model, 1024) == pytest.approx(full * (1 + 192 / 1024) / 2)


def _memory_flops_per_token(**fields):
  """(XLA's FLOPs per token of one chunk's forward pass, ours, the config) for the tiny
  memory model with `fields` ('memory.x' or 'attention.x') changed; the chunk's length
  stays the tiny model's (memory.chunk_size=0: the same tokens without memory)."""
  config = memory_experiment.get_config('size=tiny')
  m = config.model
  length = m.memory.chunk_size
  for key, value in fields.items():
    group, name = key.split('.')
    m[group][name] = value
  m.attention.implementation = 'dense'  # Memory chunks use the dense kernel too.
  model = make_model(m)
  tokens = jnp.zeros((1, length), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  # The whole output: without the memory state the summarizer would be dead code.
  cost = jax.jit(lambda p, t: model.apply(p, t, method='forward')).lower(
      params, tokens).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ours = 2 * flops.matmul_params(m) + flops.attention_flops_per_token(m, length)
  return cost['flops'] / length, ours, config


@pytest.mark.parametrize('base,changed', [
    # Global tokens kept in the state: G more keys per query in windowed layers.
    ({'attention.window_sizes': (8,)}, {'attention.num_global_tokens': 32}),
    # The summarizer's self-attention: q, k, v, o of the S summaries and S^2 scores.
    ({'memory.summary_tokens': 8}, {'memory.summarizer_self_attention': True}),
    # A short-term memory over 3 chunks instead of 1.
    ({'memory.short_term_tokens': 16}, {'memory.short_term_tokens': 48}),
], ids=['global_tokens', 'summarizer_self_attention', 'long_short_term'])
def test_seed_memory_features_flops_match_xla(base, changed):
  """What each seed memory feature adds per token is within 20% of what XLA counts
  (XLA also counts the masking and softmax on the extra scores, ~15% of their dots)."""
  xla_base, ours_base, _ = _memory_flops_per_token(**base)
  xla_changed, ours_changed, _ = _memory_flops_per_token(**{**base, **changed})
  assert xla_changed > xla_base
  assert ours_changed - ours_base == pytest.approx(xla_changed - xla_base, rel=0.2)


def test_memory_flops_match_the_compiled_chunk():
  """What chunk-summary memory adds per token (summarizer, bank projections, the bank
  and short-term keys in the scores) is within 15% of what XLA's cost analysis counts
  for one chunk, memory vs the same model without it; describe uses the same count."""
  xla_memory, ours_memory, config = _memory_flops_per_token()
  xla_plain, ours_plain, _ = _memory_flops_per_token(**{'memory.chunk_size': 0})
  assert ours_memory - ours_plain == pytest.approx(xla_memory - xla_plain, rel=0.15)
  assert describe.describe(config, 1)['inference_flops_per_token'] == pytest.approx(
      ours_memory)


def test_xenith_mini_is_not_what_the_seed_claims():
  d = describe.describe(xenith_mini.get_config(), 16)
  # The seed says ~50B total, ~10B active; its own shapes give ~155B and ~45B (151B and
  # 41B of them without the memory's 4-layer, width-8192 summarizer).
  assert 155e9 < d['total_params'] < 156e9
  assert 45e9 < d['active_params'] < 46e9


def test_per_device_memory_matches_a_real_sharded_state():
  config = default.get_config('size=tiny')
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  rules = config.logical_axis_rules
  d = describe.describe(config, 8)
  mesh = sharding.create_mesh(config.mesh)
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = abstract_train_state(model, tx, config.max_seq_len, mesh, rules)
    state = init_train_state(model, tx, config.max_seq_len, jax.random.key(0), shardings)
  shard_elements = sum(x.addressable_shards[0].data.size
                       for x in jax.tree_util.tree_leaves(state.params))
  total = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  assert d['total_params'] == total
  assert d['per_device_params_gib'] * describe.GIB == 4 * shard_elements
  assert shard_elements < total  # The mesh really splits something.


def test_main_describe_needs_no_workdir():
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/xenith_mini.py', '--mode=describe',
       '--num_devices=16'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'total parameters' in result.stdout
  assert '155.16 B' in result.stdout and '45.24 B' in result.stdout


def _scanned_tiny(moe_layers: bool):
  """A tiny scanned model on an 8-device mesh: dense (one stack of 3) or MoE (2 dense
  layers, then 3 MoE layers: two stacks, both scaled from 1-2 repeats)."""
  if moe_layers:
    config = moe_experiment.get_config('size=tiny')
    config.model.num_layers, config.model.moe.first_dense_layers = 5, 2
    config.mesh.data, config.mesh.fsdp, config.mesh.expert = 2, 2, 2
  else:
    config = default.get_config('size=tiny')
    config.model.num_layers = 3
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.model.scan_layers = True
  return config


@pytest.mark.parametrize('moe_layers', [False, True], ids=['dense', 'moe'])
def test_compiled_train_step_agrees_with_describe(moe_layers):
  """`--compile`'s figures (xenith/sizing/compiled.py): the compiled state has describe's
  parameter count, its arguments are describe's params + AdamW state per device plus the
  batch, and XLA's FLOPs per token (every stack scaled from 1-2 unrolled repeats) are
  within 10% of describe's count (XLA adds the elementwise work describe leaves out)."""
  config = _scanned_tiny(moe_layers)
  d = describe.describe(config, 8)
  stacks = layer_stacks.plan(ml_collections.FrozenConfigDict(config.model))
  assert [s.repeats for s in stacks] == ([2, 3] if moe_layers else [3])

  memory = compiled.memory_per_device(config)
  assert memory['params'] == d['total_params']
  rows = config.global_batch_size // 8  # The batch is split over all 8 devices.
  batch = 3 * rows * config.max_seq_len * 4  # inputs, segment_ids, positions: int32.
  state = 3 * d['per_device_params_gib'] * describe.GIB  # Params, mu, nu.
  # Plus the step, AdamW's count, the key and alignment padding: well under 1%.
  assert state + batch <= memory['argument_size_in_bytes'] <= (state + batch) * 1.01
  assert memory['total_bytes'] > memory['argument_size_in_bytes']

  counted = compiled.train_flops_per_token(config)
  assert set(counted['per_repeat_flops_per_token']) == {s.name for s in stacks if s.repeats > 1}
  assert counted['train_flops_per_token'] == pytest.approx(d['train_flops_per_token'], rel=0.1)


def test_main_describe_compile():
  """`main.py --mode=describe --compile` prints the compiled figures (simulated devices
  in a child process); --compile with another mode is refused."""
  overrides = ['--config.model.num_layers=1', '--config.mesh.data=2', '--config.mesh.fsdp=-1']
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny',
       '--mode=describe', '--compile', '--num_devices=4', *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})  # 1 device here.
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert 'Compiled train step (XLA:CPU, 4 simulated devices' in out
  assert "XLA:CPU compile's buffers per device on 4 devices" in out
  params = [line.split()[-1] for line in out.splitlines() if line.startswith('parameters (')]
  assert len(params) == 2 and params[0] == params[1]
  refused = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny', '--compile',
       '--workdir=/nonexistent'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert refused.returncode != 0
  assert '--compile works with --mode=describe only' in refused.stderr


def test_compiled_flops_of_a_scanned_memory_model_match_its_unrolled_layers():
  """Chunk-summary memory with scan_layers (2 stacks; the layers a sizing compile leaves
  out reuse a built layer's keys for the state): the FLOPs scaled from 1-2 unrolled
  repeats of each stack equal XLA's count of the same model with every layer unrolled
  (scan_layers off: no layer loop to under-count)."""
  config = memory_experiment.get_config('size=tiny')
  config.model.scan_layers = True
  config.model.num_layers, config.model.memory.layers = 3, (1, 2)
  stacks = layer_stacks.plan(ml_collections.FrozenConfigDict(config.model))
  assert [s.repeats for s in stacks] == [1, 2]
  scaled = compiled.train_flops_per_token(config)
  assert set(scaled['per_repeat_flops_per_token']) == {stacks[1].name}
  config.model.scan_layers = False
  unrolled = compiled.train_flops_per_token(config)
  assert scaled['train_flops_per_token'] == pytest.approx(
      unrolled['train_flops_per_token'], rel=0.01)
