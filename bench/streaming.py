"""Streaming a long token stream through a tiny model, chunk by chunk, in bounded memory.

  .venv/bin/python bench/streaming.py     # --lengths=16384,262144 --chunk=1024
  .venv/bin/python bench/streaming.py --memory   # the same with chunk-summary memory

Every layer of the model uses sliding windows plus global tokens (no full-attention
layer), so its KV cache (`xenith/model/kv_cache.py`) holds at most
global + window slots per head group whatever the length: the stream is fed `--chunk`
tokens at a time through one jitted decode call, keeping only the cache and a running
next-token loss between calls. Each length runs in its own child process, so its peak
resident memory (VmHWM) is its own; the target is peak RSS at the longest length within
1.2x of its value at the shortest (16k). With `--memory` the model instead reads the
stream with chunk-summary memory (`xenith/model/memory/`, chunk = `--chunk`): each call
takes one chunk and the memory state (summary bank + short-term keys) of the previous
one, and returns the new state; global tokens are off (memory mode has none). Results: a
Markdown table on stdout and JSON in bench/results/streaming[_memory].json.
"""

import argparse
import datetime
import os
import sys
import time

import benchlib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(args):
  """The tiny default model with windows and global tokens in every layer."""
  sys.path.insert(0, _ROOT)
  from experiments import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('size=tiny').model
  config.attention.window_sizes = tuple(int(w) for w in args.windows.split(','))
  config.attention.full_attention_layers = 0
  config.attention.num_global_tokens = 0 if args.memory else args.num_global
  if args.memory:
    config.memory.update(dict(chunk_size=args.chunk, summary_tokens=4, summarizer_heads=4,
                              bank_size=32, layers=(1,), tbptt_chunks=1,
                              short_term_tokens=256))
  return config


def child(args) -> dict:
  sys.path.insert(0, _ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from xenith.model import kv_cache
  from xenith.model import memory
  from xenith.model import build

  config = model_config(args)
  model = build.make_model(config)
  length, chunk = args.length, args.chunk
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, chunk), jnp.int32))['params']
  if args.memory:  # The carried state: the summary bank and the short-term keys.
    cache = memory.init_state(config, 1)

    def run(cache, tokens):
      out = model.apply({'params': params}, tokens, memory=cache, method='forward')
      return out.logits, out.memory
  else:  # The carried state: the KV cache.
    cache = kv_cache.init_cache(model, 1, length)

    def run(cache, tokens):
      logits, variables = model.apply({'params': params, 'cache': cache}, tokens,
                                      cache_length=length, mutable=['cache'])
      return logits, variables['cache']
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))

  @jax.jit
  def step(cache, tokens, targets):
    logits, cache = run(cache, tokens)
    nll = (jax.nn.logsumexp(logits, -1)
           - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
    return cache, jnp.sum(nll)

  # A reproducible stream of random tokens, generated chunk by chunk (never all at once).
  rng = np.random.default_rng(0)
  next_chunk = rng.integers(0, config.vocab_size, (1, chunk + 1), dtype=np.int32)
  total_nll, start, rss_after_first = 0.0, time.perf_counter(), None
  for i in range(length // chunk):
    tokens = next_chunk
    next_chunk = np.concatenate(
        [tokens[:, -1:], rng.integers(0, config.vocab_size, (1, chunk), dtype=np.int32)], 1)
    cache, nll = step(cache, tokens[:, :-1], tokens[:, 1:])
    total_nll += float(nll)
    if i == 0:
      rss_after_first = benchlib.peak_rss_mib()
      start = time.perf_counter()  # Compilation excluded from the rate.
  seconds = time.perf_counter() - start
  return {'length': length, 'chunk': chunk, 'cache_mib': cache_bytes / 2**20,
          'mean_nll': total_nll / length,
          'tokens_per_s': (length - chunk) / max(seconds, 1e-9),
          'peak_rss_mib': benchlib.peak_rss_mib(), 'peak_rss_after_first_chunk_mib': rss_after_first}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='16384,262144',
                      help='Stream lengths in tokens (multiples of --chunk); first = baseline.')
  parser.add_argument('--chunk', type=int, default=1024, help='Tokens per decode call.')
  parser.add_argument('--windows', default='128,256', help='Windows split over KV heads.')
  parser.add_argument('--num_global', type=int, default=16, help='Global tokens.')
  parser.add_argument('--memory', action='store_true',
                      help='Chunk-summary memory instead of the KV cache.')
  parser.add_argument('--json', default=None,
                      help='Default: bench/results/streaming.json (_memory.json with --memory).')
  parser.add_argument('--length', type=int, help=argparse.SUPPRESS)  # Child mode.
  args = parser.parse_args()
  if args.length:
    benchlib.report(child(args))
    return

  if args.json is None:
    name = 'streaming_memory.json' if args.memory else 'streaming.json'
    args.json = os.path.join(_ROOT, 'bench', 'results', name)
  lengths = [int(n) for n in args.lengths.split(',')]
  if any(n % args.chunk for n in lengths):
    parser.error(f'every length must be a multiple of --chunk={args.chunk}')
  out = {'command': ' '.join(['python'] + sys.argv),
         'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'machine': benchlib.machine_info(), 'load_average_start': os.getloadavg(),
         'windows': args.windows,
         'num_global': 0 if args.memory else args.num_global, 'memory': args.memory,
         'runs': []}
  for n in lengths:
    cmd = [sys.executable, os.path.abspath(__file__), f'--length={n}', f'--chunk={args.chunk}',
           f'--windows={args.windows}', f'--num_global={args.num_global}']
    cmd += ['--memory'] if args.memory else []
    result = benchlib.run_child(cmd, f'the child for length {n}')
    out['runs'].append(result)
    print(f"{n:>8} tokens: peak RSS {result['peak_rss_mib']:.0f} MiB, state "
          f"{result['cache_mib']:.2f} MiB, {result['tokens_per_s']:,.0f} tokens/s", flush=True)
  base, longest = out['runs'][0], out['runs'][-1]
  ratio = longest['peak_rss_mib'] / base['peak_rss_mib']
  out['targets'] = {'peak_rss_ratio': ratio, 'peak_rss_ratio_max': 1.2, 'met': ratio <= 1.2}
  out['load_average_end'] = os.getloadavg()
  print('\n| tokens | peak RSS MiB | carried state MiB | tokens/s | mean NLL |\n|---|---|---|---|---|')
  for r in out['runs']:
    print(f"| {r['length']:,} | {r['peak_rss_mib']:,.0f} | {r['cache_mib']:.2f} | "
          f"{r['tokens_per_s']:,.0f} | {r['mean_nll']:.3f} |")
  print(f"\npeak RSS {longest['length']:,} / {base['length']:,} tokens: {ratio:.3f} "
        f"(target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
  benchlib.write_json(args.json, out)


if __name__ == '__main__':
  main()
