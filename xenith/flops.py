"""Model FLOPs per token and hardware peak FLOP/s, for MFU."""

import time

import jax
import jax.numpy as jnp
import ml_collections

# Dense bf16 peak FLOP/s per device (vendor figures), matched against `device_kind`.
PEAK_FLOPS = (
    ('H200', 989e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('TPU v6', 918e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 197e12),  # v5e ("TPU v5 lite").
    ('TPU v4', 275e12),
)


def matmul_params(model: ml_collections.ConfigDict) -> int:
  """Parameters that take part in a matmul per token (the embedding lookup does not)."""
  d, hd = model.embed_dim, model.head_dim
  attention = d * hd * (2 * model.num_heads + 2 * model.num_kv_heads)  # q, o, k, v.
  mlp = 3 * d * model.mlp_dim  # SwiGLU: gate, up, down.
  head = d * model.vocab_size  # Output projection (tied or not, it is a matmul).
  return model.num_layers * (attention + mlp) + head


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  """Training FLOPs per token: 6 per matmul parameter plus attention scores.

  PaLM's accounting (appendix B): 6N + 12 * layers * heads * head_dim * seq. It counts
  the full score matrix, as the dense causal kernel computes it.
  """
  attention = 12 * model.num_layers * model.num_heads * model.head_dim * seq_len
  return 6 * matmul_params(model) + attention


def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, seconds: float = 1.0) -> float:
  """Measures this device's [n, n] @ [n, n] matmul FLOP/s (best of a few repeats)."""
  x = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  reps, best, start = 0, 0.0, time.perf_counter()
  while time.perf_counter() - start < seconds or reps < 3:
    t = time.perf_counter()
    matmul(x).block_until_ready()
    best = max(best, 2 * n**3 / (time.perf_counter() - t))
    reps += 1
  return best


def peak_flops(configured_per_device: float = 0.0) -> float:
  """Peak FLOP/s of all devices together, for MFU.

  `configured_per_device` if set, else the accelerator's table entry, times the device
  count. On a CPU, simulated devices share the same cores: the measured matmul rate of
  the host is the peak of all of them together.
  """
  devices = jax.devices()
  if configured_per_device > 0:
    return configured_per_device * len(devices)
  for name, flops in PEAK_FLOPS:
    if name in devices[0].device_kind:
      return flops * len(devices)
  return measure_matmul_flops()
