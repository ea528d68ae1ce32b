"""bench/hf_compare.py: the HF side's learning-rate schedule against optax's, config
overrides reaching both models, and (slow) `--check` and a timed run on a tiny dense
config, each framework in its own child process."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from xenith.train import optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')
sys.path.insert(0, BENCH)

import hf_compare  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = '--config=experiments/default.py:size=tiny'


@pytest.mark.parametrize('warmup_steps', [0, 50])
def test_learning_rate_follows_the_train_loops_schedule(warmup_steps):
  config = hf_compare.experiment_config(
      'experiments/default.py', [f'optimizer.warmup_steps={warmup_steps}'])
  opt = hf_compare.hf_spec(config)['optimizer']
  reference = optimizer.learning_rate_schedule(config)
  for step in (0, 1, 25, 49, 50, 51, 200, 349, 350, 400):
    assert math.isclose(hf_compare.learning_rate(step, opt), float(reference(step)),
                        rel_tol=1e-6, abs_tol=1e-12), step


def test_overrides_shape_both_models():
  args = hf_compare.parse_args(['--model=dense', TINY, '--config.model.embed_dim=96',
                                '--config.model.tie_embeddings=False', '--config.max_seq_len=48'])
  spec = hf_compare.hf_spec(hf_compare.config_for(args))
  hf = spec['hf_config']
  assert hf['architectures'] == ['MistralForCausalLM']
  assert (hf['hidden_size'], hf['tie_word_embeddings'], hf['num_hidden_layers']) == (96, False, 2)
  assert (spec['batch'], spec['seq'], hf['max_position_embeddings']) == (8, 48, 64)
  assert args.json.endswith('hf_compare_dense.json')


def test_refusals():
  with pytest.raises(SystemExit, match='MoE model'):
    hf_compare.config_for(hf_compare.parse_args(
        ['--model=dense', TINY, '--config.model.moe.num_experts=4']))
  with pytest.raises(SystemExit):  # argparse: --config is for --model=dense.
    hf_compare.parse_args([TINY])


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, os.path.join(BENCH, 'hf_compare.py'), '--model=dense',
                         TINY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.mark.slow
def test_check_same_weights_give_the_same_losses_through_an_update():
  # Untied, with the full learning rate at step 1: every step agrees, not only the first.
  proc = _run('--check', '--steps=1', '--warmup=0', '--config.model.tie_embeddings=False',
              '--config.optimizer.warmup_steps=1')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'PASS' in proc.stdout
  rows = re.findall(r'^\| (\d) \| ([\d.]+) \| ([\d.]+) \|', proc.stdout, re.M)
  assert [r[0] for r in rows] == ['0', '1']
  for _, xenith_loss, hf_loss in rows:
    assert abs(float(xenith_loss) - float(hf_loss)) < 1e-5


@pytest.mark.slow
def test_timed_run_writes_json(tmp_path):
  path = tmp_path / 'dense.json'
  proc = _run('--rounds=1', '--steps=1', '--warmup=0', f'--json={path}')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert '| tokens/s, median |' in proc.stdout
  out = json.loads(path.read_text())
  assert out['params_equal'] and out['machine']['cpu']
  assert [r['framework'] for r in out['runs']] == ['xenith', 'hf']
  assert out['summary']['hf']['settings']['torch_threads'] >= 1
  assert out['shape']['architecture'] == 'MistralForCausalLM'
