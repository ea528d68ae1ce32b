"""Helpers shared by the test files that launch real processes."""

import os


def single_device_env() -> dict:
  """The environment for a child process: one CPU device, like a user's laptop run
  (conftest's 8 simulated devices are for the sharding tests), and the shared data
  cache when the test run has one (XENITH_TEST_CACHE)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XENITH_CACHE'] = os.environ.get('XENITH_TEST_CACHE', env.get('XENITH_CACHE', ''))
  if not env['XENITH_CACHE']:
    del env['XENITH_CACHE']
  return env


def two_document_batch(first: int, second: int, vocab: int, rows: int = 2) -> dict:
  """A packed batch: `rows` rows, each two documents of `first` and `second` random tokens
  in [1, vocab) ({'inputs', 'segment_ids', 'positions'}: int32 [rows, first + second])."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  length = first + second
  segments = np.repeat([[1] * first + [2] * second], rows, axis=0)
  positions = np.repeat(np.concatenate([np.arange(first), np.arange(second)])[None], rows, 0)
  return {'inputs': jnp.asarray(rng.integers(1, vocab, (rows, length)), jnp.int32),
          'segment_ids': jnp.asarray(segments, jnp.int32),
          'positions': jnp.asarray(positions, jnp.int32)}
