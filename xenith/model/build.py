"""`make_model`: the decoder a `config.model` asks for."""

import ml_collections

from xenith.model import lora
from xenith.model import memory
from xenith.model import transformer


def decoder_class(model_config) -> type[transformer.Decoder]:
  """A `memory.MemoryDecoder` when chunk-summary memory is on, else a `transformer.Decoder`."""
  return memory.MemoryDecoder if memory.enabled(model_config) else transformer.Decoder


def make_model(model_config: ml_collections.ConfigDict) -> transformer.Decoder:
  """The decoder for a (mutable) `config.model`; the config is frozen here.

  `decoder_class`'s decoder; with `lora.train_only_adapters` only the LoRA adapters
  receive gradients.
  """
  config = ml_collections.FrozenConfigDict(model_config)
  decoder = decoder_class(config)
  if lora.trains_only_adapters(config):
    decoder = lora.frozen_base(decoder)
  return decoder(config=config)
