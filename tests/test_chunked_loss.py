"""The fused, chunked head + cross-entropy against full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import default
from xenith.train import steps
from xenith.model import chunked_loss
from xenith.model import build
from helpers import two_document_batch


def _inputs(batch=2, seq=37, embed=16, vocab=50, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(batch, seq, embed)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(embed, vocab)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (batch, seq)), jnp.float32)
  return hidden, kernel, targets, weights


def _full_logits_loss(hidden, kernel, targets, weights):
  logits = jnp.einsum('bte,ev->btv', hidden, kernel)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(nll * weights)


@pytest.mark.parametrize('chunk', [1, 8, 37, 64])  # Partial last chunk, exact, > seq.
def test_weighted_cross_entropy_value_and_gradients(chunk):
  hidden, kernel, targets, weights = _inputs()
  want = jax.value_and_grad(_full_logits_loss, argnums=(0, 1))(hidden, kernel, targets, weights)
  got = jax.jit(jax.value_and_grad(chunked_loss.weighted_cross_entropy, argnums=(0, 1)),
                static_argnums=4)(hidden, kernel, targets, weights, chunk)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  # Without differentiation the primal path (no gradient work) gives the same value.
  np.testing.assert_allclose(chunked_loss.weighted_cross_entropy(
      hidden, kernel, targets, weights, chunk), want[0], rtol=1e-5)


def test_nll_and_correct():
  hidden, kernel, targets, _ = _inputs()
  logits = jnp.einsum('bte,ev->btv', hidden, kernel)
  nll, correct = chunked_loss.nll_and_correct(hidden, kernel, targets, 8)
  want = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(correct, jnp.argmax(logits, -1) == targets)


def _config(tie_embeddings, lora_head=False, moe=False):
  config = default.get_config('size=tiny')
  config.model.vocab_size = 96
  config.model.tie_embeddings = tie_embeddings
  if lora_head:
    config.model.lora.rank = 4
    config.model.lora.targets = ('query', 'head')
  if moe:
    config.model.moe.num_experts = 4
    config.model.moe.expert_mlp_dim = 32
  return config


@pytest.mark.parametrize('tie_embeddings,lora_head,moe', [
    (True, False, False), (False, False, True), (False, True, False)])
def test_train_loss_and_grads_equal_full_logits(tie_embeddings, lora_head, moe):
  """make_loss_fn with a chunked head equals it with full logits (tied head, untied head
  with MoE, a LoRA-adapted head with random B)."""
  config = _config(tie_embeddings, lora_head, moe)
  batch = two_document_batch(20, 12, vocab=96)
  results = []
  for chunk in (0, 8):
    config.model.loss_chunk_size = chunk
    model = build.make_model(config.model)
    params = model.init(jax.random.key(0), batch['inputs'])['params']
    params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                          is_leaf=lambda x: hasattr(x, 'value'))
    if lora_head:  # Random B so that the head adapter matters.
      head = dict(params['head'])
      head['lora_b'] = 0.1 * jnp.ones_like(head['lora_b'])
      params = {**params, 'head': head}
    loss_fn = steps.make_loss_fn(model, with_aux=True)
    results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.key(1)))
    # The eval step's chunked path is the same for every head; one case checks it.
    eval_metrics = (jax.jit(steps.make_eval_step(model))(params, batch).compute()
                    if tie_embeddings else None)
    results[-1] += (eval_metrics,)
  (full, full_grads, full_eval), (chunked, chunked_grads, chunked_eval) = results
  np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5)
  np.testing.assert_allclose(chunked[1][0], full[1][0], rtol=1e-5)  # The LM loss alone.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               chunked_grads, full_grads)
  if tie_embeddings:
    for name in ('loss', 'accuracy'):
      np.testing.assert_allclose(chunked_eval[name], full_eval[name], rtol=1e-5)


# Two hand-packed rows of 12 tokens (BOS 2, EOS 3, padding 0). Row 0: a whole document,
# a second one, and the start of a third, cut at the row's end; row 1: the rest of the
# third (a new segment), a fourth document, then padding.
_PACKED = {
    'inputs': [[2, 10, 11, 12, 3, 2, 20, 21, 3, 2, 30, 31],
               [32, 33, 3, 2, 40, 41, 3, 0, 0, 0, 0, 0]],
    'segment_ids': [[1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3],
                    [1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0]],
    'positions': [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2],
                  [0, 1, 2, 0, 1, 2, 3, 0, 0, 0, 0, 0]],
}
# What each position predicts, and whether it counts: never across a document boundary
# (EOS -> next BOS), into padding, past the row's end, or from padding.
_TARGETS = [[10, 11, 12, 3, 2, 20, 21, 3, 2, 30, 31, 0],
            [33, 3, 2, 40, 41, 3, 0, 0, 0, 0, 0, 0]]
_WEIGHTS = [[1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0],
            [1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]


def test_next_token_targets_of_a_hand_packed_batch():
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in _PACKED.items()}
  targets, weights = steps.next_token_targets(batch['inputs'], batch['segment_ids'])
  np.testing.assert_array_equal(weights, np.asarray(_WEIGHTS, np.float32))
  # Only counted positions' targets matter; those must be exactly the next token.
  np.testing.assert_array_equal(np.where(weights > 0, targets, 0),
                                np.where(np.asarray(_WEIGHTS) > 0, _TARGETS, 0))


@pytest.mark.parametrize('chunk', [0, 5])  # Full logits; chunks not dividing the row.
def test_train_and_eval_loss_of_a_hand_packed_batch_equal_numpy(chunk):
  """The train loss, eval loss and accuracy against a NumPy negative log-likelihood
  over the hand-listed targets and weights, from the model's own logits."""
  config = _config(tie_embeddings=True)
  config.model.loss_chunk_size = chunk
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in _PACKED.items()}
  model = build.make_model(config.model)
  params = jax.tree.map(lambda x: getattr(x, 'value', x),
                        model.init(jax.random.key(0), batch['inputs'])['params'],
                        is_leaf=lambda x: hasattr(x, 'value'))
  params = jax.tree.map(lambda x: 4 * x, params)  # Sharper logits: a wrong target shows.
  logits = np.asarray(model.apply({'params': params}, batch['inputs'],
                                  segment_ids=batch['segment_ids'],
                                  positions=batch['positions']), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  targets, weights = np.asarray(_TARGETS), np.asarray(_WEIGHTS, np.float64)
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  want_loss = (nll * weights).sum() / weights.sum()
  want_accuracy = ((logits.argmax(-1) == targets) * weights).sum() / weights.sum()

  loss = steps.make_loss_fn(model)(params, batch, jax.random.key(1))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  result = steps.make_eval_step(model)(params, batch).compute()
  np.testing.assert_allclose(result['loss'], want_loss, rtol=1e-5)
  np.testing.assert_allclose(result['accuracy'], want_accuracy, rtol=1e-6)


def test_full_logits_losses_and_correctness_of_hand_made_logits():
  """`next_token_losses` on logits made by hand: the peak on the target at half the
  positions (correct there, wrong elsewhere), NLL against NumPy's log-softmax."""
  batch = {k: np.asarray(v, np.int32) for k, v in _PACKED.items()}
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 12, 50)).astype(np.float32)
  targets = np.asarray(_TARGETS)
  hit = np.arange(24).reshape(2, 12) % 2 == 0  # Correct at even positions.
  peak = np.where(hit, targets, (targets + 1) % 50)
  np.put_along_axis(logits, peak[..., None], 8.0, axis=-1)
  nll, correct, weights = steps.next_token_losses(
      jnp.asarray(logits), jnp.asarray(batch['inputs']), jnp.asarray(batch['segment_ids']))
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  counted = np.asarray(_WEIGHTS) > 0
  np.testing.assert_allclose(np.where(counted, nll, 0), np.where(counted, want, 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.where(counted, correct, False), hit & counted)
  np.testing.assert_array_equal(weights, np.asarray(_WEIGHTS, np.float32))
