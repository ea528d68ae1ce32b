"""One attention layer at long context: full vs sparse, time and peak memory by length.

  .venv/bin/python bench/attention.py     # --lengths=2048,...,65536 --rounds=3

Forward + backward of one `xenith.model.attention.Attention` (q/k/v/out projections,
RoPE and the kernel; gradient w.r.t. the params and the input x) at batch 1, float32,
for each sequence length and three variants of the layer:

- full: full causal attention, implementation 'dense' (the reference kernel: the
  [seq, seq] mask and scores materialised). Lengths whose compiled peak memory exceeds
  --dense_budget_gib are compiled (XLA reports the memory without allocating it) but
  not run: "skipped (would need X GiB)".
- full_blockwise: full causal attention, implementation 'blockwise' (flash-style,
  linear memory, blocks above the diagonal skipped).
- sparse: the issue's pattern: sliding windows 512/1024/2048 split across the KV-head
  groups (window_split='heads'), 64 global tokens, implementation 'blockwise'.

Peak memory is XLA's compiled memory analysis of the jitted fwd+bwd
(`memory_analysis()`: temp + arguments + outputs - aliased), deterministic and per
variant, also for skipped lengths; "temp" is the scratch part alone. Time: the variants
of one length are timed in interleaved rounds (compile and one warm-up call excluded);
each round runs each variant back to back for at least --min_round_seconds (once for
slow ones); the table shows the median over rounds. A variant whose time, extrapolated
from the previous length (quadratic for full attention, linear for sparse), would exceed
--max_call_seconds is skipped at that length and longer ones.

The issue's targets come from the same run: (b) and (c) from the 8k row; (a), sparse
time per token at 32k over 2k, from --paired_rounds extra rounds that time sparse at 2k
and 32k interleaved, because the table measures the lengths one after another and a
drifting load on a shared machine skews that ratio (the table's figure is reported
too). Results: a Markdown table on stdout and JSON in bench/results/attention.json. Run
with XLA_FLAGS unset (one CPU device).
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
from xenith.model import attention
from xenith.model import attention_pattern

VARIANTS = ('full', 'full_blockwise', 'sparse')

_LENGTHS = flags.DEFINE_list(
    'lengths', ['2048', '4096', '8192', '16384', '32768', '65536'], 'Sequence lengths.')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), f'Any of {VARIANTS}.')
_EMBED = flags.DEFINE_integer('embed_dim', 384, 'd_model.')
_HEADS = flags.DEFINE_integer('num_heads', 6, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('num_kv_heads', 3, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Width of each head.')
_WINDOWS = flags.DEFINE_list('window_sizes', ['512', '1024', '2048'],
                             "sparse: windows, split across the KV heads ('heads').")
_GLOBAL = flags.DEFINE_integer('num_global_tokens', 64, 'sparse: global tokens.')
_BLOCK = flags.DEFINE_integer(
    'block_size', 64, "config.model.attention.block_size of the 'blockwise' variants "
    '(64 was the fastest of 64/128/256 for sparse at 8k and 32k; docs/benchmarks.md).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds per length.')
_MIN_ROUND_SECONDS = flags.DEFINE_float(
    'min_round_seconds', 0.5, 'Each variant runs at least this long per round.')
_DENSE_BUDGET = flags.DEFINE_float(
    'dense_budget_gib', 8.0, "full ('dense'): skip lengths whose compiled peak exceeds this.")
_MAX_CALL_SECONDS = flags.DEFINE_float(
    'max_call_seconds', 120.0, 'Skip a variant at lengths where its extrapolated time '
    'per call exceeds this.')
_PAIRED_ROUNDS = flags.DEFINE_integer(
    'paired_rounds', 5, 'Target (a): rounds timing sparse at 2k and 32k interleaved '
    '(0 = use the table, i.e. lengths measured one after the other).')
_JSON = flags.DEFINE_string('json', 'bench/results/attention.json', 'Where to write results.')

GIB = 1024**3
MIB = 1024**2


def layer_config(variant: str) -> ml_collections.FrozenConfigDict:
  cfg = default.get_config('size=small').model
  cfg.embed_dim = _EMBED.value
  cfg.num_heads = _HEADS.value
  cfg.num_kv_heads = _KV_HEADS.value
  cfg.head_dim = _HEAD_DIM.value
  cfg.dtype = 'float32'
  cfg.attention.update(dict(
      implementation='dense' if variant == 'full' else 'blockwise',
      block_size=_BLOCK.value, window_split='heads', full_attention_layers=0,
      dynamic_windows=False,
      window_sizes=tuple(int(w) for w in _WINDOWS.value) if variant == 'sparse' else (),
      num_global_tokens=_GLOBAL.value if variant == 'sparse' else 0))
  return ml_collections.FrozenConfigDict(cfg)


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  return {'temp_bytes': m.temp_size_in_bytes, 'argument_bytes': m.argument_size_in_bytes,
          'output_bytes': m.output_size_in_bytes, 'alias_bytes': m.alias_size_in_bytes,
          'peak_bytes': peak}


class VariantBench:
  """One variant at one length: its compiled fwd+bwd, memory and timings."""

  def __init__(self, variant: str, seq: int, params, x, cotangent):
    self.variant, self.seq = variant, seq
    self.config = layer_config(variant)
    layer = attention.Attention(self.config, layer=0)
    self.groups = [(g.kv_start, g.kv_end, g.window)
                   for g in attention_pattern.layer_head_groups(self.config, 0, seq)]

    def loss(params, x, cotangent):
      positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None]
      y = layer.apply({'params': params}, x, None, positions)
      return jnp.sum(y * cotangent)

    self.args = (params, x, cotangent)
    start = time.perf_counter()
    self.step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*self.args).compile()
    self.compile_s = time.perf_counter() - start
    self.memory = memory(self.step)
    self.times: list[float] = []
    self.calls_per_round = 1
    self.warm_s = None

  def run(self, calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    return benchlib.seconds_per_call(self.step, self.args, calls)


def predicted_seconds(variant: str, seq: int, measured: dict) -> float | None:
  """Time per call extrapolated from the longest shorter length measured, or None."""
  shorter = [s for s in measured if s < seq]
  if not shorter:
    return None
  prev = max(shorter)
  power = 1 if variant == 'sparse' else 2
  return measured[prev] * (seq / prev)**power


def paired_per_token_ratio(short: int, long: int) -> dict | None:
  """Target (a) with the two lengths timed in the same rounds, so load changes cancel.

  The table measures one length after the other; on a shared machine whose load drifts
  over the run that alone can move the 32k / 2k ratio by 20-30%.
  """
  if _PAIRED_ROUNDS.value <= 0:
    return None
  benches = {}
  for seq in (short, long):
    keys = jax.random.split(jax.random.key(seq), 3)
    x = jax.random.normal(keys[0], (1, seq, _EMBED.value), jnp.float32)
    cotangent = jax.random.normal(keys[1], (1, seq, _EMBED.value), jnp.float32)
    params = nn.unbox(attention.Attention(layer_config('sparse'), layer=0).init(
        keys[2], x[:, :8], None, jnp.arange(8)[None]))['params']
    benches[seq] = VariantBench('sparse', seq, params, x, cotangent)
    benches[seq].warm_s = benches[seq].run(1)
    benches[seq].calls_per_round = max(
        1, math.ceil(_MIN_ROUND_SECONDS.value / benches[seq].warm_s))
  ratios = []
  for r in range(_PAIRED_ROUNDS.value):
    for b in benches.values():
      b.times.append(b.run(b.calls_per_round))
    ratios.append((benches[long].times[-1] / long) / (benches[short].times[-1] / short))
    print(f'paired round {r + 1}/{_PAIRED_ROUNDS.value}: sparse {short} '
          f'{benches[short].times[-1] * 1e3:.0f} ms, {long} {benches[long].times[-1] * 1e3:.0f} '
          f'ms, per-token ratio {ratios[-1]:.2f}', flush=True)
  med = {s: statistics.median(b.times) for s, b in benches.items()}
  return {'lengths': [short, long], 'round_times_s': {s: b.times for s, b in benches.items()},
          'calls_per_round': {s: b.calls_per_round for s, b in benches.items()},
          'round_ratios': ratios,
          'median_ratio': (med[long] / long) / (med[short] / short),
          'median_of_round_ratios': statistics.median(ratios)}


def ratio(a, b):
  return a / b if a and b else None


def main(argv):
  del argv
  lengths = [int(s) for s in _LENGTHS.value]
  variants = [v for v in VARIANTS if v in _VARIANTS.value]
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f'Unknown variants {sorted(unknown)}; choose from {VARIANTS}.')
  result = {
      'command': ' '.join(['python'] + sys.argv),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': benchlib.machine_info(**benchlib.jax_info()),
      'load_average_start': os.getloadavg(),
      'shape': dict(batch=1, embed_dim=_EMBED.value, num_heads=_HEADS.value,
                    num_kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value, dtype='float32'),
      'sparse_pattern': dict(window_sizes=[int(w) for w in _WINDOWS.value],
                             window_split='heads', num_global_tokens=_GLOBAL.value),
      'block_size': _BLOCK.value,
      'rounds': _ROUNDS.value,
      'dense_budget_gib': _DENSE_BUDGET.value,
      'max_call_seconds': _MAX_CALL_SECONDS.value,
  }
  print(f"{result['machine']['cpu']}, {result['machine']['usable_cores']} cores, "
        f"jax {jax.__version__}; load average {result['load_average_start'][0]:.2f}",
        flush=True)

  rows = {v: {} for v in variants}  # variant -> seq -> row
  measured = {v: {} for v in variants}  # variant -> seq -> median seconds
  for seq in lengths:
    keys = jax.random.split(jax.random.key(seq), 3)
    x = jax.random.normal(keys[0], (1, seq, _EMBED.value), jnp.float32)
    cotangent = jax.random.normal(keys[1], (1, seq, _EMBED.value), jnp.float32)
    params = nn.unbox(attention.Attention(layer_config('full_blockwise'), layer=0).init(
        keys[2], x[:, :8], None, jnp.arange(8)[None]))['params']
    benches = []
    for v in variants:
      # Compiling allocates nothing, so every variant gets its memory figure, run or not.
      bench = VariantBench(v, seq, params, x, cotangent)
      peak_gib = bench.memory['peak_bytes'] / GIB
      row = {'variant': v, 'seq': seq, 'implementation': bench.config.attention.implementation,
             'head_groups': bench.groups, 'compile_s': bench.compile_s,
             **bench.memory, 'peak_mib': bench.memory['peak_bytes'] / MIB,
             'temp_mib': bench.memory['temp_bytes'] / MIB}
      rows[v][seq] = row
      predicted = predicted_seconds(v, seq, measured[v])
      if v == 'full' and peak_gib > _DENSE_BUDGET.value:
        row['skipped'] = f'skipped (would need {peak_gib:.1f} GiB)'
      elif predicted is not None and predicted > _MAX_CALL_SECONDS.value:
        row['predicted_s'] = predicted
        row['skipped'] = f'skipped (~{predicted:.0f} s per call estimated)'
      if row.get('skipped'):
        print(f'{seq} {v}: {row["skipped"]}; compiled peak {row["peak_mib"]:.0f} MiB',
              flush=True)
        del bench
        continue
      bench.warm_s = bench.run(1)
      bench.calls_per_round = max(1, math.ceil(_MIN_ROUND_SECONDS.value / bench.warm_s))
      print(f'{seq} {v}: compiled in {bench.compile_s:.1f}s, peak {row["peak_mib"]:.0f} MiB '
            f'(temp {row["temp_mib"]:.0f}); ~{bench.warm_s * 1e3:.0f} ms/call', flush=True)
      benches.append(bench)

    for r in range(_ROUNDS.value):
      for bench in benches:
        bench.times.append(bench.run(bench.calls_per_round))
      print(f'{seq} round {r + 1}/{_ROUNDS.value}: ' + ', '.join(
          f'{b.variant} {b.times[-1] * 1e3:.0f} ms' for b in benches), flush=True)
    for bench in benches:
      median = statistics.median(bench.times)
      measured[bench.variant][seq] = median
      rows[bench.variant][seq].update({
          'calls_per_round': bench.calls_per_round, 'warm_s': bench.warm_s,
          'round_times_s': bench.times, 'median_s': median, 'best_s': min(bench.times),
          'ms_per_1k_tokens': median * 1e3 / (seq / 1024)})
    result['peak_rss_mib_after_' + str(seq)] = benchlib.peak_rss_mib()
    del benches

  # The targets, from this run.
  def get(v, seq, key):
    row = rows.get(v, {}).get(seq)
    return None if not row or row.get('skipped') else row.get(key)

  def entry(value, threshold, met_if):
    if value is None:
      return {'value': None, 'threshold': threshold, 'met': None}
    return {'value': value, 'threshold': threshold, 'met': bool(met_if(value))}

  sequential = ratio(get('sparse', 32768, 'ms_per_1k_tokens'),
                    get('sparse', 2048, 'ms_per_1k_tokens'))
  paired = paired_per_token_ratio(2048, 32768) if 'sparse' in variants else None
  per_token = paired['median_ratio'] if paired else sequential
  targets = {
      'a_sparse_time_per_token_32k_over_2k': entry(per_token, 1.5, lambda r: r <= 1.5),
      'b_speedup_vs_full_at_8k': entry(
          ratio(get('full', 8192, 'median_s'), get('sparse', 8192, 'median_s')), 5.0,
          lambda r: r >= 5.0),
      'c_peak_memory_reduction_vs_full_at_8k': entry(
          ratio(get('full', 8192, 'peak_bytes'), get('sparse', 8192, 'peak_bytes')), 4.0,
          lambda r: r >= 4.0),
  }
  not_targets = {
      'speedup_vs_full_blockwise_at_8k': ratio(get('full_blockwise', 8192, 'median_s'),
                                               get('sparse', 8192, 'median_s')),
      'peak_memory_reduction_vs_full_blockwise_at_8k': ratio(
          get('full_blockwise', 8192, 'peak_bytes'), get('sparse', 8192, 'peak_bytes')),
      'full_blockwise_time_per_token_32k_over_2k': ratio(
          get('full_blockwise', 32768, 'ms_per_1k_tokens'),
          get('full_blockwise', 2048, 'ms_per_1k_tokens')),
  }
  result.update({
      'load_average_end': os.getloadavg(),
      'peak_rss_mib': benchlib.peak_rss_mib(),
      'results': [rows[v][s] for v in variants for s in lengths if s in rows[v]],
      'targets': targets,
      'target_a_sequential_ratio': sequential,
      'target_a_paired': paired,
      'same_ratios_vs_full_blockwise': not_targets,
  })

  print(f"\nload average: start {result['load_average_start'][0]:.2f}, "
        f"end {result['load_average_end'][0]:.2f}\n")
  print('| seq | ' + ' | '.join(f'{v}: ms (per 1k tokens)' for v in variants) + ' | '
        + ' | '.join(f'{v}: peak MiB (temp)' for v in variants) + ' |')
  print('|---' * (1 + 2 * len(variants)) + '|')
  for s in lengths:
    times, mems = [], []
    for v in variants:
      row = rows[v].get(s, {})
      if 'median_s' in row:
        times.append(f"{row['median_s'] * 1e3:.0f} ({row['ms_per_1k_tokens']:.1f})")
      else:
        times.append(row.get('skipped', ''))
      mems.append(f"{row['peak_mib']:.0f} ({row['temp_mib']:.0f})" if 'peak_mib' in row
                  else '')
    print(f'| {s} | ' + ' | '.join(times) + ' | ' + ' | '.join(mems) + ' |')
  print('\nTargets:')
  for name, t in targets.items():
    value = 'n/a' if t['value'] is None else f"{t['value']:.2f}"
    status = {True: 'MET', False: 'NOT MET', None: 'not measured'}[t['met']]
    print(f"  {name}: {value} (threshold {t['threshold']}) -> {status}")
  if paired:
    print(f"  (a) from {_PAIRED_ROUNDS.value} paired rounds (2k and 32k interleaved): per-round "
          f"ratios {', '.join(f'{r:.2f}' for r in paired['round_ratios'])}; from the table "
          f"(lengths one after the other): {'n/a' if sequential is None else f'{sequential:.2f}'}")
  print('Same ratios against full_blockwise (not targets):')
  for name, value in not_targets.items():
    print(f"  {name}: {'n/a' if value is None else f'{value:.2f}'}")

  benchlib.write_json(_JSON.value, result)


if __name__ == '__main__':
  app.run(main)
