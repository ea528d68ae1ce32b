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
from xenith import event_files
from xenith import passkey
from xenith.config_validation import ConfigError, validate
from xenith.data import tokenizer as tokenizer_lib
from xenith.model.transformer import make_model
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
  examples = passkey.make_examples(tokenizer, length, 6, seed=3, digits=5)
  assert len(examples) == 6
  for e in examples:
    assert e.tokens.shape == (length,) and e.tokens.dtype == np.int32
    assert e.tokens[0] == tokenizer.bos_id
    assert len(e.passkey) == 5 and e.passkey.isdigit() and e.passkey[0] != '0'
    line = tokenizer.encode(passkey.passkey_line(e.passkey))
    assert _count(e.tokens, line) == 1
    assert list(e.tokens[e.passkey_start:e.passkey_start + len(line)]) == line
    assert 0 <= e.depth < 1
    # The answer is the passkey's digits (the leading '▁' piece belongs to the prompt)...
    assert tokenizer.decode(e.answer) == e.passkey
    assert list(e.answer) == [i for i in tokenizer.encode(e.passkey)
                              if tokenizer.decode([i]).strip()]
    # ... and the text ends with the question and the answer.
    assert tokenizer.decode(e.tokens).endswith(f'{passkey.QUESTION} {e.passkey}')
    assert _count(e.tokens, e.answer) == 3  # Twice in the passkey line, then the answer.


def test_depths_vary_and_examples_are_deterministic(tokenizer):
  examples = passkey.make_examples(tokenizer, 1024, 16, seed=0)
  depths = [e.depth for e in examples]
  assert len(set(depths)) >= 8 and min(depths) < 0.3 and max(depths) > 0.7
  assert len({e.passkey for e in examples}) == 16
  again = passkey.make_examples(tokenizer, 1024, 16, seed=0)
  assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(examples, again))
  other = passkey.make_examples(tokenizer, 1024, 16, seed=1)
  assert [e.passkey for e in other] != [e.passkey for e in examples]
  eval_set = passkey.make_eval_set(tokenizer, (150, 300), 2, seed=0, digits=3)
  assert sorted(eval_set) == [150, 300]
  assert all(len(e.tokens) == n and len(e.passkey) == 3
             for n, xs in eval_set.items() for e in xs)


def test_too_short_length_raises(tokenizer):
  needed = 1 + len(tokenizer.encode(passkey.passkey_line('12345'))) + len(
      tokenizer.encode(passkey.QUESTION)) + len(tokenizer.encode('12345'))
  assert len(passkey.make_examples(tokenizer, needed, 1)[0].tokens) == needed
  with pytest.raises(ConfigError, match=rf'config.passkey.lengths: {needed - 1} is shorter '
                                        rf'than the {needed} tokens'):
    passkey.make_examples(tokenizer, needed - 1, 1)


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
  eval_set = passkey.make_eval_set(tokenizer, (120, 240), 5, seed=0)
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
  examples = passkey.make_examples(tokenizer, 150, 2, seed=0)
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


@pytest.mark.slow
def test_train_loop_writes_passkey_scalars(tmp_path):
  workdir = str(tmp_path)
  command = [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny',
             f'--workdir={workdir}', '--config.num_train_steps=6',
             '--config.log_every_steps=2', '--config.eval_every_steps=4',
             '--config.num_eval_batches=1', '--config.checkpoint_every_steps=6',
             '--config.optimizer.warmup_steps=1', '--config.passkey.lengths=(80, 200)',
             '--config.passkey.num_examples=3', '--config.passkey.batch_size=2']
  result = subprocess.run(command, cwd=ROOT, env=single_device_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  scalars = event_files.read_scalars(workdir)
  tags = [f'passkey/{name}_{n}' for n in (80, 200)
          for name in ('accuracy', 'digit_accuracy')]
  tags += ['passkey/mean_accuracy', 'passkey/mean_digit_accuracy']
  for tag in tags:
    # With each eval (every 4 steps) and at the last step.
    assert [s for s, _ in scalars[tag]] == [4, 6], tag
    assert all(0 <= v <= 1 for _, v in scalars[tag]), tag
  mean = dict(scalars['passkey/mean_accuracy'])[6]
  assert mean == pytest.approx((dict(scalars['passkey/accuracy_80'])[6] +
                                dict(scalars['passkey/accuracy_200'])[6]) / 2)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 6
  for tag in tags:
    assert final[tag] == pytest.approx(dict(scalars[tag])[6]), tag
