"""Xenith's native checkpoint format (xenith/hf/native.py): `save_pretrained` of a model
Hugging Face cannot express, read back by `from_pretrained` as the same model.

The params are random (seeded NumPy, every one nonzero, LoRA B included), their shapes
from the model's own `jax.eval_shape(init)`; the comparisons walk the whole param trees,
so params that later features add are covered without a change here.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors
from safetensors import numpy as safetensors_numpy

import xenith
from xenith import config_defaults
from xenith.config_validation import validate
from xenith.errors import HfFormatError
from xenith.hf import configs
from xenith.hf import convert
from xenith.hf import workdir as hf_workdir
from xenith.model import build
from xenith.model import memory
from helpers import single_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ = 64, 16


def _config(**model):
  """A validated tiny config with every feature on that combines with `model`'s."""
  config = config_defaults.get_config()
  config.max_seq_len = SEQ
  m = config.model
  m.update(dict(vocab_size=VOCAB, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=48, norm='layernorm', tie_embeddings=False))
  m.rope_scaling.update(dict(type='yarn', factor=2.0, original_max_position=8))
  m.moe.update(dict(num_experts=4, num_experts_per_token=2, num_shared_experts=1,
                    first_dense_layers=1, expert_mlp_dim=24))
  m.attention.update(dict(window_sizes=(4, 8), num_global_tokens=2))
  m.lora.update(dict(rank=2, targets=('query', 'key', 'value', 'out', 'gate', 'up', 'down',
                                      'head', 'experts')))
  for field, value in model.items():
    *parents, name = field.split('.')
    node = m
    for p in parents:
      node = node[p]
    node[name] = value
  validate(config, 1)
  return config.model


CASES = {
    # Dense layers 0-1 (full attention in 0), MoE in 2; two windows + global tokens.
    'everything': dict({'attention.full_attention_layers': 1, 'moe.moe_every': 2,
                        'lora.train_only_adapters': False}),
    # Chunk-summary memory (no global tokens: they do not combine with it); layer 0
    # dense, layer 1 MoE and reading the bank.
    'memory': dict({'num_layers': 2, 'attention.num_global_tokens': 0,
                    'memory.chunk_size': 8, 'memory.summary_tokens': 2,
                    'memory.summarizer_layers': 2, 'memory.summarizer_heads': 2,
                    'memory.bank_size': 4, 'memory.layers': (1,),
                    'memory.short_term_tokens': 2}),
    # Stacks `dense_layers` [1, ...] and `moe_layers` [2, ...].
    'scan_layers': dict({'scan_layers': True}),
}


def _random_params(module, seed=0):
  """Every param of `module`, random: shapes from its init, values from NumPy."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0),
                                        jnp.zeros((1, SEQ), jnp.int32))['params'])
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape).astype(np.float32)), shapes)


def _flat(params):
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    assert fa[name].dtype == fb[name].dtype == np.float32, name
    np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


@functools.partial(jax.jit, static_argnums=0)
def _forward(module, params, tokens):
  return module.apply({'params': params}, tokens, method='forward')


def _tokens():
  return jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, SEQ)), jnp.int32)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """case -> (module, params, directory it was saved to)."""
  out = {}
  for case, fields in CASES.items():
    module = build.make_model(_config(**fields))
    params = _random_params(module)
    path = str(tmp_path_factory.mktemp(case))
    problems = xenith.save_pretrained(path, module, params)
    assert problems == configs.export_problems(ml_collections.ConfigDict(module.config.to_dict())) != []
    out[case] = module, params, path
  return out


@pytest.mark.parametrize('case', list(CASES))
def test_round_trip_gives_the_same_model(saved, case):
  module, params, path = saved[case]
  config = json.load(open(os.path.join(path, 'config.json')))
  assert config['architectures'] == ['XenithForCausalLM']
  assert config['model_type'] == 'xenith' and config['dtype'] == 'float32'
  assert 'shared experts' in config['note']
  # Every param is a tensor named by its path, as it is (stacks keep their layer axis).
  with safetensors.safe_open(os.path.join(path, 'model.safetensors'), 'numpy') as f:
    stored = {name: f.get_tensor(name) for name in f.keys()}
  flat = _flat(params)
  assert sorted(stored) == sorted(flat)
  for name, x in flat.items():
    np.testing.assert_array_equal(stored[name], x, err_msg=name)
  if case == 'scan_layers':
    assert stored['moe_layers/moe/experts/gate'].shape == (2, 4, 32, 24)
  if case == 'memory':
    assert any(name.startswith('summarizer/') for name in stored)
  assert any('lora' in name for name in stored)

  module2, params2 = xenith.from_pretrained(path)
  assert type(module2).__name__ == type(module).__name__  # MemoryDecoder, LoRA-wrapped.
  assert module2.config.to_dict() == module.config.to_dict()
  _assert_same_params(params, params2)
  tokens = _tokens()
  ours, theirs = _forward(module, params, tokens), _forward(module2, params2, tokens)
  np.testing.assert_array_equal(np.asarray(theirs.logits), np.asarray(ours.logits))
  if case == 'memory':  # The state after two chunks (bank written and read) is equal too.
    assert isinstance(module2, memory.MemoryDecoder)
    for field, value in ours.memory.arrays().items():
      np.testing.assert_array_equal(np.asarray(getattr(theirs.memory, field)),
                                    np.asarray(value), err_msg=field)
    assert np.asarray(ours.memory.valid).any()


def test_load_options(saved, tmp_path):
  module, params, path = saved['scan_layers']
  module2, _ = xenith.from_pretrained(path, dtype='bfloat16', moe_dispatch='dense')
  assert module2.config.dtype == 'bfloat16' and module2.config.moe.dispatch == 'dense'
  assert module2.config.scan_layers
  with pytest.raises(HfFormatError, match='saved with scan_layers=True'):
    xenith.from_pretrained(path, scan_layers=False)
  assert xenith.load_config(path)['model_type'] == 'xenith'

  # bfloat16 tensors: read back as the model's float32 params, rounded.
  out = str(tmp_path / 'bf16')
  xenith.save_pretrained(out, module, params, dtype='bfloat16')
  assert xenith.load_config(out)['dtype'] == 'bfloat16'
  _, loaded = xenith.from_pretrained(out)
  _assert_same_params(jax.tree.map(
      lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params), loaded)


def _copy(path, tmp_path, name='copy'):
  out = str(tmp_path / name)
  shutil.copytree(path, out)
  return out


def test_damaged_checkpoints_are_refused_by_name(saved, tmp_path):
  _, _, path = saved['everything']
  tensors_file = os.path.join(path, 'model.safetensors')
  tensors = safetensors_numpy.load_file(tensors_file)
  query = 'block_1/attn/query/kernel'
  lora_b = next(n for n in sorted(tensors) if n.endswith('lora_b'))

  # Truncated file.
  out = _copy(path, tmp_path, 'truncated')
  data = open(tensors_file, 'rb').read()
  with open(os.path.join(out, 'model.safetensors'), 'wb') as f:
    f.write(data[:len(data) - 1000])
  with pytest.raises(HfFormatError, match='model.safetensors is truncated'):
    xenith.from_pretrained(out)

  # A missing tensor, an extra one, another shape: all named at once.
  out = _copy(path, tmp_path, 'edited')
  edited = dict(tensors)
  del edited[lora_b]
  edited['block_9/attn/query/kernel'] = tensors[query]
  edited[query] = tensors[query][:, :2]
  safetensors_numpy.save_file(edited, os.path.join(out, 'model.safetensors'))
  with pytest.raises(HfFormatError) as error:
    xenith.from_pretrained(out)
  message = str(error.value)
  assert '3 tensors do not fit the model' in message
  assert f'missing {lora_b} [' in message
  assert 'unexpected block_9/attn/query/kernel [32, 4, 8]' in message
  assert f"{query} has shape [32, 2, 8], the model's is [32, 4, 8]" in message

  # config.json edited: another width, a field this Xenith lacks, a newer format.
  for edit, expected in (
      (lambda c: c['xenith_model_config'].update(embed_dim=64), 'tensors do not fit'),
      (lambda c: c['xenith_model_config']['moe'].update(new_knob=1),
       'xenith_model_config.moe.new_knob is no field'),
      (lambda c: c['xenith_model_config'].update(num_layers='three'),
       'xenith_model_config.num_layers=.three. does not fit'),
      (lambda c: c.update(xenith_format=99), 'native format 99'),
  ):
    out = _copy(path, tmp_path, 'config')
    config = json.load(open(os.path.join(out, 'config.json')))
    edit(config)
    json.dump(config, open(os.path.join(out, 'config.json'), 'w'))
    with pytest.raises(HfFormatError, match=expected):
      xenith.from_pretrained(out)
    shutil.rmtree(out)

  # Read as a Hugging Face checkpoint (import_hf does).
  with pytest.raises(HfFormatError, match='Xenith-native checkpoint.*from_pretrained'):
    convert.load_hf(path)


def test_save_refuses_params_that_do_not_fit(saved, tmp_path):
  module, params, _ = saved['everything']
  flat = traverse_util.flatten_dict(params)
  del flat[('block_2', 'moe', 'shared', 'gate', 'kernel')]
  flat[('block_0', 'extra')] = jnp.zeros(3)
  out = tmp_path / 'out'
  with pytest.raises(HfFormatError, match='do not fit the module.*missing block_2/moe/'
                     'shared/gate/kernel.*unexpected block_0/extra'):
    xenith.save_pretrained(str(out), module, traverse_util.unflatten_dict(flat))
  assert not out.exists()
  with pytest.raises(HfFormatError, match='no Mistral/Mixtral equivalent: .*LoRA adapters'):
    xenith.save_pretrained(str(out), module, params, native=False)


def _mistral_like():
  """A model HF expresses: dense, rmsnorm, plain RoPE, one window, untied, no adapters."""
  model = config_defaults.get_config().model
  model.update(dict(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48, tie_embeddings=False))
  model.attention.window_sizes = (8,)
  model.lora.rank = 0
  return model


def test_hf_expressible_models_keep_the_hf_format(tmp_path, monkeypatch):
  module = build.make_model(_mistral_like())
  params = _random_params(module)
  assert xenith.save_pretrained(str(tmp_path / 'hf'), module, params) == []
  config = json.load(open(tmp_path / 'hf' / 'config.json'))
  assert config['model_type'] == 'mistral' and config['sliding_window'] == 8
  assert 'model.layers.1.mlp.down_proj.weight' in safetensors_numpy.load_file(
      str(tmp_path / 'hf' / 'model.safetensors'))
  _, params2 = xenith.from_pretrained(str(tmp_path / 'hf'))
  _assert_same_params(params, params2)

  # Asked for, the native format holds it too.
  assert xenith.save_pretrained(str(tmp_path / 'native'), module, params, native=True) == []
  assert xenith.load_config(str(tmp_path / 'native'))['model_type'] == 'xenith'
  _, params2 = xenith.from_pretrained(str(tmp_path / 'native'))
  _assert_same_params(params, params2)

  # Params the HF mapping has no tensor for are never dropped: should the exportability
  # check miss a feature (here: LoRA), the native format is written.
  model = _mistral_like()
  model.lora.rank = 2
  module = build.make_model(model)
  params = _random_params(module)
  monkeypatch.setattr(configs, 'export_problems', lambda model: [])
  problems = xenith.save_pretrained(str(tmp_path / 'lora'), module, params)
  assert 'params without a Mistral/Mixtral tensor (block_0/attn/key/lora_a' in problems[0]
  _, params2 = xenith.from_pretrained(str(tmp_path / 'lora'))
  _assert_same_params(params, params2)


def test_main_export_hf_writes_the_native_format(saved, tmp_path):
  """export_hf of a workdir whose model HF cannot express writes the native format and
  logs why; from_pretrained reads the run's params back."""
  module, params, _ = saved['memory']
  workdir, out = tmp_path / 'run', str(tmp_path / 'export')
  config = config_defaults.get_config()
  config.model = ml_collections.ConfigDict(module.config.to_dict())
  from xenith.train import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.save_params(str(workdir / 'checkpoints' / '1' / 'state'), params)
  (workdir / hf_workdir.CONFIG_JSON).write_text(json.dumps(
      hf_workdir.config_overrides(config)))
  result = subprocess.run(
      [sys.executable, 'main.py', '--mode=export_hf', f'--workdir={workdir}',
       f'--hf_dir={out}'], cwd=REPO, env=single_device_env(), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "in Xenith's native format" in result.stdout
  assert ('Mistral/Mixtral cannot express this model (norm=\'layernorm\' (HF has '
          "rmsnorm); rope_scaling.type='yarn'; LoRA adapters") in result.stderr
  assert 'chunk-summary memory' in result.stderr
  module2, params2 = xenith.from_pretrained(out)
  assert module2.config.to_dict() == module.config.to_dict()
  _assert_same_params(params, params2)


def test_adapters_given_only_by_target_ranks_are_not_exportable_to_hf():
  """lora.rank=0 with target_ranks.query > 0 still has adapters HF cannot hold."""
  model = config_defaults.get_config().model
  assert configs.export_problems(model) == []
  model.lora.target_ranks.query = 2
  assert any('LoRA' in p for p in configs.export_problems(model))
