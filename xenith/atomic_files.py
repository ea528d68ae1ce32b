"""Files written so that a reader (or a rerun after a kill) never sees a partial one.

Locally, everything goes to a temporary name in the destination's folder, is flushed to
disk, and is renamed over the destination (`os.replace`, atomic on POSIX file systems). A
kill or a full disk leaves the old file (or none), never a truncated one. On an object
store (gs://, see `storage.py`) an object appears only once its upload completes, whole,
so the file is written (uploaded) directly; a rename there would be a copy.
"""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

from etils import epath

from xenith import storage


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside `path`; on success it is renamed to `path`.

  For writers that take a path (np.savez, safetensors' save_file). On an exception the
  temporary file is removed and `path` is left as it was. For a gs:// `path` the
  temporary file is local and uploaded on success.
  """
  if storage.is_remote(path):
    with tempfile.TemporaryDirectory(prefix='xenith-upload-') as folder:
      tmp = os.path.join(folder, 'file')
      yield tmp
      epath.Path(tmp).copy(storage.path(path), overwrite=True)
    return
  path = storage.check_supported(path)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                             suffix='.tmp')
  os.close(fd)
  try:
    yield tmp
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  if storage.is_remote(path):
    storage.path(path).write_bytes(data)  # Folders are implicit in a bucket.
    return
  with replacing(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str | os.PathLike, value: Any, **kwargs) -> None:
  """Writes `value` as JSON to `path` atomically (`kwargs` go to `json.dumps`)."""
  write_text(path, json.dumps(value, **kwargs) + '\n')
