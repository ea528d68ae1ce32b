"""Documents from a local folder of `.txt` and `.jsonl` files (or `.txt.gz` / `.jsonl.gz`),
validated up front.

A `.txt` file is one document; a `.jsonl` file holds one document per line, a JSON
object with a string field "text" (or `text_key`, config.data.text_key) and optionally a
string field "language" (the name the
language adapters know it by, e.g. "hin"; none = ''). Folders are searched recursively, in sorted
order of relative path; hidden files and folders (names starting with '.') are
ignored. Bad input (a binary file, bytes that are not UTF-8, a malformed JSON line)
raises `DataError` naming the file (and byte offset or line); empty documents are
skipped, counted and logged.
"""

import dataclasses
import gzip
import hashlib
import json
import pathlib
from typing import Iterator

from absl import logging

from xenith.errors import DataError

SUFFIXES = ('.txt', '.jsonl', '.txt.gz', '.jsonl.gz')
_BINARY_SAMPLE = 4096  # Bytes read to tell a binary file from text in another encoding.


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: `source` is its file's path relative to the folder; `language` its
  record's "language" field ('' when it has none, and for .txt files)."""
  source: str
  text: str
  language: str = ''


@dataclasses.dataclass
class DocumentStats:
  """Counts from one pass over a folder."""
  documents: int = 0  # Non-empty documents yielded.
  skipped_empty: int = 0  # Documents that were empty or only whitespace.


def list_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
  """The `.txt`/`.jsonl` files under `folder`, recursively, in sorted order."""
  root = pathlib.Path(folder).expanduser()
  if not root.is_dir():
    raise DataError(f'Data folder {str(root)!r} does not exist or is not a folder '
                    '(config.data.path).')
  files = []
  for path in root.rglob('*'):
    rel = path.relative_to(root)
    if any(part.startswith('.') for part in rel.parts):
      continue
    if path.name.lower().endswith(SUFFIXES) and path.is_file():
      files.append(path)
  if not files:
    raise DataError(f'Data folder {str(root)!r} has no .txt or .jsonl files (nor .gz ones).')
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def folder_fingerprint(folder: str | pathlib.Path) -> str:
  """A hash of relative paths, sizes and modification times of the folder's files.

  Cheap (no file is read), so an unchanged folder is recognised instantly; any
  edit, addition, removal or rename changes it.
  """
  root = pathlib.Path(folder).expanduser()
  return stat_fingerprint(root, list_files(root))


def stat_fingerprint(root: pathlib.Path, files: list[pathlib.Path]) -> str:
  """A hash of each file's path relative to `root` (its name when `root` is the one
  file), size and modification time."""
  h = hashlib.sha256()
  for path in files:
    st = path.stat()
    name = path.name if root.is_file() else path.relative_to(root).as_posix()
    h.update(f'{name}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()


def _binary(data: bytes) -> str | None:
  """Why `data` is binary rather than text (None if it is not): a NUL byte anywhere, or
  control bytes among mostly non-text bytes (random bytes, an image, an archive). Text
  in another encoding (Latin-1) has no control bytes: it gets the UTF-8 error instead."""
  nul = data.find(b'\0')
  if nul >= 0:
    return f'NUL byte at offset {nul}'
  sample = data[:_BINARY_SAMPLE].decode('utf-8', errors='replace')
  controls = sum(c < ' ' and c not in '\t\n\r\f\v\b\x1b' for c in sample)
  odd = controls + sample.count('\ufffd')
  if controls and odd > 0.3 * len(sample):
    return f'{odd} of its first {len(sample)} characters are not text'
  return None


def _decode(path: pathlib.Path, data: bytes) -> str:
  binary = _binary(data)
  if binary:
    raise DataError(f'{path}: a binary file, not text ({binary}); remove it from the data '
                    'folder (config.data.path).')
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: not valid UTF-8 at byte offset {e.start} '
                    f'(byte 0x{data[e.start]:02x}).') from None
  # Newlines are normalised so that passages split the same way on every OS.
  return text.removeprefix('\ufeff').replace('\r\n', '\n').replace('\r', '\n')


def _read(path: pathlib.Path) -> bytes:
  """A file's bytes, gunzipped for a .gz file (DataError on a broken archive)."""
  data = path.read_bytes()
  if not path.name.lower().endswith('.gz'):
    return data
  try:
    return gzip.decompress(data)
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: not a readable gzip file ({e}).') from None


def decode_file(path: pathlib.Path) -> str:
  """A file's text, checked as `read_folder` checks it (binary, UTF-8; DataError)."""
  return _decode(path, _read(path))


def jsonl_records(path: pathlib.Path, text: str) -> Iterator[tuple[int, dict]]:
  """Yields (line number, JSON object) of each line of a .jsonl file's `text`; blank lines
  are not records. DataError (naming the line) on malformed JSON or a non-object."""
  for lineno, line in enumerate(text.split('\n'), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{lineno}: malformed JSON ({e.msg} at column '
                      f'{e.colno}).') from None
    if not isinstance(record, dict):
      raise DataError(f'{path}:{lineno}: expected a JSON object, got '
                      f'{type(record).__name__}.')
    yield lineno, record


def _jsonl_texts(path: pathlib.Path, text: str,
                 text_key: str = 'text') -> Iterator[tuple[int, str, str]]:
  """Yields (line number, text, language) of each record."""
  for lineno, record in jsonl_records(path, text):
    if text_key not in record:
      raise DataError(f'{path}:{lineno}: expected a JSON object with a "{text_key}" '
                      f'field (config.data.text_key); it has {sorted(record)}.')
    if not isinstance(record[text_key], str):
      raise DataError(f'{path}:{lineno}: field "{text_key}" must be a string, got '
                      f'{type(record[text_key]).__name__}.')
    yield lineno, record[text_key], record_language(f'{path}:{lineno}', record)


def record_language(where: str, record: dict) -> str:
  """A record's optional "language" field ('' without one); DataError naming `where`
  ('file:line') when it is not a string."""
  language = record.get('language', '')
  if not isinstance(language, str):
    raise DataError(f'{where}: field "language" must be a string, got '
                    f'{type(language).__name__}.')
  return language


def read_folder(folder: str | pathlib.Path, stats: DocumentStats | None = None,
                log_skips: bool = True, text_key: str = 'text') -> Iterator[Document]:
  """Yields the folder's non-empty documents; counts into `stats` if given.

  `text_key` names the field of each .jsonl record that holds its text.
  `log_skips=False` keeps later passes over an already checked folder quiet.

  Raises:
    DataError: missing or empty folder, binary files, undecodable bytes, malformed JSON
      lines.
  """
  root = pathlib.Path(folder).expanduser()
  stats = stats if stats is not None else DocumentStats()
  for path in list_files(root):
    rel = path.relative_to(root).as_posix()
    text = _decode(path, _read(path))
    if path.name.lower().endswith(('.jsonl', '.jsonl.gz')):
      records = [(f'{rel}:{n}', t, lang)
                 for n, t, lang in _jsonl_texts(path, text, text_key)]
    else:
      records = [(rel, text, '')]
    for where, doc_text, language in records:
      if not doc_text.strip():
        stats.skipped_empty += 1
        if log_skips:
          logging.warning('Skipping empty document %s (%d skipped so far).',
                          where, stats.skipped_empty)
        continue
      stats.documents += 1
      yield Document(source=rel, text=doc_text, language=language)

