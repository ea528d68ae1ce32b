"""RoPE with YaRN scaling (xenith/model/rope.py), checked against Hugging Face transformers.

The reference is transformers' own YaRN (`_compute_yarn_parameters`, and Llama's
rotary embedding and `apply_rotary_pos_emb`) on PyTorch CPU; both are test-only
dependencies (requirements-test.txt), imported plainly so a missing install fails.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import _compute_yarn_parameters
from transformers.models.llama import modeling_llama

from experiments import default
from xenith import config_validation
from xenith import model
from xenith.model import attention
from xenith.model import rope


def _key(seed):
  return jax.random.key(seed, impl='rbg')


def _config(scaling=None, **overrides) -> ml_collections.ConfigDict:
  """The tiny model config; `scaling` updates `rope_scaling`, `overrides` the rest."""
  cfg = default.get_config('size=tiny').model
  for field, value in overrides.items():
    setattr(cfg, field, value)
  for field, value in (scaling or {}).items():
    setattr(cfg.rope_scaling, field, value)
  return cfg


def _hf_config(cfg) -> transformers.LlamaConfig:
  """A Llama config whose `rope_parameters` say what `cfg.rope_scaling` says."""
  s = cfg.rope_scaling
  params = dict(
      rope_type='yarn', rope_theta=cfg.rope_theta, factor=s.factor,
      original_max_position_embeddings=s.original_max_position,
      beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
  # Ours: 0 = unset; theirs: absent (None) = unset.
  for field in ('attention_factor', 'mscale', 'mscale_all_dim'):
    if s[field]:
      params[field] = s[field]
  return transformers.LlamaConfig(
      hidden_size=cfg.embed_dim, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      intermediate_size=cfg.mlp_dim, vocab_size=cfg.vocab_size,
      max_position_embeddings=int(s.original_max_position * s.factor),
      rope_parameters=params)


# (head_dim, rope_theta, rope_scaling overrides): Llama-2/Mistral/Llama-3/Qwen-like
# shapes, fractional factors and betas, both truncate modes, explicit and
# DeepSeek-style attention factors, ramps clipped at either end, and factor 1.
SETTINGS = [
    (16, 10_000.0, dict(factor=4.0, original_max_position=64)),
    (64, 10_000.0, dict(factor=8.0, original_max_position=2048)),
    (128, 1_000_000.0, dict(factor=4.0, original_max_position=32768, truncate=False)),
    (128, 500_000.0, dict(factor=16.0, original_max_position=8192, beta_fast=16.0,
                          beta_slow=2.0)),
    (32, 10_000.0, dict(factor=2.5, original_max_position=100, beta_fast=24.5,
                        beta_slow=1.5, truncate=False)),
    (64, 10_000.0, dict(factor=4.0, original_max_position=4096, attention_factor=1.25)),
    (64, 10_000.0, dict(factor=40.0, original_max_position=4096, mscale=1.0,
                        mscale_all_dim=0.707)),
    (16, 10_000.0, dict(factor=4.0, original_max_position=8)),  # ramp starts below dim 0
    (16, 100.0, dict(factor=4.0, original_max_position=65536)),  # ramp ends past the top
    (32, 10_000.0, dict(factor=1.0, original_max_position=128)),
]


@pytest.mark.parametrize('head_dim,theta,scaling', SETTINGS)
def test_yarn_frequencies_and_attention_factor_match_hugging_face(head_dim, theta, scaling):
  cfg = _config(dict(type='yarn', **scaling), head_dim=head_dim, rope_theta=theta)
  frozen = ml_collections.FrozenConfigDict(cfg)
  hf_inv_freq, hf_attention_factor = _compute_yarn_parameters(_hf_config(cfg))
  inv_freq = rope.inv_frequencies(frozen)
  assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == jnp.float32
  np.testing.assert_allclose(inv_freq, hf_inv_freq.numpy(), rtol=1e-6, atol=0)
  assert rope.attention_factor(frozen) == pytest.approx(hf_attention_factor, rel=1e-12)


def test_yarn_frequencies_interpolate_low_and_keep_high():
  """The paper's shape: fast dims keep theta^(-2i/d), slow ones are divided by factor."""
  head_dim, theta, factor = 128, 10_000.0, 8.0
  plain = np.asarray(rope.default_inv_frequencies(head_dim, theta))
  yarn = np.asarray(rope.yarn_inv_frequencies(head_dim, theta, factor, 4096))
  np.testing.assert_allclose(yarn[:8], plain[:8], rtol=1e-7)
  np.testing.assert_allclose(yarn[-8:], plain[-8:] / factor, rtol=1e-6)
  ratio = plain / yarn
  assert np.all(np.diff(ratio) >= -1e-6) and ratio.min() >= 1 - 1e-6
  assert rope.yarn_attention_factor(factor) == pytest.approx(0.1 * np.log(factor) + 1)
  assert rope.yarn_attention_factor(1.0) == 1.0


def _hf_rotate(cfg, q, k, positions):
  """HF Llama: cos/sin (attention factor included) -> apply_rotary_pos_emb.

  q, k: [batch, seq, heads, head_dim] numpy; returns both in that layout.
  """
  hf_config = _hf_config(cfg)
  rotary = modeling_llama.LlamaRotaryEmbedding(hf_config)
  q_t = torch.tensor(np.asarray(q)).transpose(1, 2)  # [batch, heads, seq, head_dim]
  k_t = torch.tensor(np.asarray(k)).transpose(1, 2)
  cos, sin = rotary(q_t, torch.tensor(np.asarray(positions)).long())
  q_rot, k_rot = modeling_llama.apply_rotary_pos_emb(q_t, k_t, cos, sin)
  return (q_rot.transpose(1, 2).numpy(), k_rot.transpose(1, 2).numpy(),
          rotary.attention_scaling)


@pytest.mark.parametrize('scaling', [
    dict(factor=4.0, original_max_position=64),
    dict(factor=8.0, original_max_position=32, beta_fast=16.0, beta_slow=2.0,
         truncate=False, attention_factor=1.3),
])
def test_rotated_queries_and_keys_match_hugging_face(scaling):
  cfg = _config(dict(type='yarn', **scaling), head_dim=64)
  frozen = ml_collections.FrozenConfigDict(cfg)
  batch, seq = 3, 40
  q = jax.random.normal(jax.random.key(0), (batch, seq, cfg.num_heads, cfg.head_dim))
  k = jax.random.normal(jax.random.key(1), (batch, seq, cfg.num_kv_heads, cfg.head_dim))
  # Positions up to the extended context, most beyond the original one.
  extended = int(scaling['factor'] * scaling['original_max_position'])
  positions = jax.random.randint(jax.random.key(2), (batch, seq), 0, extended)
  positions = positions.at[:, 0].set(0).at[:, 1].set(extended - 1)

  inv_freq, scale = rope.inv_frequencies(frozen), rope.attention_factor(frozen)
  q_rot = rope.apply_rope(q, positions, inv_freq, scale)
  k_rot = rope.apply_rope(k, positions, inv_freq, scale)
  hf_q, hf_k, hf_scale = _hf_rotate(cfg, q, k, positions)
  assert scale == pytest.approx(hf_scale, rel=1e-12) and scale > 1
  # float32 sin/cos of angles up to ~extended rad differ by a few ulps between XLA and torch.
  np.testing.assert_allclose(q_rot, hf_q, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(k_rot, hf_k, atol=2e-5, rtol=1e-5)
  # Scores of rotated pairs carry the attention factor squared.
  np.testing.assert_allclose(
      jnp.linalg.norm(q_rot, axis=-1), scale * jnp.linalg.norm(q, axis=-1), rtol=1e-5)


def test_attention_layer_with_yarn_matches_hugging_face_rotary():
  """The Attention module uses the YaRN tables: a torch reference built on HF's rotary."""
  cfg = _config(dict(type='yarn', factor=4.0, original_max_position=8))
  frozen = ml_collections.FrozenConfigDict(cfg)
  batch, seq = 2, 32  # 4x the original context.
  x = jax.random.normal(jax.random.key(3), (batch, seq, cfg.embed_dim))
  positions = jnp.tile(jnp.arange(seq, dtype=jnp.int32), (batch, 1))
  layer = attention.Attention(frozen)
  variables = nn.unbox(jax.jit(layer.init)(_key(4), x, None, positions))
  out = jax.jit(layer.apply)(variables, x, None, positions)

  p = {name: torch.tensor(np.asarray(v['kernel']))
       for name, v in variables['params'].items()}
  xt = torch.tensor(np.asarray(x))
  q = torch.einsum('bse,ehd->bshd', xt, p['query'])
  k = torch.einsum('bse,ehd->bshd', xt, p['key'])
  v = torch.einsum('bse,ehd->bshd', xt, p['value'])
  q_rot, k_rot, _ = _hf_rotate(cfg, q.numpy(), k.numpy(), positions)
  q, k = torch.from_numpy(q_rot), torch.from_numpy(k_rot)
  group = cfg.num_heads // cfg.num_kv_heads
  k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
  scores = torch.einsum('bqhd,bkhd->bhqk', q, k) / cfg.head_dim**0.5
  causal = torch.ones(seq, seq, dtype=torch.bool).tril()
  probs = scores.masked_fill(~causal, float('-inf')).softmax(-1)
  expected = torch.einsum(
      'bqhd,hde->bqe', torch.einsum('bhqk,bkhd->bqhd', probs, v), p['out'])
  np.testing.assert_allclose(out, expected.numpy(), atol=1e-5, rtol=1e-5)


def test_yarn_off_is_plain_rope_exactly():
  cfg = ml_collections.FrozenConfigDict(_config())
  assert cfg.rope_scaling.type == 'none'  # The default model is unchanged.
  plain = rope.default_inv_frequencies(cfg.head_dim, cfg.rope_theta)
  np.testing.assert_array_equal(rope.inv_frequencies(cfg), plain)
  assert rope.attention_factor(cfg) == 1.0
  # Other YaRN fields are ignored while the type is 'none'.
  ignored = ml_collections.FrozenConfigDict(_config(dict(factor=8.0, attention_factor=2.0)))
  np.testing.assert_array_equal(rope.inv_frequencies(ignored), plain)
  assert rope.attention_factor(ignored) == 1.0

  x = jax.random.normal(jax.random.key(5), (2, 9, 3, cfg.head_dim))
  positions = jax.random.randint(jax.random.key(6), (2, 9), 0, 5000)
  np.testing.assert_array_equal(
      rope.apply_rope(x, positions, plain, 1.0), rope.apply_rope(x, positions, plain))


def test_decoder_with_yarn_runs_and_differs_from_plain_rope():
  plain_cfg = _config(vocab_size=128)
  yarn_cfg = _config(dict(type='yarn', factor=4.0, original_max_position=16), vocab_size=128)
  plain, yarn = model.make_model(plain_cfg), model.make_model(yarn_cfg)
  tokens = jax.random.randint(jax.random.key(7), (2, 64), 0, 128, jnp.int32)
  variables = nn.unbox(jax.jit(plain.init)(_key(0), tokens))
  # Same parameters: YaRN adds none.
  assert (jax.tree.map(jnp.shape, variables)
          == jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(yarn.init, _key(0), tokens))))
  plain_logits = jax.jit(plain.apply)(variables, tokens)
  yarn_logits = jax.jit(yarn.apply)(variables, tokens)
  assert yarn_logits.shape == (2, 64, 128) and np.isfinite(yarn_logits).all()
  assert np.abs(yarn_logits - plain_logits).max() > 1e-3


def test_unknown_rope_scaling_type_raises_in_the_model():
  decoder = model.make_model(_config(dict(type='ntk')))
  with pytest.raises(ValueError, match='ntk'):
    jax.eval_shape(decoder.init, _key(0), jnp.zeros((1, 8), jnp.int32))


@pytest.mark.parametrize('field,value,message', [
    ('type', 'ntk', r'config.model.rope_scaling.type: .* must be one of'),
    ('factor', 0.5, r'config.model.rope_scaling.factor: 0.5 must be >= 1'),
    ('original_max_position', 0, r'config.model.rope_scaling.original_max_position'),
    ('beta_fast', 1.0, r'config.model.rope_scaling.beta_fast: 1.0 must be > '
                       r'config.model.rope_scaling.beta_slow=1.0'),
    ('beta_slow', 0.0, r'config.model.rope_scaling.beta_slow: 0.0 must be > 0'),
    ('attention_factor', -1.0, r'config.model.rope_scaling.attention_factor'),
    ('truncate', 'yes', r'config.model.rope_scaling.truncate'),
])
def test_invalid_rope_scaling_is_named(field, value, message):
  config = default.get_config('size=tiny')
  config.model.rope_scaling.type = 'yarn'
  if field == 'truncate':  # ConfigDict keeps a field's type; replace the bool.
    config.model.rope_scaling = ml_collections.ConfigDict(
        {**config.model.rope_scaling.to_dict(), 'truncate': value})
  else:
    setattr(config.model.rope_scaling, field, value)
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate(config, num_devices=8)


def test_context_extension_override_is_valid():
  """docs/rope.md's example: a model trained at 128 tokens, run at 512 with YaRN x4."""
  config = default.get_config('size=small')
  config.max_seq_len = 512
  config.model.rope_scaling.type = 'yarn'
  config.model.rope_scaling.factor = 4
  config.model.rope_scaling.original_max_position = 128
  config_validation.validate(config, num_devices=8)
  assert rope.ROPE_SCALING_TYPES == config_validation.ROPE_SCALING_TYPES
