"""The seed twins' results: validation loss at 1x / 2x / 4x the training length and passkey
per-digit accuracy, with memory and without, from trained workdirs.

  .venv/bin/python bench/seed_twins.py --train   # trains the 4 twins (main.py), then reports
  .venv/bin/python bench/seed_twins.py           # reports on runs/twins/<twin>_memory_<on|off>

Training runs `main.py --config=experiments/<seed>.py:size=small,memory=<on|off>` (250
steps each, 15-25 minutes on 2 CPU cores) in a workdir per twin. Each workdir's newest params are evaluated on the whole validation split cut into rows of
each length (the same text at every length); passkey accuracy is what the run's last
evaluation logged (final_metrics.json; `config.passkey.lengths` are 1x / 2x / 4x).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position


TWINS = [(seed, f'size=small,memory={memory}') for seed in ('xenith_mini', 'xenith_beast')
         for memory in ('on', 'off')]


def _config(seed: str, arg: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'experiments.{seed}').get_config(arg)


def evaluate(config, workdir: str) -> dict:
  """{'config', 'steps', 'loss': {length: validation loss}, 'digit_accuracy': {...}}."""
  import jax  # pylint: disable=g-import-not-at-top
  from xenith.data import pipeline  # pylint: disable=g-import-not-at-top
  from xenith.train import checkpointing, steps  # pylint: disable=g-import-not-at-top

  final = json.load(open(os.path.join(workdir, 'final_metrics.json')))
  tokenizer = pipeline.load_tokenizer(config, workdir)
  model, params = checkpointing.load_model(config.model, workdir)
  eval_step = jax.jit(steps.make_eval_step(model))
  losses = {}
  for factor in (1, 2, 4):
    length = factor * config.max_seq_len
    at_length = config.copy_and_resolve_references()
    at_length.max_seq_len = length
    datasets = pipeline.create_datasets(at_length, tokenizer=tokenizer)
    total = None
    for batch in datasets.eval_batches(-1):
      metrics = eval_step(params, batch)
      total = metrics if total is None else total.merge(metrics)
    losses[length] = float(jax.device_get(total.compute())['loss'])
  accuracy = {int(k.rsplit('_', 1)[1]): v for k, v in final.items()
              if k.startswith('passkey/digit_accuracy_')}
  return {'config': config.size, 'memory': config.model.memory.chunk_size > 0,
          'steps': final['step'], 'loss': losses, 'digit_accuracy': accuracy}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdirs', default=os.path.join(ROOT, 'runs', 'twins'),
                      help='The folder of the twins\' workdirs.')
  parser.add_argument('--train', action='store_true', help='Train twins not trained yet.')
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results',
                                                    'seed_twins.json'))
  args = parser.parse_args()
  rows = []
  for seed, arg in TWINS:
    workdir = os.path.join(args.workdirs, f'{seed}_memory_{arg.rsplit("=", 1)[1]}')
    if args.train and not os.path.exists(os.path.join(workdir, 'final_metrics.json')):
      subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'),
                      f'--config={ROOT}/experiments/{seed}.py:{arg}', f'--workdir={workdir}'],
                     check=True)
    if os.path.exists(os.path.join(workdir, 'final_metrics.json')):
      rows.append({'twin': f'{seed}:{arg}', **evaluate(_config(seed, arg), workdir)})
  print('| twin | memory | steps | eval loss 1x / 2x / 4x | passkey digit accuracy 1x / 2x / 4x |')
  print('|---|---|---|---|---|')
  for r in rows:
    lengths = sorted(r['loss'])
    loss = ' / '.join(f'{r["loss"][n]:.3f}' for n in lengths)
    acc = ' / '.join(f'{r["digit_accuracy"].get(n, float("nan")):.2f}' for n in lengths)
    print(f'| {r["config"]} | {"on" if r["memory"] else "off"} | {r["steps"]} | {loss} '
          f'({"/".join(str(n) for n in lengths)} tokens) | {acc} |')
  benchlib.write_json(args.out, {'machine': benchlib.machine_info(), 'rows': rows})


if __name__ == '__main__':
  main()
