"""Tests of the dense decoder (xenith/model): masking, RoPE, GQA, layouts, dtypes.

Compilation dominates the run time on CPU, so models are built once per config
(`_model`) and params are initialized with 'rbg' keys, whose init graphs XLA
compiles several times faster than threefry's.
"""

import functools

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
VOCAB = 128


def _key(seed):
  return jax.random.key(seed, impl='rbg')


def _config(**overrides) -> ml_collections.ConfigDict:
  """The tiny model config with a smaller vocab, plus `overrides`."""
  cfg = default.get_config('size=tiny').model
  cfg.vocab_size = VOCAB
  for field, value in overrides.items():
    setattr(cfg, field, value)
  return cfg


@functools.lru_cache(maxsize=None)
def _built(overrides):
  decoder = model.make_model(_config(**dict(overrides)))
  return decoder, jax.jit(decoder.apply, static_argnames='deterministic')


def _decoder(**overrides):
  """(decoder, jitted apply) for the tiny config + overrides, built once."""
  return _built(tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _initialized(overrides):
  decoder, _ = _built(overrides)
  tokens = jnp.zeros((2, 16), jnp.int32)
  return nn.unbox(jax.jit(decoder.init)(_key(0), tokens))


def _variables(**overrides):
  """Unboxed variables for the tiny config + overrides, initialized once."""
  return _initialized(tuple(sorted(overrides.items())))


def _model(**overrides):
  """(decoder, unboxed variables, jitted apply) for the tiny config + overrides."""
  decoder, apply = _decoder(**overrides)
  return decoder, _variables(**overrides), apply


def _stack_layers(variables):
  """Loop-layout variables (block_0, block_1, ...) -> scan layout (layers)."""
  params = dict(variables['params'])
  blocks = [params.pop(f'block_{i}') for i in range(_config().num_layers)]
  params['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {'params': params}


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


def _loss_fn(decoder, tokens, **kwargs):
  """params -> mean next-token cross-entropy on `tokens` [batch, seq + 1]."""
  def loss(params):
    logits = decoder.apply({'params': params}, tokens[:, :-1], **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()
  return loss


def _assert_trees_close(actual, desired, **tols):
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, **tols), actual, desired)


def test_causality():
  _, variables, apply = _model()
  tokens = _tokens((2, 16))
  t = 6
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  before, after = apply(variables, tokens), apply(variables, changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  # Every later position sees the change.
  assert np.abs(before[:, t:] - after[:, t:]).max(axis=-1).min() > 1e-4


def test_packed_documents_match_separate_runs():
  _, variables, apply = _model()
  doc_a, doc_b = _tokens((5,), seed=2), _tokens((7,), seed=3)
  filler = _tokens((16,), seed=4)
  # Row 0: a, b, padding. Row 1: padding, b, a, padding.
  packed = jnp.stack([
      jnp.concatenate([doc_a, doc_b, filler[:4]]),
      jnp.concatenate([filler[:3], doc_b, doc_a, filler[:1]])])
  segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 4,
                           [0] * 3 + [1] * 7 + [2] * 5 + [0]], jnp.int32)
  positions = jnp.array([[*range(5), *range(7), *range(4)],
                         [*range(3), *range(7), *range(5), 0]], jnp.int32)
  logits = apply(variables, packed, segment_ids=segment_ids, positions=positions)
  # Each document alone at the start of a row; later tokens are causally unseen.
  alone = apply(variables, jnp.stack([
      jnp.concatenate([doc_a, filler[:11]]),
      jnp.concatenate([doc_b, filler[:9]])]))
  tol = dict(atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits[0, :5], alone[0, :5], **tol)
  np.testing.assert_allclose(logits[1, 10:15], alone[0, :5], **tol)
  np.testing.assert_allclose(logits[0, 5:12], alone[1, :7], **tol)
  np.testing.assert_allclose(logits[1, 3:10], alone[1, :7], **tol)

  # Padding tokens are invisible to real tokens, wherever they sit.
  real = segment_ids > 0
  other_pad = jnp.where(real, packed, (packed + 1) % VOCAB)
  logits_other_pad = apply(
      variables, other_pad, segment_ids=segment_ids, positions=positions)
  np.testing.assert_array_equal(logits[real], logits_other_pad[real])
  assert np.isfinite(logits_other_pad).all()


def test_default_segments_and_positions():
  _, variables, apply = _model()
  tokens = _tokens((2, 16))
  explicit = apply(
      variables, tokens, segment_ids=jnp.ones((2, 16), jnp.int32),
      positions=jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)))
  np.testing.assert_allclose(apply(variables, tokens), explicit, atol=1e-6)


def _numpy_rope(x, positions, theta):
  """RoPE as complex multiplication: features (i, i + d/2) form one number."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  z = x[..., :half] + 1j * x[..., half:]
  z = z * np.exp(1j * positions[:, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_gqa_matches_naive_reference():
  cfg = _config()
  batch, seq = 2, 10
  x = jax.random.normal(jax.random.key(4), (batch, seq, cfg.embed_dim))
  segment_ids = jnp.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], jnp.int32)
  positions = jnp.array(
      [list(range(6)) + list(range(4)), list(range(8)) + [0, 1]], jnp.int32)
  layer = attention.Attention(ml_collections.FrozenConfigDict(cfg))
  variables = nn.unbox(
      jax.jit(layer.init)(_key(5), x, segment_ids, positions))
  out = jax.jit(layer.apply)(variables, x, segment_ids, positions)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  xn, seg, pos = (np.asarray(a) for a in (x, segment_ids, positions))
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
  context = np.einsum('bhqk,bkhd->bqhd', probs, v)
  expected = np.einsum('bqhd,hde->bqe', context, p['out']['kernel'])
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
  _, loop_vars, loop_apply = _model()
  scan_decoder, scan_apply = _decoder(scan_layers=True)
  tokens = _tokens((2, 16))
  scan_vars = _stack_layers(loop_vars)
  scan_shapes = jax.eval_shape(scan_decoder.init, _key(0), tokens)
  assert (jax.tree.map(jnp.shape, scan_vars)
          == jax.tree.map(jnp.shape, nn.unbox(scan_shapes)))

  segment_ids = jnp.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], jnp.int32)
  np.testing.assert_allclose(
      scan_apply(scan_vars, tokens, segment_ids=segment_ids),
      loop_apply(loop_vars, tokens, segment_ids=segment_ids),
      atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan_layers,policies', [
    (False, ('full', 'dots', 'dots_no_batch')), (True, ('dots',))])
def test_remat_policies_match_no_remat(scan_layers, policies):
  variables = _variables()
  if scan_layers:
    variables = _stack_layers(variables)
  tokens = _tokens((2, 17))

  def loss_and_grads(remat):
    decoder = model.make_model(_config(scan_layers=scan_layers, remat=remat))
    return jax.jit(jax.value_and_grad(_loss_fn(decoder, tokens)))(
        variables['params'])

  ref_loss, ref_grads = loss_and_grads('none')
  for remat in policies:
    loss, grads = loss_and_grads(remat)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=remat)
    _assert_trees_close(grads, ref_grads, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  _, variables, apply32 = _model()
  decoder16, apply16 = _decoder(dtype='bfloat16')
  shapes16 = jax.eval_shape(decoder16.init, _key(0), jnp.zeros((1, 8), jnp.int32))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes16))
  tokens = _tokens((2, 16))
  logits32 = apply32(variables, tokens)
  logits16 = apply16(variables, tokens)
  assert logits16.dtype == jnp.float32
  err = np.abs(logits16 - logits32)
  assert err.max() < 0.25 and err.mean() < 0.05, (err.max(), err.mean())
  assert err.max() > 0  # The bf16 path really ran in bf16.

  grads = jax.jit(jax.grad(_loss_fn(decoder16, _tokens((2, 17)))))(
      variables['params'])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables))


def test_tied_and_untied_embeddings():
  cfg = _config()
  _, tied, _ = _model()
  _, untied, untied_apply = _model(tie_embeddings=False)
  assert 'head' not in tied['params']
  assert untied['params']['head']['kernel'].shape == (
      cfg.embed_dim, cfg.vocab_size)
  assert _num_params(untied) - _num_params(tied) == cfg.embed_dim * cfg.vocab_size
  logits = untied_apply(untied, _tokens((2, 16)))
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32


def test_layernorm_and_rmsnorm():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(8), (4, 32))
  rms = norms.RMSNorm(epsilon=1e-6)
  y = rms.apply(nn.unbox(rms.init(_key(0), x)), x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, rtol=1e-4)
  ln = norms.LayerNorm(epsilon=1e-6)
  variables = nn.unbox(ln.init(_key(0), x))
  assert set(variables['params']) == {'scale', 'bias'}
  y = ln.apply(variables, x)
  np.testing.assert_allclose(jnp.mean(y, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, -1), 1.0, rtol=1e-4)

  tokens = _tokens((2, 16))
  assert _config().norm == 'rmsnorm'
  _, rms_vars, rms_apply = _model()
  _, ln_vars, ln_apply = _model(norm='layernorm')
  assert 'bias' in ln_vars['params']['final_norm']
  ln_logits = ln_apply(ln_vars, tokens)
  assert np.isfinite(ln_logits).all()
  assert np.abs(rms_apply(rms_vars, tokens) - ln_logits).max() > 1e-3


@pytest.mark.parametrize('scan_layers', [False, True])
def test_every_param_has_logical_axis_names_from_the_rules(scan_layers):
  cfg = _config(scan_layers=scan_layers, tie_embeddings=False, norm='layernorm')
  boxed = jax.eval_shape(
      model.make_model(cfg).init, _key(0), jnp.zeros((1, 8), jnp.int32))
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
  assert flat['head/kernel'].names == ('embed', 'vocab')


@pytest.mark.parametrize('scan_layers', [False, True])
def test_jitted_train_step_with_dropout(scan_layers):
  decoder, _ = _decoder(dropout_rate=0.1, scan_layers=scan_layers)
  variables = _variables()
  if scan_layers:
    variables = _stack_layers(variables)
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

  eval_loss_fn = jax.jit(_loss_fn(decoder, tokens))
  eval_loss = eval_loss_fn(params)
  _, _, loss_a, grads = step(params, opt_state, _key(1))
  _, _, loss_b, _ = step(params, opt_state, _key(2))
  assert np.isfinite(loss_a) and loss_a != loss_b and loss_a != eval_loss
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))

  for i in range(5):
    params, opt_state, _, _ = step(params, opt_state, _key(10 + i))
  assert eval_loss_fn(params) < eval_loss


def test_sharded_init_and_apply_under_mesh():
  decoder, plain_apply = _decoder()
  devices = np.array(jax.devices()[:8]).reshape(2, 2, 2, 1)
  mesh = jax.sharding.Mesh(devices, ('data', 'fsdp', 'tensor', 'expert'))
  tokens = _tokens((8, 16))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    abstract = jax.eval_shape(decoder.init, _key(0), tokens)
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract), mesh, RULES)
    variables = jax.jit(decoder.init, out_shardings=shardings)(_key(0), tokens)
    query = variables['params']['block_0']['attn']['query']['kernel'].value
    assert query.sharding.spec == jax.sharding.PartitionSpec(
        'fsdp', 'tensor', None)
    sharded_logits = jax.jit(decoder.apply)(variables, tokens)
  np.testing.assert_allclose(
      sharded_logits, plain_apply(nn.unbox(variables), tokens), atol=1e-5)


@pytest.mark.parametrize('field,value', [
    ('remat', 'sometimes'), ('norm', 'batchnorm'), ('dtype', 'float16')])
def test_unknown_config_values_raise(field, value):
  decoder = model.make_model(_config(**{field: value}))
  with pytest.raises(ValueError, match=value):
    jax.eval_shape(decoder.init, _key(0), jnp.zeros((1, 8), jnp.int32))
