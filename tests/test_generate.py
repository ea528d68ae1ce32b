"""Generation with the KV cache against repeated full forward passes, sampling against
its distribution, and main.py --mode=generate against `generate.generate`."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import default
from experiments import memory as memory_experiment
from xenith.train import checkpointing
from xenith import generate
from xenith.data import pipeline
from xenith.model import build


def _model():
  config = default.get_config('size=tiny').model
  config.vocab_size = 64
  config.attention.window_sizes = (4, 8)  # Windowed heads: the ring buffers wrap.
  config.attention.num_global_tokens = 2
  model = build.make_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  # Scaled up: at init the logits are so flat that greedy decoding repeats one token
  # whatever the context, which would hide context bugs from these tests.
  return model, jax.tree.map(lambda x: 4 * x, params)


def test_greedy_generation_equals_argmax_of_full_forward_passes():
  model, params = _model()
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
  out = generate.generate(model, params, prompt, jax.random.key(2), max_new_tokens=12)
  assert out.shape == (2, 17)
  np.testing.assert_array_equal(out[:, :5], prompt)
  # The slow way: the whole sequence through the model for every new token. The buffer
  # has its final length from the start (one compile); causality makes the zeros after
  # position t irrelevant to its logits.
  apply = jax.jit(lambda tokens: model.apply({'params': params}, tokens))
  tokens = jnp.zeros((2, 17), jnp.int32).at[:, :5].set(prompt)
  for t in range(5, 17):
    tokens = tokens.at[:, t].set(jnp.argmax(apply(tokens)[:, t - 1], -1))
  np.testing.assert_array_equal(out, tokens)


def test_prompts_of_different_lengths_continue_as_they_would_alone():
  """Left-padded prompts (lengths 5, 2 and 7) in one batch: each row's greedy output
  equals generating that prompt alone; the windows (4, 8) wrap and the 2 global tokens
  are each row's own first tokens, not the padding."""
  model, params = _model()
  prompts = [jax.random.randint(jax.random.key(10 + i), (1, n), 0, 64)
             for i, n in enumerate((5, 2, 7))]
  padded = jnp.concatenate([jnp.pad(p, ((0, 0), (7 - p.shape[1], 0)), constant_values=9)
                            for p in prompts])
  out = generate.generate(model, params, padded, jax.random.key(2), max_new_tokens=10,
                          prompt_lengths=jnp.array([5, 2, 7]))
  for row, p in enumerate(prompts):
    alone = generate.generate(model, params, p, jax.random.key(2), max_new_tokens=10)
    np.testing.assert_array_equal(out[row, 7:], alone[0, p.shape[1]:])


def test_sampling_is_seeded_and_top_k_restricts_the_choice():
  model, params = _model()
  prompt = jax.random.randint(jax.random.key(1), (4, 3), 0, 64)
  sample = lambda seed, **kw: generate.generate(
      model, params, prompt, jax.random.key(seed), max_new_tokens=6, temperature=1.0, **kw)
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  # top_k=1 keeps only the most likely token: sampling becomes greedy.
  greedy = generate.generate(model, params, prompt, jax.random.key(0), max_new_tokens=6)
  np.testing.assert_array_equal(sample(3, top_k=1), greedy)


# [batch=2, vocab=8]: distinct values, each row with its own order (a top k taken from
# the wrong row shows).
_LOGITS = np.array([[1.0, -0.5, 2.0, 0.3, -1.2, 0.8, 1.5, -2.0],
                    [0.2, 1.1, -0.7, 2.4, 0.0, -1.5, 0.9, 0.5]], np.float32)


def _tempered_top_k(logits, temperature, top_k):
  """NumPy: softmax(logits / temperature) over the top k only (0 = all), renormalised."""
  z = np.asarray(logits, np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  if top_k:
    p = np.where(z >= np.sort(z, -1)[:, -top_k:][:, :1], p, 0)
  return p / p.sum(-1, keepdims=True)


def _assert_frequencies(draws, probs):
  """draws: [n, batch] token ids; probs: [batch, vocab]. Tokens of probability 0 are never
  drawn, the others' frequencies lie within 5 standard errors (+1/n) of their probability."""
  n = draws.shape[0]
  for row, p in enumerate(probs):
    freq = np.bincount(np.asarray(draws[:, row]), minlength=p.size) / n
    np.testing.assert_array_equal(freq[p == 0], 0, err_msg=f'row {row}: {freq} vs {p}')
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1 / n,
                                 err_msg=f'row {row}: {freq} vs {p}')


_SAMPLED = ((0.5, 0), (1.0, 0), (2.0, 0), (0.5, 3), (1.0, 3), (2.0, 5))
_ARGMAX = ((0.0, 0), (0.0, 3), (1e-3, 0), (2.0, 1))  # Greedy, near it, or top 1.


@functools.cache
def _draws():
  """{(temperature, top_k): [20k, batch] draws of the sampler generate uses on _LOGITS,
  one key each}, for all settings in one jit."""
  sample = lambda t, k: jax.vmap(lambda key: generate._sample(  # pylint: disable=protected-access
      jnp.asarray(_LOGITS), key, t, k))
  draw = jax.jit(lambda keys: {s: sample(*s)(keys) for s in _SAMPLED + _ARGMAX})
  return jax.device_get(draw(jax.random.split(jax.random.key(0), 20_000)))


def test_sampling_draws_from_the_tempered_top_k_softmax():
  """20k draws against NumPy's softmax(logits / temperature), restricted to the top k and
  renormalised, for temperatures 0.5, 1 and 2 and k = 0 (all), 3, 5."""
  for temperature, top_k in _SAMPLED:
    _assert_frequencies(_draws()[temperature, top_k],
                        _tempered_top_k(_LOGITS, temperature, top_k))


def test_sampling_at_temperature_zero_or_near_it_or_top_1_is_the_argmax():
  argmax = np.argmax(_LOGITS, -1)  # [batch]
  for setting in _ARGMAX:
    draws = _draws()[setting]  # [20k, batch]
    np.testing.assert_array_equal(draws, np.broadcast_to(argmax, draws.shape),
                                  err_msg=f'(temperature, top_k) = {setting}')


def test_generate_samples_the_first_token_from_the_models_distribution():
  """The same prompt in 10k rows, one new token each at temperature 2, top 5: its
  frequencies follow the model's own next-token logits, tempered and truncated."""
  model, params = _model()
  prompt = jnp.tile(jnp.array([[5, 17, 33]], jnp.int32), (10_000, 1))  # [10k, 3]
  out = generate.generate(model, params, prompt, jax.random.key(3), max_new_tokens=1,
                          temperature=2.0, top_k=5)
  logits = jax.jit(model.apply)({'params': params}, prompt[:1])[:, -1]  # [1, vocab]
  _assert_frequencies(out[:, 3:], _tempered_top_k(logits, 2.0, 5))


def test_every_step_draws_afresh():
  """With all-zero params every next-token distribution is uniform: each of 4 new tokens
  is then an independent uniform draw, so a step that reused another step's key (equal
  tokens in a row) or a row's (equal rows) shows."""
  model, params = _model()
  params = jax.tree.map(jnp.zeros_like, params)
  prompt = jnp.zeros((4000, 2), jnp.int32)
  out = np.asarray(generate.generate(model, params, prompt, jax.random.key(5),
                                     max_new_tokens=4, temperature=1.0))[:, 2:]  # [rows, 4]
  uniform = np.full((1, 64), 1 / 64)
  for t in range(4):
    _assert_frequencies(out[:, t:t + 1], uniform)
    for u in range(t):  # Independent steps agree in about 1/64 of the rows.
      assert abs(np.mean(out[:, t] == out[:, u]) - 1 / 64) < 0.02, (t, u)
  assert len({tuple(r) for r in out}) > 3900  # Rows are not copies of each other.


def test_greedy_generation_with_memory_equals_the_chunked_pass():
  """A memory model generates with its bank kept: greedy tokens are the argmax of the
  chunked pass over prompt + output, and the returned state is that pass's."""
  config = default.get_config('size=tiny').model
  config.vocab_size = 64
  config.attention.implementation = 'dense'
  config.memory.update(dict(chunk_size=8, summary_tokens=2, summarizer_heads=4,
                            bank_size=4, layers=(1,), short_term_tokens=3))
  model = build.make_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  prompt = jax.random.randint(jax.random.key(1), (2, 11), 0, 64)  # A chunk and 3 tokens.
  out, state = generate.generate(model, params, prompt, jax.random.key(2),
                                 max_new_tokens=13)
  assert out.shape == (2, 24)
  full = jax.jit(lambda tokens: model.apply({'params': params}, tokens,
                                            method='forward'))(out)
  np.testing.assert_array_equal(out[:, 11:], jnp.argmax(full.logits[:, 10:-1], -1))
  for k, v in full.memory.arrays().items():
    np.testing.assert_allclose(getattr(state, k), v, atol=2e-5, rtol=2e-5, err_msg=k)


def _main(*args):
  """main.py with `args`; stdout and stderr as bytes (no newline translation), UTF-8."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, 'main.py', *args], cwd=root, capture_output=True,
                        env={**os.environ, 'PYTHONIOENCODING': 'utf-8'}, timeout=300,
                        check=False)


def _save_fresh_params(config, workdir, length, scale=1.0):
  """Initial params of `config`'s model, times `scale`, as the workdir's checkpoint 0
  (what generate loads)."""
  model = build.make_model(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params']
  checkpointing.save_params(str(workdir / 'checkpoints' / '0' / 'state'),
                            jax.tree.map(lambda x: scale * getattr(x, 'value', x), params,
                                         is_leaf=lambda x: hasattr(x, 'value')))


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  """A workdir with the tiny default model's params, scaled as in `_model` so that the
  output depends on the prompt."""
  workdir = tmp_path_factory.mktemp('tiny')
  _save_fresh_params(default.get_config('size=tiny'), workdir, length=8, scale=4.0)
  return workdir


def _generate_in_process(workdir, text, *, seed=0, **settings):
  """What --mode=generate should print: `generate.generate` on the workdir's newest
  params, the run's tokenizer, BOS + `text` and key `seed`, decoded after the BOS."""
  config = default.get_config('size=tiny')
  tokenizer = pipeline.create_datasets(config).tokenizer
  prompt = [tokenizer.bos_id] + list(tokenizer.encode(text))
  model = build.make_model(config.model)
  like = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                  jnp.zeros((1, 8), jnp.int32))['params'])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = checkpointing.load_params(str(workdir), jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like))
  tokens = generate.generate(model, params, jnp.asarray([prompt], jnp.int32),
                             jax.random.key(seed), **settings)  # [1, len(prompt) + new]
  assert tokens.shape == (1, len(prompt) + settings['max_new_tokens'])
  return tokenizer.decode([int(t) for t in tokens[0, 1:]])


def test_main_generate_mode(tmp_path, tiny_workdir):
  """--mode=generate prints exactly the text of `generate.generate`'s greedy output on
  the workdir's params, and names the problem in one line when the workdir has no
  checkpoint."""
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}',
                 '--mode=generate', '--prompt=ROMEO:')
  assert result.returncode != 0
  assert (result.stderr.decode().strip().splitlines()[-1]
          .startswith('CheckpointMismatchError: '))
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tiny_workdir}',
                 '--mode=generate', '--prompt=ROMEO:', '--max_new_tokens=5')
  assert result.returncode == 0, result.stderr.decode(errors='replace')[-2000:]
  printed = result.stdout.decode('utf-8')
  assert printed.startswith('ROMEO:')
  assert printed == _generate_in_process(tiny_workdir, 'ROMEO:', max_new_tokens=5) + '\n'


def test_main_generate_samples_like_generate_with_the_configs_seed(tiny_workdir):
  """--temperature, --top_k and --config.seed: the CLI prints the text of the sample
  `generate.generate` draws with key(config.seed) and the same settings. (The scaled
  logits are peaked: temperature 4 makes the sample differ from those at temperature 1,
  with all tokens or with seed 0.)"""
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tiny_workdir}',
                 '--mode=generate', '--prompt=JULIET:', '--max_new_tokens=12',
                 '--temperature=4', '--top_k=8', '--config.seed=7')
  assert result.returncode == 0, result.stderr.decode(errors='replace')[-2000:]
  expected = _generate_in_process(tiny_workdir, 'JULIET:', seed=7, max_new_tokens=12,
                                  temperature=4.0, top_k=8)
  assert result.stdout.decode('utf-8') == expected + '\n'


def test_main_generate_continues_a_memory_bank(tmp_path):
  """--memory_bank: the first call saves the memory after its output; the second loads
  it and continues the same document (no second BOS), ending further down the stream."""
  _save_fresh_params(memory_experiment.get_config('size=tiny'), tmp_path, length=16)
  bank = str(tmp_path / 'bank.npz')
  args = ('--config=experiments/memory.py:size=tiny', f'--workdir={tmp_path}',
          '--mode=generate', f'--memory_bank={bank}', '--max_new_tokens=20')
  first = _main(*args, '--prompt=ROMEO:')
  assert first.returncode == 0, first.stderr.decode(errors='replace')[-2000:]
  assert first.stdout.decode().strip().startswith('ROMEO:')
  after_first = int(np.load(bank)['position'])
  second = _main(*args, '--prompt=JULIET:')
  assert second.returncode == 0, second.stderr.decode(errors='replace')[-2000:]
  assert second.stdout.decode().strip().startswith('JULIET:')
  assert after_first > 20
  assert int(np.load(bank)['position']) > after_first + 20
