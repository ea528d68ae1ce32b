"""The train loop: from an experiment config to trained, checkpointed, logged weights.

Read `train_and_evaluate` top to bottom; the jitted steps it runs are in `steps.py`.
"""

import contextlib
import json
import math
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import flax.linen as nn
import jax
import ml_collections

from xenith import atomic_files
from xenith import sharding
from xenith import sigterm
from xenith import storage
from xenith.data import passkey_examples
from xenith.data import labelled
from xenith.data import pipeline
from xenith.errors import NonFiniteError
from xenith.eval import passkey
from xenith.model import classifier
from xenith.model import lora
from xenith.model.build import make_model
from xenith.sizing import flops
from xenith.train import batch_log
from xenith.train import checkpointing
from xenith.train import classification
from xenith.train import histograms
from xenith.train import loggers
from xenith.train import metrics as metrics_lib
from xenith.train import optimizer
from xenith.train import profiling
from xenith.train import progress as progress_lib
from xenith.train import run_record
from xenith.train import samples
from xenith.train.checkpointing import Checkpointer
from xenith.train.steps import jit_train_step, make_eval_step
from xenith.train.train_state import abstract_train_state, init_train_state
from xenith.train.workdir_lock import WorkdirLock


def flatten_config(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """`{'model.embed_dim': 256, ...}` with scalar values, for TensorBoard's HParams view."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten_config(value, name + '.'))
    else:
      out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
  return out


def _evaluate(eval_step, params, datasets, num_batches, batch_sharding) -> dict[str, float]:
  total = None
  for batch in datasets.eval_batches(num_batches):
    metrics = eval_step(params, sharding.global_batch(batch, batch_sharding))
    total = metrics if total is None else total.merge(metrics)
  result = jax.device_get(total.compute())
  loss = float(result['loss'])
  return {'eval/loss': loss, 'eval/perplexity': math.exp(min(loss, 80.0)),
          'eval/accuracy': float(result['accuracy']),
          **metrics_lib.moe_scalars('eval', result['moe'])}


class _LmEvaluator:
  """Next-token loss, perplexity and accuracy over the validation split (`evaluate`)."""

  def __init__(self, model, datasets, state_shardings, batch_sharding, mesh):
    self._datasets, self._batch_sharding = datasets, batch_sharding
    self._step = jax.jit(make_eval_step(model),
                         in_shardings=(state_shardings.params, batch_sharding),
                         out_shardings=sharding.replicated(mesh))

  def evaluate(self, params, num_batches) -> tuple[dict[str, float], None]:
    return _evaluate(self._step, params, self._datasets, num_batches,
                     self._batch_sharding), None

  def write(self, writer, step: int, scalars: dict[str, float], extra) -> None:
    del extra
    writer.write_scalars(step, scalars)


def task_data_and_model(config, batch_sharding, process_index: int, process_count: int,
                        tokenizer):
  """config.task's datasets, model and batch sharding: a language model's packed text, or
  a classifier's labelled batches (whose sharding also covers the labels)."""
  if config.get('task') == 'classification':
    datasets = labelled.create_datasets(
        config, process_index=process_index, process_count=process_count,
        tokenizer=tokenizer, bucket_multiple=classification.bucket_multiple(config.model))
    return (datasets, classifier.make_classifier(config, len(datasets.labels)),
            classification.batch_shardings(batch_sharding, config))
  datasets = pipeline.create_datasets(
      config, process_index=process_index, process_count=process_count,
      tokenizer=tokenizer)
  return datasets, make_model(config.model), batch_sharding


def make_evaluator(config, model, datasets, state_shardings, batch_sharding, mesh,
                   workdir: str):
  """The evaluation of config.task: `evaluate(params, num_batches)` and `write`."""
  if config.get('task') == 'classification':
    return classification.Evaluator(model, datasets, state_shardings, batch_sharding, mesh,
                                    workdir)
  return _LmEvaluator(model, datasets, state_shardings, batch_sharding, mesh)


def passkey_eval_set(config, tokenizer):
  """{length: examples} of config.passkey; None when it has no lengths. Built before any
  compile, so a length too short for the examples fails early."""
  passkey_config = config.get('passkey')
  if passkey_config is None or not passkey_config.lengths:
    return None
  return passkey_examples.make_eval_set(
      tokenizer, passkey_config.lengths, passkey_config.num_examples,
      seed=passkey_config.seed, digits=passkey_config.digits)


def make_passkey_evaluator(config, model, eval_set, state_shardings, batch_sharding, mesh,
                           rules):
  """params -> passkey retrieval scalars (`passkey.evaluate`); every process builds every
  row."""
  predict_step = jax.jit(passkey.make_predict_fn(model),
                         in_shardings=(state_shardings.params, batch_sharding,
                                       batch_sharding),
                         out_shardings=sharding.replicated(mesh))
  row_multiple = sharding.batch_parallelism(dict(mesh.shape), rules)

  def put(x):
    return jax.make_array_from_callback(x.shape, batch_sharding, lambda index: x[index])

  def evaluate(params) -> dict[str, float]:
    def predict(tokens, positions):
      return jax.device_get(predict_step(params, put(tokens), put(positions)))
    return passkey.evaluate(predict, eval_set, config.passkey.batch_size, row_multiple)

  return evaluate


def _read_final(path: str) -> dict[str, Any] | None:
  """A finished run's final_metrics.json; None if absent, empty or unreadable (the run's
  end is then redone: evaluated and written again)."""
  try:
    with storage.path(path).open() as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning('%s is unreadable (%s); writing it again.', path, e)
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_changes: tuple[str, ...] = ()) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Holds the workdir's lock (`workdir_lock.py`) throughout. A resume must have the config,
  tokenizer and data the workdir was trained with (`run_record.py`), but for the config
  fields (or prefixes), 'tokenizer' and 'data' named in `allow_changes`. Returns the
  final train and eval metrics (also written to workdir/final_metrics.json); {} when a
  SIGTERM came before the first step.
  """
  if jax.process_count() == 1:
    # From the start: a SIGTERM during set-up ends the run too. (Several processes
    # leave SIGTERM to JAX's preemption notifier, which all of them consult together.)
    sigterm.install()
  holds_lock = jax.process_index() == 0
  with WorkdirLock(workdir) if holds_lock else contextlib.nullcontext():
    return _train_and_evaluate(config, workdir, tuple(allow_changes))


def _has_checkpoint(workdir: str) -> bool:
  directory = storage.path(workdir) / 'checkpoints'
  return directory.is_dir() and any(d.name.isdigit() for d in directory.iterdir())


def _train_and_evaluate(config, workdir, allow_changes) -> dict[str, float]:
  """`train_and_evaluate` under the workdir lock."""
  record = run_record.RunRecord(workdir)
  resuming = _has_checkpoint(workdir)
  if resuming:
    record.check_config(config, allow_changes)  # Before any long work.
  elif jax.process_index() == 0:
    record.forget()
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  mesh = sharding.create_mesh(config.mesh)
  logging.info('Mesh: %s', dict(mesh.shape))

  batch_sharding = sharding.batch_sharding(mesh, rules)
  # The rows of each global batch this process's devices hold: its share to feed.
  block, blocks = sharding.process_rows(batch_sharding, config.global_batch_size)
  # The run's own tokenizer, unless a new one is allowed in.
  tokenizer = None if 'tokenizer' in allow_changes else record.pinned_tokenizer()
  classifying = config.get('task') == 'classification'
  if classifying and tokenizer is None:
    tokenizer = classification.base_tokenizer(config)
  datasets, model, batch_sharding = task_data_and_model(config, batch_sharding, block,
                                                        blocks, tokenizer)
  if resuming:
    record.check_data(datasets.tokenizer, datasets.fingerprint, allow_changes)
  if classifying:
    classification.pin_labels(workdir, datasets.labels)
  passkey_set = passkey_eval_set(config, datasets.tokenizer)
  if passkey_set:
    passkey_every = config.passkey.every_steps or config.eval_every_steps
  tx = optimizer.create_optimizer(config)
  lr_schedule = optimizer.learning_rate_schedule(config)

  with (jax.set_mesh(mesh), nn.logical_axis_rules(rules),
        Checkpointer(workdir, config.keep_checkpoints) as checkpointer):
    abstract_state, state_shardings = abstract_train_state(
        model, tx, config.max_seq_len, mesh, rules)
    loss_fn = (classification.make_loss_fn(model, with_aux=True) if classifying
               else None)
    train_step = jit_train_step(model, tx, config, mesh, state_shardings, batch_sharding,
                                loss_fn=loss_fn)
    evaluator = make_evaluator(config, model, datasets, state_shardings, batch_sharding,
                               mesh, workdir)
    passkey_eval = None if passkey_set is None else make_passkey_evaluator(
        config, model, passkey_set, state_shardings, batch_sharding, mesh, rules)

    train_iter = iter(datasets.train)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    restored = checkpointer.restore_latest(abstract_state, train_iter)
    extra = {}  # The restored step's notes (see `Checkpointer.save`).
    if restored is None:
      state = init_train_state(model, tx, config.max_seq_len, init_key, state_shardings)
      if config.get('init_from_checkpoint'):  # E.g. the base model of a LoRA fine-tune.
        state = state.replace(params=checkpointing.load_base_params(
            config.init_from_checkpoint, state.params))
    else:
      state, extra = restored
    saved_metrics = extra.get('metrics')  # Accumulated since the last log before the save.
    initial_step = int(state.step)
    if jax.process_index() == 0:
      record.write(config, datasets.tokenizer, datasets.fingerprint, initial_step,
                   allow_changes)
      logging.info('Config: %s', run_record.write_config_text(workdir, config))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    logging.info('Parameters: %d; starting at step %d', num_params, initial_step)
    if lora.enabled(config.model):
      logging.info('LoRA adapters: %d params', lora.num_adapter_params(state.params))
    final_path = f'{storage.check_supported(workdir)}/final_metrics.json'
    if initial_step >= config.num_train_steps:
      final = _read_final(final_path)
      if final is not None:
        logging.info('Already trained to step %d; nothing to do.', initial_step)
        return final
    if jax.process_count() == 1 and sigterm.received():
      logging.warning('SIGTERM before the first step: nothing new to save; exiting.')
      return {}

    writer = loggers.create_writer(config, workdir, initial_step, flatten_config(config))
    if initial_step == 0:
      writer.write_hparams(flatten_config(config))
      baseline = {} if classifying else {'eval/unigram_baseline_loss': datasets.unigram_loss}
      writer.write_scalars(0, {**baseline, 'train/num_params': num_params})
    progress = progress_lib.Progress(config.num_train_steps)  # The terminal lines.
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_train_steps, writer=writer,
        every_steps=config.log_every_steps)

    # Classification rows are padded to length buckets: MFU and tokens/s count the
    # longest bucket, an upper bound.
    tokens_per_step = config.global_batch_size * config.max_seq_len
    model_flops_per_step = flops.train_flops_per_token(
        config.model, config.max_seq_len) * tokens_per_step
    peak_flops = flops.peak_flops(config.peak_flops_per_device)
    pending = None  # TrainMetrics accumulated since the last log.
    train_summary, eval_summary, passkey_summary = {}, {}, {}
    interval_start, interval_steps = None, 0
    skips = _SkipCounter(config, checkpointer)
    fed = batch_log.BatchLog.from_env()  # Tests: which rows each process fed.
    # Observability (docs/observability.md): each is off unless its config field is set.
    profiler = profiling.StepProfiler(config, workdir)
    sampler = None if classifying else samples.SampleWriter(config, model, datasets.tokenizer)
    hists = histograms.HistogramWriter(config, model, mesh, state_shardings, batch_sharding)

    def check_finite(step):
      if pending is not None and config.on_nonfinite == 'stop':
        if float(pending.nonfinite_steps.compute()) > 0:
          last = checkpointer.latest_step()
          raise NonFiniteError(
              f'Non-finite loss or gradients at or before step {step}. Stopped without '
              f'saving; the last checkpoint (step {last}) is intact. Lower the learning '
              f'rate, or set --config.on_nonfinite=skip to skip such steps.')

    if initial_step >= config.num_train_steps:  # Trained, but final_metrics.json is lost.
      eval_summary, _ = evaluator.evaluate(state.params, config.num_eval_batches)
      train_summary = extra.get('summary') or {}
    for step in range(initial_step + 1, config.num_train_steps + 1):
      profiler.before(step)  # Outside the annotation, which the trace must see start.
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        local_batch = next(train_iter)
        fed.add(step, local_batch)
        batch = sharding.global_batch(local_batch, batch_sharding)
        hists.grads(step, state, batch, dropout_key)  # Before the step: it donates state.
        state, metrics = train_step(state, batch, dropout_key)
      profiler.after(step, state)
      hists.write(writer, step, state)
      skips.add(metrics, step)
      if saved_metrics is not None:  # Resumed mid-interval: log what a non-stop run logs.
        pending, saved_metrics = metrics_lib.from_json(metrics, saved_metrics), None
      pending = metrics if pending is None else pending.merge(metrics)
      if interval_start is None:  # Time from the end of the first (compiling) step.
        jax.block_until_ready(state.step)
        interval_start = time.perf_counter()
        progress.first_step_done(step)
      else:
        interval_steps += 1
      report_progress(step)

      last_step = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last_step:
        check_finite(step)
        summary = jax.device_get(pending.compute())
        elapsed = time.perf_counter() - interval_start
        moe_summary = summary.pop('moe')  # Router losses, expert loads; {} if dense.
        train_summary = {f'train/{k}': float(v) for k, v in summary.items()}
        train_summary.update(metrics_lib.moe_scalars('train', moe_summary))
        train_summary['train/learning_rate'] = float(lr_schedule(step - 1))
        if interval_steps:
          step_time = elapsed / interval_steps
          train_summary.update({
              'train/step_time': step_time,
              'train/tokens_per_sec': tokens_per_step / step_time,
              'train/mfu': model_flops_per_step / step_time / peak_flops})
        writer.write_scalars(step, train_summary)
        logging.info(progress.train_line(step, train_summary))
        pending, interval_steps, interval_start = None, 0, time.perf_counter()

      if step % config.eval_every_steps == 0 or last_step:
        jax.block_until_ready(state)  # Finish queued train steps: they are train time.
        eval_start = time.perf_counter()
        with report_progress.timed('eval', wait_jax_async_dispatch=False):
          eval_summary, eval_extra = evaluator.evaluate(state.params,
                                                        config.num_eval_batches)
        evaluator.write(writer, step, eval_summary, eval_extra)
        logging.info(progress.eval_line(step, eval_summary))
        if sampler is not None:
          sampler.write(writer, step, state.params)
        interval_start += time.perf_counter() - eval_start  # Evaluation is not train time.

      if passkey_set and (step % passkey_every == 0 or last_step):
        jax.block_until_ready(state)
        passkey_start = time.perf_counter()
        with report_progress.timed('passkey', wait_jax_async_dispatch=False):
          passkey_summary = passkey_eval(state.params)
        writer.write_scalars(step, passkey_summary)
        logging.info(progress.eval_line(step, passkey_summary, 'passkey'))
        interval_start += time.perf_counter() - passkey_start  # Not train time either.

      stopping = _preempted(checkpointer, step)
      if stopping:
        logging.warning('SIGTERM received: checkpointing step %d, then exiting.', step)
      if step % config.checkpoint_every_steps == 0 or last_step or stopping:
        check_finite(step)
        notes = {'summary': train_summary,
                 'metrics': None if pending is None else metrics_lib.to_json(pending)}
        checkpointer.save(step, state, train_iter, clean=skips.clean_since_save(),
                          notes=notes)
      if stopping:
        logging.warning('Stopping at step %d after SIGTERM; the checkpoint is saved.', step)
        break

    profiler.stop()
    writer.close()  # Flushes; ends a W&B run.

  final = {'step': int(state.step), **train_summary, **eval_summary, **passkey_summary}
  if jax.process_index() == 0:
    atomic_files.write_json(final_path, final, indent=2)
  return final


def _preempted(checkpointer: Checkpointer, step: int) -> bool:
  """Whether to save `step` and stop: a SIGTERM came. Several processes stop together at
  the step JAX's preemption sync point names (Orbax's `reached_preemption`), so all of
  them save the same step."""
  if jax.process_count() == 1:
    return sigterm.received()
  return checkpointer.reached_preemption(step)


class _SkipCounter:
  """Skipped (non-finite) updates with on_nonfinite='skip': stops the run after
  `config.max_consecutive_nonfinite` in a row, and tells saves whether any update since
  the previous save was skipped (`Checkpointer` never deletes the newest clean save).

  Each step's flag is read one step late, so the host does not wait for the device.
  """

  def __init__(self, config, checkpointer):
    self._active = config.on_nonfinite == 'skip'
    self._limit = config.get('max_consecutive_nonfinite', 20)
    self._checkpointer = checkpointer
    self._unread = None  # (step, metrics) whose flag is not read yet.
    self._in_a_row = 0
    self._since_save = False

  def add(self, metrics, step: int) -> None:
    if not self._active:
      return
    self._read()
    self._unread = (step, metrics)

  def _read(self) -> None:
    if self._unread is None:
      return
    step, metrics = self._unread
    self._unread = None
    if float(jax.device_get(metrics.nonfinite_steps.total)) == 0:
      self._in_a_row = 0
      return
    self._in_a_row += 1
    self._since_save = True
    if self._in_a_row >= self._limit:
      raise NonFiniteError(
          f'{self._in_a_row} updates in a row up to step {step} were non-finite and '
          f'skipped (config.max_consecutive_nonfinite={self._limit}); the run is '
          'diverging. Stopped without saving; the newest checkpoint saved before the '
          f'skipping is kept in {self._checkpointer.directory}. Lower the learning rate.')

  def clean_since_save(self) -> bool:
    """Whether no update since the previous save was skipped (resets the record)."""
    self._read()
    clean = not self._since_save
    self._since_save = False
    return clean

