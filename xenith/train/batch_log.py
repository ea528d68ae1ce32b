"""Which rows each process fed to each step: a record for checking multi-host feeding.

With XENITH_BATCH_LOG=<folder> set, every process appends one JSON line per train step to
`<folder>/process-<i>.jsonl`: {"step", "process", "rows": [sha256 of each row's tokens]}.
Comparing the files of a 2-process run with a 1-process run's shows that each process fed
only its own rows, and that together they fed the same global batches. Off (no cost)
without the variable.
"""

import hashlib
import json
import os

import jax
import numpy as np

ENV = 'XENITH_BATCH_LOG'


class BatchLog:
  """Appends this process's rows of each step to its file (or does nothing)."""

  def __init__(self, folder: str | None):
    self._path = None
    if folder:
      os.makedirs(folder, exist_ok=True)
      self._path = os.path.join(folder, f'process-{jax.process_index()}.jsonl')

  @classmethod
  def from_env(cls) -> 'BatchLog':
    return cls(os.environ.get(ENV))

  def add(self, step: int, batch: dict[str, np.ndarray]) -> None:
    """batch: this process's rows, {'inputs': int32 [rows, seq], ...}."""
    if self._path is None:
      return
    rows = [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest()[:16]
            for row in batch['inputs']]
    with open(self._path, 'a') as f:
      f.write(json.dumps({'step': step, 'process': jax.process_index(), 'rows': rows})
              + '\n')
