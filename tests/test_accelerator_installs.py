"""The GPU/TPU requirement files and `launch/setup.sh --gpu / --tpu`, without installing.

setup.sh runs against a stand-in venv whose `bin/python` records its arguments, so the
test sees which requirement files pip would get and nothing is downloaded.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, 'launch', 'setup.sh')
# A pin `name[extras]==version`; the rest of the line (comments) is ignored.
PIN = re.compile(r'^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)')


def _pins(name: str) -> dict[str, tuple[str, str]]:
  """{package: (extras, version)} of a requirements file in the repository root."""
  pins = {}
  with open(os.path.join(ROOT, name), encoding='utf-8') as f:
    for line in f:
      match = PIN.match(line.strip())
      if match:
        pins[match.group(1).lower()] = (match.group(2) or '', match.group(3))
  return pins


def test_accelerator_pins_use_the_cpu_jax_version():
  cpu = _pins('requirements.txt')
  jax_version = cpu['jax'][1]
  assert cpu['jaxlib'][1] == jax_version
  gpu, tpu = _pins('requirements-gpu.txt'), _pins('requirements-tpu.txt')
  assert gpu['jax'] == ('[cuda12]', jax_version)
  assert gpu['jax-cuda12-plugin'][1] == jax_version
  assert gpu['jax-cuda12-pjrt'][1] == jax_version
  assert tpu['jax'] == ('[tpu]', jax_version)
  assert 'libtpu' in tpu
  # Nothing else: the accelerator files add a backend, they do not move other pins.
  assert set(gpu) == {'jax', 'jax-cuda12-plugin', 'jax-cuda12-pjrt'}
  assert set(tpu) == {'jax', 'libtpu'}


def _fake_venv(tmp_path) -> tuple[str, str]:
  """A venv whose python logs each call's arguments (one line per call) and exits 0."""
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  log = tmp_path / 'calls.txt'
  python = venv / 'bin' / 'python'
  python.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
  python.chmod(0o755)
  return str(venv), str(log)


def _setup(tmp_path, *args):
  venv = str(tmp_path / 'venv')
  return subprocess.run([SETUP, *args], env={**os.environ, 'XENITH_VENV': venv},
                        capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize('args,files', [
    ((), ['requirements.txt']),
    (('requirements-test.txt',), ['requirements.txt', 'requirements-test.txt']),
    (('--gpu',), ['requirements.txt', 'requirements-gpu.txt']),
    (('--tpu', 'requirements-test.txt'),
     ['requirements.txt', 'requirements-tpu.txt', 'requirements-test.txt']),
])
def test_setup_installs_requirements_txt_plus_the_chosen_files(tmp_path, args, files):
  venv, log = _fake_venv(tmp_path)
  result = _setup(tmp_path, *args)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == f'{venv}/bin/python'
  install = [line for line in open(log).read().splitlines() if ' -r ' in line]
  assert len(install) == 1
  assert re.findall(r'-r (\S+)', install[0]) == [os.path.join(ROOT, f) for f in files]


@pytest.mark.parametrize('args,message', [
    (('--bogus',), "unknown flag '--bogus'"),
    (('--gpu', '-x'), "unknown flag '-x'"),
    (('--gpu', '--tpu'), '--gpu and --tpu exclude each other'),
    (('requirements-nope.txt',), "no requirements file 'requirements-nope.txt'"),
])
def test_setup_rejects_bad_arguments_before_creating_anything(tmp_path, args, message):
  result = _setup(tmp_path, *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == ''
  assert not os.path.exists(tmp_path / 'venv')
