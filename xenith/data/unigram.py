"""Token counts and the unigram baseline loss of a tokenized dataset.

The baseline is what a model that ignores context scores: the cross-entropy, in
nats per predicted token, of the validation split under the train split's unigram
distribution with add-one smoothing over the whole vocabulary,

  p(t) = (count_train(t) + 1) / (N_train + V),  loss = -mean_val log p(t).

Predicted tokens are those the trainer scores: each passage's tokens and its EOS
(BOS is given, never predicted). A model must beat this number to have learnt
anything beyond token frequencies.
"""

import json
import math
import pathlib

import numpy as np

from xenith import atomic_files
from xenith.data.tokenizer import Tokenizer

_CHUNK = 512  # Passages tokenized per call (bounds memory on large splits).


def count_tokens(split, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
  """Per-id counts [vocab_size] of predicted tokens, and the passages' token total.

  The token total excludes BOS/EOS.
  """
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  total = 0
  for start in range(0, len(split), _CHUNK):
    records = [split[i] for i in range(start, min(start + _CHUNK, len(split)))]
    # A pre-tokenized record (pretokenized.py) has its 'ids'; a text record is encoded.
    texts = [r['text'].decode() for r in records if 'ids' not in r]
    for ids in [r['ids'] for r in records if 'ids' in r] + tokenizer.encode_batch(texts):
      total += len(ids)
      counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    counts[tokenizer.eos_id] += len(records)
  return counts, total


def unigram_loss(train_counts: np.ndarray, validation_counts: np.ndarray) -> float:
  """Add-one smoothed unigram cross-entropy (nats/token) of validation counts."""
  vocab = len(train_counts)
  log_p = np.log(train_counts + 1.0) - math.log(train_counts.sum() + vocab)
  return float(-(validation_counts * log_p).sum() / validation_counts.sum())


def token_stats(train, validation, tokenizer: Tokenizer, cache: pathlib.Path,
                fingerprint: str) -> dict[str, float]:
  """Token totals per split and the unigram loss, computed once and cached.

  Returns:
    {'train_tokens', 'validation_tokens' (passage tokens, no BOS/EOS),
     'unigram_loss' (nats per predicted token)}.
  """
  path = cache / 'stats' / f'{fingerprint}-{tokenizer.digest}.json'
  if path.exists():
    return json.loads(path.read_text())
  train_counts, train_tokens = count_tokens(train, tokenizer)
  val_counts, val_tokens = count_tokens(validation, tokenizer)
  stats = {
      'train_tokens': train_tokens,
      'validation_tokens': val_tokens,
      'unigram_loss': unigram_loss(train_counts, val_counts),
  }
  atomic_files.write_bytes(path, json.dumps(stats, indent=1).encode())
  return stats
