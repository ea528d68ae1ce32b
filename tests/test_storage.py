"""gs:// workdirs for real, against a local GCS emulator, and the one path abstraction.

The end-to-end tests run `main.py --workdir=gs://bucket/run` with every GCS client Xenith
uses pointed at `tests/gcs_emulator.py` (TensorStore directly; TensorFlow's GCS file
system, which TensorBoard and etils.epath use, through its TLS front) and read what the
run wrote back through the emulator's JSON API, independently of Xenith.
"""

import ast
import json
import os
import pathlib
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from event_files import last_per_step
from event_files import read_scalars
from helpers import single_device_env
from xenith import storage
from xenith.errors import StorageError

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUCKET = 'bucket'
TINY = [f'--config={ROOT}/experiments/default.py:size=tiny', '--config.num_train_steps=4',
        '--config.log_every_steps=2', '--config.eval_every_steps=4',
        '--config.num_eval_batches=1', '--config.checkpoint_every_steps=2',
        '--config.optimizer.warmup_steps=1']


@pytest.mark.parametrize('url, message', [
    ('s3://b/run', '--workdir=s3://b/run: no installed storage backend handles s3:// URLs'),
    ('memory://run', 'no installed storage backend handles memory:// URLs'),
    ('gs:/b/run', "looks like a URL with a slash missing (gs://bucket/dir); refusing to "
                  "make a local folder named 'gs:'"),
    ('gs:', 'looks like a URL with a slash missing'),
    ('gs://', '--workdir=gs:// names no bucket'),
    ('', '--workdir is empty'),
])
def test_unsupported_urls_are_one_line(url, message):
  with pytest.raises(StorageError) as raised:
    storage.check_supported(url, '--workdir')
  assert message in str(raised.value) and '\n' not in str(raised.value)


def test_supported_urls_and_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.check_supported('gs://b/run/') == 'gs://b/run'
  assert storage.check_supported('runs/a') == str(tmp_path / 'runs' / 'a')
  assert storage.check_supported('a:b') == str(tmp_path / 'a:b')  # Only 'x:' + '/' is a URL.
  assert storage.is_remote('gs://b/x') and not storage.is_remote('/tmp/x')
  with pytest.raises(StorageError, match='config.data.cache_dir=gs://b/c must be a local'):
    storage.check_local('gs://b/c', 'config.data.cache_dir', 'why')
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_unsupported_workdir_stops_main_before_any_work(tmp_path):
  """One line, exit 1, and nothing created: no `s3:` or `gs:` folder in the cwd."""
  result = subprocess.run(
      [sys.executable, str(ROOT / 'main.py'), *TINY, '--workdir=gs:/bucket/run'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, env=single_device_env())
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'StorageError: --workdir=gs:/bucket/run looks like a URL with a slash missing '
      "(gs://bucket/dir); refusing to make a local folder named 'gs:'.")
  assert list(tmp_path.iterdir()) == []


# Calls that touch files directly. Outside the modules below, every file a run reads or
# writes must go through `storage.path()` / `atomic_files`, or gs:// breaks silently.
_FILE_CALLS = {'open', 'os.makedirs', 'os.mkdir', 'os.rename', 'os.replace', 'os.remove',
               'os.unlink', 'os.listdir', 'os.rmdir', 'os.path.exists', 'os.path.isdir',
               'os.path.isfile', 'os.path.getsize', 'os.path.abspath', 'os.path.realpath',
               'shutil.rmtree', 'shutil.copy', 'shutil.move', 'pathlib.Path',
               'tempfile.mkstemp'}
# Modules and functions that touch only local files, each for a stated reason.
_LOCAL_BY_DESIGN = {
    'xenith/storage.py': 'the abstraction itself',
    'xenith/atomic_files.py': 'the local branch of atomic writes',
    'xenith/train/workdir_lock.py': "the local lock's O_EXCL branch",
    'xenith/data/': 'the data cache and data folders are local (cache.py says why)',
    'xenith/train/run_record.py:_code_version': "the code's own git checkout",
    'xenith/hf/safetensors_io.py:_check_layout': 'reads the local copy (storage.local_copy)',
    'xenith/hf/safetensors_io.py:read_tensors': 'reads the local copy (storage.local_copy)',
    'xenith/sweeps.py:_load_module': 'the experiment file, a local Python module',
    'xenith/train/batch_log.py': 'a test-only record appended to a local folder',
    'xenith/config_validation.py:validate': 'data.path is local (checked by check_local)',
    'xenith/host_memory.py:thp_mode': "the kernel's own setting under /sys",
    'main.py:_compiled_description': "describe --compile's files in a local temporary folder",
    'xenith/sizing/compiled.py:main': "the parent's files in its local temporary folder",
}


def _dotted(node) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f'{_dotted(node.value)}.{node.attr}'
  return ''


def _raw_file_calls(relative: str, tree: ast.AST) -> list[str]:
  """'file:function:line call' for each direct file call not on a temporary local file."""
  found = []

  def visit(node, function, temporary):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      function = node.name
    if isinstance(node, ast.With):  # `with atomic_files.replacing(p) as tmp`: tmp is local.
      for item in node.items:
        if (isinstance(item.context_expr, ast.Call) and _dotted(item.context_expr.func) in (
            'atomic_files.replacing', 'storage.local_copy')
            and isinstance(item.optional_vars, ast.Name)):
          temporary = temporary | {item.optional_vars.id}
    if isinstance(node, ast.Call) and _dotted(node.func) in _FILE_CALLS:
      on_temporary = node.args and isinstance(node.args[0], ast.Name) and (
          node.args[0].id in temporary)
      allowed = any(f'{relative}:{function}'.startswith(k) or relative.startswith(k)
                    for k in _LOCAL_BY_DESIGN if k.endswith('/') or ':' in k or k == relative)
      if not on_temporary and not allowed:
        found.append(f'{relative}:{function}:{node.lineno} {_dotted(node.func)}')
    for child in ast.iter_child_nodes(node):
      visit(child, function, temporary)

  visit(tree, '', frozenset())
  return found


def test_every_file_access_goes_through_the_storage_abstraction():
  files = sorted((ROOT / 'xenith').rglob('*.py')) + [ROOT / 'main.py']
  found = []
  for path in files:
    relative = path.relative_to(ROOT).as_posix()
    found += _raw_file_calls(relative, ast.parse(path.read_text()))
  assert found == []


def test_the_scan_finds_a_raw_write():
  """The scan above is not vacuous: it flags a plain open() or os.makedirs."""
  tree = ast.parse('import os\ndef f(p):\n  os.makedirs(p)\n  with open(p, "w"):\n    pass\n'
                   'def g(p):\n  with atomic_files.replacing(p) as tmp, open(tmp) as f:\n'
                   '    pass\n')
  assert _raw_file_calls('xenith/x.py', tree) == ['xenith/x.py:f:3 os.makedirs',
                                                  'xenith/x.py:f:4 open']


# --- gs:// for real, against the emulator ------------------------------------------------


@pytest.fixture(scope='module')
def gcs():
  """The emulator's endpoint and the environment that points every GCS client at it."""
  process = subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'gcs_emulator.py'),
                              BUCKET], stdout=subprocess.PIPE, text=True)
  try:
    info = json.loads(process.stdout.readline())
    yield info['endpoint'], {**single_device_env(), **info['env']}
  finally:
    process.kill()
    process.wait()


def _objects(endpoint: str, prefix: str) -> dict[str, int]:
  """{object name: size} under `prefix`, from the emulator's JSON API."""
  query = urllib.parse.urlencode({'prefix': prefix})
  with urllib.request.urlopen(f'{endpoint}/storage/v1/b/{BUCKET}/o?{query}') as response:
    return {o['name']: int(o['size']) for o in json.load(response).get('items', [])}


def _object(endpoint: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(f'{endpoint}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media') as r:
    return r.read()


def _put(endpoint: str, name: str, data: bytes) -> None:
  query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
  request = urllib.request.Request(f'{endpoint}/upload/storage/v1/b/{BUCKET}/o?{query}',
                                   data=data, method='POST')
  urllib.request.urlopen(request).close()


def _delete(endpoint: str, name: str) -> None:
  quoted = urllib.parse.quote(name, safe='')
  request = urllib.request.Request(f'{endpoint}/storage/v1/b/{BUCKET}/o/{quoted}',
                                   method='DELETE')
  urllib.request.urlopen(request).close()


def _train(workdir: str, cwd, env, *flags) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / 'main.py'), *TINY, *flags,
                         f'--workdir={workdir}'], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=env)


def _events(endpoint: str, prefix: str, folder: pathlib.Path) -> dict:
  """The TensorBoard scalars under gs://bucket/`prefix`, via a local copy of its events."""
  folder.mkdir()
  for name in _objects(endpoint, prefix):
    if '/events.out.tfevents.' in name and name.count('/') == prefix.count('/'):
      (folder / name.rsplit('/', 1)[1]).write_bytes(_object(endpoint, name))
  return read_scalars(str(folder))


@pytest.mark.slow
def test_a_gs_workdir_holds_everything_and_resumes_exactly(gcs, tmp_path):
  """A tiny run on gs://bucket/run: checkpoints, TensorBoard, run.json, the tokenizer and
  final_metrics.json all land in the bucket and nothing on the local disk; its logged
  values equal a local run's. Then, with its newest checkpoint damaged, its final metrics
  gone and a stale lock left behind, the same command moves the damaged step aside in the
  bucket, takes the lock over, resumes from the step before and logs the same values; a
  live holder's lock stops a third start in one line."""
  endpoint, env = gcs
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  local = _train(str(tmp_path / 'local'), cwd, env)
  assert local.returncode == 0, local.stderr[-3000:]
  expected = read_scalars(str(tmp_path / 'local'))

  first = _train('gs://bucket/run', cwd, env)
  assert first.returncode == 0, first.stderr[-3000:]
  assert list(cwd.iterdir()) == []  # No folder named after the URL, nothing local.
  names = _objects(endpoint, 'run/')
  for step in (2, 4):
    assert f'run/checkpoints/{step}/commit_success.txt' in names
    assert names[f'run/checkpoints/{step}/state/_METADATA'] > 0
  for name in ('run/run.json', 'run/tokenizer.model', 'run/final_metrics.json'):
    assert names[name] > 0, name
  assert 'run/.lock' not in names
  assert json.loads(_object(endpoint, 'run/final_metrics.json'))['step'] == 4
  run_json = json.loads(_object(endpoint, 'run/run.json'))
  assert run_json['config']['num_train_steps'] == 4
  scalars = _events(endpoint, 'run/', tmp_path / 'events')
  for tag in ('train/loss', 'train/grad_norm', 'eval/loss'):
    assert last_per_step(scalars[tag]) == pytest.approx(
        last_per_step(expected[tag]), rel=1e-6), tag

  _delete(endpoint, 'run/checkpoints/4/state/_METADATA')
  _delete(endpoint, 'run/final_metrics.json')
  _put(endpoint, 'run/.lock', json.dumps(
      {'host': socket.gethostname(), 'pid': 2**22 + 1, 'started': 0}).encode())
  second = _train('gs://bucket/run', cwd, env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Checkpoint step 4 cannot be read' in second.stderr
  assert 'Restored checkpoint for step 2 from gs://bucket/run/checkpoints' in second.stderr
  names = _objects(endpoint, 'run/')
  assert 'run/damaged_checkpoints/4/state/_sharding' in names
  assert 'run/checkpoints/4/state/_sharding' in names  # Saved again.
  assert 'run/.lock' not in names
  assert json.loads(_object(endpoint, 'run/final_metrics.json'))['step'] == 4
  resumed = _events(endpoint, 'run/', tmp_path / 'events2')
  for tag in ('train/loss', 'eval/loss'):
    assert last_per_step(resumed[tag])[4] == pytest.approx(
        last_per_step(expected[tag])[4], rel=1e-6), tag
  assert list(cwd.iterdir()) == []

  _put(endpoint, 'run/.lock', json.dumps(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'started': 0}).encode())
  third = _train('gs://bucket/run', cwd, env)
  assert third.returncode == 1
  assert third.stderr.strip().splitlines()[-1].startswith(
      f'WorkdirError: The workdir is in use by another training run (pid {os.getpid()} on '
      'this host')
