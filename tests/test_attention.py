"""Attention kernels and patterns against the dense masked reference.

Every kernel (blockwise, splash in Pallas's interpreter, the cuDNN call through jax's
XLA reference of the same API) must give the outputs and gradients of
`dot_product_attention` on `masks.make_attention_mask`'s mask, for full causal
attention, sliding windows, global tokens and packed segments.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import default
from xenith import config_validation
from xenith.model import attention
from xenith.model import attention_pattern
from xenith.model import blockwise_attention
from xenith.model import fused_attention
from xenith.model import masks
from xenith.model import build


def _qkv(batch, seq, heads, kv_heads, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(batch, seq, heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim)]
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def _segments(batch, seq, packed, seed=0):
  if not packed:
    return jnp.ones((batch, seq), jnp.int32)
  # Sorted ids 0..2: two documents and some padding (0) at the start of a row.
  ids = np.sort(np.random.default_rng(seed).integers(0, 3, (batch, seq)), axis=1)
  return jnp.asarray(ids, jnp.int32)


def _reference(q, k, v, segment_ids, window, num_global):
  mask = masks.make_attention_mask(q.shape[1], segment_ids, window=window,
                                   num_global=num_global)
  return attention.dot_product_attention(q, k, v, mask)


def _value_and_grads(fn, q, k, v):
  """fn(q, k, v) -> out; returns (out, grads of a random projection of out)."""
  probe = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  out = fn(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=(0, 1, 2))(q, k, v)
  return out, grads


def _assert_matches_reference(fn, q, k, v, segment_ids, window, num_global, atol=2e-5):
  want, want_grads = _value_and_grads(
      lambda *a: _reference(*a, segment_ids, window, num_global), q, k, v)
  got, got_grads = _value_and_grads(jax.jit(fn), q, k, v)
  np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=5 * atol, rtol=1e-4)


@pytest.mark.parametrize('seq,window,num_global,block,packed,kv_heads', [
    (64, None, 0, 16, False, 2),  # Full causal, whole blocks.
    (70, None, 0, 16, True, 1),  # Full causal, a partial last block, packed, MQA.
    (70, 20, 0, 16, True, 2),  # Window wider than a block.
    (100, 7, 20, 8, True, 2),  # Window narrower than a block; globals over 3 blocks.
    (70, 20, 5, 16, False, 4),  # Globals inside the first block; plain MHA.
    (33, 40, 3, 16, False, 2),  # Window wider than the sequence = full.
])
def test_blockwise_matches_dense_reference(seq, window, num_global, block, packed, kv_heads):
  q, k, v = _qkv(2, seq, 4, kv_heads)
  segment_ids = _segments(2, seq, packed)
  fn = functools.partial(blockwise_attention.blockwise_attention, segment_ids=segment_ids,
                         window=window, num_global=num_global, block_size=block)
  _assert_matches_reference(fn, q, k, v, segment_ids, window, num_global)


@pytest.mark.parametrize('seq,block,window,num_global', [
    (22, 4, None, 0), (22, 4, 1, 0), (22, 4, 5, 0), (20, 4, 6, 3), (22, 4, 9, 8),
    (32, 8, 8, 2), (13, 4, 4, 13)])
def test_blockwise_visits_exactly_the_key_blocks_the_mask_reaches(seq, block, window,
                                                                  num_global):
  """The visit plan is what makes blockwise attention linear in the sequence for a
  window: query block i visits each key block holding a key that some query of block i
  may attend to, once, and no other (the other blocks would be masked out: more work,
  equal outputs, so the kernel tests cannot see it)."""
  x = jnp.zeros((1, seq, 2, 4))
  _, blocks = blockwise_attention._prepare(  # pylint: disable=protected-access
      x, x[:, :, :1], x[:, :, :1], jnp.ones((1, seq), jnp.int32), window, num_global,
      block)
  num_blocks = -(-seq // block)
  q = np.arange(seq)[:, None]
  k = np.arange(seq)[None, :]
  allowed = k <= q
  if window is not None:
    allowed &= (q - k < window) | (k < num_global)
  for i in range(num_blocks):
    rows = allowed[i * block:(i + 1) * block]
    want = [j for j in range(num_blocks) if rows[:, j * block:(j + 1) * block].any()]
    visits = int(blocks.num_visits(i))
    got = [int(blocks._visit(i, t)[1]) for t in range(visits)]  # pylint: disable=protected-access
    assert got == want, (i, got, want)


def test_blockwise_bfloat16_is_close_to_float32():
  q, k, v = _qkv(1, 64, 4, 2)
  exact = blockwise_attention.blockwise_attention(q, k, v, window=24, block_size=16)
  low = blockwise_attention.blockwise_attention(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)), window=24, block_size=16)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(jnp.float32), exact, atol=0.05)


@pytest.mark.parametrize('window,num_global,packed', [
    (None, 0, True), (40, 0, True), (40, 5, False)])  # Documents of ~85 tokens when packed.
def test_splash_kernel_matches_dense_reference(window, num_global, packed):
  """The TPU splash kernel, run by Pallas's interpreter on CPU. The window (40) is shorter
  than the documents, and the global tokens sit in the one document of an unpacked row,
  so both change the mask."""
  q, k, v = _qkv(1, 256, 4, 2, dim=64)
  segment_ids = _segments(1, 256, packed=packed)
  fn = functools.partial(fused_attention.splash_attention, segment_ids=segment_ids,
                         window=window, num_global=num_global, block_size=128,
                         interpret=True)
  _assert_matches_reference(fn, q, k, v, segment_ids, window, num_global, atol=5e-5)


@pytest.mark.parametrize('window', [None, 9])
def test_cudnn_call_matches_dense_reference(window):
  """Our arguments to jax.nn.dot_product_attention (mask, causal, window), checked
  through jax's XLA implementation of the same call; the GPU runs it with cuDNN."""
  q, k, v = _qkv(2, 48, 4, 2)
  segment_ids = _segments(2, 48, packed=True)
  fn = functools.partial(fused_attention.cudnn_attention, segment_ids=segment_ids,
                         window=window, implementation='xla')
  _assert_matches_reference(fn, q, k, v, segment_ids, window, 0)


def test_implementation_choice():
  assert attention.resolve_implementation('auto', 4, seq_len=256) == 'blockwise'  # CPU.
  assert attention.resolve_implementation('dense', 0, seq_len=256) == 'dense'
  with pytest.raises(ValueError, match='Unknown attention implementation'):
    attention.resolve_implementation('flash', 0, seq_len=256)
  q, k, v = _qkv(1, 16, 2, 2)
  with pytest.raises(ValueError, match='cannot express global tokens'):
    attention.attend('cudnn', q, k, v, None, window=4, num_global=2)


def _record_kernels(monkeypatch) -> list:
  """Replaces the three kernels by recorders: calls gets (name, kwargs) per call."""
  calls = []
  record = lambda name: lambda q, *a, **kw: calls.append((name, kw)) or q
  monkeypatch.setattr(fused_attention, 'splash_attention', record('splash'))
  monkeypatch.setattr(fused_attention, 'cudnn_attention', record('cudnn'))
  monkeypatch.setattr(blockwise_attention, 'blockwise_attention', record('blockwise'))
  return calls


@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu', 'METAL', 'neuron', 'xpu'])
def test_auto_picks_each_backends_kernel(backend, monkeypatch):
  """'auto' on each backend: TPU splash (blockwise when the length is not a multiple of
  128), GPU cuDNN (blockwise when there are global tokens), CPU and any other backend
  (PJRT plugins, named on either side of 'gpu' and 'tpu') blockwise. The kernels are
  recorded, not run: this CPU has neither a GPU nor a TPU."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  calls = _record_kernels(monkeypatch)
  expected = {'gpu': ('cudnn', 'cudnn', 'blockwise'),
              'tpu': ('splash', 'blockwise', 'splash')}.get(backend, ('blockwise',) * 3)
  # (batch, seq, window, global tokens): 256 tokens; 100 tokens; 256 tokens with globals.
  for (batch, seq, window, num_global), want in zip(
      [(2, 256, 64, 0), (2, 100, 64, 0), (3, 256, 64, 4)], expected):
    q, k, v = _qkv(batch, seq, 2, 1)
    calls.clear()
    attention.attend('auto', q, k, v, None, window=window, num_global=num_global)
    assert [name for name, _ in calls] == [want], (backend, seq, num_global)
    assert attention.resolve_implementation('auto', num_global, seq) == want


@pytest.mark.parametrize('name', ['blockwise', 'cudnn', 'splash'])
def test_a_kernel_named_by_a_string_built_at_run_time_is_the_one_run(name, monkeypatch):
  """A name parsed from a flag is a new string object, not the interned literal: the
  kernel is chosen by its value."""
  calls = _record_kernels(monkeypatch)
  q, k, v = _qkv(1, 16, 2, 1)
  attention.attend(''.join(list(name)), q, k, v, None, window=4)
  assert [kernel for kernel, _ in calls] == [name]


def test_full_attention_needs_no_global_tokens(monkeypatch):
  """Without a window (or one covering the sequence) every token already sees all
  earlier ones: global tokens are dropped, so cuDNN can run the layer."""
  calls = []
  monkeypatch.setattr(fused_attention, 'cudnn_attention',
                      lambda q, *a, **kw: calls.append(kw) or q)
  q, k, v = _qkv(1, 16, 2, 2)
  for window in (None, 16, 40):
    attention.attend('cudnn', q, k, v, None, window=window, num_global=2)
  assert calls == [{'window': None}] * 3
  mask = masks.make_attention_mask(16, None, window=None, num_global=2)
  np.testing.assert_array_equal(mask, masks.make_attention_mask(16, None))


def _model_config(**attention_overrides):
  config = default.get_config('size=tiny').model
  config.vocab_size = 64
  config.num_layers = 3
  config.attention.update(attention_overrides)
  return config


def test_layer_patterns():
  config = ml_collections.FrozenConfigDict(_model_config(
      window_sizes=(8, 16), full_attention_layers=1, num_global_tokens=2))
  groups = attention_pattern.layer_head_groups
  assert groups(config, 0, 64) == (attention_pattern.HeadGroup(0, 2, None),)
  # Two windows over the two KV heads of each sparse layer.
  assert groups(config, 1, 64) == (attention_pattern.HeadGroup(0, 1, 8),
                                   attention_pattern.HeadGroup(1, 2, 16))
  assert [attention_pattern.num_global_tokens(config, i) for i in range(3)] == [0, 2, 2]
  by_layer = ml_collections.FrozenConfigDict(_model_config(
      window_sizes=(8, 16), full_attention_layers=1, window_split='layers'))
  assert [groups(by_layer, i, 64)[0].window for i in range(3)] == [None, 8, 16]


def _numpy_windowed_attention(q, k, v, windows):
  """float64 NumPy causal attention; KV head h sees the keys within windows[h] (None =
  all earlier ones); query head n uses KV head n // (heads / kv_heads)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, seq, heads, dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros_like(q)
  i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
  for n in range(heads):
    h = n // group
    mask = (j <= i) if windows[h] is None else (j <= i) & (i - j < windows[h])
    scores = np.einsum('bqd,bkd->bqk', q[:, :, n], k[:, :, h]) / np.sqrt(dim)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[:, :, n] = np.einsum('bqk,bkd->bqd', probs, v[:, :, h])
  return out


@pytest.mark.parametrize('kv_heads,windows,want', [
    # 3 windows over 5 KV heads: the first 5 % 3 = 2 groups take one head more.
    (5, (3, 6, 12), (3, 3, 6, 6, 12)),
    (4, (3, 5, 7), (3, 3, 5, 7)),
])
def test_windows_that_do_not_divide_the_kv_heads(kv_heads, windows, want):
  """Uneven KV-head groups (the seed's 3 windows over 16 KV heads): each head's output
  equals NumPy attention with that head's window, for both kernels."""
  config = _model_config(window_sizes=windows)
  config.num_kv_heads, config.num_heads = kv_heads, 2 * kv_heads
  frozen = ml_collections.FrozenConfigDict(config)
  groups = attention_pattern.layer_head_groups(frozen, 0, 32)
  assert tuple(g.window for g in groups for _ in range(g.kv_start, g.kv_end)) == want
  q, k, v = _qkv(2, 32, 2 * kv_heads, kv_heads)
  expected = _numpy_windowed_attention(q, k, v, want)
  for impl in ('dense', 'blockwise'):
    config.attention.update(implementation=impl, block_size=8)
    layer = attention.Attention(ml_collections.FrozenConfigDict(config), layer=0)
    got = layer.apply({}, q, k, v, None, method=layer._attend_groups)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_dynamic_windows_scale_with_length_within_bounds():
  config = ml_collections.FrozenConfigDict(_model_config(
      window_sizes=(512,), dynamic_windows=True, window_reference_length=4096,
      min_window=128, max_window=2048))
  window = lambda seq: attention_pattern.layer_head_groups(config, 0, seq)[0].window
  assert window(4096) == 512  # The configured size at the reference length.
  assert window(8192) == 1024  # Proportional to the length ...
  assert window(1000) == 128  # ... rounded up to 64 (125 -> 128), at least min_window,
  assert window(65536) == 2048  # at most max_window.


def _apply(config, params, tokens, segment_ids=None):
  model = build.make_model(config)
  return model.apply({'params': params}, tokens, segment_ids=segment_ids)


@pytest.mark.parametrize('overrides', [
    dict(window_sizes=(4, 8), full_attention_layers=1, num_global_tokens=3),
    dict(window_sizes=(4, 6), window_split='layers'),
])
def test_sparse_model_kernels_agree(overrides):
  """A whole model with windows and globals: blockwise == dense, logits and grads."""
  configs = {impl: _model_config(implementation=impl, block_size=8, **overrides)
             for impl in ('dense', 'blockwise')}
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)
  segment_ids = _segments(2, 40, packed=True, seed=3)
  params = build.make_model(configs['dense']).init(jax.random.key(0), tokens)['params']
  results = {}
  for impl, config in configs.items():
    loss = lambda p, c=config: jnp.mean(_apply(c, p, tokens, segment_ids) ** 2)
    results[impl] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(results['blockwise'][0], results['dense'][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               results['blockwise'][1], results['dense'][1])


def test_one_windowed_layer_sees_only_its_window_and_the_globals():
  window, num_global = 5, 2
  config = _model_config(window_sizes=(window,), num_global_tokens=num_global, block_size=8)
  config.num_layers = 1
  tokens = jax.random.randint(jax.random.key(1), (1, 24), 0, 64)
  params = build.make_model(config).init(jax.random.key(0), tokens)['params']
  before = _apply(config, params, tokens)
  for j in (2, 10):  # Past the globals: position i sees j only if i - j < window.
    after = _apply(config, params, tokens.at[0, j].set((tokens[0, j] + 1) % 64))
    changed = np.abs(np.asarray(after - before)).max(-1)[0] > 0
    assert changed.tolist() == [j <= i < j + window for i in range(24)]
  # A global token is seen by every later position.
  after = _apply(config, params, tokens.at[0, 1].set((tokens[0, 1] + 1) % 64))
  changed = np.abs(np.asarray(after - before)).max(-1)[0] > 0
  assert changed.tolist() == [i >= 1 for i in range(24)]


@pytest.mark.parametrize('field,value,message', [
    ('implementation', 'flash', 'must be one of'),
    ('window_sizes', (0, 8), 'must be a tuple of positive ints'),
    ('window_sizes', (4, 8, 16), r'3 windows are more than config.model.num_kv_heads=2'),
    ('full_attention_layers', 5, r'must be an int in \[0, num_layers=2\]'),
    ('window_split', 'experts', 'must be one of'),
    ('min_window', 10**6, 'must be <= config.model.attention.max_window'),
])
def test_invalid_attention_config_is_named(field, value, message):
  config = default.get_config('size=tiny')
  config.model.attention.window_sizes = (8,)
  config.model.attention.dynamic_windows = True
  config.model.attention[field] = value
  with pytest.raises(config_validation.ConfigError,
                     match=f'config.model.attention.{field}: .*{message}'):
    config_validation.validate(config, num_devices=1)
