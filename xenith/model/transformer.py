"""The decoder-only transformer: `DecoderBlock` and `Decoder`."""

import math
from typing import Any

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import attention
from xenith.model import embed as embed_lib
from xenith.model import language_adapters
from xenith.model import layer_stacks
from xenith.model import layers
from xenith.model import lora
from xenith.model import mlp
from xenith.model import moe
from xenith.model import norms

EMBED_NAMES = ('activation_batch', 'activation_length', 'activation_embed')

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@struct.dataclass
class DecoderOutput:
  """What a decoder's `forward` returns (fields it does not produce are None)."""

  logits: jax.Array | None = None  # [batch, seq, vocab] float32.
  # With features_only, (hidden [batch, seq, embed], head [embed, vocab]) in the compute
  # dtype: logits = hidden @ head (the output head applied by the caller).
  features: tuple[jax.Array, jax.Array] | None = None
  moe_stats: dict[str, Any] | None = None  # {'layer_<i>': router stats} ({} if dense).
  memory: Any = None  # A memory model's state after the input (`memory.MemoryState`).
  # A classifier's label logits [batch, num_labels] float32 (`classifier.py`).
  class_logits: jax.Array | None = None


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); dropout on branches.

  With `use_moe` the MLP is a `moe.MoeBlock` (params under `moe`, not `mlp`).
  `layer` is the block's index (it picks the attention pattern); a scanned stack
  passes its first layer's, all its layers having one pattern. A subclass changes the
  attention branch by overriding `attend` (`memory.decoder.MemoryBlock`).
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
      languages: jax.Array | None,
      deterministic: bool,
      *attention_args,
  ) -> tuple[jax.Array, Any]:
    """x: [batch, seq, embed] -> (x, MoE router stats or None); `nn.scan`'s carry/output.

    `languages` [batch, seq] (or None) picks each token's language adapter, if the
    config has them (`language_adapters.py`).

    `attention_args` go to `attend` (here the KV cache length). When `attend` returns
    a record (memory attention) the second element is (record, stats).
    """
    cfg = self.config
    x = nn.with_logical_constraint(x, EMBED_NAMES)
    branch = norms.make_norm(cfg, 'attn_norm')(x)
    branch, record = self.attend(branch, segment_ids, positions, *attention_args)
    branch = nn.Dropout(cfg.dropout_rate)(branch, deterministic=deterministic)
    x = x + branch

    branch = norms.make_norm(cfg, 'mlp_norm')(x)
    if self.use_moe:
      branch, stats = moe.MoeBlock(cfg, name='moe')(branch, segment_ids)
    else:
      branch, stats = mlp.Mlp(cfg, name='mlp')(branch), None
    if language_adapters.enabled(cfg):
      branch = language_adapters.LanguageAdapter(cfg, name='language_adapter')(
          branch, languages)
    branch = nn.Dropout(cfg.dropout_rate)(branch, deterministic=deterministic)
    x = nn.with_logical_constraint(x + branch, EMBED_NAMES)
    return x, (stats if record is None else (record, stats))

  def attend(self, x, segment_ids, positions, cache_length: int = 0):
    """The attention branch on the normalised x: (out [batch, seq, embed], None)."""
    attn = attention.Attention(self.config, layer=self.layer, name='attn')
    return attn(x, segment_ids, positions, cache_length), None


def block_class(config: ml_collections.FrozenConfigDict, block: type[nn.Module] = DecoderBlock,
                static_argnums: tuple[int, ...] = (5, 6)) -> type[nn.Module]:
  """`block` rematerialised per `config.remat`; `static_argnums` are its arguments that
  are Python values (self is argument 0; here `deterministic`, `cache_length`)."""
  if config.remat == 'none':
    return block
  if config.remat not in REMAT_POLICIES:
    raise ValueError(
        f'Unknown remat {config.remat!r}; choose none or one of '
        f'{sorted(REMAT_POLICIES)}.')
  return nn.remat(
      block,
      policy=REMAT_POLICIES[config.remat],
      # Inside scan the loop already stops XLA from merging the recomputation
      # into the forward pass; elsewhere it must be prevented explicitly.
      prevent_cse=not config.scan_layers,
      static_argnums=static_argnums,
  )


class LayerGroup(nn.Module):
  """`unit` consecutive blocks from layer `first` (`block_0`, ...): the repeating unit of
  a scanned stack whose layers take turns (layer_stacks.py). Returns (x, their outputs)."""

  config: ml_collections.FrozenConfigDict
  block: type[nn.Module]
  first: int
  unit: int
  # The last argument is a tuple with one entry per layer of the unit (e.g. each memory
  # layer's own past keys); block j gets entry j.
  per_layer_last: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *args) -> tuple[jax.Array, tuple]:
    outputs = []
    for j in range(self.unit):
      layer = self.first + j
      block_args = args[:-1] + (args[-1][j],) if self.per_layer_last else args
      x, out = self.block(self.config, use_moe=moe.is_moe_layer(self.config, layer),
                          layer=layer, name=f'block_{j}')(x, *block_args)
      outputs.append(out)
    return x, tuple(outputs)


class Decoder(nn.Module):
  """Decoder-only language model configured by `config` (a frozen `config.model`).

  Params are float32; activations use `config.dtype`; logits are float32.
  Blocks live under `block_0`, `block_1`, ...; with `config.scan_layers` they are
  stacks scanned with a leading layer axis (logical name 'layers'): `layers` when every
  layer is alike, `dense_layers` + `moe_layers` for a MoE model's dense prefix and MoE
  layers, in general the stacks of repeating units `layer_stacks.plan` gives.

  `model.apply(variables, tokens)` gives the logits; `model.apply(variables, tokens,
  method='forward')` the whole `DecoderOutput` (MoE router stats, features).
  """

  config: ml_collections.FrozenConfigDict

  def __call__(self, inputs: jax.Array, **kwargs) -> jax.Array:
    """Next-token logits [batch, seq, vocab] float32: `forward(inputs, **kwargs).logits`."""
    return self.forward(inputs, **kwargs).logits

  @nn.compact
  def forward(
      self,
      inputs: jax.Array,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      languages: jax.Array | None = None,
      deterministic: bool = True,
      features_only: bool = False,
      cache_length: int = 0,
  ) -> DecoderOutput:
    """The decoder on `inputs`: logits (or features) and MoE router stats.

    Args:
      inputs: [batch, seq] int32 token ids.
      segment_ids: [batch, seq] int32 packed-document ids, 0 = padding; None =
        one document per row and no padding.
      positions: [batch, seq] int32 positions within each document; None =
        0..seq-1 in every row.
      languages: [batch, seq] int32 language id of each token for the language
        adapters (`language_adapters.py`; 0 = none); None = no adapter anywhere.
      deterministic: False enables dropout (needs the 'dropout' rng).
      features_only: give `features` (hidden, head) instead of logits, for a loss that
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

    Returns:
      `DecoderOutput` with logits (or features) and moe_stats {'layer_<i>': stats of
      MoE layer i} (see `moe.MoeBlock`; {} if dense).
    """
    cfg = self.config
    batch, seq_len = inputs.shape
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

    embed = self.make_embed()
    x = nn.with_logical_constraint(embed(inputs), EMBED_NAMES)  # [batch, seq, embed]
    block = block_class(cfg)
    moe_stats = {}  # 'layer_<i>' -> router stats of MoE layer i.

    if cfg.scan_layers:
      for stack in layer_stacks.plan(cfg):
        x, stats = self.scan_stack(stack, block, x, segment_ids, positions, languages,
                                   deterministic, cache_length)
        for r in range(stack.repeats):
          for j in range(stack.unit):
            if stats[j] is not None:
              moe_stats[f'layer_{stack.layer(r, j)}'] = jax.tree.map(
                  lambda s, r=r: s[r], stats[j])
    else:
      for i in range(cfg.num_layers):
        x, stats = block(cfg, use_moe=moe.is_moe_layer(cfg, i), layer=i,
                         name=f'block_{i}')(
            x, segment_ids, positions, languages, deterministic, cache_length)
        if stats is not None:
          moe_stats[f'layer_{i}'] = stats
    return self.output_head(x, embed, features_only, segment_ids).replace(
        moe_stats=moe_stats)

  def scan_stack(self, stack: layer_stacks.Stack, block: type[nn.Module], x: jax.Array,
                 *args, per_layer_last: bool = False) -> tuple[jax.Array, tuple]:
    """`stack`'s layers on x [batch, seq, embed] as one `nn.scan`: (x, per unit position
    j the stacked outputs (e.g. MoE router stats or None) of its layers, [repeats, ...]).

    `args` go to every block; with `per_layer_last` the last one is a tuple over the
    unit's positions j of pytrees with a leading [repeats] axis, sliced per layer.
    """
    unit = block if stack.unit == 1 else LayerGroup
    in_axes = (nn.broadcast,) * len(args)
    if per_layer_last:
      in_axes = in_axes[:-1] + (0,)
    scan = nn.scan(
        unit,
        variable_axes={'params': 0, 'cache': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=in_axes,
        length=stack.repeats,
        unroll=stack.repeats if stack.unrolled else 1,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    if stack.unit == 1:
      if per_layer_last:
        args = args[:-1] + (args[-1][0],)
      x, out = scan(self.config, use_moe=moe.is_moe_layer(self.config, stack.first),
                    layer=stack.first, name=stack.name)(x, *args)
      return x, (out,)
    return scan(self.config, block=block, first=stack.first, unit=stack.unit,
                per_layer_last=per_layer_last, name=stack.name)(x, *args)

  def make_embed(self) -> embed_lib.Embed:
    """The token embedding (params 'embed'; also the tied output head)."""
    cfg = self.config
    return embed_lib.Embed(cfg.vocab_size, cfg.embed_dim, dtype=layers.compute_dtype(cfg),
                           name='embed')

  def output_head(self, x: jax.Array, embed: embed_lib.Embed, features_only: bool,
                  segment_ids: jax.Array | None = None) -> DecoderOutput:
    """Final norm and output head on x [batch, seq, embed]: logits or features.

    `segment_ids` (as given to `forward`) are for heads that pool over each row's
    document (`classifier.py`); the language-model head works per position.
    """
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
      return DecoderOutput(features=(x.astype(dtype), matrix))
    logits = embed.attend(x) / math.sqrt(cfg.embed_dim) if head is None else head(x)
    # logits: [batch, seq, vocab] float32
    return DecoderOutput(logits=nn.with_logical_constraint(
        logits, ('activation_batch', 'activation_length', 'activation_vocab')))

