"""Chunk-summary memory: a summarizer, a bank of summaries, short-term keys/values.

With `config.memory.chunk_size` C > 0 the `Decoder` reads its input as consecutive
chunks of C tokens (`transformer.Decoder`, memory mode). Each chunk attends

- to itself, causally (with the layer's sliding windows, measured in stream positions),
- to the previous chunk's last `short_term_tokens` keys/values of the same layer
  (short-term memory, masked by stream position, window and document like the KV cache),
- in the layers listed in `memory.layers`, to the summaries in the bank (long-term
  memory), in the same softmax as the local keys, masked by the bank's `valid`.

After each chunk the `Summarizer` (S learned queries cross-attending to the chunk's final
hidden states) writes S summaries into the bank (`write`): free slots first, else the
least-used summaries (attention mass received, decayed by `usage_decay` per chunk; ties:
the oldest) are evicted. Every array has a fixed shape, so all of it jits.

The state carried between chunks and calls is one flat dict of arrays (`init_state`):

  summaries [batch, M, embed] float32   the bank's summary vectors
  valid     [batch, M] bool             slot holds a summary
  usage     [batch, M] float32          decayed attention mass received
  age       [batch, M] int32            writes since the slot was filled (larger = older)
  position  [] int32                    stream position of the next token
  short_keys, short_values  [layers, batch, R, kv_heads, head_dim]  (R = short_term_tokens;
                                        keys already carry RoPE)
  short_positions, short_segments  [batch, R] int32   stream position (-1 = empty), document
  chunk_keys, chunk_values  [layers, batch, C, kv_heads, head_dim]  the current chunk's
                                        keys (with RoPE) / values so far, when decoding
  chunk_hidden [batch, C, embed] float32  its final hidden states (the summarizer's input)
  chunk_mass   [batch, M] float32        attention mass the bank received in it so far

The chunk_* fields hold a partly decoded chunk (`Decoder(..., decode=True)` feeds
tokens one at a time, from any stream position); whole-chunk calls leave them empty.
`save_bank` / `load_bank` write and read the state as a NumPy .npz, so a later process
continues where a call stopped, mid-chunk included.
"""

import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xenith.model import layers
from xenith.model import norms

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)

BANK_FIELDS = ('summaries', 'valid', 'usage', 'age')


def settings(config: ml_collections.FrozenConfigDict):
  """`config.memory`, or None for configs built without that block (memory off)."""
  return config.get('memory') if hasattr(config, 'get') else None


def enabled(config: ml_collections.FrozenConfigDict) -> bool:
  """Whether chunk-summary memory is on (`memory.chunk_size` > 0)."""
  mem = settings(config)
  return mem is not None and mem.chunk_size > 0


def is_memory_layer(config: ml_collections.FrozenConfigDict, layer: int) -> bool:
  """Whether `layer`'s attention also attends to the bank."""
  return enabled(config) and layer in tuple(config.memory.layers)


def state_shapes(config: ml_collections.FrozenConfigDict, batch: int) -> dict:
  """{name: (shape, dtype)} of the memory state of `batch` rows (see module doc)."""
  mem = config.memory
  m, r = mem.bank_size, mem.short_term_tokens
  kv = (config.num_layers, batch, r, config.num_kv_heads, config.head_dim)
  chunk_kv = (config.num_layers, batch, mem.chunk_size, config.num_kv_heads,
              config.head_dim)
  return {
      'summaries': ((batch, m, config.embed_dim), np.float32),
      'valid': ((batch, m), np.bool_),
      'usage': ((batch, m), np.float32),
      'age': ((batch, m), np.int32),
      'position': ((), np.int32),
      'short_keys': (kv, np.float32),
      'short_values': (kv, np.float32),
      'short_positions': ((batch, r), np.int32),
      'short_segments': ((batch, r), np.int32),
      'chunk_keys': (chunk_kv, np.float32),
      'chunk_values': (chunk_kv, np.float32),
      'chunk_hidden': ((batch, mem.chunk_size, config.embed_dim), np.float32),
      'chunk_mass': ((batch, m), np.float32),
  }


def init_state(config: ml_collections.ConfigDict, batch: int) -> dict:
  """An empty memory state: no summaries, no short-term tokens, position 0."""
  config = ml_collections.FrozenConfigDict(config)
  state = {k: jnp.zeros(s, d) for k, (s, d) in state_shapes(config, batch).items()}
  state['short_positions'] = jnp.full_like(state['short_positions'], -1)
  return state


def check_state(config: ml_collections.FrozenConfigDict, state: dict, batch: int) -> None:
  """Raises ValueError if `state` does not match the model's memory shapes."""
  expected = state_shapes(config, batch)
  if set(state) != set(expected):
    raise ValueError(f'Memory state fields {sorted(state)} differ from the expected '
                     f'{sorted(expected)}.')
  for k, (shape, _) in expected.items():
    if tuple(state[k].shape) != tuple(shape):
      raise ValueError(f'Memory state {k!r} has shape {tuple(state[k].shape)}; this model '
                       f'and batch need {tuple(shape)} (config.model.memory, batch={batch}).')


def save_bank(path: str, state: dict) -> None:
  """Writes a memory state (bank + short-term + position) to `path` (.npz)."""
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in state.items()}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def load_bank(path: str, like: dict | None = None) -> dict:
  """Reads a state written by `save_bank`; with `like` (e.g. `init_state(...)`) checks it.

  Raises ValueError naming the field when a field is missing, extra, or of another
  shape or dtype than in `like`.
  """
  with np.load(path) as data:
    state = {k: jnp.asarray(data[k]) for k in data.files}
  if like is not None:
    if set(state) != set(like):
      raise ValueError(f'{path}: memory fields {sorted(state)} differ from the expected '
                       f'{sorted(like)}.')
    for k, v in like.items():
      if tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
        raise ValueError(f'{path}: memory field {k!r} is {state[k].dtype}'
                         f'{tuple(state[k].shape)}, expected {v.dtype}{tuple(v.shape)} '
                         '(another config.model.memory or batch size?).')
  return state


def write(bank: dict, new_summaries: jax.Array) -> dict:
  """Writes S new summaries into the bank; returns the updated state dict.

  bank: a state dict (at least `BANK_FIELDS`); new_summaries: [batch, S, embed], S <= M.
  Slots are chosen per row: free slots first (lowest index first), then valid slots by
  ascending usage, ties broken by age (oldest first). Every existing slot ages by one;
  new slots get usage 0 and age 0.
  """
  valid, usage, age = bank['valid'], bank['usage'], bank['age']
  num_new = new_summaries.shape[1]
  if num_new > valid.shape[1]:
    raise ValueError(f'{num_new} summaries do not fit a bank of {valid.shape[1]} slots.')
  primary = jnp.where(valid, usage, -jnp.inf)
  secondary = jnp.where(valid, -age, 0)
  # lexsort: the last key is the primary one; stable, so equal keys keep slot order.
  order = jnp.lexsort((secondary, primary), axis=-1)
  slots = order[:, :num_new]  # [batch, S], distinct per row.

  def put(row, index, values):
    return row.at[index].set(values)

  out = dict(bank)
  out['summaries'] = jax.vmap(put)(bank['summaries'],
                                   slots, new_summaries.astype(bank['summaries'].dtype))
  out['valid'] = jax.vmap(put)(valid, slots, jnp.ones(slots.shape, bool))
  out['usage'] = jax.vmap(put)(usage, slots, jnp.zeros(slots.shape, usage.dtype))
  out['age'] = jax.vmap(put)(jnp.where(valid, age + 1, 0), slots,
                             jnp.zeros(slots.shape, age.dtype))
  return out


def add_usage(bank: dict, mass: jax.Array, decay: float) -> dict:
  """usage = decay * usage + mass on valid slots (mass: [batch, M] attention mass)."""
  out = dict(bank)
  out['usage'] = jnp.where(bank['valid'], decay * bank['usage'] + mass, 0.0)
  return out


def close_chunk(state: dict, mass: jax.Array, summaries: jax.Array, keys: jax.Array,
                values: jax.Array, stream_positions: jax.Array, segments: jax.Array,
                usage_decay: float) -> dict:
  """The state after a finished chunk of C tokens; chunk_* fields come back empty.

  mass: [batch, M] the attention mass the bank received during the chunk (all its
  queries and memory layers); summaries: [batch, S, embed] the summarizer's output;
  keys, values: [layers, batch, C, kv_heads, head_dim] the chunk's; stream_positions,
  segments: [batch, C]. Usage decays and adds `mass` before the write, so the new
  summaries start unused; the short-term memory becomes the chunk's last R tokens.
  """
  keep = state['short_positions'].shape[1]
  chunk = stream_positions.shape[1]
  new = write(add_usage(state, mass, usage_decay), summaries.astype(jnp.float32))
  new['short_keys'] = keys[:, :, chunk - keep:].astype(jnp.float32)
  new['short_values'] = values[:, :, chunk - keep:].astype(jnp.float32)
  new['short_positions'] = stream_positions[:, chunk - keep:]
  new['short_segments'] = segments[:, chunk - keep:]
  new['position'] = state['position'] + chunk
  for k in ('chunk_keys', 'chunk_values', 'chunk_hidden', 'chunk_mass'):
    new[k] = jnp.zeros_like(state[k])
  return new


def attention_with_memory(query, key, value, mask, mem_query, mem_key, mem_value,
                          mem_valid):
  """Dense softmax attention over [memory keys, local keys]; also the memory's mass.

  query: [batch, q, heads, d] (with RoPE), key/value: [batch, k, kv_heads, d],
  mask: [batch or 1, kv_heads or 1, q, k] bool. mem_query: [batch, q, heads, d] (the
  same queries without RoPE; memory keys carry no position), mem_key/mem_value:
  [batch, M, kv_heads, d] or None, mem_valid: [batch, M] bool.
  Returns (out [batch, q, heads, d], mass [batch, M] float32 or None): mass is the
  probability each memory slot receives, summed over queries, mean over heads.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_heads = key.shape[2]
  group = num_heads // kv_heads
  q = query.reshape(batch, q_len, kv_heads, group, head_dim)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', q, key, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, :, None], scores * head_dim**-0.5, _MASK_VALUE)
  values = value
  num_mem = 0
  if mem_key is not None:
    num_mem = mem_key.shape[1]
    mq = mem_query.reshape(batch, q_len, kv_heads, group, head_dim)
    mem_scores = jnp.einsum('bqkgd,bskd->bkgqs', mq, mem_key,
                            preferred_element_type=jnp.float32) * head_dim**-0.5
    mem_scores = jnp.where(mem_valid[:, None, None, None, :], mem_scores, _MASK_VALUE)
    scores = jnp.concatenate([mem_scores, scores], axis=-1)
    values = jnp.concatenate([mem_value.astype(value.dtype), value], axis=1)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs.astype(value.dtype), values)
  out = out.reshape(batch, q_len, num_heads, head_dim)
  mass = None
  if num_mem:
    mass = probs[..., :num_mem].sum(axis=3).mean(axis=(1, 2))  # [batch, M]
  return out, mass


def local_mask(q_pos, k_pos, q_seg, k_seg, window):
  """[batch, q, k] bool: key valid (pos >= 0), not later, same document, in the window.

  Positions are stream positions (they order tokens across chunks).
  """
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  mask = (k >= 0) & (k <= q) & (q_seg[:, :, None] == k_seg[:, None, :])
  if window is not None:
    mask &= q - k < window
  return mask


class Summarizer(nn.Module):
  """S learned queries cross-attending to a chunk's hidden states -> [batch, S, embed].

  `summarizer_layers` pre-norm layers (cross-attention with `summarizer_heads` heads of
  width embed / heads, then a GELU MLP of width mlp_dim), then a final norm, so the
  summaries enter the memory layers' key/value projections at the scale of their
  normalised inputs. Padding tokens (segment 0) are not attended to.
  """

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, hidden: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """hidden: [batch, C, embed], segment_ids: [batch, C] or None -> [batch, S, embed]."""
    cfg = self.config
    mem = cfg.memory
    dtype = layers.compute_dtype(cfg)
    embed = cfg.embed_dim
    heads = mem.summarizer_heads
    head_dim = embed // heads
    batch = hidden.shape[0]
    queries = self.param('queries', nn.initializers.normal(1.0),
                         (mem.summary_tokens, embed), layers.PARAM_DTYPE)
    x = jnp.broadcast_to(queries.astype(dtype), (batch,) + queries.shape)

    def dense(features, names, name, axis=-1):
      return layers.DenseGeneral(features=features, names=names, axis=axis, dtype=dtype,
                                 name=name)

    for i in range(mem.summarizer_layers):
      q = norms.make_norm(cfg, f'query_norm_{i}')(x)
      ctx = norms.make_norm(cfg, f'context_norm_{i}')(hidden)
      q = dense((heads, head_dim), ('embed', 'heads', 'head_dim'), f'q_{i}')(q)
      k = dense((heads, head_dim), ('embed', 'heads', 'head_dim'), f'k_{i}')(ctx)
      v = dense((heads, head_dim), ('embed', 'heads', 'head_dim'), f'v_{i}')(ctx)
      scores = jnp.einsum('bshd,bchd->bhsc', q, k,
                          preferred_element_type=jnp.float32) * head_dim**-0.5
      if segment_ids is not None:
        scores = jnp.where((segment_ids > 0)[:, None, None, :], scores, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
      attn = jnp.einsum('bhsc,bchd->bshd', probs, v)
      x = x + dense(embed, ('heads', 'head_dim', 'embed'), f'o_{i}', axis=(-2, -1))(attn)
      h = norms.make_norm(cfg, f'mlp_norm_{i}')(x)
      h = dense(cfg.mlp_dim, ('embed', 'mlp'), f'up_{i}')(h)
      h = dense(embed, ('mlp', 'embed'), f'down_{i}')(nn.gelu(h))
      x = x + h
    return norms.make_norm(cfg, 'out_norm')(x)
