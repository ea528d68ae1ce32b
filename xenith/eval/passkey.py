"""Passkey retrieval scoring: can the model find a number hidden in long filler text?

The examples are `xenith/data/passkey_examples.py`'s. Scoring is teacher-forced: the
model reads the true prefix, and its greedy (argmax) prediction at the position before
each answer token is compared with that token. An example is correct only if every answer token is predicted exactly (`accuracy`);
`digit_accuracy` is the share of answer tokens predicted right. The answer tokens are
whatever the tokenizer makes of the digits (a leading whitespace-only piece, such as
SentencePiece's '▁', belongs to the prompt). With one token per digit, as the 'train' and
'mixtral' tokenizers give, chance is 0.1 per digit and 10**-digits per example.

Only the hidden states at the answer positions meet the output head: the model runs
with `features_only=True`, so no [batch, length, vocab] logits are ever made.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xenith.data import passkey_examples
from xenith.data.passkey_examples import Example

# predict(tokens int32 [batch, length], positions int32 [batch, answer]) -> the argmax
# token ids int32 [batch, answer] at `positions` (numpy in, numpy out).
PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def predict_answers(hidden: jax.Array, head: jax.Array, positions: jax.Array) -> jax.Array:
  """Argmax token at `positions`: hidden [b, T, E], head [E, V], positions [b, A] -> [b, A].

  Only the [b, A] rows of hidden meet the head (float32 logits [b, A, V]).
  """
  rows = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
  logits = jnp.einsum('bae,ev->bav', rows.astype(jnp.float32), head.astype(jnp.float32))
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def make_predict_fn(model):
  """predict(params, tokens [b, T], positions [b, A]) -> argmax ids [b, A]; jit it.

  `model` is a `Decoder` (dense, MoE or LoRA); each row is one document at positions
  0..T-1, inference mode.
  """

  def predict(params, tokens, positions):
    hidden, head = model.apply({'params': params}, tokens, features_only=True,
                               method='forward').features
    return predict_answers(hidden, head, positions)

  return predict


def _batch(examples: list[Example], answer_len: int):
  """(tokens [n, T], positions [n, A], targets [n, A], mask [n, A]) of equal-length examples."""
  n = len(examples)
  tokens = np.stack([e.tokens for e in examples])
  positions = np.zeros((n, answer_len), np.int32)
  targets = np.zeros((n, answer_len), np.int32)
  mask = np.zeros((n, answer_len), bool)
  for i, e in enumerate(examples):
    a = len(e.answer)
    # Position t predicts token t + 1.
    positions[i, :a] = np.arange(e.answer_start - 1, e.answer_start - 1 + a)
    positions[i, a:] = positions[i, 0]  # Padding: scored nowhere.
    targets[i, :a] = e.answer
    mask[i, :a] = True
  return tokens, positions, targets, mask


def score(predictions: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict[str, float]:
  """Exact-match and per-token accuracy of predicted answers.

  predictions, targets: [n, A] token ids; mask: [n, A], True on real answer tokens.
  Returns {'accuracy': share of rows with every answer token right,
           'digit_accuracy': share of answer tokens right}.
  """
  right = (np.asarray(predictions) == np.asarray(targets)) | ~mask
  return {'accuracy': float(right.all(axis=1).mean()),
          'digit_accuracy': float((right & mask).sum() / max(mask.sum(), 1))}


def evaluate_length(predict: PredictFn, examples: list[Example], batch_size: int = 1,
                    row_multiple: int = 1) -> dict[str, float]:
  """`score` of `predict` on examples of one length, `batch_size` rows per call.

  Each call gets a multiple of `row_multiple` rows (e.g. the batch parallelism of the
  mesh): a short batch is padded with copies of its last example, scored nowhere.
  """
  rows = -(-max(batch_size, 1) // row_multiple) * row_multiple
  answer_len = max(len(e.answer) for e in examples)
  tokens, positions, targets, mask = _batch(examples, answer_len)
  predictions = []
  for start in range(0, len(examples), rows):
    stop = min(start + rows, len(examples))
    pad = rows - (stop - start)
    take = np.r_[np.arange(start, stop), np.full(pad, stop - 1)]
    predictions.append(np.asarray(predict(tokens[take], positions[take]))[:stop - start])
  return score(np.concatenate(predictions), targets, mask)


def evaluate(predict: PredictFn, eval_set: dict[int, list[Example]], batch_size: int = 1,
             row_multiple: int = 1) -> dict[str, float]:
  """TensorBoard scalars of every length.

  Returns {'passkey/accuracy_<length>', 'passkey/digit_accuracy_<length>', ...,
  'passkey/mean_accuracy', 'passkey/mean_digit_accuracy'} (means over lengths).
  """
  out = {}
  for length, examples in eval_set.items():
    result = evaluate_length(predict, examples, batch_size, row_multiple)
    out[f'passkey/accuracy_{length}'] = result['accuracy']
    out[f'passkey/digit_accuracy_{length}'] = result['digit_accuracy']
  out['passkey/mean_accuracy'] = float(np.mean(
      [out[f'passkey/accuracy_{n}'] for n in eval_set]))
  out['passkey/mean_digit_accuracy'] = float(np.mean(
      [out[f'passkey/digit_accuracy_{n}'] for n in eval_set]))
  return out


def evaluate_by_reach(predict: PredictFn, examples: list[Example], tokenizer, reach: int,
                      batch_size: int = 1) -> dict[str, dict[str, float]]:
  """Scores of `examples` split by whether the passkey is within local reach.

  'far': the passkey line ends more than `reach` tokens before the first answer token
  (e.g. the receptive field of stacked sliding windows, or one memory chunk), so only
  something that carries information further (memory) can bring it; 'near': the rest.
  Returns {'near' / 'far': {'n': examples, 'accuracy', 'digit_accuracy'}} for the
  non-empty groups.
  """
  def far(e: Example) -> bool:
    line_end = e.passkey_start + len(tokenizer.encode(passkey_examples.passkey_line(
        e.passkey)))
    return line_end <= e.answer_start - reach

  out = {}
  for name, want_far in (('near', False), ('far', True)):
    subset = [e for e in examples if far(e) == want_far]
    if subset:
      out[name] = dict(n=len(subset), **evaluate_length(predict, subset, batch_size))
  return out
