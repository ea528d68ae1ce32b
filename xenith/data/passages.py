"""Splitting documents into passages, and passages into train / validation.

A whole play is one document; training on whole documents would put long runs
of one play into consecutive batches. Passages of at most `PASSAGE_CHARS`
characters, cut at blank lines, let the shuffle decorrelate batches and make the
validation split a sample of the whole corpus rather than a few whole works.
"""

import hashlib
import re
from typing import Iterator

# At most this many characters per passage: a scene's worth of dialogue (~40
# lines of verse, ~800 tokens at a 2k vocabulary), several training sequences.
PASSAGE_CHARS = 3000

# One or more blank (or whitespace-only) lines.
_BLANK_LINES = re.compile(r'\n(?:[ \t]*\n)+')


def _hard_split(text: str, max_chars: int) -> list[str]:
  """Splits a paragraph longer than `max_chars` at newlines, then spaces.

  Only a run of `max_chars` characters with neither is cut mid-word.
  """
  pieces = []
  while len(text) > max_chars:
    cut = text.rfind('\n', 1, max_chars + 1)
    if cut <= 0:
      cut = text.rfind(' ', 1, max_chars + 1)
    if cut <= 0:
      cut = max_chars
    head, text = text[:cut].rstrip(), text[cut:].lstrip('\n ')
    if head.strip():
      pieces.append(head)
  if text.strip():
    pieces.append(text)
  return pieces


def split_passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
  """Splits a document into passages of at most `max_chars` characters.

  Paragraphs (separated by blank lines) are packed greedily into passages and
  joined by one blank line; a paragraph longer than `max_chars` is cut at line
  ends (then spaces). Whitespace at the ends of passages is dropped and runs of
  blank lines become one; all other text, indentation included, is kept.

  Args:
    text: a document, with '\n' newlines.
    max_chars: the largest passage, in characters.

  Returns:
    The passages, in document order; empty for a blank document.
  """
  passages = []
  current = ''
  for para in _BLANK_LINES.split(text):
    para = para.rstrip()
    if not para.strip():
      continue
    if not current:
      current = para.lstrip('\n')
    elif len(current) + 2 + len(para) <= max_chars:
      current = f'{current}\n\n{para}'
    else:
      passages.append(current)
      current = para
    if len(current) > max_chars:
      *full, current = _hard_split(current, max_chars)
      passages.extend(full)
  if current:
    passages.append(current)
  return [p.strip() for p in passages if p.strip()]


def passage_hash(source: str, text: str) -> float:
  """A stable number in [0, 1) from a passage and its source's name."""
  digest = hashlib.sha256(f'{source}\0{text}'.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def is_validation(source: str, text: str, fraction: float) -> bool:
  """Whether a passage belongs to the validation split (a stable hash test)."""
  return passage_hash(source, text) < fraction


def iter_passages(docs) -> Iterator[tuple[str, str]]:
  """Yields (source, passage) for each passage of each `Document`."""
  for doc in docs:
    for passage in split_passages(doc.text):
      yield doc.source, passage
