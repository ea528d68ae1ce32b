"""The MoE layer (xenith/model/moe.py) against an independent NumPy reference.

From the same params, NumPy computes the router logits, softmax and top-k routing
(renormalised or raw), the 'capacity' drops (first choices before second choices, then
token order, with the capacity formula of moe_dispatch.capacity), the SwiGLU experts'
weighted sum plus the shared expert, and every router statistic over the non-padding
tokens. The layer's output, its kept assignments and its statistics must match for
'capacity' (a capacity factor that drops), 'dropless_gather', 'dropless_ragged' and
'dense'; padding tokens (segment id 0) are not routed.
"""

import math

from flax import linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from experiments import default
from xenith.model import moe

BATCH, SEQ, EMBED, EXPERTS, K, MLP = 2, 12, 16, 4, 2, 8
# 24 tokens, 5 of them padding (counted in the capacity, given no slot): 38 assignments
# for EXPERTS * ceil(0.6 * 24 * 2 / 4) = 32 slots, so 'capacity' drops >= 6 (8 here).
CAPACITY_FACTOR = 0.6
LOSS_WEIGHTS = dict(load_balance_loss_weight=0.01, router_z_loss_weight=0.001,
                    router_entropy_loss_weight=0.1)


def _block(dispatch, normalize, num_shared):
  cfg = default.get_config('size=tiny').model
  cfg.embed_dim = EMBED
  cfg.moe.num_experts = EXPERTS
  cfg.moe.num_experts_per_token = K
  cfg.moe.expert_mlp_dim = MLP
  cfg.moe.num_shared_experts = num_shared
  cfg.moe.normalize_top_k = normalize
  cfg.moe.dispatch = dispatch
  cfg.moe.capacity_factor = CAPACITY_FACTOR
  cfg.moe.block_size = 8
  for field, value in LOSS_WEIGHTS.items():
    cfg.moe[field] = value
  return moe.MoeBlock(ml_collections.FrozenConfigDict(cfg))


def _inputs():
  """x: [batch, seq, embed] and segment_ids: [batch, seq] with 5 padding tokens."""
  rng = np.random.default_rng(0)
  # The offset gives all tokens a common direction: uneven expert loads.
  x = (rng.normal(size=(BATCH, SEQ, EMBED)) + 0.5).astype(np.float32)
  segment_ids = np.ones((BATCH, SEQ), np.int32)
  segment_ids[0, -3:] = 0
  segment_ids[1, :2] = 0
  return x, segment_ids


def _params(block):
  """NumPy random params of `block`'s shapes: weights ~ N(0, 1 / fan_in), a sharper router."""
  x, segment_ids = _inputs()
  shapes = nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x, segment_ids))['params']
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[-2])).astype(np.float32),
      shapes)
  # Router logits with std ~2: clear top-k margins.
  params['router']['kernel'] = (rng.normal(size=(EMBED, EXPERTS)) / 2).astype(np.float32)
  return params


def _silu(v):
  return v / (1 + np.exp(-v))


def _swiglu(x, gate, up, down):
  return (_silu(x @ gate) * (x @ up)) @ down


def _reference(params, x, segment_ids, dispatch, normalize):
  """NumPy (float64) MoeBlock: (y [batch, seq, embed], kept [tokens, k], stats)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(x, np.float64).reshape(-1, EMBED)  # [tokens, embed]
  num_tokens = tokens.shape[0]
  valid = segment_ids.reshape(-1) > 0  # [tokens]

  logits = tokens @ p['router']['kernel']  # [tokens, experts]
  lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  probs = np.exp(logits - lse[:, None])  # [tokens, experts]
  order = np.argsort(-probs, axis=-1)  # [tokens, experts]
  expert_index = order[:, :K]  # [tokens, k]
  # The k-th and (k+1)-th probabilities are far apart: float32 picks the same experts.
  ranked = np.take_along_axis(probs, order, axis=-1)
  assert np.all(ranked[:, K - 1] - ranked[:, K] > 1e-4)
  weights = ranked[:, :K]  # [tokens, k]
  if normalize:
    weights = weights / weights.sum(-1, keepdims=True)

  kept = np.repeat(valid[:, None], K, axis=1)  # [tokens, k]; padding is not routed.
  if dispatch == 'capacity':
    capacity = max(1, math.ceil(CAPACITY_FACTOR * num_tokens * K / EXPERTS))
    load = np.zeros(EXPERTS, int)
    for j in range(K):  # First choices before second choices,
      for t in np.flatnonzero(valid):  # then token order.
        e = expert_index[t, j]
        kept[t, j] = load[e] < capacity
        load[e] += kept[t, j]

  ex = p['experts']
  y = np.zeros_like(tokens)  # [tokens, embed]
  for t, j in zip(*np.nonzero(kept)):
    e = expert_index[t, j]
    y[t] += weights[t, j] * _swiglu(tokens[t], ex['gate'][e], ex['up'][e], ex['down'][e])
  if 'shared' in p:  # On every token, padding included.
    y += _swiglu(tokens, *(p['shared'][w]['kernel'] for w in ('gate', 'up', 'down')))

  num_valid = valid.sum()
  counts = np.bincount(expert_index[valid].ravel(), minlength=EXPERTS)  # [experts]
  fraction = counts / (num_valid * K)
  mean_probs = probs[valid].mean(0)  # [experts]
  stats = {
      'load_balance_loss': EXPERTS * np.sum(fraction * mean_probs),
      'router_z_loss': np.mean(lse[valid] ** 2),
      'router_entropy': np.mean(-np.sum(probs * np.log(probs), axis=-1)[valid]),
      'expert_fraction': fraction,
      'max_load_ratio': EXPERTS * fraction.max(),
      'min_load_ratio': EXPERTS * fraction.min(),
      'dropped_fraction': (~kept[valid]).sum() / (num_valid * K),
  }
  stats['aux_loss'] = (LOSS_WEIGHTS['load_balance_loss_weight'] * stats['load_balance_loss']
                       + LOSS_WEIGHTS['router_z_loss_weight'] * stats['router_z_loss']
                       + LOSS_WEIGHTS['router_entropy_loss_weight'] * stats['router_entropy'])
  return y.reshape(x.shape), kept, stats


@pytest.mark.parametrize('dispatch,normalize,num_shared', [
    ('capacity', True, 0), ('capacity', False, 1),
    ('dropless_gather', True, 1), ('dropless_gather', False, 0),
    ('dropless_ragged', True, 0), ('dense', False, 1)])
def test_block_matches_numpy_routing(dispatch, normalize, num_shared):
  block = _block(dispatch, normalize, num_shared)
  params = _params(block)
  x, segment_ids = _inputs()

  def apply(params, x, segment_ids):
    # Captures Experts' (y, kept) to compare the kept assignments themselves.
    return block.apply({'params': params}, x, segment_ids, mutable=['intermediates'],
                       capture_intermediates=lambda m, _: isinstance(m, moe.Experts))

  (y, stats), state = jax.jit(apply)(params, x, segment_ids)
  kept = np.asarray(state['intermediates']['experts']['__call__'][0][1])  # [tokens, k]
  y_ref, kept_ref, stats_ref = _reference(params, x, segment_ids, dispatch, normalize)

  valid = segment_ids.reshape(-1) > 0
  np.testing.assert_array_equal(kept[valid], kept_ref[valid])
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
  for name, value in stats_ref.items():
    np.testing.assert_allclose(stats[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  if dispatch == 'capacity':
    assert stats_ref['dropped_fraction'] >= 6 / 38
  else:
    assert stats_ref['dropped_fraction'] == 0
  # Uneven loads, so the load ratios are not trivially 1.
  assert stats_ref['max_load_ratio'] > 1.2 and stats_ref['min_load_ratio'] < 0.8
