"""Whole-model training speed and peak memory: Xenith vs Hugging Face Mixtral, one run.

  .venv/bin/python bench/hf_compare.py      # --rounds=2 --steps=3 --hf_experts=grouped_mm

Both models get the same Mixtral-shaped config (hidden 512, 8 layers, every layer MoE
with 8 experts top-2, 8 query / 2 KV heads of 64, expert intermediate 1024, vocab 32000,
untied head, RMSNorm eps 1e-5, rope theta 1e6), the same synthetic batches (8 x 512
random tokens from one numpy seed, one document per row), fp32, AdamW (lr 3e-4, betas
0.9 / 0.95, eps 1e-8, weight decay 0.1, global-norm clipping 1.0) and the Switch
load-balance aux loss at weight 0.02 (HF's `router_aux_loss_coef`; Xenith's
`load_balance_loss_weight`, router z-loss and entropy weights 0).

- Xenith: the real train step, built as `xenith/train/loop.py` builds it (mesh,
  `abstract_train_state` / `init_train_state` into the shardings, `jax.jit(make_train_step)`
  with the loop's shardings and state donation); dispatch 'auto', remat 'none'.
- Hugging Face: `MixtralForCausalLM` (PyTorch, CPU) with `experts_implementation` and
  `attn_implementation` pinned by flags, `labels` and `output_router_logits=True` (so
  its loss includes the aux loss), `loss.backward()`, `clip_grad_norm_`, `AdamW.step()`;
  torch threads = usable cores.

Each framework runs in its own child process (`--child=xenith|hf`), so its peak resident
memory (`getrusage` ru_maxrss = VmHWM) is its own; the parent alternates them,
X, HF, X, HF..., for `--rounds` rounds, so that the shared machine's slow spells land
on both. In each child the first step (and Xenith's compilation) and `--warmup` more
steps are untimed; then `--steps` steps are timed one by one. tokens/s = batch x seq /
median step time over all of a framework's timed steps. Results: a Markdown table on
stdout and JSON in bench/results/hf_compare.json. Run with XLA_FLAGS unset.
"""

import argparse
import ast
import datetime
import os
import statistics
import sys
import time

import numpy as np

import benchlib

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = dict(hidden=512, layers=8, experts=8, top_k=2, heads=8, kv_heads=2, head_dim=64,
             intermediate=1024, vocab=32000, seq=512, batch=8)
OPT = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0)
AUX_WEIGHT = 0.02
NORM_EPS = 1e-5
ROPE_THETA = 1e6
SEED = 0


def batches(n: int) -> list[np.ndarray]:
  """`n` batches of random tokens [batch, seq], the same in both children."""
  rng = np.random.default_rng(SEED)
  return [rng.integers(0, SHAPE['vocab'], (SHAPE['batch'], SHAPE['seq']), dtype=np.int64)
          for _ in range(n)]


def peak_memory() -> dict:
  """This process's peak resident memory, MiB (ru_maxrss and /proc VmHWM)."""
  out = {'ru_maxrss_mib': benchlib.peak_rss_mib()}
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          out['vmhwm_mib'] = int(line.split()[1]) / 1024
  except OSError:
    pass
  return out


def time_steps(step, data, warmup: int, steps: int) -> dict:
  """Runs 1 + warmup untimed steps, then `steps` timed ones; `step(batch)` -> loss."""
  start = time.perf_counter()
  loss = step(data[0])
  first_s = time.perf_counter() - start
  for i in range(warmup):
    step(data[(1 + i) % len(data)])
  times, losses = [], [loss]
  for i in range(steps):
    start = time.perf_counter()
    loss = step(data[(1 + warmup + i) % len(data)])
    times.append(time.perf_counter() - start)
    losses.append(loss)
  if not all(np.isfinite(losses)):
    raise RuntimeError(f'non-finite loss {losses}')
  return {'first_step_s': first_s, 'step_times_s': times, 'losses': losses}


# ----------------------------------------------------------------------------- Xenith


def xenith_config(overrides=()):
  """The library's default config (xenith/config_defaults.py) reshaped to SHAPE, OPT and
  the aux-loss weight, then `overrides` ('model.moe.block_size=128', ...) for what-if runs."""
  sys.path.insert(0, _REPO_ROOT)
  from xenith import config_defaults  # pylint: disable=g-import-not-at-top
  config = config_defaults.get_config()
  config.global_batch_size = SHAPE['batch']
  config.max_seq_len = SHAPE['seq']
  m = config.model
  m.vocab_size = SHAPE['vocab']
  m.embed_dim = SHAPE['hidden']
  m.num_layers = SHAPE['layers']
  m.num_heads = SHAPE['heads']
  m.num_kv_heads = SHAPE['kv_heads']
  m.head_dim = SHAPE['head_dim']
  m.mlp_dim = SHAPE['intermediate']
  m.moe.update(dict(num_experts=SHAPE['experts'], num_experts_per_token=SHAPE['top_k'],
                    expert_mlp_dim=SHAPE['intermediate'], first_dense_layers=0, moe_every=1,
                    normalize_top_k=True, dispatch='auto',
                    load_balance_loss_weight=AUX_WEIGHT, router_z_loss_weight=0.0,
                    router_entropy_loss_weight=0.0))
  m.norm = 'rmsnorm'
  m.norm_eps = NORM_EPS
  m.tie_embeddings = False
  m.rope_theta = ROPE_THETA
  m.rope_scaling.original_max_position = SHAPE['seq']
  m.dropout_rate = 0.0
  m.dtype = 'float32'
  m.remat = 'none'
  m.scan_layers = False
  config.optimizer.update(dict(learning_rate=OPT['lr'], b1=OPT['b1'], b2=OPT['b2'],
                               eps=OPT['eps'], weight_decay=OPT['weight_decay'],
                               grad_clip_norm=OPT['clip']))
  from xenith import sweeps  # pylint: disable=g-import-not-at-top
  for override in overrides:
    name, _, text = override.partition('=')
    try:
      value = ast.literal_eval(text)  # 128, 0.5, True, (64, 128), 'dense'
    except (SyntaxError, ValueError):
      value = text  # A bare word: a string field.
    sweeps.set_field(config, name, value)
  return config


def xenith_child(args) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  sys.path.insert(0, _REPO_ROOT)
  from xenith.train import optimizer
  from xenith import sharding
  from xenith.model import moe_dispatch
  from xenith.model.build import make_model
  from xenith.train.steps import make_train_step
  from xenith.train.train_state import abstract_train_state, init_train_state

  config = xenith_config(args.xenith_set)
  m = config.model
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  mesh = sharding.create_mesh(config.mesh)
  model = make_model(config.model)
  tx = optimizer.create_optimizer(config)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  seq = SHAPE['seq']
  host = [{'inputs': b.astype(np.int32),
           'segment_ids': np.ones_like(b, dtype=np.int32),
           'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), b.shape).copy()}
          for b in batches(args.num_batches)]

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, state_shardings = abstract_train_state(model, tx, seq, mesh, rules)
    train_step = jax.jit(make_train_step(model, tx, skip_nonfinite=False),
                         in_shardings=(state_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    init_key, dropout_key = jax.random.split(jax.random.key(SEED))
    state = init_train_state(model, tx, seq, init_key, state_shardings)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    holder = {'state': state}

    def step(batch):
      holder['state'], metrics = train_step(
          holder['state'], sharding.global_batch(batch, batch_sharding), dropout_key)
      jax.block_until_ready(holder['state'])
      return float(metrics.loss.compute())

    result = time_steps(step, host, args.warmup, args.steps)
  result.update(
      framework='xenith', params=int(num_params),
      dispatch=moe_dispatch.resolve('auto'),
      versions={'jax': jax.__version__,
                'flax': __import__('flax').__version__,
                'optax': __import__('optax').__version__},
      settings={'dispatch': 'auto', 'remat': 'none', 'scan_layers': False,
                'overrides': list(args.xenith_set),
                'block_size': int(m.moe.block_size), 'lr_schedule': 'warmup + cosine (config)'})
  return result


# ------------------------------------------------------------------------ Hugging Face


def hf_child(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers
  from transformers import MixtralConfig, MixtralForCausalLM

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  torch.manual_seed(SEED)
  config = MixtralConfig(
      vocab_size=SHAPE['vocab'], hidden_size=SHAPE['hidden'],
      intermediate_size=SHAPE['intermediate'], num_hidden_layers=SHAPE['layers'],
      num_attention_heads=SHAPE['heads'], num_key_value_heads=SHAPE['kv_heads'],
      head_dim=SHAPE['head_dim'], num_local_experts=SHAPE['experts'],
      num_experts_per_tok=SHAPE['top_k'], max_position_embeddings=SHAPE['seq'],
      rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=False,
      router_aux_loss_coef=AUX_WEIGHT, output_router_logits=True, use_cache=False,
      attention_dropout=0.0, router_jitter_noise=0.0)
  model = MixtralForCausalLM._from_config(  # pylint: disable=protected-access
      config, attn_implementation=args.hf_attn, experts_implementation=args.hf_experts,
      dtype=torch.float32)
  model.train()
  experts_impl = model.config._experts_implementation  # pylint: disable=protected-access
  attn_impl = model.config._attn_implementation  # pylint: disable=protected-access
  if experts_impl != args.hf_experts or attn_impl != args.hf_attn:
    raise RuntimeError(f'asked for experts={args.hf_experts}, attn={args.hf_attn}; '
                       f'got {experts_impl}, {attn_impl}')
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt_kwargs = dict(lr=OPT['lr'], betas=(OPT['b1'], OPT['b2']), eps=OPT['eps'])
  if args.hf_adamw == 'fused':
    opt_kwargs['fused'] = True
  elif args.hf_adamw == 'foreach':
    opt_kwargs['foreach'] = True
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': OPT['weight_decay']},
                           {'params': no_decay, 'weight_decay': 0.0}], **opt_kwargs)
  data = [torch.from_numpy(b) for b in batches(args.num_batches)]

  def step(batch):
    out = model(input_ids=batch, labels=batch, output_router_logits=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPT['clip'])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())

  result = time_steps(step, data, args.warmup, args.steps)
  result.update(
      framework='hf', params=int(sum(p.numel() for p in model.parameters())),
      versions={'torch': torch.__version__, 'transformers': transformers.__version__},
      settings={'experts_implementation': experts_impl, 'attn_implementation': attn_impl,
                'torch_threads': torch.get_num_threads(), 'adamw': args.hf_adamw,
                'lr_schedule': 'constant'})
  return result


# ------------------------------------------------------------------------------ parent


def run_child(framework: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--child={framework}',
         f'--steps={args.steps}', f'--warmup={args.warmup}',
         f'--num_batches={args.num_batches}', f'--hf_experts={args.hf_experts}',
         f'--hf_attn={args.hf_attn}', f'--hf_adamw={args.hf_adamw}']
  cmd += [f'--xenith_set={override}' for override in args.xenith_set]
  start = time.perf_counter()
  result = benchlib.run_child(cmd, f'the {framework} child')
  result['wall_s'] = time.perf_counter() - start
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=2,
                      help='Alternating rounds; each runs one Xenith and one HF child.')
  parser.add_argument('--steps', type=int, default=3, help='Timed steps per child.')
  parser.add_argument('--warmup', type=int, default=1,
                      help='Untimed steps per child after the first.')
  parser.add_argument('--num_batches', type=int, default=4, help='Distinct batches cycled.')
  parser.add_argument('--hf_experts', default='grouped_mm',
                      help="HF experts_implementation: 'eager', 'grouped_mm', 'batched_mm'.")
  parser.add_argument('--hf_attn', default='sdpa', help="HF attn_implementation.")
  parser.add_argument('--hf_adamw', default='fused', choices=['fused', 'foreach', 'default'],
                      help='torch AdamW implementation.')
  parser.add_argument('--xenith_set', action='append', default=[],
                      help='KEY=VALUE override of the Xenith config (repeatable; VALUE a '
                      'Python literal or a bare word), e.g. model.moe.block_size=128, '
                      'for what-if runs.')
  parser.add_argument('--json', default=os.path.join(_REPO_ROOT, 'bench', 'results',
                                                     'hf_compare.json'))
  parser.add_argument('--child', choices=['xenith', 'hf'], help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    result = (xenith_child if args.child == 'xenith' else hf_child)(args)
    result['peak_memory'] = peak_memory()
    benchlib.report(result)
    return

  tokens = SHAPE['batch'] * SHAPE['seq']
  out = {'command': ' '.join(['python'] + sys.argv),
         'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'machine': benchlib.machine_info(), 'load_average_start': os.getloadavg(),
         'shape': SHAPE, 'optimizer': OPT, 'aux_loss_weight': AUX_WEIGHT,
         'tokens_per_step': tokens, 'runs': []}
  print(f"{out['machine']['cpu']}, {out['machine']['usable_cores']} cores; "
        f"load {out['load_average_start']}", flush=True)
  for r in range(args.rounds):
    for framework in ('xenith', 'hf'):
      res = run_child(framework, args)
      res['round'] = r
      res['load_average_after'] = os.getloadavg()
      out['runs'].append(res)
      print(f"round {r + 1}/{args.rounds} {framework}: first step {res['first_step_s']:.1f}s, "
            f"steps " + ', '.join(f'{t:.2f}' for t in res['step_times_s'])
            + f" s, peak RSS {res['peak_memory']['ru_maxrss_mib']:.0f} MiB, "
            f"loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}", flush=True)

  summary = {}
  for framework in ('xenith', 'hf'):
    runs = [r for r in out['runs'] if r['framework'] == framework]
    times = [t for r in runs for t in r['step_times_s']]
    median = statistics.median(times)
    summary[framework] = {
        'timed_steps': len(times), 'step_time_median_s': median,
        'step_time_best_s': min(times), 'tokens_per_s_median': tokens / median,
        'tokens_per_s_best': tokens / min(times),
        'first_step_s': [r['first_step_s'] for r in runs],
        'peak_rss_mib': max(r['peak_memory']['ru_maxrss_mib'] for r in runs),
        'params': runs[0]['params'], 'settings': runs[0]['settings'],
        'versions': runs[0]['versions']}
    if framework == 'xenith':
      summary[framework]['dispatch_resolved'] = runs[0]['dispatch']
  x, h = summary['xenith'], summary['hf']
  ratios = {'tokens_per_s': x['tokens_per_s_median'] / h['tokens_per_s_median'],
            'peak_rss': x['peak_rss_mib'] / h['peak_rss_mib']}
  # Per round: the two children of one round ran back to back.
  per_round = []
  for r in range(args.rounds):
    xr, hr = [o for o in out['runs'] if o['round'] == r]
    per_round.append(statistics.median(hr['step_times_s'])
                     / statistics.median(xr['step_times_s']))
  ratios['tokens_per_s_per_round'] = per_round
  targets = {'tokens_per_s_ratio_min': 1.2, 'peak_rss_ratio_max': 1.0,
             'speed_met': ratios['tokens_per_s'] >= 1.2,
             'memory_met': ratios['peak_rss'] <= 1.0}
  out.update(load_average_end=os.getloadavg(), summary=summary, ratios=ratios,
             targets=targets)

  print(f"\n| | Xenith (dispatch {x['dispatch_resolved']}) | Hugging Face "
        f"({h['settings']['experts_implementation']}, {h['settings']['attn_implementation']}) "
        f"| Xenith / HF |\n|---|---|---|---|")
  print(f"| params | {x['params'] / 1e6:.1f}M | {h['params'] / 1e6:.1f}M | |")
  print(f"| step s, median (best) | {x['step_time_median_s']:.2f} ({x['step_time_best_s']:.2f}) "
        f"| {h['step_time_median_s']:.2f} ({h['step_time_best_s']:.2f}) | |")
  print(f"| tokens/s, median | {x['tokens_per_s_median']:,.0f} | {h['tokens_per_s_median']:,.0f} "
        f"| {ratios['tokens_per_s']:.2f}x (target >= 1.2x: "
        f"{'met' if targets['speed_met'] else 'NOT met'}) |")
  print(f"| peak RSS MiB | {x['peak_rss_mib']:,.0f} | {h['peak_rss_mib']:,.0f} "
        f"| {ratios['peak_rss']:.2f} (target <= 1: "
        f"{'met' if targets['memory_met'] else 'NOT met'}) |")
  print('speed ratio per round: ' + ', '.join(f'{v:.2f}' for v in per_round))
  benchlib.write_json(args.json, out)


if __name__ == '__main__':
  main()
