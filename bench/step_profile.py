"""Where a train step's time goes: Xenith's step (jax.profiler) and Hugging Face Mistral's
(torch.profiler) at the same shape, grouped the same way, forward and backward apart.

  .venv/bin/python bench/step_profile.py            # both, experiments/default.py small
  .venv/bin/python bench/step_profile.py --framework=xenith --size=small --steps=3

Groups: embedding, norms, qkv proj, rope, attention kernel, attn out proj, mlp dots, mlp
elementwise, head + loss, optimizer/other; each split into fwd / bwd.

- Xenith: the real train step (as `bench/train_throughput.py` builds it) traced with
  `jax.profiler`; the trace's XLA:CPU thunk events (one per fusion) are summed per fusion
  and grouped by the `op_name` metadata XLA keeps from the JAX trace (`jvp(...)` =
  forward, `transpose(jvp(...))` = backward, module path = group). XLA:CPU runs
  independent thunks concurrently, one per core, so these are *thread* times: they add
  up to more than the step's wall time.
- Hugging Face: `torch.profiler` of the same step (forward, cross-entropy, backward,
  clipping, AdamW) with each module's forward labelled by a `record_function`; backward
  ops are mapped to their forward op's label through the autograd sequence number. Each
  op uses both cores (intra-op threads), so these add up to the step's wall time.

Compare the shares (%) more than the absolute numbers. JSON: bench/results/step_profile.json.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import benchlib

# bench/ is not a package: make `xenith` and `experiments` importable from the repo root.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)
GROUPS = ('embedding', 'norms', 'qkv proj', 'rope', 'attention kernel', 'attn out proj',
          'mlp dots', 'mlp elementwise', 'head + loss', 'optimizer/other', 'other model')


def _xenith_group(op_name: str) -> tuple[str, str]:
  """(group, 'fwd' | 'bwd' | 'other') of an XLA fusion from its op_name metadata."""
  direction = ('bwd' if 'transpose(' in op_name else
               'fwd' if 'jvp(' in op_name else 'other')
  if '/mlp/' in op_name:
    return ('mlp dots' if 'dot_general' in op_name else 'mlp elementwise'), direction
  # In this order: the attention kernel runs in while loops as the chunked loss does.
  for key, group in (('_norm/', 'norms'), ('project_out', 'attn out proj'),
                     ('attn.project', 'qkv proj'), ('rotate', 'rope'),
                     ('attn', 'attention kernel'), ('while/body', 'head + loss'),
                     ('loss', 'head + loss'), ('logits', 'head + loss'),
                     ('embed', 'embedding')):
    if key in op_name:
      return group, direction
  return ('optimizer/other', 'other') if direction == 'other' else ('other model', direction)


def profile_xenith(size: str, steps: int) -> dict:
  """Per-group thread milliseconds per step of Xenith's train step, and its wall time."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(['step_profile'])  # train_throughput defines absl flags; take the defaults.
  import jax  # pylint: disable=g-import-not-at-top
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  import train_throughput  # pylint: disable=g-import-not-at-top
  from xenith import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.trim_after_compiles()  # As main.py does.

  bench = train_throughput.SizeBench(size)
  with bench._context():  # pylint: disable=protected-access
    hlo = bench.train_step.lower(bench.state, bench._batch(0),  # pylint: disable=protected-access
                                 bench.dropout_key).compile().as_text()
  op_names = {}
  for line in hlo.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*op_name="([^"]*)"', line)
    if match:
      op_names[match.group(1)] = match.group(2)
  bench.run(3)
  wall = bench.run(steps) / steps
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    bench.run(steps)
    jax.profiler.stop_trace()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0], 'rb') as f:
      space.ParseFromString(f.read())
  groups = collections.Counter()
  for plane in space.planes:
    names = {k: m.name for k, m in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        name = names.get(event.metadata_id, '')
        if name in op_names and not name.startswith('while'):  # A while's body counts.
          group = _xenith_group(op_names[name])
          groups[f'{group[0]}|{group[1]}'] += event.duration_ps / 1e9 / steps
  return {'wall_ms_per_step': wall * 1e3, 'groups_ms': dict(groups),
          'time_kind': 'thread ms per step (concurrent thunks overlap)'}


def profile_hf(size: str, steps: int) -> dict:
  """Per-group milliseconds per step of HF MistralForCausalLM's train step."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import profiler as torch_profiler  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from experiments import default  # pylint: disable=g-import-not-at-top

  config = default.get_config(f'size={size}')
  m = config.model
  torch.set_num_threads(os.cpu_count())
  hf = transformers.MistralForCausalLM(transformers.MistralConfig(
      hidden_size=m.embed_dim, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
      head_dim=m.head_dim, intermediate_size=m.mlp_dim, vocab_size=m.vocab_size,
      tie_word_embeddings=True, max_position_embeddings=config.max_seq_len,
      sliding_window=None, attn_implementation='sdpa'))
  opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1)
  tokens = torch.randint(0, m.vocab_size, (config.global_batch_size, config.max_seq_len))
  labels = {'q_proj': 'qkv proj', 'k_proj': 'qkv proj', 'v_proj': 'qkv proj',
            'o_proj': 'attn out proj', 'gate_proj': 'mlp dots', 'up_proj': 'mlp dots',
            'down_proj': 'mlp dots', 'act_fn': 'mlp elementwise',
            'input_layernorm': 'norms', 'post_attention_layernorm': 'norms',
            'norm': 'norms', 'embed_tokens': 'embedding', 'rotary_emb': 'rope',
            'lm_head': 'head + loss',
            # The enclosing modules: what runs in them outside the labelled leaves
            # (SwiGLU's product; repeat_kv, RoPE's application and the sdpa kernel).
            'mlp': 'mlp elementwise', 'self_attn': 'attention kernel'}

  def label_forward(module, label):
    def enter(mod, args):
      del args
      mod.xenith_label = torch_profiler.record_function('group:' + label)
      mod.xenith_label.__enter__()

    def leave(mod, args, out):
      del args, out
      mod.xenith_label.__exit__(None, None, None)
    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)

  for name, module in hf.named_modules():
    if name.split('.')[-1] in labels:
      label_forward(module, labels[name.split('.')[-1]])

  def step():
    opt.zero_grad(set_to_none=True)
    logits = hf(input_ids=tokens).logits
    with torch_profiler.record_function('group:head + loss'):
      loss = torch.nn.functional.cross_entropy(
          logits[:, :-1].reshape(-1, m.vocab_size), tokens[:, 1:].reshape(-1))
    with torch_profiler.record_function('phase:backward'):
      loss.backward()
    with torch_profiler.record_function('phase:optimizer'):
      torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
      opt.step()

  for _ in range(3):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  wall = (time.perf_counter() - start) / steps
  with torch_profiler.profile(activities=[torch_profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()

  def ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
      yield parent.name
      parent = parent.cpu_parent

  def group_of(event):
    return next((n[len('group:'):] for n in ancestors(event) if n.startswith('group:')), None)

  events = prof.events()
  forward_group = {}  # Autograd sequence number -> the forward op's group.
  for e in events:
    if e.name.startswith('aten::') and e.sequence_nr >= 0:
      forward_group.setdefault(e.sequence_nr, group_of(e))
  groups = collections.Counter()
  for e in events:
    parents = list(ancestors(e))
    if any(not p.startswith(('group:', 'phase:')) for p in parents):
      continue  # Counted in its top-level op.
    if e.name.startswith(('group:', 'phase:')):
      continue
    ms = e.cpu_time_total / 1e3 / steps
    if 'phase:optimizer' in parents:
      key = 'optimizer/other|other'
    elif e.name.startswith('autograd::engine::evaluate_function'):
      node = e.name.split(': ')[-1]
      group = forward_group.get(e.sequence_nr) or (
          'attention kernel' if 'Attention' in node else
          'head + loss' if ('LogSoftmax' in node or 'Nll' in node) else 'other model')
      key = f'{group}|bwd'
    elif 'phase:backward' in parents:
      key = 'other model|bwd'
    else:
      group = group_of(e) or ('attention kernel' if 'attention' in e.name else 'other model')
      key = f'{group}|fwd'
    groups[key] += ms
  return {'wall_ms_per_step': wall * 1e3, 'groups_ms': dict(groups),
          'time_kind': 'ms per step (each op on all cores)'}


def table(results: dict) -> str:
  frameworks = list(results)
  lines = ['| group | ' + ' | '.join(f'{f} ms (share)' for f in frameworks) + ' |',
           '|---|' + '---|' * len(frameworks)]
  totals = {f: sum(results[f]['groups_ms'].values()) or 1.0 for f in frameworks}
  for group in GROUPS:
    for direction in ('fwd', 'bwd', 'other'):
      key = f'{group}|{direction}'
      if not any(key in results[f]['groups_ms'] for f in frameworks):
        continue
      cells = []
      for f in frameworks:
        ms = results[f]['groups_ms'].get(key, 0.0)
        cells.append(f'{ms:.1f} ({100 * ms / totals[f]:.0f}%)')
      lines.append(f'| {group} {direction if direction != "other" else ""} | '
                   + ' | '.join(cells) + ' |')
  lines.append('| **sum of groups** | ' + ' | '.join(f'{totals[f]:.1f}' for f in frameworks)
               + ' |')
  lines.append('| **step wall time** | ' + ' | '.join(
      f'{results[f]["wall_ms_per_step"]:.1f}' for f in frameworks) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--framework', choices=('both', 'xenith', 'hf'), default='both')
  parser.add_argument('--size', default='small', help='experiments/default.py size.')
  parser.add_argument('--steps', type=int, default=3, help='Profiled steps.')
  parser.add_argument('--json', default=os.path.join(_REPO_ROOT, 'bench', 'results',
                                                     'step_profile.json'))
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:  # One framework in this process; the result to the parent.
    run = profile_xenith if args.framework == 'xenith' else profile_hf
    benchlib.report(run(args.size, args.steps))
    return
  frameworks = ('xenith', 'hf') if args.framework == 'both' else (args.framework,)
  results = {}
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  for framework in frameworks:  # Each in its own process, one after the other.
    results[framework] = benchlib.run_child(
        [sys.executable, __file__, '--child', f'--framework={framework}',
         f'--size={args.size}', f'--steps={args.steps}'], f'the {framework} child', env=env)
  text = table(results)
  print(text)
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, 'w') as f:
    json.dump({'size': args.size, 'steps': args.steps, 'results': results,
               'machine': benchlib.machine_info()}, f, indent=2)
  print(f'Wrote {args.json}')


if __name__ == '__main__':
  if '--child' in sys.argv and '--framework=xenith' in sys.argv:
    from xenith import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reexec_with_huge_pages()  # As main.py does (the HF child runs as PyTorch users do).
  main()
