"""The run's metric writers: TensorBoard, a JSONL file and Weights & Biases, through one
CLU `MultiWriter` (`config.loggers`; the names are checked in config_validation.py).

Each logger is a `clu.metric_writers.interface.MetricWriter`. Only process 0 writes;
the others log to their own terminal (CLU's `just_logging`).
"""

import json
from typing import Any, Mapping

from clu import metric_writers
from clu.metric_writers import interface
import jax

from xenith import storage

JSONL_NAME = 'metrics.jsonl'
WANDB_ID_NAME = 'wandb_run_id'  # The W&B run id of the workdir, so a resume continues it.


def create_writer(config, workdir: str, initial_step: int, hparams: Mapping[str, Any]
                  ) -> interface.MetricWriter:
  """The loop's writer: the terminal log, then each logger of `config.loggers`."""
  names = tuple(config.get('loggers', ('tensorboard',)))
  lead = jax.process_index() == 0
  # create_default_writer's logging writer, plus TensorBoard's event files in the workdir.
  default = metric_writers.create_default_writer(
      workdir if 'tensorboard' in names else None, just_logging=not lead)
  if not lead:
    return default
  writers = [default]
  if 'jsonl' in names:
    writers.append(JsonlWriter(f'{workdir}/{JSONL_NAME}', initial_step))
  if 'wandb' in names:
    writers.append(WandbWriter(config, workdir, hparams))
  return metric_writers.MultiWriter(writers) if len(writers) > 1 else default


class JsonlWriter(interface.MetricWriter):
  """One JSON object per `write_scalars`: {"step": step, tag: value, ...}.

  Resumed at `initial_step` > 0, the file keeps the lines up to that step and drops the
  later ones (written after the restored checkpoint, and logged again by the resume),
  so it reads as an uninterrupted run's. A new run (`initial_step` 0) starts it afresh.
  """

  def __init__(self, path: str, initial_step: int):
    self._path = storage.path(path)
    self._remote = storage.is_remote(path)  # GCS objects cannot be appended to.
    kept = []
    if initial_step > 0 and self._path.exists():
      kept = [line for line in self._path.read_text().splitlines()
              if line.strip() and json.loads(line)['step'] <= initial_step]
    self._lines = kept
    self._path.write_text(''.join(line + '\n' for line in kept))
    self._file = None if self._remote else self._path.open('a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    line = json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
    if self._file is None:
      self._lines.append(line)
    else:
      self._file.write(line + '\n')
      self._file.flush()  # A crash loses no line before it.

  def flush(self) -> None:
    if self._remote:
      self._path.write_text(''.join(line + '\n' for line in self._lines))

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None

  # Only scalars go to the JSONL file.
  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass


class WandbWriter(interface.MetricWriter):
  """A Weights & Biases run (`config.wandb`), its files under <workdir>/wandb.

  WANDB_MODE=offline (or `config.wandb.mode='offline'`) needs no network: `wandb sync
  <workdir>/wandb/offline-run-*` uploads it later. The run id is kept in the workdir
  (`wandb_run_id`), so a resumed run continues the same W&B run.
  """

  def __init__(self, config, workdir: str, hparams: Mapping[str, Any]):
    import wandb  # pylint: disable=g-import-not-at-top  (only runs that log to W&B)
    self._wandb = wandb
    settings = config.wandb
    run_id = settings.run_id or _stored_run_id(workdir)
    self._run = wandb.init(
        project=settings.project, name=settings.name or None, id=run_id,
        entity=settings.entity or None, mode=settings.mode or None, resume='allow',
        dir=storage.check_local(workdir, 'a workdir with loggers=wandb',
                                'W&B writes its run files to local disk'),
        config=dict(hparams), settings=wandb.Settings(console='off', x_disable_stats=True,
                                                      silent=True))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._run.log({k: self._wandb.Html(f'<pre>{_escape(v)}</pre>') for k, v in texts.items()},
                  step=int(step))

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    self._run.log({k: self._wandb.Histogram(v, num_bins=(num_buckets or {}).get(k, 64))
                   for k, v in arrays.items()}, step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._run.config.update(dict(hparams), allow_val_change=True)

  def flush(self) -> None:
    pass  # W&B writes in its own process.

  def close(self) -> None:
    self._run.finish()

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass


def _escape(text: str) -> str:
  return text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


def _stored_run_id(workdir: str) -> str:
  """The workdir's W&B run id, made and saved on the first run."""
  path = storage.path(f'{workdir}/{WANDB_ID_NAME}')
  if path.exists():
    return path.read_text().strip()
  from wandb.sdk.lib import runid  # pylint: disable=g-import-not-at-top
  run_id = runid.generate_id()
  path.write_text(run_id + '\n')
  return run_id
