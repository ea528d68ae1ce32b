"""config.data.source='passkey': one passkey example per row, seeded, resumable, trainable."""

import json
import os

import numpy as np
import pytest

from experiments import passkey_memory
from xenith.data import passkey_examples
from xenith.data import passkey_source
from xenith.data import pipeline


def _config(tmp_path, seed=0, **overrides):
  config = passkey_memory.get_config('memory=1')
  config.data.cache_dir = str(tmp_path / 'cache')
  config.max_seq_len = 128
  config.global_batch_size = 4
  config.seed = seed
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('passkey')


def _passkeys(tokenizer, inputs):
  text = tokenizer.decode(inputs)
  return text, text.rsplit(' ', 1)[1]


def test_rows_hold_exactly_one_passkey_each(cache):
  data = pipeline.create_datasets(_config(cache))
  tok = data.tokenizer
  assert tok.vocab_size <= 512
  it = iter(data.train)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == set(pipeline.FEATURES)
    for k in pipeline.FEATURES:
      assert batch[k].shape == (4, 128) and batch[k].dtype == np.int32
    np.testing.assert_array_equal(batch['segment_ids'], 1)
    np.testing.assert_array_equal(batch['positions'], np.tile(np.arange(128), (4, 1)))
    for row in batch['inputs']:
      assert row[0] == tok.bos_id and tok.bos_id not in row[1:] and tok.eos_id not in row
      text, answer = _passkeys(tok, row)
      assert len(answer) == 5 and answer.isdigit()
      assert text.count(passkey_examples.passkey_line(answer)) == 1
      assert text.count('pass key is') == 2  # The passkey line and the question.
      assert text.endswith(f'{passkey_examples.QUESTION} {answer}')
  assert it.get_state() == {'step': 3}


def test_deterministic_per_seed_and_resumable(cache):
  def first(seed, n):
    it = iter(pipeline.create_datasets(_config(cache, seed=seed)).train)
    return [next(it)['inputs'] for _ in range(n)], it

  a, it = first(0, 3)
  b, _ = first(0, 3)
  c, _ = first(1, 3)
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(x, y)
    assert not np.array_equal(x, z)
  assert not np.array_equal(a[0], a[1])  # Fresh examples every step.
  # Resume: a new iterator set to the saved state continues exactly.
  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)['inputs']
  resumed = iter(pipeline.create_datasets(_config(cache)).train)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['inputs'], expected)


def test_eval_is_disjoint_from_train_and_repeatable(cache):
  data = pipeline.create_datasets(_config(cache))
  tok = data.tokenizer
  first = list(data.eval_batches(2))
  again = list(data.eval_batches(2))
  assert len(first) == 2
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  it = iter(data.train)
  train_rows = {r.tobytes() for _ in range(20) for r in next(it)['inputs']}
  eval_rows = [r for b in data.eval_batches(-1) for r in b['inputs']]
  assert len(eval_rows) == passkey_source.VALIDATION_ROWS
  assert not train_rows & {r.tobytes() for r in eval_rows}
  # The seed ranges cannot meet each other nor the in-loop passkey eval's small seeds.
  assert passkey_source.TRAIN_SEED_BASE > 2**32 * 100
  assert passkey_source.VALIDATION_SEED_BASE - passkey_source.TRAIN_SEED_BASE >= 2**40
  in_loop = passkey_examples.make_examples(tok, 128, 4, seed=0)
  assert not {e.tokens.tobytes() for e in in_loop} & (train_rows | {
      r.tobytes() for r in eval_rows})
  assert np.isfinite(data.unigram_loss) and data.unigram_loss > 0


def test_too_short_rows_fail_naming_max_seq_len(cache):
  from xenith.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match='config.max_seq_len: 32 is too short'):
    next(iter(pipeline.create_datasets(_config(cache, max_seq_len=32)).train))


@pytest.mark.parametrize('memory', ['0', '1'])
def test_experiment_configs_validate(memory):
  from xenith import config_validation  # pylint: disable=g-import-not-at-top
  config = passkey_memory.get_config(f'memory={memory}')
  config_validation.validate(config, num_devices=1)
  assert config.data.source == 'passkey'
  assert bool(config.model.memory.chunk_size) == (memory == '1')
  assert tuple(config.model.attention.window_sizes) == (passkey_memory.CHUNK,)


@pytest.mark.parametrize('memory', ['0', '1'])
def test_two_training_steps(tmp_path, memory):
  from xenith.train import loop as train  # pylint: disable=g-import-not-at-top
  config = passkey_memory.get_config(f'memory={memory}')
  config.data.cache_dir = str(tmp_path / 'cache')
  config.max_seq_len = 128
  config.global_batch_size = 8  # conftest's 8 CPU devices.
  config.num_train_steps = 2
  config.optimizer.warmup_steps = 1
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.num_eval_batches = 1
  config.passkey.lengths = (128, 256)
  config.passkey.num_examples = 2
  config.passkey.batch_size = 2
  config.passkey.every_steps = 2
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(config, workdir)
  assert final['step'] == 2
  assert np.isfinite(final['train/loss']) and np.isfinite(final['eval/loss'])
  for n in (128, 256):
    assert 0 <= final[f'passkey/accuracy_{n}'] <= 1
  assert os.path.exists(os.path.join(workdir, 'final_metrics.json'))
