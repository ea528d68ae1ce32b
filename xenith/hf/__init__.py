"""Hugging Face interoperability: Mixtral / Mistral checkpoints <-> Xenith `Decoder` params.

  module, params = xenith.from_pretrained(src)     # HF dir, an export or an import workdir
  logits = module.apply({'params': params}, tokens)                 # [batch, seq, vocab]
  xenith.save_pretrained(out, module, params, hf_config=xenith.load_config(src))

Xenith's export format is the Hugging Face one (config.json + model.safetensors, loadable
by `transformers.AutoModelForCausalLM`) for every model Mistral/Mixtral can express; any
other Xenith model is written in Xenith's native format (the whole `config.model` and
every param by its Flax path), which `from_pretrained` reads back as the same model.
One job per module, lowest first:
  safetensors_io  the files of a checkpoint directory
  configs         config.json <-> `config.model`
  weights         HF tensors <-> Xenith params
  native          Xenith's native format, for models HF cannot express
  tokenizer_files an export's tokenizer files and token ids
  convert         a checkpoint directory <-> (`config.model`, params), HF or native
  workdir         main.py --mode=import_hf / export_hf
  pretrained      from_pretrained, load_config, save_pretrained
"""

from xenith.hf.pretrained import from_pretrained
from xenith.hf.pretrained import load_config
from xenith.hf.pretrained import save_pretrained
from xenith.hf.workdir import CONFIG_PY
from xenith.hf.workdir import export_from_workdir
from xenith.hf.workdir import import_to_workdir

__all__ = ['from_pretrained', 'load_config', 'save_pretrained', 'CONFIG_PY',
           'export_from_workdir', 'import_to_workdir']
