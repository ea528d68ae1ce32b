"""Token dispatch of a MoE layer: routed tokens -> SwiGLU experts -> weighted outputs.

Every method computes, for tokens x: [tokens, embed] routed to `expert_index`: [tokens, k]
with combine `weights`: [tokens, k],

  y[t] = sum_j weights[t, j] * swiglu_{expert_index[t, j]}(x[t]),

where an index equal to num_experts marks an unrouted (padding) token, and returns y with
`kept`: [tokens, k], False where an assignment was dropped (only 'capacity' drops).

- 'dense': every expert on every token, then a weighted sum (the reference; E/k times
  the useful FLOPs, as three large matmuls).
- 'dropless_ragged': assignments sorted by expert, `jax.lax.ragged_dot` grouped matmuls
  (the GPU/TPU path; on CPU XLA computes ragged_dot densely).
- 'dropless_gather': assignments sorted by expert into blocks of `block_size` rows, each
  expert's rows padded to whole blocks; a loop runs one expert's SwiGLU per block on
  2-D matmuls, the fastest form on XLA:CPU (batched and very tall dots run slower
  there), and skips the blocks that are left over. Hand-written VJP.
- 'capacity': each expert takes at most ceil(capacity_factor * tokens * k / E)
  assignments (first choices before second choices, then token order); the overflow is
  dropped and counted. Batched einsums over [experts, capacity] buffers.
- 'auto': 'dropless_gather' on CPU, 'dropless_ragged' on GPU/TPU.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from xenith.model.mlp import swiglu  # Not `mlp`: the name is the hidden width here.

DISPATCHES = ('auto', 'dropless_gather', 'dropless_ragged', 'capacity', 'dense')


def resolve(dispatch: str) -> str:
  """The concrete method for `dispatch` on the default backend."""
  if dispatch not in DISPATCHES:
    raise ValueError(f'Unknown MoE dispatch {dispatch!r}; choose one of {DISPATCHES}.')
  if dispatch == 'auto':
    return 'dropless_gather' if jax.default_backend() == 'cpu' else 'dropless_ragged'
  return dispatch


def _swiglu(x, gate, up, down):
  """x: [..., embed] with one expert's gate/up: [embed, mlp], down: [mlp, embed]."""
  return swiglu(x @ gate, x @ up) @ down


def _combine(y, weights):
  """y: [tokens, k, embed] expert outputs, weights: [tokens, k] -> [tokens, embed]."""
  return jnp.einsum('tkd,tk->td', y, weights.astype(y.dtype))


def _sorted_layout(flat_expert, num_experts):
  """Groups assignments by expert (unrouted ones, index num_experts, last).

  flat_expert: [n] -> (order [n]: sorted slot -> assignment, group_sizes [E],
  rank [n]: each assignment's position within its expert's group).
  """
  n = flat_expert.shape[0]
  order = jnp.argsort(flat_expert, stable=True)
  sizes = jnp.zeros(num_experts, jnp.int32).at[flat_expert].add(1, mode='drop')
  starts = jnp.cumsum(sizes) - sizes
  sorted_expert = flat_expert[order]
  rank_sorted = jnp.arange(n, dtype=jnp.int32) - starts[jnp.minimum(sorted_expert,
                                                                    num_experts - 1)]
  rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted)
  return order, sizes, rank


def dense(x, expert_index, weights, gate, up, down):
  """Every expert on every token, as one wide MLP whose hidden units are the experts'.

  The experts' hidden layers side by side are [tokens, experts * mlp]; scaling each
  expert's units by the token's combine weight before the down projection sums the
  weighted expert outputs. Three large 2-D matmuls: a strong baseline on any backend.
  """
  num_experts, embed, mlp = gate.shape
  combine = jnp.einsum('tk,tke->te', weights.astype(x.dtype),
                       jax.nn.one_hot(expert_index, num_experts, dtype=x.dtype))
  wide = lambda w: w.transpose(1, 0, 2).reshape(embed, num_experts * mlp)
  hidden = swiglu(x @ wide(gate), x @ wide(up))  # [tokens, experts * mlp]
  hidden = hidden * jnp.repeat(combine, mlp, axis=1)
  y = hidden @ down.reshape(num_experts * mlp, embed)
  return y, jnp.ones(expert_index.shape, bool)


def dropless_ragged(x, expert_index, weights, gate, up, down):
  """Sort by expert, then grouped matmuls with `jax.lax.ragged_dot`."""
  tokens, k = expert_index.shape
  flat = expert_index.reshape(-1)
  order, sizes, _ = _sorted_layout(flat, gate.shape[0])
  x_sorted = x[order // k]  # [tokens * k, embed]; unrouted rows last, outside all groups.
  hidden = swiglu(lax.ragged_dot(x_sorted, gate, sizes),
                      lax.ragged_dot(x_sorted, up, sizes))
  y_sorted = lax.ragged_dot(hidden, down, sizes)  # Rows outside the groups are 0.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  y = y_sorted[inverse].reshape(tokens, k, -1)
  return _combine(y, weights), jnp.ones(expert_index.shape, bool)


def capacity(x, expert_index, weights, gate, up, down, capacity_factor):
  """Fixed-size [experts, capacity] buffers; assignments beyond capacity are dropped."""
  tokens, k = expert_index.shape
  num_experts = gate.shape[0]
  cap = max(1, math.ceil(capacity_factor * tokens * k / num_experts))
  # Choice-major order: every token's first choice is placed before any second choice.
  flat = expert_index.T.reshape(-1)  # [k * tokens]
  _, _, rank = _sorted_layout(flat, num_experts)
  kept = (rank < cap) & (flat < num_experts)
  token = jnp.tile(jnp.arange(tokens), k)
  # Dropped and unrouted assignments fall outside the buffer ('drop').
  slot_expert = jnp.where(kept, flat, num_experts)
  buffers = jnp.zeros((num_experts, cap, x.shape[-1]), x.dtype).at[slot_expert, rank].add(
      x[token], mode='drop')  # [experts, capacity, embed]
  hidden = swiglu(jnp.einsum('ecd,edf->ecf', buffers, gate),
                      jnp.einsum('ecd,edf->ecf', buffers, up))
  out = jnp.einsum('ecf,efd->ecd', hidden, down)
  y = out.at[slot_expert, rank].get(mode='fill', fill_value=0)  # [k * tokens, embed]
  y = y.reshape(k, tokens, -1).transpose(1, 0, 2)
  return _combine(y, weights), kept.reshape(k, tokens).T


def block_layout(expert_index, num_experts, block):
  """Rows of the block buffer for dropless_gather.

  Assignments sorted by expert; each expert's rows start at a block boundary.
  Returns (row [tokens * k]: each assignment's row, out of range if unrouted;
  row_assignment [blocks * block]: the assignment in each row, tokens * k (out of
  range) in padding rows; first_block [E]: each expert's first block; num_blocks [E]:
  its number of blocks).
  """
  tokens, k = expert_index.shape
  n = tokens * k
  max_blocks = (n + num_experts * (block - 1)) // block  # Upper bound on blocks in use.
  flat = expert_index.reshape(-1)
  _, sizes, rank = _sorted_layout(flat, num_experts)
  num_blocks = (sizes + block - 1) // block
  first_block = jnp.cumsum(num_blocks) - num_blocks
  routed = flat < num_experts
  row = jnp.where(routed, first_block[jnp.minimum(flat, num_experts - 1)] * block + rank,
                  max_blocks * block)
  row_assignment = jnp.full(max_blocks * block, n, jnp.int32).at[row].set(
      jnp.arange(n, dtype=jnp.int32), mode='drop')
  return row, row_assignment, first_block.astype(jnp.int32), num_blocks.astype(jnp.int32)


@jax.custom_vjp
def gather_rows(x, index, transpose_index):
  """x[index] with zeros where index is out of range; its gradient is a gather too.

  x: [n, d]; index: [m]; transpose_index: [n, g], the rows of the output that read each
  row of x (out of range = none), so that the gradient dx[i] = sum_j dy[transpose_index[i,
  j]]. Every in-range index must be listed there once, and output rows not listed must
  not matter to the caller (their gradient is dropped). The gradient of a gather is a
  scatter-add, which XLA:CPU runs row by row; this gather-sum is several times faster.
  """
  return jnp.take(x, index, axis=0, mode='fill', fill_value=0)


def _gather_rows_fwd(x, index, transpose_index):
  return gather_rows(x, index, transpose_index), transpose_index


def _gather_rows_bwd(transpose_index, dy):
  dx = jnp.take(dy, transpose_index, axis=0, mode='fill', fill_value=0).sum(axis=1)
  return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _take(w, e):
  return lax.dynamic_index_in_dim(w, e, keepdims=False)


def _expert_blocks(num_experts, first_block, num_blocks, start, block_body, finish, carry):
  """Two nested loops: over experts, then over each expert's blocks.

  Each expert's weights are sliced once (not once per block) and stay loop-invariant in
  its inner loop: start(e, carry) -> (weights, inner carry); block_body(j, weights,
  inner) -> inner for its blocks j; finish(e, inner) -> carry.
  """
  def expert(e, carry):
    weights, inner = start(e, carry)
    first = first_block[e]
    inner = lax.fori_loop(first, first + num_blocks[e],
                          lambda j, c: block_body(j, weights, c), inner)
    return finish(e, inner)
  return lax.fori_loop(0, num_experts, expert, carry)


def _expert_weights(gate, up, down, e):
  """Expert e's ([embed, 2 * mlp] gate and up side by side, [mlp, embed] down).

  One [block, 2 * mlp] matmul per block instead of two: XLA:CPU runs one wide matmul
  faster than two concurrent narrow ones.
  """
  return jnp.concatenate([_take(gate, e), _take(up, e)], axis=-1), _take(down, e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_swiglu(x_rows, gate, up, down, first_block, num_blocks, block):
  """Expert e's SwiGLU on its blocks [first_block[e], first_block[e] + num_blocks[e])
  of `block` rows each; rows in no expert's blocks are 0.

  x_rows: [blocks * block, embed]; gate, up: [experts, embed, mlp];
  down: [experts, mlp, embed] -> [blocks * block, embed].
  """
  return _grouped_swiglu_fwd(x_rows, gate, up, down, first_block, num_blocks, block)[0]


def _grouped_swiglu_fwd(x_rows, gate, up, down, first_block, num_blocks, block):
  rows = x_rows.shape[0]
  mlp = gate.shape[-1]

  def body(j, weights, carry):
    gate_up, w_down = weights
    y, gu_rows = carry
    start = j * block
    xj = lax.dynamic_slice_in_dim(x_rows, start, block)  # [block, embed]
    gu = xj @ gate_up  # [block, 2 * mlp]
    yj = (jax.nn.silu(gu[:, :mlp]) * gu[:, mlp:]) @ w_down
    return (lax.dynamic_update_slice_in_dim(y, yj, start, 0),
            lax.dynamic_update_slice_in_dim(gu_rows, gu, start, 0))

  init = (jnp.zeros_like(x_rows), jnp.zeros((rows, 2 * mlp), x_rows.dtype))
  y, gu_rows = _expert_blocks(
      gate.shape[0], first_block, num_blocks,
      lambda e, carry: (_expert_weights(gate, up, down, e), carry), body,
      lambda e, carry: carry, init)
  # Keeping the gate/up activations saves recomputing two of the three matmuls.
  return y, (x_rows, gate, up, down, first_block, num_blocks, gu_rows)


def _grouped_swiglu_bwd(block, residuals, dy):
  x_rows, gate, up, down, first_block, num_blocks, gu_rows = residuals
  f32 = jnp.float32
  num_experts, mlp, embed = down.shape
  dot = functools.partial(jnp.matmul, preferred_element_type=f32)

  def start(e, carry):
    # Expert e's weight gradients accumulate in float32 in the inner carry; `finish`
    # stores them once, after its last block.
    dx, dgate_up, ddown_t = carry
    inner = (dx, dgate_up, ddown_t, jnp.zeros((embed, 2 * mlp), f32),
             jnp.zeros((embed, mlp), f32))
    return _expert_weights(gate, up, down, e), inner

  def body(j, weights, inner):
    gate_up, w_down = weights
    dx, dgate_up, ddown_t, dgate_up_e, ddown_e = inner
    start = j * block
    xj, gu, dyj = (lax.dynamic_slice_in_dim(a, start, block) for a in (x_rows, gu_rows, dy))
    g, u = gu[:, :mlp], gu[:, mlp:]
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dh = dyj @ w_down.T  # [block, mlp]
    # silu'(g) = sig * (1 + g * (1 - sig)); [d gate | d up], [block, 2 * mlp].
    dgu = jnp.concatenate([dh * u * sig * (1 + g * (1 - sig)), dh * silu], axis=-1)
    dxj = dgu @ gate_up.T
    # d down accumulates as [embed, mlp]: XLA:CPU computes that product about 1.4x
    # faster than the [mlp, embed] one.
    return (lax.dynamic_update_slice_in_dim(dx, dxj, start, 0), dgate_up, ddown_t,
            dgate_up_e + dot(xj.T, dgu), ddown_e + dot(dyj.T, silu * u))

  def finish(e, inner):
    dx, dgate_up, ddown_t, dgate_up_e, ddown_e = inner
    return (dx, lax.dynamic_update_index_in_dim(dgate_up, dgate_up_e, e, 0),
            lax.dynamic_update_index_in_dim(ddown_t, ddown_e, e, 0))

  init = (jnp.zeros_like(x_rows), jnp.zeros((num_experts, embed, 2 * mlp), f32),
          jnp.zeros((num_experts, embed, mlp), f32))
  dx, dgate_up, ddown_t = _expert_blocks(num_experts, first_block, num_blocks, start, body,
                                         finish, init)
  ddown = ddown_t.transpose(0, 2, 1)
  dgate, dup = dgate_up[..., :mlp], dgate_up[..., mlp:]
  return (dx, dgate.astype(gate.dtype), dup.astype(up.dtype), ddown.astype(down.dtype),
          None, None)


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def gather_block_size(tokens, k, num_experts, block_size):
  """`block_size`, shrunk for inputs so small that padding to it would dominate."""
  per_expert = -(-tokens * k // num_experts)
  return max(8, min(block_size, -(-per_expert // 8) * 8))


def dropless_gather(x, expert_index, weights, gate, up, down, block_size):
  """Sorted into expert-aligned blocks, one 2-D SwiGLU per block (see grouped_swiglu)."""
  tokens, k = expert_index.shape
  num_experts = gate.shape[0]
  block = gather_block_size(tokens, k, num_experts, block_size)
  row, row_assignment, first_block, num_blocks = block_layout(expert_index, num_experts,
                                                               block)
  # Padding rows read token 0; their outputs are never read, so nothing flows back.
  row_token = jnp.where(row_assignment < tokens * k, row_assignment // k, 0)
  x_rows = gather_rows(x, row_token, row.reshape(tokens, k))
  y_rows = grouped_swiglu(x_rows, gate, up, down, first_block, num_blocks, block)
  y = gather_rows(y_rows, row, row_assignment[:, None]).reshape(tokens, k, -1)
  return _combine(y, weights), jnp.ones(expert_index.shape, bool)


def dispatch(method, x, expert_index, weights, gate, up, down, *, capacity_factor=1.0,
             block_size=256):
  """Runs `method` (see the module docstring); returns (y [tokens, embed], kept [tokens, k])."""
  method = resolve(method)
  args = (x, expert_index, weights, gate, up, down)
  if method == 'dense':
    return dense(*args)
  if method == 'dropless_ragged':
    return dropless_ragged(*args)
  if method == 'capacity':
    return capacity(*args, capacity_factor)
  return dropless_gather(*args, block_size)
