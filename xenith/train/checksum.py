"""Checksums of a train state's arrays, so that a checkpoint that reads back without error
but with changed bytes (a flipped bit, random bytes inside an array file) is caught.

One 32-bit number per array: the sum, with 32-bit wraparound, of its elements' bit
patterns, each weighted by an odd number derived from the element's index, so that
changed, swapped or shifted values all change it. Computed on the devices, sharded as the
arrays are; restore recomputes it and compares.
"""

import jax
import jax.numpy as jnp

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_PRIMES = (2654435761, 2246822519, 3266489917, 668265263, 374761393, 1610612741)


def _array_sum(x: jax.Array) -> jax.Array:
  """[] uint32 checksum of one array (any shape, 8-, 16- or 32-bit dtype, or bool)."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
  weight = jnp.ones(x.shape, jnp.uint32)
  for axis in range(x.ndim):  # Index-dependent odd weights, without flattening shards.
    iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    weight = weight + iota * jnp.uint32(_PRIMES[axis % len(_PRIMES)]) * 2
  return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _sums(tree):
  return jax.tree.map(_array_sum, tree)


def checksums(tree) -> dict[str, int]:
  """{path: 32-bit checksum} of every array in `tree` (e.g. a `TrainState`)."""
  sums = jax.device_get(_sums(tree))
  return {jax.tree_util.keystr(path): int(value)
          for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def first_difference(saved: dict[str, int], restored: dict[str, int]) -> str | None:
  """The first array whose checksum differs, in words; None when all match."""
  for path in sorted(saved.keys() | restored.keys()):
    if saved.get(path) != restored.get(path):
      return f'{path} reads back with checksum {restored.get(path)}, saved {saved.get(path)}'
  return None
