"""Where a run's files live: local folders and gs:// buckets, behind one path type.

Every file a run reads or writes (the workdir and all in it: checkpoints, TensorBoard,
run.json, the pinned tokenizer, final_metrics.json, the lock; `init_from_checkpoint`;
Hugging Face import and export folders; sweeps; memory-bank files; a tokenizer file a
config names) is an `etils.epath.Path` made by `path()`, the type Orbax takes too.
Behind it:

  local paths  the OS (`~` expanded, made absolute);
  gs://        TensorFlow's GCS file system (`tf.io.gfile`), which etils picks when
               TensorFlow is installed. It is a requirement (CLU's TensorBoard writer
               needs it and writes its event files through the same file system).
               Checkpoint arrays go through TensorStore's gcs driver (Orbax), and the
               workdir lock through TensorStore's conditional writes (`workdir_lock.py`).

`check_supported` refuses anything else before any work, in one line: another scheme
(s3://, az://, hf://, memory://: TensorFlow 2.21 has no file system for them), a URL
whose slash went missing (`gs:/bucket`, as `os.path.normpath` makes of `gs://bucket`),
a gs:// URL without a bucket. So no local folder named after a URL (`gs:`) is ever made.
The data cache stays local (`xenith/data/cache.py` says why).
"""

import contextlib
import functools
import importlib.util
import os
import re
import tempfile
from typing import Iterator

from etils import epath

from xenith.errors import StorageError
from xenith.errors import WorkdirError

SUPPORTED_SCHEMES = ('gs',)
_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$', re.DOTALL)
_MANGLED_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*:(/|$)')  # gs:/bucket/run, gs:


def scheme(url: str | os.PathLike) -> str | None:
  """'gs' for gs://bucket/dir; None for a local path."""
  match = _URL.match(os.fspath(url))
  return match.group(1).lower() if match else None


def is_remote(url: str | os.PathLike) -> bool:
  return scheme(url) is not None


@functools.cache
def _gcs_unavailable() -> str | None:
  """Why gs:// cannot be used in this environment; None when it can."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ('TensorFlow is not installed (tensorflow-cpu, in requirements.txt: its '
            'tf.io.gfile reads and writes gs://)')
  if 'gs' not in tf.io.gfile.get_registered_schemes():
    return 'this TensorFlow build has no GCS file system'
  if importlib.util.find_spec('google.cloud.storage') is None:
    return ('google-cloud-storage is not installed (in requirements.txt: Orbax asks '
            'the bucket for its layout through it)')
  return None


def check_supported(url: str | os.PathLike, what: str = 'path') -> str:
  """`url` as `path()` takes it: a local path made absolute, or a gs:// URL.

  Raises StorageError, naming `what` (e.g. '--workdir'), for a URL no installed backend
  handles, before anything is read or written.
  """
  text = os.fspath(url)
  if not text:
    raise StorageError(f'{what} is empty.')
  match = _URL.match(text)
  if match is None:
    if _MANGLED_URL.match(text):
      raise StorageError(
          f'{what}={text} looks like a URL with a slash missing (gs://bucket/dir); '
          f'refusing to make a local folder named {text.split("/")[0]!r}.')
    return os.path.abspath(os.path.expanduser(text))
  name, rest = match.group(1).lower(), match.group(2).rstrip('/')
  if name not in SUPPORTED_SCHEMES:
    raise StorageError(
        f'{what}={text}: no installed storage backend handles {name}:// URLs; use a '
        'local path or gs://bucket/dir.')
  if not rest.split('/')[0]:
    raise StorageError(f'{what}={text} names no bucket (gs://bucket/dir).')
  reason = _gcs_unavailable()
  if reason:
    raise StorageError(f'{what}={text}: {reason}.')
  return f'{name}://{rest}'


def path(url: str | os.PathLike, what: str = 'path') -> epath.Path:
  """The `epath.Path` of a local path or supported URL (see `check_supported`)."""
  return epath.Path(check_supported(url, what))


def make_workdir(url: str) -> str:
  """`--workdir` checked (`check_supported`) and created; WorkdirError if it is a file.

  The workdir as every other module takes it: an absolute local path or a gs:// URL.
  """
  workdir = check_supported(url, '--workdir')
  folder = epath.Path(workdir)
  if folder.exists() and not folder.is_dir():
    raise WorkdirError(f'--workdir={url} is a file, not a folder.')
  folder.mkdir(parents=True, exist_ok=True)
  return workdir


def check_local(url: str | os.PathLike, what: str, why: str) -> str:
  """`url` made absolute; StorageError (saying `why`) when it is a URL."""
  if is_remote(url) or _MANGLED_URL.match(os.fspath(url)):
    raise StorageError(f'{what}={os.fspath(url)} must be a local folder: {why}.')
  return check_supported(url, what)


def is_file(p: epath.Path) -> bool:
  """Whether `p` exists and is not a folder (epath has no is_file for every backend)."""
  return p.exists() and not p.is_dir()


@contextlib.contextmanager
def local_copy(folder: str | os.PathLike) -> Iterator[str]:
  """A local folder with the files (not subfolders) of `folder`: `folder` itself when it
  is local, else a temporary copy, removed afterwards. For readers that need a local file
  (safetensors maps its files into memory)."""
  source = path(folder)
  if not is_remote(source):
    yield os.fspath(source)
    return
  with tempfile.TemporaryDirectory(prefix='xenith-copy-') as tmp:
    if source.is_dir():
      for child in source.iterdir():
        if not child.is_dir():
          child.copy(epath.Path(tmp) / child.name)
    yield tmp
