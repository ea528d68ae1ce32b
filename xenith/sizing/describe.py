"""Honest sizes of a config, from `jax.eval_shape` (no weights are allocated).

`python main.py --config=experiments/xenith_mini.py --mode=describe --num_devices=16`
prints total and active parameters, training and inference FLOPs per token, memory for
params and optimizer state, and that memory per device on the configured mesh. With LoRA
it also counts the adapter params per target (each at its target's rank), language
adapters (`language_adapter`, at their bottleneck) among them; with a frozen base
(`lora.trains_only_adapters`) gradients and AdamW state count the adapters only.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xenith.sizing import flops
from xenith import sharding
from xenith.model import language_adapters
from xenith.model import lora
from xenith.model import memory
from xenith.model.build import make_model

GIB = 2.0**30
LANGUAGE_TARGET = 'language_adapter'  # The language adapters' module (language_adapters.py).


def _boxed_params(model_config: ml_collections.ConfigDict) -> Any:
  """Abstract params with their logical-axis boxes (shapes only)."""
  model = make_model(model_config)
  # Param shapes do not depend on the length (a memory model reads whole chunks).
  length = model_config.memory.chunk_size if memory.enabled(model_config) else 8
  tokens = jnp.zeros((1, length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)['params']


def _leaves(boxed):
  """(key path, shape, logical names) for every param."""
  out = []
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box):
    names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
    value = leaf.unbox(apply_constraint=False) if is_box(leaf) else leaf
    out.append((path, tuple(value.shape), names))
  return out


def _adapter_target(path) -> str | None:
  """The LoRA target of an adapter param (the module holding it, e.g. 'query' for
  `.../query/lora_a`, 'experts' for `.../experts/gate_lora_a`, 'language_adapter' for a
  language adapter's); None for a base param."""
  keys = [getattr(k, 'key', None) for k in path]
  return keys[-2] if lora.is_adapter_name(keys[-1]) else None


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
  adapters_by_target, adapter_shard = {}, 0
  for key_path, shape, names in _leaves(_boxed_params(m)):
    path = jax.tree_util.keystr(key_path)
    size = math.prod(shape)
    if (target := _adapter_target(key_path)) is not None:
      adapters_by_target[target] = adapters_by_target.get(target, 0) + size
      adapter_shard += _shard_elements(shape, names, mesh_sizes, rules)
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
  adapters = sum(adapters_by_target.values())
  adapters_by_target = {t: adapters_by_target[t] for t in lora.TARGETS + (LANGUAGE_TARGET,)
                        if t in adapters_by_target}  # In `lora.TARGETS` order.
  ranks = lora.ranks(m)
  if language_adapters.enabled(m):
    ranks[LANGUAGE_TARGET] = m.language_adapters.bottleneck_dim
  # A frozen base gets no optimizer state and no gradients (stop_gradient: lora.frozen_base).
  frozen = lora.trains_only_adapters(m)
  trained, trained_shard = (adapters, adapter_shard) if frozen else (total, shard)
  return {
      'total_params': total,
      'active_params': active,
      'adapter_params': adapters,  # LoRA and language adapters; 0 without adapters.
      'adapter_params_by_target': adapters_by_target,  # {target: params}, e.g. 'query'.
      # {target: rank} of the targets with adapters (language_adapter: its bottleneck).
      'adapter_ranks': ranks,
      'trained_params': trained,
      'train_flops_per_token': 6 * matmul_active + 3 * attention_per_token,
      'inference_flops_per_token': 2 * matmul_active + attention_per_token,
      'params_gib': total * param_bytes / GIB,
      'optimizer_state_gib': 2 * trained * param_bytes / GIB,  # AdamW mu and nu.
      'gradients_gib': trained * param_bytes / GIB,
      'per_device_params_gib': shard * param_bytes / GIB,
      # Params, grads, mu, nu.
      'per_device_train_state_gib': (shard + 3 * trained_shard) * param_bytes / GIB,
      'num_devices': num_devices,
      'mesh': mesh_sizes,
      'seq_len': seq,
  }


def _count(n: float) -> str:
  """A parameter count in B (billions) or, below a billion, M (millions)."""
  return f'{n / 1e9:,.2f} B' if n >= 1e9 else f'{n / 1e6:,.2f} M'


def format_description(name: str, d: dict[str, Any]) -> str:
  """A readable table of `describe`'s output."""
  mesh = ' x '.join(f'{k}={v}' for k, v in d['mesh'].items())
  rows = [
      ('total parameters', _count(d['total_params'])),
      ('active parameters per token', _count(d['active_params'])),
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
  if d.get('adapter_params'):
    rank = lambda t: 'bottleneck' if t == LANGUAGE_TARGET else 'rank'
    title = ('adapter parameters' if LANGUAGE_TARGET in d['adapter_params_by_target']
             else 'LoRA adapter parameters')
    rows[2:2] = [(title, f'{d["adapter_params"] / 1e6:,.2f} M')] + [
        (f'  {t} ({rank(t)} {d["adapter_ranks"][t]})', f'{n / 1e6:,.2f} M')
        for t, n in d['adapter_params_by_target'].items()] + [
        ('trained parameters (gradients, AdamW state)', _count(d['trained_params']))]
  width = max(len(k) for k, _ in rows)
  lines = [f'{name}', '-' * (width + 18)]
  lines += [f'{k:<{width}}  {v:>14}' for k, v in rows]
  lines.append('(activations are not included: they depend on batch, remat and attention.)')
  return '\n'.join(lines)
