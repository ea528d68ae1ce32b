"""What the benchmark scripts share: the machine they ran on, peak memory, child
processes that report one result each, timing a compiled step, synthetic batches, and
the JSON they write.

Imported by the scripts in this folder (run as `python bench/<script>.py`, which puts
this folder on sys.path); it imports JAX only inside `seconds_per_call`, so parents of
JAX children stay light.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

_RESULT = 'RESULT '


def machine_info(**extra) -> dict:
  """CPU model, cores, memory, Python and XLA_FLAGS, plus `extra` fields."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = names[0] if names else cpu
    with open('/proc/meminfo') as f:
      memory_gib = round(int(f.readline().split()[1]) / 2**20, 1)
  except OSError:
    memory_gib = None
  return {'cpu': cpu, 'cpu_count': os.cpu_count(),
          'usable_cores': len(os.sched_getaffinity(0)), 'memory_gib': memory_gib,
          'python': platform.python_version(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          **extra}


def jax_info() -> dict:
  """The JAX backend and library versions of this process (for `machine_info(**...)`)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax': jax.__version__,
          'flax': flax.__version__}


def peak_rss_mib() -> float:
  """This process's peak resident memory so far, MiB (`getrusage` ru_maxrss = VmHWM)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(result: dict) -> None:
  """In a child process: hands `result` to the parent's `run_child`."""
  print(_RESULT + json.dumps(result), flush=True)


def reported(stdout: str) -> dict | None:
  """The last result a child `report`ed in its `stdout`, or None."""
  lines = [l for l in stdout.splitlines() if l.startswith(_RESULT)]
  return json.loads(lines[-1][len(_RESULT):]) if lines else None


def run_child(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict:
  """Runs `cmd` (a script in child mode, environment `env` or this process's) and
  returns the result it `report`ed."""
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f'{what} failed (exit {proc.returncode})')
  return reported(proc.stdout)


def seconds_per_call(step, args, calls: int) -> float:
  """Seconds per call of the compiled `step(*args)` over `calls` back-to-back calls."""
  import jax  # pylint: disable=g-import-not-at-top  (only timing children need JAX)
  start = time.perf_counter()
  for _ in range(calls):
    out = step(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def synthetic_batch(rng: np.random.Generator, batch_size: int, seq_len: int,
                    vocab_size: int, extra_documents: float = 4) -> dict[str, np.ndarray]:
  """Random packed rows shaped like the data pipeline's (see xenith/data/packing.py).

  Every row starts a document; each later position starts another with probability
  `extra_documents / seq_len`, so the segment mask has the structure of real data
  (0 = one document filling each row).
  """
  inputs = rng.integers(1, vocab_size, (batch_size, seq_len), dtype=np.int32)
  starts = rng.random((batch_size, seq_len)) < extra_documents / seq_len
  starts[:, 0] = True
  index = np.arange(seq_len, dtype=np.int32)
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {'inputs': inputs,
          'segment_ids': np.cumsum(starts, axis=1, dtype=np.int32),
          'positions': (index - last_start).astype(np.int32)}


def write_json(path: str, data: dict) -> None:
  """Writes `data` to `path` (creating its folder) and says so."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f, indent=2)
  print(f'\nWrote {path}')
