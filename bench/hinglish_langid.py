"""Hinglish language identification: baselines and a Xenith classifier, on the
validation split the tagger's rules did not produce (xenith/data/hinglish.py).

  .venv/bin/python bench/hinglish_langid.py [--skip_xenith] [--workdir_root=runs/langid]

Rows: the majority class (the train split's), the automatic tagger
(`language_id.detect`, the rules that labelled the generated train split), character
n-gram TF-IDF + logistic regression (scikit-learn, fitted on the train split), and
Xenith small from scratch (experiments/hinglish_langid.py through main.py). Prints the
table and writes bench/results/hinglish_langid.json.
"""

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import shakespeare_genre as genre_bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def char_ngram_baseline(train, validation) -> dict:
  """TF-IDF of character 1-4-grams within words + logistic regression: romanized spellings
  and Devanagari share sub-word pieces that whole words would not."""
  from sklearn import feature_extraction, linear_model, pipeline  # pylint: disable=g-import-not-at-top
  model = pipeline.make_pipeline(
      feature_extraction.text.TfidfVectorizer(analyzer='char_wb', ngram_range=(1, 4),
                                              sublinear_tf=True),
      linear_model.LogisticRegression(C=10.0, max_iter=2000))
  model.fit([t for t, _ in train], [l for _, l in train])
  labels = sorted({label for _, label in train})
  return genre_bench.scores([l for _, l in validation],
                            list(model.predict([t for t, _ in validation])), labels)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--skip_xenith', action='store_true')
  parser.add_argument('--workdir_root', default=os.path.join(ROOT, 'runs', 'langid'))
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results',
                                                    'hinglish_langid.json'))
  args = parser.parse_args()
  from xenith import config_defaults  # pylint: disable=g-import-not-at-top
  from xenith.data import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from xenith.data import hinglish  # pylint: disable=g-import-not-at-top
  from xenith.data import language_id  # pylint: disable=g-import-not-at-top
  cache = cache_lib.cache_dir(config_defaults.get_config().data)
  folder = hinglish.build(cache)
  splits = {split: [(r['text'], r['label']) for r in records]
            for split, records in genre_bench.read_splits(folder).items()}
  train, validation = splits['train'], splits['validation']
  counts = {s: dict(sorted(collections.Counter(l for _, l in rows).items()))
            for s, rows in splits.items()}
  print('Sentences per label:', json.dumps(counts))
  labels = sorted({l for _, l in train})
  truth = [l for _, l in validation]
  start = time.perf_counter()
  rows = [{'model': 'majority class (the train split\'s)',
           **genre_bench.majority_baseline(train, validation)},
          {'model': 'automatic tagger (language_id.detect)',
           **genre_bench.scores(truth, [language_id.detect(t) for t, _ in validation],
                                labels)},
          {'model': 'character 1-4-gram TF-IDF + logistic regression',
           **char_ngram_baseline(train, validation)}]
  baseline_s = round(time.perf_counter() - start, 1)
  if not args.skip_xenith:
    metrics = genre_bench.main_py(os.path.join(args.workdir_root, 'scratch'),
                                  os.path.join(ROOT, 'experiments', 'hinglish_langid.py'))
    rows.append({'model': 'Xenith small, from scratch', 'accuracy': metrics['eval/accuracy'],
                 'macro_f1': metrics['eval/macro_f1'], 'wall_s': metrics['wall_s']})
  print('\n| model | accuracy | macro-F1 |')
  print('|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |")
  benchlib.write_json(args.out, {'machine': benchlib.machine_info(), 'counts': counts,
                                 'baseline_s': baseline_s, 'rows': rows})


if __name__ == '__main__':
  main()
