"""Compile time of a deep seed twin's train step, with and without `scan_layers`.

A narrow twin of a seed model (every feature on: MoE after a dense prefix, windows over
uneven KV-head groups, global tokens, chunk-summary memory in every 8th layer; its
layers differ, so `scan_layers` scans repeating units: xenith/model/layer_stacks.py) at
the seed's full depth. Each configuration is lowered and compiled in a fresh child
process (no compile cache), the real train step (`steps.make_train_step`, AdamW).

  .venv/bin/python bench/scan_compile.py                       # xenith_mini twin, 64 layers
  .venv/bin/python bench/scan_compile.py --config=beast --layers=16,80
"""

import argparse
import os
import sys
import time

import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config_name: str, layers: int, scan: bool) -> None:
  """Lowers and compiles the train step; reports the seconds each took."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from experiments import xenith_beast, xenith_mini  # pylint: disable=g-import-not-at-top
  from xenith.model import build, layer_stacks  # pylint: disable=g-import-not-at-top
  from xenith.train import steps  # pylint: disable=g-import-not-at-top
  from xenith.train.train_state import TrainState  # pylint: disable=g-import-not-at-top

  module = {'mini': xenith_mini, 'beast': xenith_beast}[config_name]
  config = module.get_config('size=tiny')
  m = config.model
  # The seed's depth: the dense prefix, memory layers and full-attention layers follow.
  seed = module.SIZES['full']
  ratio = layers / seed['num_layers']
  m.num_layers = layers
  m.moe.first_dense_layers = m.attention.full_attention_layers = max(
      1, round(seed.get('num_dense', seed['num_layers'] // 8) * ratio))
  every = seed['memory_every']
  m.memory.layers = tuple(range(every - 1, layers, every))
  m.scan_layers = scan
  model = build.make_model(m)
  stacks = len(layer_stacks.plan(ml_collections.FrozenConfigDict(m))) if scan else 0
  tx = optax.adamw(1e-3)
  tokens = jnp.zeros((config.global_batch_size, config.max_seq_len), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  state = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                              opt_state=tx.init(p)), params)
  batch = {'inputs': tokens, 'segment_ids': jnp.ones_like(tokens), 'positions': tokens}
  step = jax.jit(steps.make_train_step(model, tx, skip_nonfinite=False))
  start = time.perf_counter()
  lowered = step.lower(state, batch, jax.random.key(0))
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  benchlib.report({'lower_s': lowered_at - start, 'compile_s': done - lowered_at,
                   'total_s': done - start, 'stacks': stacks,
                   'peak_rss_mib': benchlib.peak_rss_mib()})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='mini', choices=['mini', 'beast'])
  parser.add_argument('--layers', default='16,64', help='Depths to compile, comma-separated.')
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results',
                                                    'scan_compile.json'))
  parser.add_argument('--child', nargs=3, metavar=('CONFIG', 'LAYERS', 'SCAN'))
  args = parser.parse_args()
  if args.child:
    child(args.child[0], int(args.child[1]), args.child[2] == '1')
    return
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  rows = []
  for layers in [int(n) for n in args.layers.split(',')]:
    for scan in (True, False):
      result = benchlib.run_child(
          [sys.executable, os.path.abspath(__file__), '--child', args.config, str(layers),
           '1' if scan else '0'], f'{args.config} {layers} layers scan={scan}', env)
      rows.append({'layers': layers, 'scan_layers': scan, **result})
      print(f'{args.config} twin, {layers:3d} layers, scan_layers={str(scan):5}: '
            f'lower {result["lower_s"]:6.1f} s, compile {result["compile_s"]:6.1f} s, '
            f'total {result["total_s"]:6.1f} s ({result["stacks"]} stacks), '
            f'peak RSS {result["peak_rss_mib"]:,.0f} MiB', flush=True)
  benchlib.write_json(args.out, {'machine': benchlib.machine_info(), 'config': args.config,
                                 'rows': rows})


if __name__ == '__main__':
  main()
