"""What main.py prints: one clean line for bad config input, no library chatter unless
--verbosity=1. (The per-step lines of a training run: tests/test_train.py.)"""

import os
import re
import subprocess
import sys

import pytest

from helpers import single_device_env
from xenith.train import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ')  # absl's default line.


def _main(*args):
  # A user's shell: one CPU device, and none of conftest's settings that quiet JAX and
  # TensorFlow (JAX_PLATFORMS skips the backend probing, TF_CPP_MIN_LOG_LEVEL).
  env = {k: v for k, v in single_device_env().items()
         if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL')}
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('args,line', [
    (('--config=experiments/default.py:size=tiny', '--config.model.num_head=3'),
     'Invalid config: config.model.num_head: no such field; did you mean num_heads?'),
    (('--config=experiments/default.py:size=tiny', '--config.modle.num_heads=3'),
     'Invalid config: config.modle: no such field; did you mean model?'),
    (('--config', 'experiments/default.py:size=huge'),
     "Invalid config: --config=experiments/default.py:size=huge: Unknown size 'huge'; "
     "choose one of ['base', 'small', 'tiny']."),
    (('--config=experiments/xenith_mini.py', '--mode=describe'),
     'Invalid config: config.mesh: data=1 x tensor=1 x expert=8 = 8 devices is larger than '
     'the 1 available; describe sizes it for another machine with --num_devices=N (e.g. '
     '--num_devices=8)'),
])
def test_bad_config_input_is_one_line(tmp_path, args, line):
  result = _main(*args, f'--workdir={tmp_path}/run')
  assert result.returncode != 0
  assert result.stderr.strip() == line  # The whole of stderr: no traceback, no chatter.
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.slow
def test_library_chatter_only_with_verbosity(tmp_path):
  # Two steps of training import everything (TensorFlow via CLU, TFDS, Orbax, grain):
  # every line is Xenith's own, `HH:MM:SS message`.
  run = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}',
              '--config.num_train_steps=2', '--config.optimizer.warmup_steps=1',
              '--config.num_eval_batches=1')
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stderr.splitlines()
  assert lines and all(re.match(r'\d\d:\d\d:\d\d \S', line) for line in lines), lines
  assert not any(re.search(r'oneDNN|backend|dataset_info|Setting work unit|\[\d+\] train/',
                           line) for line in lines), lines
  quiet = _main('--config=experiments/default.py:size=tiny', '--mode=describe')
  assert quiet.returncode == 0 and 'total parameters' in quiet.stdout, quiet.stderr
  assert quiet.stderr == ''  # JAX's backend probing is off.
  loud = _main('--config=experiments/default.py:size=tiny', '--mode=describe',
               '--verbosity=1')
  assert loud.returncode == 0 and loud.stdout == quiet.stdout
  chatter = [line for line in loud.stderr.splitlines() if ABSL_PREFIX.match(line)]
  assert any('xla_bridge.py' in line for line in chatter), loud.stderr[-2000:]


@pytest.mark.parametrize('seconds,text', [
    (0, '0s'), (9.4, '9s'), (59.6, '1m00s'), (125, '2m05s'), (3599, '59m59s'),
    (7322, '2h02m'), (90061, '25h01m')])
def test_durations(seconds, text):
  assert progress.duration(seconds) == text
