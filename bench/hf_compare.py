"""Whole-model training speed and peak memory: Xenith vs Hugging Face, one run.

  .venv/bin/python bench/hf_compare.py                 # MoE: vs MixtralForCausalLM
  .venv/bin/python bench/hf_compare.py --model=dense   # experiments/default.py vs Mistral
  .venv/bin/python bench/hf_compare.py --model=dense --check   # same weights, same losses?

The model (`--model`):
- moe (issue 3): a Mixtral shape built here (`xenith_config`: hidden 512, 8 layers, every
  layer MoE with 8 experts top-2, 8 query / 2 KV heads of 64, expert intermediate 1024,
  vocab 32000, untied head, RMSNorm eps 1e-5, rope theta 1e6, batch 8 x 512 tokens,
  AdamW lr 3e-4 and the Switch load-balance loss at weight 0.02; router z-loss and
  entropy weights 0).
- dense (issue 14): the model, batch, sequence and optimizer of an experiment config,
  `--config=experiments/default.py` (its `small` size) unless given; `path:arg` picks a
  size as main.py's `--config` does, e.g. `experiments/default.py:size=tiny`.
Overrides `--config.<field>=<value>` (or `--xenith_set=<field>=<value>`) change the Xenith
config. The Hugging Face model is that config's export (`xenith/hf/configs.py`:
`MixtralForCausalLM`, or `MistralForCausalLM`, which computes what `LlamaForCausalLM`
does when there is no sliding window), so shape fields change both models and
Xenith-only fields (model.attention.implementation, model.moe.block_size, ...) only
Xenith's.

Both frameworks get the same synthetic batches (random tokens from one numpy seed, one
document per row), fp32, and AdamW as the config says (its lr schedule, betas, eps,
decoupled weight decay on matrices, global-norm clipping).
- Xenith: the real train step, built as `xenith/train/loop.py` builds it (mesh,
  `abstract_train_state` / `init_train_state` into the shardings, `jax.jit(make_train_step)`
  with the loop's shardings and state donation), in a process set up as main.py sets
  up its own (`xenith/host_memory.py`: restarted with glibc's huge-page tunable where
  that helps, malloc trimmed after compiles); the HF child runs as a PyTorch user's
  process does, and the JSON records each child's GLIBC_TUNABLES.
- Hugging Face: PyTorch on the CPU, `attn_implementation` (and for Mixtral
  `experts_implementation`) pinned by flags, loss from `labels` (Mixtral:
  `output_router_logits=True`, so it includes the aux loss), `loss.backward()`,
  `clip_grad_norm_`, `AdamW.step()` with the config's schedule (`LambdaLR`); torch
  threads = usable cores.

Each framework runs in its own child process (`--child=xenith|hf`), so its peak resident
memory (`getrusage` ru_maxrss = VmHWM) is its own; the parent alternates them,
X, HF, X, HF..., for `--rounds` rounds, so that the shared machine's slow spells land
on both. In each child the first step (and Xenith's compilation) and `--warmup` more
steps are untimed; then `--steps` steps are timed one by one. tokens/s = batch x seq /
median step time over all of a framework's timed steps. Results: a Markdown table on
stdout and JSON in bench/results/hf_compare.json (dense: hf_compare_dense.json). Run
with XLA_FLAGS unset.

`--check` times nothing: one Xenith child exports its initial params as a HF checkpoint
(`xenith/hf/convert.py`), one HF child loads it with `from_pretrained`, both run
1 + `--warmup` + `--steps` steps on the same batches, and the parent compares the
language-model losses and the gradient norms (HF's in Xenith's parametrisation, see
`hf_child`) step by step; it fails unless the params counts are equal and the first
step's loss (absolute) and gradient norm (relative) agree within `--check_tol`.
"""

import argparse
import ast
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import benchlib

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)

SHAPE = dict(hidden=512, layers=8, experts=8, top_k=2, heads=8, kv_heads=2, head_dim=64,
             intermediate=1024, vocab=32000, seq=512, batch=8)
OPT = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0)
AUX_WEIGHT = 0.02
NORM_EPS = 1e-5
ROPE_THETA = 1e6
SEED = 0
DEFAULT_CONFIG = 'experiments/default.py'
# Issue 14's speed targets (Xenith / HF tokens/s); peak memory no more than HF's.
SPEED_FLOOR, SPEED_GOAL = 1.0, 1.2


def batches(n: int, batch: int, seq: int, vocab: int) -> list[np.ndarray]:
  """`n` batches of random tokens [batch, seq], the same in both children."""
  rng = np.random.default_rng(SEED)
  return [rng.integers(0, vocab, (batch, seq), dtype=np.int64) for _ in range(n)]


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
  """Runs 1 + warmup untimed steps, then `steps` timed ones.

  `step(batch)` -> (language-model loss, gradient norm); both are kept for every step.
  """
  losses, grad_norms, times = [], [], []
  for i in range(1 + warmup + steps):
    start = time.perf_counter()
    loss, grad_norm = step(data[i % len(data)])
    elapsed = time.perf_counter() - start
    if i == 0:
      first_s = elapsed
    elif i > warmup:
      times.append(elapsed)
    losses.append(loss)
    grad_norms.append(grad_norm)
  if not all(np.isfinite(losses)):
    raise RuntimeError(f'non-finite loss {losses}')
  return {'first_step_s': first_s, 'step_times_s': times, 'losses': losses,
          'grad_norms': grad_norms}


# ----------------------------------------------------------------------------- configs


def apply_overrides(config, overrides):
  """Sets each 'field.path=value' (a Python literal or a bare word) as main.py would."""
  from xenith import sweeps  # pylint: disable=g-import-not-at-top
  for override in overrides:
    name, _, text = override.partition('=')
    try:
      value = ast.literal_eval(text)  # 128, 0.5, True, (64, 128), 'dense'
    except (SyntaxError, ValueError):
      value = text  # A bare word: a string field.
    sweeps.set_field(config, name, value)
  return config


def xenith_config(overrides=()):
  """The library's default config (xenith/config_defaults.py) reshaped to SHAPE, OPT and
  the aux-loss weight, then `overrides` ('model.moe.block_size=128', ...)."""
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
  return apply_overrides(config, overrides)


def experiment_config(spec: str, overrides=()):
  """`get_config(arg)` of the experiment file `path[:arg]`, then `overrides`."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(
      'hf_compare_experiment', os.path.join(_REPO_ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(arg or None), overrides)


def config_for(args):
  """The Xenith config that `args` (--model, --config, overrides) describe."""
  if args.model == 'moe':
    return xenith_config(args.xenith_set)
  config = experiment_config(args.config, args.xenith_set)
  m = config.model
  refusals = [why for bad, why in (
      (m.moe.num_experts, 'a MoE model (model.moe.num_experts > 0): use --model=moe'),
      (m.dtype != 'float32', f'model.dtype={m.dtype!r} (both frameworks run float32)'),
      (m.dropout_rate, 'dropout (model.dropout_rate > 0), which Mistral lacks')) if bad]
  if refusals:
    raise SystemExit(f'{args.config}: not comparable with Mistral: ' + '; '.join(refusals))
  return config


def hf_spec(config) -> dict:
  """What the HF child builds and trains: config.json, batch shape and optimizer."""
  from xenith.hf import configs  # pylint: disable=g-import-not-at-top  (imports flax)
  hf_config = configs.hf_config_from_model(config.model)
  hf_config['max_position_embeddings'] = max(hf_config['max_position_embeddings'],
                                             config.max_seq_len)
  opt = config.optimizer
  return {'hf_config': hf_config, 'batch': config.global_batch_size,
          'seq': config.max_seq_len,
          'optimizer': {'lr': opt.learning_rate, 'b1': opt.b1, 'b2': opt.b2, 'eps': opt.eps,
                        'weight_decay': opt.weight_decay, 'clip': opt.grad_clip_norm,
                        'warmup_steps': opt.warmup_steps,
                        'decay_steps': config.num_train_steps,
                        'end_lr_fraction': opt.end_lr_fraction}}


def learning_rate(step: int, opt: dict) -> float:
  """xenith/train/optimizer.py's schedule (optax.warmup_cosine_decay_schedule) at `step`."""
  peak, warmup = opt['lr'], opt['warmup_steps']
  if step < warmup:
    return peak * step / warmup
  end = peak * opt['end_lr_fraction']
  decay_steps = opt['decay_steps'] - warmup
  progress = min(step - warmup, decay_steps) / decay_steps
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- Xenith


def xenith_child(args) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  from xenith import config_validation
  from xenith import host_memory
  from xenith import sharding
  from xenith.hf import convert
  from xenith.model import attention
  from xenith.model import moe_dispatch
  from xenith.model.build import make_model
  from xenith.train import optimizer
  from xenith.train.steps import make_train_step
  from xenith.train.train_state import abstract_train_state, init_train_state
  host_memory.trim_after_compiles()  # As main.py does.

  config = config_for(args)
  config_validation.validate(config, jax.device_count(), jax.process_count())
  m = config.model
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  mesh = sharding.create_mesh(config.mesh)
  model = make_model(config.model)
  tx = optimizer.create_optimizer(config)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  seq = config.max_seq_len
  host = [{'inputs': b.astype(np.int32),
           'segment_ids': np.ones_like(b, dtype=np.int32),
           'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), b.shape).copy()}
          for b in batches(args.num_batches, config.global_batch_size, seq, m.vocab_size)]

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, state_shardings = abstract_train_state(model, tx, seq, mesh, rules)
    train_step = jax.jit(make_train_step(model, tx, skip_nonfinite=False),
                         in_shardings=(state_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    init_key, dropout_key = jax.random.split(jax.random.key(SEED))
    state = init_train_state(model, tx, seq, init_key, state_shardings)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    if args.check_weights:  # Before the first step donates the state.
      convert.save_hf(args.check_weights, config.model, jax.device_get(state.params))
    holder = {'state': state}

    def step(batch):
      holder['state'], metrics = train_step(
          holder['state'], sharding.global_batch(batch, batch_sharding), dropout_key)
      jax.block_until_ready(holder['state'])
      return float(metrics.loss.compute()), float(metrics.grad_norm.compute())

    result = time_steps(step, host, args.warmup, args.steps)
  settings = {'remat': m.remat, 'scan_layers': m.scan_layers,
              'attention': m.attention.implementation,
              'attention_resolved': attention.resolve_implementation(
                  m.attention.implementation, m.attention.num_global_tokens, seq),
              'loss_chunk_size': m.loss_chunk_size, 'overrides': list(args.xenith_set),
              'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
              'lr_schedule': 'warmup + cosine (config)'}
  if m.moe.num_experts:
    settings.update(dispatch=m.moe.dispatch, block_size=int(m.moe.block_size))
  result.update(
      framework='xenith', params=int(num_params), settings=settings,
      dispatch=moe_dispatch.resolve(m.moe.dispatch) if m.moe.num_experts else None,
      versions={'jax': jax.__version__,
                'flax': __import__('flax').__version__,
                'optax': __import__('optax').__version__})
  return result


# ------------------------------------------------------------------------ Hugging Face


def hf_child(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers

  spec = json.loads(args.spec)
  hf_config = dict(spec['hf_config'])
  arch = hf_config.pop('architectures')[0]
  moe = arch == 'MixtralForCausalLM'
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  torch.manual_seed(SEED)
  extra = dict(output_router_logits=True, router_jitter_noise=0.0) if moe else {}
  config = transformers.AutoConfig.for_model(hf_config.pop('model_type'), use_cache=False,
                                             **hf_config, **extra)
  implementations = {'attn_implementation': args.hf_attn}
  if moe:
    implementations['experts_implementation'] = args.hf_experts
  if args.check_weights:  # Xenith's export, read as transformers reads any checkpoint.
    model = getattr(transformers, arch).from_pretrained(
        args.check_weights, config=config, dtype=torch.float32, **implementations)
  else:
    model = getattr(transformers, arch)._from_config(  # pylint: disable=protected-access
        config, dtype=torch.float32, **implementations)
  for name, asked in implementations.items():
    got = getattr(model.config, '_' + name)
    if got != asked:
      raise RuntimeError(f'asked for {name}={asked}; got {got}')
  model.train()

  opt = spec['optimizer']
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt_kwargs = dict(lr=opt['lr'], betas=(opt['b1'], opt['b2']), eps=opt['eps'])
  if args.hf_adamw == 'fused':
    opt_kwargs['fused'] = True
  elif args.hf_adamw == 'foreach':
    opt_kwargs['foreach'] = True
  adamw = torch.optim.AdamW([{'params': decay, 'weight_decay': opt['weight_decay']},
                             {'params': no_decay, 'weight_decay': 0.0}], **opt_kwargs)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      adamw, lambda i: learning_rate(i, opt) / opt['lr'])
  max_norm = opt['clip'] if opt['clip'] > 0 else math.inf  # inf: the norm, no clipping.
  data = [torch.from_numpy(b) for b in batches(
      args.num_batches, spec['batch'], spec['seq'], config.vocab_size)]

  # Tied: HF's final-norm scale is Xenith's / sqrt(H) (xenith/hf/weights.py), so its
  # gradient is sqrt(H) x Xenith's; the norm is reported as Xenith's parametrisation has it.
  folded = model.model.norm.weight if config.tie_word_embeddings else None

  def step(batch):
    out = model(input_ids=batch, labels=batch, **extra)
    out.loss.backward()
    folded_sq = float(folded.grad.square().sum()) if folded is not None else 0.0
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    grad_norm = math.sqrt(max(grad_norm**2 - folded_sq * (1 - 1 / config.hidden_size), 0.0))
    adamw.step()
    schedule.step()
    adamw.zero_grad(set_to_none=True)
    loss = out.loss.detach()
    if moe:  # The language-model loss alone, as Xenith reports it.
      loss = loss - config.router_aux_loss_coef * out.aux_loss.detach()
    return float(loss), grad_norm

  result = time_steps(step, data, args.warmup, args.steps)
  settings = {'architecture': arch, 'attn_implementation': args.hf_attn,
              'torch_threads': torch.get_num_threads(), 'adamw': args.hf_adamw,
              'lr_schedule': 'warmup + cosine (config, LambdaLR)',
              'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}
  if moe:
    settings['experts_implementation'] = args.hf_experts
  result.update(
      framework='hf', params=int(sum(p.numel() for p in model.parameters())),
      settings=settings,
      versions={'torch': torch.__version__, 'transformers': transformers.__version__})
  return result


# ------------------------------------------------------------------------------ parent


def run_child(framework: str, args, spec: dict, check_weights: str = '') -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--child={framework}',
         f'--model={args.model}', f'--steps={args.steps}',
         f'--warmup={args.warmup}', f'--num_batches={args.num_batches}',
         f'--hf_experts={args.hf_experts}', f'--hf_attn={args.hf_attn}',
         f'--hf_adamw={args.hf_adamw}', f'--spec={json.dumps(spec)}',
         f'--check_weights={check_weights}']
  cmd += [f'--config={args.config}'] if args.config else []
  cmd += [f'--xenith_set={override}' for override in args.xenith_set]
  start = time.perf_counter()
  result = benchlib.run_child(cmd, f'the {framework} child')
  result['wall_s'] = time.perf_counter() - start
  return result


def describe(config, spec: dict) -> dict:
  """The shape both models share, for the JSON and the table."""
  m, hf = config.model, spec['hf_config']
  return {'architecture': hf['architectures'][0], 'hidden': m.embed_dim,
          'layers': m.num_layers, 'heads': m.num_heads, 'kv_heads': m.num_kv_heads,
          'head_dim': m.head_dim, 'intermediate': m.mlp_dim, 'vocab': m.vocab_size,
          'experts': m.moe.num_experts,
          'top_k': m.moe.num_experts_per_token if m.moe.num_experts else 0,
          'tie_embeddings': m.tie_embeddings, 'norm_eps': m.norm_eps,
          'rope_theta': m.rope_theta, 'sliding_window': hf.get('sliding_window'),
          'seq': config.max_seq_len, 'batch': config.global_batch_size}


def check(args, spec: dict) -> None:
  """Same initial weights in both frameworks: the losses must agree (see the docstring)."""
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, 'xenith_init')
    x = run_child('xenith', args, spec, check_weights=weights)
    h = run_child('hf', args, spec, check_weights=weights)
  vocab = spec['hf_config']['vocab_size']
  print(f"params: Xenith {x['params']:,}, HF {h['params']:,} "
        f"({'equal' if x['params'] == h['params'] else 'NOT EQUAL'}); "
        f'ln(vocab) = {math.log(vocab):.4f}\n')
  print('| step | Xenith loss | HF loss | difference | Xenith grad norm | HF grad norm '
        '| relative difference |\n|---|---|---|---|---|---|---|')
  for i, (xl, hl, xg, hg) in enumerate(zip(x['losses'], h['losses'], x['grad_norms'],
                                           h['grad_norms'])):
    print(f'| {i} | {xl:.6f} | {hl:.6f} | {abs(xl - hl):.1e} | {xg:.6f} | {hg:.6f} '
          f'| {abs(xg - hg) / max(hg, 1e-30):.1e} |')
  loss_diff = abs(x['losses'][0] - h['losses'][0])
  norm_diff = abs(x['grad_norms'][0] - h['grad_norms'][0]) / max(h['grad_norms'][0], 1e-30)
  ok = max(loss_diff, norm_diff) <= args.check_tol and x['params'] == h['params']
  print(f"\nfirst step: loss difference {loss_diff:.1e}, grad norm relative difference "
        f"{norm_diff:.1e} (tolerance {args.check_tol:g}); params "
        f"{'equal' if x['params'] == h['params'] else 'differ'}: {'PASS' if ok else 'FAIL'}")
  if spec['hf_config']['tie_word_embeddings']:
    print('Tied embeddings: HF\'s final-norm scale is Xenith\'s / sqrt(hidden), so AdamW '
          'moves it at another relative rate and the losses after the first update drift '
          'apart by design (untied, they stay equal).')
  if not ok:
    sys.exit(1)


def measure(args, config, spec: dict) -> None:
  """Interleaved rounds of timed children; the table and the JSON."""
  tokens = config.global_batch_size * config.max_seq_len
  out = {'command': ' '.join(['python'] + sys.argv),
         'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'machine': benchlib.machine_info(), 'load_average_start': os.getloadavg(),
         'model': args.model, 'config': args.config if args.model == 'dense' else None,
         'overrides': list(args.xenith_set), 'shape': describe(config, spec),
         'hf_config': spec['hf_config'], 'optimizer': spec['optimizer'],
         'aux_loss_weight': (config.model.moe.load_balance_loss_weight
                             if config.model.moe.num_experts else None),
         'tokens_per_step': tokens, 'runs': []}
  print(f"{out['machine']['cpu']}, {out['machine']['usable_cores']} cores; "
        f"load {out['load_average_start']}", flush=True)
  for r in range(args.rounds):
    for framework in ('xenith', 'hf'):
      res = run_child(framework, args, spec)
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
        'first_loss': runs[0]['losses'][0],
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
  targets = {'tokens_per_s_ratio_min': SPEED_FLOOR, 'tokens_per_s_ratio_goal': SPEED_GOAL,
             'peak_rss_ratio_max': 1.0, 'speed_met': ratios['tokens_per_s'] >= SPEED_FLOOR,
             'speed_goal_met': ratios['tokens_per_s'] >= SPEED_GOAL,
             'memory_met': ratios['peak_rss'] <= 1.0}
  out.update(load_average_end=os.getloadavg(), summary=summary, ratios=ratios,
             targets=targets, params_equal=x['params'] == h['params'])
  print_table(out)
  benchlib.write_json(args.json, out)


def print_table(out: dict) -> None:
  """The shape line, the Markdown table and the per-round ratios of `measure`'s `out`."""
  x, h = out['summary']['xenith'], out['summary']['hf']
  ratios, targets, hs = out['ratios'], out['targets'], h['settings']
  xenith_name = (f"Xenith (dispatch {x['dispatch_resolved']})" if x['dispatch_resolved']
                 else f"Xenith (attention {x['settings']['attention']} = "
                 f"{x['settings']['attention_resolved']})")
  hf_impl = ', '.join(filter(None, [hs.get('experts_implementation'),
                                    hs['attn_implementation']]))
  shape = out['shape']
  print(f"\n{shape['architecture']} shape: hidden {shape['hidden']}, {shape['layers']} layers, "
        f"{shape['heads']}/{shape['kv_heads']} heads of {shape['head_dim']}, "
        f"intermediate {shape['intermediate']}, vocab {shape['vocab']}"
        + (f", {shape['experts']} experts top-{shape['top_k']}" if shape['experts'] else '')
        + f", {'tied' if shape['tie_embeddings'] else 'untied'} head; batch "
        f"{shape['batch']} x {shape['seq']}; torch threads {hs['torch_threads']}")
  print(f"\n| | {xenith_name} | Hugging Face {hs['architecture']} ({hf_impl}) "
        f"| Xenith / HF |\n|---|---|---|---|")
  print(f"| params | {x['params']:,} | {h['params']:,} "
        f"| {'equal' if out['params_equal'] else '**NOT EQUAL**'} |")
  print(f"| first-step loss, own init (ln vocab = {math.log(shape['vocab']):.3f}) "
        f"| {x['first_loss']:.3f} | {h['first_loss']:.3f} | |")
  print(f"| step s, median (best) | {x['step_time_median_s']:.3f} ({x['step_time_best_s']:.3f}) "
        f"| {h['step_time_median_s']:.3f} ({h['step_time_best_s']:.3f}) | |")
  print(f"| tokens/s, median | {x['tokens_per_s_median']:,.0f} | {h['tokens_per_s_median']:,.0f} "
        f"| {ratios['tokens_per_s']:.2f}x (target >= {SPEED_FLOOR}x: "
        f"{'met' if targets['speed_met'] else 'NOT met'}; goal {SPEED_GOAL}x) |")
  print(f"| peak RSS MiB | {x['peak_rss_mib']:,.0f} | {h['peak_rss_mib']:,.0f} "
        f"| {ratios['peak_rss']:.2f} (target <= 1: "
        f"{'met' if targets['memory_met'] else 'NOT met'}) |")
  print('speed ratio per round: '
        + ', '.join(f'{v:.2f}' for v in ratios['tokens_per_s_per_round']))


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The flags; `--config.<field>=<value>` arguments join `--xenith_set`."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=['moe', 'dense'], default='moe',
                      help="'moe': the Mixtral shape of issue 3; 'dense': --config's model.")
  parser.add_argument('--config', default=None,
                      help=f'dense: experiment file[:arg], default {DEFAULT_CONFIG}.')
  parser.add_argument('--rounds', type=int, default=2,
                      help='Alternating rounds; each runs one Xenith and one HF child.')
  parser.add_argument('--steps', type=int, default=3, help='Timed steps per child.')
  parser.add_argument('--warmup', type=int, default=1,
                      help='Untimed steps per child after the first.')
  parser.add_argument('--num_batches', type=int, default=4, help='Distinct batches cycled.')
  parser.add_argument('--hf_experts', default='grouped_mm',
                      help="HF experts_implementation: 'eager', 'grouped_mm', 'batched_mm'.")
  parser.add_argument('--hf_attn', default='sdpa', help='HF attn_implementation.')
  parser.add_argument('--hf_adamw', default='fused', choices=['fused', 'foreach', 'default'],
                      help='torch AdamW implementation.')
  parser.add_argument('--xenith_set', action='append', default=[],
                      help='KEY=VALUE override of the Xenith config (repeatable; VALUE a '
                      'Python literal or a bare word), e.g. model.moe.block_size=128; '
                      'also spelled --config.KEY=VALUE.')
  parser.add_argument('--check', action='store_true',
                      help='Same initial weights in both; compare losses, time nothing.')
  parser.add_argument('--check_tol', type=float, default=1e-4,
                      help='--check: largest first-step loss difference that passes.')
  parser.add_argument('--json', default=None, help='Default: bench/results/hf_compare.json '
                      '(--model=dense: hf_compare_dense.json).')
  parser.add_argument('--child', choices=['xenith', 'hf'], help=argparse.SUPPRESS)
  parser.add_argument('--spec', help=argparse.SUPPRESS)
  parser.add_argument('--check_weights', default='', help=argparse.SUPPRESS)
  overrides = [a[len('--config.'):] for a in argv if a.startswith('--config.')]
  args = parser.parse_args([a for a in argv if not a.startswith('--config.')])
  if any('=' not in o for o in overrides):
    parser.error('write config overrides as --config.FIELD=VALUE')
  args.xenith_set += overrides
  if args.model == 'moe' and args.config:
    parser.error('--config is for --model=dense; --model=moe builds its Mixtral shape')
  if args.model == 'dense' and not args.config:
    args.config = DEFAULT_CONFIG
  if args.json is None:
    name = 'hf_compare_dense.json' if args.model == 'dense' else 'hf_compare.json'
    args.json = os.path.join(_REPO_ROOT, 'bench', 'results', name)
  return args


def main():
  args = parse_args(sys.argv[1:])
  if args.child:
    result = (xenith_child if args.child == 'xenith' else hf_child)(args)
    result['peak_memory'] = peak_memory()
    benchlib.report(result)
    return
  config = config_for(args)
  spec = hf_spec(config)
  if args.check:
    check(args, spec)
  else:
    measure(args, config, spec)


if __name__ == '__main__':
  if '--child=xenith' in sys.argv:
    from xenith import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reexec_with_huge_pages()  # As main.py does (the HF child runs as PyTorch users do).
  main()
