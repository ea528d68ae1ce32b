"""Train-step throughput and MFU of the default config, measured in one process.

  .venv/bin/python bench/train_throughput.py [--sizes=tiny,small] [--steps=20] \
      [--json=bench/results/train_throughput.json]

The train step is built as `xenith.train.train_and_evaluate` builds it: the mesh from
`config.mesh`, the state initialised straight into its shardings, and
`jax.jit(make_train_step(...))` with the loop's in/out shardings and state donation.
It runs on synthetic random batches of the config's shape (no data pipeline: the
step's cost does not depend on the token values).

MFU = model FLOPs (PaLM appendix B, `xenith.sizing.flops.train_flops_per_token`) per second
over the float32 matmul peak measured in this process: the best [n, n] @ [n, n] rate
seen before, during and after the train steps. Shared machines swing in speed, so the
sizes are timed in interleaved rounds, each followed by a matmul measurement; "MFU per
round" divides each round's model rate by that round's matmul rate, so that a slow
spell cancels. `--sizes=base` adds the GPU-sized model (far too slow and too large for
a CPU).
"""

import contextlib
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
import numpy as np

# bench/ is not a package: make `xenith` and `experiments` importable from the repo root.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)

import benchlib  # pylint: disable=g-import-not-at-top

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import default
from xenith.sizing import flops
from xenith.train import optimizer
from xenith import host_memory
from xenith import sharding
from xenith.model.build import make_model
from xenith.train.steps import make_train_step
from xenith.train.train_state import abstract_train_state, init_train_state
# pylint: enable=g-import-not-at-top,wrong-import-position

_SIZES = flags.DEFINE_list(
    'sizes', ['tiny', 'small'], f'Sizes of experiments/default.py to time; of '
    f'{sorted(default.SIZES)}. The default config is `small`.')
_STEPS = flags.DEFINE_integer(
    'steps', 20, 'Timed steps per size (at least), split evenly over the rounds.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds over all sizes.')
_WARMUP = flags.DEFINE_integer(
    'warmup', 2, 'Untimed steps per size after the first; they set the steps per round.')
_MIN_ROUND_SECONDS = flags.DEFINE_float(
    'min_round_seconds', 1.0, 'Fast sizes run more steps per round, to fill this long.')
_MATMUL_SIZES = flags.DEFINE_list(
    'matmul_sizes', ['1024', '2048'], 'Square float32 matmuls [n, n] @ [n, n] to time.')
_MATMUL_SECONDS = flags.DEFINE_float(
    'matmul_seconds', 1.0, 'Seconds spent on each matmul measurement (best rep counts).')
_JSON = flags.DEFINE_string(
    'json', os.path.join(_REPO_ROOT, 'bench', 'results', 'train_throughput.json'),
    'Where to write the results as JSON.')


class SizeBench:
  """One size's config, compiled train step and live state, stepped in rounds."""

  def __init__(self, size: str, num_host_batches: int = 4):
    self.size = size
    self.config = config = default.get_config(f'size={size}')
    # As in train_and_evaluate: mesh, model, optimizer, shardings, jitted step.
    self.rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
    self.mesh = sharding.create_mesh(config.mesh)
    model = make_model(config.model)
    tx = optimizer.create_optimizer(config)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    replicated = sharding.replicated(self.mesh)
    rng = np.random.default_rng(config.seed)
    self.host_batches = [
        benchlib.synthetic_batch(rng, config.global_batch_size, config.max_seq_len,
                                 config.model.vocab_size) for _ in range(num_host_batches)]

    with self._context():
      _, state_shardings = abstract_train_state(
          model, tx, config.max_seq_len, self.mesh, self.rules)
      self.train_step = jax.jit(
          make_train_step(model, tx, skip_nonfinite=config.on_nonfinite == 'skip'),
          in_shardings=(state_shardings, self.batch_sharding, replicated),
          out_shardings=(state_shardings, replicated), donate_argnums=(0,))
      init_key, self.dropout_key = jax.random.split(jax.random.key(config.seed))
      self.state = init_train_state(
          model, tx, config.max_seq_len, init_key, state_shardings)
      # Compile ahead of time to time tracing and compilation apart; the jitted
      # function's own calls then reuse the executable.
      start = time.perf_counter()
      lowered = self.train_step.lower(self.state, self._batch(0), self.dropout_key)
      self.lower_s = time.perf_counter() - start
      start = time.perf_counter()
      compiled = lowered.compile()
      self.compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: a list.
    self.xla_flops_per_step = float(cost.get('flops', 0.0)) if cost else 0.0

    self.num_params = sum(x.size for x in jax.tree_util.tree_leaves(self.state.params))
    self.tokens_per_step = config.global_batch_size * config.max_seq_len
    self.flops_per_token = flops.train_flops_per_token(config.model, config.max_seq_len)
    self.step_times = []  # Mean step time of each round, seconds.
    self.steps_per_round = 1

  @contextlib.contextmanager
  def _context(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def _batch(self, i: int) -> dict[str, jax.Array]:
    host = self.host_batches[i % len(self.host_batches)]
    return sharding.global_batch(host, self.batch_sharding)

  def run(self, num_steps: int) -> float:
    """Runs `num_steps` steps as the loop does (dispatched back to back); returns seconds."""
    with self._context():
      start = time.perf_counter()
      for i in range(num_steps):
        self.state, metrics = self.train_step(self.state, self._batch(i), self.dropout_key)
      jax.block_until_ready((self.state, metrics))
      elapsed = time.perf_counter() - start
    loss = float(metrics.loss.compute())
    if not math.isfinite(loss):
      raise RuntimeError(f'{self.size}: non-finite loss {loss}; the timing is meaningless.')
    return elapsed


def measure_matmuls(sizes: list[int], seconds: float) -> dict[str, float]:
  """Float32 matmul GFLOP/s by matrix size (best repeat of each)."""
  return {str(n): flops.measure_matmul_flops(n, seconds=seconds) / 1e9 for n in sizes}


def summarize(bench: SizeBench, peak_gflops: float, round_matmul: list[float]) -> dict:
  """Per-size results; `round_matmul` is the matmul GFLOP/s measured in each round."""
  median_s = statistics.median(bench.step_times)
  best_s = min(bench.step_times)
  flops_per_step = bench.flops_per_token * bench.tokens_per_step
  # Each round's model rate over the matmul rate of the same round: what the machine
  # does to both at once cancels in the ratio.
  paired = [flops_per_step / t / 1e9 / m for t, m in zip(bench.step_times, round_matmul)]
  return {
      'size': bench.size,
      'params': bench.num_params,
      'global_batch_size': bench.config.global_batch_size,
      'max_seq_len': bench.config.max_seq_len,
      'tokens_per_step': bench.tokens_per_step,
      'flops_per_token': bench.flops_per_token,
      'model_flops_per_step': flops_per_step,
      'xla_flops_per_step': bench.xla_flops_per_step,
      'lower_s': bench.lower_s,
      'compile_s': bench.compile_s,
      'steps_per_round': bench.steps_per_round,
      'timed_steps': bench.steps_per_round * len(bench.step_times),
      'round_step_times_s': bench.step_times,
      'step_time_median_s': median_s,
      'step_time_best_s': best_s,
      'tokens_per_s_median': bench.tokens_per_step / median_s,
      'tokens_per_s_best': bench.tokens_per_step / best_s,
      'model_gflops_median': flops_per_step / median_s / 1e9,
      'mfu_median': flops_per_step / median_s / 1e9 / peak_gflops,
      'mfu_best': flops_per_step / best_s / 1e9 / peak_gflops,
      'mfu_paired_median': statistics.median(paired),
  }


def print_tables(result: dict) -> None:
  matmul = result['matmul_gflops']
  print('\nfloat32 matmul GFLOP/s (best repeat)')
  print('| n | before | after |\n|---|---|---|')
  for n in matmul['before']:
    print(f"| {n} | {matmul['before'][n]:.1f} | {matmul['after'][n]:.1f} |")
  print(f"In the rounds (n={matmul['rounds_n']}): "
        + ', '.join(f'{v:.1f}' for v in matmul['rounds']))
  print(f"MFU peak = max of all of these = {result['peak_gflops']:.1f} GFLOP/s\n")
  print('| size | params | FLOPs/token | XLA/model FLOPs | tokens/step | compile s '
        '| step ms median (best) | tokens/s median | model GFLOP/s | MFU median (best) '
        '| MFU per round |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in result['sizes']:
    xla_ratio = r['xla_flops_per_step'] / r['model_flops_per_step']
    print(f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.2f}M "
          f"| {xla_ratio:.2f} | {r['tokens_per_step']} | {r['compile_s']:.1f} "
          f"| {r['step_time_median_s'] * 1e3:.1f} ({r['step_time_best_s'] * 1e3:.1f}) "
          f"| {r['tokens_per_s_median']:,.0f} | {r['model_gflops_median']:.1f} "
          f"| {r['mfu_median']:.1%} ({r['mfu_best']:.1%}) | {r['mfu_paired_median']:.1%} |")


def main(argv):
  del argv
  host_memory.trim_after_compiles()  # As main.py does.
  unknown = sorted(set(_SIZES.value) - set(default.SIZES))
  if unknown:
    raise app.UsageError(f'Unknown size(s) {unknown}; choose from {sorted(default.SIZES)}.')
  if min(_ROUNDS.value, _STEPS.value, _WARMUP.value) < 1:
    raise app.UsageError('--rounds, --steps and --warmup must be positive.')
  matmul_sizes = [int(n) for n in _MATMUL_SIZES.value]
  result = {
      'command': ' '.join(['python'] + sys.argv),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': benchlib.machine_info(**benchlib.jax_info()),
      'load_average_start': os.getloadavg(),
  }
  print(f"{result['machine']['cpu']}, {result['machine']['usable_cores']} cores, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}")

  before = measure_matmuls(matmul_sizes, _MATMUL_SECONDS.value)
  print('matmul GFLOP/s before:', {n: round(v, 1) for n, v in before.items()})

  benches = []
  for size in _SIZES.value:
    bench = SizeBench(size)
    bench.run(1)  # The first call traces again (the executable is reused); untimed.
    warm_step_s = bench.run(_WARMUP.value) / _WARMUP.value
    bench.steps_per_round = max(math.ceil(_STEPS.value / _ROUNDS.value),
                                math.ceil(_MIN_ROUND_SECONDS.value / warm_step_s))
    print(f'{size}: compiled in {bench.compile_s:.1f}s (+{bench.lower_s:.1f}s tracing); '
          f'~{warm_step_s * 1e3:.1f} ms/step; {bench.steps_per_round} steps per round')
    benches.append(bench)

  # Interleaved: a slow spell of the machine lands on every size (and on a matmul
  # measured in the same round, for a per-round MFU), not on one of them.
  round_matmul = []
  for round_index in range(_ROUNDS.value):
    for bench in benches:
      bench.step_times.append(bench.run(bench.steps_per_round) / bench.steps_per_round)
    round_matmul.append(flops.measure_matmul_flops(
        matmul_sizes[0], seconds=_MATMUL_SECONDS.value / 2) / 1e9)
    print(f'round {round_index + 1}/{_ROUNDS.value}: ' + ', '.join(
        f'{b.size} {b.step_times[-1] * 1e3:.1f} ms/step' for b in benches)
          + f', matmul {round_matmul[-1]:.1f} GFLOP/s')

  after = measure_matmuls(matmul_sizes, _MATMUL_SECONDS.value)
  print('matmul GFLOP/s after:', {n: round(v, 1) for n, v in after.items()})
  # The peak is the best rate the machine showed: noise only ever slows it down.
  peak = max(*before.values(), *after.values(), *round_matmul)
  result.update({
      'load_average_end': os.getloadavg(),
      'matmul_gflops': {'before': before, 'after': after, 'rounds': round_matmul,
                        'rounds_n': matmul_sizes[0]},
      'peak_gflops': peak,
      'peak_rule': 'max over all float32 matmul measurements (before, rounds, after)',
      'sizes': [summarize(b, peak, round_matmul) for b in benches],
  })
  print_tables(result)

  benchlib.write_json(_JSON.value, result)


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()  # As main.py does, so the step runs as in a training run.
  app.run(main)
