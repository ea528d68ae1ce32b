"""Classification: pooling and head against NumPy, scores against scikit-learn, labelled
data checks and bucketed batches, fine-tuning from a language model (vocabulary growth
included), and a trained run read back through TensorBoard, --mode=classify and
xenith.classify."""

import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from experiments import default
from tests import helpers
from xenith import config_defaults
from xenith.data import labelled
from xenith.errors import CheckpointMismatchError, DataError
from xenith.model import build
from xenith.model import classifier
from xenith.train import checkpointing
from xenith.train import classification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**model):
  config = default.get_config('size=tiny')
  config.task = 'classification'
  config.model.vocab_size = 64
  config.model.update(model)
  return config


def _init(model, length=8):
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params'])


def _padded_batch(lengths, length, vocab=64, seed=0):
  rng = np.random.default_rng(seed)
  rows = [rng.integers(4, vocab, n).astype(np.int32) for n in lengths]
  return labelled.pad_batch(rows, [0] * len(rows), len(rows), [length]), rows


@pytest.mark.parametrize('pooling', ['last', 'mean'])
def test_head_is_the_pooled_final_states_times_its_kernel(pooling):
  """Label logits equal NumPy's pooling of the language model's final normalised states
  (the LM decoder with the same params, `features_only`) times the head, and padding a
  row to a longer bucket leaves its logits unchanged."""
  config = _config()
  config.classification.pooling = pooling
  model = classifier.make_classifier(config, 3)
  params = _init(model)
  batch, rows = _padded_batch([5, 9, 2], 12)
  logits = model.apply({'params': params}, batch['inputs'], segment_ids=batch['segment_ids'],
                       positions=batch['positions'], method='forward').class_logits
  lm = build.make_model(config.model)
  lm_params = {k: v for k, v in params.items() if k != classifier.HEAD}
  hidden, _ = lm.apply({'params': lm_params}, batch['inputs'], segment_ids=batch['segment_ids'],
                       positions=batch['positions'], method='forward',
                       features_only=True).features
  hidden = np.asarray(hidden, np.float64)
  head = params[classifier.HEAD]
  for i, row in enumerate(rows):
    states = hidden[i, :len(row)]
    pooled = states[-1] if pooling == 'last' else states.mean(0)
    expected = pooled @ np.asarray(head['kernel'], np.float64) + np.asarray(head['bias'])
    np.testing.assert_allclose(logits[i], expected, rtol=2e-5, atol=2e-5)
  longer, _ = _padded_batch([5, 9, 2], 32)
  again = model.apply({'params': params}, longer['inputs'], segment_ids=longer['segment_ids'],
                      positions=longer['positions'], method='forward').class_logits
  np.testing.assert_allclose(again, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['moe', 'memory'])
def test_moe_and_memory_classifiers_train_and_ignore_padding(kind):
  """A MoE and a chunk-summary-memory classifier: finite loss and gradients that reach
  the head, and (memory) a row padded by whole chunks keeps its logits."""
  config = _config()
  if kind == 'moe':
    config.model.moe.num_experts, config.model.moe.expert_mlp_dim = 4, 32
  else:
    config.model.memory.chunk_size, config.model.memory.layers = 8, (1,)
  model = classifier.make_classifier(config, 2)
  params = _init(model)
  batch, _ = _padded_batch([5, 12], 16)
  batch['labels'] = np.asarray([0, 1], np.int32)
  loss_fn = classification.make_loss_fn(model)
  loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.key(0))
  assert np.isfinite(loss)
  assert float(jnp.abs(grads[classifier.HEAD]['kernel']).sum()) > 0
  if kind == 'memory':
    apply = lambda b: model.apply({'params': params}, b['inputs'], segment_ids=b['segment_ids'],
                                  positions=b['positions'], method='forward').class_logits
    longer, _ = _padded_batch([5, 12], 32)
    np.testing.assert_allclose(apply(longer), apply(batch), rtol=1e-5, atol=1e-5)


def test_scores_match_scikit_learn():
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(2, 6))
    truth = rng.integers(0, n, 50)
    predicted = np.where(rng.random(50) < 0.5, truth, rng.integers(0, n - 1, 50))
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    got = classification.scores(confusion)
    assert got['accuracy'] == pytest.approx(sk_metrics.accuracy_score(truth, predicted))
    assert got['macro_f1'] == pytest.approx(
        sk_metrics.f1_score(truth, predicted, average='macro', zero_division=0)), trial
    p, r, f, _ = sk_metrics.precision_recall_fscore_support(
        truth, predicted, labels=range(n), zero_division=0)
    np.testing.assert_allclose(got['precision'], p)
    np.testing.assert_allclose(got['recall'], r)
    np.testing.assert_allclose(got['f1'], f)
  # A label that neither occurs nor is predicted does not count in the macro average.
  truth, predicted = np.array([0, 0, 1, 1, 3]), np.array([0, 1, 1, 1, 0])
  confusion = np.zeros((4, 4), np.int64)
  np.add.at(confusion, (truth, predicted), 1)
  assert classification.scores(confusion)['macro_f1'] == pytest.approx(
      sk_metrics.f1_score(truth, predicted, average='macro', zero_division=0))
  majority = classification.scores(classification.majority_confusion(truth, 4, 1))
  assert majority['macro_f1'] == pytest.approx(sk_metrics.f1_score(
      truth, np.ones_like(truth), average='macro', zero_division=0))


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def _labelled_config(path, **settings):
  config = config_defaults.get_config()
  config.task = 'classification'
  config.data.source, config.data.path = 'folder', str(path)
  config.classification.update(settings)
  return config


@pytest.mark.parametrize('records, labels, message', [
    ([{'text': 'a'}], (), 'train.jsonl:1: "label" must be a non-empty string (got missing)'),
    ([{'text': 'a', 'label': 3}], (), '"label" must be a non-empty string (got int 3)'),
    ([{'text': 'a', 'label': 'x'}, {'text': 'b', 'label': 'y'}], ('x', 'y', 'z'),
     "Label 'z' of config.classification.labels has no examples in the train split"),
    ([{'text': 'a', 'label': 'x'}], (), 'needs at least two labels'),
])
def test_bad_labels_are_one_clear_error(tmp_path, records, labels, message):
  _write_jsonl(tmp_path / 'train.jsonl', records)
  _write_jsonl(tmp_path / 'validation.jsonl', [{'text': 'v', 'label': 'x'}])
  config = _labelled_config(tmp_path, labels=labels)
  with pytest.raises(DataError, match=None) as error:
    splits = labelled.read_splits(tmp_path, 0.1, 0)
    labelled.label_set(splits, labels)
  assert message in str(error.value)


def test_unknown_validation_label_names_its_line(tmp_path):
  _write_jsonl(tmp_path / 'train.jsonl', [{'text': 'a', 'label': 'x'}, {'text': 'b', 'label': 'y'}])
  _write_jsonl(tmp_path / 'validation.jsonl', [{'text': 'v', 'label': 'x'},
                                               {'text': 'w', 'label': 'poetry'}])
  splits = labelled.read_splits(tmp_path, 0.1, 0)
  with pytest.raises(DataError, match=r"validation.jsonl:2: label 'poetry' does not occur"):
    labelled.label_set(splits, ())


def test_label_folders_and_held_out_split(tmp_path):
  """One sub-folder per label, no split given: a stratified, seeded hold-out."""
  for label, n in (('comedy', 10), ('tragedy', 4)):
    (tmp_path / label).mkdir()
    for i in range(n):
      (tmp_path / label / f'{i}.txt').write_text(f'{label} text {i}')
  splits = labelled.read_splits(tmp_path, 0.2, seed=0)
  held = [e.label for e in splits['validation']]
  assert held.count('comedy') == 2 and held.count('tragedy') == 1
  assert len(splits['train']) == 11
  assert {e.text for e in splits['train']}.isdisjoint(e.text for e in splits['validation'])
  assert labelled.label_set(splits, ()) == ['comedy', 'tragedy']
  assert [e.text for e in labelled.read_splits(tmp_path, 0.2, seed=0)['validation']] == [
      e.text for e in splits['validation']]


def test_language_fields_pick_language_adapters(tmp_path):
  """With language adapters on, each row's `languages` is its record's language id on its
  tokens and 0 on padding; an unlisted language is one error before any tokenizing."""
  records = [{'text': f'word {i} ' * (i + 1), 'label': 'ab'[i % 2],
              'language': ['hin', 'eng', ''][i % 3]} for i in range(12)]
  _write_jsonl(tmp_path / 'train.jsonl', records)
  _write_jsonl(tmp_path / 'validation.jsonl', records[:4])
  config = _labelled_config(tmp_path)
  config.model.language_adapters.languages = ('eng', 'hin')
  config.global_batch_size, config.max_seq_len, config.model.vocab_size = 4, 64, 300
  datasets = labelled.create_datasets(config)
  ids = {'eng': 1, 'hin': 2, '': 0}
  for batch in [next(iter(datasets.train)), *datasets.eval_batches()]:
    for row in range(4):
      if batch['labels'][row] < 0:
        continue
      tokens = batch['inputs'][row].tolist()
      n = int(batch['segment_ids'][row].sum())
      text = datasets.tokenizer.decode(tokens[:n])
      want = next(ids[r['language']] for r in records if r['text'].strip() == text.strip())
      assert batch['languages'][row].tolist() == [want] * n + [0] * (len(tokens) - n)
  config.model.language_adapters.languages = ('eng',)
  with pytest.raises(DataError, match="language 'hin' is not in"):
    labelled.create_datasets(config)


def test_bucketed_batches_cover_every_example_and_resume(tmp_path):
  """Each window of 32 batches holds every example equally often; rows are padded to the
  smallest bucket; the state resumes the exact next batch."""
  n, batch = 64, 8  # One window = 256 rows = 4 epochs.
  rng = np.random.default_rng(0)
  rows = [np.arange(int(k)) + 1 for k in rng.integers(3, 120, n)]
  encoded = labelled.Encoded(rows, list(range(n)), 0)
  buckets = labelled.bucket_lengths(128)
  assert buckets == [32, 64, 128]
  it = labelled.TrainIterator(encoded, batch, 0, batch, buckets, seed=3)
  seen, padded, tokens = [], 0, 0
  for _ in range(32):
    b = next(it)
    real = b['labels'] >= 0
    seen += list(b['labels'][real])
    longest = max(len(rows[i]) for i in b['labels'])
    assert b['inputs'].shape[1] == min(x for x in buckets if x >= longest)
    padded += b['inputs'].size
    tokens += int(b['segment_ids'].sum())
    for i, label in enumerate(b['labels']):
      np.testing.assert_array_equal(b['inputs'][i, :len(rows[label])], rows[label])
  assert sorted(seen) == sorted(list(range(n)) * 4)
  assert padded < 0.8 * 32 * batch * 128  # Bucketing beats padding every row to 128.
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = labelled.TrainIterator(encoded, batch, 0, batch, buckets, seed=3)
  resumed.set_state(json.loads(json.dumps(state)))
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_init_from_a_language_model_with_a_grown_vocabulary(tmp_path):
  """A classifier starts from an LM checkpoint: every decoder param is the LM's, the
  untied LM head is dropped, the label head keeps its fresh init, and an embedding of a
  vocabulary grown by 5 pieces keeps the saved rows at their ids and starts the new rows
  at the saved rows' mean."""
  config = _config(tie_embeddings=False)
  lm_params = _init(build.make_model(config.model))
  checkpointing.save_params(str(tmp_path / 'lm'), lm_params)
  config.model.vocab_size = 69
  model = classifier.make_classifier(config, 3)
  fresh = _init(model)
  loaded = checkpointing.load_base_params(str(tmp_path / 'lm'), fresh)
  assert 'head' not in loaded
  np.testing.assert_array_equal(loaded[classifier.HEAD]['kernel'],
                                fresh[classifier.HEAD]['kernel'])
  saved = np.asarray(lm_params['embed']['embedding'])
  grown = np.asarray(loaded['embed']['embedding'])
  np.testing.assert_array_equal(grown[:64], saved)
  np.testing.assert_allclose(grown[64:], np.repeat(saved.mean(0, keepdims=True), 5, 0),
                             rtol=1e-6)
  for key, value in jax.tree_util.tree_leaves_with_path(lm_params):
    names = [k.key for k in key]
    if names[0] not in ('embed', 'head'):
      got = loaded
      for name in names:
        got = got[name]
      np.testing.assert_array_equal(got, value)
  config.model.vocab_size = 60  # A shrunk vocabulary is an error, not a silent cut.
  with pytest.raises(CheckpointMismatchError, match='embed/embedding has shape'):
    checkpointing.load_base_params(str(tmp_path / 'lm'), _init(classifier.make_classifier(
        config, 3)))


def test_frozen_base_gets_no_gradient():
  config = _config()
  config.classification.freeze_base = True
  model = classifier.make_classifier(config, 2)
  params = _init(model)
  batch, _ = _padded_batch([4, 7], 8)
  batch['labels'] = np.asarray([1, 0], np.int32)
  grads = jax.grad(classification.make_loss_fn(model))(params, batch, jax.random.key(0))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    trains = path[0].key == classifier.HEAD
    assert (float(jnp.abs(g).sum()) > 0) == trains, path


# --- A trained run, end to end ------------------------------------------------------

_WORDS = {'calm': 'sea sky blue wave quiet still', 'storm': 'thunder rain wind dark roar',
          'city': 'street car noise lights crowd'}


def _synthetic_task(folder, seed=0):
  """Three labels, each text drawn from its label's words and shared filler words."""
  rng = np.random.default_rng(seed)
  filler = 'the a and of was it'.split()
  for split, n in (('train', 90), ('validation', 30)):
    records = []
    for i in range(n):
      label = ['calm', 'storm', 'city'][i % 3]
      words = _WORDS[label].split() + filler
      text = ' '.join(rng.choice(words, int(rng.integers(3, 30))))
      records.append({'text': text, 'label': label})
    _write_jsonl(folder / f'{split}.jsonl', records)


def _run(*args, check=True):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args],
                          cwd=REPO, env=helpers.single_device_env(), capture_output=True,
                          text=True, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


_TRAIN_FLAGS = ('--config=experiments/default.py:size=tiny', '--config.task=classification',
                '--config.data.source=folder', '--config.model.vocab_size=300',
                '--config.num_train_steps=40', '--config.eval_every_steps=20',
                '--config.log_every_steps=20', '--config.optimizer.warmup_steps=5',
                '--config.num_eval_batches=-1', '--config.max_seq_len=32')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('classification')
  _synthetic_task(root)
  workdir = root / 'run'
  _run(*_TRAIN_FLAGS, f'--config.data.path={root}', f'--workdir={workdir}')
  return root, workdir


def _images(logdir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = {}
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'images':
          tags.setdefault(value.tag, []).append(event.step)
  return tags


@pytest.mark.slow
def test_trained_classifier_reports_in_tensorboard_and_the_workdir(trained):
  """The run beats the majority baseline; accuracy, macro-F1, per-label scores and the
  confusion image reach TensorBoard at each evaluation; PNG/JSON matrices and the label
  set are in the workdir, and the matrix's counts are the validation split's labels."""
  from tests import event_files  # pylint: disable=g-import-not-at-top
  _, workdir = trained
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['eval/majority_accuracy'] == pytest.approx(1 / 3)
  assert final['eval/accuracy'] > 0.8 and final['eval/macro_f1'] > 0.8
  scalars = event_files.read_scalars(str(workdir))
  for tag in ('eval/accuracy', 'eval/macro_f1', 'eval/f1/storm', 'eval/precision/calm',
              'eval/recall/city', 'eval/majority_macro_f1'):
    assert [s for s, _ in scalars[tag]] == [20, 40], tag
  assert _images(str(workdir)) == {'eval/confusion_matrix': [20, 40]}
  matrix = json.loads((workdir / 'eval' / 'confusion_matrix_40.json').read_text())
  assert matrix['labels'] == ['calm', 'city', 'storm']
  assert np.asarray(matrix['matrix']).sum(1).tolist() == [10, 10, 10]
  assert np.trace(matrix['matrix']) / 30 == pytest.approx(final['eval/accuracy'])
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(workdir / 'eval' / 'confusion_matrix_40.png').size[0] > 100
  assert json.loads((workdir / 'labels.json').read_text())['labels'] == matrix['labels']


@pytest.mark.slow
def test_classify_mode_and_python_call_agree(trained, tmp_path):
  """--mode=classify prints and writes each text's label and probabilities; they equal
  xenith.classify's, sum to one, and get the label words right."""
  import xenith  # pylint: disable=g-import-not-at-top
  _, workdir = trained
  texts = ['thunder rain roar wind', 'quiet blue sea', 'car street crowd lights noise']
  (tmp_path / 'in.txt').write_text('\n'.join(texts) + '\n')
  result = _run('--mode=classify', f'--workdir={workdir}', f'--input={tmp_path / "in.txt"}',
                f'--output={tmp_path / "out.jsonl"}')
  out = [json.loads(line) for line in (tmp_path / 'out.jsonl').read_text().splitlines()]
  assert [o['label'] for o in out] == ['storm', 'calm', 'city']
  assert result.stdout.splitlines()[0].startswith('storm\tcalm=')
  predictions = xenith.classify(str(workdir), texts)
  for o, p in zip(out, predictions):
    assert o['label'] == p.label
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    for label, q in p.probabilities.items():
      assert o['probabilities'][label] == pytest.approx(q, abs=1e-6)
  bad = _run('--mode=classify', f'--workdir={workdir}', f'--input={tmp_path / "none.txt"}',
             check=False)
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
      'DataError: --input=')


@pytest.mark.slow
def test_lora_fine_tune_from_a_language_model_trains_only_adapters_and_head(trained, tmp_path):
  """A LoRA fine-tune from an LM checkpoint (its pinned tokenizer reused): the base params
  in the final checkpoint are the LM's, adapters and head moved."""
  root, lm_like = trained
  config = default.get_config('size=tiny')
  config.model.vocab_size = 300
  lm = tmp_path / 'lm'
  lm_params = _init(build.make_model(config.model))
  checkpointing.save_params(str(lm / 'checkpoints' / '0' / 'state'), lm_params)
  (lm / 'tokenizer.model').write_bytes((lm_like / 'tokenizer.model').read_bytes())
  workdir = tmp_path / 'lora'
  _run(*_TRAIN_FLAGS, f'--config.data.path={root}', f'--workdir={workdir}',
       f'--config.init_from_checkpoint={lm}', '--config.model.lora.rank=4',
       '--config.num_train_steps=6', '--config.eval_every_steps=6')
  assert (workdir / 'tokenizer.model').read_bytes() == (lm / 'tokenizer.model').read_bytes()
  model = classifier.make_classifier(_config(vocab_size=300, lora=ml_collections.ConfigDict(
      {**config.model.lora.to_dict(), 'rank': 4})), 3)
  tuned = checkpointing.load_params(str(workdir), jax.eval_shape(lambda: _init(model)))
  flat_lm = dict(jax.tree_util.tree_leaves_with_path(lm_params))
  same, moved = 0, 0
  for path, value in jax.tree_util.tree_leaves_with_path(tuned):
    if path in flat_lm:
      np.testing.assert_array_equal(value, flat_lm[path])
      same += 1
    else:
      moved += 1
  assert same == len(flat_lm)  # Every LM param is there, unchanged.
  assert moved > 3  # The head's kernel and bias, and the adapters.
