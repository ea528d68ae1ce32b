"""What a workdir was trained with, so that a resume never continues a different run.

When a run starts in an empty workdir it writes `<workdir>/run.json` and a copy of its
tokenizer (`tokenizer.model`, or a Hugging Face one's tokenizer.json and
tokenizer_config.json, which resumes, `--mode=generate`, classify and export then use, so
a changed corpus can never retrain it under the run). `run.json` holds the flattened config, the
tokenizer's digest, the prepared data's fingerprint and, for every start, the code
version (git commit, and whether the tree had changes) and the installed package
versions.

A resume compares: any config field that differs (besides the ones that only say how
often to log, evaluate or save, listed in `FREE_FIELDS`), another tokenizer or other data
stops the run with one line naming them, unless the change is allowed with
`--allow_changes=<field or prefix>,...` ('tokenizer' and 'data' for those two). An
allowed change is recorded, and the next resume compares against it.
"""

import importlib.metadata
import json
import os
import subprocess
import time
from typing import Any

from flax import traverse_util
import ml_collections

from xenith import atomic_files
from xenith import storage
from xenith.data import tokenizer as tokenizer_lib
from xenith.errors import WorkdirError

RECORD_FILE = 'run.json'
# Fields that change how a run is watched, not what it computes: free to change.
FREE_FIELDS = ('log_every_steps', 'eval_every_steps', 'num_eval_batches',
               'checkpoint_every_steps', 'keep_checkpoints', 'peak_flops_per_device',
               'max_consecutive_nonfinite', 'passkey.', 'data.cache_dir', 'mesh.',
               'logical_axis_rules', 'data.eval_split', 'profile_steps', 'sample_prompts',
               'sample_new_tokens', 'log_histograms_every_steps', 'loggers', 'wandb.')
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
            'tensorflow-datasets', 'sentencepiece', 'numpy', 'clu', 'safetensors')


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'model.embed_dim': 256, ...}, values as run.json holds them (tuples as lists)."""
  flat = traverse_util.flatten_dict(config.to_dict())
  return {'.'.join(k): json.loads(json.dumps(v, default=str)) for k, v in flat.items()}


def _default_flat() -> dict[str, Any]:
  from xenith import config_defaults  # pylint: disable=g-import-not-at-top
  return _flat(config_defaults.get_config())


def _code_version() -> dict[str, Any]:
  """The git commit of the code (None outside a git checkout) and whether it had edits."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                            cwd=root, capture_output=True, text=True, timeout=10,
                            check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return {'git_commit': None}
  return {'git_commit': commit, 'uncommitted_changes': bool(status.strip())}


def _package_versions() -> dict[str, str | None]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + '...'


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
  return any(name == a or name.startswith(a.rstrip('.') + '.') for a in allow)


class RunRecord:
  """A workdir's `run.json` (see the module doc)."""

  def __init__(self, workdir: str):
    self.workdir = storage.check_supported(workdir, '--workdir')  # Local or gs://.
    self.path = storage.path(self.workdir) / RECORD_FILE
    self.tokenizer_dir = storage.path(self.workdir)
    self.record = None
    if self.path.exists():
      try:
        with self.path.open() as f:
          self.record = json.load(f)
      except (OSError, ValueError) as e:
        raise WorkdirError(f'{self.path} is unreadable ({e}); it records what this '
                           'workdir was trained with. Restore it, or use a new --workdir.')

  def forget(self) -> None:
    """A start with no checkpoint to resume: nothing was trained with the old record."""
    for path in (self.path, *self._pinned_paths()):
      path.unlink(missing_ok=True)
    self.record = None

  def pinned_tokenizer(self) -> tokenizer_lib.Tokenizer | None:
    """The workdir's copy of its tokenizer; None before the first start."""
    return tokenizer_lib.read_pinned(self.tokenizer_dir)

  def _pinned_paths(self):
    return [self.tokenizer_dir / name for name in tokenizer_lib.PINNED_FILES]

  def check_config(self, config, allow: tuple[str, ...]) -> None:
    """Stops (WorkdirError) when a config field differs from the record, unless allowed.
    A field the record lacks (added to Xenith since) counts as its default there."""
    if self.record is None:
      return
    before, now = self.record['config'], _flat(config)
    # A field added to Xenith since the record was written ran at its default then.
    before = {**{k: v for k, v in _default_flat().items() if k not in before}, **before}
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not _allowed(k, FREE_FIELDS))
    changed = [k for k in changed if not _allowed(k, allow)]
    self._refuse([f'config.{k} ({_short(before.get(k))} -> {_short(now.get(k))})'
                  for k in changed], changed)

  def check_data(self, tokenizer, fingerprint: str, allow: tuple[str, ...]) -> None:
    """Stops when the tokenizer or the prepared data differ from the record's."""
    if self.record is None:
      return
    changes, names = [], []
    if tokenizer.digest != self.record['tokenizer_digest'] and 'tokenizer' not in allow:
      changes.append(f'the tokenizer ({self.record["tokenizer_digest"]} -> '
                     f'{tokenizer.digest})')
      names.append('tokenizer')
    if fingerprint != self.record['data_fingerprint'] and 'data' not in allow:
      changes.append(f'the data ({self.record["data_fingerprint"]} -> {fingerprint})')
      names.append('data')
    self._refuse(changes, names)

  def _refuse(self, changes: list[str], names: list[str]) -> None:
    if changes:
      raise WorkdirError(
          f'This workdir was trained with another setup; changed: {"; ".join(changes)}. '
          f'Resume with the same config and data, use a new --workdir, or allow the '
          f'change with --allow_changes={",".join(names)}.')

  def write(self, config, tokenizer, fingerprint: str, step: int,
            allow: tuple[str, ...]) -> None:
    """Records this start, and pins the tokenizer (at the first start, or when another
    one was allowed in)."""
    pinned = self.pinned_tokenizer()
    if pinned is None or pinned.digest != tokenizer.digest:
      for path in self._pinned_paths():  # Another kind's files would be read first.
        path.unlink(missing_ok=True)
      for name, data in tokenizer.files().items():
        atomic_files.write_bytes(self.tokenizer_dir / name, data)
    starts = (self.record or {}).get('starts', [])
    starts.append({'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'step': step,
                   'allowed_changes': list(allow), 'code': _code_version(),
                   'packages': _package_versions()})
    self.record = {'config': _flat(config), 'tokenizer_digest': tokenizer.digest,
                   'data_fingerprint': fingerprint, 'starts': starts}
    atomic_files.write_json(self.path, self.record, indent=1)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was last started with (its run.json), over today's defaults
  (a field added since keeps its default). Raises WorkdirError without a record."""
  from xenith import config_defaults  # pylint: disable=g-import-not-at-top
  record = RunRecord(workdir).record
  if record is None:
    raise WorkdirError(f'{workdir} has no {RECORD_FILE} (no run started there); pass the '
                       "run's --config.")
  config = config_defaults.get_config()
  defaults = traverse_util.flatten_dict(config.to_dict(), sep='.')
  values = {}
  for key, value in record['config'].items():
    if key not in defaults:
      continue  # A field removed since: nothing reads it.
    if isinstance(defaults[key], tuple) and isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    values[key] = value
  config.update_from_flattened_dict(values)
  return config


CONFIG_TEXT_FILE = 'config.txt'  # Not config.json: that name is the HF export's.


def write_config_text(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config, one `field = value` line each (Python literals), to
  `<workdir>/config.txt` for a person to read; returns its path. run.json stays the
  record resumes compare against."""
  flat = traverse_util.flatten_dict(config.to_dict())
  text = ''.join(f'{".".join(key)} = {value!r}\n' for key, value in sorted(flat.items()))
  path = storage.path(workdir) / CONFIG_TEXT_FILE
  atomic_files.write_text(path, text)
  return os.fspath(path)
