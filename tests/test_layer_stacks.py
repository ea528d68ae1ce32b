"""`scan_layers` for models whose layers differ: the stacks `layer_stacks.plan` cuts, and a
scanned model equal to the unscanned one with the same weights.

The stacks are checked against hand-derived layouts; the scanned model against the
layer-by-layer loop (itself checked against the dense references in test_attention.py,
test_moe_reference.py), logits, MoE router stats and gradients, with the weights moved
between the layouts by NumPy stacking written here.
"""

import functools

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import default
from xenith import config_validation
from xenith.model import build
from xenith.model import layer_stacks


def _model(num_layers=7, scan_layers=False, **fields):
  config = default.get_config('size=tiny')
  m = config.model
  m.vocab_size, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim = 64, 32, 4, 2, 8
  m.mlp_dim, m.num_layers, m.scan_layers = 48, num_layers, scan_layers
  m.attention.block_size = 8
  for key, value in fields.items():
    target = m
    *path, last = key.split('.')
    for part in path:
      target = target[part]
    target[last] = value
  config_validation.validate(config, num_devices=1)
  return m


def _plan(model):
  return [(s.name, s.first, s.unit, s.repeats)
          for s in layer_stacks.plan(ml_collections.FrozenConfigDict(model))]


def test_plan_of_the_seed_like_layout():
  """64 layers: 8 dense full-attention, then MoE layers taking the 3 windows in turn."""
  model = _model(64, **{'attention.window_sizes': (512, 1024, 2048),
                        'attention.window_split': 'layers',
                        'attention.full_attention_layers': 8, 'moe.num_experts': 4,
                        'moe.first_dense_layers': 8})
  # 56 sparse layers = 512, 1024, then 18 x (2048, 512, 1024): 1 + 1 + 1 + 3 layers
  # compile (a 2-layer unit that does not repeat is two single-layer stacks).
  assert _plan(model) == [('layers_0_7', 0, 1, 8), ('layers_8', 8, 1, 1),
                          ('layers_9', 9, 1, 1), ('layers_10_63', 10, 3, 18)]


@pytest.mark.parametrize('num_layers,fields,want', [
    (4, {}, [('layers', 0, 1, 4)]),  # The layouts that predate general stacks keep
    (4, {'moe.num_experts': 4, 'moe.first_dense_layers': 1},  # their names.
     [('dense_layers', 0, 1, 1), ('moe_layers', 1, 1, 3)]),
    (4, {'moe.num_experts': 4}, [('moe_layers', 0, 1, 4)]),
    # Dense, MoE in turn after one dense layer: a unit of 2.
    (7, {'moe.num_experts': 4, 'moe.first_dense_layers': 1, 'moe.moe_every': 2},
     [('layers_0', 0, 1, 1), ('layers_1_6', 1, 2, 3)]),
    # Windows in every layer, split by heads: one pattern, one stack.
    (5, {'attention.window_sizes': (4, 8)}, [('layers', 0, 1, 5)]),
    # Two windows by layer and MoE every third layer: the unit is their lcm, 6.
    (12, {'attention.window_sizes': (4, 8), 'attention.window_split': 'layers',
          'moe.num_experts': 4, 'moe.moe_every': 3}, [('layers_0_11', 0, 6, 2)]),
    # Bank-reading memory layers differ from the others.
    (6, {'memory.chunk_size': 16, 'memory.layers': (1, 3, 5)}, [('layers_0_5', 0, 2, 3)]),
])
def test_plan(num_layers, fields, want):
  config = _model(num_layers, **fields)
  config.max_seq_len = 32
  assert _plan(config) == want


def _to_scanned(params, model):
  """Unscanned params -> the scanned layout of `model`, stacked here with NumPy."""
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if not k[0].startswith('block_')}
  for stack in layer_stacks.plan(ml_collections.FrozenConfigDict(model)):
    for j in range(stack.unit):
      prefix = (stack.name,) if stack.unit == 1 else (stack.name, f'block_{j}')
      first = f'block_{stack.first + j}'
      for key in [k[1:] for k in flat if k[0] == first]:
        out[prefix + key] = np.stack([
            flat[(f'block_{stack.first + r * stack.unit + j}',) + key]
            for r in range(stack.repeats)])
  return traverse_util.unflatten_dict(out)


def _assert_scan_equals_loop(loop_model, params, scan_model, scan_params, scan, extra,
                             tokens, **kwargs):
  """The scanned model's logits, `extra` output (router stats, memory state) and
  gradients of a loss equal the layer loop's; returns the loop's logits."""
  def loss(model, p):
    out = model.apply({'params': p}, tokens, method='forward', **kwargs)
    return jnp.mean(out.logits ** 2), (out.logits, getattr(out, extra))

  (_, (want, want_extra)), want_grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, loop_model), has_aux=True))(params)
  (_, (got, got_extra)), got_grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, scan_model), has_aux=True))(scan_params)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert jax.tree.structure(got_extra) == jax.tree.structure(want_extra)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               got_extra, want_extra)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               got_grads, _to_scanned(want_grads, scan))
  return want


@pytest.mark.parametrize('fields', [
    # A full-attention prefix, windows by layer, global tokens, MoE every other layer.
    # Layers 1-8 repeat (window 4 + MLP, window 8 + MoE): 9 layers, 2 stacks.
    {'attention.window_sizes': (4, 8), 'attention.window_split': 'layers',
     'attention.full_attention_layers': 1, 'attention.num_global_tokens': 3,
     'moe.num_experts': 4, 'moe.expert_mlp_dim': 16, 'moe.first_dense_layers': 1,
     'moe.moe_every': 2, 'moe.dispatch': 'dense', 'num_layers': 9},
    # Windows by heads after a full prefix, remat inside the scan.
    {'attention.window_sizes': (4, 8), 'attention.full_attention_layers': 2,
     'remat': 'full', 'num_layers': 5},
])
def test_scanned_stacks_equal_the_layer_loop(fields):
  fields = dict(fields)
  num_layers = fields.pop('num_layers', 7)
  loop, scan = _model(num_layers, **fields), _model(num_layers, scan_layers=True, **fields)
  plan = layer_stacks.plan(ml_collections.FrozenConfigDict(scan))
  assert len(plan) > 1 and max(s.repeats for s in plan) > 1
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
  segment_ids = jnp.asarray([[1] * 13 + [2] * 11, [1] * 20 + [0] * 4], jnp.int32)
  loop_model, scan_model = build.make_model(loop), build.make_model(scan)
  params = nn.unbox(loop_model.init(jax.random.key(0), tokens))['params']
  scan_params = _to_scanned(params, scan)
  want_shapes = jax.eval_shape(scan_model.init, jax.random.key(0), tokens)
  assert (jax.tree.map(jnp.shape, scan_params)
          == jax.tree.map(jnp.shape, nn.unbox(want_shapes)['params']))

  _assert_scan_equals_loop(loop_model, params, scan_model, scan_params, scan, 'moe_stats',
                           tokens, segment_ids=segment_ids)


def test_split_and_join_convert_between_layouts():
  fields = {'attention.window_sizes': (4, 8, 16), 'attention.window_split': 'layers',
            'attention.full_attention_layers': 1}
  loop, scan = _model(**fields), _model(scan_layers=True, **fields)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(build.make_model(loop).init(jax.random.key(0), tokens))['params']
  params = jax.tree.map(np.asarray, params)
  blocks, rest = layer_stacks.split_layers(traverse_util.flatten_dict(params), loop)
  scanned = layer_stacks.join_layers(blocks, rest, scan, scan_layers=True)
  want = traverse_util.flatten_dict(_to_scanned(params, scan))
  assert sorted(scanned) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(scanned[key], value)
  blocks, rest = layer_stacks.split_layers(scanned, scan)
  back = layer_stacks.join_layers(blocks, rest, loop, scan_layers=False)
  assert back.keys() == traverse_util.flatten_dict(params).keys()
  for key, value in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(back[key], value)


def test_scanned_memory_model_equals_the_layer_loop():
  """Chunk-summary memory with scanned stacks (bank-reading layers every other layer,
  windows, global tokens, a short-term memory over 2 chunks): logits, the memory state
  and gradients over 3 chunks, and token-by-token decoding, equal the layer loop's."""
  fields = {'attention.window_sizes': (4, 8), 'attention.full_attention_layers': 1,
            'attention.num_global_tokens': 3, 'memory.chunk_size': 8,
            'memory.short_term_tokens': 16, 'memory.layers': (2, 4), 'memory.bank_size': 4,
            'memory.summary_tokens': 2, 'memory.summarizer_heads': 2,
            'memory.summarizer_self_attention': True, 'memory.eviction': 'lru',
            'moe.num_experts': 4, 'moe.expert_mlp_dim': 16, 'moe.first_dense_layers': 1,
            'moe.dispatch': 'dense'}
  loop, scan = _model(5, **fields), _model(5, scan_layers=True, **fields)
  # Layer 0 full + dense; 1-4 windowed MoE, 2 and 4 reading the bank: a unit of 2.
  assert _plan(scan) == [('layers_0', 0, 1, 1), ('layers_1_4', 1, 2, 2)]
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
  loop_model, scan_model = build.make_model(loop), build.make_model(scan)
  params = nn.unbox(loop_model.init(jax.random.key(0), tokens))['params']
  scan_params = _to_scanned(params, scan)

  want = _assert_scan_equals_loop(loop_model, params, scan_model, scan_params, scan,
                                  'memory', tokens)
  decode = jax.jit(lambda p, t: scan_model.apply({'params': p}, t, decode=True,
                                                 method='forward'))
  decoded = decode(scan_params, tokens[:, :11])
  np.testing.assert_allclose(decoded.logits, want[:, :11], atol=1e-5, rtol=1e-5)
