"""The suite fails on a skip that tests/conftest.py does not allow (a missing test
dependency must not make tests vanish), and says how many tests it skipped."""

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_an_unexpected_skip_fails_the_run_and_is_named(tmp_path):
  (tmp_path / 'test_probe.py').write_text(
      'import pytest\n\n'
      'def test_runs():\n  pass\n\n'
      'def test_needs_a_missing_package():\n'
      "  pytest.importorskip('no_such_package_xenith')\n")
  # This directory's conftest as a plugin: its hooks judge the probe's session.
  env = {**os.environ, 'PYTHONPATH': TESTS}
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-p', 'conftest', '-q', '-p', 'no:cacheprovider',
       str(tmp_path / 'test_probe.py')],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stdout
  assert 'Skipped tests: 1 (1 unexpected' in result.stdout
  assert "UNEXPECTED SKIP test_probe.py::test_needs_a_missing_package" in result.stdout
  assert 'no_such_package_xenith' in result.stdout
