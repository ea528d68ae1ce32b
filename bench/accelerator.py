"""A ready check for an accelerator host: GPU-path tests, train-step MFU, attention
kernels and MoE dispatch, in one command that fits a time budget.

  python bench/accelerator.py              # one H100/H200: at most --budget_s=280 s
  python bench/accelerator.py --smoke      # tiny shapes on any machine (a CPU): seconds

Sections, in order (`--sections` picks):
  tests         the test selections that exercise the GPU paths (cuDNN / blockwise
                attention, MoE dispatch with dropless_ragged, sharding) run by pytest on
                the accelerator (with fewer than 8 devices, two sharding tests run on 8
                simulated CPU devices instead); pass/fail counts per selection;
  mfu_dense     the real train step (xenith/train/steps.py) of a 1.01B dense model, bf16,
                8 x 2048 random tokens per device: step time and MFU (target >= 50%);
  mfu_moe       the same for a MoE model, 8 experts top-2 (target >= 40%);
  attention     causal attention forward + backward at 8k and 32k tokens, cuDNN vs
                blockwise, with the largest difference between their outputs;
  moe_dispatch  one MoE layer's forward + backward for each dispatch method.
MFU = model FLOPs (xenith/sizing/flops.py, PaLM's accounting) / step time / the vendor's
dense bf16 peak for the device (989 TFLOP/s for an H100 or H200 SXM).

Every section runs in its own process (`accelerator_child.py`, or pytest) under a time
limit: its share of what is left of --budget_s, so time a section does not use goes to
the later ones. A section that fails or runs out of time is recorded as such, with what
it finished, and the next one runs. Results: JSON (--json) and a Markdown table
(--markdown, also printed). Exit status 0 when every section ran and no test failed.

Needs jax, flax, optax, numpy, ml_collections, absl and pytest; not CLU, TensorFlow,
grain, TFDS or SentencePiece (`clu_standin.py` stands in for CLU's metrics), and it
installs nothing.
"""

import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_BENCH_DIR)

import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

# What share of the time left each section may take (the later sections' shares are
# the rest). The probe comes first, within its own limit.
SHARES = {'tests': 0.27, 'mfu_dense': 0.24, 'mfu_moe': 0.24, 'attention': 0.12,
          'moe_dispatch': 0.13}
SECTIONS = tuple(SHARES)
_PROBE_LIMIT_S = 90.0  # The first CUDA start-up can take tens of seconds.
_EXIT_S = 3.0  # Per child: its start-up and exit, not in its own clock.

_SMOKE = flags.DEFINE_bool(
    'smoke', False, 'Tiny shapes and test selections on any machine (a CPU): checks that '
    'every section runs end to end, in seconds.')
_BUDGET = flags.DEFINE_float('budget_s', 280.0, 'Seconds for the whole check.')
_SECTIONS = flags.DEFINE_list('sections', list(SECTIONS), f'Any of {SECTIONS}.')
_JSON = flags.DEFINE_string(
    'json', None, 'Where to write the JSON (default: bench/results/accelerator.json, '
    'accelerator_smoke.json with --smoke).')
_MARKDOWN = flags.DEFINE_string(
    'markdown', None, 'Where to write the Markdown (default: the JSON path with .md).')


@dataclasses.dataclass
class TestSelection:
  """One pytest run: what it covers, its arguments, and where JAX runs it."""
  name: str
  args: list[str]
  on_cpu: bool = False  # True: 8 simulated CPU devices instead of the accelerator.
  weight: float = 1.0  # Its share of the tests' time, against the later selections'.


def test_selections(device_count: int, accelerator: bool, smoke: bool) -> list[TestSelection]:
  """The tests that exercise the GPU paths. Tests that assume a CPU backend (e.g. that
  'auto' picks blockwise) are left out; the multi-device ones need 8 devices."""
  if smoke:  # The quickest test of each group: the plumbing, not the kernels.
    return [
        TestSelection('attention: the cuDNN kernel is the one named', [
            'tests/test_attention.py::'
            'test_a_kernel_named_by_a_string_built_at_run_time_is_the_one_run[cudnn]']),
        TestSelection('MoE: dropless_ragged runs when asked for', [
            'tests/test_moe.py::test_dispatch_runs_the_method_it_is_asked_for'
            '[dropless_ragged]']),
        TestSelection('sharding (8 simulated CPU devices)',
                      ['tests/test_sharding.py::test_mesh_fill_and_errors'], on_cpu=True),
    ]
  selections = [
      TestSelection('attention: cuDNN call, blockwise kernel', [
          'tests/test_attention.py', '-k',
          'cudnn or blockwise_matches or blockwise_bfloat16 or auto_picks'], weight=2.0),
      TestSelection('MoE dispatch: dropless_ragged, gather, capacity vs dense / NumPy', [
          'tests/test_moe.py', 'tests/test_moe_reference.py', '-k',
          '(dispatch or block_matches_numpy) and not expert_parallel and not invalid '
          'and not picks_gather_on_cpu']),
  ]
  if accelerator and device_count >= 8:
    selections.append(TestSelection('sharding: sharded step = one device, expert parallel', [
        'tests/test_sharding.py', 'tests/test_moe.py', '-k',
        'sharded_step or expert_parallel or mesh_fill or indivisible']))
  else:  # One accelerator cannot form the tests' 8-device meshes.
    selections.append(TestSelection('sharding (8 simulated CPU devices; < 8 accelerators)', [
        'tests/test_sharding.py::test_sharded_step_matches_single_device[mixed-False]',
        'tests/test_moe.py::test_expert_parallel_step_matches_single_device'
        '[dropless_ragged-data2-expert2-tensor2]'], on_cpu=True))
  return selections


def run_process(cmd: list[str], env: dict, timeout_s: float, logs: str, name: str):
  """Runs `cmd` from the repository root for at most `timeout_s`; kills its process
  group then. Returns (exit status or None on timeout, seconds, stdout, stderr)."""
  out_path, err_path = (os.path.join(logs, f'{name}.{ext}') for ext in ('out', 'err'))
  start = time.monotonic()
  with open(out_path, 'w') as out, open(err_path, 'w') as err:
    proc = subprocess.Popen(cmd, cwd=_REPO_ROOT, env=env, stdout=out, stderr=err,
                            start_new_session=True)  # Its own group: kill pytest's too.
    try:
      status = proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      status = None
  seconds = time.monotonic() - start
  with open(out_path) as out, open(err_path) as err:
    return status, seconds, out.read(), err.read()


def _tail(text: str, chars: int = 2000) -> str:
  return text[-chars:]


def run_child(section: str, timeout_s: float, logs: str) -> dict:
  """One accelerator_child.py section under `timeout_s`; its last report, with status."""
  cmd = [sys.executable, os.path.join(_BENCH_DIR, 'accelerator_child.py'),
         f'--section={section}', f'--budget_s={max(timeout_s - _EXIT_S, 1.0):.1f}']
  if _SMOKE.value:
    cmd.append('--smoke')
  env = dict(os.environ)
  # The child is the only user of the GPU (this process never starts JAX): let XLA take
  # more than its default 75% of the memory, for the MoE model's state and activations.
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  status, seconds, stdout, stderr = run_process(cmd, env, timeout_s, logs, section)
  record = {'seconds': seconds, 'timeout_s': timeout_s}
  try:
    record['result'] = benchlib.reported(stdout)
  except json.JSONDecodeError:  # A report cut off by the kill.
    record['result'] = None
  if status == 0:
    record['status'] = 'ok'
  elif status is None:
    record['status'] = 'timeout'
  else:
    record.update(status='error', exit_status=status, stderr_tail=_tail(stderr))
  return record


_SUMMARY = re.compile(r'(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)')
_STATUS_LINE = re.compile(r'^(tests/\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b')


def pytest_counts(output: str) -> dict:
  """{passed, failed, errors, skipped, ...} from pytest's last summary line, or (cut off
  by a time limit) from its verbose per-test lines."""
  summary = [l for l in output.splitlines() if re.match(r'^=+ .*\d+ \w+.* in [\d.]+s', l)]
  counts = {}
  if summary:
    for number, word in _SUMMARY.findall(summary[-1]):
      word = 'errors' if word.startswith('error') else word
      counts[word] = counts.get(word, 0) + int(number)
    return counts
  for line in output.splitlines():
    match = _STATUS_LINE.match(line)
    if match:
      word = {'ERROR': 'errors'}.get(match.group(2), match.group(2).lower())
      counts[word] = counts.get(word, 0) + 1
  return counts


def run_tests(selections: list[TestSelection], timeout_s: float, logs: str) -> dict:
  """Each selection under pytest, in turn, sharing `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  rows = []
  for i, selection in enumerate(selections):
    left = deadline - time.monotonic()
    row = {'name': selection.name, 'args': selection.args,
           'platform': 'cpu x8 (simulated)' if selection.on_cpu else 'accelerator'}
    rows.append(row)
    if left < 5:
      row['status'] = 'skipped (time budget spent)'
      continue
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (_BENCH_DIR, env.get('PYTHONPATH')) if p)  # For -p clu_standin.
    env['JAX_PLATFORMS'] = 'cpu' if selection.on_cpu else ''  # '' = the accelerator.
    if selection.on_cpu:
      env['XLA_FLAGS'] = ' '.join(
          f for f in (env.get('XLA_FLAGS'), '--xla_force_host_platform_device_count=8') if f)
    # The tests' float32 references: no TF32 or bf16 passes in float32 matmuls on a GPU.
    env['JAX_DEFAULT_MATMUL_PRECISION'] = 'highest'
    cmd = [sys.executable, '-m', 'pytest', '-v', '-rfE', '-p', 'no:cacheprovider',
           '-p', 'clu_standin', *selection.args]
    limit = left * selection.weight / sum(s.weight for s in selections[i:])
    status, seconds, stdout, stderr = run_process(cmd, env, limit, logs, f'tests_{i}')
    failures = [l for l in stdout.splitlines() if l.startswith(('FAILED ', 'ERROR '))]
    row.update(seconds=seconds, timeout_s=limit, exit_status=status,
               counts=pytest_counts(stdout), failures=failures[:20])
    header = re.search(r'^clu\.metrics: (.*)$', stdout, re.M)
    row['clu_metrics'] = header.group(1) if header else None
    if status is None:
      row['status'] = 'timeout'
    elif status == 0:
      row['status'] = 'ok'
    else:  # 1: failures; 5: nothing collected (a selection that went stale); others.
      row['status'] = 'failed' if status == 1 else f'error (pytest exit {status})'
      row['output_tail'] = _tail(stdout + stderr)
  return {'rows': rows}


def _fmt(value, spec: str, empty: str = '') -> str:
  return empty if value is None else format(value, spec)


def _model_name(r: dict) -> str:
  """'dense: 20 x 2048, attention cudnn' or 'moe: 12 x 2048, 8 experts top-2 ...'."""
  name = f"{r['model']}: {r['num_layers']} x {r['embed_dim']}"
  if r.get('moe'):
    moe = r['moe']
    name += (f", {moe['num_experts']} experts top-{moe['num_experts_per_token']} "
             f"({moe['dispatch']})")
  return name + f", attention {r['attention']}"


def markdown(report: dict) -> str:
  """The report's tables."""
  probe = (report['sections'].get('probe') or {}).get('result') or {}
  lines = [f"# Accelerator check{' (smoke)' if report['smoke'] else ''}", '',
           f"{report['date']}; {probe.get('device_count', '?')} x "
           f"{probe.get('device_kind', '?')} ({probe.get('platform', '?')}); jax "
           f"{probe.get('jax', '?')}, flax {probe.get('flax', '?')}; clu.metrics: "
           f"{probe.get('clu_metrics', '?')}; budget {report['budget_s']:.0f} s, took "
           f"{report['seconds']:.0f} s.", '',
           '| section | status | seconds (limit) |', '|---|---|---|']
  for name, section in report['sections'].items():
    lines.append(f"| {name} | {section['status']} | {section.get('seconds', 0):.0f} "
                 f"({section.get('timeout_s', 0):.0f}) |")

  tests = (report['sections'].get('tests') or {}).get('result')
  if tests:
    lines += ['', '## Tests on the GPU paths', '',
              '| selection | runs on | status | passed | failed | errors | skipped | s |',
              '|---|---|---|---|---|---|---|---|']
    for row in tests['rows']:
      c = row.get('counts', {})
      lines.append(f"| {row['name']} | {row['platform']} | {row['status']} "
                   f"| {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('errors', 0)} "
                   f"| {c.get('skipped', 0)} | {_fmt(row.get('seconds'), '.0f')} |")
      lines += [f'  - `{f}`' for f in row.get('failures', [])]

  mfu_rows = [(n, (report['sections'].get(n) or {}).get('result'))
              for n in ('mfu_dense', 'mfu_moe')]
  if any(r for _, r in mfu_rows):
    lines += ['', '## Train-step MFU (bf16, real train step, random tokens)', '',
              '| model | params | tokens/step | compile s | step ms | tokens/s '
              '| TFLOP/s per device | MFU | target |',
              '|---|---|---|---|---|---|---|---|---|']
    for _, r in filter(lambda item: item[1], mfu_rows):
      met = {True: 'met', False: 'not met', None: ''}[r.get('target_met')]
      step_ms = r.get('step_time_median_s')
      lines.append(
          f"| {_model_name(r)} | {_fmt(r.get('params'), ',')} | {r['tokens_per_step']:,} "
          f"| {_fmt(r.get('compile_s'), '.0f')} | {_fmt(step_ms and step_ms * 1e3, '.1f')} "
          f"| {_fmt(r.get('tokens_per_s'), ',.0f')} "
          f"| {_fmt(r.get('model_tflops_per_device'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} "
          f"| {r['target_mfu']:.0%} {met} |")
    peak = next(r for _, r in mfu_rows if r)
    lines.append(f"\nPeak: {peak['peak_flops_per_device'] / 1e12:.1f} TFLOP/s per device "
                 f"({peak['peak_source']}).")

  attn = (report['sections'].get('attention') or {}).get('result')
  if attn:
    lines += ['', f"## Attention kernel, causal, [1, seq, {attn['heads']} / "
              f"{attn['kv_heads']} heads x {attn['head_dim']}], bf16", '',
              '| seq | kernel | forward ms | fwd + bwd ms | fwd + bwd TFLOP/s '
              '| max diff vs blockwise |', '|---|---|---|---|---|---|']
    for row in attn['rows']:
      note = row.get('error') or row.get('skipped') or ''
      lines.append(
          f"| {row['seq']} | {row['implementation']} "
          f"| {_fmt(row.get('forward_ms'), '.2f', note)} "
          f"| {_fmt(row.get('forward_backward_ms'), '.2f')} "
          f"| {_fmt(row.get('forward_backward_tflops'), '.1f')} "
          f"| {_fmt(row.get('max_abs_diff_vs_blockwise'), '.3g')} |")

  moe = (report['sections'].get('moe_dispatch') or {}).get('result')
  if moe:
    lines += ['', f"## MoE layer dispatch: {moe['tokens']:,} tokens, {moe['num_experts']} "
              f"experts top-{moe['top_k']}, {moe['embed_dim']} -> {moe['expert_mlp_dim']}, "
              f"bf16 ('auto' = {moe['auto_dispatch']})", '',
              '| dispatch | fwd + bwd ms | useful TFLOP/s | of peak | vs dense | dropped '
              '| max diff vs dense |', '|---|---|---|---|---|---|---|']
    for row in moe['rows']:
      note = row.get('error') or row.get('skipped') or ''
      lines.append(
          f"| {row['dispatch']} | {_fmt(row.get('forward_backward_ms'), '.2f', note)} "
          f"| {_fmt(row.get('useful_tflops'), '.1f')} "
          f"| {_fmt(row.get('fraction_of_peak'), '.0%')} "
          f"| {_fmt(row.get('speedup_vs_dense'), '.2f')} "
          f"| {_fmt(row.get('dropped_fraction'), '.1%')} "
          f"| {_fmt(row.get('max_abs_diff_vs_dense'), '.3g')} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  unknown = sorted(set(_SECTIONS.value) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f'Unknown section(s) {unknown}; choose from {SECTIONS}.')
  sections = [s for s in SECTIONS if s in _SECTIONS.value]
  json_path = _JSON.value or os.path.join(
      _REPO_ROOT, 'bench', 'results',
      'accelerator_smoke.json' if _SMOKE.value else 'accelerator.json')
  md_path = _MARKDOWN.value or os.path.splitext(json_path)[0] + '.md'
  start = time.monotonic()
  deadline = start + _BUDGET.value - 1.0  # Time to write the results.
  report = {
      'command': ' '.join(['python'] + sys.argv),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'smoke': _SMOKE.value, 'budget_s': _BUDGET.value, 'machine': benchlib.machine_info(),
      'sections': {},
  }
  with tempfile.TemporaryDirectory(prefix='xenith-accelerator-') as logs:
    report['sections']['probe'] = probe = run_child(
        'probe', min(_PROBE_LIMIT_S, (deadline - time.monotonic()) / 3), logs)
    device = probe.get('result') or {}
    print(f"probe: {probe['status']}; {device.get('device_count', '?')} x "
          f"{device.get('device_kind', '?')}, jax {device.get('jax', '?')}", flush=True)
    if device.get('platform') == 'cpu' and not _SMOKE.value:
      print('No accelerator: the full-size sections will run out of their time on a CPU '
            '(--smoke checks that the code runs).', flush=True)
    for i, section in enumerate(sections):
      left = deadline - time.monotonic()
      limit = left * SHARES[section] / sum(SHARES[s] for s in sections[i:])
      if limit < 5:
        report['sections'][section] = {'status': 'skipped (time budget spent)'}
      elif section == 'tests':
        selections = test_selections(device.get('device_count', 1),
                                     device.get('platform', 'cpu') != 'cpu', _SMOKE.value)
        start_tests = time.monotonic()
        result = run_tests(selections, limit, logs)
        statuses = {row['status'] for row in result['rows']}
        report['sections'][section] = {
            'status': 'ok' if statuses == {'ok'} else ', '.join(sorted(statuses)),
            'seconds': time.monotonic() - start_tests, 'timeout_s': limit, 'result': result}
      else:
        report['sections'][section] = run_child(section, limit, logs)
      print(f"{section}: {report['sections'][section]['status']} "
            f"({report['sections'][section].get('seconds', 0):.0f} s)", flush=True)
  report['seconds'] = time.monotonic() - start
  text = markdown(report)
  benchlib.write_json(json_path, report)
  with open(md_path, 'w') as f:
    f.write(text)
  print(f'Wrote {md_path}\n\n{text}')
  if any(s['status'] != 'ok' for s in report['sections'].values()):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
