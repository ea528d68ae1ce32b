"""Generation with the KV cache against repeated full forward passes."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import default
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
  return model, params


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


def _main(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, 'main.py', *args], cwd=root, capture_output=True,
                        text=True, timeout=300, check=False)


def test_main_generate_mode(tmp_path):
  """--mode=generate prints the prompt and its continuation from a workdir's params, and
  names the problem in one line when the workdir has no checkpoint."""
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}',
                 '--mode=generate', '--prompt=ROMEO:')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('CheckpointMismatchError: ')
  config = default.get_config('size=tiny')
  model = transformer.make_model(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  checkpointing.save_params(str(tmp_path / 'checkpoints' / '0' / 'state'),
                            jax.tree.map(lambda x: getattr(x, 'value', x), params,
                                         is_leaf=lambda x: hasattr(x, 'value')))
  result = _main('--config=experiments/default.py:size=tiny', f'--workdir={tmp_path}',
                 '--mode=generate', '--prompt=ROMEO:', '--max_new_tokens=5')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().startswith('ROMEO:')
