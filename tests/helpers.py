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
