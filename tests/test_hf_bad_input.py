"""Bad Hugging Face checkpoints (xenith/hf/): each fails `main.py --mode=import_hf` with one
`HfFormatError:` line naming the file (and the tensor, with expected and found shape)
before anything is written to the workdir; exports are written atomically."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
import torch
import transformers

import xenith
from xenith.errors import HfFormatError
from xenith import hf
from xenith.hf import safetensors_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = safetensors_io.CONFIG_FILE
WEIGHTS = safetensors_io.SAFETENSORS_FILE
INDEX = safetensors_io.INDEX_FILE


def _save(kind: str, path: str, **save_kwargs) -> None:
  """A tiny random Mistral or Mixtral (hidden 32, 2 layers, intermediate 48, vocab 64)."""
  common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, intermediate_size=48, vocab_size=64)
  torch.manual_seed(0)
  if kind == 'mixtral':
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_local_experts=4, num_experts_per_tok=2, **common))
  else:
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
  model.save_pretrained(path, **save_kwargs)


@pytest.fixture(scope='module')
def good(tmp_path_factory):
  """kind -> a directory holding a valid checkpoint ('mistral', 'mixtral', 'sharded')."""
  out = {}
  for kind, kwargs in (('mistral', {}), ('mixtral', {}),
                       ('sharded', {'max_shard_size': '20KB'})):
    out[kind] = str(tmp_path_factory.mktemp(kind))
    _save('mixtral' if kind == 'sharded' else kind, out[kind], **kwargs)
  return out


def _copy(good, kind, tmp_path) -> str:
  path = str(tmp_path / 'hf')
  shutil.copytree(good[kind], path)
  return path


def _edit_config(path: str, **fields) -> None:
  """Sets (value not None) or removes (None) the fields of `path`/config.json."""
  config = json.load(open(os.path.join(path, CONFIG)))
  config.update(fields)
  config = {k: v for k, v in config.items() if v is not None}
  with open(os.path.join(path, CONFIG), 'w') as f:
    json.dump(config, f)


def _edit_tensors(path: str, edit) -> None:
  """Rewrites `path`/model.safetensors with `edit` (dict -> None) applied to its tensors."""
  filename = os.path.join(path, WEIGHTS)
  tensors = safetensors_numpy.load_file(filename)
  edit(tensors)
  safetensors_numpy.save_file(tensors, filename, metadata={'format': 'pt'})


def _import_fails(hf_dir: str, tmp_path) -> str:
  """Runs main.py --mode=import_hf into an empty workdir; its one HfFormatError line.

  Checks the exit status 1, one error line as the last line of stderr, no traceback, and
  that nothing was written into the workdir.
  """
  workdir = tmp_path / 'run'
  workdir.mkdir()
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'main.py'), '--mode=import_hf',
       f'--hf_dir={hf_dir}', f'--workdir={workdir}'],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr[-4000:]
  assert 'Traceback' not in result.stderr, result.stderr[-4000:]
  assert lines and lines[-1].startswith('HfFormatError: '), result.stderr[-4000:]
  assert sum('HfFormatError' in line for line in lines) == 1, result.stderr[-4000:]
  assert os.listdir(workdir) == []
  return lines[-1]


def _import_damaged(good, tmp_path, damage, message: str) -> tuple[str, str]:
  """(the error line of importing a copy of the Mistral checkpoint after `damage` (a
  function of the copy's path, or config.json fields to set, None to remove),
  'HfFormatError: ' + `message` with {config} / {weights} replaced by the copy's files)."""
  path = _copy(good, 'mistral', tmp_path)
  if isinstance(damage, dict):
    _edit_config(path, **damage)
  else:
    damage(path)
  for field, name in (('{config}', CONFIG), ('{weights}', WEIGHTS)):
    message = message.replace(field, os.path.join(path, name))
  return _import_fails(path, tmp_path), 'HfFormatError: ' + message


# Case 1: config.json.

def _truncate_config(path):
  text = open(os.path.join(path, CONFIG)).read()
  with open(os.path.join(path, CONFIG), 'w') as f:
    f.write(text[:len(text) // 2])


def _list_config(path):
  with open(os.path.join(path, CONFIG), 'w') as f:
    f.write('[1, 2]\n')


_BAD_CONFIGS = {
    'truncated': (_truncate_config, '{config} is not valid JSON (truncated?): '),
    'not_an_object': (_list_config, '{config} holds a JSON list; expected an object'),
    'no_hidden_size': ({'hidden_size': None},
                       "{config}: missing the required key 'hidden_size'."),
    'kv_heads_do_not_divide': (
        {'num_key_value_heads': 3},
        '{config}: num_attention_heads=4 is not divisible by num_key_value_heads=3.'),
    'heads_do_not_divide_hidden': (
        {'num_attention_heads': 6, 'head_dim': None},
        '{config}: hidden_size=32 is not divisible by num_attention_heads=6, and there '
        'is no head_dim.'),
    'size_not_an_integer': ({'intermediate_size': '48'},
                            "{config}: intermediate_size must be a positive integer, "
                            "found '48'."),
}


@pytest.mark.parametrize('case', sorted(_BAD_CONFIGS))
def test_bad_config_json(good, tmp_path, case):
  line, expected = _import_damaged(good, tmp_path, *_BAD_CONFIGS[case])
  assert line.startswith(expected)  # After it, the JSON parser's words.


# Case 2: safetensors files.

def _header(filename):
  with open(filename, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    return n, json.loads(f.read(n))


def test_truncated_safetensors(good, tmp_path):
  path = _copy(good, 'mistral', tmp_path)
  filename = os.path.join(path, WEIGHTS)
  header_len, header = _header(filename)
  last = max((k for k in header if k != '__metadata__'),
             key=lambda k: header[k]['data_offsets'][1])
  size = os.path.getsize(filename)
  os.truncate(filename, size - 100)
  line = _import_fails(path, tmp_path)
  assert line == (
      f'HfFormatError: {filename} is truncated: tensor {last} {header[last]["shape"]} ends '
      f'at data byte {size - 8 - header_len}, the file has {size - 108 - header_len} bytes '
      'of data.')


@pytest.mark.parametrize('case', ['random_bytes', 'header_not_json', 'shorter_than_8'])
def test_garbage_safetensors(good, tmp_path, case):
  path = _copy(good, 'mistral', tmp_path)
  filename = os.path.join(path, WEIGHTS)
  garbage = {
      # Its first 8 bytes read as a header length of petabytes.
      'random_bytes': np.random.RandomState(0).bytes(4096),
      'header_not_json': struct.pack('<Q', 16) + b'\x00garbage' * 64,
      'shorter_than_8': b'abc',
  }[case]
  with open(filename, 'wb') as f:
    f.write(garbage)
  line = _import_fails(path, tmp_path)
  assert line.startswith(f'HfFormatError: {filename} is not a safetensors file')
  assert {'random_bytes': 'its header length field says',
          'header_not_json': 'its header is not JSON',
          'shorter_than_8': '3 bytes, shorter than the 8-byte header length'}[case] in line


def test_missing_shard(good, tmp_path):
  path = _copy(good, 'sharded', tmp_path)
  weight_map = json.load(open(os.path.join(path, INDEX)))['weight_map']
  shard = sorted(set(weight_map.values()))[-1]
  first = min(k for k, v in weight_map.items() if v == shard)
  os.remove(os.path.join(path, shard))
  line = _import_fails(path, tmp_path)
  assert line == (f'HfFormatError: {os.path.join(path, shard)} is missing; '
                  f'{os.path.join(path, INDEX)} names it for tensor {first}.')


def test_shard_without_the_tensor_its_index_names(good, tmp_path):
  path = _copy(good, 'sharded', tmp_path)
  index = json.load(open(os.path.join(path, INDEX)))
  weight_map = index['weight_map']
  other = sorted(set(weight_map.values()) - {weight_map['model.norm.weight']})[0]
  weight_map['model.norm.weight'] = other
  with open(os.path.join(path, INDEX), 'w') as f:
    json.dump(index, f)
  with pytest.raises(HfFormatError) as error:
    xenith.from_pretrained(path)
  assert str(error.value) == (f'{os.path.join(path, other)} has no tensor model.norm.weight, '
                              f'which {os.path.join(path, INDEX)} puts there.')


# Case 3: tensors that do not fit config.json.

def _delete(name):
  return lambda tensors: tensors.pop(name)


def _add(name, shape):
  return lambda tensors: tensors.update({name: np.zeros(shape, np.float32)})


_MISFITS = {
    'intermediate_size': (
        {'intermediate_size': 40},
        '{weights}: tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32]; '
        'config.json implies [40, 32] = [intermediate_size, hidden_size]. '
        '(5 more tensors do not fit.)'),
    'vocab_size': (
        {'vocab_size': 80},
        '{weights}: tensor model.embed_tokens.weight has shape [64, 32]; config.json '
        'implies [80, 32] = [vocab_size, hidden_size]. (1 more tensor does not fit.)'),
    'missing_tensor': (
        lambda p: _edit_tensors(p, _delete('model.layers.1.mlp.down_proj.weight')),
        '{weights}: tensor model.layers.1.mlp.down_proj.weight is missing; config.json '
        'implies [32, 48] = [hidden_size, intermediate_size].'),
    'extra_tensor': (
        lambda p: _edit_tensors(p, _add('model.layers.2.mlp.up_proj.weight', (48, 32))),
        '{weights}: unexpected tensor model.layers.2.mlp.up_proj.weight [48, 32]; '
        'config.json implies no such tensor.'),
    'num_hidden_layers': (
        {'num_hidden_layers': 3},
        '{weights}: tensor model.layers.2.self_attn.q_proj.weight is missing; config.json '
        'implies [32, 32] = [num_attention_heads*head_dim, hidden_size]. '
        '(8 more tensors do not fit.)'),
    'head_dim': (
        {'head_dim': 4},
        '{weights}: tensor model.layers.0.self_attn.q_proj.weight has shape [32, 32]; '
        'config.json implies [16, 32] = [num_attention_heads*head_dim, hidden_size]. '
        '(7 more tensors do not fit.)'),
}


@pytest.mark.parametrize('case', sorted(_MISFITS))
def test_tensors_that_do_not_fit_the_config(good, tmp_path, case):
  line, expected = _import_damaged(good, tmp_path, *_MISFITS[case])
  assert line == expected


def test_mixtral_experts_that_do_not_fit(good, tmp_path):
  path = _copy(good, 'mixtral', tmp_path)
  _edit_config(path, num_local_experts=3)
  line = _import_fails(path, tmp_path)
  assert line.startswith(
      f'HfFormatError: {os.path.join(path, WEIGHTS)}: tensor '
      'model.layers.0.block_sparse_moe.gate.weight has shape [4, 32]; config.json '
      'implies [3, 32] = [num_local_experts, hidden_size].')


def test_sharded_misfit_names_the_shard(good, tmp_path):
  path = _copy(good, 'sharded', tmp_path)
  _edit_config(path, intermediate_size=40)
  weight_map = json.load(open(os.path.join(path, INDEX)))['weight_map']
  with pytest.raises(HfFormatError) as error:
    xenith.from_pretrained(path)
  name = 'model.layers.0.block_sparse_moe.experts.0.w1.weight'
  assert str(error.value).startswith(
      f'{os.path.join(path, weight_map[name])}: tensor {name} has shape [48, 32]; '
      'config.json implies [40, 32]')


def test_rotary_inv_freq_buffers_are_ignored(good, tmp_path):
  path = _copy(good, 'mistral', tmp_path)
  _edit_tensors(path, _add('model.layers.0.self_attn.rotary_emb.inv_freq', (4,)))
  module, _ = xenith.from_pretrained(path)
  assert module.config.num_layers == 2


# Case 4: exports are atomic.

def _listing(path):
  return sorted(os.listdir(path))


def test_failed_export_writes_nothing(good, tmp_path, monkeypatch):
  """An export that fails while writing the tensors leaves no config.json, no partial
  model.safetensors and no temporary file; into an existing export, that export stays."""
  module, params = xenith.from_pretrained(good['mistral'])

  def fail_half_way(tensors, filename, metadata=None):
    del tensors, metadata
    with open(filename, 'wb') as f:
      f.write(b'partial')
    raise OSError('No space left on device')

  monkeypatch.setattr(safetensors_io.safetensors_numpy, 'save_file', fail_half_way)
  out = tmp_path / 'out'
  with pytest.raises(OSError, match='No space left'):
    xenith.save_pretrained(str(out), module, params)
  assert not out.exists() or _listing(out) == []

  monkeypatch.undo()
  xenith.save_pretrained(str(out), module, params)
  before = {n: (out / n).read_bytes() for n in _listing(out)}
  assert sorted(before) == [CONFIG, WEIGHTS]
  monkeypatch.setattr(safetensors_io.safetensors_numpy, 'save_file', fail_half_way)
  with pytest.raises(OSError, match='No space left'):
    xenith.save_pretrained(str(out), module, params, dtype='bfloat16')
  assert {n: (out / n).read_bytes() for n in _listing(out)} == before


def test_export_over_a_sharded_checkpoint_removes_its_index_and_shards(good, tmp_path):
  out = _copy(good, 'sharded', tmp_path)
  module, params = xenith.from_pretrained(out)
  xenith.save_pretrained(out, module, params)
  assert _listing(out) == [CONFIG, 'generation_config.json', WEIGHTS]
  module2, params2 = xenith.from_pretrained(out)
  assert module2.config.moe.num_experts == 4
  np.testing.assert_array_equal(params2['block_1']['moe']['experts']['down'],
                                params['block_1']['moe']['experts']['down'])


def test_a_stale_shard_beside_model_safetensors_is_named(good, tmp_path):
  """Without an index every *.safetensors file is read; one tensor in two is refused."""
  path = _copy(good, 'mistral', tmp_path)
  shutil.copy(os.path.join(path, WEIGHTS), os.path.join(path, 'old.safetensors'))
  with pytest.raises(HfFormatError, match='is in both .*model.safetensors and .*old'):
    xenith.from_pretrained(path)


def test_import_leaves_no_temporary_files(good, tmp_path):
  workdir = tmp_path / 'run'
  hf.import_to_workdir(good['mistral'], str(workdir))
  assert _listing(workdir) == ['checkpoints', 'config.py', 'hf_config.json',
                               'xenith_config.json']
  assert json.load(open(workdir / 'hf_config.json')) == xenith.load_config(good['mistral'])
