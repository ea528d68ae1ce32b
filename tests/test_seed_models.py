"""The seed models (experiments/xenith_mini.py, xenith_beast.py): every feature their seed
names is on, the full configs validate for their pods and scan in a few stacks, and the
tiny twins (every feature, tiny widths) train a step and round-trip exactly through
`save_pretrained` / `from_pretrained`.

Which seed claim maps to which field is docs/seed_models.md; these tests pin the fields.
"""

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import xenith
from experiments import xenith_beast
from experiments import xenith_mini
from xenith import config_validation
from xenith.model import build
from xenith.model import layer_stacks
from xenith.model import lora
from xenith.train import steps
from xenith.train.train_state import TrainState

SEEDS = {'mini': (xenith_mini, 16), 'beast': (xenith_beast, 64)}


def test_xenith_mini_turns_on_every_seed_feature():
  config = xenith_mini.get_config()
  config_validation.validate(config, num_devices=16)  # A TPU v4-32: 16 chips.
  m = config.model
  assert (m.num_layers, m.moe.first_dense_layers, m.moe.num_experts,
          m.moe.num_experts_per_token) == (64, 8, 32, 6)
  assert (m.mlp_dim, m.moe.expert_mlp_dim, m.num_heads, m.num_kv_heads) == (
      24_576, 3072, 64, 16)
  assert config.max_seq_len == 262_144 and config.data.tokenizer == 'mixtral'
  a = m.attention
  assert tuple(a.window_sizes) == (512, 1024, 2048) and a.num_global_tokens == 256
  assert a.window_split == 'heads'  # 16 KV heads over 3 windows: 6, 5, 5.
  mem = m.memory
  assert mem.short_term_tokens == 16_384 and mem.short_term_tokens > mem.chunk_size
  assert mem.bank_size == 32_768
  assert (mem.summarizer_layers, mem.summarizer_heads) == (4, 16)
  assert mem.summarizer_self_attention and mem.layers
  assert m.scan_layers and not lora.enabled(m)
  tuned = xenith_mini.get_config('lora=128').model
  assert all(lora.layer_rank(tuned, t) == 128 for t in lora.TARGETS)
  assert lora.trains_only_adapters(tuned)


def test_xenith_beast_turns_on_every_seed_feature():
  config = xenith_beast.get_config()
  config_validation.validate(config, num_devices=64)
  m = config.model
  assert (m.num_layers, m.moe.num_experts, m.moe.num_experts_per_token,
          m.moe.num_shared_experts) == (80, 64, 8, 1)
  assert config.max_seq_len == 32_768
  a = m.attention
  assert a.full_attention_layers > 0 and a.window_sizes and a.dynamic_windows
  assert m.rope_scaling.type == 'yarn' and m.norm in ('rmsnorm', 'layernorm')
  mem = m.memory
  assert (mem.chunk_size, mem.summary_tokens, mem.bank_size) == (4096, 128, 200 * 128)
  assert mem.eviction == 'lru' and mem.summarizer_self_attention
  tuned = xenith_beast.get_config('lora=256').model
  assert {t: lora.layer_rank(tuned, t) for t in lora.TARGETS if lora.layer_rank(tuned, t)} == {
      'query': 256, 'head': 256}
  config.model.norm = 'layernorm'  # The seed's other choice.
  config_validation.validate(config, num_devices=64)


@pytest.mark.parametrize('seed', list(SEEDS))
def test_full_configs_scan_in_a_few_stacks(seed):
  """Compile time does not grow with depth: the 64 / 80 layers compile as a few units."""
  module, _ = SEEDS[seed]
  plan = layer_stacks.plan(ml_collections.FrozenConfigDict(module.get_config().model))
  assert sum(s.unit for s in plan) <= 16 and len(plan) <= 4
  assert sum(s.unit * s.repeats for s in plan) == module.get_config().model.num_layers


@pytest.mark.parametrize('arg', ['size=tiny', 'size=small', 'size=tiny,memory=off',
                                 'size=small,lora=8'])
@pytest.mark.parametrize('seed', list(SEEDS))
def test_twins_validate_and_keep_the_seed_features(seed, arg):
  module, _ = SEEDS[seed]
  twin, full = module.get_config(arg), module.get_config()
  config_validation.validate(twin, num_devices=1)
  t, f = twin.model, full.model
  assert len(t.attention.window_sizes) == len(f.attention.window_sizes)
  assert bool(t.attention.num_global_tokens) == bool(f.attention.num_global_tokens)
  assert t.attention.dynamic_windows == f.attention.dynamic_windows
  assert t.rope_scaling.type == f.rope_scaling.type
  assert t.moe.num_shared_experts == f.moe.num_shared_experts and t.moe.first_dense_layers
  assert t.scan_layers
  if 'memory=off' in arg:
    assert t.memory.chunk_size == 0
  else:
    assert t.memory.short_term_tokens > t.memory.chunk_size or seed == 'beast'
    for field in ('summarizer_self_attention', 'eviction'):
      assert t.memory[field] == f.memory[field]
  passkey = twin.passkey.lengths
  assert tuple(passkey) == tuple(twin.max_seq_len * k for k in (1, 2, 4))


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match='Unknown size'):
    xenith_mini.get_config('size=huge')
  with pytest.raises(ValueError, match='Unknown config argument'):
    xenith_beast.get_config('depth=3')
  with pytest.raises(ValueError, match='memory='):
    xenith_beast.get_config('memory=maybe')
  with pytest.raises(ValueError, match='lora='):
    xenith_mini.get_config('lora=big')


@functools.partial(jax.jit, static_argnums=0)
def _forward(module, params, tokens):
  return module.apply({'params': params}, tokens, method='forward')


def _random_params(module, tokens):
  """Init params with every array (LoRA B included) nonzero, so a dropped or swapped
  tensor shows in the logits."""
  params = nn.unbox(module.init(jax.random.key(0), tokens))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [
      x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.slow
@pytest.mark.parametrize('seed', list(SEEDS))
def test_tiny_twin_trains_and_round_trips_exactly(seed, tmp_path):
  """The tiny twin with the LoRA variant on too: a train step runs and lowers the loss,
  and save_pretrained / from_pretrained give back the same params, logits and memory."""
  module, _ = SEEDS[seed]
  config = module.get_config('size=tiny,lora=4')
  config.model.lora.train_only_adapters = False  # Train everything: the step moves all.
  model = build.make_model(config.model)
  tokens = jax.random.randint(jax.random.key(2), (2, config.max_seq_len), 0,
                              config.model.vocab_size)
  params = _random_params(model, tokens)

  tx = optax.adamw(1e-2)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = jax.jit(steps.make_train_step(model, tx, skip_nonfinite=False))
  batch = {'inputs': tokens, 'segment_ids': jnp.ones_like(tokens),
           'positions': jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch, jax.random.key(3))
    losses.append(float(metrics.compute()['loss']))
  assert np.isfinite(losses).all() and losses[1] < losses[0]
  assert 'memory_bank_fill' in metrics.compute()['moe']

  trained = jax.device_get(state.params)
  problems = xenith.save_pretrained(str(tmp_path), model, trained)
  assert problems  # Not a Mistral/Mixtral: Xenith's native format.
  loaded_model, loaded = xenith.from_pretrained(str(tmp_path))
  assert loaded_model.config.to_dict() == model.config.to_dict()
  assert jax.tree.structure(loaded) == jax.tree.structure(trained)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), trained)
  want, got = _forward(model, trained, tokens), _forward(loaded_model, loaded, tokens)
  np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))
  for field, value in want.memory.arrays().items():
    np.testing.assert_array_equal(np.asarray(getattr(got.memory, field)), np.asarray(value),
                                  err_msg=field)
