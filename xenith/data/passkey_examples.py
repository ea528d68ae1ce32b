"""Synthetic passkey retrieval: can the model find a number hidden in long filler text?

Each example is `length` tokens, built with the run's own tokenizer:

  BOS, filler ... "The pass key is 71432. Remember it. 71432 is the pass key." ... filler,
  "What is the pass key? The pass key is", " 71432"

The filler repeats "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again." (cut to fit exactly); the passkey line sits at a sentence boundary
at a depth drawn uniformly from [0, 1) of the filler. The passkey has `digits` random
digits (no leading zero). Everything is drawn from `np.random.default_rng([seed, length])`,
so a (seed, length) pair always gives the same examples.

Scored by `xenith/eval/passkey.py`; trained on by `passkey_source.py`
(config.data.source='passkey').
"""

import dataclasses
from typing import Sequence

import numpy as np

from xenith.errors import ConfigError

FILLER = ('The grass is green.', 'The sky is blue.', 'The sun is yellow.', 'Here we go.',
          'There and back again.')
QUESTION = 'What is the pass key? The pass key is'

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
