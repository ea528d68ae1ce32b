"""config.data.source='passkey': an endless stream of passkey retrieval examples to train on.

Every training row is one example of `xenith/passkey.py` (BOS, filler with the passkey line
at a random depth, the question, the answer) of exactly `config.max_seq_len` tokens: no
packing across examples, segment ids all 1, positions 0..T-1. The loss covers every token;
the filler and the second copy of the digits are predictable from nearby text, the answer
only from the first copy of the digits.

Seeds: train step k of process p draws its examples with
`passkey.make_examples(seed=TRAIN_SEED_BASE + config.seed * 2**32 + k * processes + p)`,
validation batch i (the same in every process) with `VALIDATION_SEED_BASE + ...`, so the
streams never overlap each other nor the in-loop passkey evaluation (`config.passkey.seed`,
a small number). The iterator's state is the next step number.

Tokenizer: 'train' trains a BPE SentencePiece model (the pipeline's own options: one token
per digit) on the filler sentences, the question and passkey lines with random digits,
cached per vocabulary size; 'mixtral' or a .model path are loaded as usual.
"""

import dataclasses
import pathlib
from typing import Any, Iterator

import numpy as np

from xenith import atomic_files
from xenith.data import cache as cache_lib
from xenith.data import passkey_examples as passkey
from xenith.data import tokenizer as tokenizer_lib
from xenith.errors import ConfigError

TRAIN_SEED_BASE = 2**40
VALIDATION_SEED_BASE = 2**41
# Validation rows (in eval_batches' order); eval takes config.num_eval_batches of them.
VALIDATION_ROWS = 256
FINGERPRINT = 'passkey-v1'
# Bump when the tokenizer corpus below changes: it names the cached model.
TOKENIZER_VERSION = 1


def tokenizer_corpus(num_lines: int = 2000) -> list[str]:
  """The text the 'train' tokenizer learns: filler, question and passkey lines."""
  rng = np.random.default_rng(0)
  filler = ' '.join(passkey.FILLER)
  texts = [filler, passkey.QUESTION]
  for _ in range(num_lines):
    key = str(int(rng.integers(10**4, 10**6)))
    texts.append(f'{filler} {passkey.passkey_line(key)} {filler} {passkey.QUESTION} {key}')
  return texts


def load_tokenizer(config, cache: pathlib.Path) -> tokenizer_lib.Tokenizer:
  spec, vocab_size = config.data.tokenizer, config.model.vocab_size
  if spec != 'train':
    return tokenizer_lib.load_tokenizer(spec, vocab_size=vocab_size, cache=cache)
  path = (cache / 'tokenizers' /
          f'{FINGERPRINT}-spm{vocab_size}-v{tokenizer_lib.TRAINING_VERSION}.{TOKENIZER_VERSION}'
          '.model')
  if not path.exists():
    with cache_lib.file_lock(cache, path.stem):
      if not path.exists():
        atomic_files.write_bytes(path, tokenizer_lib._train(  # pylint: disable=protected-access
            tokenizer_corpus(), vocab_size))
  return tokenizer_lib.load_tokenizer(str(path), vocab_size=vocab_size, cache=cache)


def make_rows(tokenizer, seq_len: int, num_rows: int, seed: int, digits: int) -> dict[str, np.ndarray]:
  """{'inputs', 'segment_ids', 'positions'}: int32 [num_rows, seq_len], one example a row."""
  try:
    examples = passkey.make_examples(tokenizer, seq_len, num_rows, seed=seed, digits=digits)
  except ConfigError as e:
    raise ConfigError('max_seq_len', f"{seq_len} is too short for data.source='passkey' "
                      f'({e})') from None
  inputs = np.stack([e.tokens for e in examples]).astype(np.int32)
  return {'inputs': inputs,
          'segment_ids': np.ones_like(inputs),
          'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), inputs.shape).copy()}


class PasskeyIterator:
  """Train batches of one process; `get_state()` / `set_state()`: {'step': next step}."""

  def __init__(self, stream: 'PasskeyTrain'):
    self._stream = stream
    self._step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    s = self._stream
    # The whole global batch from one seed, then this process's rows: the same data
    # however many processes feed it.
    seed = TRAIN_SEED_BASE + s.seed * 2**32 + self._step
    self._step += 1
    rows = make_rows(s.tokenizer, s.seq_len, s.batch_size * s.process_count, seed,
                     s.digits)
    first = s.process_index * s.batch_size
    return {k: v[first:first + s.batch_size] for k, v in rows.items()}

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    self._step = int(state['step'])


@dataclasses.dataclass(frozen=True)
class PasskeyTrain:
  """`iter()` gives a fresh `PasskeyIterator` at step 0."""
  tokenizer: Any
  seq_len: int
  batch_size: int
  seed: int
  digits: int
  process_index: int = 0
  process_count: int = 1

  def __iter__(self) -> PasskeyIterator:
    return PasskeyIterator(self)


@dataclasses.dataclass(frozen=True)
class ValidationRows:
  """A finite, re-iterable sequence of row dicts (what `Datasets.eval_batches` cuts)."""
  tokenizer: Any
  seq_len: int
  num_rows: int
  seed: int
  digits: int
  rows_per_seed: int = 64

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for i, start in enumerate(range(0, self.num_rows, self.rows_per_seed)):
      n = min(self.rows_per_seed, self.num_rows - start)
      rows = make_rows(self.tokenizer, self.seq_len, n,
                       VALIDATION_SEED_BASE + self.seed * 2**32 + i, self.digits)
      for j in range(n):
        yield {k: v[j] for k, v in rows.items()}


def unigram_loss(tokenizer, seq_len: int, digits: int, vocab_size: int) -> float:
  """Cross-entropy (nats per predicted token) of validation rows under train-row unigrams."""
  train = make_rows(tokenizer, seq_len, 64, TRAIN_SEED_BASE - 1, digits)['inputs']
  counts = np.bincount(train[:, 1:].ravel(), minlength=vocab_size) + 1.0
  logp = np.log(counts / counts.sum())
  rows = ValidationRows(tokenizer, seq_len, 64, 0, digits)
  targets = np.stack([r['inputs'][1:] for r in rows])
  return float(-logp[targets].mean())


def create_datasets(config, datasets_cls, *, process_index: int, process_count: int,
                    tokenizer: tokenizer_lib.Tokenizer | None = None):
  """`pipeline.Datasets` of the passkey stream (see the module doc); `tokenizer` None =
  the one the config names."""
  cache = cache_lib.cache_dir(config.data)
  tokenizer = tokenizer or load_tokenizer(config, cache)
  digits = config.passkey.digits if 'passkey' in config else 5
  batch_size = config.global_batch_size // process_count
  seq_len = config.max_seq_len
  return datasets_cls(
      tokenizer=tokenizer,
      train=PasskeyTrain(tokenizer, seq_len, batch_size, config.seed, digits,
                         process_index, process_count),
      unigram_loss=unigram_loss(tokenizer, seq_len, digits, tokenizer.vocab_size),
      stats={'documents': 0, 'skipped_empty_documents': 0, 'train_passages': 0,
             'validation_passages': VALIDATION_ROWS, 'train_tokens': 0,
             'validation_tokens': VALIDATION_ROWS * seq_len},
      fingerprint=FINGERPRINT,
      batch_size=batch_size,
      seq_len=seq_len,
      _validation_rows=ValidationRows(tokenizer, seq_len, VALIDATION_ROWS, config.seed, digits),
      _process_index=process_index,
      _process_count=process_count,
  )
