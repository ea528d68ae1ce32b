"""Hyperparameter sweeps: declared by an experiment's `get_sweep()`, run by launch/sweep.py.

A sweep is a list of points; a point is a dict of config overrides such as
`{'optimizer.learning_rate': 1e-3, 'model.embed_dim': 64}`. Experiments build it with
`product` (every combination), `zip_` (values paired up) and list concatenation:

  def get_sweep(arg=None):
    return (sweeps.product({'optimizer.learning_rate': [1e-3, 3e-3],
                            'model.embed_dim': [64, 128]})
            + [{'model.norm': 'layernorm'}])

Each point runs as its own run under `<workdir>/<point name>`; `write_summary` then
tabulates every point's final metrics. Summaries are written atomically, and a point
whose `final_metrics.json` is empty or unreadable counts as not finished (with a warning).
"""

import collections
import copy
import csv
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
import ml_collections

from xenith import atomic_files
from xenith import storage
from xenith.errors import SweepError

# Metrics shown in the Markdown summary, in this order (the CSV has every final metric).
SUMMARY_METRICS = ('step', 'train/loss', 'eval/loss', 'eval/perplexity', 'eval/accuracy',
                   'train/tokens_per_sec')
_UNSAFE = re.compile(r'[^A-Za-z0-9._=,+-]')
_MAX_NAME = 200  # Directory names are limited to 255 bytes on most filesystems.


def product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Every combination of the value lists; the last field varies fastest."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zip_(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The i-th values of every list together, e.g. a learning rate with its warmup."""
  lengths = {key: len(values) for key, values in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f'zip_ needs value lists of one length; got {lengths}')
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def field_labels(keys: Sequence[str]) -> dict[str, str]:
  """Short labels (`learning_rate`), or the dotted name where two fields share one."""
  short = {key: key.rsplit('.', 1)[-1] for key in keys}
  counts = collections.Counter(short.values())
  return {key: label if counts[label] == 1 else key for key, label in short.items()}


def format_value(value: Any) -> str:
  """How a value appears in point names, tables and `--config.<field>=` flags.

  Floats use their shortest round-trip form (`0.001`, `1e-05`); bools `True`/`False`,
  which is also what ml_collections' config flags parse back to the field's type.
  """
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def sweep_fields(points: Sequence[Mapping[str, Any]]) -> list[str]:
  """The overridden fields of a sweep, in order of first appearance."""
  return list(dict.fromkeys(key for point in points for key in point))


def point_name(overrides: Mapping[str, Any],
               labels: Mapping[str, str] | None = None) -> str:
  """A readable, filesystem-safe name such as `learning_rate=0.001,embed_dim=64`."""
  labels = labels or field_labels(list(overrides))
  name = ','.join(f'{labels[k]}={format_value(v)}' for k, v in overrides.items())
  return _UNSAFE.sub('_', name) or 'default'


def point_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
  """Unique names for all points of a sweep (labels are chosen sweep-wide)."""
  labels = field_labels(sweep_fields(points))
  names = [point_name(point, labels) for point in points]
  # Names compared case-insensitively, for case-insensitive filesystems (macOS).
  taken = [name.lower() for name in names]
  for i, (name, point) in enumerate(zip(names, points)):
    if len(name) > _MAX_NAME or taken.count(name.lower()) > 1:
      # A stable suffix (not the index) so that a resumed sweep finds its runs again.
      digest = hashlib.sha1(repr(sorted(point.items())).encode()).hexdigest()[:8]
      names[i] = f'{name[:_MAX_NAME]}-{digest}'
  return names


def _load_module(path: str):
  if not os.path.isfile(path):
    raise SweepError(f'{path}: no such experiment file')
  name = 'xenith_sweep_' + re.sub(r'\W', '_', os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> Any:
  """Sets dotted `key` as `--config.<key>` would; returns the value as the field's type.

  Raises SweepError naming the field when it does not exist or the value does not fit.
  """
  parts = key.split('.')
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(f'sweep field {key!r}: config.{".".join(parts[:i + 1])} does not '
                       f'exist in the experiment config')
    parent, node = node, node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f'sweep field {key!r} is a group of fields; sweep its leaves')
  if not isinstance(node, (bool, int, float, str, tuple)):
    raise SweepError(f'sweep field {key!r}: a {type(node).__name__} field cannot be set '
                     f'from the command line')
  if type(value).__module__ == 'numpy':  # e.g. values from np.linspace.
    value = value.item()
  mismatch = SweepError(f'sweep field {key!r}: {value!r} does not fit the field\'s '
                        f'{type(node).__name__} value {node!r}')
  if isinstance(node, bool) != isinstance(value, bool):  # ConfigDict lets bools be ints.
    raise mismatch
  try:
    parent[parts[-1]] = value
  except TypeError as e:
    raise mismatch from e
  return parent[parts[-1]]


def validate(config: ml_collections.ConfigDict,
             points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Checks every override against `config`; returns the points with typed values."""
  if not isinstance(points, (list, tuple)) or not points:
    raise SweepError(f'get_sweep() must return a non-empty list of override dicts, '
                     f'got {points!r}')
  typed, seen = [], {}
  for i, point in enumerate(points):
    if not isinstance(point, Mapping) or not all(isinstance(k, str) for k in point):
      raise SweepError(f'sweep point {i} is not a dict of field names to values: {point!r}')
    fresh = copy.deepcopy(config)  # Each point starts from the experiment's config.
    typed.append({key: set_field(fresh, key, value) for key, value in point.items()})
    canonical = repr(sorted(typed[-1].items()))
    if canonical in seen:
      raise SweepError(f'sweep points {seen[canonical]} and {i} are the same: {point!r}')
    seen[canonical] = i
  return typed


def load_sweep(config_spec: str) -> list[dict[str, Any]]:
  """Imports the experiment file of `path[:arg]` (as `--config=`) and validates its
  `get_sweep(arg)` against `get_config(arg)`; returns the points with typed values."""
  path, *arg = config_spec.split(':', 1)
  module = _load_module(path)
  if not callable(getattr(module, 'get_config', None)):
    raise SweepError(f'{path} defines no get_config(); is it an experiment file?')
  if not callable(getattr(module, 'get_sweep', None)):
    raise SweepError(f'{path} defines no get_sweep(); add one that returns a list of '
                     f'override dicts, e.g. sweeps.product({{"optimizer.learning_rate": '
                     f'[1e-3, 3e-3]}})')
  return validate(module.get_config(*arg), module.get_sweep(*arg))


def read_final_metrics(run_dir: str) -> dict[str, float]:
  """The run's `final_metrics.json`, or {} when the run has not finished.

  An empty or unreadable file (e.g. a run killed while writing it) also counts as not
  finished, with a warning: the point runs again, and its run writes the file anew.
  """
  path = storage.path(run_dir) / 'final_metrics.json'  # Local or gs://.
  try:
    with path.open('rb') as f:
      metrics = json.loads(f.read().decode('utf-8'))
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8.
    logging.warning('%s is unreadable (%s); treating the run as not finished.', path, e)
    return {}
  if not isinstance(metrics, dict) or not isinstance(metrics.get('step', 0), (int, float)):
    logging.warning('%s holds no metrics dict with a numeric step; treating the run as not '
                    'finished.', path)
    return {}
  return metrics


def _table_value(value: Any) -> str:
  if isinstance(value, float) and math.isfinite(value):
    return f'{value:.0f}' if abs(value) >= 1e4 else f'{value:.4g}'
  return '' if value is None else format_value(value)


def write_summary(workdir: str, points: Sequence[Mapping[str, Any]], names: Sequence[str],
                  statuses: Sequence[str], exit_codes: Sequence[int | None]) -> str:
  """Writes `summary.csv` and `summary.md` to `workdir` (atomically); returns the Markdown
  table.

  One row per point: its swept fields, status (`ok`; `failed`, with the run's exit code;
  `unfinished` or `not run`) and the final metrics read from the point's run directory.
  """
  fields = sweep_fields(points)
  metrics = [read_final_metrics(os.path.join(workdir, name)) for name in names]
  present = {key for m in metrics for key in m}
  ordered = [key for key in SUMMARY_METRICS if key in present]
  all_metrics = ordered + sorted(present - set(ordered))

  rows = io.StringIO()
  writer = csv.writer(rows)
  writer.writerow(['point', *fields, 'status', 'exit_code', *all_metrics])
  for name, point, status, code, m in zip(names, points, statuses, exit_codes, metrics):
    writer.writerow([name, *(format_value(point[k]) if k in point else '' for k in fields),
                     status, '' if code is None else code,
                     *(repr(m[k]) if k in m else '' for k in all_metrics)])
  atomic_files.write_text(os.path.join(workdir, 'summary.csv'), rows.getvalue())

  labels = field_labels(fields)
  header = [labels[k] for k in fields] + ['status'] + ordered
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for point, status, code, m in zip(points, statuses, exit_codes, metrics):
    if status == 'failed' and code is not None:
      status = f'failed (exit {code})'
    # Swept values in full: they tell the points apart.
    cells = [format_value(point[k]) if k in point else '' for k in fields] + [status]
    cells += [_table_value(m.get(k)) for k in ordered]
    lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
  table = '\n'.join(lines) + '\n'
  atomic_files.write_text(os.path.join(workdir, 'summary.md'), table)
  return table
