"""`--mode=eval`: a trained workdir's checkpoint on any data source and split.

  python main.py --mode=eval --workdir=runs/tiny [--checkpoint_step=200] [--split=train]
      [--config.data.source=folder --config.data.path=<dir>] [--eval_name=poems]

The config is the workdir's (run.json) with the overrides given, or --config; the
tokenizer is the one the run pinned. A language model reports next-token loss,
perplexity (exp(loss)) and top-1 accuracy over `config.num_eval_batches` batches (-1:
the whole split), plus the passkey scores when the config has passkey lengths; a
classifier (task='classification') its eval metrics. The scalars go to
`<workdir>/eval/<name>_step<N>.json` and to TensorBoard as `eval_<name>/...` at step N,
apart from the training run's own `eval/` tags.
"""

import dataclasses
import re

from absl import logging
from clu import metric_writers
import flax.linen as nn
import jax
import ml_collections

from xenith import atomic_files
from xenith import sharding
from xenith import storage
from xenith.config_validation import validate
from xenith.data import pipeline
from xenith.errors import CheckpointMismatchError
from xenith.errors import ConfigError
from xenith.errors import DataError
from xenith.train import checkpointing
from xenith.train import classification
from xenith.train import loop
from xenith.train import optimizer
from xenith.train import run_record
from xenith.train.train_state import abstract_train_state


@dataclasses.dataclass(frozen=True)
class Result:
  name: str  # The tag prefix is f'eval_{name}'.
  step: int  # The checkpoint's step.
  scalars: dict[str, float]  # 'eval_<name>/loss', ...
  path: str  # The JSON file written.


def checkpoint_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps of `workdir`, ascending."""
  return checkpointing.committed_steps(storage.path(workdir, '--workdir') / 'checkpoints')


def pick_step(workdir: str, step: int | None) -> int:
  """`step` if the workdir has it, else its newest; CheckpointMismatchError otherwise."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise CheckpointMismatchError(f'{workdir} has no checkpoint to evaluate.')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointMismatchError(f'--checkpoint_step={step}: {workdir} has checkpoints '
                                  f'at steps {steps}.')
  return step


def default_name(config) -> str:
  """'<source>_<split>', e.g. 'shakespeare_validation'."""
  return f'{config.data.source}_{config.data.eval_split}'


def _tag_safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]', '_', name)


def _renamed(scalars: dict[str, float], prefix: str) -> dict[str, float]:
  """'eval/loss' -> '<prefix>/loss'; 'passkey/accuracy_64' -> '<prefix>/passkey/...'."""
  return {prefix + '/' + (k[len('eval/'):] if k.startswith('eval/') else k): float(v)
          for k, v in scalars.items()}


def evaluate(workdir: str, config: ml_collections.ConfigDict | None = None, *,
             step: int | None = None, split: str | None = None,
             name: str | None = None) -> Result:
  """Evaluates checkpoint `step` (None: the newest) of `workdir` and writes the results.

  config: None = the workdir's run.json. split: sets config.data.eval_split.
  Raises XenithError subclasses (one line) on bad input, before any compile.
  """
  config = config if config is not None else run_record.read_config(workdir)
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy to set the split.
  if split:
    config.data.eval_split = split
  validate(config, jax.device_count(), jax.process_count())
  step = pick_step(workdir, step)
  item = f'{storage.check_supported(workdir)}/checkpoints/{step}'
  classifying = config.get('task') == 'classification'
  if classifying and config.data.eval_split != 'validation':
    raise ConfigError('data.eval_split', 'a classification run is evaluated on its '
                      "'validation' split")
  name = _tag_safe(name or default_name(config))
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  mesh = sharding.create_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  block, blocks = sharding.process_rows(batch_sharding, config.global_batch_size)
  tokenizer = pipeline.load_tokenizer(config, workdir)  # The run's pinned copy.
  datasets, model, batch_sharding = loop.task_data_and_model(config, batch_sharding, block,
                                                             blocks, tokenizer)
  if classifying:
    labels = classification.read_labels(workdir)
    if list(datasets.labels) != labels:
      raise ConfigError('data', f'the data has the labels {datasets.labels}; the head was '
                        f'trained for {labels}')
  else:
    split_name = config.data.eval_split
    if not datasets.stats.get(f'{split_name}_passages', 1):
      raise DataError(f"config.data.eval_split='{split_name}': the {config.data.source} "
                      'data has no passages in that split.')
  passkey_set = None if classifying else loop.passkey_eval_set(config, tokenizer)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state, state_shardings = abstract_train_state(
        model, optimizer.create_optimizer(config), config.max_seq_len, mesh, rules)
    # Raises CheckpointMismatchError naming the first difference: before any compile.
    params = checkpointing.load_params(item, abstract_state.params)
    evaluator = loop.make_evaluator(config, model, datasets, state_shardings,
                                    batch_sharding, mesh, workdir)
    scalars, _ = evaluator.evaluate(params, config.num_eval_batches)
    if passkey_set:
      scalars.update(loop.make_passkey_evaluator(
          config, model, passkey_set, state_shardings, batch_sharding, mesh, rules)(params))

  scalars = _renamed(scalars, f'eval_{name}')
  path = f'{storage.check_supported(workdir)}/eval/{name}_step{step}.json'
  if jax.process_index() == 0:
    storage.path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json(path, {
        'step': step, 'name': name, 'source': config.data.source,
        'path': config.data.path, 'split': config.data.eval_split,
        'num_eval_batches': config.num_eval_batches, 'metrics': scalars}, indent=1)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(step, scalars)
  writer.flush()
  logging.info('Evaluation of step %d written to %s', step, path)
  return Result(name, step, scalars, path)


def format_table(result: Result) -> str:
  """The scalars as a two-column table, for the terminal."""
  width = max(len(k) for k in result.scalars)
  lines = [f'{"step":<{width}}  {result.step}']
  lines += [f'{k:<{width}}  {v:.6g}' for k, v in result.scalars.items()]
  return '\n'.join(lines + [f'Written to {result.path}'])

