"""Hugging Face interop (xenith/hf/): small random Mixtral / Mistral models built with
transformers (PyTorch CPU, fp32) import with equal logits and export back exactly."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

import torch
import transformers

from experiments import default
import xenith
from xenith.train import checkpointing
from xenith.errors import HfFormatError
from xenith.hf import configs
from xenith.hf import convert
from xenith.hf import safetensors_io
from xenith.hf import workdir as hf_workdir
from xenith.model import build
from helpers import single_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256
SEQ = 12  # Shorter than the sliding window below (16).


def _make(kind: str, dtype=torch.float32):
  common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, rms_norm_eps=1e-5)
  if kind == 'mixtral':
    config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4,
                                        num_experts_per_tok=2, **common)
    cls = transformers.MixtralForCausalLM
  else:
    config = transformers.MistralConfig(
        intermediate_size=96, sliding_window=16 if kind == 'mistral_window' else None,
        tie_word_embeddings=kind == 'mistral_tied', **common)
    cls = transformers.MistralForCausalLM
  torch.manual_seed(0)
  model = cls(config)
  with torch.no_grad():  # Beyond the init's tiny scales, so that every weight matters.
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.to(dtype).eval()


def _tokens():
  return np.random.RandomState(0).randint(0, VOCAB, (2, SEQ)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _xenith_logits(module, params, tokens):
  return np.asarray(module.apply({'params': params}, jnp.asarray(tokens)))


def _assert_same_state(a, b):
  sa, sb = a.state_dict(), b.state_dict()
  assert sorted(sa) == sorted(sb)
  for name in sa:
    assert sa[name].dtype == sb[name].dtype, name
    assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """kind -> (torch model, its save_pretrained directory)."""
  out = {}
  for kind in ('mixtral', 'mistral', 'mistral_window', 'mistral_tied'):
    model = _make(kind)
    path = str(tmp_path_factory.mktemp(kind))
    model.save_pretrained(path)
    out[kind] = model, path
  return out


@pytest.mark.parametrize('kind', ['mixtral', 'mistral', 'mistral_window', 'mistral_tied'])
def test_import_logits_and_round_trip(saved, kind, tmp_path):
  model, path = saved[kind]
  module, params = xenith.from_pretrained(path)
  tokens = _tokens()
  ours = _xenith_logits(module, params, tokens)
  theirs = _hf_logits(model, tokens)
  assert ours.shape == (2, SEQ, VOCAB)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)

  out = str(tmp_path / 'export')
  xenith.save_pretrained(out, module, params)
  reloaded = type(model).from_pretrained(out).eval()
  _assert_same_state(model, reloaded)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), theirs)
  # The export is also a Xenith input.
  module2, params2 = xenith.from_pretrained(out)
  np.testing.assert_array_equal(_xenith_logits(module2, params2, tokens), ours)
  config = json.load(open(os.path.join(out, 'config.json')))
  assert config['sliding_window'] == (16 if kind == 'mistral_window' else None)


def test_sliding_window_matches_beyond_the_window(saved):
  """Mistral's sliding window (16) maps onto Xenith's windowed attention: logits match
  at every position, also past the window."""
  model, path = saved['mistral_window']
  module, params = xenith.from_pretrained(path)
  assert tuple(module.config.attention.window_sizes) == (16,)
  tokens = np.random.RandomState(1).randint(0, VOCAB, (1, 40)).astype(np.int32)
  diff = np.abs(_xenith_logits(module, params, tokens) - _hf_logits(model, tokens))
  assert diff.max() <= 1e-4


def test_mixtral_param_layout(saved):
  module, params = xenith.from_pretrained(saved['mixtral'][1])
  block = params['block_1']
  assert block['attn']['query']['kernel'].shape == (64, 4, 16)
  assert block['attn']['key']['kernel'].shape == (64, 2, 16)
  assert block['attn']['out']['kernel'].shape == (4, 16, 64)
  assert block['moe']['router']['kernel'].shape == (64, 4)
  assert block['moe']['experts']['gate'].shape == (4, 64, 96)
  assert block['moe']['experts']['down'].shape == (4, 96, 64)
  assert params['head']['kernel'].shape == (64, VOCAB)
  assert module.config.moe.normalize_top_k and module.config.norm_eps == 1e-5


@pytest.mark.parametrize('kind', ['mixtral', 'mistral'])
def test_scan_layers(saved, kind, tmp_path):
  model, path = saved[kind]
  module, params = xenith.from_pretrained(path, scan_layers=True)
  assert 'block_0' not in params
  tokens = _tokens()
  np.testing.assert_allclose(_xenith_logits(module, params, tokens),
                             _hf_logits(model, tokens), rtol=0, atol=1e-4)
  xenith.save_pretrained(str(tmp_path), module, params)
  _assert_same_state(model, type(model).from_pretrained(str(tmp_path)).eval())


def test_sharded_checkpoint(tmp_path):
  model = _make('mixtral')
  model.save_pretrained(str(tmp_path), max_shard_size='100KB')
  assert os.path.exists(tmp_path / safetensors_io.INDEX_FILE)
  module, params = xenith.from_pretrained(str(tmp_path))
  tokens = _tokens()
  np.testing.assert_allclose(_xenith_logits(module, params, tokens),
                             _hf_logits(model, tokens), rtol=0, atol=1e-4)


def test_bfloat16_round_trip(tmp_path):
  model = _make('mistral', torch.bfloat16)
  model.save_pretrained(str(tmp_path / 'in'))
  module, params = xenith.from_pretrained(str(tmp_path / 'in'))
  xenith.save_pretrained(str(tmp_path / 'out'), module, params,  # Keeps bfloat16.
                         hf_config=xenith.load_config(str(tmp_path / 'in')))
  reloaded = transformers.MistralForCausalLM.from_pretrained(
      str(tmp_path / 'out'), dtype=torch.bfloat16)
  _assert_same_state(model, reloaded)


def test_errors(saved, tmp_path):
  with pytest.raises(HfFormatError, match='is not a directory'):
    xenith.from_pretrained(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(HfFormatError, match='no config.json'):
    xenith.from_pretrained(str(tmp_path / 'empty'))

  llama = tmp_path / 'llama'
  llama.mkdir()
  (llama / 'config.json').write_text(json.dumps(
      {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama'}))
  with pytest.raises(HfFormatError, match="Unsupported architecture 'LlamaForCausalLM'"):
    xenith.from_pretrained(str(llama))

  _, path = saved['mistral']
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  (no_weights / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
  with pytest.raises(HfFormatError, match='no \\*.safetensors'):
    xenith.from_pretrained(str(no_weights))

  tensors = safetensors_numpy.load_file(os.path.join(path, safetensors_io.SAFETENSORS_FILE))
  del tensors['model.layers.1.mlp.down_proj.weight']
  safetensors_numpy.save_file(tensors, str(no_weights / safetensors_io.SAFETENSORS_FILE))
  with pytest.raises(HfFormatError, match='model.layers.1.mlp.down_proj.weight is missing'):
    xenith.from_pretrained(str(no_weights))

  # A Xenith model with no HF equivalent.
  module, params = xenith.from_pretrained(path)
  config = module.config.as_configdict()
  config.norm = 'layernorm'
  with pytest.raises(HfFormatError, match='no Mistral/Mixtral equivalent'):
    convert.save_hf(str(tmp_path / 'x'), config, params)


def test_load_config_and_save_pretrained_with_it(saved, tmp_path):
  """`load_config` gives the checkpoint's config.json; `save_pretrained` keeps the fields
  of the one it is given (token ids, dtype), and writes one from the model without it."""
  _, path = saved['mistral']
  hf_config = xenith.load_config(path)
  assert hf_config == json.load(open(os.path.join(path, 'config.json')))
  module, params = xenith.from_pretrained(path)
  hf_config = {**hf_config, 'bos_token_id': 7, 'dtype': 'float16'}
  xenith.save_pretrained(str(tmp_path / 'kept'), module, params, hf_config=hf_config)
  kept = xenith.load_config(str(tmp_path / 'kept'))
  assert kept['bos_token_id'] == 7 and kept['dtype'] == 'float16'
  xenith.save_pretrained(str(tmp_path / 'fresh'), module, params)
  fresh = xenith.load_config(str(tmp_path / 'fresh'))
  assert 'bos_token_id' not in fresh and fresh['dtype'] == 'float32'
  assert fresh['hidden_size'] == hf_config['hidden_size']
  with pytest.raises(HfFormatError, match='is not a directory'):
    xenith.load_config(str(tmp_path / 'nowhere'))


def _config_py(filename):
  """get_config() of a config file, loaded as main.py --config does."""
  spec = importlib.util.spec_from_file_location('workdir_config', filename)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _main(*args):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
  return result


def test_main_import_export(saved, tmp_path):
  model, path = saved['mixtral']
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'export')
  result = _main('--mode=import_hf', f'--hf_dir={path}', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '0', 'state'))
  overrides = json.load(open(os.path.join(workdir, hf_workdir.CONFIG_JSON)))
  assert overrides['model.moe.num_experts'] == 4
  assert os.path.isfile(os.path.join(workdir, hf_workdir.CONFIG_PY))
  assert (_config_py(os.path.join(workdir, hf_workdir.CONFIG_PY)).to_dict()
          == hf_workdir.read_config(workdir).to_dict())
  assert xenith.load_config(workdir) == xenith.load_config(path)

  # The import's workdir loads directly too.
  tokens = _tokens()
  for scan_layers in (False, True):
    module, params = xenith.from_pretrained(workdir, scan_layers=scan_layers)
    np.testing.assert_allclose(_xenith_logits(module, params, tokens),
                               _hf_logits(model, tokens), rtol=0, atol=1e-4)

  result = _main('--mode=export_hf', f'--hf_dir={out}', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  reloaded = transformers.MixtralForCausalLM.from_pretrained(out).eval()
  _assert_same_state(model, reloaded)

  result = _main('--mode=import_hf', f'--hf_dir={tmp_path / "missing"}',
                 f'--workdir={tmp_path / "run2"}')
  assert result.returncode != 0
  assert 'HfFormatError' in result.stderr and 'is not a directory' in result.stderr


# A workdir written by --mode=import_hf before xenith/config_defaults.py existed: its
# config.py builds on experiments/default.py (see the fixture's README.txt).
OLD_IMPORT = os.path.join(REPO, 'tests', 'fixtures', 'old_import_hf')


def test_workdir_imported_before_config_defaults_still_loads(tmp_path):
  """Its config.py and xenith_config.json load; as a fine-tune's init, through
  from_pretrained and through export_hf, its params give the logits the tiny Mixtral it
  was imported from gave in transformers."""
  workdir = str(tmp_path / 'old_import')
  shutil.copytree(OLD_IMPORT, workdir)
  expected = np.load(os.path.join(workdir, 'hf_logits.npz'))
  tokens, logits = expected['tokens'], expected['logits']
  config_py = os.path.join(workdir, hf_workdir.CONFIG_PY)
  config = _config_py(config_py)
  assert config.to_dict() == hf_workdir.read_config(workdir).to_dict()
  assert config.model.moe.num_experts == 2 and config.model.embed_dim == 8

  # A fine-tune's init (its init_from_checkpoint names where the fixture was made).
  module = build.make_model(config.model)
  params = nn.meta.unbox(module.init(jax.random.key(1), jnp.asarray(tokens))['params'])
  params = checkpointing.load_base_params(
      os.path.join(workdir, 'checkpoints', '0'), params)
  np.testing.assert_allclose(_xenith_logits(module, params, tokens), logits,
                             rtol=0, atol=1e-4)

  module, params = xenith.from_pretrained(workdir)
  np.testing.assert_allclose(_xenith_logits(module, params, tokens), logits,
                             rtol=0, atol=1e-4)
  assert xenith.load_config(workdir)['num_local_experts'] == 2

  out = str(tmp_path / 'export')
  result = _main('--mode=export_hf', f'--config={config_py}', f'--workdir={workdir}',
                 f'--hf_dir={out}')
  assert result.returncode == 0, result.stderr
  exported = transformers.MixtralForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_hf_logits(exported, tokens), logits, rtol=0, atol=1e-5)
  xenith.hf.export_from_workdir(workdir, str(tmp_path / 'export2'))  # xenith_config.json
  _assert_same_state(
      exported, transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / 'export2')))


def _exportable_model():
  """A tiny Mixtral-shaped Xenith model config: MoE in every layer, one sliding window."""
  model = default.get_config('size=tiny').model
  model.moe.num_experts = 4
  model.tie_embeddings = False
  model.attention.window_sizes = (16,)
  return model


# (fields set on an exportable model, what the refusal names).
_UNEXPORTABLE = [
    ({'norm': 'layernorm'}, "norm='layernorm'"),
    ({'rope_scaling.type': 'yarn', 'rope_scaling.factor': 2.0}, "rope_scaling.type='yarn'"),
    ({'lora.rank': 4}, 'LoRA adapters'),
    ({'memory.chunk_size': 8}, 'chunk-summary memory'),
    ({'attention.window_sizes': (16, 32)}, 'attention pattern'),
    ({'attention.num_global_tokens': 2}, 'attention pattern'),
    ({'attention.dynamic_windows': True}, 'attention pattern'),
    ({'attention.full_attention_layers': 1}, 'attention pattern'),
    ({'moe.num_shared_experts': 1}, 'shared experts'),
    ({'moe.first_dense_layers': 1}, 'dense layers between MoE layers'),
    ({'moe.moe_every': 2}, 'dense layers between MoE layers'),
    ({'moe.normalize_top_k': False}, 'normalize_top_k=False'),
    ({'moe.expert_mlp_dim': 32}, 'expert_mlp_dim != mlp_dim'),
]


@pytest.mark.parametrize('fields,message', _UNEXPORTABLE,
                         ids=[next(iter(f)) for f, _ in _UNEXPORTABLE])
def test_every_setting_without_a_hf_equivalent_is_refused(fields, message):
  configs.check_exportable(_exportable_model())  # The starting point exports.
  model = _exportable_model()
  for field, value in fields.items():
    *parents, name = field.split('.')
    node = model
    for p in parents:
      node = node[p]
    node[name] = value
  with pytest.raises(HfFormatError, match='no Mistral/Mixtral equivalent') as error:
    configs.check_exportable(model)
  assert message in str(error.value)


def test_all_problems_are_named_at_once():
  model = _exportable_model()
  model.norm = 'layernorm'
  model.moe.num_shared_experts = 1
  with pytest.raises(HfFormatError, match="norm='layernorm'.*; shared experts"):
    configs.check_exportable(model)


@pytest.mark.slow
def test_export_of_a_natively_trained_run(tmp_path):
  """A Xenith run trained from scratch (MoE, untied head, a sliding window) exports to a
  Mixtral checkpoint whose logits in transformers equal the run's own."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'export')
  overrides = ['--config.model.moe.num_experts=4', '--config.model.tie_embeddings=False',
               '--config.model.attention.window_sizes=(16,)']
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny',
       f'--workdir={workdir}', '--config.num_train_steps=4',
       '--config.checkpoint_every_steps=4', '--config.eval_every_steps=4',
       '--config.num_eval_batches=1', '--config.optimizer.warmup_steps=1', *overrides],
      cwd=REPO, env=single_device_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  result = _main('--mode=export_hf', '--config=experiments/default.py:size=tiny',
                 *overrides, f'--workdir={workdir}', f'--hf_dir={out}')
  assert result.returncode == 0, result.stderr[-4000:]

  exported = transformers.MixtralForCausalLM.from_pretrained(out).eval()
  assert exported.config.sliding_window == 16 and exported.config.num_local_experts == 4
  model = _exportable_model()
  params = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', '4', 'state'))['params']
  tokens = np.random.RandomState(2).randint(0, model.vocab_size, (2, 40)).astype(np.int32)
  ours = np.asarray(build.make_model(model).apply({'params': params}, jnp.asarray(tokens)))
  np.testing.assert_allclose(_hf_logits(exported, tokens), ours, rtol=0, atol=1e-4)
