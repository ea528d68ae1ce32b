"""Classifying texts with a trained classifier's workdir: `--mode=classify` and
`xenith.classify(workdir, texts)`.

  predictions = xenith.classify('runs/genre', ['To be, or not to be', ...])
  predictions[0].label, predictions[0].probabilities  # 'tragedy', {'comedy': 0.1, ...}

The workdir gives everything: its config (run.json, or the one passed), tokenizer
(tokenizer.model or tokenizer.json), label names (labels.json) and newest checkpoint.
Texts are encoded as in training (BOS + tokens + EOS, the first max_seq_len - 2 tokens
of a longer one), sorted by length and batched into the training length buckets, so
similar lengths share a compiled step.
"""

import dataclasses
import json
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xenith import atomic_files
from xenith import storage
from xenith.data import documents
from xenith.data import labelled
from xenith.data import pipeline
from xenith.errors import ConfigError
from xenith.errors import DataError
from xenith.errors import WorkdirError
from xenith.model import classifier
from xenith.train import checkpointing
from xenith.train import classification
from xenith.train import run_record
from xenith.train import steps


@dataclasses.dataclass(frozen=True)
class Prediction:
  label: str  # The most probable label.
  probabilities: dict[str, float]  # label -> probability, in label order.


class Classifier:
  """A workdir's classifier, loaded once, for many `predict` calls."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
    config = config if config is not None else run_record.read_config(workdir)
    if config.get('task') != 'classification':
      raise ConfigError('task', f"{workdir} was trained with task={config.get('task')!r}; "
                        "classify needs a task='classification' run")
    try:
      self.labels = classification.read_labels(workdir)
    except FileNotFoundError:
      raise WorkdirError(f'{workdir} has no labels.json: no classification run started '
                         'there.') from None
    self.config = config
    self.tokenizer = pipeline.load_tokenizer(config, workdir)
    item = checkpointing.params_dir(workdir)
    self.model = classifier.make_classifier(config, len(self.labels))
    length = max(8, classification.bucket_multiple(config.model))  # Whole memory chunks.
    shapes = jax.eval_shape(self.model.init, jax.random.key(0),
                            jnp.zeros((1, length), jnp.int32))
    self.params = checkpointing.load_params(item, nn.unbox(shapes)['params'])
    self._buckets = labelled.bucket_lengths(
        config.max_seq_len, classification.bucket_multiple(config.model))
    self._languages = pipeline.language_ids(config)  # With language adapters on.
    self._apply = jax.jit(lambda params, batch: jax.nn.softmax(steps.apply_model(
        self.model, params, batch)[0], axis=-1))

  def predict(self, texts: Sequence[str], batch_size: int = 32,
              languages: Sequence[str] | None = None) -> list[Prediction]:
    """Each text's label and probabilities, in the order given; `languages` (a name per
    text) picks each text's language adapter, when the model has them."""
    texts = list(texts)
    languages = list(languages) if languages is not None else [''] * len(texts)
    if len(languages) != len(texts):
      raise ValueError(f'{len(languages)} languages for {len(texts)} texts.')
    unknown = sorted(set(languages) - set(self._languages or {}) - {''})
    if unknown:
      raise DataError(f'Languages {unknown} have no adapter in this model (its languages: '
                      f'{tuple(self._languages or ())}).')
    examples = [labelled.Example(t, self.labels[0], f'text {i}', language)
                for i, (t, language) in enumerate(zip(texts, languages))]
    encoded = labelled.encode(examples, self.labels, self.tokenizer, self.config.max_seq_len,
                              'input', self._languages)
    order = np.argsort([len(r) for r in encoded.rows], kind='stable')
    probabilities = np.zeros((len(texts), len(self.labels)), np.float32)
    for start in range(0, len(order), batch_size):
      ids = order[start:start + batch_size]
      batch = labelled.pad_batch([encoded.rows[i] for i in ids], [0] * len(ids),
                                 len(ids), self._buckets, encoded.languages_of(ids))
      probabilities[ids] = np.asarray(self._apply(self.params, batch))
    return [Prediction(self.labels[int(np.argmax(p))],
                       {label: float(q) for label, q in zip(self.labels, p)})
            for p in probabilities]


def classify(workdir: str, texts: Iterable[str], config=None,
             batch_size: int = 32) -> list[Prediction]:
  """`Classifier(workdir, config).predict(texts, batch_size)`: each text's label and
  probabilities from the workdir's newest checkpoint."""
  return Classifier(workdir, config).predict(list(texts), batch_size)


def read_texts(path: str) -> list[str]:
  """The texts of `--input`: a .jsonl file's "text" fields, else one per non-empty line
  of a text file or of standard input ('-'). Raises DataError on unreadable input."""
  if path == '-':
    import sys  # pylint: disable=g-import-not-at-top
    lines = sys.stdin.read().split('\n')
    return [line for line in lines if line.strip()]
  file = storage.path(path, '--input')  # Local or gs://.
  if not storage.is_file(file):
    raise DataError(f'--input={path}: no such file.')
  text = documents.decode_file(file)
  if file.suffix.lower() != '.jsonl':
    texts = [line for line in text.split('\n') if line.strip()]
  else:
    texts = []
    for lineno, record in documents.jsonl_records(file, text):
      if not isinstance(record.get('text'), str):
        raise DataError(f'{file}:{lineno}: expected a JSON object with a string "text".')
      texts.append(record['text'])
  if not texts:
    raise DataError(f'--input={path} holds no texts.')
  return texts


def write_jsonl(path: str, texts: Sequence[str], predictions: Sequence[Prediction]) -> None:
  """One {"text", "label", "probabilities"} object per line, written atomically."""
  lines = [json.dumps({'text': t, 'label': p.label, 'probabilities': p.probabilities},
                      ensure_ascii=False) for t, p in zip(texts, predictions)]
  atomic_files.write_text(path, '\n'.join(lines) + '\n')

