"""Output head and next-token cross-entropy fused, a chunk of positions at a time.

The full logits of a batch, [batch, seq, vocab] in float32, are the largest tensor of
a small model's train step (8 x 512 x 32k = 0.5 GB, kept for the backward pass, plus
its softmax and gradient). Here the head matmul and the loss run over `chunk`
positions at a time, and each chunk's gradient with respect to the hidden states and
the head kernel is formed in the same pass (softmax - one_hot is known once the
logits are), so nothing of size vocab outlives its chunk and the backward pass is two
scalings instead of a recomputation:

  loss = sum_t w_t * (logsumexp(h_t K) - (h_t K)[y_t])
  d loss / d h_t = w_t (softmax(h_t K) - onehot(y_t)) K^T,   d loss / d K = sum_t h_t^T (...).

Equal to computing the logits in full and taking the same weighted sum (test).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp


def _chunks(x, chunk):
  """[batch, seq, ...] -> [seq / chunk, batch, chunk, ...] (seq padded with zeros)."""
  batch, seq = x.shape[:2]
  pad = -seq % chunk
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(batch, (seq + pad) // chunk, chunk, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk(x, seq):
  """Inverse of `_chunks`: [num_chunks, batch, chunk, ...] -> [batch, seq, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :seq]


def _chunk_logits(h, kernel):
  """h: [batch, chunk, embed], kernel: [embed, vocab] -> float32 logits."""
  return jnp.einsum('bce,ev->bcv', h, kernel, preferred_element_type=jnp.float32)


def _nll(logits, targets):
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_cross_entropy(hidden, kernel, targets, weights, chunk):
  """sum over positions of weights * cross-entropy(hidden @ kernel, targets).

  Args:
    hidden: [batch, seq, embed] final hidden states (compute dtype).
    kernel: [embed, vocab] the head's matrix (compute dtype).
    targets: [batch, seq] int token ids to predict.
    weights: [batch, seq] float loss weights (0 = not counted); not differentiated.
    chunk: positions per chunk (static).

  Returns:
    scalar float32.
  """
  def body(total, xs):
    h, y, w = xs
    nll, _ = _nll(_chunk_logits(h, kernel), y)
    return total + jnp.sum(nll * w), None

  xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk))
  return lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


def _forward(hidden, kernel, targets, weights, chunk):
  def body(carry, xs):
    total, d_kernel = carry
    h, y, w = xs
    logits = _chunk_logits(h, kernel)
    nll, lse = _nll(logits, y)
    # d loss / d logits = w * (softmax - onehot(target)), [batch, chunk, vocab].
    # An iota comparison rather than a scatter: XLA fuses it into the exp's loop.
    is_target = lax.broadcasted_iota(jnp.int32, logits.shape, 2) == y[..., None]
    d_logits = jnp.exp(logits - lse[..., None]) - is_target
    d_logits = (d_logits * w[..., None]).astype(h.dtype)
    d_h = jnp.einsum('bcv,ev->bce', d_logits, kernel)
    d_kernel = d_kernel + jnp.einsum('bce,bcv->ev', h, d_logits,
                                     preferred_element_type=jnp.float32)
    return (total + jnp.sum(nll * w), d_kernel), d_h

  init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
  xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk))
  (total, d_kernel), d_hidden = lax.scan(body, init, xs)
  return total, (_unchunk(d_hidden, hidden.shape[1]), d_kernel.astype(kernel.dtype))


def _backward(chunk, residuals, g):
  del chunk
  d_hidden, d_kernel = residuals
  return (g.astype(d_hidden.dtype) * d_hidden, g.astype(d_kernel.dtype) * d_kernel,
          None, None)


weighted_cross_entropy.defvjp(_forward, _backward)


def nll_and_correct(hidden, kernel, targets, chunk):
  """Per-position cross-entropy and top-1 correctness, a chunk at a time (no gradient).

  hidden: [batch, seq, embed]; kernel: [embed, vocab]; targets: [batch, seq]
  -> (nll float32, correct bool), each [batch, seq].
  """
  def body(_, xs):
    h, y = xs
    logits = _chunk_logits(h, kernel)
    return None, (_nll(logits, y)[0], jnp.argmax(logits, axis=-1) == y)

  _, (nll, correct) = lax.scan(body, None, (_chunks(hidden, chunk), _chunks(targets, chunk)))
  return _unchunk(nll, hidden.shape[1]), _unchunk(correct, hidden.shape[1])
