"""The decoder-only transformer: `DecoderBlock` and `Decoder`."""

import math

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import attention
from xenith.model import embed as embed_lib
from xenith.model import layers
from xenith.model import lora
from xenith.model import memory as memory_lib
from xenith.model import mlp
from xenith.model import moe
from xenith.model import norms

_EMBED_NAMES = ('activation_batch', 'activation_length', 'activation_embed')

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); dropout on branches.

  With `use_moe` the MLP is a `moe.MoeBlock` (params under `moe`, not `mlp`).
  `layer` is the block's index (it picks the attention pattern); a scanned stack
  passes its first layer's, all its layers having one pattern.
  """

  config: ml_collections.FrozenConfigDict
  use_moe: bool = False
  layer: int = 0

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      segment_ids: jax.Array | None,
      positions: jax.Array,
      deterministic: bool,
      cache_length: int = 0,
      memory_inputs: dict | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """x: [batch, seq, embed] -> (x, MoE router stats or None); `nn.scan`'s carry/output.

    With `memory_inputs` (memory mode, see `attention.Attention`) the second element
    is (the attention's memory outputs, MoE router stats or None).
    """
    cfg = self.config
    x = nn.with_logical_constraint(x, _EMBED_NAMES)
    branch = norms.make_norm(cfg, 'attn_norm')(x)
    branch = attention.Attention(cfg, layer=self.layer, name='attn')(
        branch, segment_ids, positions, cache_length, memory_inputs)
    if memory_inputs is not None:
      branch, memory_out = branch
    branch = nn.Dropout(cfg.dropout_rate)(branch, deterministic=deterministic)
    x = x + branch

    branch = norms.make_norm(cfg, 'mlp_norm')(x)
    if self.use_moe:
      branch, stats = moe.MoeBlock(cfg, name='moe')(branch, segment_ids)
    else:
      branch, stats = mlp.Mlp(cfg, name='mlp')(branch), None
    branch = nn.Dropout(cfg.dropout_rate)(branch, deterministic=deterministic)
    x = x + branch
    if memory_inputs is not None:
      stats = (memory_out, stats)
    return nn.with_logical_constraint(x, _EMBED_NAMES), stats


def _block_class(config: ml_collections.FrozenConfigDict) -> type[nn.Module]:
  """`DecoderBlock`, rematerialised per `config.remat`."""
  if config.remat == 'none':
    return DecoderBlock
  if config.remat not in REMAT_POLICIES:
    raise ValueError(
        f'Unknown remat {config.remat!r}; choose none or one of '
        f'{sorted(REMAT_POLICIES)}.')
  return nn.remat(
      DecoderBlock,
      policy=REMAT_POLICIES[config.remat],
      # Inside scan the loop already stops XLA from merging the recomputation
      # into the forward pass; elsewhere it must be prevented explicitly.
      prevent_cse=not config.scan_layers,
      static_argnums=(4, 5),  # `deterministic`, `cache_length` (self is argument 0).
  )


class Decoder(nn.Module):
  """Decoder-only language model configured by `config` (a frozen `config.model`).

  Params are float32; activations use `config.dtype`; logits are float32.
  With `config.scan_layers` the blocks live under `layers` with a leading
  layer axis (logical name 'layers'); otherwise under `block_0`, `block_1`, ...
  A MoE model (`config.moe.num_experts > 0`) scans its dense prefix under
  `dense_layers` and its MoE layers under `moe_layers`.
  """

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(
      self,
      inputs: jax.Array,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      deterministic: bool = True,
      return_moe_stats: bool = False,
      features_only: bool = False,
      cache_length: int = 0,
      memory: dict | None = None,
      return_memory: bool = False,
      decode: bool = False,
  ) -> jax.Array | tuple[jax.Array, ...]:
    """Next-token logits.

    Args:
      inputs: [batch, seq] int32 token ids.
      segment_ids: [batch, seq] int32 packed-document ids, 0 = padding; None =
        one document per row and no padding.
      positions: [batch, seq] int32 positions within each document; None =
        0..seq-1 in every row.
      deterministic: False enables dropout (needs the 'dropout' rng).
      return_moe_stats: also return the router stats of every MoE layer.
      features_only: return (hidden, head) instead of logits, for a loss that
        applies the head itself (`chunked_loss.py`): hidden [batch, seq, embed] the
        final normalised states and head [embed, vocab] the output matrix (adapters
        and the tied head's scale folded in), both in the compute dtype, so that
        logits = hidden @ head. Needs built params (apply, not init).
      cache_length: > 0 decodes incrementally with a KV cache of that many positions
        (`kv_cache.init_cache(model, batch, cache_length)` builds it; apply with
        mutable=['cache']): `inputs` are the tokens after those already cached (a
        prompt, then one at a time), one document per row, no segment_ids.
        positions default to the cache's counter onwards in every row; pass them
        per row to decode prompts of different lengths, left-padded, the padding at
        negative positions (never attended to or cached; see `generate.generate`).
      memory: with chunk-summary memory on (`config.memory.chunk_size` > 0,
        `memory.py`): the state a previous call returned (or `memory.load_bank`
        read); None = an empty bank and short-term memory at stream position 0.
        seq must be a multiple of the chunk size; positions default to the stream
        positions (continuing from the state's).
      return_memory: also return the memory state after the last chunk (memory on).
      decode: with memory on, feed the tokens one at a time (incremental decoding, any
        length, continuing the state mid-chunk): the same logits and state as the
        whole-chunk pass, at one token's cost per step.

    Returns:
      logits: [batch, seq, vocab] float32 (or (hidden, head), see features_only);
      with `return_memory` also the new memory state, then with `return_moe_stats`
      {'layer_<i>': stats of MoE layer i} (see `moe.MoeBlock`; {} if dense), as the
      last elements of a tuple.
    """
    cfg = self.config
    dtype = layers.compute_dtype(cfg)
    batch, seq_len = inputs.shape
    if memory_lib.enabled(cfg):
      return self._memory_forward(inputs, segment_ids, positions, deterministic,
                                  return_moe_stats, features_only, cache_length, memory,
                                  return_memory, decode)
    if memory is not None or return_memory or decode:
      raise ValueError('memory / return_memory / decode need config.memory.chunk_size > 0 '
                       '(without memory, decode with cache_length).')
    if cache_length:
      if segment_ids is not None:
        raise ValueError('Decoding with a cache takes no segment_ids (one document per '
                         'row; left padding goes at negative positions).')
      index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      if positions is None:
        positions = jnp.broadcast_to(index.value + jnp.arange(seq_len, dtype=jnp.int32),
                                     (batch, seq_len))
      if not self.is_initializing():
        index.value = index.value + seq_len
    if positions is None:
      positions = jnp.broadcast_to(
          jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))

    embed = embed_lib.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=dtype, name='embed')
    x = embed(inputs)  # [batch, seq, embed]
    x = nn.with_logical_constraint(x, _EMBED_NAMES)

    block = _block_class(cfg)
    moe_stats = {}  # 'layer_<i>' -> router stats of MoE layer i.

    def scan_stack(x, first_layer, length, use_moe, name):
      stack = nn.scan(
          block,
          variable_axes={'params': 0, 'cache': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast,) * 4,
          length=length,
          metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      return stack(cfg, use_moe=use_moe, layer=first_layer, name=name)(
          x, segment_ids, positions, deterministic, cache_length)

    if cfg.scan_layers and not moe.enabled(cfg):
      x, _ = scan_stack(x, 0, cfg.num_layers, False, 'layers')
    elif cfg.scan_layers:
      # A scan repeats one block: the dense prefix and the MoE layers are two stacks.
      if cfg.moe.moe_every != 1:
        raise ValueError('scan_layers needs config.moe.moe_every=1 (a scan repeats one '
                         'kind of block).')
      num_dense = cfg.moe.first_dense_layers
      if num_dense:
        x, _ = scan_stack(x, 0, num_dense, False, 'dense_layers')
      x, stacked = scan_stack(x, num_dense, cfg.num_layers - num_dense, True,
                              'moe_layers')
      for j in range(cfg.num_layers - num_dense):
        moe_stats[f'layer_{num_dense + j}'] = jax.tree.map(lambda s, j=j: s[j], stacked)
    else:
      for i in range(cfg.num_layers):
        x, stats = block(cfg, use_moe=moe.is_moe_layer(cfg, i), layer=i,
                         name=f'block_{i}')(
            x, segment_ids, positions, deterministic, cache_length)
        if stats is not None:
          moe_stats[f'layer_{i}'] = stats

    outputs = self._head(x, embed, features_only)
    if return_moe_stats:
      outputs += (moe_stats,)
    return outputs[0] if len(outputs) == 1 else outputs

  def _memory_forward(self, inputs, segment_ids, positions, deterministic,
                      return_moe_stats, features_only, cache_length, state, return_memory,
                      decode):
    """Memory mode (`memory.py`): the chunks in order, each reading and writing memory.

    `nn.scan` over the seq / chunk_size chunks (params broadcast: every chunk runs the
    same blocks, named as without memory) on each chunk's tokens with the short-term
    keys / values and (in memory layers) the bank, then the summarizer writes the
    chunk's summaries. After every `tbptt_chunks`-th chunk the carried state gets a
    stop_gradient. With `decode` the tokens go one at a time (`_memory_decode`).
    """
    cfg = self.config
    mem = cfg.memory
    dtype = layers.compute_dtype(cfg)
    batch, seq_len = inputs.shape
    chunk = mem.chunk_size
    if cache_length or cfg.scan_layers:
      raise ValueError('Chunk-summary memory does not combine with cache_length or '
                       'scan_layers (decode with memory: decode=True).')
    if state is None:
      state = memory_lib.init_state(cfg, batch)
    else:
      memory_lib.check_state(cfg, state, batch)
    embed = embed_lib.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, name='embed')
    x_all = nn.with_logical_constraint(embed(inputs), _EMBED_NAMES)
    block = _block_class(cfg)
    if decode:
      if segment_ids is not None or positions is not None:
        raise ValueError('Decoding with memory takes neither segment_ids nor positions '
                         '(one document per row; positions come from the state).')
      state, x = self._memory_decode(x_all, state, block)
      outputs = self._head(x, embed, features_only)
      outputs += (state,) if return_memory else ()
      outputs += ({},) if return_moe_stats else ()
      return outputs[0] if len(outputs) == 1 else outputs
    if seq_len % chunk:
      raise ValueError(f'Input length {seq_len} is not a multiple of '
                       f'config.memory.chunk_size={chunk} (decode=True takes any length).')
    try:
      mid_chunk = int(state['position']) % chunk
    except jax.errors.ConcretizationTypeError:
      mid_chunk = 0  # Traced: the caller keeps whole-chunk calls at chunk boundaries.
    if mid_chunk:
      raise ValueError(f'The memory state is {mid_chunk} tokens into a chunk (left there '
                       'by decode=True); continue it with decode=True.')
    stream = jnp.broadcast_to(state['position'] + jnp.arange(seq_len, dtype=jnp.int32),
                              (batch, seq_len))
    if positions is None:
      positions = stream
    segments = (jnp.ones((batch, seq_len), jnp.int32) if segment_ids is None
                else segment_ids.astype(jnp.int32))
    num_chunks = seq_len // chunk

    def chunk_step(module, state, chunk_inputs):
      """One chunk: the blocks with memory, then the bank update; (state, hidden)."""
      index, x, stream_c, positions_c, segments_c = chunk_inputs
      x, out = self._memory_blocks(
          module, block, state, x, None if segment_ids is None else segments_c,
          positions_c, deterministic, stream_c, segments_c,
          state['short_positions'], state['short_segments'], 0)
      summarizer = memory_lib.Summarizer(cfg, name='summarizer', parent=module)
      new = memory_lib.close_chunk(state, out['mass'], summarizer(x, segments_c),
                                   out['keys'], out['values'], stream_c, segments_c,
                                   mem.usage_decay)
      if mem.tbptt_chunks:  # Truncate after every K-th chunk of this call.
        cut = (index + 1) % mem.tbptt_chunks == 0
        new = jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), new)
      return new, (x, out['moe'])

    def by_chunk(a):  # [batch, seq, ...] -> [chunks, batch, chunk, ...]
      a = a.reshape((batch, num_chunks, chunk) + a.shape[2:])
      return jnp.swapaxes(a, 0, 1)

    scan = nn.scan(chunk_step, variable_broadcast='params',
                   split_rngs={'params': False, 'dropout': True}, length=num_chunks)
    state, (hidden, moe_stats) = scan(
        self, state, (jnp.arange(num_chunks), by_chunk(x_all), by_chunk(stream),
                      by_chunk(positions), by_chunk(segments)))
    x = jnp.swapaxes(hidden, 0, 1).reshape((batch, seq_len) + hidden.shape[3:])
    outputs = self._head(x, embed, features_only)
    if return_memory:
      outputs += (state,)
    if return_moe_stats:  # Each chunk routes its own tokens: the chunks' mean stats.
      outputs += (jax.tree.map(lambda a: a.mean(axis=0), moe_stats),)
    return outputs[0] if len(outputs) == 1 else outputs

  def _memory_blocks(self, module, block, state, x, segment_ids, positions,
                     deterministic, stream, segments, past_positions, past_segments,
                     num_chunk_keys):
    """The blocks on new tokens x [batch, L, embed] with memory; (x, stacked outputs).

    Each layer's new tokens attend to themselves and to its past keys/values: the
    short-term ones, then (decoding) the first `num_chunk_keys` slots' worth of the
    state's chunk_* buffers, at stream positions `past_positions` [batch, past] (-1 =
    empty) in documents `past_segments`; memory layers also attend to the bank.
    Returns the new x and {'keys', 'values': [layers, batch, L, kv_heads, head_dim],
    'mass': [batch, M] summed over layers, 'moe': {'layer_<i>': router stats} of the
    MoE layers}. Blocks are created in `module`'s scope
    (a remat block closed over from outside a scan would leak tracers) with the names
    of the plain model's blocks.
    """
    cfg = self.config
    mass = jnp.zeros(state['usage'].shape, jnp.float32)
    keys, values, moe_stats = [], [], {}
    for i in range(cfg.num_layers):
      past_keys, past_values = state['short_keys'][i], state['short_values'][i]
      if num_chunk_keys:
        past_keys = jnp.concatenate([past_keys, state['chunk_keys'][i]], axis=1)
        past_values = jnp.concatenate([past_values, state['chunk_values'][i]], axis=1)
      memory_inputs = {
          'stream_positions': stream, 'segments': segments,
          'short_keys': past_keys, 'short_values': past_values,
          'short_positions': past_positions, 'short_segments': past_segments}
      if memory_lib.is_memory_layer(cfg, i):
        memory_inputs['summaries'] = state['summaries']
        memory_inputs['valid'] = state['valid']
      blk = block(cfg, use_moe=moe.is_moe_layer(cfg, i), layer=i, name=f'block_{i}',
                  parent=module)
      x, (out, stats) = blk(x, segment_ids, positions, deterministic, 0, memory_inputs)
      if out['mass'] is not None:
        mass = mass + out['mass']
      keys.append(out['keys'])
      values.append(out['values'])
      if stats is not None:
        moe_stats[f'layer_{i}'] = stats
    return x, {'keys': jnp.stack(keys), 'values': jnp.stack(values), 'mass': mass,
               'moe': moe_stats}

  def _memory_decode(self, x_all, state, block):
    """Memory mode, one token at a time: (state, hidden [batch, seq, embed]).

    Each token attends as in the whole-chunk pass: to the short-term keys, to the
    current chunk's earlier tokens (the state's chunk_* buffers), to itself and, in
    memory layers, to the bank, which stays fixed until the chunk is complete. When a
    token completes its chunk the summarizer runs on the chunk's hidden states and the
    bank, usage and short-term memory are updated exactly as `close_chunk` does for a
    whole chunk, so decoding reproduces the whole-chunk pass token for token.
    """
    cfg = self.config
    mem = cfg.memory
    chunk = mem.chunk_size
    batch = x_all.shape[0]
    ones = jnp.ones((batch, 1), jnp.int32)

    def close(module, state, start):
      chunk_positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32),
                                         (batch, chunk))
      segments = jnp.ones((batch, chunk), jnp.int32)
      summarizer = memory_lib.Summarizer(cfg, name='summarizer', parent=module)
      state = dict(state, position=start)  # close_chunk advances by a whole chunk.
      return memory_lib.close_chunk(
          state, state['chunk_mass'], summarizer(state['chunk_hidden'], segments),
          state['chunk_keys'], state['chunk_values'], chunk_positions, segments,
          mem.usage_decay)

    def keep(module, state, start):
      del module, start
      return state

    def token_step(module, state, x):
      """x: [batch, embed] one token per row -> (state, its final hidden state)."""
      position = state['position']
      slot = position % chunk
      start = position - slot
      filled = jnp.arange(chunk, dtype=jnp.int32) < slot
      chunk_positions = jnp.where(filled, start + jnp.arange(chunk, dtype=jnp.int32), -1)
      past_positions = jnp.concatenate(
          [state['short_positions'], jnp.broadcast_to(chunk_positions, (batch, chunk))],
          axis=1)
      past_segments = jnp.concatenate(
          [state['short_segments'], jnp.ones((batch, chunk), jnp.int32)], axis=1)
      stream = jnp.full((batch, 1), position, jnp.int32)
      x, out = self._memory_blocks(module, block, state, x[:, None], None, stream, True,
                                   stream, ones, past_positions, past_segments, chunk)
      new = dict(state)
      for name, value in (('chunk_keys', out['keys']), ('chunk_values', out['values'])):
        new[name] = jax.lax.dynamic_update_slice_in_dim(
            state[name], value.astype(jnp.float32), slot, axis=2)
      new['chunk_hidden'] = jax.lax.dynamic_update_slice_in_dim(
          state['chunk_hidden'], x.astype(jnp.float32), slot, axis=1)
      new['chunk_mass'] = state['chunk_mass'] + out['mass']
      new['position'] = position + 1
      new = nn.cond(slot == chunk - 1, close, keep, module, new, start)
      return new, x[:, 0]

    scan = nn.scan(token_step, variable_broadcast='params',
                   split_rngs={'params': False, 'dropout': False},
                   length=x_all.shape[1])
    state, hidden = scan(self, state, jnp.swapaxes(x_all, 0, 1))
    return state, jnp.swapaxes(hidden, 0, 1)

  def _head(self, x, embed, features_only):
    """Final norm and output head: (logits,) or (hidden, head) (see `__call__`)."""
    cfg = self.config
    dtype = layers.compute_dtype(cfg)
    x = norms.make_norm(cfg, 'final_norm')(x)
    if cfg.tie_embeddings:
      # The table is unit scale (see `Embed`); 1/sqrt(embed) brings logits back to it.
      head = None
    else:
      head = layers.dense(
          cfg.vocab_size, ('embed', 'vocab'), cfg, out_dtype=jnp.float32, name='head')
    if features_only:
      if head is None:
        matrix = (embed.embedding.T / math.sqrt(cfg.embed_dim)).astype(dtype)
      else:
        matrix = head.merged_kernel()
      outputs = (x.astype(dtype), matrix)
    else:
      logits = embed.attend(x) / math.sqrt(cfg.embed_dim) if head is None else head(x)
      # logits: [batch, seq, vocab] float32
      outputs = (nn.with_logical_constraint(
          logits, ('activation_batch', 'activation_length', 'activation_vocab')),)
    return outputs

