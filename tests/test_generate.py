"""Generation with the KV cache against repeated full forward passes."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import default
from experiments import memory as memory_experiment
from xenith import checkpointing
from xenith import generate
from xenith.model import transformer


def _model():
  config = default.get_config('size=tiny').model
  config.vocab_size = 64
  config.attention.window_sizes = (4, 8)  # Windowed heads: the ring buffers wrap.
  config.attention.num_global_tokens = 2
  model = transformer.make_model(config)
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


def test_greedy_generation_with_memory_equals_the_chunked_pass():
  """A memory model generates with its bank kept: greedy tokens are the argmax of the
  chunked pass over prompt + output, and the returned state is that pass's."""
  config = default.get_config('size=tiny').model
  config.vocab_size = 64
  config.attention.implementation = 'dense'
  config.memory.update(dict(chunk_size=8, summary_tokens=2, summarizer_heads=4,
                            bank_size=4, layers=(1,), short_term_tokens=3))
  model = transformer.make_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  prompt = jax.random.randint(jax.random.key(1), (2, 11), 0, 64)  # A chunk and 3 tokens.
  out, state = generate.generate(model, params, prompt, jax.random.key(2),
                                 max_new_tokens=13)
  assert out.shape == (2, 24)
  apply = jax.jit(lambda tokens: model.apply({'params': params}, tokens,
                                             return_memory=True))
  logits, full_state = apply(out)
  np.testing.assert_array_equal(out[:, 11:], jnp.argmax(logits[:, 10:-1], -1))
  for k in full_state:
    np.testing.assert_allclose(state[k], full_state[k], atol=2e-5, rtol=2e-5, err_msg=k)


def _main(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, 'main.py', *args], cwd=root, capture_output=True,
                        text=True, timeout=300, check=False)


def _save_fresh_params(config, workdir, length):
  """Initial params of `config`'s model as the workdir's checkpoint 0 (what generate loads)."""
  model = transformer.make_model(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params']
  checkpointing.save_params(str(workdir / 'checkpoints' / '0' / 'state'),
                            jax.tree.map(lambda x: getattr(x, 'value', x), params,
                                         is_leaf=lambda x: hasattr(x, 'value')))


def test_main_generate_mode(tmp_path):
  """--mode=generate prints the prompt and its continuation from a workdir's params, and
  names the problem in one line when the workdir has no checkpoint."""
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}',
                 '--mode=generate', '--prompt=ROMEO:')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('CheckpointMismatchError: ')
  _save_fresh_params(default.get_config('size=tiny'), tmp_path, length=8)
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}',
                 '--mode=generate', '--prompt=ROMEO:', '--max_new_tokens=5')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().startswith('ROMEO:')


def test_main_generate_continues_a_memory_bank(tmp_path):
  """--memory_bank: the first call saves the memory after its output; the second loads
  it and continues the same document (no second BOS), ending further down the stream."""
  _save_fresh_params(memory_experiment.get_config('size=tiny'), tmp_path, length=16)
  bank = str(tmp_path / 'bank.npz')
  args = ('--config=experiments/memory.py:size=tiny', f'--workdir={tmp_path}',
          '--mode=generate', f'--memory_bank={bank}', '--max_new_tokens=20')
  first = _main(*args, '--prompt=ROMEO:')
  assert first.returncode == 0, first.stderr[-2000:]
  assert first.stdout.strip().startswith('ROMEO:')
  after_first = int(np.load(bank)['position'])
  second = _main(*args, '--prompt=JULIET:')
  assert second.returncode == 0, second.stderr[-2000:]
  assert second.stdout.strip().startswith('JULIET:')
  assert after_first > 20
  assert int(np.load(bank)['position']) > after_first + 20
