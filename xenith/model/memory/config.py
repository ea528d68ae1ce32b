"""Whether chunk-summary memory is on, and in which layers (`config.model.memory`)."""

import ml_collections

from xenith.model import attention_pattern


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


def num_global_tokens(config: ml_collections.FrozenConfigDict) -> int:
  """G: the global tokens whose keys/values the state keeps (0 without sparse layers)."""
  if not any(attention_pattern.is_sparse_layer(config, i) for i in range(config.num_layers)):
    return 0
  return attention_pattern.settings(config).num_global_tokens
