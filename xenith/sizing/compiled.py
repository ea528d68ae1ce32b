"""`--mode=describe --compile`: XLA's own memory and FLOPs for the real train step.

`main.py` runs `python -m xenith.sizing.compiled <config.pkl> <num_devices> <out.json>`
in a child process whose environment simulates `num_devices` CPU devices (set before
jax is imported, which the parent already has). Nothing is allocated: the state and
batch are `jax.ShapeDtypeStruct`s carrying their shardings.

- Memory (`memory_per_device`): the train loop's own jitted step (`steps.jit_train_step`)
  for the config as it is, full width and depth (with `scan_layers` compile time does not
  grow with depth), on the config's mesh; `compiled.memory_analysis()` gives one
  device's buffers. These are the XLA:CPU compile's buffers with the CPU's kernels
  (attention 'auto' is blockwise there, MoE 'auto' is dropless_gather), an estimate of
  accelerator memory, not a measurement of it.
- FLOPs (`train_flops_per_token`): XLA:CPU's `cost_analysis()` counts a loop's body once,
  whatever its trip count, so the FLOP compiles avoid loops: every scanned stack at one
  repeat, unrolled (`layer_stacks.sizing_repeats`), then each stack with more repeats at
  two; the difference is one repeat's FLOPs, and the total is
  base + sum((repeats - 1) * per repeat). Kernels XLA counts honestly: dense attention
  (it scores every key, masked or not: windows count the full sequence, unlike
  describe's own count; `dense_attention_train_flops_per_token` is describe's count of
  that), 'capacity' MoE dispatch at capacity factor 1 (its einsums run exactly
  tokens * k / E rows per expert when that divides, the k of E that describe counts),
  full logits (no chunked-loss scan), no remat (model FLOPs: remat's recomputation is
  not the model's), the global batch of rows of `max_seq_len` (with chunk-summary memory
  of one chunk: every chunk does the same work), on one device. XLA also counts
  elementwise work (norms, softmax, the optimizer update) that describe leaves out: about
  1% at the seeds' widths, 5-15% at tiny ones.
"""

import json
import math
import pickle
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from xenith import sharding
from xenith.model import language_adapters
from xenith.model import layer_stacks
from xenith.model import memory
from xenith.model.build import make_model
from xenith.sizing import flops
from xenith.train import optimizer
from xenith.train.steps import jit_train_step
from xenith.train.train_state import abstract_train_state

_MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                  'alias_size_in_bytes', 'generated_code_size_in_bytes')


def child_environment(environ: dict[str, str], num_devices: int) -> dict[str, str]:
  """`environ` for a child jax that simulates `num_devices` CPU devices."""
  flags = [f for f in environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={num_devices}')
  return {**environ, 'XLA_FLAGS': ' '.join(flags), 'JAX_PLATFORMS': 'cpu',
          'TF_CPP_MIN_LOG_LEVEL': environ.get('TF_CPP_MIN_LOG_LEVEL', '2')}


def _abstract_batch(rows: int, seq_len: int, batch_sharding, languages: bool = False) -> dict:
  spec = jax.ShapeDtypeStruct((rows, seq_len), jax.numpy.int32, sharding=batch_sharding)
  batch = {'inputs': spec, 'segment_ids': spec, 'positions': spec}
  return {**batch, 'languages': spec} if languages else batch  # Language adapters' ids.


def compile_train_step(config: ml_collections.ConfigDict, devices, rows: int,
                       seq_len: int) -> tuple[Any, Any]:
  """(compiled train step, abstract state) of `config` on a mesh over `devices`, for
  batches [rows, seq_len]. Only shapes: nothing is allocated."""
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  mesh = sharding.create_mesh(config.mesh, devices)
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, state_shardings = abstract_train_state(model, tx, seq_len, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step = jit_train_step(model, tx, config, mesh, state_shardings, batch_sharding)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    batch = _abstract_batch(rows, seq_len, batch_sharding,
                            language_adapters.enabled(config.model))
    compiled = step.lower(state, batch, key).compile()
  return compiled, state


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def memory_per_device(config: ml_collections.ConfigDict, devices=None) -> dict[str, float]:
  """XLA:CPU's buffers per device (bytes) of the real train step on the config's mesh,
  the compiled state's parameter count and the compile's seconds."""
  start = time.perf_counter()
  compiled, state = compile_train_step(config, devices or jax.devices(),
                                       config.global_batch_size, config.max_seq_len)
  analysis = compiled.memory_analysis()
  out = {f: float(getattr(analysis, f)) for f in _MEMORY_FIELDS}
  # Peak live bytes: inputs and outputs (donated ones once) and the temporaries.
  out['total_bytes'] = (out['argument_size_in_bytes'] + out['output_size_in_bytes']
                        + out['temp_size_in_bytes'] - out['alias_size_in_bytes'])
  out['params'] = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))
  out['seconds'] = time.perf_counter() - start
  return out


def flops_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the kernels and settings the FLOP compiles use (module docstring)."""
  config = ml_collections.ConfigDict(config.to_dict())  # An unlocked copy.
  m = config.model
  m.attention.implementation = 'dense'
  m.remat = 'none'
  m.loss_chunk_size = 0
  if m.moe.num_experts:
    m.moe.dispatch = 'capacity'
    m.moe.capacity_factor = 1.0
  for axis in sharding.MESH_AXES:
    config.mesh[axis] = 1
  return config


def train_flops_per_token(config: ml_collections.ConfigDict, device=None) -> dict[str, Any]:
  """XLA's training FLOPs per token of `config`, layers counted by scaling one repeat of
  each scanned stack (module docstring); also the compiles' figures and seconds."""
  start = time.perf_counter()
  config = flops_config(config)
  seq = config.model.memory.chunk_size if memory.enabled(config.model) else config.max_seq_len
  rows = config.global_batch_size  # The real step's tokens share its optimizer update.
  devices = [device or jax.devices()[0]]

  def count(repeats):
    with layer_stacks.sizing_repeats(repeats):
      return _cost(compile_train_step(config, devices, rows, seq)[0])['flops']

  frozen = ml_collections.FrozenConfigDict(config.model)
  if not config.model.scan_layers:
    total, per_repeat = count({}), {}  # Unscanned layers are unrolled already.
  else:
    stacks = layer_stacks.plan(frozen)
    total = base = count({})
    per_repeat = {}
    for stack in stacks:
      if stack.repeats > 1:
        per_repeat[stack.name] = count({stack.name: 2}) - base
        total += (stack.repeats - 1) * per_repeat[stack.name]
  tokens = rows * seq
  return {'train_flops_per_token': total / tokens, 'seq_len': seq,
          'per_repeat_flops_per_token': {k: v / tokens for k, v in per_repeat.items()},
          'seconds': time.perf_counter() - start}


def dense_attention_train_flops_per_token(config: ml_collections.ConfigDict) -> float:
  """describe's training FLOPs per token with every key scored, as the dense kernel of
  the FLOP compile does: windows see the whole sequence. (A memory model's chunk kernel
  is dense already: describe's own count.)"""
  model = ml_collections.ConfigDict(config.model.to_dict())
  if not memory.enabled(model):
    model.attention.window_sizes = ()
    model.attention.num_global_tokens = 0
  return flops.train_flops_per_token(model, config.max_seq_len)


def run(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, Any]:
  """Both analyses of `config` on `num_devices` (this process's simulated devices)."""
  if jax.device_count() != num_devices:
    raise RuntimeError(f'{jax.device_count()} devices, expected {num_devices}: set XLA_FLAGS '
                       'before jax is imported (`child_environment`).')
  return {'memory': memory_per_device(config),
          'flops': train_flops_per_token(config),
          'dense_attention_train_flops_per_token': dense_attention_train_flops_per_token(config),
          'device_kind': jax.devices()[0].device_kind}


def _bytes(n: float) -> str:
  return f'{n / 2**30:,.2f} GiB' if n >= 2**30 else f'{n / 2**20:,.2f} MiB'


def format_comparison(d: dict[str, Any], c: dict[str, Any]) -> str:
  """describe's estimates (`d`) beside the compiled figures (`c`, from `run`)."""
  mem, fl = c['memory'], c['flops']
  rows = [
      ('parameters (describe)', f'{d["total_params"]:,}'),
      ('parameters (the compiled train state)', f'{int(mem["params"]):,}'),
      (f'XLA:CPU compile\'s buffers per device on {d["num_devices"]} devices '
       '(an estimate of accelerator memory):', ''),
      ('  arguments (params, AdamW state, batch)', _bytes(mem['argument_size_in_bytes'])),
      ('  outputs (new state, metrics)', _bytes(mem['output_size_in_bytes'])),
      ('  temporaries (activations, gradients, ...)', _bytes(mem['temp_size_in_bytes'])),
      ('  aliased (donated state, counted once)', _bytes(mem['alias_size_in_bytes'])),
      ('  total (arguments + outputs + temporaries - aliased)', _bytes(mem['total_bytes'])),
      ('  describe: params + grads + AdamW state', _bytes(d['per_device_train_state_gib'] * 2**30)),
      (f'training FLOPs per token (seq {d["seq_len"]:,}): describe',
       f'{d["train_flops_per_token"]:.3e}'),
      (f'  XLA cost analysis (seq {fl["seq_len"]:,}; stacks scaled from 1-2 repeats)',
       f'{fl["train_flops_per_token"]:.3e}'),
  ]
  if c['dense_attention_train_flops_per_token'] != d['train_flops_per_token']:  # Windows.
    rows.insert(-1, ('  describe with every key scored (as the dense kernel)',
                     f'{c["dense_attention_train_flops_per_token"]:.3e}'))
  width = max(len(k) for k, v in rows if v)
  lines = [f'Compiled train step (XLA:CPU, {d["num_devices"]} simulated devices; memory '
           f'compile {mem["seconds"]:.0f} s, FLOP compiles {fl["seconds"]:.0f} s)',
           '-' * (width + 20)]
  lines += [f'{k:<{width}}  {v:>18}' if v else k for k, v in rows]
  lines.append('(FLOP compiles: dense attention, MoE capacity dispatch at factor 1, no remat, '
               'one device; xenith/sizing/compiled.py says why.)')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  config_path, num_devices, out_path = argv[1], int(argv[2]), argv[3]
  with open(config_path, 'rb') as f:
    config = pickle.load(f)
  result = run(config, num_devices)
  with open(out_path, 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main(sys.argv)
