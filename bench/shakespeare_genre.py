"""The Shakespeare genre task's table: baselines and Xenith classifiers, accuracy and
macro-F1 on the validation plays (xenith/data/shakespeare_genre.py).

  .venv/bin/python bench/shakespeare_genre.py                 # every row
  .venv/bin/python bench/shakespeare_genre.py --skip_xenith   # the baselines only

On 2 CPU cores the baselines took 7 minutes (mostly the 30 fits of the grid search); the
Xenith rows are estimated at ~30 minutes more (the LM ~8, each classifier ~5 plus its
evaluations). Results go to bench/results/shakespeare_genre.json and docs/classification.md.

Rows:
  majority       the train split's most common genre, for every passage;
  bag of words   TF-IDF of words and word pairs + logistic regression (scikit-learn), its
                 C chosen by 5-fold cross-validation grouped by play on the train plays;
  Xenith rows    `main.py` runs in `--workdir_root`, each scored by its workdir's
                 final_metrics.json: an LM (experiments/default.py, 350 steps) on
                 `build_lm_corpus` (every text but the validation plays); a classifier
                 from scratch (experiments/shakespeare_genre.py); fine-tuned from the LM,
                 in full (`:base=<lm>`) and with LoRA (`:base=<lm>,lora=8`). A run whose
                 final_metrics.json exists is not run again.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

# Inverse regularisation strengths the grouped cross-validation picks from.
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
LORA_RANK = 8


def scores(truth: list[str], predicted: list[str], labels: list[str]) -> dict:
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  return {'accuracy': float(metrics.accuracy_score(truth, predicted)),
          'macro_f1': float(metrics.f1_score(truth, predicted, labels=labels,
                                             average='macro', zero_division=0))}


def majority_baseline(train: list[tuple[str, str]],
                      validation: list[tuple[str, str]]) -> dict:
  """Accuracy and macro-F1 of predicting the train split's most common label
  (ties: the first in sorted order) for every (text, label) of `validation`."""
  counts = collections.Counter(label for _, label in train)
  top = max(sorted(counts), key=counts.get)
  labels = sorted({label for _, label in train + validation})
  return scores([label for _, label in validation], [top] * len(validation), labels)


def _pipeline(c: float):
  from sklearn import feature_extraction, linear_model, pipeline  # pylint: disable=g-import-not-at-top
  # Words of one letter too ('O', 'I'): the default pattern drops them.
  return pipeline.make_pipeline(
      feature_extraction.text.TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                              token_pattern=r'(?u)\b\w+\b'),
      linear_model.LogisticRegression(C=c, max_iter=2000))


def choose_c(train: list[tuple[str, str]], groups: list[str], folds: int = 5) -> float:
  """The C of `C_GRID` with the best macro-F1 in cross-validation grouped by `groups`
  (the play of each train row): each fold scores plays its model never saw, as the
  validation split does."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  search = model_selection.GridSearchCV(
      _pipeline(1.0), {'logisticregression__C': list(C_GRID)}, scoring='f1_macro',
      cv=model_selection.GroupKFold(n_splits=folds))
  search.fit([t for t, _ in train], [l for _, l in train], groups=groups)
  return float(search.best_params_['logisticregression__C'])


def bag_of_words_baseline(train: list[tuple[str, str]], validation: list[tuple[str, str]],
                          c: float) -> dict:
  """Accuracy and macro-F1 on `validation` of TF-IDF + logistic regression (C=`c`)
  fitted on `train`."""
  model = _pipeline(c).fit([t for t, _ in train], [l for _, l in train])
  labels = sorted({label for _, label in train + validation})
  return scores([l for _, l in validation], list(model.predict([t for t, _ in validation])),
                 labels)


def main_py(workdir: str, config: str, *flags: str) -> dict:
  """Runs main.py unless `workdir` has final_metrics.json; returns those metrics and the
  run's wall time (None when it ran before)."""
  final = os.path.join(workdir, 'final_metrics.json')
  seconds = None
  if not os.path.exists(final):
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={config}',
           f'--workdir={workdir}', *flags]
    print('Running', ' '.join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = round(time.perf_counter() - start, 1)
  with open(final) as f:
    return {**json.load(f), 'wall_s': seconds}


def xenith_rows(root: str, lm_corpus: str) -> tuple[dict, list[dict]]:
  """Trains (or reuses) the LM and the three classifiers; (LM metrics, table rows)."""
  lm = os.path.join(root, 'lm')
  lm_metrics = main_py(lm, os.path.join(ROOT, 'experiments', 'default.py'),
                        '--config.data.source=folder', f'--config.data.path={lm_corpus}')
  experiment = os.path.join(ROOT, 'experiments', 'shakespeare_genre.py')
  runs = [('Xenith small, from scratch', 'scratch', ''),
          ('Xenith small, fine-tuned from the LM (full)', 'finetune', f':base={lm}'),
          (f'Xenith small, fine-tuned from the LM (LoRA rank {LORA_RANK})', 'lora',
           f':base={lm},lora={LORA_RANK}')]
  rows = []
  for name, folder, arg in runs:
    metrics = main_py(os.path.join(root, folder), experiment + arg)
    rows.append({'model': name, 'accuracy': metrics['eval/accuracy'],
                 'macro_f1': metrics['eval/macro_f1'], 'wall_s': metrics['wall_s'],
                 'workdir': os.path.join(root, folder)})
  return lm_metrics, rows


def read_splits(folder) -> dict[str, list[dict]]:
  """{'train': records, 'validation': records} of a labelled task's folder."""
  splits = {}
  for split in ('train', 'validation'):
    with open(folder / f'{split}.jsonl', encoding='utf-8') as f:
      splits[split] = [json.loads(line) for line in f]
  return splits


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--skip_xenith', action='store_true',
                      help='Only the baselines (no main.py runs).')
  parser.add_argument('--workdir_root', default=os.path.join(ROOT, 'runs', 'genre'),
                      help="The folder of the Xenith runs' workdirs.")
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results',
                                                    'shakespeare_genre.json'))
  args = parser.parse_args()

  from xenith import config_defaults  # pylint: disable=g-import-not-at-top
  from xenith.data import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from xenith.data import shakespeare_genre as genre  # pylint: disable=g-import-not-at-top
  cache = cache_lib.cache_dir(config_defaults.get_config().data)
  folder = genre.build(cache)
  splits = read_splits(folder)
  train = [(r['text'], r['label']) for r in splits['train']]
  validation = [(r['text'], r['label']) for r in splits['validation']]
  counts = {split: dict(sorted(collections.Counter(r['label'] for r in rows).items()))
            for split, rows in splits.items()}
  print('Passages per genre:', json.dumps(counts))

  start = time.perf_counter()
  rows = [{'model': 'majority class', **majority_baseline(train, validation)}]
  c = choose_c(train, [r['play'] for r in splits['train']])
  rows.append({'model': f'bag of words (TF-IDF + logistic regression, C={c:g})',
               **bag_of_words_baseline(train, validation, c)})
  baseline_s = round(time.perf_counter() - start, 1)
  lm_metrics = None
  if not args.skip_xenith:
    lm_metrics, more = xenith_rows(args.workdir_root, str(genre.build_lm_corpus(cache)))
    rows += more

  print('\n| model | accuracy | macro-F1 |')
  print('|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |")
  benchlib.write_json(args.out, {
      'machine': benchlib.machine_info(), 'data_version': genre.VERSION,
      'validation_plays': list(genre.VALIDATION_PLAYS), 'passages': counts,
      'baseline_s': baseline_s, 'lm': lm_metrics, 'rows': rows})


if __name__ == '__main__':
  main()
