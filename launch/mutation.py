r"""Mutation testing of one module on a seeded sample of mutants, with cosmic-ray.

  ./launch/mutation.sh xenith/train/steps.py                      # 40 mutants, seed 0
  ./launch/mutation.sh xenith/model/memory/bank.py --sample=20 --budget_minutes=60
  ./launch/mutation.sh xenith/train/optimizer.py --since=origin/main  # lines a change touched
  ./launch/mutation.sh xenith/train/steps.py --rev=HEAD~3         # the module and tests of a commit

cosmic-ray lists every mutant of the module (an operator flipped, a number or a
comparison changed, a `break` turned into `continue`, ...); this script takes a seeded
random sample of them (`--sample`; with `--since`, only mutants on lines changed since
that revision), runs the tests that cover the module (`COVERING_TESTS`, or `--tests`) on
each, and reports the share killed. A survivor is a change to the code that no test
noticed: either a missing test or an equivalent mutant (one that cannot change
behaviour); `docs/testing.md` says which, module by module.

cosmic-ray edits the module in place, so everything runs in a scratch copy of the
checkout (its working tree, or `--rev`) under `--workdir` (default
runs/mutation/<module>/), never in the checkout itself. The tests first run unmutated
(they must pass); each mutant then gets `--timeout_factor` times that long (a mutant that
hangs counts as killed). `--budget_minutes` caps the whole run: what is left unrun is
reported as such. Results: `report.json` and `session.sqlite` (cosmic-ray's; `cr-report
session.sqlite --show-diff` lists every mutant) in the workdir.
"""

import argparse
import ast
import contextlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Module -> the test files that cover it, fastest and most direct first (the tests stop
# at the first failure, so a mutant caught early costs little).
COVERING_TESTS = {
    'xenith/train/steps.py': [
        'tests/test_steps.py', 'tests/test_chunked_loss.py', 'tests/test_metrics.py',
        'tests/test_moe.py::test_loss_adds_mean_layer_aux_loss_and_eval_reports_it',
        'tests/test_lora.py::test_lora_train_steps_change_only_adapters',
        'tests/test_train.py::test_nonfinite_steps_can_be_skipped', 'tests/test_sharding.py'],
    'xenith/train/optimizer.py': [
        'tests/test_optimizer.py',
        'tests/test_lora.py::test_lora_train_steps_change_only_adapters',
        'tests/test_lora.py::test_train_only_adapters_off_trains_everything',
        'tests/test_train.py::test_nonfinite_steps_can_be_skipped'],
    'xenith/model/chunked_loss.py': ['tests/test_chunked_loss.py'],
    **{f'xenith/model/memory/{name}.py': ['tests/test_memory_reference.py',
                                           'tests/test_memory.py']
       for name in ('attention', 'bank', 'decoder', 'state', 'summarizer')},
    'xenith/model/moe.py': [
        'tests/test_moe_reference.py', 'tests/test_moe.py',
        'tests/test_lora.py::test_expert_adapters_have_an_expert_axis',
        'tests/test_lora.py::test_zero_b_equals_base_and_merged_equals_unmerged'],
    'xenith/model/moe_dispatch.py': ['tests/test_moe_reference.py', 'tests/test_moe.py'],
    'xenith/model/attention.py': ['tests/test_attention.py', 'tests/test_model.py',
                                  'tests/test_kv_cache.py', 'tests/test_memory_reference.py'],
    'xenith/model/blockwise_attention.py': ['tests/test_attention.py'],
    'xenith/model/fused_attention.py': ['tests/test_attention.py'],
    'xenith/model/kv_cache.py': ['tests/test_kv_cache.py', 'tests/test_generate.py'],
    'xenith/data/packing.py': ['tests/test_data.py'],
}

# Operators left out of every sample: an arithmetic operator replaced by a bitwise one,
# or anything replaced by a shift, fails as soon as the line runs on float arrays, so it
# shows only that a test executes the line (cosmic-ray makes 10 such variants of each
# `+`). Bitwise operators on boolean masks still get their meaningful mutants (`&` -> `|`).
EXCLUDED_OPERATORS = re.compile(
    r'core/ReplaceBinaryOperator_(Add|Sub|Mul|Div|FloorDiv|Mod|Pow|MatMult)_'
    r'(BitAnd|BitOr|BitXor)$|core/ReplaceBinaryOperator_\w+_(LShift|RShift)$')


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[1], formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('module', help='The module to mutate, e.g. xenith/train/steps.py.')
  parser.add_argument('--sample', type=int, default=40,
                      help='Mutants to run, drawn at random (0 = all). Default 40.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the sample.')
  parser.add_argument('--since', default='',
                      help='Only mutants on lines changed since this git revision.')
  parser.add_argument('--rev', default='',
                      help='Mutate this commit\'s module with its tests (default: the '
                      'working tree).')
  parser.add_argument('--tests', nargs='+', default=None,
                      help='Test files or pytest node ids (default: COVERING_TESTS).')
  parser.add_argument('--timeout_factor', type=float, default=3.0,
                      help='A mutant\'s tests may run this many times the unmutated time.')
  parser.add_argument('--budget_minutes', type=float, default=120.0,
                      help='Stop starting new mutants after this long.')
  parser.add_argument('--workdir', default='',
                      help='Where the scratch copy and results go '
                      '(default: runs/mutation/<module>).')
  return parser.parse_args(argv)


def _git(*args, cwd=ROOT) -> bytes:
  return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True).stdout


def _copy_checkout(dest: str, rev: str) -> None:
  """The working tree (tracked and untracked, not ignored files) or commit `rev`."""
  os.makedirs(dest)
  if rev:
    with tarfile.open(fileobj=io.BytesIO(_git('archive', rev)), mode='r') as archive:
      archive.extractall(dest, filter='data')
    return
  for name in _git('ls-files', '-z', '--cached', '--others', '--exclude-standard').split(b'\0'):
    name = name.decode()
    if name and os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


def _test_exists(root: str, test: str) -> bool:
  """Whether a test file, or a `file::test_name` node, exists under `root`."""
  path, _, name = test.partition('::')
  path = os.path.join(root, path)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return not name or f'def {name}(' in f.read()


def _changed_lines(module: str, since: str) -> set[int]:
  """Lines of `module` in the working tree that differ from revision `since`."""
  diff = _git('diff', '-U0', since, '--', module).decode()
  lines = set()
  for start, count in re.findall(r'^@@ -\S+ \+(\d+)(?:,(\d+))? @@', diff, re.MULTILINE):
    lines.update(range(int(start), int(start) + (int(count) if count else 1)))
  return lines


def _test_command(python: str, tests: list[str]) -> str:
  # -x: a mutant is killed by its first failing test. No cache: runs stay independent.
  return shlex.join([python, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests])


def _environment(workdir: str) -> dict[str, str]:
  env = dict(os.environ)
  # Unchanged functions compile once for all mutants (XLA's persistent cache).
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(workdir, 'jax_cache')
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  env.pop('PYTHONPATH', None)
  return env


def _annotation_spans(path: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """(start, end) (line, column) of every type annotation in the file."""
  spans = []
  for node in ast.walk(ast.parse(open(path).read())):
    annotations = []
    if isinstance(node, ast.arg | ast.AnnAssign):
      annotations.append(node.annotation)
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      annotations.append(node.returns)
    spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset))
              for a in annotations if a is not None]
  return spans


def _sample(session: str, sample: int, seed: int, lines: set[int] | None,
            annotations) -> tuple[int, int]:
  """Marks every mutant outside the sample as skipped; returns (mutants, sampled).

  Mutants inside type annotations are never sampled: they break the import (`str | None`
  -> `str - None`) and so test nothing but that the module loads; nor are those of
  `EXCLUDED_OPERATORS`.
  """
  from cosmic_ray.work_db import use_db, WorkDB  # pylint: disable=g-import-not-at-top
  from cosmic_ray.work_item import WorkResult, WorkerOutcome  # pylint: disable=g-import-not-at-top
  with use_db(session, WorkDB.Mode.open) as db:
    # Job ids are random (uuid4): order by what the mutant is, so a seed means one sample.
    items = sorted(db.pending_work_items, key=lambda w: tuple(
        (str(m.module_path), m.operator_name, m.occurrence, m.start_pos)
        for m in w.mutations))
    items = [w for w in items if not any(
        EXCLUDED_OPERATORS.match(m.operator_name) or any(
            start <= m.start_pos and m.end_pos <= end for start, end in annotations)
        for m in w.mutations)]
    total = len(items)
    if lines is not None:
      items = [w for w in items if any(
          lines & set(range(m.start_pos[0], m.end_pos[0] + 1)) for m in w.mutations)]
    chosen = items if not sample or sample >= len(items) else random.Random(seed).sample(
        items, sample)
    keep = {w.job_id for w in chosen}
    skipped = [w.job_id for w in db.pending_work_items if w.job_id not in keep]
    if skipped:
      db.set_multiple_results(skipped, WorkResult(
          output='not in the sample', worker_outcome=WorkerOutcome.SKIPPED))
    return total, len(chosen)


def _results(session: str) -> list[dict]:
  from cosmic_ray.work_db import use_db, WorkDB  # pylint: disable=g-import-not-at-top
  out = []
  with use_db(session, WorkDB.Mode.open) as db:
    done = dict(db.results)
    for item in db.work_items:
      result = done.get(item.job_id)
      if result is not None and result.worker_outcome == 'skipped':
        continue
      m = item.mutations[0]
      outcome = 'not run' if result is None else (
          'incompetent' if result.test_outcome == 'incompetent' or result.test_outcome is None
          else result.test_outcome.value)
      if result is not None and outcome == 'killed' and result.output == 'timeout':
        outcome = 'killed (timeout)'
      out.append({'line': m.start_pos[0], 'operator': m.operator_name,
                  'occurrence': m.occurrence, 'function': m.definition_name,
                  'outcome': outcome, 'diff': result.diff if result else None})
  return sorted(out, key=lambda r: (r['line'], r['operator'], r['occurrence']))


def main(argv=None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  module = os.path.relpath(os.path.abspath(args.module), ROOT)
  if not module.endswith('.py') or not os.path.isfile(os.path.join(ROOT, module)):
    sys.exit(f'{args.module}: not a Python file of this checkout.')
  tests = args.tests or COVERING_TESTS.get(module)
  if not tests:
    sys.exit(f'No covering tests are listed for {module} in launch/mutation.py; name them '
             'with --tests.')
  workdir = os.path.abspath(args.workdir or os.path.join(
      ROOT, 'runs', 'mutation', module.replace('/', '.').removesuffix('.py')))
  if os.path.exists(workdir):
    sys.exit(f'{workdir} exists: remove it or pass another --workdir.')
  lines = _changed_lines(module, args.since) if args.since else None
  if lines is not None and not lines:
    sys.exit(f'{module} has no lines changed since {args.since}.')

  source = os.path.join(workdir, 'src')
  _copy_checkout(source, args.rev)
  missing = [t for t in tests if not _test_exists(source, t)]
  if missing:  # An older revision may predate some of them.
    print(f'Not in this checkout, left out: {" ".join(missing)}')
    tests = [t for t in tests if t not in missing]
    if not tests:
      sys.exit('None of the covering tests exist in this checkout.')
  python = sys.executable
  command = _test_command(python, tests)
  env = _environment(workdir)
  print(f'Mutating {module} in {source}\nTests: {command}', flush=True)
  start = time.perf_counter()
  baseline = subprocess.run(shlex.split(command), cwd=source, env=env, capture_output=True,
                            text=True)
  baseline_s = time.perf_counter() - start
  if baseline.returncode:
    sys.exit(f'The unmutated tests fail; fix them first:\n{baseline.stdout[-3000:]}')
  timeout = max(60.0, args.timeout_factor * baseline_s)
  print(f'Unmutated tests pass in {baseline_s:.0f} s; a mutant may take {timeout:.0f} s.',
        flush=True)

  config = os.path.join(workdir, 'cosmic-ray.toml')
  with open(config, 'w') as f:
    f.write('[cosmic-ray]\n'
            f'module-path = {json.dumps(module)}\n'
            f'timeout = {timeout}\n'
            'excluded-modules = []\n'
            f'test-command = {json.dumps(command)}\n'
            '[cosmic-ray.distributor]\nname = "local"\n')
  session = os.path.join(workdir, 'session.sqlite')
  cosmic_ray = [python, '-m', 'cosmic_ray.cli']
  subprocess.run([*cosmic_ray, 'init', config, session], cwd=source, env=env, check=True)
  total, sampled = _sample(session, args.sample, args.seed, lines,
                           _annotation_spans(os.path.join(source, module)))
  print(f'{sampled} of {total} mutants sampled (seed {args.seed}; type annotations and '
        'EXCLUDED_OPERATORS left out).', flush=True)

  budget_s = args.budget_minutes * 60
  process = subprocess.Popen([*cosmic_ray, 'exec', config, session], cwd=source, env=env,
                             start_new_session=True)
  with contextlib.suppress(subprocess.TimeoutExpired):
    process.wait(timeout=budget_s)
  stopped = process.poll() is None
  if stopped:  # Out of budget: stop the mutant in flight; it is reported as not run.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  elapsed = time.perf_counter() - start

  rows = _results(session)
  counts = {}
  for r in rows:
    key = 'killed' if r['outcome'].startswith('killed') else r['outcome']
    counts[key] = counts.get(key, 0) + 1
  scored = counts.get('killed', 0) + counts.get('survived', 0)
  score = counts.get('killed', 0) / scored if scored else float('nan')
  report = {
      'module': module, 'rev': args.rev or 'working tree', 'seed': args.seed,
      'since': args.since, 'mutants': total, 'sampled': sampled, 'tests': tests,
      'unmutated_test_seconds': round(baseline_s, 1), 'seconds': round(elapsed),
      'stopped_by_budget': stopped, 'counts': counts, 'score': score, 'mutants_run': rows,
  }
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)

  print(f'\n{module}: {counts.get("killed", 0)} killed / {scored} scored = {score:.0%}'
        f' ({", ".join(f"{v} {k}" for k, v in sorted(counts.items()))}) in {elapsed / 60:.0f}'
        f' min{"; stopped by the budget" if stopped else ""}.')
  for r in rows:
    if r['outcome'] == 'survived':
      print(f'\nSURVIVED line {r["line"]} ({r["function"]}, {r["operator"]}):\n'
            f'{(r["diff"] or "").strip()}')
  print(f'\nReport: {os.path.join(workdir, "report.json")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
