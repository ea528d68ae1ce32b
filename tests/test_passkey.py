"""Passkey retrieval: example construction, scoring, and the scalars the train loop writes."""

import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import default
import event_files
from xenith.data import passkey_examples
from xenith.eval import passkey
from xenith.config_validation import ConfigError, validate
from xenith.data import tokenizer as tokenizer_lib
from xenith.model.build import make_model
from helpers import single_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('the king and queen walk to the castle where a fool sings of green grass blue '
         'sky yellow sun and keys that pass from hand to hand remember what is there '
         'here we go back again').split()


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """A small BPE SentencePiece model trained as the pipeline trains one (digits unseen)."""
  rng = random.Random(0)
  texts = [' '.join(rng.choice(WORDS) for _ in range(60)).capitalize() + '.'
           for _ in range(200)]
  split = [{'text': t.encode()} for t in texts]
  return tokenizer_lib.train_tokenizer(split, 300, tmp_path_factory.mktemp('cache'),
                                       'passkey-test')


def _count(haystack, needle):
  n = len(needle)
  return sum(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


@pytest.mark.parametrize('length', [120, 300, 1025])
def test_examples_have_the_length_one_passkey_and_its_answer(tokenizer, length):
  examples = passkey_examples.make_examples(tokenizer, length, 6, seed=3, digits=5)
  assert len(examples) == 6
  for e in examples:
    assert e.tokens.shape == (length,) and e.tokens.dtype == np.int32
    assert e.tokens[0] == tokenizer.bos_id
    assert len(e.passkey) == 5 and e.passkey.isdigit() and e.passkey[0] != '0'
    line = tokenizer.encode(passkey_examples.passkey_line(e.passkey))
    assert _count(e.tokens, line) == 1
    assert list(e.tokens[e.passkey_start:e.passkey_start + len(line)]) == line
    assert 0 <= e.depth < 1
    # The answer is the passkey's digits (the leading '▁' piece belongs to the prompt)...
    assert tokenizer.decode(e.answer) == e.passkey
    assert list(e.answer) == [i for i in tokenizer.encode(e.passkey)
                              if tokenizer.decode([i]).strip()]
    # ... and the text ends with the question and the answer.
    assert tokenizer.decode(e.tokens).endswith(f'{passkey_examples.QUESTION} {e.passkey}')
    assert _count(e.tokens, e.answer) == 3  # Twice in the passkey line, then the answer.


def test_depths_vary_and_examples_are_deterministic(tokenizer):
  examples = passkey_examples.make_examples(tokenizer, 1024, 16, seed=0)
  depths = [e.depth for e in examples]
  assert len(set(depths)) >= 8 and min(depths) < 0.3 and max(depths) > 0.7
  assert len({e.passkey for e in examples}) == 16
  again = passkey_examples.make_examples(tokenizer, 1024, 16, seed=0)
  assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(examples, again))
  other = passkey_examples.make_examples(tokenizer, 1024, 16, seed=1)
  assert [e.passkey for e in other] != [e.passkey for e in examples]
  eval_set = passkey_examples.make_eval_set(tokenizer, (150, 300), 2, seed=0, digits=3)
  assert sorted(eval_set) == [150, 300]
  assert all(len(e.tokens) == n and len(e.passkey) == 3
             for n, xs in eval_set.items() for e in xs)


def test_too_short_length_raises(tokenizer):
  needed = 1 + len(tokenizer.encode(passkey_examples.passkey_line('12345'))) + len(
      tokenizer.encode(passkey_examples.QUESTION)) + len(tokenizer.encode('12345'))
  assert len(passkey_examples.make_examples(tokenizer, needed, 1)[0].tokens) == needed
  with pytest.raises(ConfigError, match=rf'config.passkey.lengths: {needed - 1} is shorter '
                                        rf'than the {needed} tokens'):
    passkey_examples.make_examples(tokenizer, needed - 1, 1)


def test_score_counts_exact_matches_and_digits():
  targets = np.array([[1, 2, 3], [4, 5, 0], [6, 7, 8]])
  mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
  assert passkey.score(targets, targets, mask) == {'accuracy': 1.0, 'digit_accuracy': 1.0}
  # Padding is never scored; row 0 all right, row 1 one wrong, row 2 all wrong.
  predictions = np.array([[1, 2, 3], [4, 9, 9], [0, 0, 0]])
  result = passkey.score(predictions, targets, mask)
  assert result['accuracy'] == pytest.approx(1 / 3)
  assert result['digit_accuracy'] == pytest.approx(4 / 8)


def _fake_predict(offset_at):
  """A 'model' whose hidden state at t is one_hot(token t + 1 + offset) and head = I."""

  def predict(tokens, positions):
    vocab = 512
    nxt = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    offsets = np.zeros_like(nxt)
    if offset_at is not None:
      offsets[np.arange(len(tokens)), positions[:, offset_at]] = 1
    hidden = jax.nn.one_hot((nxt + offsets) % vocab, vocab)
    return passkey.predict_answers(hidden, np.eye(vocab, dtype=np.float32), positions)

  return predict


def _wrong(tokens, positions):
  nxt = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  hidden = jax.nn.one_hot((nxt + 7) % 512, 512)
  return passkey.predict_answers(hidden, np.eye(512, dtype=np.float32), positions)


def test_oracle_scores_one_wrong_scores_zero_one_digit_off_is_partial(tokenizer):
  eval_set = passkey_examples.make_eval_set(tokenizer, (120, 240), 5, seed=0)
  # 5 examples, 2 rows per call padded to a multiple of 3: padding rows are dropped.
  oracle = passkey.evaluate(_fake_predict(None), eval_set, batch_size=2, row_multiple=3)
  assert oracle == {'passkey/accuracy_120': 1.0, 'passkey/digit_accuracy_120': 1.0,
                    'passkey/accuracy_240': 1.0, 'passkey/digit_accuracy_240': 1.0,
                    'passkey/mean_accuracy': 1.0, 'passkey/mean_digit_accuracy': 1.0}
  wrong = passkey.evaluate(_wrong, eval_set)
  assert set(wrong.values()) == {0.0}
  # The first digit is always wrong: no exact match, 4 of 5 digits right.
  partial = passkey.evaluate(_fake_predict(0), eval_set, batch_size=4)
  assert partial['passkey/accuracy_120'] == partial['passkey/mean_accuracy'] == 0.0
  assert partial['passkey/digit_accuracy_240'] == pytest.approx(0.8)
  assert partial['passkey/mean_digit_accuracy'] == pytest.approx(0.8)


def test_model_predictions_are_the_argmax_of_full_logits(tokenizer):
  config = default.get_config('size=tiny')
  model = make_model(config.model)
  params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))['params']
  examples = passkey_examples.make_examples(tokenizer, 150, 2, seed=0)
  tokens = np.stack([e.tokens for e in examples])
  positions = np.stack([np.arange(e.answer_start - 1, 149) for e in examples])
  got = jax.jit(passkey.make_predict_fn(model))(params, tokens, positions)
  logits = model.apply({'params': params}, tokens)
  want = np.argmax(np.take_along_axis(np.asarray(logits), positions[..., None], 1), -1)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('field,value,message', [
    ('lengths', (128, 64), r'config.passkey.lengths: \(128, 64\) must be strictly increasing'),
    ('lengths', (64, 64), r'config.passkey.lengths: .* must be strictly increasing'),
    ('lengths', (0, 64), r'config.passkey.lengths: .* must be a tuple of positive ints'),
    ('lengths', ('1k',), r'config.passkey.lengths: .* must be a tuple of positive ints'),
    ('num_examples', 0, r'config.passkey.num_examples: 0 must be a positive int'),
    ('batch_size', 0, r'config.passkey.batch_size: 0 must be a positive int'),
    ('every_steps', -1, r'config.passkey.every_steps: -1 must be an int >= 0'),
    ('seed', -1, r'config.passkey.seed: -1 must be an int >= 0'),
    ('digits', 0, r'config.passkey.digits: 0 must be an int in \[1, 18\]'),
])
def test_invalid_passkey_config_is_named(field, value, message):
  config = default.get_config('size=tiny')
  validate(config, num_devices=8)
  config.passkey.lengths = (64, 128)
  validate(config, num_devices=8)
  config.passkey[field] = value
  with pytest.raises(ConfigError, match=message):
    validate(config, num_devices=8)


# Two short runs of the tiny model on passkey examples (so that it predicts digits), the
# same but for logging: every 4 steps with the passkey evaluation, and every step.
_RUN = ['--config=experiments/default.py:size=tiny', '--config.data.source=passkey',
        '--config.num_train_steps=24', '--config.eval_every_steps=12',
        '--config.num_eval_batches=1', '--config.checkpoint_every_steps=12',
        '--config.optimizer.warmup_steps=4']
_PASSKEY = ['--config.log_every_steps=4', '--config.passkey.lengths=(64, 96)',
            '--config.passkey.num_examples=8', '--config.passkey.batch_size=3']
_EVERY_STEP = ['--config.log_every_steps=1']


def _main(workdir, *flags):
  result = subprocess.run([sys.executable, 'main.py', f'--workdir={workdir}', *flags],
                          cwd=ROOT, env=single_device_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return event_files.read_scalars(workdir)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(workdir, scalars) of the run logging every 4 steps with passkey, and the scalars of
  the run logging every step."""
  workdir = str(tmp_path_factory.mktemp('passkey_run'))
  every_step = str(tmp_path_factory.mktemp('every_step'))
  return (workdir, _main(workdir, *_RUN, *_PASSKEY)), _main(every_step, *_RUN, *_EVERY_STEP)


@pytest.mark.slow
def test_train_loop_writes_passkey_scalars(runs):
  (workdir, scalars), _ = runs
  tags = [f'passkey/{name}_{n}' for n in (64, 96)
          for name in ('accuracy', 'digit_accuracy')]
  tags += ['passkey/mean_accuracy', 'passkey/mean_digit_accuracy']
  for tag in tags:
    # With each eval (every 12 steps), the last step among them.
    assert [s for s, _ in scalars[tag]] == [12, 24], tag
    assert all(0 <= v <= 1 for _, v in scalars[tag]), tag
  for name in ('accuracy', 'digit_accuracy'):
    mean = dict(scalars[f'passkey/mean_{name}'])[24]
    assert mean == pytest.approx((dict(scalars[f'passkey/{name}_64'])[24] +
                                  dict(scalars[f'passkey/{name}_96'])[24]) / 2)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 24
  for tag in tags:
    assert final[tag] == pytest.approx(dict(scalars[tag])[24]), tag


def _hand_scores(model, params, examples):
  """Exact-match and per-token accuracy from the full logits' argmax, one example at a
  time (no batching, padding or answer-position gathering)."""
  exact, right, total = 0, 0, 0
  for e in examples:
    logits = np.asarray(model.apply({'params': params}, e.tokens[None]))[0]
    # Position t predicts token t + 1: the answer's predictions sit one to the left.
    predicted = logits[e.answer_start - 1:-1].argmax(-1)
    hits = predicted == e.answer
    exact += bool(hits.all())
    right += int(hits.sum())
    total += len(e.answer)
  return exact / len(examples), right / total


@pytest.mark.slow
def test_in_loop_passkey_scores_equal_a_hand_evaluation_of_the_saved_params(runs):
  """The scalars the loop wrote at steps 12 and 24 against argmax predictions of the
  checkpoints of those steps, computed here."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from xenith.data import pipeline  # pylint: disable=g-import-not-at-top
  (workdir, scalars), _ = runs
  config = default.get_config('size=tiny')
  config.data.source = 'passkey'
  config.data.cache_dir = single_device_env().get('XENITH_CACHE', '')
  tokenizer = pipeline.create_datasets(config).tokenizer
  model = make_model(config.model)
  digit_scores = []
  for step in (12, 24):
    params = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, 'checkpoints', str(step), 'state'))['params']
    for length in (64, 96):
      examples = passkey_examples.make_examples(tokenizer, length, 8, seed=config.passkey.seed,
                                       digits=config.passkey.digits)
      accuracy, digit_accuracy = _hand_scores(model, params, examples)
      assert dict(scalars[f'passkey/accuracy_{length}'])[step] == pytest.approx(accuracy)
      assert dict(scalars[f'passkey/digit_accuracy_{length}'])[step] == pytest.approx(
          digit_accuracy), (step, length)
      digit_scores.append(digit_accuracy)
  assert max(digit_scores) > 0, 'the model predicts no digit: the check would be empty'


@pytest.mark.slow
def test_logged_train_metrics_are_the_interval_means_of_the_per_step_values(runs):
  """Logging every 4 steps writes the mean loss and gradient norm of those 4 steps and
  the last step's param norm and learning rate; the training itself is unchanged."""
  (_, every_4), every_step = runs
  per_step = {tag: event_files.last_per_step(every_step[tag])
              for tag in ('train/loss', 'train/grad_norm', 'train/param_norm')}
  assert sorted(per_step['train/loss']) == list(range(1, 25))
  logged = {tag: event_files.last_per_step(every_4[tag]) for tag in per_step}
  assert sorted(logged['train/loss']) == [4, 8, 12, 16, 20, 24]
  for end in logged['train/loss']:
    interval = range(end - 3, end + 1)
    for tag in ('train/loss', 'train/grad_norm'):
      want = sum(per_step[tag][s] for s in interval) / 4
      assert logged[tag][end] == pytest.approx(want, rel=1e-5), (tag, end)
    assert logged['train/param_norm'][end] == pytest.approx(
        per_step['train/param_norm'][end], rel=1e-6)
    assert dict(every_4['train/learning_rate'])[end] == pytest.approx(
        dict(every_step['train/learning_rate'])[end], rel=1e-6)
  for step in (12, 24):
    assert dict(every_4['eval/loss'])[step] == pytest.approx(
        dict(every_step['eval/loss'])[step], rel=1e-6)
