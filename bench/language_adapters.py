"""Do language adapters help? Eval loss per language on a folder of .jsonl documents with
"language" fields, trained the same number of steps from the same base with and without
adapters.

  .venv/bin/python bench/language_adapters.py --data=<folder> [--base_steps=300 --steps=150]

First a base model trains `base_steps` without adapters. Then three runs continue from it
(`init_from_checkpoint`) for `steps` more, same data order and learning rate:
  full:            the whole model, no adapters;
  full_adapters:   the whole model plus language adapters (base and adapters train);
  adapters_only:   the language adapters alone on the frozen base (train_only_adapters).
Each run (and the base itself) is evaluated on the whole validation split, the
next-token loss averaged per token within each language (a position counts for its
document's language; 'none' = documents without one) and over all. Prints a table and
writes JSON (`--out`). Runs live in `--workdir`; one that has finished is not retrained.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

ARMS = ('base', 'full', 'full_adapters', 'adapters_only')


def _config(args, languages, arm: str, base_dir: str):
  """The experiment config of one run: `arm` ('base' or one of the continuations)."""
  from experiments import default  # pylint: disable=g-import-not-at-top
  config = default.get_config(f'size={args.size}')
  config.data.source = 'folder'
  config.data.path = os.path.abspath(args.data)
  config.data.validation_fraction = args.validation_fraction
  if args.cache_dir:
    config.data.cache_dir = args.cache_dir
  config.num_train_steps = args.base_steps if arm == 'base' else args.steps
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps,
                                      config.num_train_steps // 5)
  config.eval_every_steps = config.checkpoint_every_steps = config.num_train_steps
  config.log_every_steps = max(1, config.num_train_steps // 5)
  config.num_eval_batches = 4
  if arm != 'base':
    config.init_from_checkpoint = base_dir
  if arm in ('full_adapters', 'adapters_only'):
    config.model.language_adapters.languages = tuple(languages)
    config.model.language_adapters.bottleneck_dim = args.bottleneck_dim
    config.model.language_adapters.train_only_adapters = arm == 'adapters_only'
  return config


def _train(config, workdir: str) -> None:
  from xenith.train import loop  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(workdir, 'final_metrics.json')):
    loop.train_and_evaluate(config, workdir)


def _eval_by_language(config, workdir: str, languages) -> dict[str, float]:
  """{language: mean next-token loss} over the validation split, and 'all'."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from xenith.data import pipeline  # pylint: disable=g-import-not-at-top
  from xenith.train import checkpointing, steps  # pylint: disable=g-import-not-at-top

  model, params = checkpointing.load_model(config.model, workdir)
  # Batches carry `languages` for the grouping whether or not the model reads them.
  data_config = config.copy_and_resolve_references()
  data_config.model.language_adapters.languages = tuple(languages)
  datasets = pipeline.create_datasets(data_config,
                                      tokenizer=pipeline.load_tokenizer(config, workdir))
  reads_languages = bool(config.model.language_adapters.languages)

  @jax.jit
  def losses(params, batch):
    inputs = {k: batch[k] for k in ('segment_ids', 'positions')}
    if reads_languages:
      inputs['languages'] = batch['languages']
    logits = model.apply({'params': params}, batch['inputs'], **inputs)
    nll, _, weights = steps.next_token_losses(logits, batch['inputs'], batch['segment_ids'])
    return nll, weights

  names = ('none',) + tuple(languages)  # Index = language id.
  total, count = np.zeros(len(names)), np.zeros(len(names))
  for batch in datasets.eval_batches(-1):
    nll, weights = jax.device_get(losses(params, batch))
    np.add.at(total, batch['languages'], nll * weights)
    np.add.at(count, batch['languages'], weights)
  out = {name: float(total[i] / count[i]) for i, name in enumerate(names) if count[i]}
  out['all'] = float(total.sum() / count.sum())
  out['tokens'] = {name: int(count[i]) for i, name in enumerate(names) if count[i]}
  return out


def _languages(folder: str) -> list[str]:
  """The documents' language names, sorted."""
  from xenith.data import documents  # pylint: disable=g-import-not-at-top
  return sorted({d.language for d in documents.read_folder(folder, log_skips=False)} - {''})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', required=True, help='A folder of .jsonl documents with '
                      '"language" fields (documents without one count as "none").')
  parser.add_argument('--size', default='tiny', help="experiments/default.py's size.")
  parser.add_argument('--base_steps', type=int, default=300)
  parser.add_argument('--steps', type=int, default=150, help='Steps of each continuation.')
  parser.add_argument('--bottleneck_dim', type=int, default=16)
  parser.add_argument('--validation_fraction', type=float, default=0.05,
                      help='Share of passages held out (each language needs some).')
  parser.add_argument('--cache_dir', default='', help="config.data.cache_dir ('' = default).")
  parser.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'language_adapters'))
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results',
                                                    'language_adapters.json'))
  args = parser.parse_args()

  languages = _languages(args.data)
  if not languages:
    raise SystemExit(f'{args.data}: no document has a "language" field.')
  base_dir = os.path.join(args.workdir, 'base')
  results = {}
  for arm in ARMS:
    config = _config(args, languages, arm, base_dir)
    workdir = os.path.join(args.workdir, arm)
    _train(config, workdir)
    results[arm] = _eval_by_language(config, workdir, languages)

  columns = [c for c in ('none', *languages, 'all') if c in results['base']]
  print(f'eval loss per language (base {args.base_steps} steps, then {args.steps} more)')
  print('| run | ' + ' | '.join(columns) + ' |')
  print('|---|' + '---|' * len(columns))
  for arm, row in results.items():
    print(f'| {arm} | ' + ' | '.join(f'{row[c]:.4f}' for c in columns) + ' |')
  benchlib.write_json(args.out, {
      'machine': benchlib.machine_info(**benchlib.jax_info()),
      'data': os.path.abspath(args.data), 'size': args.size, 'languages': languages,
      'base_steps': args.base_steps, 'steps': args.steps,
      'validation_fraction': args.validation_fraction,
      'bottleneck_dim': args.bottleneck_dim, 'eval_loss': results})


if __name__ == '__main__':
  main()
