"""The optimizer (xenith/train/optimizer.py) against hand-written expectations and NumPy.

- Which params decay, listed by name for dense, MoE, LoRA and memory models, scanned
  and not: norm scales and biases never decay, whatever their rank.
- The learning-rate schedule at chosen steps against its closed form.
- Clipping and AdamW updates over several steps against a NumPy AdamW.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import default
from xenith.train import optimizer
from xenith.model.build import make_model

LR, WD = 0.5, 0.1


def _path(path) -> str:
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _norms(prefixes, *names):
  """'<prefix>/<norm>/<param>' for every prefix, norm and param (scale or bias)."""
  params = ('scale', 'bias') if 'bias' in names else ('scale',)
  norms = [n for n in names if n != 'bias']
  return {f'{p}/{n}/{w}' for p in prefixes for n in norms for w in params}


_BLOCK_NORMS = ('attn_norm', 'mlp_norm')
_SUMMARIZER_NORMS = ('query_norm_0', 'context_norm_0', 'mlp_norm_0', 'out_norm')

# name -> (model overrides, the params that must NOT decay: every norm scale and bias).
CASES = {
    'dense': ({}, _norms(['block_0', 'block_1'], *_BLOCK_NORMS) | {'final_norm/scale'}),
    'dense_scanned': ({'scan_layers': True},
                      _norms(['layers'], *_BLOCK_NORMS) | {'final_norm/scale'}),
    'moe': ({'moe.num_experts': 4, 'moe.num_shared_experts': 1, 'moe.first_dense_layers': 1},
            _norms(['block_0', 'block_1'], *_BLOCK_NORMS) | {'final_norm/scale'}),
    'moe_scanned': ({'moe.num_experts': 4, 'moe.first_dense_layers': 1, 'scan_layers': True},
                    _norms(['dense_layers', 'moe_layers'], *_BLOCK_NORMS)
                    | {'final_norm/scale'}),
    'lora_layernorm': ({'lora.rank': 2, 'lora.train_only_adapters': False,
                        'lora.targets': ('query', 'down', 'head', 'experts'),
                        'tie_embeddings': False, 'norm': 'layernorm', 'moe.num_experts': 2},
                       _norms(['block_0', 'block_1'], *_BLOCK_NORMS, 'bias')
                       | {'final_norm/scale', 'final_norm/bias'}),
    'lora_scanned': ({'lora.rank': 2, 'lora.train_only_adapters': False,
                      'scan_layers': True},
                     _norms(['layers'], *_BLOCK_NORMS) | {'final_norm/scale'}),
    'memory': ({'memory.chunk_size': 8, 'memory.layers': (1,), 'norm': 'layernorm'},
               _norms(['block_0', 'block_1'], *_BLOCK_NORMS, 'bias')
               | {'final_norm/scale', 'final_norm/bias'}
               | _norms(['summarizer'], *_SUMMARIZER_NORMS, 'bias')),
}


def _config(overrides=()):
  config = default.get_config('size=tiny')
  config.num_train_steps = 10
  config.optimizer.update(learning_rate=LR, warmup_steps=0, end_lr_fraction=1.0,
                          weight_decay=WD, grad_clip_norm=1.0)
  for field, value in dict(overrides).items():
    *parents, name = field.split('.')
    node = config.model
    for p in parents:
      node = node[p]
    node[name] = value
  return config


def _random_params(config):
  """Random params of the config's model, with their logical-axis boxes."""
  model = make_model(config.model)
  length = config.model.memory.chunk_size or 8
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, length), jnp.int32))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                      boxed['params'])


@pytest.mark.parametrize('case', list(CASES))
def test_norm_scales_and_biases_never_decay_and_every_matrix_does(case):
  overrides, no_decay = CASES[case]
  config = _config(overrides)
  boxed = _random_params(config)
  params = nn.meta.unbox(boxed)
  tx = optimizer.create_optimizer(config)
  # Zero gradients: Adam's step is 0, so an update is exactly -lr * wd * p or nothing.
  zeros = jax.tree.map(jnp.zeros_like, params)
  # Initialised with the boxed params, as the train state is, then updated unboxed.
  updates, _ = tx.update(zeros, nn.meta.unbox(tx.init(boxed)), params)
  flat = {_path(p): (np.asarray(u), np.asarray(x)) for (p, u), x in zip(
      jax.tree_util.tree_leaves_with_path(updates), jax.tree_util.tree_leaves(params))}
  assert no_decay <= set(flat), sorted(no_decay - set(flat))
  decayed = {name for name, (u, _) in flat.items() if np.any(u != 0)}
  assert decayed == set(flat) - no_decay, (
      f'decay but should not: {sorted(decayed & no_decay)}; '
      f'should decay but do not: {sorted(set(flat) - no_decay - decayed)}')
  for name in decayed:
    u, x = flat[name]
    np.testing.assert_allclose(u, -LR * WD * x, rtol=1e-6, err_msg=name)


def test_only_adapters_update_and_decay_when_the_base_is_frozen():
  config = _config({'lora.rank': 2, 'lora.targets': ('query', 'experts'),
                    'moe.num_experts': 2, 'scan_layers': True})
  params = nn.meta.unbox(_random_params(config))
  tx = optimizer.create_optimizer(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  decayed = {_path(p) for p, u in jax.tree_util.tree_leaves_with_path(updates)
             if np.any(np.asarray(u) != 0)}
  assert decayed == {
      'moe_layers/attn/query/lora_a', 'moe_layers/attn/query/lora_b',
      *(f'moe_layers/moe/experts/{w}_lora_{ab}' for w in ('gate', 'up', 'down')
        for ab in 'ab')}


def _schedule_reference(step, peak, warmup, total, end_fraction):
  """Linear warmup from 0, then cosine from the peak to end_fraction * peak at `total`."""
  end = peak * end_fraction
  if step < warmup:
    return peak * step / warmup
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_learning_rate_schedule_at_chosen_steps():
  config = default.get_config('size=tiny')
  config.num_train_steps = 350
  config.optimizer.update(learning_rate=3e-3, warmup_steps=50, end_lr_fraction=0.1)
  schedule = optimizer.learning_rate_schedule(config)
  for step in (0, 1, 25, 49, 50, 51, 100, 200, 300, 349, 350, 500):
    want = _schedule_reference(step, 3e-3, 50, 350, 0.1)
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-12,
                               err_msg=f'step {step}')
  # Landmarks by hand: half the peak mid-warmup, the peak after it, halfway down the
  # cosine at its midpoint, the floor at the end.
  np.testing.assert_allclose(float(schedule(25)), 1.5e-3, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(50)), 3e-3, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(200)), (3e-3 + 3e-4) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(350)), 3e-4, rtol=1e-5)


def _numpy_adamw(params, grads_per_step, config, decay_mask):
  """AdamW with global-norm clipping and optax's bias correction, in float64."""
  opt = config.optimizer
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in params.items()}
  params = {k: v.astype(np.float64) for k, v in params.items()}
  history = []
  for t, grads in enumerate(grads_per_step):
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64)**2)) for g in grads.values()))
    clip = opt.grad_clip_norm / norm if opt.grad_clip_norm and norm > opt.grad_clip_norm else 1.0
    lr = _schedule_reference(t, opt.learning_rate, opt.warmup_steps,
                             config.num_train_steps, opt.end_lr_fraction)
    for k in params:
      g = grads[k] * clip
      mu[k] = opt.b1 * mu[k] + (1 - opt.b1) * g
      nu[k] = opt.b2 * nu[k] + (1 - opt.b2) * g * g
      m_hat = mu[k] / (1 - opt.b1**(t + 1))
      v_hat = nu[k] / (1 - opt.b2**(t + 1))
      step = m_hat / (np.sqrt(v_hat) + opt.eps)
      if decay_mask[k]:
        step = step + opt.weight_decay * params[k]
      params[k] = params[k] - lr * step
    history.append(dict(params))
  return history


@pytest.mark.parametrize('clip', [0.0, 1.0])
def test_adamw_steps_with_clipping_equal_numpy(clip):
  """Four steps with gradients of norms above and below the clip, through warmup."""
  config = default.get_config('size=tiny')
  config.num_train_steps = 20
  # eps comparable to the gradients, so the clipped scale shows in the step sizes.
  config.optimizer.update(learning_rate=0.1, warmup_steps=2, end_lr_fraction=0.1,
                          b1=0.8, b2=0.9, eps=1e-2, weight_decay=0.3, grad_clip_norm=clip)
  rng = np.random.default_rng(1)
  shapes = {'kernel': (3, 4), 'scale': (2, 4), 'bias': (4,), 'embedding': (5, 3)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  norms = (3.0, 0.5, 10.0, 0.9)  # Global gradient norms: clipped at 1.0 or not.
  grads_per_step = []
  for target in norms:
    g = {k: rng.normal(size=s) for k, s in shapes.items()}
    total = math.sqrt(sum(np.sum(v**2) for v in g.values()))
    grads_per_step.append({k: (v * target / total).astype(np.float32) for k, v in g.items()})
  want = _numpy_adamw(params, grads_per_step, config,
                      {'kernel': True, 'scale': False, 'bias': False, 'embedding': True})

  tx = optimizer.create_optimizer(config)
  state = tx.init(params)
  current = {k: jnp.asarray(v) for k, v in params.items()}
  update = jax.jit(tx.update)
  for step, grads in enumerate(grads_per_step):
    updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)
    for k in shapes:
      np.testing.assert_allclose(current[k], want[step][k], rtol=2e-5, atol=1e-6,
                                 err_msg=f'{k} after step {step + 1}')
