"""Device mesh and logical-axis sharding.

Params and activations carry logical axis names (`embed`, `heads`, `activation_batch`...);
`config.logical_axis_rules` maps them to the mesh axes `data`, `fsdp`, `tensor`, `expert`,
whose sizes come from `config.mesh`.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from xenith.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` (with at most one -1 = fill) against the device count."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f'mesh.{axis}', f'must be a positive size or -1 (fill), got {size}')
  if len(fill) > 1:
    raise ConfigError(f'mesh.{fill[1]}', f'only one mesh axis may be -1, got {fill}')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  described = ' x '.join(f'{a}={s}' for a, s in sizes.items() if s != -1)
  if fixed > num_devices:
    raise ConfigError(
        'mesh', f'{described} = {fixed} devices is larger than the {num_devices} available')
  if fill:
    if num_devices % fixed:
      raise ConfigError(
          f'mesh.{fill[0]}',
          f'cannot fill: {num_devices} devices are not divisible by the other axes '
          f'({fixed})')
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        'mesh', f'{described} = {fixed} devices is smaller than the {num_devices} available '
        '(set one axis to -1 to fill)')
  return sizes


def create_mesh(mesh_config: ml_collections.ConfigDict,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor, expert) mesh from `config.mesh`."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      tuple(shape[a] for a in MESH_AXES), MESH_AXES,
      axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_axes_of(logical_name: str, rules: Rules) -> tuple[str, ...]:
  """The mesh axes a logical axis name maps to under `rules` (first match wins)."""
  for name, axes in rules:
    if name == logical_name:
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


def batch_parallelism(shape: dict[str, int], rules: Rules) -> int:
  """How many ways the batch dimension is split (product of its mesh axes)."""
  return math.prod(shape[a] for a in mesh_axes_of('activation_batch', rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of `[batch, seq]` input arrays."""
  spec = nn.logical_to_mesh_axes(('activation_batch', 'activation_length'), rules)
  return NamedSharding(mesh, spec)


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  The result has the structure of the *unboxed* tree; unannotated leaves are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def unbox(tree: Any) -> Any:
  """Strips logical-axis boxes without adding sharding constraints (works on shapes)."""
  return jax.tree_util.tree_map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
  """Raises ConfigError naming the first array whose dims the mesh cannot split evenly.

  Run on `jax.eval_shape` output, so a bad mesh fails before anything compiles.
  """
  leaves = jax.tree_util.tree_leaves_with_path(unbox(abstract_tree))
  sharding_leaves = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(leaves, sharding_leaves, strict=True):
    mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape))
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh_sizes[a] for a in axes)
      if dim % ways:
        name = jax.tree_util.keystr(path)
        raise ConfigError(
            'mesh', f'{name} has shape {leaf.shape}; its dimension {dim} cannot be split '
            f'{ways} ways over mesh axes {axes}')


def process_rows(sharding: NamedSharding, global_batch_size: int) -> tuple[int, int]:
  """(block, blocks): this process feeds rows [block * b, (block + 1) * b) of each global
  batch, b = global_batch_size // blocks, as the devices it holds under `sharding` (a
  `batch_sharding`) need. One process: (0, 1); two processes splitting the batch: (i, 2);
  processes that share rows (the batch axis not split across them) get the same block.
  """
  intervals = sorted({index[0].indices(global_batch_size)[:2] for index in
                      sharding.addressable_devices_indices_map((global_batch_size,)).values()})
  start, stop = intervals[0][0], max(hi for _, hi in intervals)
  covered = start
  for lo, hi in intervals:
    if lo > covered:
      break
    covered = max(covered, hi)
  rows = stop - start
  if covered < stop or global_batch_size % rows or start % rows:
    raise ConfigError(
        'mesh', f'process {jax.process_index()} holds batch rows {intervals} of '
        f'{global_batch_size}, not one contiguous block; order the mesh so that each '
        'process holds a contiguous block of the batch')
  return start // rows, global_batch_size // rows


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: NamedSharding | dict[str, NamedSharding]) -> dict:
  """Assembles per-process numpy batches into global sharded jax.Arrays (`sharding`:
  one for every feature, or one per feature)."""
  pick = sharding.get if isinstance(sharding, dict) else lambda _: sharding
  return {k: jax.make_array_from_process_local_data(pick(k), v)
          for k, v in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
