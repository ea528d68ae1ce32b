"""The classification task's loss, eval step and metrics (`config.task='classification'`).

The train loop (`loop.py`) runs the same way for both tasks; this module gives it the
classifier's loss, and at each evaluation the confusion matrix over the validation
split, the scalars computed from it and its picture:
  eval/loss, eval/accuracy, eval/macro_f1,
  eval/precision/<label>, eval/recall/<label>, eval/f1/<label>,
  eval/majority_accuracy, eval/majority_macro_f1 (always predicting the train split's
  most frequent label: the baseline),
and `eval/confusion_matrix` as a TensorBoard image, also written as PNG and JSON to
`<workdir>/eval/confusion_matrix_<step>.{png,json}`.

Macro-F1 averages the F1 of the labels that occur in the validation split or among the
predictions (as scikit-learn's `f1_score(average='macro')` does without `labels`); an
F1, precision or recall whose denominator is 0 is 0.
"""

import io
import json
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xenith import atomic_files
from xenith import sharding
from xenith import storage
from xenith.data import pipeline
from xenith.data import tokenizer as tokenizer_lib
from xenith.errors import WorkdirError
from xenith.model import memory
from xenith.train.steps import apply_model


def label_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [batch, labels] float32, labels [batch] int32 (-1 = padding row) ->
  (cross-entropy [batch], weights [batch]: 0 on padding rows)."""
  weights = (labels >= 0).astype(jnp.float32)
  safe = jnp.maximum(labels, 0)
  target = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - target, weights


def make_loss_fn(model: nn.Module, with_aux: bool = False):
  """loss_fn(params, batch, dropout_key) -> mean cross-entropy over the batch's labelled
  rows (+ MoE router losses); with `with_aux`, (loss, (cross-entropy, model metrics))."""

  def loss_fn(params, batch: dict, dropout_key: jax.Array):
    logits, (aux_loss, model_metrics) = apply_model(
        model, params, batch, deterministic=False, rngs={'dropout': dropout_key})
    nll, weights = label_losses(logits, batch['labels'])
    ce = (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    loss = ce if aux_loss is None else ce + aux_loss
    return (loss, (ce, model_metrics)) if with_aux else loss

  return loss_fn


def make_eval_step(model: nn.Module, num_labels: int):
  """eval_step(params, batch) -> {'loss_sum', 'count', 'confusion' [labels, labels]
  (rows: true label, columns: predicted)}, summed over the batch's labelled rows."""

  def eval_step(params, batch):
    logits, _ = apply_model(model, params, batch)
    nll, weights = label_losses(logits, batch['labels'])
    predicted = jnp.argmax(logits, axis=-1)
    true = jax.nn.one_hot(batch['labels'], num_labels) * weights[:, None]  # -1 -> zeros.
    confusion = true.T @ jax.nn.one_hot(predicted, num_labels)
    return {'loss_sum': (nll * weights).sum(), 'count': weights.sum(),
            'confusion': confusion.astype(jnp.int32)}

  return eval_step


def _f1(precision, recall):
  denominator = precision + recall
  return np.where(denominator > 0, 2 * precision * recall / np.maximum(denominator, 1e-30),
                  0.0)


def scores(confusion: np.ndarray) -> dict[str, Any]:
  """Accuracy, per-label precision / recall / F1 and macro-F1 of a confusion matrix
  [true, predicted] (see the module doc for the conventions)."""
  confusion = np.asarray(confusion, np.float64)
  true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
  hits = np.diag(confusion)
  precision = np.where(predicted_counts > 0, hits / np.maximum(predicted_counts, 1), 0.0)
  recall = np.where(true_counts > 0, hits / np.maximum(true_counts, 1), 0.0)
  f1 = _f1(precision, recall)
  present = (true_counts > 0) | (predicted_counts > 0)
  total = confusion.sum()
  return {'accuracy': float(hits.sum() / total) if total else 0.0,
          'macro_f1': float(f1[present].mean()) if present.any() else 0.0,
          'precision': precision, 'recall': recall, 'f1': f1}


def majority_confusion(validation_labels: np.ndarray, num_labels: int,
                       majority: int) -> np.ndarray:
  """The confusion matrix of always predicting `majority`."""
  confusion = np.zeros((num_labels, num_labels), np.int64)
  np.add.at(confusion, (validation_labels, majority), 1)
  return confusion


def _tag(label: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in label)


def summary(confusion, loss_sum, count, labels, majority_scores) -> dict[str, float]:
  """The eval scalars (module doc) from the summed eval outputs."""
  s = scores(confusion)
  out = {'eval/loss': float(loss_sum / max(count, 1.0)), 'eval/accuracy': s['accuracy'],
         'eval/macro_f1': s['macro_f1'],
         'eval/majority_accuracy': majority_scores['accuracy'],
         'eval/majority_macro_f1': majority_scores['macro_f1']}
  for i, label in enumerate(labels):
    for name in ('precision', 'recall', 'f1'):
      out[f'eval/{name}/{_tag(label)}'] = float(s[name][i])
  return out


def confusion_image(confusion: np.ndarray, labels: list[str]) -> np.ndarray:
  """The confusion matrix drawn as an RGB image [height, width, 3] uint8: rows the true
  label, columns the predicted one, each cell shaded by its share of its row, with its
  count."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  confusion = np.asarray(confusion)
  n = len(labels)
  font = ImageFont.load_default()
  caption = 'rows: true label, columns: predicted'
  cell = 56
  margin = 12 + int(max(font.getlength(label) for label in labels))
  size = (max(margin + n * cell + 12, margin + int(font.getlength(caption)) + 12),
          margin + n * cell + 30)
  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  rows = confusion.sum(1, keepdims=True)
  share = np.where(rows > 0, confusion / np.maximum(rows, 1), 0.0)
  for i in range(n):
    draw.text((4, margin + i * cell + cell // 2 - 6), labels[i], fill='black', font=font)
    draw.text((margin + i * cell + 4, margin - 16), labels[i][:cell // 7], fill='black',
              font=font)
    for j in range(n):
      shade = int(255 - 200 * share[i, j])
      x, y = margin + j * cell, margin + i * cell
      draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(shade, shade, 255))
      draw.text((x + 6, y + cell // 2 - 6), str(int(confusion[i, j])),
                fill='white' if share[i, j] > 0.6 else 'black', font=font)
  draw.text((margin, margin + n * cell + 8), caption, fill='black', font=font)
  return np.asarray(image)


class Evaluator:
  """Runs the classifier over the validation split and reports (`evaluate`)."""

  def __init__(self, model, datasets, state_shardings, batch_shardings, mesh, workdir: str):
    self._datasets, self._workdir = datasets, workdir
    self._labels = datasets.labels
    self._step = jax.jit(make_eval_step(model, len(self._labels)),
                         in_shardings=(state_shardings.params, batch_shardings),
                         out_shardings=sharding.replicated(mesh))
    self._batch_shardings = batch_shardings
    self._majority = scores(majority_confusion(
        datasets.validation_labels, len(self._labels), datasets.majority))

  def evaluate(self, params, num_batches: int) -> tuple[dict[str, float], np.ndarray]:
    """(scalars, confusion matrix) over `num_batches` validation batches (-1: all)."""
    n = len(self._labels)
    confusion, loss_sum, count = np.zeros((n, n), np.int64), 0.0, 0.0
    for batch in self._datasets.eval_batches(num_batches):
      out = jax.device_get(self._step(params, sharding.global_batch(
          batch, self._batch_shardings)))
      confusion += out['confusion']
      loss_sum += float(out['loss_sum'])
      count += float(out['count'])
    return summary(confusion, loss_sum, count, self._labels, self._majority), confusion

  def write(self, writer, step: int, scalars: dict[str, float], confusion) -> None:
    """Scalars and the confusion image to TensorBoard; PNG and JSON into the workdir."""
    writer.write_scalars(step, scalars)
    image = confusion_image(confusion, self._labels)
    writer.write_images(step, {'eval/confusion_matrix': image[None]})
    if jax.process_index():
      return
    from PIL import Image  # pylint: disable=g-import-not-at-top
    png = io.BytesIO()
    Image.fromarray(image).save(png, format='PNG')
    stem = f'{storage.check_supported(self._workdir)}/eval/confusion_matrix_{step}'
    storage.path(stem).parent.mkdir(parents=True, exist_ok=True)
    atomic_files.write_bytes(stem + '.png', png.getvalue())
    atomic_files.write_json(stem + '.json', {
        'step': step, 'labels': self._labels, 'rows': 'true label',
        'columns': 'predicted label', 'matrix': np.asarray(confusion).tolist()}, indent=1)
    logging.info('Confusion matrix at step %d: %s.png', step, stem)


def batch_shardings(batch_sharding, config):
  """Shardings of a classification batch: [batch, seq] features (`languages` too with
  language adapters on) and [batch] labels."""
  spec = batch_sharding.spec
  rows = jax.sharding.NamedSharding(batch_sharding.mesh,
                                    jax.sharding.PartitionSpec(spec[0]))
  features = ('inputs', 'segment_ids', 'positions')
  if pipeline.language_ids(config) is not None:
    features += ('languages',)
  return {**{k: batch_sharding for k in features}, 'labels': rows}


def bucket_multiple(model_config) -> int:
  """Row lengths must be whole chunks for a memory model."""
  return model_config.memory.chunk_size if memory.enabled(model_config) else 1


def base_tokenizer(config):
  """The tokenizer the base model was trained with: the one (either kind) pinned in the
  workdir `config.init_from_checkpoint` belongs to (it may name the workdir, its
  checkpoints/, a step or its state/), when `config.data.tokenizer` is 'train' (a new
  tokenizer would not match the base's embeddings). None: `config.data.tokenizer`'s."""
  if not config.init_from_checkpoint or config.data.tokenizer != 'train':
    return None
  path = storage.path(config.init_from_checkpoint, 'config.init_from_checkpoint')
  for directory in (path, *list(path.parents)[:3]):
    pinned = tokenizer_lib.read_pinned(directory)
    if pinned:
      logging.info('Tokenizer: %s, the base model\'s.', pinned.name)
      return pinned
  return None


def labels_path(workdir: str) -> str:
  return f'{storage.check_supported(workdir)}/labels.json'


def pin_labels(workdir: str, labels: list[str]) -> None:
  """Writes the run's label set into the workdir, or checks it against the one there
  (a resume with other labels would silently mean other outputs)."""
  path = labels_path(workdir)
  if storage.is_file(storage.path(path)):
    saved = read_labels(workdir)
    if saved != list(labels):
      raise WorkdirError(f'{path} holds the labels {saved}, the data now gives {labels}; '
                         'the head was trained for the former. Use a new --workdir.')
    return
  if jax.process_index() == 0:
    atomic_files.write_json(path, {'labels': list(labels)}, indent=1)


def read_labels(workdir: str) -> list[str]:
  with storage.path(labels_path(workdir)).open() as f:
    return list(json.load(f)['labels'])

