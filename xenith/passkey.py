"""Synthetic passkey retrieval: can the model find a number hidden in long filler text?

Each example is `length` tokens, built with the run's own tokenizer:

  BOS, filler ... "The pass key is 71432. Remember it. 71432 is the pass key." ... filler,
  "What is the pass key? The pass key is", " 71432"

The filler repeats "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again." (cut to fit exactly); the passkey line sits at a sentence boundary
at a depth drawn uniformly from [0, 1) of the filler. The passkey has `digits` random
digits (no leading zero). Everything is drawn from `np.random.default_rng([seed, length])`,
so a (seed, length) pair always gives the same examples.

Scoring is teacher-forced: the model reads the true prefix, and its greedy (argmax)
prediction at the position before each answer token is compared with that token. An
example is correct only if every answer token is predicted exactly (`accuracy`);
`digit_accuracy` is the share of answer tokens predicted right. The answer tokens are
whatever the tokenizer makes of the digits (a leading whitespace-only piece, such as
SentencePiece's '▁', belongs to the prompt). With one token per digit, as the 'train' and
'mixtral' tokenizers give, chance is 0.1 per digit and 10**-digits per example.

Only the hidden states at the answer positions meet the output head: the model runs
with `features_only=True`, so no [batch, length, vocab] logits are ever made.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xenith.config_validation import ConfigError

FILLER = ('The grass is green.', 'The sky is blue.', 'The sun is yellow.', 'Here we go.',
          'There and back again.')
QUESTION = 'What is the pass key? The pass key is'

# predict(tokens int32 [batch, length], positions int32 [batch, answer]) -> the argmax
# token ids int32 [batch, answer] at `positions` (numpy in, numpy out).
PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def passkey_line(passkey: str) -> str:
  return f'The pass key is {passkey}. Remember it. {passkey} is the pass key.'


@dataclasses.dataclass(frozen=True)
class Example:
  """One passkey example.

  Attributes:
    tokens: int32 [length]: BOS, filler with the passkey line, question, answer.
    answer_start: index of the first answer token; the answer is tokens[answer_start:].
    passkey: the digits.
    passkey_start: index of the passkey line's first token.
    depth: where the line sits in the filler: filler tokens before it / filler tokens.
  """
  tokens: np.ndarray
  answer_start: int
  passkey: str
  passkey_start: int
  depth: float

  @property
  def answer(self) -> np.ndarray:
    return self.tokens[self.answer_start:]


def _answer_tokens(tokenizer, passkey: str) -> tuple[list[int], list[int]]:
  """(prompt-side whitespace tokens, answer tokens) of the digits after the question."""
  ids = list(tokenizer.encode(passkey))
  lead = 0
  while lead < len(ids) - 1 and not tokenizer.decode(ids[lead:lead + 1]).strip():
    lead += 1
  return ids[:lead], ids[lead:]


def _filler(sentences: list[list[int]], num_tokens: int) -> tuple[list[int], list[int]]:
  """(`num_tokens` filler tokens, the sentence boundaries among them, 0 included)."""
  tokens, bounds = [], []
  i = 0
  while len(tokens) < num_tokens:
    bounds.append(len(tokens))
    tokens.extend(sentences[i % len(sentences)])
    i += 1
  return tokens[:num_tokens], bounds or [0]


def make_examples(tokenizer, length: int, num_examples: int, *, seed: int = 0,
                  digits: int = 5, filler: Sequence[str] = FILLER) -> list[Example]:
  """`num_examples` passkey examples of exactly `length` tokens (see the module doc).

  Args:
    tokenizer: the run's tokenizer (`xenith.data.tokenizer.Tokenizer`, or anything with
      `encode`, `decode` and `bos_id`).
    length: tokens per example, BOS and answer included.
    num_examples: how many.
    seed: with `length`, determines the passkeys and depths.
    digits: digits per passkey.
    filler: filler sentences, repeated in order.

  Raises:
    ConfigError (config.passkey.lengths): `length` cannot hold BOS, the passkey line, the
      question and the answer.
  """
  rng = np.random.default_rng([seed, length])
  sentences = [list(tokenizer.encode(s)) for s in filler]
  question = list(tokenizer.encode(QUESTION))
  examples = []
  for _ in range(num_examples):
    depth = float(rng.random())
    passkey = str(int(rng.integers(10**(digits - 1), 10**digits)))
    line = list(tokenizer.encode(passkey_line(passkey)))
    lead, answer = _answer_tokens(tokenizer, passkey)
    prompt_end = question + lead
    num_filler = length - 1 - len(line) - len(prompt_end) - len(answer)
    if num_filler < 0:
      raise ConfigError('passkey.lengths', f'{length} is shorter than the {length - num_filler} '
                        'tokens that BOS, the passkey line, the question and the answer '
                        'take with this tokenizer')
    tokens, bounds = _filler(sentences, num_filler)
    # The last sentence boundary at or before the drawn depth.
    insert = max(b for b in bounds if b <= depth * num_filler)
    ids = [tokenizer.bos_id, *tokens[:insert], *line, *tokens[insert:], *prompt_end,
           *answer]
    assert len(ids) == length, (len(ids), length)
    examples.append(Example(
        tokens=np.asarray(ids, np.int32), answer_start=length - len(answer),
        passkey=passkey, passkey_start=1 + insert,
        depth=insert / num_filler if num_filler else 0.0))
  return examples


def make_eval_set(tokenizer, lengths: Sequence[int], num_examples: int, *, seed: int = 0,
                  digits: int = 5) -> dict[int, list[Example]]:
  """{length: examples} for each length (raises ConfigError for a too-short one)."""
  return {length: make_examples(tokenizer, length, num_examples, seed=seed, digits=digits)
          for length in lengths}


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
