"""Config validation: each contradiction ends with one line naming the field."""

import os
import subprocess
import sys

import pytest

from experiments import default
from xenith.config_validation import ConfigError, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
  return default.get_config('size=tiny')


def _tiny_with(field, value):
  """The tiny config with the dotted `field` set to `value`."""
  config = node = _tiny()
  *parents, leaf = field.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = value
  return config


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_default_sizes_are_valid(size):
  validate(default.get_config(f'size={size}'), num_devices=8)


@pytest.mark.parametrize('field,value,message', [
    ('model.num_kv_heads', 3, r'config.model.num_heads: 4 must be divisible by '
                              r'config.model.num_kv_heads=3'),
    ('model.norm', 'batchnorm', r'config.model.norm: .* must be one of'),
    ('model.dtype', 'float16', r'config.model.dtype'),
    ('model.remat', 'sometimes', r'config.model.remat'),
    ('model.head_dim', 15, r'config.model.head_dim: 15 must be even'),
    ('global_batch_size', 12, r'config.global_batch_size: 12 must be divisible by the '
                              r'batch parallelism 8'),
    ('num_train_steps', 0, r'config.num_train_steps'),
    ('on_nonfinite', 'ignore', r'config.on_nonfinite'),
    ('max_consecutive_nonfinite', 0, r'config.max_consecutive_nonfinite: 0 must be a '
                                     'positive int'),
    ('optimizer.warmup_steps', 10**9, r'config.optimizer.warmup_steps'),
    ('optimizer.b1', 1.0, r'config.optimizer.b1: 1.0 must be in \[0, 1\)'),
    ('optimizer.b2', -0.5, r'config.optimizer.b2: -0.5 must be in \[0, 1\)'),
    ('optimizer.eps', -1e-8, r'config.optimizer.eps: -1e-08 must be >= 0'),
    ('data.source', 'c4', r'config.data.source'),
    ('data.tokenizer', '/no/such/file.model', r'config.data.tokenizer'),
    ('mesh.tensor', 16, r'config.mesh: .* is larger than the 8 available'),
])
def test_invalid_field_is_named(field, value, message):
  with pytest.raises(ConfigError, match=message):
    validate(_tiny_with(field, value), num_devices=8)


@pytest.mark.parametrize('field', [
    'optimizer.learning_rate', 'optimizer.weight_decay', 'optimizer.grad_clip_norm',
    'optimizer.b1', 'optimizer.b2', 'optimizer.eps', 'model.dropout_rate',
    'model.moe.load_balance_loss_weight', 'model.moe.router_z_loss_weight',
    'model.rope_theta', 'peak_flops_per_device'])
@pytest.mark.parametrize('value', [float('inf'), float('-inf'), float('nan')])
def test_non_finite_float_fields_are_refused(field, value):
  with pytest.raises(ConfigError, match=rf'^config\.{field}: {value!r} must be a finite '
                                        r'number$'):
    validate(_tiny_with(field, value), num_devices=8)


def test_folder_source_needs_a_folder(tmp_path):
  config = _tiny()
  config.data.source = 'folder'
  config.data.path = str(tmp_path / 'missing')
  with pytest.raises(ConfigError, match='config.data.path'):
    validate(config, num_devices=1)


def test_config_argument_errors():
  with pytest.raises(ValueError, match='Unknown size'):
    default.get_config('size=huge')
  with pytest.raises(ValueError, match='Unknown config argument'):
    default.get_config('depth=3')


def _main(*args):
  return subprocess.run(
      [sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})


@pytest.mark.parametrize('override,message', [
    ('--config.model.num_kv_heads=3', 'Invalid config: config.model.num_heads: 4 must be '
                                      'divisible by config.model.num_kv_heads=3'),
    ('--config.mesh.data=16', 'Invalid config: config.mesh:'),
    ('--config.optimizer.learning_rate=inf', 'Invalid config: config.optimizer.learning_rate: '
                                             'inf must be a finite number'),
])
def test_main_rejects_bad_config_in_one_line(tmp_path, override, message):
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == next(
      line for line in result.stderr.splitlines() if line.startswith('Invalid config'))
  assert message in result.stderr
  assert not os.listdir(tmp_path), 'nothing may be written before validation passes'


def test_main_rejects_unknown_field(tmp_path):
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}',
                 '--config.model.num_experts=4')
  assert result.returncode != 0
  assert 'num_experts' in result.stderr.strip().splitlines()[-1]
