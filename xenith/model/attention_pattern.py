"""Which keys each layer's attention sees: full causal, sliding windows, global tokens.

`config.model.attention` (see xenith/config_defaults.py) describes the pattern:

- The first `full_attention_layers` layers attend to every earlier token.
- The other ("sparse") layers use sliding windows at the scales in `window_sizes`:
  with `window_split='heads'` the KV heads of every sparse layer are split into
  len(window_sizes) consecutive groups, group g using window_sizes[g] (a query head uses
  its KV head's window); when the windows do not divide the KV heads the first groups
  take one head more (3 windows over 16 KV heads: 6, 5, 5); with `window_split='layers'` sparse layer l uses
  window_sizes[l % len(window_sizes)] for all heads. An empty `window_sizes` makes
  every layer full.
- In sparse layers the first `num_global_tokens` tokens of the sequence are global:
  every later query of the same document sees them whatever its window, and they see
  every token before them (in a causal model "attends to every position" can only mean
  the earlier ones; seeing later ones would leak the future).

Dynamic window sizing (`dynamic_windows=True`): each configured window is its size at
`window_reference_length` tokens and scales in proportion to the sequence length T,

  window(T) = clip(round_up(w * T / window_reference_length, 64), min_window, max_window),

so a short prompt gets narrower windows (cheaper; the window still covers the same
share of the text) and a long document wider ones, up to `max_window`, which keeps
the cost linear in T. The window is fixed at trace time from the static input length;
the KV cache sizes its ring buffers from its maximum length the same way.
"""

import dataclasses

import ml_collections

# Dynamic windows are rounded up to a multiple of this (whole attention blocks).
_WINDOW_QUANTUM = 64


@dataclasses.dataclass(frozen=True)
class HeadGroup:
  """Consecutive KV heads [kv_start, kv_end) that share one window (None = full)."""
  kv_start: int
  kv_end: int
  window: int | None


def settings(config: ml_collections.FrozenConfigDict):
  """`config.attention`, or None for configs built without that block (all full)."""
  return config.get('attention') if hasattr(config, 'get') else None


def is_sparse_layer(config: ml_collections.FrozenConfigDict, layer: int) -> bool:
  """Whether `layer` uses sliding windows (it is past the full-attention prefix)."""
  attn = settings(config)
  return (attn is not None and bool(attn.window_sizes)
          and layer >= attn.full_attention_layers)


def resolve_window(config: ml_collections.FrozenConfigDict, window: int,
                   seq_len: int) -> int:
  """The window used at `seq_len` tokens for a configured window size (see module doc)."""
  attn = settings(config)
  if not attn.dynamic_windows:
    return window
  scaled = -(-window * seq_len // attn.window_reference_length)
  scaled = -(-scaled // _WINDOW_QUANTUM) * _WINDOW_QUANTUM
  return max(attn.min_window, min(attn.max_window, scaled))


def layer_head_groups(config: ml_collections.FrozenConfigDict, layer: int,
                      seq_len: int) -> tuple[HeadGroup, ...]:
  """The KV-head groups of `layer` and their windows at `seq_len` tokens."""
  kv_heads = config.num_kv_heads
  if not is_sparse_layer(config, layer):
    return (HeadGroup(0, kv_heads, None),)
  attn = settings(config)
  windows = [resolve_window(config, w, seq_len) for w in attn.window_sizes]
  if attn.window_split == 'layers':
    sparse_index = layer - attn.full_attention_layers
    return (HeadGroup(0, kv_heads, windows[sparse_index % len(windows)]),)
  # The first kv_heads % n groups take one head more than the others.
  size, extra = divmod(kv_heads, len(windows))
  starts = [g * size + min(g, extra) for g in range(len(windows) + 1)]
  return tuple(HeadGroup(starts[g], starts[g + 1], w) for g, w in enumerate(windows))


def num_global_tokens(config: ml_collections.FrozenConfigDict, layer: int) -> int:
  """Global tokens of `layer` (only sparse layers have them; full ones see all)."""
  return settings(config).num_global_tokens if is_sparse_layer(config, layer) else 0


def layer_key(config: ml_collections.FrozenConfigDict, layer: int) -> tuple | None:
  """Equal for two layers exactly when they have the same pattern at every length: None
  for full attention, else the configured windows the layer uses (`scan_layers` stacks
  only layers with equal keys: layer_stacks.py)."""
  if not is_sparse_layer(config, layer):
    return None
  attn = settings(config)
  if attn.window_split == 'layers':
    return (attn.window_sizes[(layer - attn.full_attention_layers) % len(attn.window_sizes)],)
  return tuple(attn.window_sizes)
