"""Hugging Face interoperability: Mixtral / Mistral checkpoints <-> Xenith `Decoder` params.

  module, params = xenith.from_pretrained(src)     # HF dir, an export or an import workdir
  logits = module.apply({'params': params}, tokens)                 # [batch, seq, vocab]
  xenith.save_pretrained(out, module, params, hf_config=xenith.load_config(src))

Xenith's export format is the Hugging Face one (config.json + model.safetensors, loadable
by `transformers.AutoModelForCausalLM`). One job per module, lowest first:
  safetensors_io  the files of a checkpoint directory
  configs         config.json <-> `config.model`
  weights         HF tensors <-> Xenith params
  convert         a checkpoint directory <-> (`config.model`, params)
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
