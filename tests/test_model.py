"""Tests of the dense decoder (xenith/model): masking, RoPE, GQA, layouts, dtypes."""

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import default
from xenith import model
from xenith.model import attention
from xenith.model import norms
from xenith.model import rope

RULES = default.LOGICAL_AXIS_RULES


def _config(**overrides) -> ml_collections.ConfigDict:
  """The tiny model config with a smaller vocab, plus `overrides`."""
  cfg = default.get_config('size=tiny').model
  cfg.vocab_size = 128
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def _init(cfg, seq_len=16, batch=2, seed=0):
  """(model, unboxed variables) for `cfg`."""
  decoder = model.make_model(cfg)
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  variables = decoder.init(jax.random.key(seed), tokens)
  return decoder, nn.unbox(variables)


def _tokens(shape, seed=1, vocab=128):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def _loss_fn(decoder, tokens, **kwargs):
  def loss(params):
    logits = decoder.apply({'params': params}, tokens[:, :-1], **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()
  return loss


def test_causality():
  decoder, variables = _init(_config())
  tokens = _tokens((2, 16))
  t = 6
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 128)
  before = decoder.apply(variables, tokens)
  after = decoder.apply(variables, changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert np.abs(before[:, t:] - after[:, t:]).max(axis=-1).min() > 1e-4


def test_packed_documents_match_separate_runs():
  decoder, variables = _init(_config())
  doc_a, doc_b = _tokens((1, 5), seed=2), _tokens((1, 7), seed=3)
  pad = jnp.full((1, 4), 7, jnp.int32)
  packed = jnp.concatenate([doc_a, doc_b, pad], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 4], jnp.int32)
  positions = jnp.array([list(range(5)) + list(range(7)) + list(range(4))],
                        jnp.int32)
  logits = decoder.apply(
      variables, packed, segment_ids=segment_ids, positions=positions)
  alone_a = decoder.apply(variables, doc_a)
  alone_b = decoder.apply(variables, doc_b)
  np.testing.assert_allclose(logits[:, :5], alone_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits[:, 5:12], alone_b, atol=1e-5, rtol=1e-5)

  # Padding tokens are invisible to real tokens.
  other_pad = packed.at[:, 12:].set(jnp.array([1, 2, 3, 4]))
  logits_other_pad = decoder.apply(
      variables, other_pad, segment_ids=segment_ids, positions=positions)
  np.testing.assert_array_equal(logits[:, :12], logits_other_pad[:, :12])
  assert np.isfinite(logits_other_pad).all()


def test_default_segments_and_positions():
  decoder, variables = _init(_config())
  tokens = _tokens((2, 16))
  implicit = decoder.apply(variables, tokens)
  explicit = decoder.apply(
      variables, tokens, segment_ids=jnp.ones((2, 16), jnp.int32),
      positions=jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)))
  np.testing.assert_allclose(implicit, explicit, atol=1e-6)


def _numpy_rope(x, positions, theta):
  """RoPE as complex multiplication: pair (i, i + d/2) is one complex number."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  z = x[..., :half] + 1j * x[..., half:]
  z = z * np.exp(1j * positions[:, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_gqa_matches_naive_reference():
  cfg = _config()
  frozen = ml_collections.FrozenConfigDict(cfg)
  batch, seq = 2, 10
  x = jax.random.normal(jax.random.key(4), (batch, seq, cfg.embed_dim))
  segment_ids = jnp.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], jnp.int32)
  positions = jnp.array([list(range(6)) + list(range(4)),
                         list(range(8)) + [0, 1]], jnp.int32)
  layer = attention.Attention(frozen)
  variables = nn.unbox(layer.init(jax.random.key(5), x, segment_ids, positions))
  out = layer.apply(variables, x, segment_ids, positions)

  p = jax.tree.map(np.asarray, variables['params'])
  xn, seg, pos = np.asarray(x, np.float64), np.asarray(segment_ids), np.asarray(
      positions)
  q = np.einsum('bse,ehd->bshd', xn, p['query']['kernel'])
  k = np.einsum('bse,ehd->bshd', xn, p['key']['kernel'])
  v = np.einsum('bse,ehd->bshd', xn, p['value']['kernel'])
  q, k = _numpy_rope(q, pos, cfg.rope_theta), _numpy_rope(k, pos, cfg.rope_theta)
  group = cfg.num_heads // cfg.num_kv_heads
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(cfg.head_dim)
  allowed = (np.tril(np.ones((seq, seq), bool))[None]
             & (seg[:, :, None] == seg[:, None, :]))[:, None]
  scores = np.where(allowed, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum('bhqk,bkhd->bqhd', probs, v)
  expected = np.einsum('bqhd,hde->bqe', ctx, p['out']['kernel'])
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_rope_preserves_norms_and_depends_on_relative_position():
  head_dim, theta = 16, 10_000.0
  inv_freq = rope.default_inv_frequencies(head_dim, theta)
  x = jax.random.normal(jax.random.key(6), (2, 5, 3, head_dim))
  positions = jnp.array([[0, 3, 17, 100, 4095], [1, 2, 3, 4, 5]], jnp.int32)
  rotated = rope.apply_rope(x, positions, inv_freq)
  np.testing.assert_allclose(
      jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(
      rope.apply_rope(x, jnp.zeros_like(positions), inv_freq), x, atol=1e-7)
  # float32 angles at position ~4k are good to ~1e-4 rad, hence the tolerance.
  np.testing.assert_allclose(
      rotated, _numpy_rope(np.asarray(x), np.asarray(positions), theta),
      atol=1e-3)

  q, k = jax.random.normal(jax.random.key(7), (2, 1, 1, 1, head_dim))

  def score(q_pos, k_pos):
    q_rot = rope.apply_rope(q, jnp.array([[q_pos]]), inv_freq)
    k_rot = rope.apply_rope(k, jnp.array([[k_pos]]), inv_freq)
    return float(jnp.sum(q_rot * k_rot))

  for shift in (1, 13, 500):
    assert score(9, 4) == pytest.approx(score(9 + shift, 4 + shift), abs=1e-4)
  assert abs(score(9, 4) - score(9, 6)) > 1e-3


def test_scan_matches_loop():
  loop_decoder, loop_vars = _init(_config(num_layers=3))
  scan_decoder, scan_vars = _init(_config(num_layers=3, scan_layers=True))
  blocks = [loop_vars['params'][f'block_{i}'] for i in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  assert (jax.tree.structure(stacked)
          == jax.tree.structure(scan_vars['params']['layers']))
  assert (jax.tree.map(jnp.shape, stacked)
          == jax.tree.map(jnp.shape, scan_vars['params']['layers']))
  params = {k: v for k, v in loop_vars['params'].items()
            if not k.startswith('block_')}
  params['layers'] = stacked

  tokens = _tokens((2, 16))
  segment_ids = jnp.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], jnp.int32)
  kwargs = dict(segment_ids=segment_ids)
  np.testing.assert_allclose(
      scan_decoder.apply({'params': params}, tokens, **kwargs),
      loop_decoder.apply(loop_vars, tokens, **kwargs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_remat_policies_match_no_remat(scan_layers):
  tokens = _tokens((2, 17))
  results = {}
  for remat in ('none', 'full', 'dots', 'dots_no_batch'):
    decoder, variables = _init(_config(remat=remat, scan_layers=scan_layers))
    loss = _loss_fn(decoder, tokens)
    results[remat] = jax.jit(jax.value_and_grad(loss))(variables['params'])
  ref_loss, ref_grads = results.pop('none')
  for remat, (loss, grads) in results.items():
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=remat)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
        grads, ref_grads)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  decoder32, variables = _init(_config())
  decoder16, variables16 = _init(_config(dtype='bfloat16'))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables16))
  tokens = _tokens((2, 16))
  logits32 = decoder32.apply(variables, tokens)
  logits16 = decoder16.apply(variables, tokens)
  assert logits16.dtype == jnp.float32
  assert np.isfinite(logits16).all()
  err = np.abs(logits16 - logits32)
  assert err.max() < 0.25 and err.mean() < 0.05, (err.max(), err.mean())
  assert err.max() > 0  # The bf16 path really ran in bf16.

  grads = jax.grad(_loss_fn(decoder16, _tokens((2, 17))))(variables['params'])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables))


def test_tied_and_untied_embeddings():
  cfg = _config()
  _, tied = _init(cfg)
  untied_decoder, untied = _init(_config(tie_embeddings=False))
  assert 'head' not in tied['params']
  assert untied['params']['head']['kernel'].shape == (
      cfg.embed_dim, cfg.vocab_size)
  assert _num_params(untied) - _num_params(tied) == cfg.embed_dim * cfg.vocab_size
  logits = untied_decoder.apply(untied, _tokens((2, 16)))
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32


def test_layernorm_and_rmsnorm():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(8), (4, 32))
  rms = norms.RMSNorm(epsilon=1e-6)
  y = rms.apply(nn.unbox(rms.init(jax.random.key(0), x)), x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, rtol=1e-4)
  ln = norms.LayerNorm(epsilon=1e-6)
  variables = nn.unbox(ln.init(jax.random.key(0), x))
  assert set(variables['params']) == {'scale', 'bias'}
  y = ln.apply(variables, x)
  np.testing.assert_allclose(jnp.mean(y, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, -1), 1.0, rtol=1e-4)

  tokens = _tokens((2, 16))
  rms_decoder, rms_vars = _init(_config(norm='rmsnorm'))
  ln_decoder, ln_vars = _init(_config(norm='layernorm'))
  assert 'bias' in ln_vars['params']['final_norm']
  rms_logits = rms_decoder.apply(rms_vars, tokens)
  ln_logits = ln_decoder.apply(ln_vars, tokens)
  assert np.isfinite(ln_logits).all()
  assert np.abs(rms_logits - ln_logits).max() > 1e-3


@pytest.mark.parametrize('scan_layers', [False, True])
def test_every_param_has_logical_axis_names_from_the_rules(scan_layers):
  cfg = _config(scan_layers=scan_layers, tie_embeddings=False, norm='layernorm')
  boxed = model.make_model(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  leaves = jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  known = {name for name, _ in RULES}
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim, leaf.names
    assert set(leaf.names) <= known, leaf.names
  flat = flax.traverse_util.flatten_dict(boxed['params'], sep='/')
  if scan_layers:
    assert flat['layers/attn/query/kernel'].names == (
        'layers', 'embed', 'heads', 'head_dim')
  else:
    assert flat['block_0/attn/out/kernel'].names == (
        'heads', 'head_dim', 'embed')
  assert flat['embed/embedding'].names == ('vocab', 'embed')


@pytest.mark.parametrize('scan_layers', [False, True])
def test_jitted_train_step_with_dropout(scan_layers):
  decoder, variables = _init(_config(dropout_rate=0.1, scan_layers=scan_layers))
  tokens = _tokens((4, 17))
  tx = optax.adamw(3e-3)
  params = variables['params']
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    loss_fn = _loss_fn(
        decoder, tokens, deterministic=False, rngs={'dropout': rng})
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  _, _, loss_a, grads = step(params, opt_state, jax.random.key(1))
  _, _, loss_b, _ = step(params, opt_state, jax.random.key(2))
  eval_loss = _loss_fn(decoder, tokens)(params)
  assert np.isfinite(loss_a) and loss_a != loss_b and loss_a != eval_loss
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))

  losses = []
  for i in range(5):
    params, opt_state, loss, _ = step(params, opt_state, jax.random.key(10 + i))
    losses.append(float(loss))
  assert _loss_fn(decoder, tokens)(params) < eval_loss, losses


def test_sharded_init_and_apply_under_mesh():
  decoder = model.make_model(_config())
  devices = np.array(jax.devices()[:8]).reshape(2, 2, 2, 1)
  mesh = jax.sharding.Mesh(devices, ('data', 'fsdp', 'tensor', 'expert'))
  tokens = _tokens((8, 16))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    abstract = jax.eval_shape(decoder.init, jax.random.key(0), tokens)
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract), mesh, RULES)
    variables = jax.jit(decoder.init, out_shardings=shardings)(
        jax.random.key(0), tokens)
    query = variables['params']['block_0']['attn']['query']['kernel'].value
    assert query.sharding.spec == jax.sharding.PartitionSpec(
        'fsdp', 'tensor', None)
    sharded_logits = jax.jit(decoder.apply)(variables, tokens)
  plain_logits = decoder.apply(nn.unbox(variables), tokens)
  np.testing.assert_allclose(sharded_logits, plain_logits, atol=1e-5)


@pytest.mark.parametrize('field,value', [
    ('remat', 'sometimes'), ('norm', 'batchnorm'), ('dtype', 'float16')])
def test_unknown_config_values_raise(field, value):
  with pytest.raises(ValueError, match=value):
    _init(_config(**{field: value}))
