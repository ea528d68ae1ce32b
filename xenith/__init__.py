"""Xenith: sparse (Mixture-of-Experts), long-context language models in Flax/Linen.

  module, params = xenith.from_pretrained(path)   # HF Mixtral/Mistral dir or an export
  hf_config = xenith.load_config(path)            # its config.json, as a dict
  xenith.save_pretrained(out, module, params, hf_config=hf_config)  # HF format again

`save_pretrained` takes any Xenith model: one Mistral/Mixtral cannot express (LoRA
adapters, chunk-summary memory, several windows, shared experts, ...) is written in
Xenith's native format, which `from_pretrained` reads back as the same model
(docs/hf.md).

  predictions = xenith.classify(workdir, texts)   # a classifier run's labels for texts
"""

__all__ = ['classify', 'from_pretrained', 'load_config', 'save_pretrained']


def __getattr__(name):
  # Imported on first use, so that `import xenith.<module>` stays light.
  if name == 'classify':
    from xenith import text_classifier  # pylint: disable=g-import-not-at-top
    return text_classifier.classify
  if name in __all__:
    from xenith import hf  # pylint: disable=g-import-not-at-top
    return getattr(hf, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
