"""Honest sizes of a config, from `jax.eval_shape` (no weights are allocated).

`python main.py --config=experiments/xenith_mini.py --mode=describe --num_devices=16`
prints total and active parameters, training and inference FLOPs per token, memory for
params and optimizer state, and that memory per device on the configured mesh.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.sizing import flops
from xenith import sharding
from xenith.model import memory
from xenith.model.build import make_model

GIB = 2.0**30


def _boxed_params(model_config: ml_collections.ConfigDict) -> Any:
  """Abstract params with their logical-axis boxes (shapes only)."""
  model = make_model(model_config)
  # Param shapes do not depend on the length (a memory model reads whole chunks).
  length = model_config.memory.chunk_size if memory.enabled(model_config) else 8
  tokens = jnp.zeros((1, length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)['params']


def _leaves(boxed):
  """(path, shape, logical names) for every param."""
  out = []
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box):
    names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
    value = leaf.unbox(apply_constraint=False) if is_box(leaf) else leaf
    out.append((jax.tree_util.keystr(path), tuple(value.shape), names))
  return out


def _shard_elements(shape, names, mesh_sizes, rules) -> int:
  """Elements of one device's shard of a param (ceil division, as XLA pads)."""
  total = 1
  for dim, name in zip(shape, names or (None,) * len(shape)):
    ways = math.prod(mesh_sizes[a] for a in sharding.mesh_axes_of(name, rules)) if name else 1
    total *= -(-dim // ways)
  return total


def describe(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, float]:
  """Sizes, FLOPs and memory of `config` on a mesh of `num_devices` devices."""
  m = config.model
  moe = m.get('moe')
  num_experts = moe.num_experts if moe else 0
  top_k = moe.num_experts_per_token if num_experts else 0
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  mesh_sizes = sharding.mesh_shape(config.mesh, num_devices)

  total = active = matmul_active = shard = 0
  for path, shape, names in _leaves(_boxed_params(m)):
    size = math.prod(shape)
    # A routed expert's weights have an 'exp' axis; a token uses k of E.
    used = size * top_k / num_experts if 'exp' in names else size
    total += size
    active += used
    is_lookup_only = 'embed' in path and 'embedding' in path and not m.tie_embeddings
    # Norm scales are elementwise, even when a scan stacks them into [layers, embed].
    # The summarizer's work is per chunk, not per token: `flops.memory_matmul_params`.
    if ('norm' not in names and len(shape) >= 2 and not is_lookup_only
        and 'summarizer' not in path):
      matmul_active += used
    shard += _shard_elements(shape, names, mesh_sizes, rules)

  matmul_active += flops.memory_matmul_params(m)
  seq = config.max_seq_len
  attention_per_token = flops.attention_flops_per_token(m, seq)  # Forward.
  param_bytes = 4  # Params are float32 whatever the compute dtype.
  return {
      'total_params': total,
      'active_params': active,
      'train_flops_per_token': 6 * matmul_active + 3 * attention_per_token,
      'inference_flops_per_token': 2 * matmul_active + attention_per_token,
      'params_gib': total * param_bytes / GIB,
      'optimizer_state_gib': 2 * total * param_bytes / GIB,  # AdamW mu and nu.
      'gradients_gib': total * param_bytes / GIB,
      'per_device_params_gib': shard * param_bytes / GIB,
      'per_device_train_state_gib': 4 * shard * param_bytes / GIB,  # Params, grads, mu, nu.
      'num_devices': num_devices,
      'mesh': mesh_sizes,
      'seq_len': seq,
  }


def format_description(name: str, d: dict[str, Any]) -> str:
  """A readable table of `describe`'s output."""
  mesh = ' x '.join(f'{k}={v}' for k, v in d['mesh'].items())
  rows = [
      ('total parameters', f'{d["total_params"] / 1e9:,.2f} B'),
      ('active parameters per token', f'{d["active_params"] / 1e9:,.2f} B'),
      (f'training FLOPs per token (seq {d["seq_len"]:,})',
       f'{d["train_flops_per_token"]:.3e}'),
      (f'inference FLOPs per token (context {d["seq_len"]:,})',
       f'{d["inference_flops_per_token"]:.3e}'),
      ('params (float32)', f'{d["params_gib"]:,.1f} GiB'),
      ('AdamW state (float32 mu, nu)', f'{d["optimizer_state_gib"]:,.1f} GiB'),
      ('gradients (float32)', f'{d["gradients_gib"]:,.1f} GiB'),
      (f'per device on {d["num_devices"]} devices ({mesh}): params',
       f'{d["per_device_params_gib"]:,.2f} GiB'),
      ('per device: params + grads + AdamW state',
       f'{d["per_device_train_state_gib"]:,.2f} GiB'),
  ]
  width = max(len(k) for k, _ in rows)
  lines = [f'{name}', '-' * (width + 18)]
  lines += [f'{k:<{width}}  {v:>14}' for k, v in rows]
  lines.append('(activations are not included: they depend on batch, remat and attention.)')
  return '\n'.join(lines)
