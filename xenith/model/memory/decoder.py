"""`MemoryDecoder`: the decoder that reads its input chunk by chunk, with memory.

The input is consecutive chunks of C = `memory.chunk_size` tokens. An `nn.scan` over the
chunks runs the plain model's blocks (same params, same names: `MemoryBlock` is a
`DecoderBlock` whose attention also sees the memory, `attention.py`) on each chunk, then
the summarizer writes the chunk's summaries into the bank (`bank.close_chunk`). With
`decode=True` the tokens go one at a time instead, any number, continuing a chunk
mid-way, with the same logits and state as the whole-chunk pass.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp

from xenith.model import attention_pattern
from xenith.model import layer_stacks
from xenith.model import moe
from xenith.model import transformer
from xenith.model.memory import bank
from xenith.model.memory.attention import LayerMemory, MemoryAttention
from xenith.model.memory.config import is_memory_layer
from xenith.model.memory.state import MemoryState, check_state, init_state
from xenith.model.memory.summarizer import Summarizer


class MemoryBlock(transformer.DecoderBlock):
  """A `DecoderBlock` whose attention reads the memory; returns (x, (record, MoE stats
  or None)) with the attention's `attention.Record`.

  It takes the memory as `shared` (what every layer sees: positions, documents, the bank)
  and `per_layer` (this layer's past and global keys/values), so that a scanned stack
  can slice `per_layer` by layer; the block's `layer` decides whether it reads the bank
  and the global tokens.
  """

  def attend(self, x, segment_ids, positions, shared: dict, per_layer: dict):
    del segment_ids  # The memory's segments mask the local keys.
    cfg = self.config
    reads_bank = is_memory_layer(cfg, self.layer)
    has_global = attention_pattern.num_global_tokens(cfg, self.layer) > 0
    memory = LayerMemory(
        stream_positions=shared['stream_positions'], segments=shared['segments'],
        past_keys=per_layer['past_keys'], past_values=per_layer['past_values'],
        past_positions=shared['past_positions'], past_segments=shared['past_segments'],
        summaries=shared['summaries'] if reads_bank else None,
        valid=shared['valid'] if reads_bank else None,
        global_keys=per_layer['global_keys'] if has_global else None,
        global_values=per_layer['global_values'] if has_global else None,
        global_positions=shared['global_positions'] if has_global else None,
        global_segments=shared['global_segments'] if has_global else None)
    return MemoryAttention(cfg, layer=self.layer, name='attn')(x, positions, memory)


class MemoryDecoder(transformer.Decoder):
  """`Decoder` with chunk-summary memory (`config.memory.chunk_size` > 0).

  Params are the plain decoder's (`block_<i>`, or with `scan_layers` the stacks of
  `layer_stacks.plan`) plus `summarizer`.
  `forward` also takes and returns the memory state (`MemoryState`).
  """

  @nn.compact
  def forward(self, inputs: jax.Array, *, memory: MemoryState | None = None,
              decode: bool = False, segment_ids: jax.Array | None = None,
              positions: jax.Array | None = None, deterministic: bool = True,
              features_only: bool = False) -> transformer.DecoderOutput:
    """The chunks in order, each reading and writing memory.

    Args:
      inputs: [batch, seq] int32 token ids, seq a multiple of the chunk size.
      memory: the state a previous call returned (or `load_bank` read); None = an empty
        bank and short-term memory at stream position 0.
      decode: feed the tokens one at a time (incremental decoding, any length,
        continuing the state mid-chunk): the same logits and state as the whole-chunk
        pass, at one token's cost per step.
      segment_ids, positions, deterministic, features_only: as in `Decoder.forward`;
        positions default to the stream positions (continuing from the state's).

    Returns:
      `DecoderOutput` with the logits (or features), the MoE router stats (mean over
      chunks; {} when decoding) and `memory`, the state after the last token. After
      every `tbptt_chunks`-th chunk the carried state gets a stop_gradient.
    """
    cfg = self.config
    mem = cfg.memory
    batch, seq_len = inputs.shape
    chunk = mem.chunk_size
    if memory is None:
      memory = init_state(cfg, batch)
    else:
      check_state(cfg, memory, batch)
    embed = self.make_embed()
    x_all = nn.with_logical_constraint(embed(inputs), transformer.EMBED_NAMES)
    block = transformer.block_class(cfg, MemoryBlock, static_argnums=(5,))
    if decode:
      if segment_ids is not None or positions is not None:
        raise ValueError('Decoding with memory takes neither segment_ids nor positions '
                         '(one document per row; positions come from the state).')
      memory, x = self._decode(x_all, memory, block)
      return self.output_head(x, embed, features_only).replace(moe_stats={}, memory=memory)
    if seq_len % chunk:
      raise ValueError(f'Input length {seq_len} is not a multiple of '
                       f'config.memory.chunk_size={chunk} (decode=True takes any length).')
    try:
      mid_chunk = int(memory.position) % chunk
    except jax.errors.ConcretizationTypeError:
      mid_chunk = 0  # Traced: the caller keeps whole-chunk calls at chunk boundaries.
    if mid_chunk:
      raise ValueError(f'The memory state is {mid_chunk} tokens into a chunk (left there '
                       'by decode=True); continue it with decode=True.')
    stream = jnp.broadcast_to(memory.position + jnp.arange(seq_len, dtype=jnp.int32),
                              (batch, seq_len))
    if positions is None:
      positions = stream
    segments = (jnp.ones((batch, seq_len), jnp.int32) if segment_ids is None
                else segment_ids.astype(jnp.int32))
    num_chunks = seq_len // chunk

    def chunk_step(module, state, chunk_inputs):
      """One chunk: the blocks with memory, then the bank update; (state, hidden)."""
      index, x, stream_c, positions_c, segments_c = chunk_inputs
      x, out = self._blocks(
          module, block, state, x, None if segment_ids is None else segments_c,
          positions_c, deterministic, stream_c, segments_c,
          state.short_positions, state.short_segments, 0)
      summarizer = Summarizer(cfg, name='summarizer', parent=module)
      new = bank.close_chunk(state, out['mass'], summarizer(x, segments_c), out['keys'],
                             out['values'], stream_c, segments_c, mem)
      if mem.tbptt_chunks:  # Truncate after every K-th chunk of this call.
        cut = (index + 1) % mem.tbptt_chunks == 0
        new = jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), new)
      return new, (x, out['moe'])

    def by_chunk(a):  # [batch, seq, ...] -> [chunks, batch, chunk, ...]
      a = a.reshape((batch, num_chunks, chunk) + a.shape[2:])
      return jnp.swapaxes(a, 0, 1)

    scan = nn.scan(chunk_step, variable_broadcast='params',
                   split_rngs={'params': False, 'dropout': True}, length=num_chunks)
    memory, (hidden, moe_stats) = scan(
        self, memory, (jnp.arange(num_chunks), by_chunk(x_all), by_chunk(stream),
                       by_chunk(positions), by_chunk(segments)))
    x = jnp.swapaxes(hidden, 0, 1).reshape((batch, seq_len) + hidden.shape[3:])
    # Each chunk routes its own tokens: the chunks' mean stats.
    return self.output_head(x, embed, features_only, segment_ids).replace(
        moe_stats=jax.tree.map(lambda a: a.mean(axis=0), moe_stats), memory=memory)

  def _blocks(self, module, block, state, x, segment_ids, positions, deterministic,
              stream, segments, past_positions, past_segments, num_chunk_keys):
    """The blocks on new tokens x [batch, L, embed] with memory; (x, stacked outputs).

    Each layer's new tokens attend to themselves and to its past keys/values: the
    short-term ones, then (decoding) the first `num_chunk_keys` slots' worth of the
    state's chunk_* buffers, at stream positions `past_positions` [batch, past] (-1 =
    empty) in documents `past_segments`; windowed layers also attend to the stored
    global tokens, memory layers to the bank.
    Returns the new x and {'keys', 'values': [layers, batch, L, kv_heads, head_dim],
    'mass': [batch, M] summed over layers, 'moe': {'layer_<i>': router stats} of the
    MoE layers}. Blocks are created in `module`'s scope (a remat block closed over from
    outside a scan would leak tracers) with the names of the plain model's blocks.
    """
    cfg = self.config
    per_layer = {'past_keys': state.short_keys, 'past_values': state.short_values,
                 'global_keys': state.global_keys, 'global_values': state.global_values}
    if num_chunk_keys:  # [layers, batch, R + C, kv_heads, head_dim]
      per_layer['past_keys'] = jnp.concatenate([state.short_keys, state.chunk_keys], axis=2)
      per_layer['past_values'] = jnp.concatenate([state.short_values, state.chunk_values],
                                                 axis=2)
    shared = {'stream_positions': stream, 'segments': segments,
              'past_positions': past_positions, 'past_segments': past_segments,
              'summaries': state.summaries, 'valid': state.valid,
              'global_positions': state.global_positions,
              'global_segments': state.global_segments}
    moe_stats, masses = {}, []
    if cfg.scan_layers:
      keys, values = [], []
      for stack in layer_stacks.plan(cfg):
        # The unit's j-th layers are every unit-th layer of the stack: a strided slice.
        sliced = tuple(jax.tree.map(lambda a, j=j: a[stack.first + j:stack.end:stack.unit],
                                    per_layer) for j in range(stack.unit))
        x, outs = module.scan_stack(stack, block, x, segment_ids, positions, None,
                                    deterministic, shared, sliced, per_layer_last=True)
        records = [record for record, _ in outs]  # Per unit position, [repeats, ...].
        # [repeats, unit, ...] -> layer order (first + repeat * unit + j), no per-layer copies.
        keys.append(_layer_order([r.keys for r in records]))
        values.append(_layer_order([r.values for r in records]))
        masses += [r.mass.sum(axis=0) for r in records if r.mass is not None]
        for j, (_, stats) in enumerate(outs):
          for r in range(stack.repeats if stats is not None else 0):
            moe_stats[f'layer_{stack.layer(r, j)}'] = jax.tree.map(lambda a, r=r: a[r], stats)
      keys, values = jnp.concatenate(keys), jnp.concatenate(values)
      if keys.shape[0] < cfg.num_layers:  # `layer_stacks.sizing_repeats` (FLOP counts)
        pad = [(0, cfg.num_layers - keys.shape[0])] + [(0, 0)] * (keys.ndim - 1)
        keys, values = jnp.pad(keys, pad, 'edge'), jnp.pad(values, pad, 'edge')  # built fewer.
    else:
      records = []
      for i in range(cfg.num_layers):
        blk = block(cfg, use_moe=moe.is_moe_layer(cfg, i), layer=i, name=f'block_{i}',
                    parent=module)
        x, (record, stats) = blk(x, segment_ids, positions, None, deterministic, shared,
                                 jax.tree.map(lambda a, i=i: a[i], per_layer))
        records.append(record)
        if record.mass is not None:
          masses.append(record.mass)
        if stats is not None:
          moe_stats[f'layer_{i}'] = stats
      keys, values = jnp.stack([r.keys for r in records]), jnp.stack([r.values for r in records])
    mass = sum(masses, jnp.zeros(state.usage.shape, jnp.float32))
    return x, {'keys': keys, 'values': values, 'mass': mass, 'moe': moe_stats}

  def _decode(self, x_all, state, block):
    """One token at a time: (state, hidden [batch, seq, embed]).

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
      summarizer = Summarizer(cfg, name='summarizer', parent=module)
      state = state.replace(position=start)  # close_chunk advances by a whole chunk.
      return bank.close_chunk(
          state, state.chunk_mass, summarizer(state.chunk_hidden, segments),
          state.chunk_keys, state.chunk_values, chunk_positions, segments, mem)

    def keep(module, state, start):
      del module, start
      return state

    def token_step(module, state, x):
      """x: [batch, embed] one token per row -> (state, its final hidden state)."""
      position = state.position
      slot = position % chunk
      start = position - slot
      filled = jnp.arange(chunk, dtype=jnp.int32) < slot
      chunk_positions = jnp.where(filled, start + jnp.arange(chunk, dtype=jnp.int32), -1)
      past_positions = jnp.concatenate(
          [state.short_positions, jnp.broadcast_to(chunk_positions, (batch, chunk))],
          axis=1)
      past_segments = jnp.concatenate(
          [state.short_segments, jnp.ones((batch, chunk), jnp.int32)], axis=1)
      stream = jnp.full((batch, 1), position, jnp.int32)
      x, out = self._blocks(module, block, state, x[:, None], None, stream, True,
                            stream, ones, past_positions, past_segments, chunk)

      def put(buffer, value, axis):
        return jax.lax.dynamic_update_slice_in_dim(buffer, value.astype(jnp.float32),
                                                   slot, axis=axis)

      new = state.replace(
          chunk_keys=put(state.chunk_keys, out['keys'], 2),
          chunk_values=put(state.chunk_values, out['values'], 2),
          chunk_hidden=put(state.chunk_hidden, x, 1),
          chunk_mass=state.chunk_mass + out['mass'],
          position=position + 1)
      new = nn.cond(slot == chunk - 1, close, keep, module, new, start)
      return new, x[:, 0]

    scan = nn.scan(token_step, variable_broadcast='params',
                   split_rngs={'params': False, 'dropout': False},
                   length=x_all.shape[1])
    state, hidden = scan(self, state, jnp.swapaxes(x_all, 0, 1))
    return state, jnp.swapaxes(hidden, 0, 1)


def _layer_order(per_position: list[jax.Array]) -> jax.Array:
  """A stack's outputs per unit position j, each [repeats, ...], as [repeats * unit, ...]
  in layer order (layer first + repeat * unit + j)."""
  stacked = jnp.stack(per_position, axis=1)  # [repeats, unit, ...]
  return stacked.reshape((-1,) + stacked.shape[2:])
