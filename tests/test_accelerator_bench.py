"""bench/accelerator.py, the accelerator ready check, on this CPU: `--smoke` runs every
section end to end with CLU, TensorFlow, grain, TFDS and SentencePiece made unimportable
(as on a bare GPU image) and writes valid JSON and Markdown; the time budget cuts
sections off; the CLU stand-in computes what CLU computes."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xenith.train import metrics as clu_metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')
sys.path.insert(0, BENCH)

import accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position
import clu_standin  # pylint: disable=g-import-not-at-top,wrong-import-position

# What a GPU image with jax, flax, optax, orbax-checkpoint and pytest lacks.
ABSENT = ('clu', 'tensorflow', 'tensorboard', 'grain', 'tensorflow_datasets',
          'array_record', 'sentencepiece', 'safetensors', 'torch', 'transformers')
# Loaded by every Python process the check starts (through PYTHONPATH).
SITECUSTOMIZE = f'''
import importlib.abc
import sys

class _Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {ABSENT!r}:
      raise ModuleNotFoundError(f'No module named {{name!r}} (absent on a GPU image)',
                                name=name)
    return None

sys.meta_path.insert(0, _Absent())
'''


def _run(tmp_path, *args):
  site = tmp_path / 'site'
  site.mkdir(exist_ok=True)
  (site / 'sitecustomize.py').write_text(SITECUSTOMIZE)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = str(site)
  json_path, md_path = tmp_path / 'out' / 'check.json', tmp_path / 'out' / 'check.md'
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, 'accelerator.py'), '--smoke',
       f'--json={json_path}', f'--markdown={md_path}', *args],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
  report = json.loads(json_path.read_text()) if json_path.exists() else None
  markdown = md_path.read_text() if md_path.exists() else None
  return proc, report, markdown


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  return _run(tmp_path_factory.mktemp('smoke'))


def test_the_import_blocker_works(tmp_path):
  proc, _, _ = _run(tmp_path, '--sections=bogus')  # Stops at the flag check.
  assert proc.returncode != 0 and 'Unknown section' in proc.stderr
  site = tmp_path / 'site'
  blocked = subprocess.run(
      [sys.executable, '-c', 'import clu.metrics'], env={**os.environ, 'PYTHONPATH': str(site)},
      capture_output=True, text=True, timeout=60, check=False)
  assert 'absent on a GPU image' in blocked.stderr


@pytest.mark.slow
def test_smoke_runs_every_section_without_clu_tensorflow_or_grain(smoke):
  proc, report, markdown = smoke
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  sections = report['sections']
  assert list(sections) == ['probe', *accelerator.SECTIONS]
  assert {name: s['status'] for name, s in sections.items()} == {
      name: 'ok' for name in sections}
  probe = sections['probe']['result']
  assert probe['platform'] == 'cpu' and probe['jax'] == jax.__version__
  assert probe['clu_metrics'].startswith('stand-in')

  for row in sections['tests']['result']['rows']:
    assert row['status'] == 'ok' and row['counts']['passed'] >= 1, row
    assert not row['counts'].get('failed') and not row['counts'].get('errors'), row
    assert row['clu_metrics'].startswith('stand-in'), row
  platforms = {row['platform'] for row in sections['tests']['result']['rows']}
  assert platforms == {'accelerator', 'cpu x8 (simulated)'}

  for name in ('mfu_dense', 'mfu_moe'):
    r = sections[name]['result']
    assert r['clu_metrics'].startswith('stand-in')
    assert r['dtype'] == 'bfloat16' and np.isfinite(r['final_loss'])
    assert 0 < r['mfu'] < 2 and r['step_time_median_s'] > 0 and r['compile_s'] > 0
    assert r['model_flops_per_step'] == pytest.approx(
        r['mfu'] * r['step_time_median_s'] * r['peak_flops_per_device'] * r['devices'])
  assert sections['mfu_moe']['result']['moe']['dispatch'] == 'dropless_gather'  # 'auto' on CPU.

  attention_rows = {r['implementation']: r for r in sections['attention']['result']['rows']}
  assert attention_rows['blockwise']['forward_backward_ms'] > 0
  assert 'cuDNN' in attention_rows['cudnn']['error']  # Recorded; the section goes on.

  moe_rows = {r['dispatch']: r for r in sections['moe_dispatch']['result']['rows']}
  assert set(moe_rows) == {'dense', 'dropless_ragged', 'dropless_gather', 'capacity'}
  scale = sections['moe_dispatch']['result']['dense_output_max_abs']
  for name, row in moe_rows.items():
    assert row['forward_backward_ms'] > 0 and row['dropped_fraction'] == 0, name
    if name != 'dense':
      assert row['max_abs_diff_vs_dense'] <= 0.02 * scale, (name, row)  # bf16 rounding.

  for heading in ('## Tests on the GPU paths', '## Train-step MFU', '## Attention kernel',
                  '## MoE layer dispatch'):
    assert heading in markdown
  assert '| dropless_ragged |' in markdown and '| 256 | blockwise |' in markdown


def test_a_spent_budget_stops_sections_and_still_writes_the_report(tmp_path):
  # 3 s: the probe gets 1 s (killed, jax takes longer to start), nothing is left for
  # mfu_dense.
  proc, report, markdown = _run(tmp_path, '--budget_s=3', '--sections=mfu_dense')
  assert proc.returncode == 1
  assert report['sections']['probe']['status'] == 'timeout'
  assert report['sections']['mfu_dense'] == {'status': 'skipped (time budget spent)'}
  assert report['seconds'] < 3
  assert '| mfu_dense | skipped (time budget spent) |' in markdown


def test_pytest_counts_from_the_summary_or_from_the_lines_of_a_cut_off_run():
  finished = ('tests/a.py::t[x y] PASSED  [ 50%]\n'
              '=== 3 passed, 1 failed, 2 errors, 5 deselected in 2.31s ===\n')
  assert accelerator.pytest_counts(finished) == {
      'passed': 3, 'failed': 1, 'errors': 2, 'deselected': 5}
  cut_off = ('tests/a.py::t[x y] PASSED  [ 33%]\ntests/a.py::u FAILED  [ 66%]\n'
             'tests/b.py::v PASSED\n')
  assert accelerator.pytest_counts(cut_off) == {'passed': 2, 'failed': 1}


def _metrics_module_with(module):
  """xenith/train/metrics.py loaded anew with `module` as clu.metrics."""
  saved = {name: sys.modules.get(name) for name in ('clu', 'clu.metrics')}
  package = type(sys)('clu')
  package.metrics = module
  sys.modules.update({'clu': package, 'clu.metrics': module})
  try:
    spec = importlib.util.spec_from_file_location('metrics_copy', clu_metrics_lib.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
  finally:
    for name, value in saved.items():
      if value is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = value
  return copy


def test_the_clu_stand_in_computes_what_clu_computes():
  standin = _metrics_module_with(clu_standin)

  def steps(lib, rng):
    total = None
    for finite in (True, False, True):
      m = lib.TrainMetrics.single_from_model_output(
          loss=jnp.float32(rng.normal()), grad_norm=jnp.float32(rng.random()),
          param_norm=jnp.float32(rng.random()), finite=jnp.asarray(finite),
          moe={'aux_loss': jnp.float32(rng.random()),
               'layer_1/expert_fraction': jnp.asarray(rng.random(4), jnp.float32)})
      total = m if total is None else total.merge(m)
    return jax.device_get(total.compute())

  def evals(lib, rng):
    weights = jnp.asarray(rng.random((3, 5)) > 0.3, jnp.float32)
    one = lambda: lib.EvalMetrics.single_from_model_output(
        loss=jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        correct=jnp.asarray(rng.random((3, 5)) > 0.5), mask=weights, moe={})
    return jax.device_get(one().merge(one()).compute())

  for run in (steps, evals):
    want = run(clu_metrics_lib, np.random.default_rng(0))
    got = run(standin, np.random.default_rng(0))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)
