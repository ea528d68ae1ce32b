"""Chunk-summary memory against an independent NumPy reference.

The other memory tests compare two paths of xenith's own code (one call vs two, whole
chunks vs decoding) that share `bank.close_chunk` and `attention.attention_with_memory`
(xenith/model/memory/).
Here a plain NumPy forward pass, written from the params and the documented semantics
(it calls nothing of xenith's on the reference side), checks chunk by chunk:

- the logits: each chunk attends, in one softmax, to the bank's summaries (this layer's
  key/value projections, no RoPE, scored against the queries without RoPE, masked by
  `valid`; memory layers only), the stream's last R keys before it (with RoPE; R < C and
  R > C) and itself, masked by stream position (causal, the KV head's window) and
  document;
- the summarizer (learned queries, optionally self-attending, cross-attending to the
  chunk's final hidden states, pre-norms, GELU MLP, final norm) and the bank it fills,
  eviction included (least used, or least recently read with eviction='lru');
- the usage: decay * old usage + the attention mass the bank received (summed over the
  chunk's queries and the memory layers, mean over heads), on valid slots; last_read;
- the short-term memory: the stream's last R keys (with RoPE), values, positions,
  documents;
- that chunk 1 reaches chunk 2 only through the bank and the short-term memory.

Tiny float32 models (1-2 layers, embed 32, 4 heads on 2 KV heads, chunks of 8, R = 3 or
19, a bank of 4) with params drawn here (norm scales away from 1); the reference runs in
float64.
"""

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import default
from xenith import model
from xenith.model import memory
from xenith.model.memory import MemoryState

VOCAB = 64
CHUNK = 8
SHORT = 3  # R: short-term tokens, fewer than a chunk.
BANK = 4  # M slots: chunk 3's write evicts.
NUM_CHUNKS = 4
DECAY = 0.3
TOL = dict(rtol=1e-4, atol=1e-4)
LRU_THRESHOLD = 0.08
BANK_FIELDS = ('summaries', 'valid', 'usage', 'age', 'last_read')
SHORT_FIELDS = ('short_keys', 'short_values', 'short_positions', 'short_segments')

# name -> (num_layers, memory layers, window_sizes, other memory fields).
CONFIGS = {
    'full': (2, (0, 1), (), {}),
    # KV head 0 sees 6 tokens, head 1 10; a chunk's last query reaches 7 + R = 10 tokens
    # back, past both windows, so both cut keys (layer 0 reads no bank).
    'windows': (2, (1,), (6, 10), {}),
    # R = 2 chunks + 3 > C: the short-term memory spans three chunks; window 20 > 2 C
    # still cuts it.
    'long_short': (2, (1,), (6, 20), dict(short_term_tokens=2 * CHUNK + 3)),
    # A transformer summarizer: self-attention among the summaries in each layer.
    'self_attention': (2, (0, 1), (), dict(summarizer_self_attention=True)),
    # Least recently read evicted; read = mean probability per query and layer > 0.08.
    'lru': (2, (0, 1), (), dict(eviction='lru', lru_read_threshold=LRU_THRESHOLD)),
    # 10 global tokens (> C): every later query sees them beyond its window (6 or 10,
    # wider than R = 3 + C), so from chunk 3 on they come from the state.
    'global': (2, (1,), (6, 10), dict(num_global_tokens=10)),
    'one_layer': (1, (0,), (), {}),
    'one_layer_no_bank': (1, (), (), {}),
}


def _config(name: str) -> ml_collections.FrozenConfigDict:
  num_layers, memory_layers, windows, extra = CONFIGS[name]
  cfg = default.get_config('size=tiny').model
  cfg.update(dict(vocab_size=VOCAB, embed_dim=32, num_layers=num_layers, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=48))
  cfg.attention.implementation = 'dense'
  cfg.attention.window_sizes = windows
  cfg.memory.update(dict(chunk_size=CHUNK, summary_tokens=2, summarizer_heads=2,
                         summarizer_layers=2, bank_size=BANK, layers=memory_layers,
                         tbptt_chunks=0, short_term_tokens=SHORT, usage_decay=DECAY))
  extra = dict(extra)
  cfg.attention.num_global_tokens = extra.pop('num_global_tokens', 0)
  cfg.memory.update(extra)
  return ml_collections.FrozenConfigDict(cfg)


@functools.lru_cache(maxsize=None)
def _built(name: str):
  """(config, decoder, params, jitted apply with memory).

  Params are drawn here (only their shapes come from the model, `init` is slow to
  compile): kernels unit-scale in fan-in, norm scales away from 1 so a skipped norm shows.
  """
  cfg = _config(name)
  decoder = model.make_model(cfg)
  shapes = nn.unbox(jax.eval_shape(decoder.init, jax.random.key(0),
                                   jnp.zeros((2, CHUNK), jnp.int32)))['params']
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    shape, kind = leaf.shape, path[-1].key
    noise = rng.standard_normal(shape)
    if kind == 'scale':
      return (1.0 + 0.5 * noise).astype(np.float32)
    if kind == 'kernel':  # Output projections contract [heads, head_dim].
      layer = path[-2].key
      out = layer == 'out' or layer.startswith(('o_', 'self_o_'))
      fan_in = np.prod(shape[:2]) if out else shape[0]
      return (noise / np.sqrt(fan_in)).astype(np.float32)
    return noise.astype(np.float32)  # embedding, summarizer queries.

  params = jax.tree_util.tree_map_with_path(draw, shapes)

  def run(variables, tokens, memory=None, **kwargs):
    """-> (logits, the memory state as {field: array}); `memory` a state or such a dict."""
    if isinstance(memory, dict):
      memory = MemoryState(**memory)
    out = decoder.apply(variables, tokens, memory=memory, method='forward', **kwargs)
    return out.logits, out.memory.arrays()

  return cfg, decoder, params, jax.jit(run)


def _inputs():
  """tokens, segments [2, NUM_CHUNKS * CHUNK]: row 1 has documents 1, 2, 3 and padding."""
  length = NUM_CHUNKS * CHUNK
  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, length)).astype(np.int32)
  segments = np.ones((2, length), np.int32)
  segments[1, 11:] = 2  # A new document inside chunk 2, after its short-term keys.
  segments[1, 28:] = 3
  segments[1, 30:] = 0  # Padding: the summarizer ignores it.
  return tokens, segments


# ---------------------------------------------------------------- NumPy reference.


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
  """x: [batch, seq, heads, d], positions: [batch, seq]; half-split pairs (i, i + d/2)."""
  half = x.shape[-1] // 2
  inv_freq = theta**(-np.arange(half) * 2.0 / x.shape[-1])
  angles = positions[:, :, None, None].astype(np.float64) * inv_freq  # [b, s, 1, d/2]
  cos, sin = np.cos(angles), np.sin(angles)
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _softmax(s):
  e = np.exp(s - s.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _gelu(x):  # tanh approximation (flax's default).
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _np_summarize(p, cfg, hidden, segments):
  """The Summarizer: hidden [batch, C, embed], segments [batch, C] -> [batch, S, embed]."""
  heads = cfg.memory.summarizer_heads
  head_dim = cfg.embed_dim // heads
  eps = cfg.norm_eps
  x = np.broadcast_to(p['queries'], (hidden.shape[0],) + p['queries'].shape)
  for i in range(cfg.memory.summarizer_layers):
    if cfg.memory.summarizer_self_attention:  # Every summary reads every summary.
      h = _rms(x, p[f'self_norm_{i}']['scale'], eps)
      q, k, v = (np.einsum('bse,ehd->bshd', h, p[f'self_{n}_{i}']['kernel'])
                 for n in 'qkv')  # [batch, S, heads, head_dim]
      probs = _softmax(np.einsum('bshd,bthd->bhst', q, k) / np.sqrt(head_dim))
      x = x + np.einsum('bshd,hde->bse', np.einsum('bhst,bthd->bshd', probs, v),
                        p[f'self_o_{i}']['kernel'])
    q = np.einsum('bse,ehd->bshd', _rms(x, p[f'query_norm_{i}']['scale'], eps),
                  p[f'q_{i}']['kernel'])  # [batch, S, heads, head_dim]
    ctx = _rms(hidden, p[f'context_norm_{i}']['scale'], eps)
    k = np.einsum('bce,ehd->bchd', ctx, p[f'k_{i}']['kernel'])  # [batch, C, heads, hd]
    v = np.einsum('bce,ehd->bchd', ctx, p[f'v_{i}']['kernel'])
    scores = np.einsum('bshd,bchd->bhsc', q, k) / np.sqrt(head_dim)
    scores = np.where(segments[:, None, None, :] > 0, scores, -np.inf)
    attn = np.einsum('bhsc,bchd->bshd', _softmax(scores), v)
    x = x + np.einsum('bshd,hde->bse', attn, p[f'o_{i}']['kernel'])
    h = _rms(x, p[f'mlp_norm_{i}']['scale'], eps)
    x = x + _gelu(h @ p[f'up_{i}']['kernel']) @ p[f'down_{i}']['kernel']
  return _rms(x, p['out_norm']['scale'], eps)


def _np_init_state(cfg, batch):
  layers_, r, kv, d = cfg.num_layers, cfg.memory.short_term_tokens, cfg.num_kv_heads, cfg.head_dim
  return {
      'summaries': np.zeros((batch, BANK, cfg.embed_dim)),
      'valid': np.zeros((batch, BANK), bool),
      'usage': np.zeros((batch, BANK)),
      'age': np.zeros((batch, BANK), np.int64),
      'last_read': np.zeros((batch, BANK), np.int64),
      'position': 0,
      'short_keys': np.zeros((layers_, batch, r, kv, d)),
      'short_values': np.zeros((layers_, batch, r, kv, d)),
      'short_positions': np.full((batch, r), -1),
      'short_segments': np.zeros((batch, r), np.int64),
      'global_keys': np.zeros((layers_, batch, _num_global(cfg), kv, d)),
      'global_values': np.zeros((layers_, batch, _num_global(cfg), kv, d)),
      'global_positions': np.full((batch, _num_global(cfg)), -1),
      'global_segments': np.zeros((batch, _num_global(cfg)), np.int64),
  }


def _num_global(cfg):
  """G: global tokens (every layer is windowed when there are windows here)."""
  return cfg.attention.num_global_tokens if cfg.attention.window_sizes else 0


def _np_write(state, usage, last_read, summaries, eviction):
  """Free slots first (lowest index), then ascending usage ('least_used') or descending
  last_read ('lru'), ties the oldest first, then the lowest index."""
  out = {k: np.array(state[k]) for k in ('summaries', 'valid', 'age')}
  out['usage'] = np.array(usage)
  out['last_read'] = np.array(last_read)
  for b in range(usage.shape[0]):
    valid, age = state['valid'][b], state['age'][b]
    rank = usage[b] if eviction == 'least_used' else -last_read[b]
    order = sorted(range(BANK), key=lambda j: (bool(valid[j]), rank[j] if valid[j]
                                               else 0.0, -age[j] if valid[j] else 0, j))
    out['age'][b] = np.where(valid, age + 1, 0)
    for s, slot in enumerate(order[:summaries.shape[1]]):
      out['summaries'][b, slot] = summaries[b, s]
      out['valid'][b, slot] = True
      out['usage'][b, slot] = 0.0
      out['age'][b, slot] = 0
      out['last_read'][b, slot] = 0
  return out


def _np_chunk(p, cfg, state, tokens, segments, use_bank=True, use_short=True,
              use_global=True):
  """One chunk of the memory model in NumPy.

  tokens, segments: [batch, C]. Returns (logits [batch, C, vocab], the state after the
  chunk, details: 'hidden' [batch, C, embed], 'summaries' [batch, S, embed], 'mass'
  [batch, M]). use_bank / use_short / use_global=False hide the bank / short-term keys /
  stored global tokens (for checks that the comparison is sensitive to them).

  Global tokens: a query sees key position k if it is causal, of its document and either
  (in the short-term memory or the chunk, and within the window) or k < G; a stored
  global token whose position the short-term memory or the chunk also holds is that same
  key, so it is counted once (from there).
  """
  batch, c = tokens.shape
  heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  kv_of_head = np.arange(heads) // (heads // kv_heads)  # Query head -> its KV head.
  windows = tuple(cfg.attention.window_sizes)
  window = np.full(kv_heads, np.inf)  # Per KV head ('heads' split, no full layers).
  for g, w in enumerate(windows):
    size = kv_heads // len(windows)
    window[g * size:(g + 1) * size] = w
  eps = cfg.norm_eps
  pos = np.broadcast_to(state['position'] + np.arange(c), (batch, c))  # Stream positions.
  k_pos = np.concatenate([state['short_positions'], pos], axis=1)  # [batch, R + C]
  k_seg = np.concatenate([state['short_segments'], segments], axis=1)
  local = ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= pos[:, :, None])
           & (k_seg[:, None, :] == segments[:, :, None]))  # [batch, C, R + C]
  if not use_short:
    local &= (k_pos >= pos[:, :1])[:, None, :]
  in_window = (pos[:, :, None] - k_pos[:, None, :])[:, None] < window[kv_of_head][
      None, :, None, None]  # [batch, heads, C, R + C]
  num_global = _num_global(cfg)
  local = local[:, None] & (in_window | (k_pos < num_global)[:, None, None, :])
  g_pos, g_seg = state['global_positions'], state['global_segments']  # [batch, G]
  held = (g_pos[:, :, None] == k_pos[:, None, :]).any(-1)  # Also a local key.
  stored = ((g_pos[:, None, :] >= 0) & (g_pos[:, None, :] <= pos[:, :, None])
            & (g_seg[:, None, :] == segments[:, :, None]) & ~held[:, None, :]
            & use_global)  # [batch, C, G]
  local = np.concatenate([np.broadcast_to(stored[:, None], (batch, heads) + stored.shape[1:]),
                          local], axis=-1)  # [batch, heads, C, G + R + C]
  x = p['embed']['embedding'][tokens]  # [batch, C, embed]
  mass = np.zeros((batch, BANK))
  keys, values = [], []
  for i in range(cfg.num_layers):
    blk = p[f'block_{i}']
    h = _rms(x, blk['attn_norm']['scale'], eps)
    q = np.einsum('bse,ehd->bshd', h, blk['attn']['query']['kernel'])  # [b, C, heads, d]
    k = np.einsum('bse,ehd->bshd', h, blk['attn']['key']['kernel'])  # [b, C, kv, d]
    v = np.einsum('bse,ehd->bshd', h, blk['attn']['value']['kernel'])
    q_rot, k_rot = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    all_k = np.concatenate([state['global_keys'][i], state['short_keys'][i], k_rot],
                           axis=1)[:, :, kv_of_head]
    all_v = np.concatenate([state['global_values'][i], state['short_values'][i], v],
                           axis=1)[:, :, kv_of_head]
    scores = np.einsum('bqhd,bkhd->bhqk', q_rot, all_k) / np.sqrt(d)
    scores = np.where(local, scores, -np.inf)  # [batch, heads, C, R + C]
    reads_bank = i in tuple(cfg.memory.layers)
    if reads_bank:
      mem_k = np.einsum('bme,ehd->bmhd', state['summaries'],
                        blk['attn']['key']['kernel'])[:, :, kv_of_head]  # No RoPE.
      mem_v = np.einsum('bme,ehd->bmhd', state['summaries'],
                        blk['attn']['value']['kernel'])[:, :, kv_of_head]
      mem_scores = np.einsum('bqhd,bmhd->bhqm', q, mem_k) / np.sqrt(d)  # q without RoPE.
      visible = state['valid'] & use_bank
      mem_scores = np.where(visible[:, None, None, :], mem_scores, -np.inf)
      scores = np.concatenate([mem_scores, scores], axis=-1)
      all_v = np.concatenate([mem_v, all_v], axis=1)
    probs = _softmax(scores)
    out = np.einsum('bhqk,bkhd->bqhd', probs, all_v)  # [batch, C, heads, d]
    if reads_bank:  # Summed over queries, mean over heads, summed over layers.
      mass = mass + probs[..., :BANK].sum(axis=2).mean(axis=1)
    x = x + np.einsum('bqhd,hde->bqe', out, blk['attn']['out']['kernel'])
    h = _rms(x, blk['mlp_norm']['scale'], eps)
    x = x + (_silu(h @ blk['mlp']['gate']['kernel']) * (h @ blk['mlp']['up']['kernel'])
             ) @ blk['mlp']['down']['kernel']
    keys.append(k_rot)
    values.append(v)
  table = p['embed']['embedding']
  logits = _rms(x, p['final_norm']['scale'], eps) @ table.T / np.sqrt(cfg.embed_dim)
  summaries = _np_summarize(p['summarizer'], cfg, x, segments)
  usage = np.where(state['valid'], DECAY * state['usage'] + mass, 0.0)
  # Read: mean probability per query and memory layer above the threshold.
  read = mass / (c * max(len(tuple(cfg.memory.layers)), 1)) > cfg.memory.lru_read_threshold
  last_read = np.where(state['valid'], np.where(read, 0, state['last_read'] + 1), 0)
  new = _np_write(state, usage, last_read, summaries, cfg.memory.eviction)
  keys_all, values_all = np.stack(keys), np.stack(values)  # [layers, batch, C, kv, d]
  r = cfg.memory.short_term_tokens  # The last R tokens of [old short-term, the chunk].
  new['short_keys'] = np.concatenate([state['short_keys'], np.stack(keys)], axis=2)[:, :, c:]
  new['short_values'] = np.concatenate([state['short_values'], np.stack(values)],
                                       axis=2)[:, :, c:]
  new['short_positions'] = np.concatenate([state['short_positions'], pos], axis=1)[:, c:]
  new['short_segments'] = np.concatenate([state['short_segments'], segments], axis=1)[:, c:]
  assert new['short_positions'].shape[1] == r
  new.update({k: np.array(state[k]) for k in ('global_keys', 'global_values',
                                               'global_positions', 'global_segments')})
  for t in range(c):  # The tokens at stream positions < G are kept for good.
    j = pos[0, t]
    if j < num_global:
      new['global_keys'][:, :, j] = keys_all[:, :, t]
      new['global_values'][:, :, j] = values_all[:, :, t]
      new['global_positions'][:, j] = j
      new['global_segments'][:, j] = segments[:, t]
  new['position'] = state['position'] + c
  return logits, new, {'hidden': x, 'summaries': summaries, 'mass': mass, 'read': read}


# ---------------------------------------------------------------- Runs.


@functools.lru_cache(maxsize=None)
def _runs(name: str):
  """The model chunk by chunk and the reference on `_inputs()`.

  Returns lists over chunks of (model logits, model state after), (reference logits,
  reference state before, reference state after, reference details).
  """
  cfg, decoder, params, apply = _built(name)
  tokens, segments = _inputs()
  p = _np_params(params)
  state = memory.init_state(cfg, 2)
  ref_state = _np_init_state(cfg, 2)
  got, want = [], []
  for c in range(NUM_CHUNKS):
    part = slice(c * CHUNK, (c + 1) * CHUNK)
    logits, state = apply({'params': params}, tokens[:, part],
                          segment_ids=segments[:, part], memory=state)
    got.append((np.asarray(logits), jax.tree.map(np.asarray, state)))
    ref_logits, new, details = _np_chunk(p, cfg, ref_state, tokens[:, part],
                                         segments[:, part])
    want.append((ref_logits, ref_state, new, details))
    ref_state = new
  return got, want


def _assert_state(state, ref, fields, msg=''):
  for k in fields:
    np.testing.assert_allclose(state[k], ref[k], err_msg=f'{msg} {k}', **TOL)


# ---------------------------------------------------------------- Tests.


@pytest.mark.parametrize('name', ['full', 'windows', 'long_short', 'self_attention', 'lru',
                                  'global'])
def test_logits_match_the_numpy_reference(name):
  """Every chunk's logits (chunk-by-chunk calls; for 'full' also one call on all chunks,
  with its final state) equal NumPy's. From chunk 2 on they depend on the bank (2 of 4
  slots valid, then all, then evicting) and on the short-term keys, so both are checked."""
  got, want = _runs(name)
  cfg, _, params, apply = _built(name)
  for c in range(NUM_CHUNKS):
    np.testing.assert_allclose(got[c][0], want[c][0], err_msg=f'chunk {c + 1}', **TOL)
  before = want[1][1]  # The reference state chunk 2 starts from.
  np.testing.assert_array_equal(before['valid'], [[True, True, False, False]] * 2)
  r = cfg.memory.short_term_tokens  # Chunk 1's last R tokens, -1 before the stream.
  np.testing.assert_array_equal(before['short_positions'],
                                [np.arange(CHUNK - r, CHUNK).clip(-1)] * 2)
  tokens, segments = _inputs()
  part = slice(CHUNK, 2 * CHUNK)
  p = _np_params(params)
  for hide in (dict(use_bank=False), dict(use_short=False)):  # Both matter to chunk 2.
    without = _np_chunk(p, cfg, before, tokens[:, part], segments[:, part], **hide)[0]
    assert np.abs(without - want[1][0]).max() > 1e-2, hide
  if name != 'full':
    return
  logits, state = apply({'params': params}, tokens, segment_ids=segments)  # One call.
  np.testing.assert_allclose(logits, np.concatenate([w[0] for w in want], axis=1), **TOL)
  _assert_state(state, want[-1][2], BANK_FIELDS + SHORT_FIELDS, 'whole call')


@pytest.mark.parametrize('name', ['full', 'self_attention'])
def test_summarizer_matches_numpy_and_fills_the_bank(name):
  """`Summarizer` on chunk 1's final hidden states equals NumPy's (cross-attention and
  MLP; with 'self_attention' first self-attention among the summaries in each layer);
  the bank after chunk 1 holds those summaries in slots 0, 1, and after every later
  chunk the reference's (free slots first, then the least-used evicted)."""
  got, want = _runs(name)
  cfg, _, params, _ = _built(name)
  assert ('self_q_0' in params['summarizer']) == (name == 'self_attention')
  _, segments = _inputs()
  summarize = jax.jit(memory.summarizer.Summarizer(cfg).apply)
  for c in (0, NUM_CHUNKS - 1):  # A plain chunk; one with 2 padding tokens in row 1.
    hidden = want[c][3]['hidden']  # [batch, C, embed]
    seg = segments[:, c * CHUNK:(c + 1) * CHUNK]
    out = summarize({'params': params['summarizer']}, jnp.asarray(hidden, jnp.float32),
                    jnp.asarray(seg))
    np.testing.assert_allclose(out, want[c][3]['summaries'], err_msg=f'chunk {c + 1}',
                               **TOL)
  state = got[0][1]
  np.testing.assert_allclose(state['summaries'][:, :2], want[0][3]['summaries'], **TOL)
  np.testing.assert_array_equal(state['summaries'][:, 2:], 0)
  np.testing.assert_array_equal(state['valid'], [[True, True, False, False]] * 2)
  np.testing.assert_array_equal(state['age'], 0)
  for c in range(1, NUM_CHUNKS):
    _assert_state(got[c][1], want[c][2], ('summaries', 'valid', 'age'), f'chunk {c + 1}')
  if name == 'full':  # Chunk 4's write kept a slot of chunk 3 (age 1), evicted older ones.
    assert (want[-1][2]['age'] == 1).any()


@pytest.mark.parametrize('name', ['full', 'windows'])
def test_usage_is_the_decayed_attention_mass_on_the_bank(name):
  """usage after each chunk = decay * usage before + the probability mass each valid slot
  received (summed over the chunk's queries and the memory layers, mean over heads: with
  'windows' over two KV-head groups of different windows), then 0 for the slots just
  written."""
  got, want = _runs(name)
  for c in range(NUM_CHUNKS):
    _, before, after, details = want[c]
    usage = np.where(before['valid'], DECAY * before['usage'] + details['mass'], 0.0)
    written = after['age'] == 0
    np.testing.assert_allclose(after['usage'], np.where(written, 0.0, usage))
    np.testing.assert_allclose(got[c][1]['usage'], after['usage'], err_msg=f'chunk {c + 1}',
                               **TOL)
  # Chunks 3 and 4 start with used slots (usage > 0), so the decay shows.
  for c in (2, 3):
    assert ((want[c][1]['usage'] > 0.05).sum(-1) == 2).all(), f'chunk {c + 1}'


def test_global_tokens_are_kept_in_the_state_and_match_numpy():
  """G = 10 > C global tokens, windows 6 / 10, R = 3: after each chunk the state keeps
  the stream's first G tokens' keys, values, positions and documents (filled over two
  chunks), as the reference does; chunks 2 to 4 read them beyond the window (hiding the
  stored ones changes the reference's logits, and the model matches the unhidden ones)."""
  got, want = _runs('global')
  cfg, _, params, _ = _built('global')
  fields = ('global_keys', 'global_values', 'global_positions', 'global_segments')
  for c in range(NUM_CHUNKS):
    _assert_state(got[c][1], want[c][2], fields + SHORT_FIELDS, f'chunk {c + 1}')
  np.testing.assert_array_equal(got[0][1]['global_positions'],
                                [list(range(CHUNK)) + [-1, -1]] * 2)
  np.testing.assert_array_equal(got[1][1]['global_positions'], [np.arange(10)] * 2)
  tokens, segments = _inputs()
  p = _np_params(params)
  for c in range(1, NUM_CHUNKS):
    part = slice(c * CHUNK, (c + 1) * CHUNK)
    hidden = _np_chunk(p, cfg, want[c][1], tokens[:, part], segments[:, part],
                       use_global=False)[0]
    assert np.abs(hidden[0] - want[c][0][0]).max() > 1e-2, f'chunk {c + 1}'


def test_lru_eviction_matches_numpy():
  """eviction='lru': after every chunk the bank (summaries, valid, age, usage, last_read)
  is the reference's, where a slot is read when its mass / (C x memory layers) exceeds
  the threshold and a full bank evicts the least recently read, then the oldest. Chunk
  3 reads some slots and not others, and there 'lru' evicts other slots than
  'least_used' would on the same state."""
  got, want = _runs('lru')
  for c in range(NUM_CHUNKS):
    _assert_state(got[c][1], want[c][2], BANK_FIELDS, f'chunk {c + 1}')
    per_query = want[c][3]['mass'] / (CHUNK * 2)
    assert np.abs(per_query - LRU_THRESHOLD).min() > 1e-3  # No near-ties: robust reads.
  _, before, after, details = want[2]
  assert details['read'].any() and not details['read'].all()
  evicted = after['age'] == 0
  usage = np.where(before['valid'], DECAY * before['usage'] + details['mass'], 0.0)
  least_used = _np_write(before, usage, after['last_read'], details['summaries'],
                         'least_used')['age'] == 0
  assert (evicted != least_used).any()
  np.testing.assert_array_equal(evicted.sum(-1), [2, 2])


@pytest.mark.parametrize('name', ['full', 'long_short'])
def test_short_term_memory_is_the_last_tokens_of_the_stream(name):
  """After each chunk short_keys / short_values are the stream's last R tokens' keys
  (with RoPE at their stream positions) / values in every layer, with their positions
  and documents: R = 3 < C the chunk's last 3; R = 2 C + 3 the last 19 tokens, reaching
  back over three chunks (empty slots, position -1, until the stream is that long)."""
  got, want = _runs(name)
  cfg = _built(name)[0]
  r = cfg.memory.short_term_tokens
  _, segments = _inputs()
  for c in range(NUM_CHUNKS):
    state, ref = got[c][1], want[c][2]
    last = np.arange((c + 1) * CHUNK - r, (c + 1) * CHUNK)
    np.testing.assert_array_equal(state['short_positions'], [last.clip(-1)] * 2)
    np.testing.assert_array_equal(state['short_segments'],
                                  np.where(last >= 0, segments[:, last.clip(0)], 0))
    _assert_state(state, ref, ('short_keys', 'short_values'), f'chunk {c + 1}')
    assert int(state['position']) == (c + 1) * CHUNK


def test_chunk_one_reaches_chunk_two_only_through_bank_and_short_term():
  """One layer: a token of chunk 1 before its last R tokens leaves chunk 2 unchanged
  without bank reads, one of the last R changes it; with the bank read chunk 2 changes,
  and only through the bank (chunk 2 on the perturbed state with the unperturbed bank
  is the unperturbed chunk 2)."""
  tokens = np.asarray(_inputs()[0][:, :2 * CHUNK])
  early = tokens.copy()
  early[:, 1] = (early[:, 1] + 1) % VOCAB  # Outside the short-term range 5..7.
  late = tokens.copy()
  late[:, CHUNK - 2] = (late[:, CHUNK - 2] + 1) % VOCAB  # Inside it.

  def run(name, toks):
    cfg, _, params, apply = _built(name)
    _, state = apply({'params': params}, toks[:, :CHUNK], memory=memory.init_state(cfg, 2))
    second, _ = apply({'params': params}, toks[:, CHUNK:], memory=state)
    return np.asarray(second), jax.tree.map(np.asarray, state)

  base, _ = run('one_layer_no_bank', tokens)
  np.testing.assert_array_equal(run('one_layer_no_bank', early)[0], base)
  assert np.abs(run('one_layer_no_bank', late)[0] - base).max() > 1e-3

  base, base_state = run('one_layer', tokens)
  changed, state = run('one_layer', early)
  assert np.abs(changed - base).max() > 1e-4
  for k in SHORT_FIELDS + ('valid', 'age', 'position'):
    np.testing.assert_array_equal(state[k], base_state[k], err_msg=k)
  assert np.abs(state['summaries'] - base_state['summaries']).max() > 1e-3
  cfg, _, params, apply = _built('one_layer')
  mixed = dict(state, **{k: base_state[k] for k in BANK_FIELDS})
  second, _ = apply({'params': params}, tokens[:, CHUNK:], memory=mixed)
  np.testing.assert_array_equal(second, base)
  # The reference agrees on the perturbed chunk 2.
  p = _np_params(params)
  ref_state = _np_chunk(p, cfg, _np_init_state(cfg, 2), early[:, :CHUNK],
                        np.ones((2, CHUNK), np.int32))[1]
  ref = _np_chunk(p, cfg, ref_state, early[:, CHUNK:], np.ones((2, CHUNK), np.int32))[0]
  np.testing.assert_allclose(changed, ref, **TOL)
