"""--mode=eval (xenith/eval/standalone.py): a trained workdir's checkpoints on the
validation split and on a folder the test writes, against a NumPy log-softmax over the
model's logits and against training's own evaluation of the same step."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import eval_workdir
import event_files
from helpers import single_device_env
from xenith.data import cache as cache_lib
from xenith.data import pipeline
from xenith.data import sources
from xenith.data import text_dataset
from xenith.errors import CheckpointMismatchError
from xenith.eval import standalone
from xenith.train import checkpointing
from xenith.train import run_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _numpy_loss(model, params, rows):
  """(mean next-token NLL, top-1 accuracy) over packed rows {'inputs', 'segment_ids',
  'positions'} [n, L], from the model's logits and a NumPy log-softmax."""
  logits = np.asarray(jax.jit(lambda p, r: model.apply(
      {'params': p}, r['inputs'], segment_ids=r['segment_ids'], positions=r['positions'],
      method='forward').logits)(params, rows), np.float64)  # [n, L, vocab]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  inputs, segments = np.asarray(rows['inputs']), np.asarray(rows['segment_ids'])
  nll, hits = [], []
  for b, t in zip(*np.nonzero((segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0))):
    nll.append(-logp[b, t, inputs[b, t + 1]])
    hits.append(np.argmax(logits[b, t]) == inputs[b, t + 1])
  return float(np.mean(nll)), float(np.mean(hits))


def _main(*args):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT,
                        env=single_device_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def trained():
  return eval_workdir.trained()


def test_validation_split_loss_json_and_tensorboard(trained):
  """The newest checkpoint (step 4) on the default source's validation split: loss and
  accuracy equal NumPy's over the same batches and training's final eval; perplexity is
  exp(loss); passkey as training scored it; JSON and TensorBoard under eval_<name>/."""
  workdir, final = trained
  result = standalone.evaluate(workdir)
  assert (result.name, result.step) == ('shakespeare_validation', eval_workdir.NUM_STEPS)
  s = result.scalars
  prefix = 'eval_shakespeare_validation/'
  assert s[prefix + 'loss'] == pytest.approx(final['eval/loss'], rel=1e-5)
  assert s[prefix + 'perplexity'] == pytest.approx(np.exp(s[prefix + 'loss']), rel=1e-6)
  assert s[prefix + 'passkey/accuracy_128'] == final['passkey/accuracy_128']
  # NumPy over the batches the pipeline gives, params read from the step's checkpoint.
  config = eval_workdir.config()
  batches = list(pipeline.create_datasets(
      config, tokenizer=pipeline.load_tokenizer(config, workdir)).eval_batches(
          config.num_eval_batches))
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  model, params = checkpointing.load_model(config.model, f'{workdir}/checkpoints/4')
  loss, accuracy = _numpy_loss(model, params, rows)
  assert s[prefix + 'loss'] == pytest.approx(loss, rel=2e-4)
  assert s[prefix + 'accuracy'] == pytest.approx(accuracy, abs=1e-6)
  with open(os.path.join(workdir, 'eval', 'shakespeare_validation_step4.json')) as f:
    written = json.load(f)
  assert written['step'] == 4 and written['split'] == 'validation'
  assert written['metrics'] == pytest.approx(s)
  scalars = event_files.read_scalars(workdir)
  assert scalars[prefix + 'loss'] == [(4, pytest.approx(s[prefix + 'loss'], rel=1e-6))]
  assert [step for step, _ in scalars['eval/loss']] == [2, 4]  # Training's, untouched.


def test_checkpoint_step_picks_that_step(trained):
  """--checkpoint_step=2 evaluates step 2: training's own eval/loss at step 2 (from its
  event file), not step 4's."""
  workdir, _ = trained
  result = standalone.evaluate(workdir, step=2, name='early')
  trained_at_2 = dict(event_files.read_scalars(workdir)['eval/loss'])[2]
  assert result.step == 2
  assert result.scalars['eval_early/loss'] == pytest.approx(trained_at_2, rel=1e-5)
  assert result.scalars['eval_early/loss'] != pytest.approx(
      dict(event_files.read_scalars(workdir)['eval/loss'])[4], rel=1e-5)
  assert os.path.exists(os.path.join(workdir, 'eval', 'early_step2.json'))


def test_errors_before_any_compile(trained, tmp_path):
  workdir, _ = trained
  with pytest.raises(CheckpointMismatchError, match=r'steps \[2, 4\]'):
    standalone.evaluate(workdir, step=3)
  other = run_record.read_config(workdir)
  other.model.embed_dim = 32
  with pytest.raises(CheckpointMismatchError, match='does not match this config'):
    standalone.evaluate(workdir, other)
  os.makedirs(tmp_path / 'empty')
  with open(os.path.join(workdir, 'run.json')) as f, open(tmp_path / 'empty' / 'run.json',
                                                          'w') as g:
    g.write(f.read())
  with pytest.raises(CheckpointMismatchError, match='no checkpoint'):
    standalone.evaluate(str(tmp_path / 'empty'))


def _row(tokenizer, text, length):
  """The packed row of one document: BOS + text + EOS, zero-padded to `length`."""
  ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
  row = np.zeros((1, length), np.int32)
  row[0, :len(ids)] = ids
  return {'inputs': row, 'segment_ids': (np.arange(length) < len(ids))[None] * 1,
          'positions': np.arange(length)[None] * 1}


def test_main_eval_on_a_folder_split_by_split(trained, tmp_path):
  """main.py --mode=eval with --config.data.* overrides of the workdir's config, on a
  folder of two one-passage documents (one goes to each split): --split=train scores
  the train split's document, its row BOS + text + EOS, as NumPy does."""
  workdir, _ = trained
  folder = tmp_path / 'poems'
  folder.mkdir()
  texts = ['Shall I compare thee to a summer day', 'The quality of mercy is not strained']
  for i, text in enumerate(texts):
    (folder / f'poem{i}.txt').write_text(text + '\n')
  result = _main('--mode=eval', f'--workdir={workdir}', '--config.data.source=folder',
                 f'--config.data.path={folder}', '--split=train', '--eval_name=poem')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'eval_poem/loss' in result.stdout
  with open(os.path.join(workdir, 'eval', 'poem_step4.json')) as f:
    written = json.load(f)
  assert written['source'] == 'folder' and written['split'] == 'train'
  config = run_record.read_config(workdir)
  config.data.source, config.data.path = 'folder', str(folder)
  # Which document the folder source put in its train split (it picks by hash).
  cache = cache_lib.cache_dir(config.data)
  prepared = text_dataset.prepare(sources.make_source(config.data, cache),
                                  config.data.validation_fraction, cache)
  held_in = [t for t in texts if t in prepared.train[0]['text'].decode()]
  assert len(prepared.train) == 1 and len(held_in) == 1
  tokenizer = pipeline.load_tokenizer(config, workdir)
  model, params = checkpointing.load_model(config.model, workdir)
  loss, accuracy = _numpy_loss(model, params, _row(tokenizer, held_in[0], config.max_seq_len))
  other, _ = _numpy_loss(model, params, _row(
      tokenizer, next(t for t in texts if t != held_in[0]), config.max_seq_len))
  assert abs(loss - other) > 1e-2  # The splits are told apart.
  assert written['metrics']['eval_poem/loss'] == pytest.approx(loss, rel=2e-4)
  assert written['metrics']['eval_poem/accuracy'] == pytest.approx(accuracy, abs=1e-6)
