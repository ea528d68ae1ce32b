"""Which language a sentence or document is in: 'hin', 'eng' or 'mix' (code-mixed).

The rules (docs/hinglish.md):
  1. Words are runs of Devanagari letters and marks, or of Latin letters (digits,
     punctuation, emoji and other scripts are no evidence either way). A capitalised
     Latin word after the first word of the text is a name (Rahul, Delhi): no evidence.
  2. A Devanagari word is Hindi. A Latin word is English if it is in `wordfreq`'s English
     list, romanized Hindi if it is the casual romanization (romanize.py) of a word in
     `wordfreq`'s Hindi list. In both lists it goes to the language where it is at least
     `ZIPF_MARGIN` more frequent (`of` = ओफ: English, `hai`: Hindi), else it is ambiguous
     (`the` = थे, `main` = मैं, `to` = तो); in neither (names, typos, rare words) it is unknown.
  3. Ambiguous words are not counted when the sentence has other evidence (the words
     around `main` decide); in a sentence of only ambiguous words each goes to the
     language where it is more frequent (wordfreq's Zipf scale).
  4. With h Hindi and e English words: 'mix' when the smaller of the two is at least
     `MIX_SHARE` of h + e, else the larger one. No evidence at all: 'hin' if the text has
     any Devanagari character (२०२४ ।), else 'eng' (empty text, digits, names).
"""

import functools
import re

# wordfreq and romanize (indic-transliteration) are imported by the lexicons on first use:
# the tokenizer and the pipeline import this module for the tags, and those two take
# 0.2 s to import.

LANGUAGES = ('hin', 'eng', 'mix')
# The language tags, each a single reserved piece of a Hinglish tokenizer: three in use,
# five reserved so that adding languages later keeps every id.
TAGS = {'hin': '<HIN>', 'eng': '<ENG>', 'mix': '<MIX>'}
RESERVED_TAGS = ('<HIN>', '<ENG>', '<MIX>', '<LANG3>', '<LANG4>', '<LANG5>', '<LANG6>',
                 '<LANG7>')

# The minority language's share of counted words from which a sentence is 'mix': one
# English word in a five-word Hindi sentence ("mera office door hai") is code-mixing.
MIX_SHARE = 0.2
# A word in both lexicons belongs to the language where it is this much more frequent
# (Zipf units: 1.5 = about thirty times), else it is ambiguous.
ZIPF_MARGIN = 1.5
# How many words of each wordfreq list the lexicons take (most frequent first).
ENGLISH_WORDS = 50_000
HINDI_WORDS = 20_000

_DEVANAGARI = re.compile(r'[\u0900-\u0963\u0970-\u097F]')
# Devanagari letters and marks (not the dandas U+0964/5, not the digits U+0966-F), or
# Latin letters with an optional apostrophe part (don't, o'er).
_WORD = re.compile(r"[\u0900-\u0963\u0970-\u097F]+|[A-Za-z\u00C0-\u024F]+(?:'[A-Za-z]+)?")


@functools.lru_cache(maxsize=1)
def english_lexicon() -> dict[str, float]:
  """Lowercase English words -> Zipf frequency (wordfreq 'en', most frequent)."""
  import wordfreq  # pylint: disable=g-import-not-at-top
  return {w: wordfreq.zipf_frequency(w, 'en')
          for w in wordfreq.top_n_list('en', ENGLISH_WORDS)
          if re.fullmatch(r"[a-z]+(?:'[a-z]+)?", w)}


@functools.lru_cache(maxsize=1)
def hindi_lexicon() -> dict[str, float]:
  """Casually romanized Hindi words -> Zipf frequency of the most frequent Devanagari word
  with that spelling (wordfreq 'hi', Devanagari entries only)."""
  import wordfreq  # pylint: disable=g-import-not-at-top
  from xenith.data import romanize  # pylint: disable=g-import-not-at-top
  out = {}
  for w in wordfreq.top_n_list('hi', HINDI_WORDS):
    if _DEVANAGARI.search(w) and not re.search('[A-Za-z0-9]', w):
      roman = romanize.romanize_word(w, 'casual')
      if re.fullmatch('[a-z]+', roman) and roman not in out:
        # Ranked lists: the first spelling seen is the most frequent one.
        out[roman] = wordfreq.zipf_frequency(w, 'hi')
  return out


def word_language(word: str) -> str | None:
  """'hin', 'eng', 'ambiguous', or None (unknown) for one word of `_WORD`."""
  if _DEVANAGARI.search(word):
    return 'hin'
  w = word.lower()
  en, hi = english_lexicon().get(w), hindi_lexicon().get(w)
  if en is not None and hi is not None:
    # Each list holds the other language's common words too (English web text quotes
    # 'hai', Hindi text transliterates 'hello'): far more frequent on one side decides.
    return 'eng' if en >= hi + ZIPF_MARGIN else 'hin' if hi >= en + ZIPF_MARGIN else (
        'ambiguous')
  return 'eng' if en is not None else 'hin' if hi is not None else None


def words(text: str) -> list[str]:
  """The words of `text` (rule 1)."""
  return _WORD.findall(text)


def detect(text: str) -> str:
  """'hin', 'eng' or 'mix' for a sentence or document (module doc, rules 1-4)."""
  counts = {'hin': 0, 'eng': 0}
  ambiguous = []
  for i, word in enumerate(words(text)):
    if i and word[0].isupper() and word.isascii() and not word.isupper():
      continue  # A name: Indian names are in both lexicons, and in both languages' text.
    lang = word_language(word)
    if lang == 'ambiguous':
      ambiguous.append(word.lower())
    elif lang:
      counts[lang] += 1
  if not counts['hin'] + counts['eng']:
    for w in ambiguous:
      counts['eng' if english_lexicon()[w] >= hindi_lexicon()[w] else 'hin'] += 1
  h, e = counts['hin'], counts['eng']
  if not h + e:
    return 'hin' if re.search('[\u0900-\u097F]', text) else 'eng'
  if min(h, e) >= MIX_SHARE * (h + e):
    return 'mix'
  return 'hin' if h > e else 'eng'


def tag(text: str) -> str:
  """The language tag of `text`: '<HIN>', '<ENG>' or '<MIX>'."""
  return TAGS[detect(text)]
