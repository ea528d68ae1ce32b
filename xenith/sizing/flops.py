"""Model FLOPs per token and hardware peak FLOP/s, for MFU."""

import time

import jax
import jax.numpy as jnp
import ml_collections

from xenith.model import attention_pattern
from xenith.model import memory
from xenith.model import moe

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


def matmul_params(model: ml_collections.ConfigDict) -> float:
  """Parameters that take part in a matmul per token (the embedding lookup does not).

  A MoE layer counts its router, its shared experts and k of its E routed experts (the
  ones a token uses), as `describe.py` does from the param tree.
  """
  d, hd = model.embed_dim, model.head_dim
  attention = d * hd * (2 * model.num_heads + 2 * model.num_kv_heads)  # q, o, k, v.
  total = d * model.vocab_size  # Output projection (tied or not, it is a matmul).
  for layer in range(model.num_layers):
    if moe.is_moe_layer(model, layer):
      cfg = model.moe
      expert = 3 * d * moe.expert_mlp_dim(model)
      mlp = (d * cfg.num_experts + cfg.num_experts_per_token * expert
             + cfg.num_shared_experts * expert)
    else:
      mlp = 3 * d * model.mlp_dim  # SwiGLU: gate, up, down.
    total += attention + mlp
  return total + memory_matmul_params(model)


def memory_matmul_params(model: ml_collections.ConfigDict) -> float:
  """Chunk-summary memory's matmul work per token, as parameters used once per token.

  Per summarizer layer, every chunk token goes through the key and value projections
  (2 d^2) while the S queries' projections and MLP (2 d^2 + 2 d mlp) run once per chunk,
  i.e. S / C times per token; each memory layer projects the M bank summaries to keys and
  values once per chunk. 0 without memory. (`describe` counts the summarizer this way
  instead of from its param tree, which would charge every token all its weights.)
  """
  if not memory.enabled(model):
    return 0.0
  mem, d = model.memory, model.embed_dim
  per_chunk = mem.summary_tokens / mem.chunk_size
  # With self-attention, the S summaries' own q, k, v, o projections, once per chunk.
  self_attention = 4 * d * d if mem.get('summarizer_self_attention') else 0
  summarizer = mem.summarizer_layers * (
      2 * d * d + per_chunk * (2 * d * d + 2 * d * model.mlp_dim + self_attention))
  bank = len(mem.layers) * mem.bank_size / mem.chunk_size * 2 * d * model.num_kv_heads * model.head_dim
  return summarizer + bank


def attention_keys_per_query(model: ml_collections.ConfigDict, layer: int,
                             seq_len: int) -> float:
  """Keys a query's scores are computed against, averaged over the layer's heads.

  The full sequence for full attention (the whole score matrix, as the dense causal
  kernel computes it); window + global tokens (at most seq_len) for windowed heads.
  With chunk-summary memory every query scores its chunk and the short-term keys (the
  dense kernel per chunk), plus the stored global tokens in windowed layers and the bank
  in memory layers.
  """
  if memory.enabled(model):
    mem = model.memory
    bank = mem.bank_size if layer in tuple(mem.layers) else 0
    num_global = attention_pattern.num_global_tokens(model, layer)
    return mem.chunk_size + mem.short_term_tokens + num_global + bank
  groups = attention_pattern.layer_head_groups(model, layer, seq_len)
  num_global = attention_pattern.num_global_tokens(model, layer)
  keys = [seq_len if g.window is None else min(seq_len, g.window + num_global)
          for g in groups for _ in range(g.kv_start, g.kv_end)]
  return sum(keys) / len(keys)


def attention_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  """Forward FLOPs per token of the attention scores and their weighted sum (no params).

  With memory, also the summarizer's: S queries score the C chunk tokens per layer
  (and, with self-attention, each other: S^2 scores per chunk).
  """
  total = sum(4 * model.num_heads * model.head_dim
              * attention_keys_per_query(model, layer, seq_len)
              for layer in range(model.num_layers))
  if memory.enabled(model):
    mem = model.memory
    keys = mem.summary_tokens
    if mem.get('summarizer_self_attention'):
      keys += mem.summary_tokens ** 2 / mem.chunk_size
    total += mem.summarizer_layers * 4 * model.embed_dim * keys
  return total


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  """Training FLOPs per token: 6 per matmul parameter plus 3x the attention scores.

  PaLM's accounting (appendix B): 6N + 12 * layers * heads * head_dim * keys per query,
  with keys = seq for full attention (the full score matrix) and the window for
  windowed heads.
  """
  return 6 * matmul_params(model) + 3 * attention_flops_per_token(model, seq_len)


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
