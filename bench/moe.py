"""MoE layer speed by dispatch: forward + backward of one `MoeBlock`, side by side.

  .venv/bin/python bench/moe.py     # 8 experts, top-2, d_model 512, d_ff 1024, 4096 tokens

Each dispatch method runs the same layer (same params, router and tokens) under
`jax.jit(jax.grad(...))` with respect to the params and the input. The methods are
timed in interleaved rounds, each round followed by a float32 matmul measurement
(`xenith.sizing.flops.measure_matmul_flops`), so a slow spell of the shared machine hits all
of them. Useful FLOPs count only the routed work: tokens x top-k x 3 matmuls x 2 x
embed x mlp, times 3 for forward + backward. Results: a Markdown table on stdout and
JSON in bench/results/moe.json. Run with XLA_FLAGS unset (one CPU device).
"""

import datetime
import math
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # pylint: disable=g-import-not-at-top

from experiments import default  # pylint: disable=g-import-not-at-top
from xenith import host_memory
from xenith.sizing import flops
from xenith.model import moe
from xenith.model import moe_dispatch

_TOKENS = flags.DEFINE_integer('tokens', 4096, 'Tokens through the layer per call.')
_EMBED = flags.DEFINE_integer('embed_dim', 512, 'd_model.')
_MLP = flags.DEFINE_integer('expert_mlp_dim', 1024, 'd_ff of each expert.')
_EXPERTS = flags.DEFINE_integer('num_experts', 8, 'Routed experts.')
_TOP_K = flags.DEFINE_integer('top_k', 2, 'Experts per token.')
_DISPATCHES = flags.DEFINE_list(
    'dispatches', ['dense', 'dropless_gather', 'capacity', 'dropless_ragged'],
    'Dispatch methods to time; dropless_gather:<block_size> picks a block size.')
_CAPACITY_FACTOR = flags.DEFINE_float('capacity_factor', 1.25, "For 'capacity'.")
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds.')
_MIN_ROUND_SECONDS = flags.DEFINE_float(
    'min_round_seconds', 1.0, 'Each method runs at least this long per round.')
_MATMUL_SECONDS = flags.DEFINE_float('matmul_seconds', 1.0, 'Per matmul measurement.')
_JSON = flags.DEFINE_string('json', 'bench/results/moe.json', 'Where to write results.')


def layer_config(dispatch: str, block_size: int) -> ml_collections.FrozenConfigDict:
  cfg = default.get_config('size=tiny').model
  cfg.embed_dim = _EMBED.value
  cfg.moe.update(dict(
      num_experts=_EXPERTS.value, num_experts_per_token=_TOP_K.value,
      expert_mlp_dim=_MLP.value, dispatch=dispatch, block_size=block_size,
      capacity_factor=_CAPACITY_FACTOR.value))
  return ml_collections.FrozenConfigDict(cfg)


class MethodBench:
  """One dispatch method: its jitted forward + backward and its timings."""

  def __init__(self, spec: str, params, x, cotangent):
    self.spec = spec
    dispatch, _, block = spec.partition(':')
    self.dispatch = moe_dispatch.resolve(dispatch)
    self.block_size = int(block) if block else default.get_config().model.moe.block_size
    block = moe.MoeBlock(layer_config(self.dispatch, self.block_size))

    def loss(params, x):
      y, stats = block.apply({'params': params}, x, None)
      return jnp.sum(y * cotangent) + stats['aux_loss'], stats

    self.args = (params, x)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(*self.args)
    start = time.perf_counter()
    self.step = lowered.compile()
    self.compile_s = time.perf_counter() - start
    (_, _), self.stats = self.step(*self.args)
    self.times: list[float] = []
    self.calls_per_round = 1

  def run(self, calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    return benchlib.seconds_per_call(self.step, self.args, calls)


def gather_rows(bench: MethodBench, logits) -> int:
  """Rows the dropless_gather kernel computes (blocks in use x block size)."""
  expert_index, _ = moe.route(logits, _TOP_K.value, True)
  block = moe_dispatch.gather_block_size(_TOKENS.value, _TOP_K.value, _EXPERTS.value,
                                         bench.block_size)
  *_, num_blocks = moe_dispatch.block_layout(expert_index, _EXPERTS.value, block)
  return int(num_blocks.sum()) * block


def main(argv):
  del argv
  host_memory.trim_after_compiles()  # As main.py does.
  tokens, k, embed, mlp = _TOKENS.value, _TOP_K.value, _EMBED.value, _MLP.value
  useful_flops = tokens * k * 3 * 2 * embed * mlp * 3
  result = {
      'command': ' '.join(['python'] + sys.argv),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': benchlib.machine_info(**benchlib.jax_info()),
      'load_average_start': os.getloadavg(),
      'shape': dict(tokens=tokens, embed_dim=embed, expert_mlp_dim=mlp,
                    num_experts=_EXPERTS.value, top_k=k,
                    capacity_factor=_CAPACITY_FACTOR.value),
      'useful_flops_per_call': useful_flops,
      'auto_dispatch': moe_dispatch.resolve('auto'),
  }
  print(f"{result['machine']['cpu']}, {result['machine']['usable_cores']} cores, "
        f"jax {jax.__version__}; auto dispatch = {result['auto_dispatch']}")

  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (1, tokens, embed), jnp.float32)
  cotangent = jax.random.normal(keys[1], (1, tokens, embed), jnp.float32)
  params = nn.unbox(moe.MoeBlock(layer_config('dense', 256)).init(keys[2], x, None))['params']
  logits = x[0] @ params['router']['kernel']

  before = flops.measure_matmul_flops(1024, seconds=_MATMUL_SECONDS.value) / 1e9
  print(f'matmul GFLOP/s before: {before:.1f}')
  benches = []
  for spec in _DISPATCHES.value:
    bench = MethodBench(spec, params, x, cotangent)
    warm = bench.run(1)
    bench.calls_per_round = max(1, math.ceil(_MIN_ROUND_SECONDS.value / warm))
    print(f'{spec}: compiled in {bench.compile_s:.1f}s; ~{warm * 1e3:.0f} ms/call', flush=True)
    benches.append(bench)

  round_matmul = []
  for r in range(_ROUNDS.value):
    for bench in benches:
      bench.times.append(bench.run(bench.calls_per_round))
    round_matmul.append(flops.measure_matmul_flops(
        1024, seconds=_MATMUL_SECONDS.value / 2) / 1e9)
    print(f'round {r + 1}/{_ROUNDS.value}: ' + ', '.join(
        f'{b.spec} {b.times[-1] * 1e3:.0f} ms' for b in benches)
          + f', matmul {round_matmul[-1]:.1f} GFLOP/s', flush=True)
  after = flops.measure_matmul_flops(1024, seconds=_MATMUL_SECONDS.value) / 1e9
  peak = max(before, after, *round_matmul)

  dense = next((b for b in benches if b.dispatch == 'dense'), None)
  rows = []
  for b in benches:
    median = statistics.median(b.times)
    paired = [useful_flops / t / 1e9 / m for t, m in zip(b.times, round_matmul)]
    row = {
        'dispatch': b.spec, 'method': b.dispatch, 'block_size': b.block_size,
        'compile_s': b.compile_s, 'calls_per_round': b.calls_per_round,
        'round_times_s': b.times, 'median_s': median, 'best_s': min(b.times),
        'useful_gflops_median': useful_flops / median / 1e9,
        'fraction_of_peak_median': useful_flops / median / 1e9 / peak,
        'fraction_of_round_matmul_median': statistics.median(paired),
        'dropped_fraction': float(b.stats['dropped_fraction']),
        'max_load_ratio': float(b.stats['max_load_ratio']),
        'min_load_ratio': float(b.stats['min_load_ratio']),
    }
    if dense is not None:
      row['speedup_vs_dense_median'] = statistics.median(
          [d / t for d, t in zip(dense.times, b.times)])
    if b.dispatch == 'dropless_gather':
      row['rows_computed'] = gather_rows(b, logits)
      row['rows_routed'] = tokens * k
    rows.append(row)
  result.update({
      'load_average_end': os.getloadavg(),
      'matmul_gflops': {'before': before, 'after': after, 'rounds': round_matmul},
      'peak_gflops': peak,
      'methods': rows,
  })

  print(f'\nmatmul GFLOP/s: before {before:.1f}, rounds '
        + ', '.join(f'{m:.1f}' for m in round_matmul) + f', after {after:.1f}; '
        f'peak {peak:.1f}\n')
  print('| dispatch | ms median (best) | useful GFLOP/s | of peak | of round matmul '
        '| vs dense | dropped | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    speedup = f"{r['speedup_vs_dense_median']:.2f}x" if 'speedup_vs_dense_median' in r else ''
    print(f"| {r['dispatch']} | {r['median_s'] * 1e3:.0f} ({r['best_s'] * 1e3:.0f}) "
          f"| {r['useful_gflops_median']:.1f} | {r['fraction_of_peak_median']:.0%} "
          f"| {r['fraction_of_round_matmul_median']:.0%} | {speedup} "
          f"| {r['dropped_fraction']:.1%} | {r['compile_s']:.1f} |")
  benchlib.write_json(_JSON.value, result)


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()  # As main.py does, so the step runs as in a training run.
  app.run(main)
