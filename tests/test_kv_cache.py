"""Incremental decoding with the KV cache equals the one-shot forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import default
from xenith.model import kv_cache
from xenith.model import build

VOCAB = 64
SEQ = 24


def _config(**overrides):
  config = default.get_config('size=tiny').model
  config.vocab_size = VOCAB
  config.num_layers = 3
  for field, value in overrides.items():
    node = config
    *parents, leaf = field.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _decode(model, params, tokens, cache_length, steps):
  """Logits [batch, seq, vocab] from feeding `tokens` in pieces of the given sizes."""
  cache = kv_cache.init_cache(model, tokens.shape[0], cache_length)
  apply = jax.jit(lambda p, c, t: model.apply({'params': p, 'cache': c}, t,
                                              cache_length=cache_length, mutable=['cache']))
  outs, start = [], 0
  for size in steps:
    logits, variables = apply(params, cache, tokens[:, start:start + size])
    cache = variables['cache']
    outs.append(logits)
    start += size
  assert start == tokens.shape[1]
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize('overrides', [
    {},  # Full attention everywhere.
    # Full first layer, then windows 4 and 6 over the two KV-head groups plus 3 globals.
    {'attention.window_sizes': (4, 6), 'attention.full_attention_layers': 1,
     'attention.num_global_tokens': 3},
    # Windows by layer, MoE blocks, the blocks scanned.
    {'attention.window_sizes': (5,), 'attention.num_global_tokens': 2,
     'moe.num_experts': 4, 'moe.expert_mlp_dim': 32, 'scan_layers': True},
    # Layers that differ, scanned as a full layer then 2 x (window 4, window 6).
    {'num_layers': 5, 'attention.window_sizes': (4, 6), 'attention.window_split': 'layers',
     'attention.full_attention_layers': 1, 'attention.num_global_tokens': 2,
     'scan_layers': True},
])
def test_token_by_token_equals_one_shot(overrides):
  config = _config(**overrides)
  model = build.make_model(config)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, VOCAB)
  params = model.init(jax.random.key(0), tokens)['params']
  want = model.apply({'params': params}, tokens)
  # A 7-token prompt, then one token at a time; the cache is longer than the text.
  got, cache = _decode(model, params, tokens, cache_length=32, steps=[7] + [1] * (SEQ - 7))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  assert int(cache['index']) == SEQ


def test_windowed_layers_keep_a_ring_buffer_no_larger_than_their_window():
  config = _config(**{'attention.window_sizes': (4, 6), 'attention.full_attention_layers': 1,
                      'attention.num_global_tokens': 3})
  model = build.make_model(config)
  tokens = jax.random.randint(jax.random.key(1), (1, SEQ), 0, VOCAB)
  params = model.init(jax.random.key(0), tokens)['params']
  want = model.apply({'params': params}, tokens)
  # A prompt longer than the windows (the ring wraps while prefilling), then steps.
  got, cache = _decode(model, params, tokens, cache_length=1024, steps=[13, 1, 1, 9])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  full = cache['block_0']['attn']
  assert full['key_0'].shape[1] == 1024  # The full layer keeps every position.
  for layer in ('block_1', 'block_2'):
    c = cache[layer]['attn']
    # Globals + window: 3 + 4 and 3 + 6 slots, for a 1024-token cache.
    assert c['key_0'].shape[1] == 7 and c['key_1'].shape[1] == 9
    # Kept: the 3 globals and the most recent window positions.
    assert sorted(np.asarray(c['positions_0'][0]).tolist()) == [0, 1, 2, 20, 21, 22, 23]
    assert sorted(np.asarray(c['positions_1'][0]).tolist()) == [0, 1, 2, 18, 19, 20, 21, 22, 23]


@pytest.mark.parametrize('start,length,window,num_global,slots', [
    (0, 13, 4, 3, 7),  # A prompt longer than the window: the ring wraps within one call.
    (-3, 9, 4, 2, 6),  # Left padding (negative positions) first.
    (11, 1, 4, 3, 7),  # One token, far along.
    (5, 6, 6, 0, 6),  # No globals; exactly one window.
    (0, 10, None, 0, 16),  # Full attention: slot = position.
])
def test_writes_go_to_distinct_slots_of_the_positions_kept(start, length, window,
                                                           num_global, slots):
  """A call writes exactly the positions the buffer keeps (not padding; the globals; the
  last `window` of the others) and never two to one slot, which an accelerator's scatter
  might resolve either way."""
  positions = jnp.arange(start, start + length, dtype=jnp.int32)[None]  # [1, L]
  target = np.asarray(kv_cache.write_slots(positions, slots, window=window,
                                           num_global=num_global))[0]
  last = start + length - 1
  for p, slot in zip(range(start, start + length), target):
    kept = p >= 0 and (window is None or p < num_global or p > last - window)
    assert (slot != slots) == kept, (p, slot)
    if kept:  # Globals first, then a ring of `window` slots (full attention: the position).
      ring = num_global + (p - num_global) % window if window and p >= num_global else p
      assert slot == ring, (p, slot)
  written = target[target != slots]
  assert len(set(written.tolist())) == len(written)


def test_decoding_rejects_packed_inputs():
  model = build.make_model(_config())
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  cache = kv_cache.init_cache(model, 1, 8)
  with pytest.raises(ValueError, match='no segment_ids'):
    model.apply({'params': params, 'cache': cache}, tokens, cache_length=8,
                segment_ids=jnp.ones_like(tokens), mutable=['cache'])
