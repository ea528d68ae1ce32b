"""Tests of chunk-summary memory (xenith/model/memory/: the bank, the state and its
file, and the MemoryDecoder).

Tiny models (2 layers, embed 64, chunks of 8 tokens); applies are jitted once per config.
"""

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import default
from experiments import memory as memory_experiment
from xenith import config_validation
from xenith import model
from xenith.train import steps
from xenith.model import memory
from xenith.train.train_state import TrainState

VOCAB = 128
CHUNK = 8


def _config(memory_overrides=(), **overrides) -> ml_collections.ConfigDict:
  cfg = default.get_config('size=tiny').model
  cfg.vocab_size = VOCAB
  cfg.attention.implementation = 'dense'
  for field, value in overrides.items():
    setattr(cfg, field, value)
  mem = dict(chunk_size=CHUNK, summary_tokens=2, summarizer_heads=4, bank_size=4,
             layers=(0, 1), tbptt_chunks=0, short_term_tokens=0)
  mem.update(dict(memory_overrides))
  cfg.memory.update(mem)
  return cfg


@functools.lru_cache(maxsize=None)
def _built(memory_overrides=(), overrides=()):
  overrides = dict(overrides)
  windows = overrides.pop('window_sizes', ())
  cfg = _config(memory_overrides, **overrides)
  cfg.attention.window_sizes = windows
  decoder = model.make_model(cfg)
  params = nn.unbox(jax.jit(decoder.init)(jax.random.key(0),
                                          jnp.zeros((2, 2 * CHUNK), jnp.int32)))['params']
  return decoder, params, _memory_apply(decoder)


def _memory_apply(decoder, **kwargs):
  """jit(apply(variables, tokens, **kw)) -> (logits, memory state, MoE router stats)."""
  def run(variables, tokens, **kw):
    out = decoder.apply(variables, tokens, method='forward', **kwargs, **kw)
    return out.logits, out.memory, out.moe_stats
  return jax.jit(run)


def _tokens(seed, length, batch=2, low=0, high=VOCAB):
  return jax.random.randint(jax.random.key(seed), (batch, length), low, high)


def _bank(valid, usage, age, last_read=None, m=4, embed=3):
  """A state whose bank is given; the fields `write` and `add_usage` do not read are 0."""
  batch = len(valid)
  unused = {k: jnp.zeros(()) for k in memory.state.FIELDS}
  last_read = np.zeros(np.shape(valid), np.int32) if last_read is None else last_read
  return memory.MemoryState(**{
      **unused, 'summaries': jnp.zeros((batch, len(valid[0]), embed)),
      'valid': jnp.array(valid), 'usage': jnp.array(usage, jnp.float32),
      'age': jnp.array(age, jnp.int32), 'last_read': jnp.array(last_read, jnp.int32)})


def test_write_fills_free_slots_first_then_evicts_least_used_then_oldest():
  bank = _bank([[True, False, True, False]], [[5.0, 0.0, 1.0, 0.0]], [[3, 0, 1, 0]])
  new = jnp.ones((1, 2, 3)) * jnp.array([1.0, 2.0])[None, :, None]
  out = memory.bank.write(bank, new)
  np.testing.assert_array_equal(out.valid, [[True] * 4])
  np.testing.assert_array_equal(out.summaries[0, :, 0], [0, 1, 0, 2])  # Free 1 and 3.
  np.testing.assert_array_equal(out.age, [[4, 0, 2, 0]])
  np.testing.assert_array_equal(out.usage, [[5, 0, 1, 0]])
  # Full: the least-used (slot 2: 1.0) goes, then the tie at 3.0 goes to the oldest (3).
  bank = _bank([[True] * 4], [[5.0, 3.0, 1.0, 3.0]], [[9, 2, 1, 4]])
  out = memory.bank.write(bank, new)
  np.testing.assert_array_equal(out.summaries[0, :, 0], [0, 0, 1, 2])
  np.testing.assert_array_equal(out.age, [[10, 3, 0, 0]])
  np.testing.assert_array_equal(out.usage, [[5, 3, 0, 0]])
  with pytest.raises(ValueError, match='5 summaries do not fit a bank of 4 slots'):
    memory.bank.write(bank, jnp.ones((1, 5, 3)))


def test_least_used_and_lru_evict_different_slots():
  """Slot 0 was read heavily long ago (usage 5, last read 6 chunks back), slot 1 lightly
  in the latest chunk (usage 0.2, last_read 0): 'least_used' evicts slot 1, 'lru' slot 0.
  Ties in last_read go to the oldest; the written slot restarts at usage, age and
  last_read 0."""
  bank = _bank([[True, True, True]], [[5.0, 0.2, 1.0]], [[9, 2, 4]], [[6, 0, 2]])
  new = jnp.full((1, 1, 3), 7.0)
  least_used = memory.bank.write(bank, new, 'least_used')
  lru = memory.bank.write(bank, new, 'lru')
  np.testing.assert_array_equal(least_used.summaries[0, :, 0], [0, 7, 0])
  np.testing.assert_array_equal(lru.summaries[0, :, 0], [7, 0, 0])
  np.testing.assert_array_equal(lru.last_read, [[0, 0, 2]])
  np.testing.assert_array_equal(lru.age, [[0, 3, 5]])
  np.testing.assert_allclose(lru.usage, [[0, 0.2, 1.0]])
  tie = _bank([[True, True, True]], [[0.0, 0.0, 9.0]], [[1, 5, 3]], [[4, 1, 4]])
  np.testing.assert_array_equal(memory.bank.write(tie, new, 'lru').summaries[0, :, 0],
                                [0, 0, 7])  # last_read 4 twice: the older (age 3) goes.
  with pytest.raises(ValueError, match="eviction='oldest' is not one of"):
    memory.bank.write(bank, new, 'oldest')


def test_a_slot_is_read_when_its_mean_probability_per_query_exceeds_the_threshold():
  """mark_reads: mass / (queries x memory layers) > threshold resets last_read to 0,
  other valid slots count one more chunk, free slots stay 0."""
  bank = _bank([[True, True, True, False]], [[0.0] * 4], [[0] * 4], [[3, 3, 3, 0]])
  mass = jnp.array([[0.5, 0.05, 0.0, 3.0]])  # Over 10 queries: 0.05, 0.005, 0, (free).
  out = memory.bank.mark_reads(bank, mass, 10, 0.01)
  np.testing.assert_array_equal(out.last_read, [[0, 4, 4, 0]])
  out = memory.bank.mark_reads(bank, mass, 100, 0.001)  # The same mass over 100: 0.005.
  np.testing.assert_array_equal(out.last_read, [[0, 4, 4, 0]])
  out = memory.bank.mark_reads(bank, mass, 100, 0.01)
  np.testing.assert_array_equal(out.last_read, [[4, 4, 4, 0]])


def test_usage_accumulates_with_decay_on_valid_slots():
  bank = _bank([[True, True, False, False]], [[1.0, 2.0, 0.0, 0.0]], [[0] * 4])
  out = memory.bank.add_usage(bank, jnp.array([[0.5, 0.0, 7.0, 0.0]]), 0.5)
  np.testing.assert_allclose(out.usage, [[1.0, 1.0, 0.0, 0.0]])
  out = memory.bank.add_usage(out, jnp.array([[1.0, 1.0, 0.0, 0.0]]), 1.0)  # decay 1 = sum
  np.testing.assert_allclose(out.usage, [[2.0, 2.0, 0.0, 0.0]])


def test_memory_off_is_the_old_model():
  off = _config((('chunk_size', 0),))
  old = _config()
  del old['memory']
  tokens = _tokens(0, 16)
  outs = []
  for cfg in (off, old):
    decoder = model.make_model(cfg)
    variables = nn.unbox(decoder.init(jax.random.key(0), tokens))
    outs.append((variables, decoder.apply(variables, tokens)))
  assert (jax.tree_util.tree_structure(outs[0][0])
          == jax.tree_util.tree_structure(outs[1][0]))
  assert 'summarizer' not in outs[0][0]['params']
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  with pytest.raises(TypeError, match='memory'):  # A plain Decoder has no memory.
    model.make_model(off).apply(outs[0][0], tokens, memory=None)


def test_first_chunk_equals_the_plain_model_on_that_chunk():
  _, params, apply = _built((('short_term_tokens', 3),))
  plain = model.make_model(_config((('chunk_size', 0),)))
  shared = {k: v for k, v in params.items() if k != 'summarizer'}
  tokens = _tokens(1, 3 * CHUNK)
  logits, state, _ = apply({'params': params}, tokens)
  first = plain.apply({'params': shared}, tokens[:, :CHUNK])
  np.testing.assert_allclose(logits[:, :CHUNK], first, atol=1e-5, rtol=1e-5)
  assert logits.shape == (2, 3 * CHUNK, VOCAB)
  assert int(state.position) == 3 * CHUNK
  assert bool(state.valid.all())  # 3 chunks x 2 summaries > 4 slots.
  # Chunk 3's write replaced the 2 least-used; the 2 kept have received attention mass.
  np.testing.assert_array_equal((state.usage > 0).sum(-1), [2, 2])
  np.testing.assert_array_equal(state.age == 0, state.usage == 0)  # The new ones.


def test_a_later_chunk_never_changes_an_earlier_one():
  _, params, apply = _built((('short_term_tokens', 3),))
  tokens = _tokens(2, 3 * CHUNK)
  changed = tokens.at[:, CHUNK + 2].set((tokens[:, CHUNK + 2] + 1) % VOCAB)
  a, _, _ = apply({'params': params}, tokens)
  b, _, _ = apply({'params': params}, changed)
  np.testing.assert_array_equal(a[:, :CHUNK + 2], b[:, :CHUNK + 2])
  assert not np.allclose(a[:, CHUNK + 2:], b[:, CHUNK + 2:])


def test_the_bank_carries_chunk_one_into_chunk_three():
  tokens = _tokens(3, 3 * CHUNK)
  changed = tokens.at[:, 1].set((tokens[:, 1] + 1) % VOCAB)
  third = slice(2 * CHUNK, 3 * CHUNK)
  _, params, apply = _built()  # short_term_tokens 0, full attention within chunks.
  a, _, _ = apply({'params': params}, tokens)
  b, _, _ = apply({'params': params}, changed)
  assert np.abs(a[:, third] - b[:, third]).max() > 1e-4
  # No memory layers: nothing reaches across chunks (bank written, never read).
  _, params, apply = _built((('layers', ()),))
  a, _, _ = apply({'params': params}, tokens)
  b, _, _ = apply({'params': params}, changed)
  np.testing.assert_array_equal(a[:, CHUNK:], b[:, CHUNK:])


@pytest.mark.parametrize('windows', [(), (6, 12)])
def test_two_calls_through_save_and_load_equal_one_call(windows, tmp_path):
  decoder, params, apply = _built((('short_term_tokens', 3), ('layers', (1,))),
                                  (('window_sizes', windows),))
  tokens = _tokens(4, 4 * CHUNK)
  whole, whole_state, _ = apply({'params': params}, tokens)
  first, state, _ = apply({'params': params}, tokens[:, :2 * CHUNK])
  path = str(tmp_path / 'bank.npz')
  memory.save_bank(path, state)
  loaded = memory.load_bank(path, like=memory.init_state(decoder.config, 2))
  second, end_state, _ = apply({'params': params}, tokens[:, 2 * CHUNK:], memory=loaded)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole,
                             atol=1e-5, rtol=1e-5)
  for k, v in whole_state.arrays().items():
    np.testing.assert_allclose(getattr(end_state, k), v, atol=1e-5, rtol=1e-5, err_msg=k)


def test_decoding_one_token_at_a_time_equals_the_chunked_pass(tmp_path):
  """Memory kept while decoding: a whole chunk, 5 tokens in one decode call, a save and
  load mid-chunk, then single tokens give the chunked pass's logits and final state
  (windows 6/12 inside a chunk of 8, short-term keys, and a bank of 4 that evicts from
  the third chunk on)."""
  decoder, params, apply = _built((('short_term_tokens', 3), ('layers', (1,))),
                                  (('window_sizes', (6, 12)),))
  tokens = _tokens(4, 4 * CHUNK)
  whole, whole_state, _ = apply({'params': params}, tokens)
  decode = _memory_apply(decoder, decode=True)
  logits, state, _ = apply({'params': params}, tokens[:, :CHUNK])
  outs = [logits]
  logits, state, _ = decode({'params': params}, tokens[:, CHUNK:CHUNK + 5], memory=state)
  outs.append(logits)
  path = str(tmp_path / 'mid_chunk.npz')
  memory.save_bank(path, state)
  state = memory.load_bank(path, like=memory.init_state(decoder.config, 2))
  assert int(state.position) == CHUNK + 5
  with pytest.raises(ValueError, match='5 tokens into a chunk'):
    decoder.apply({'params': params}, tokens[:, :CHUNK], memory=state)
  for t in range(CHUNK + 5, 4 * CHUNK):
    logits, state, _ = decode({'params': params}, tokens[:, t:t + 1], memory=state)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), whole, atol=2e-5, rtol=2e-5)
  assert int(whole_state.valid.sum()) == 8  # The bank is full: it evicted.
  for k, v in whole_state.arrays().items():
    np.testing.assert_allclose(getattr(state, k), v, atol=2e-5, rtol=2e-5, err_msg=k)


def test_memory_with_moe_layers():
  """MoE and memory together: the first chunk equals the plain MoE model on it (logits
  and router stats), the router stats of a longer input are the chunks' mean, and
  token-by-token decoding equals the chunked pass."""
  cfg = _config((('short_term_tokens', 2), ('layers', (1,))))
  cfg.moe.update(dict(num_experts=4, num_experts_per_token=2, expert_mlp_dim=32,
                      first_dense_layers=1, dispatch='dropless_gather', block_size=8))
  decoder = model.make_model(cfg)
  tokens = _tokens(7, 3 * CHUNK)
  params = nn.unbox(jax.jit(decoder.init)(jax.random.key(0), tokens))['params']
  assert 'moe' in params['block_1'] and 'mlp' in params['block_0']
  apply = _memory_apply(decoder)
  logits, state, stats = apply({'params': params}, tokens)
  assert set(stats) == {'layer_1'}
  plain_cfg = _config((('chunk_size', 0),))
  plain_cfg.moe.update(cfg.moe)
  plain = model.make_model(plain_cfg)
  shared = {k: v for k, v in params.items() if k != 'summarizer'}
  plain_out = jax.jit(functools.partial(plain.apply, method='forward'))(
      {'params': shared}, tokens[:, :CHUNK])
  first, first_stats = plain_out.logits, plain_out.moe_stats
  np.testing.assert_allclose(logits[:, :CHUNK], first, atol=1e-5, rtol=1e-5)
  chunk_stats = [apply({'params': params}, tokens[:, :CHUNK])[2]]
  for c in (1, 2):  # Chunks 2 and 3, continuing from the state after the one before.
    _, before, _ = apply({'params': params}, tokens[:, :c * CHUNK])
    chunk_stats.append(apply({'params': params}, tokens[:, c * CHUNK:(c + 1) * CHUNK],
                             memory=before)[2])
  np.testing.assert_allclose(chunk_stats[0]['layer_1']['aux_loss'],
                             first_stats['layer_1']['aux_loss'], rtol=1e-5)
  for name in ('aux_loss', 'expert_fraction'):
    mean = np.mean([s['layer_1'][name] for s in chunk_stats], axis=0)
    np.testing.assert_allclose(stats['layer_1'][name], mean, rtol=1e-5, atol=1e-7)
  decode = _memory_apply(decoder, decode=True)
  step_state = memory.init_state(decoder.config, 2)
  outs = []
  for t in range(tokens.shape[1]):
    out, step_state, _ = decode({'params': params}, tokens[:, t:t + 1], memory=step_state)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), logits, atol=2e-5, rtol=2e-5)


def _memory_and_plain(short, attention=(), num_chunks=4):
  """A memory model reading no bank (short-term memory R = `short`) and the plain
  `Decoder` with the same params and attention pattern (`attention`: field pairs):
  (memory config, jitted memory forward, jitted plain logits, params)."""
  cfg = _config((('layers', ()), ('short_term_tokens', short)))
  cfg.attention.update(dict(attention))
  cfg.max_seq_len = num_chunks * CHUNK
  decoder = model.make_model(cfg)
  params = nn.unbox(jax.jit(decoder.init)(jax.random.key(1),
                                          jnp.zeros((2, CHUNK), jnp.int32)))['params']
  plain_cfg = ml_collections.ConfigDict(cfg.to_dict())
  plain_cfg.memory.chunk_size = 0
  plain = model.make_model(plain_cfg)
  shared = {k: v for k, v in params.items() if k != 'summarizer'}
  plain_apply = jax.jit(lambda t, s: plain.apply({'params': shared}, t, segment_ids=s))
  return decoder, _memory_apply(decoder), plain_apply, params


def _two_documents(length):
  """[2, length] segment ids: row 1 starts a second document at token 13."""
  segments = np.ones((2, length), np.int32)
  segments[1, 13:] = 2
  return jnp.asarray(segments)


@pytest.mark.parametrize('windows', [(), (6, 20)], ids=['full', 'windows'])
def test_short_term_memory_of_all_earlier_chunks_is_the_plain_decoder(windows):
  """R = 3 chunks + 1 >= everything before the last chunk, no bank reads: every chunk
  sees all earlier tokens (their keys with RoPE at their stream positions), so the logits
  are the plain `Decoder`'s on the whole sequence (with two documents in row 1), with
  full attention and with windows 6 and 20 (20 > 2 chunks: the window must still cut the
  short-term keys). Token-by-token decoding agrees with the whole-chunk pass."""
  decoder, apply, plain, params = _memory_and_plain(
      3 * CHUNK + 1, (('window_sizes', windows),))
  tokens = _tokens(9, 4 * CHUNK)
  segments = _two_documents(4 * CHUNK)
  want = plain(tokens, segments)
  logits, state, _ = apply({'params': params}, tokens, segment_ids=segments)
  np.testing.assert_allclose(logits, want, atol=2e-5, rtol=2e-5)
  # The short-term memory: the last R tokens of the stream (R > C), with their documents.
  np.testing.assert_array_equal(state.short_positions[0], np.arange(CHUNK - 1, 4 * CHUNK))
  np.testing.assert_array_equal(state.short_segments, segments[:, CHUNK - 1:])
  _assert_decoding_equals_whole_chunks(decoder, apply, params, tokens)


def _assert_decoding_equals_whole_chunks(decoder, apply, params, tokens):
  """Token-by-token decoding of one document gives the whole-chunk pass's logits and
  state (segment_ids given, so the compiled whole-chunk pass is reused)."""
  one_doc, whole_state, _ = apply({'params': params}, tokens,
                                  segment_ids=jnp.ones_like(tokens, jnp.int32))
  decoded, step_state, _ = _memory_apply(decoder, decode=True)({'params': params}, tokens)
  np.testing.assert_allclose(decoded, one_doc, atol=2e-5, rtol=2e-5)
  for k, v in whole_state.arrays().items():
    np.testing.assert_allclose(getattr(step_state, k), v, atol=2e-5, rtol=2e-5, err_msg=k)


@pytest.mark.parametrize('split, num_global', [('heads', 3), ('layers', 3), ('heads', 11)],
                         ids=['heads', 'layers', 'more_than_a_chunk'])
def test_global_tokens_with_memory_are_the_plain_decoders(split, num_global):
  """Every layer windowed (4 and 6, split by heads or by layers), G global tokens, R = 6
  >= the largest window, no bank reads: the memory model equals the plain `Decoder` with
  the same windows and global tokens on the whole 4-chunk sequence (two documents in row
  1; the second has no global tokens), also with G = 11 > C. The state keeps the first G
  tokens' keys; token-by-token decoding agrees with the whole-chunk pass."""
  attention = (('window_sizes', (4, 6)), ('full_attention_layers', 0),
               ('num_global_tokens', num_global), ('window_split', split))
  decoder, apply, plain, params = _memory_and_plain(6, attention)
  tokens = _tokens(10, 4 * CHUNK)
  segments = _two_documents(4 * CHUNK)
  logits, state, _ = apply({'params': params}, tokens, segment_ids=segments)
  np.testing.assert_allclose(logits, plain(tokens, segments), atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(state.global_positions, [np.arange(num_global)] * 2)
  assert state.global_keys.shape == (2, 2, num_global, 2, 16)
  _assert_decoding_equals_whole_chunks(decoder, apply, params, tokens)


def test_load_bank_rejects_another_shape(tmp_path):
  cfg = ml_collections.FrozenConfigDict(_config())
  path = str(tmp_path / 'bank.npz')
  memory.save_bank(path, memory.init_state(cfg, 2))
  with pytest.raises(ValueError, match='summaries'):
    memory.load_bank(path, like=memory.init_state(_config(memory_overrides=(('bank_size', 6),)), 2))
  with pytest.raises(ValueError, match='batch=3'):
    model.make_model(_config()).apply(
        {'params': _built()[1]}, _tokens(0, CHUNK, batch=3), memory=memory.load_bank(path))


def test_gradients_reach_the_summarizer_and_stop_after_tbptt_chunks():
  cfg = _config((('tbptt_chunks', 2), ('short_term_tokens', 2)), tie_embeddings=False)
  decoder = model.make_model(cfg)
  # Chunk 1 uses tokens 0..9 only; the later chunks 64..127.
  tokens = jnp.concatenate([_tokens(5, CHUNK, high=10), _tokens(6, 2 * CHUNK, low=64)], 1)
  params = nn.unbox(decoder.init(jax.random.key(0), tokens))['params']

  def chunk_loss(params, c):
    logits = decoder.apply({'params': params}, tokens)
    return jax.nn.logsumexp(logits[:, c * CHUNK:(c + 1) * CHUNK], -1).sum()

  grad = jax.jit(jax.grad(chunk_loss), static_argnums=1)
  within, beyond = grad(params, 1), grad(params, 2)  # Chunks 2 (<= K) and 3 (K + 1).
  rows = slice(0, 10)
  assert np.abs(within['embed']['embedding'][rows]).max() > 0
  assert np.abs(within['summarizer']['queries']).max() > 0
  np.testing.assert_array_equal(beyond['embed']['embedding'][rows], 0)


def _full_config(**memory_fields):
  config = default.get_config('size=tiny')
  config.model.memory.update(dict(chunk_size=16, layers=(1,), summary_tokens=2,
                                  bank_size=4))
  config.model.memory.update(memory_fields)
  return config


@pytest.mark.parametrize('fields, bad', [
    (dict(chunk_size=24), 'chunk_size'),
    (dict(layers=(2,)), 'layers'),
    (dict(layers=(-1,)), 'layers'),
    (dict(bank_size=1), 'bank_size'),
    (dict(short_term_tokens=-1), 'short_term_tokens'),
    (dict(summarizer_heads=3), 'summarizer_heads'),
    (dict(tbptt_chunks=-1), 'tbptt_chunks'),
    (dict(usage_decay=1.5), 'usage_decay'),
    (dict(eviction='oldest'), 'eviction'),
    (dict(lru_read_threshold=-0.1), 'lru_read_threshold'),
])
def test_config_validation_rejects_bad_memory_fields(fields, bad):
  with pytest.raises(config_validation.ConfigError, match=bad):
    config_validation.validate(_full_config(**fields), num_devices=1)


def test_config_validation_accepts_memory_with_every_feature():
  config_validation.validate(_full_config(), num_devices=1)
  config = _full_config()
  config.passkey.lengths = (64, 100)
  with pytest.raises(config_validation.ConfigError, match='passkey.lengths'):
    config_validation.validate(config, num_devices=1)
  config_validation.validate(memory_experiment.get_config('size=tiny'), num_devices=1)
  config = _full_config(short_term_tokens=40, eviction='lru', summarizer_self_attention=True)
  config.model.attention.update(dict(window_sizes=(8,), num_global_tokens=20))
  config_validation.validate(config, num_devices=1)  # R > C, global tokens: all combine.
  config.model.scan_layers = True  # And scanned layers (tests/test_layer_stacks.py).
  config_validation.validate(config, num_devices=1)


def test_train_steps_with_memory():
  config = memory_experiment.get_config('size=tiny')
  config.model.vocab_size = VOCAB
  decoder = model.make_model(config.model)
  tx = optax.adamw(1e-3)
  seq = config.max_seq_len
  params = nn.unbox(decoder.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32)))['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params))
  step = jax.jit(steps.make_train_step(decoder, tx, skip_nonfinite=False))
  batch = {'inputs': _tokens(7, seq), 'segment_ids': jnp.ones((2, seq), jnp.int32),
           'positions': jnp.broadcast_to(jnp.arange(seq), (2, seq))}
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics.compute()['loss']))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  # Bank metrics, by hand: 4 chunks x 2 summaries fill all 8 slots; the last chunk's
  # summaries were just written (0 chunks since read), the first chunk's 3 chunks ago at
  # most, so the mean over filled slots is in [0, 3] and their usage is >= 0.
  mem = config.model.memory
  assert (seq // mem.chunk_size) * mem.summary_tokens == mem.bank_size
  bank_metrics = metrics.compute()['moe']
  assert float(bank_metrics['memory_bank_fill']) == 1.0
  assert 0.0 <= float(bank_metrics['memory_chunks_since_read']) <= 3.0
  assert float(bank_metrics['memory_bank_usage']) >= 0.0
  summarizer_delta = jax.tree.map(lambda a, b: jnp.abs(a - b).max(),
                                  state.params['summarizer'], params['summarizer'])
  assert max(jax.tree.leaves(summarizer_delta)) > 0


def test_remat_gives_the_same_logits_and_dropout_runs():
  _, params, apply = _built((('short_term_tokens', 2),))
  tokens = _tokens(8, 2 * CHUNK)
  expected, _, _ = apply({'params': params}, tokens)
  remat = model.make_model(_config((('short_term_tokens', 2),), remat='full',
                                   dropout_rate=0.1))
  logits = jax.jit(remat.apply)({'params': params}, tokens)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  train = jax.jit(lambda p, t: remat.apply({'params': p}, t, deterministic=False,
                                           rngs={'dropout': jax.random.key(3)}))
  assert bool(jnp.isfinite(train(params, tokens)).all())
