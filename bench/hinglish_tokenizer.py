"""Hinglish tokenizers, tokens per word on held-out text, and the language tagger baseline.

  .venv/bin/python bench/hinglish_tokenizer.py

Tokenizers: the Hinglish tokenizer (8,000 pieces trained on the Hinglish LM corpus's
train split), Mixtral's (32,000), and Mixtral extended with the pieces of a 4,000-piece
BPE model of the corpus's Hindi documents. Held-out text (none of it in the training
text): the 208 gk-hi questions in Devanagari, the same romanized in the 'casual' style
and in the validation's 'plain'/'long' mix, and English sentences of the held-out
Shakespeare plays. Words are `language_id.words` (runs of letters: no digits or
punctuation). Then the automatic tagger (language_id.detect) and the majority class on
the language-ID validation split: accuracy and macro-F1. Prints a table, writes
bench/results/hinglish_tokenizer.json.
"""

import json
import os
import pathlib
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # pylint: disable=wrong-import-position
from xenith.data import hinglish  # pylint: disable=wrong-import-position
from xenith.data import language_id  # pylint: disable=wrong-import-position
from xenith.data import romanize  # pylint: disable=wrong-import-position
from xenith.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                       'hinglish_tokenizer.json')


def scores(gold: list[str], predicted: list[str]) -> dict:
  """Accuracy, macro-F1 over the gold labels, and each label's F1."""
  f1 = {}
  for label in sorted(set(gold)):
    tp = sum(g == p == label for g, p in zip(gold, predicted))
    fp = sum(p == label != g for g, p in zip(gold, predicted))
    fn = sum(g == label != p for g, p in zip(gold, predicted))
    f1[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
  accuracy = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
  return {'accuracy': accuracy, 'macro_f1': sum(f1.values()) / len(f1), 'f1': f1}


def main():
  start = time.perf_counter()
  cache = pathlib.Path(os.environ.get('XENITH_CACHE', '~/.cache/xenith')).expanduser()
  timings = {}
  t = time.perf_counter()
  task = hinglish.build(cache)
  lm = hinglish.build_lm_corpus(cache)
  timings['corpus_s'] = time.perf_counter() - t
  t = time.perf_counter()
  tokenizers = {
      'hinglish-8k': hinglish.tokenizer(cache, 8000),
      'mixtral-32k': tokenizer_lib.Tokenizer(tokenizer_lib.mixtral_model_proto(cache),
                                             'mixtral'),
      'mixtral+hindi': hinglish.extended_mixtral(cache, 4000),
  }
  timings['tokenizers_s'] = time.perf_counter() - t

  questions = hinglish.gk_questions(cache)
  rng = random.Random(0)
  held_out = {
      'devanagari': questions,
      'romanized (casual)': [romanize.romanize(q, 'casual') for q in questions],
      'romanized (plain/long)': [hinglish.validation_romanize(q, rng) for q in questions],
      'english': hinglish.shakespeare_sentences(cache, validation=True),
  }
  rows = {}
  for kind, texts in held_out.items():
    words = sum(len(language_id.words(t)) for t in texts)
    rows[kind] = {'sentences': len(texts), 'words': words}
    for name, tok in tokenizers.items():
      tokens = sum(len(ids) for ids in tok.encode_batch(texts))
      rows[kind][name] = tokens / words

  val = [json.loads(line) for line in open(task / 'validation.jsonl', encoding='utf-8')]
  train = [json.loads(line) for line in open(task / 'train.jsonl', encoding='utf-8')]
  gold = [r['label'] for r in val]
  majority = max(sorted(set(gold)), key=gold.count)  # Ties: the first label by name.
  t = time.perf_counter()
  tagger = {
      'validation': scores(gold, [language_id.detect(r['text']) for r in val]),
      'validation_majority': scores(gold, [majority] * len(gold)),
      'train (generated, circular)': scores(
          [r['label'] for r in train], [language_id.detect(r['text']) for r in train]),
  }
  timings['tagger_s'] = time.perf_counter() - t
  counts = {split: {label: sum(r['label'] == label for r in records)
                    for label in language_id.LANGUAGES}
            for split, records in (('train', train), ('validation', val))}

  names = list(tokenizers)
  print(f"{'tokens per word':<24}" + ''.join(f'{n:>15}' for n in names) + f"{'words':>8}")
  print(f"{'(vocabulary)':<24}" + ''.join(f'{tokenizers[n].vocab_size:>15,}' for n in names))
  for kind, row in rows.items():
    print(f'{kind:<24}' + ''.join(f'{row[n]:>15.2f}' for n in names) + f"{row['words']:>8}")
  print(f'\nlanguage-ID examples: {counts}')
  for what, s in tagger.items():
    per = ', '.join(f'{k} {v:.3f}' for k, v in s['f1'].items())
    print(f"{what:<28} accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}  "
          f'(F1: {per})')
  timings['total_s'] = time.perf_counter() - start
  print(f"\n{timings['total_s']:.1f} s in all")
  result = {'machine': benchlib.machine_info(), 'timings': timings,
            'vocab_sizes': {n: t.vocab_size for n, t in tokenizers.items()},
            'tokens_per_word': rows, 'language_id': {'counts': counts, **tagger},
            'task_folder': str(task), 'lm_corpus_folder': str(lm)}
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
