"""What `accelerator.py` measures, one section per process (it runs this; not by hand).

  python bench/accelerator_child.py --section=mfu_dense --budget_s=60 [--smoke]

Sections: `probe` (the devices and library versions), `mfu_dense` / `mfu_moe` (the real
train step, bf16, on random tokens), `attention` (cuDNN vs blockwise kernels) and
`moe_dispatch` (one MoE layer per dispatch method). Each `benchlib.report`s its result
again after every item it finishes, so a section stopped at its time limit still hands
back what it finished; an item that fails records its error and the section goes on.

Imports only xenith's model, sharding, step and sizing code and what they need (jax,
flax, optax, numpy, ml_collections, absl); `clu_standin` stands in for CLU's metrics
where CLU is missing.
"""

import contextlib
import math
import os
import statistics
import sys
import time
import traceback

from absl import app
from absl import flags

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_BENCH_DIR))

# pylint: disable=g-import-not-at-top,wrong-import-position
import benchlib
import clu_standin

CLU_METRICS = clu_standin.install()  # Before xenith.train.steps imports clu.metrics.

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import default
from xenith import config_validation
from xenith import sharding
from xenith.model import attention
from xenith.model import moe
from xenith.model import moe_dispatch
from xenith.model.build import make_model
from xenith.sizing import flops
from xenith.train import optimizer
from xenith.train.steps import make_train_step
from xenith.train.train_state import abstract_train_state, init_train_state
# pylint: enable=g-import-not-at-top,wrong-import-position

SECTIONS = ('probe', 'mfu_dense', 'mfu_moe', 'attention', 'moe_dispatch')

_SECTION = flags.DEFINE_enum('section', None, SECTIONS, 'What to measure.')
_BUDGET = flags.DEFINE_float('budget_s', 60.0, 'Seconds this section may take in all.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny shapes (CPU, seconds): checks the code runs.')

# The MFU sections' models (the rest is experiments/default.py's `base` size). Dense:
# 20 layers of width 2048, 16 query / 8 KV heads of 128, SwiGLU 5632, tied 32k
# embedding: 1.01B parameters. MoE: 12 such layers, all but the first with 8 experts
# of 2816 (top-2: about the dense layer's FLOPs per token): 1.8B parameters, 0.6B active.
MODELS = {
    'dense': dict(vocab_size=32_000, embed_dim=2048, num_layers=20, num_heads=16,
                  num_kv_heads=8, head_dim=128, mlp_dim=5632),
    'moe': dict(vocab_size=32_000, embed_dim=2048, num_layers=12, num_heads=16,
                num_kv_heads=8, head_dim=128, mlp_dim=5632),
}
MOE = {'full': dict(num_experts=8, num_experts_per_token=2, expert_mlp_dim=2816,
                    first_dense_layers=1),
       'smoke': dict(num_experts=4, num_experts_per_token=2, expert_mlp_dim=64,
                     first_dense_layers=0)}
SEQ_LEN, BATCH_PER_DEVICE = 2048, 8
TARGET_MFU = {'dense': 0.5, 'moe': 0.4}  # Issue 13: MaxText's level on an H100.
# One document per row (the synthetic-data setting of published MFU figures); the
# segment ids still reach the kernels, as in training.
EXTRA_DOCUMENTS = 0

# Attention: one layer's kernel alone (no projections), batch 1, bf16.
ATTENTION = {'full': dict(lengths=(8192, 32768), heads=16, kv_heads=8, head_dim=128,
                          block_size=512),  # The CPU default (64) is a small GPU tile.
             'smoke': dict(lengths=(256,), heads=4, kv_heads=2, head_dim=32,
                           block_size=64)}
ATTENTION_IMPLEMENTATIONS = ('cudnn', 'blockwise')

# One MoE layer (the MoE model's: 8 experts of 2816, top-2) on 8 x 2048 tokens, bf16.
DISPATCH = {'full': dict(tokens=16_384, embed_dim=2048, expert_mlp_dim=2816, num_experts=8,
                         top_k=2),
            'smoke': dict(tokens=256, embed_dim=64, expert_mlp_dim=128, num_experts=4,
                          top_k=2)}
DISPATCHES = ('dense', 'dropless_ragged', 'dropless_gather', 'capacity')


def _size() -> str:
  return 'smoke' if _SMOKE.value else 'full'


class Clock:
  """The section's deadline."""

  def __init__(self, budget_s: float):
    self.end = time.monotonic() + budget_s

  def left(self) -> float:
    return self.end - time.monotonic()


def _error(e: BaseException) -> dict:
  """A failed item: one line for the table, the traceback's end for the JSON."""
  first = (str(e).strip().splitlines() or [''])[0]
  return {'error': f'{type(e).__name__}: {first}'[:300],
          'traceback': ''.join(traceback.format_exception(e))[-2000:]}


def _timed_windows(run, clock: Clock, call_s: float, windows: int,
                   window_s: float) -> tuple[list[float], int]:
  """Seconds per call of `run(n)` (n calls, waited for) in up to `windows` windows of
  about `window_s`, while the clock allows another; at least one window."""
  calls = max(1, math.ceil(window_s / max(call_s, 1e-6)))
  times = []
  while len(times) < windows:
    if times and clock.left() < 1.5 * calls * times[-1] + 1.0:
      break
    start = time.perf_counter()
    run(calls)
    times.append((time.perf_counter() - start) / calls)
  return times, calls


def _median_call_s(fn, args, clock: Clock) -> float:
  """Median seconds per call of the compiled `fn(*args)` over a few windows."""
  call_s = benchlib.seconds_per_call(fn, args, 1)  # Also the warm-up.
  times, _ = _timed_windows(lambda n: benchlib.seconds_per_call(fn, args, n), clock,
                            call_s, windows=3, window_s=0.05 if _SMOKE.value else 0.5)
  return statistics.median(times)


def _peak_flops_per_device() -> tuple[float, str]:
  """The vendor's dense bf16 figure for this device (xenith.sizing.flops), else the
  measured bf16 matmul rate."""
  kind = jax.devices()[0].device_kind
  for name, peak in flops.PEAK_FLOPS:
    if name in kind:
      return peak, f'vendor dense bf16 peak ({name})'
  n = 512 if _SMOKE.value else 4096
  return (flops.measure_matmul_flops(n, jnp.bfloat16, seconds=0.3),
          f'measured [{n}, {n}] bf16 matmul (no vendor figure for {kind!r})')


def probe(clock: Clock) -> dict:
  """The devices, the library versions and the peak the MFU figures divide by."""
  del clock
  import jaxlib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  peak, source = _peak_flops_per_device()
  stats = devices[0].memory_stats() or {}
  return {'platform': devices[0].platform, 'backend': jax.default_backend(),
          'device_kind': devices[0].device_kind, 'device_count': len(devices),
          'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'optax': optax.__version__,
          'memory_gib': stats['bytes_limit'] / 2**30 if 'bytes_limit' in stats else None,
          'peak_flops_per_device': peak, 'peak_source': source, 'clu_metrics': CLU_METRICS}


def train_config(kind: str) -> ml_collections.ConfigDict:
  """experiments/default.py with MODELS[kind] (tiny in smoke mode), bf16, scanned layers."""
  if _SMOKE.value:
    config = default.get_config('size=tiny')
    config.model.num_layers = 1
  else:
    config = default.get_config('size=base')
    config.model.update(MODELS[kind])
    config.max_seq_len = SEQ_LEN
    config.global_batch_size = BATCH_PER_DEVICE * jax.device_count()
  if kind == 'moe':
    config.model.moe.update(MOE[_size()])
  config.model.dtype = 'bfloat16'
  config.model.scan_layers = True
  config.model.attention.window_reference_length = config.max_seq_len
  config.model.rope_scaling.original_max_position = config.max_seq_len
  config.optimizer.warmup_steps = 1
  config.num_train_steps = 1000
  return config


@contextlib.contextmanager
def _mesh(mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def mfu(kind: str, clock: Clock) -> dict:
  """The real train step (as xenith/train/loop.py builds it): steady-state step time
  and MFU = model FLOPs (xenith.sizing.flops) / time / peak of all devices."""
  config = train_config(kind)
  config_validation.validate(config, jax.device_count())
  m = config.model
  peak, peak_source = _peak_flops_per_device()
  tokens = config.global_batch_size * config.max_seq_len
  flops_per_step = flops.train_flops_per_token(m, config.max_seq_len) * tokens
  result = {
      'model': kind, 'clu_metrics': CLU_METRICS, 'vocab_size': m.vocab_size,
      'embed_dim': m.embed_dim, 'num_layers': m.num_layers, 'num_heads': m.num_heads,
      'num_kv_heads': m.num_kv_heads, 'head_dim': m.head_dim, 'mlp_dim': m.mlp_dim,
      'seq_len': config.max_seq_len, 'global_batch_size': config.global_batch_size,
      'tokens_per_step': tokens, 'dtype': m.dtype, 'remat': m.remat,
      'scan_layers': m.scan_layers, 'loss_chunk_size': m.loss_chunk_size,
      'attention': attention.resolve_implementation(m.attention.implementation, 0,
                                                    config.max_seq_len),
      'devices': jax.device_count(),
      'matmul_params_per_token': flops.matmul_params(m),
      'model_flops_per_step': flops_per_step,
      'peak_flops_per_device': peak, 'peak_source': peak_source,
      'target_mfu': TARGET_MFU[kind],
  }
  if moe.enabled(m):
    result['moe'] = {**m.moe.to_dict(), 'dispatch': moe_dispatch.resolve(m.moe.dispatch)}

  # As train_and_evaluate builds it: mesh, state born sharded, jitted step with the
  # loop's shardings and state donation.
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  mesh = sharding.create_mesh(config.mesh)
  result['mesh'] = dict(mesh.shape)
  model, tx = make_model(m), optimizer.create_optimizer(config)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(
      benchlib.synthetic_batch(rng, config.global_batch_size, config.max_seq_len,
                               m.vocab_size, EXTRA_DOCUMENTS), batch_sharding)
             for _ in range(2)]
  key = jax.random.key(0)
  with _mesh(mesh, rules):
    _, shardings = abstract_train_state(model, tx, config.max_seq_len, mesh, rules)
    replicated = sharding.replicated(mesh)
    step = jax.jit(make_train_step(model, tx, skip_nonfinite=False),
                   in_shardings=(shardings, batch_sharding, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
    state = init_train_state(model, tx, config.max_seq_len, key, shardings)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0], key).compile()
  result['compile_s'] = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: a list.
  result['xla_flops_per_step'] = float(cost.get('flops', 0.0)) if cost else None
  result['params'] = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
  benchlib.report(result)

  live = {'state': state}
  del state  # Donated at the first step.

  def run(n):
    for i in range(n):
      live['state'], metrics = compiled(live['state'], batches[i % 2], key)
    live['loss'] = float(metrics.compute()['loss'])  # Waits for the last step.

  start = time.perf_counter()
  run(2)  # Warm-up: the first calls allocate and autotune.
  warm_s = (time.perf_counter() - start) / 2
  times, calls = _timed_windows(run, clock, warm_s, windows=4,
                                window_s=0.2 if _SMOKE.value else 2.0)
  median = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  result.update({
      'warmup_step_s': warm_s, 'steps_per_window': calls, 'window_step_times_s': times,
      'step_time_median_s': median, 'step_time_best_s': min(times),
      'tokens_per_s': tokens / median,
      'model_tflops_per_device': flops_per_step / median / 1e12 / jax.device_count(),
      'mfu': flops_per_step / median / (peak * jax.device_count()),
      'mfu_best': flops_per_step / min(times) / (peak * jax.device_count()),
      'final_loss': live['loss'],
      'peak_memory_gib': (stats['peak_bytes_in_use'] / 2**30
                          if 'peak_bytes_in_use' in stats else None),
  })
  result['target_met'] = result['mfu'] >= TARGET_MFU[kind]
  if not math.isfinite(live['loss']):
    raise FloatingPointError(f'non-finite loss {live["loss"]}: the timing is meaningless')
  return result


def _attention_fns(impl: str, block: int, probe_out):
  """(forward(q, k, v), gradient of a random projection of it w.r.t. q, k, v)."""

  def forward(q, k, v):
    return attention.attend(impl, q, k, v, None, block_size=block)

  def loss(q, k, v):
    return jnp.sum(forward(q, k, v).astype(jnp.float32) * probe_out.astype(jnp.float32))

  return forward, jax.grad(loss, argnums=(0, 1, 2))


def attention_kernels(clock: Clock) -> dict:
  """Causal attention forward + backward per implementation and length; outputs
  checked against blockwise's (the tested pure-JAX kernel)."""
  shape = ATTENTION[_size()]
  heads, kv_heads, dim, block = (shape['heads'], shape['kv_heads'], shape['head_dim'],
                                 shape['block_size'])
  peak, peak_source = _peak_flops_per_device()
  result = {'batch': 1, 'heads': heads, 'kv_heads': kv_heads, 'head_dim': dim,
            'dtype': 'bfloat16', 'blockwise_block_size': block, 'segment_ids': None,
            'peak_flops_per_device': peak, 'peak_source': peak_source,
            'flops_rule': 'causal: forward 2 * seq^2 * heads * head_dim (half of the '
                          'full 4 * ...), forward + backward 3.5x forward',
            'rows': []}
  for seq in shape['lengths']:
    keys = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(keys[0], (1, seq, heads, dim), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, seq, kv_heads, dim), jnp.bfloat16) for kk in keys[1:3])
    probe_out = jax.random.normal(keys[3], (1, seq, heads, dim), jnp.bfloat16)
    forward_flops = 2 * seq * seq * heads * dim
    outputs = {}
    for impl in ATTENTION_IMPLEMENTATIONS:
      row = {'seq': seq, 'implementation': impl}
      result['rows'].append(row)
      if clock.left() < 5:
        row['skipped'] = 'time budget spent'
        continue
      try:
        forward, train = _attention_fns(impl, block, probe_out)
        start = time.perf_counter()
        forward = jax.jit(forward).lower(q, k, v).compile()
        train = jax.jit(train).lower(q, k, v).compile()
        row['compile_s'] = time.perf_counter() - start
        outputs[impl] = np.asarray(forward(q, k, v).astype(jnp.float32))
        for name, fn, work in (('forward', forward, forward_flops),
                               ('forward_backward', train, 3.5 * forward_flops)):
          seconds = _median_call_s(fn, (q, k, v), clock)
          row[f'{name}_ms'] = seconds * 1e3
          row[f'{name}_tflops'] = work / seconds / 1e12
        row['forward_backward_fraction_of_peak'] = row['forward_backward_tflops'] * 1e12 / peak
      except Exception as e:  # pylint: disable=broad-except  (recorded; the rest goes on)
        row.update(_error(e))
      benchlib.report(result)
    if 'blockwise' in outputs:
      reference = outputs['blockwise']
      for row in result['rows']:
        if (row['seq'] == seq and row['implementation'] in outputs
            and row['implementation'] != 'blockwise'):
          diff = float(np.abs(outputs[row['implementation']] - reference).max())
          row['max_abs_diff_vs_blockwise'] = diff
          row['relative_diff_vs_blockwise'] = diff / float(np.abs(reference).max())
    benchlib.report(result)
  return result


def moe_dispatch_methods(clock: Clock) -> dict:
  """One MoeBlock's forward + backward per dispatch method on the same params, router
  and tokens; outputs checked against 'dense' (every expert on every token)."""
  shape = DISPATCH[_size()]
  tokens, embed, mlp, experts, k = (shape['tokens'], shape['embed_dim'],
                                    shape['expert_mlp_dim'], shape['num_experts'],
                                    shape['top_k'])
  peak, peak_source = _peak_flops_per_device()
  useful_flops = tokens * k * 3 * 2 * embed * mlp * 3  # Routed SwiGLUs, fwd + bwd.
  result = {**shape, 'dtype': 'bfloat16', 'useful_flops_per_call': useful_flops,
            'auto_dispatch': moe_dispatch.resolve('auto'),
            'peak_flops_per_device': peak, 'peak_source': peak_source, 'rows': []}

  def layer_config(dispatch):
    cfg = default.get_config('size=tiny').model
    cfg.embed_dim = embed
    cfg.dtype = 'bfloat16'
    cfg.moe.update(dict(num_experts=experts, num_experts_per_token=k, expert_mlp_dim=mlp,
                        dispatch=dispatch))
    return ml_collections.FrozenConfigDict(cfg)

  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (1, tokens, embed), jnp.bfloat16)
  cotangent = jax.random.normal(keys[1], (1, tokens, embed), jnp.bfloat16)
  params = nn.unbox(moe.MoeBlock(layer_config('dense')).init(keys[2], x, None))['params']
  outputs = {}
  for dispatch in DISPATCHES:
    row = {'dispatch': dispatch}
    result['rows'].append(row)
    if clock.left() < 5:
      row['skipped'] = 'time budget spent'
      continue
    try:
      block = moe.MoeBlock(layer_config(dispatch))

      def loss(params, x, block=block):
        y, stats = block.apply({'params': params}, x, None)
        total = jnp.sum(y.astype(jnp.float32) * cotangent.astype(jnp.float32))
        return total + stats['aux_loss'], (y, stats)

      start = time.perf_counter()
      train = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(params, x).compile()
      row['compile_s'] = time.perf_counter() - start
      _, (y, stats) = train(params, x)
      outputs[dispatch] = np.asarray(y.astype(jnp.float32))
      row['dropped_fraction'] = float(stats['dropped_fraction'])
      median = _median_call_s(train, (params, x), clock)
      row.update(forward_backward_ms=median * 1e3,
                 useful_tflops=useful_flops / median / 1e12,
                 fraction_of_peak=useful_flops / median / peak)
      if dispatch != 'dense' and 'dense' in outputs:
        row['max_abs_diff_vs_dense'] = float(np.abs(outputs[dispatch] - outputs['dense']).max())
    except Exception as e:  # pylint: disable=broad-except  (recorded; the rest goes on)
      row.update(_error(e))
    benchlib.report(result)
  dense = next((r for r in result['rows'] if r['dispatch'] == 'dense'
                and 'forward_backward_ms' in r), None)
  for row in result['rows']:
    if dense and 'forward_backward_ms' in row:
      row['speedup_vs_dense'] = dense['forward_backward_ms'] / row['forward_backward_ms']
  if 'dense' in outputs:
    result['dense_output_max_abs'] = float(np.abs(outputs['dense']).max())
  return result


def main(argv):
  del argv
  clock = Clock(_BUDGET.value)
  section = _SECTION.value
  if section == 'probe':
    result = probe(clock)
  elif section.startswith('mfu_'):
    result = mfu(section[len('mfu_'):], clock)
  elif section == 'attention':
    result = attention_kernels(clock)
  else:
    result = moe_dispatch_methods(clock)
  benchlib.report(result)


if __name__ == '__main__':
  flags.mark_flag_as_required('section')
  app.run(main)
