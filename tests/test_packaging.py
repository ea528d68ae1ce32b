"""`pip install -e .` (launch/setup.sh): xenith and the experiment configs import from any
directory, from this checkout."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_xenith_imports_from_another_directory(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
      [sys.executable, '-c', 'import importlib.metadata, xenith, xenith.model.build, '
       'experiments.default; print(xenith.__file__); print(experiments.default.__file__); '
       'print(importlib.metadata.version("xenith"))'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  xenith_file, default_file, version = result.stdout.split()
  assert pathlib.Path(xenith_file) == ROOT / 'xenith' / '__init__.py'
  assert pathlib.Path(default_file) == ROOT / 'experiments' / 'default.py'
  assert version == '0.1.0'
