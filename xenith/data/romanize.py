"""Devanagari -> the Latin spellings people type Hindi in ("Hinglish").

indic-transliteration gives scholarly IAST (`राजधानी` -> `rājadhānī`); chat Hindi drops the
diacritics and most inherent vowels (`rajdhani`). Two styles, used for different things so
that the language-ID task is not scored on the tagger's own spellings (docs/hinglish.md):

  'casual':  IAST without diacritics, inherent 'a' dropped at the end of a word and between
             a vowel-consonant and consonant-vowel (`rajdhani`, `bharat`, `pyar`); the
             automatic tagger's lexicon and the generated training text use it.
  'plain':   IAST without diacritics, every inherent 'a' kept (`rajadhani`, `bharata`).
  'long':    long vowels doubled, inherent 'a' dropped as in 'casual' (`raajdhaanee`,
             `kyaa`, `nahiin`); 'plain' and 'long' spell the validation text.
"""

import functools
import re
import unicodedata

from indic_transliteration import sanscript

STYLES = ('casual', 'plain', 'long')

# Candra O (English loans: ऑफिस) is not in IAST; it is read as O.
_PRE = str.maketrans({'ऑ': 'ओ', 'ॉ': 'ो', 'ॅ': 'े', 'ऍ': 'ए'})
# IAST letters with their usual chat spellings (before diacritics are stripped).
_IAST = [('ch', '\0'), ('c', 'ch'), ('\0', 'chh'), ('ṣ', 'sh'), ('ś', 'sh'), ('ṛ', 'ri'),
         ('r̤', 'r'), ('ṃ', 'n'), ('ṁ', 'n'), ('~', 'n'), ('ḥ', ''), ('ñ', 'n'), ('ṅ', 'n')]
_LONG = [('ā', 'aa'), ('ī', 'ee'), ('ū', 'oo')]
_VOWELS = 'aeiouāīū'
_C = f'[^{_VOWELS}\\W\\d]'  # One consonant letter (IAST, before stripping).
# Schwa deletion: V C+ a # -> V C+ #, and V C a C V -> V C C V (one pass, left to right).
_FINAL_SCHWA = re.compile(f'(?<=[{_VOWELS}])({_C}h?{_C}?h?)a$')
_MEDIAL_SCHWA = re.compile(f'(?<=[{_VOWELS}])({_C}h?)a(?={_C}h?[{_VOWELS}])')


def _strip_marks(s: str) -> str:
  return ''.join(c for c in unicodedata.normalize('NFD', s)
                 if not unicodedata.combining(c))


@functools.lru_cache(maxsize=200_000)
def romanize_word(word: str, style: str = 'casual') -> str:
  """One Devanagari word in Latin letters, lowercase, in `style` (see module doc)."""
  iast = sanscript.transliterate(word.translate(_PRE), sanscript.DEVANAGARI, sanscript.IAST)
  if style != 'plain':
    iast = _MEDIAL_SCHWA.sub(r'\1', _FINAL_SCHWA.sub(r'\1', iast), count=1)
  if style == 'long':
    for a, b in _LONG:
      iast = iast.replace(a, b)
  for a, b in _IAST:
    iast = iast.replace(a, b)
  return _strip_marks(iast).lower()


_DEVANAGARI_WORD = re.compile(r'[\u0900-\u097F]+')


def romanize(text: str, style: str = 'casual') -> str:
  """`text` with every Devanagari word romanized; everything else kept."""
  if style not in STYLES:
    raise ValueError(f'style {style!r} is not one of {STYLES}')
  # Danda / double danda end sentences: a full stop in Latin text.
  text = text.replace('॥', '.').replace('।', '.')
  return _DEVANAGARI_WORD.sub(lambda m: romanize_word(m.group(), style), text)
