"""A run's tokenizer travels: `--mode=export_hf` writes it so that transformers'
AutoTokenizer + AutoModelForCausalLM continue a prompt exactly as `--mode=generate` does,
and a run trained with a Hugging Face tokenizer.json generates from its workdir alone."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import default
from xenith import generate
from xenith.data import pipeline
from xenith.model import build
from xenith.train import checkpointing
from xenith.train import run_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 'ROMEO:'
NEW_TOKENS = 12
TRAIN_STEPS = 80


def _main(*args):
  """main.py with `args` in a fresh process (stdout, stderr as text)."""
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, 'PYTHONIOENCODING': 'utf-8'},
                        timeout=300, check=False)


def _train(config, workdir, steps):
  """`steps` training steps of `config` in `workdir`, in this process, evaluating once."""
  from xenith.train import loop  # pylint: disable=g-import-not-at-top
  config.num_train_steps = steps
  config.optimizer.warmup_steps = 1
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = steps
  config.num_eval_batches = 1
  loop.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """The tiny model trained on Shakespeare until its greedy choices are words (its run
  pins the SentencePiece tokenizer), exported by `hf.export_from_workdir`, the function
  main.py --mode=export_hf calls."""
  from xenith import hf  # pylint: disable=g-import-not-at-top
  config = default.get_config('size=tiny')
  workdir = tmp_path_factory.mktemp('run')
  _train(config, workdir, TRAIN_STEPS)
  hf_dir = tmp_path_factory.mktemp('hf')
  assert hf.export_from_workdir(str(workdir), str(hf_dir), config) == []  # The HF format.
  return config, workdir, hf_dir, pipeline.load_tokenizer(config, str(workdir))


@pytest.mark.slow
def test_transformers_continues_a_prompt_as_xenith_generate_prints(exported):
  """AutoTokenizer + AutoModelForCausalLM.generate (greedy) on the export continue
  PROMPT to exactly the text `generate.generate_text` (what --mode=generate prints)
  returns, token for token; every greedy choice leads its runner-up by a margin far
  above the float differences between JAX and torch."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config, workdir, hf_dir, tokenizer = exported
  text = generate.generate_text(config, str(workdir), PROMPT, max_new_tokens=NEW_TOKENS)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  inputs = hf_tokenizer(PROMPT, return_tensors='pt')
  prompt = [tokenizer.bos_id, *tokenizer.encode(PROMPT)]
  assert inputs['input_ids'][0].tolist() == prompt  # HF adds the BOS too.
  with torch.no_grad():
    out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    logits = hf_model(out).logits[0, len(prompt) - 1:-1].numpy()  # [NEW_TOKENS, vocab]
  ids = out[0].tolist()
  assert len(ids) == len(prompt) + NEW_TOKENS and tokenizer.eos_id not in ids
  top2 = np.sort(logits, -1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, top2
  assert tokenizer.decode(ids[1:]) == text  # Xenith's tokens, read by Xenith.
  assert hf_tokenizer.decode(out[0], skip_special_tokens=True) == text


@pytest.mark.slow
def test_export_writes_the_special_token_ids_and_tokenizer_files(exported):
  """config.json and generation_config.json name Xenith's ids (pad 0, unk 1, bos 2,
  eos 3), not Hugging Face's defaults; the exported tokenizer encodes text to the ids
  Xenith's does (after the BOS it adds)."""
  import transformers  # pylint: disable=g-import-not-at-top

  _, _, hf_dir, tokenizer = exported
  config = json.loads((hf_dir / 'config.json').read_text())
  generation = json.loads((hf_dir / 'generation_config.json').read_text())
  assert {k: config[k] for k in ('pad_token_id', 'unk_token_id', 'bos_token_id',
                                 'eos_token_id')} == {'pad_token_id': 0, 'unk_token_id': 1,
                                                      'bos_token_id': 2, 'eos_token_id': 3}
  assert generation == {'pad_token_id': 0, 'bos_token_id': 2, 'eos_token_id': 3}
  hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
  assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (2, 3, 0)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert (hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id, hf_tokenizer.bos_token_id,
          hf_tokenizer.eos_token_id) == (0, 1, 2, 3)
  text = 'JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? 1597, café.'
  assert hf_tokenizer(text)['input_ids'] == [2, *tokenizer.encode(text)]


LINES = [f'{who}: {what} the {thing}, my lord.' for who in ('ROMEO', 'JULIET', 'NURSE')
         for what in ('I love', 'Thou art', 'Give me') for thing in ('night', 'sword')]


def byte_level_bpe(vocab_size: int, specials: list[str]):
  """A byte-level BPE tokenizer (`tokenizers`) trained on a few lines made here."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(LINES * 20, tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.mark.slow
def test_a_run_with_a_tokenizer_json_pins_it_and_generates_from_its_workdir(tmp_path):
  """A tokenizer.json with only '<|endoftext|>' (BOS, EOS and padding then): the run pins
  it in its workdir; with the original deleted and another cache, --mode=generate's
  function still encodes and decodes with it."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  original = tmp_path / 'tok' / 'tokenizer.json'
  original.parent.mkdir()
  byte_level_bpe(300, ['<|endoftext|>']).save(str(original))
  reference = tokenizers.Tokenizer.from_file(str(original))
  data = tmp_path / 'data'
  data.mkdir()
  for i in range(10):  # Ten small documents: a quick folder source.
    (data / f'{i}.txt').write_text('\n'.join(LINES[i:] + LINES[:i]))
  config = default.get_config('size=tiny')
  config.data.update(source='folder', path=str(data), tokenizer=str(original),
                     cache_dir=str(tmp_path / 'cache'), validation_fraction=0.2)
  workdir = tmp_path / 'run'
  _train(config, workdir, 2)
  assert sorted(p.name for p in workdir.glob('tokenizer*')) == ['tokenizer.json',
                                                                'tokenizer_config.json']
  assert (workdir / 'tokenizer.json').read_bytes() == original.read_bytes()
  original.unlink()
  config.data.cache_dir = str(tmp_path / 'other_cache')
  pinned = pipeline.load_tokenizer(config, str(workdir))
  eot = reference.token_to_id('<|endoftext|>')
  assert (pinned.bos_id, pinned.eos_id, pinned.pad_id) == (eot, eot, eot)
  text = 'JULIET: Give me my Romeo; and, when he shall die'
  assert pinned.encode(text) == reference.encode(text).ids
  out = generate.generate_text(config, str(workdir), 'ROMEO:', max_new_tokens=6)
  assert out.startswith('ROMEO:') and len(out) > len('ROMEO:')
  assert not (tmp_path / 'other_cache' / 'tokenizers').exists()
