"""`data.mixture`: several sources read as one, each document drawn by weight.

Each entry is a dict of `config.data` fields that differ for that source (source,
path, tfds_name, tfds_data_dir, text_key, eval_split) plus its `weight`, e.g.

  config.data.mixture = (dict(source='folder', path='/data/web', weight=3.0),
                         dict(source='hf', path='/data/books', text_key='body', weight=1.0))

Training mixes the sources' shuffled, repeated splits with grain's `MapDataset.mix`:
document k of the stream is a pure function of k, so the iterator's position (saved in
every checkpoint) is the mixture's position too. Evaluation reads every source's eval
split in turn; a trained tokenizer and the unigram baseline see all train splits.
"""

import dataclasses
import hashlib
import json

import ml_collections

from xenith.errors import ConfigError

# The `config.data` fields an entry may set; `weight` is the entry's own.
FIELDS = ('source', 'path', 'tfds_name', 'tfds_data_dir', 'text_key', 'eval_split')


def entries(data_config) -> list[tuple[ml_collections.ConfigDict, float]]:
  """(the entry's own config.data, weight) per mixture entry; ConfigError on bad ones."""
  out = []
  for i, entry in enumerate(data_config.get('mixture', ()) or ()):
    fields = entry.to_dict() if hasattr(entry, 'to_dict') else dict(entry)
    unknown = sorted(set(fields) - set(FIELDS) - {'weight'})
    if unknown:
      raise ConfigError(f'data.mixture[{i}]', f'has unknown fields {unknown}; an entry '
                        f'sets {FIELDS} and weight')
    weight = fields.pop('weight', None)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
      raise ConfigError(f'data.mixture[{i}].weight', f'{weight!r} must be a number > 0')
    own = ml_collections.ConfigDict(
        {k: v for k, v in data_config.to_dict().items() if k != 'mixture'})
    own.update(fields)  # Fields the entry leaves out are config.data's.
    if own.source == 'passkey':
      raise ConfigError(f'data.mixture[{i}].source', "'passkey' cannot be mixed")
    out.append((own, float(weight)))
  return out


class Concat:
  """Random access to several splits one after another."""

  def __init__(self, splits):
    self._splits = list(splits)
    self._starts = [0]
    for s in self._splits:
      self._starts.append(self._starts[-1] + len(s))

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, i: int):
    i = int(i)
    for split, start, stop in zip(self._splits, self._starts, self._starts[1:]):
      if i < stop:
        return split[i - start]
    raise IndexError(i)


def combine(parts: list, weights: list[float]):
  """One PreparedData of all parts: train and validation concatenated (for the
  tokenizer, the baseline and evaluation); the fingerprint covers each part's and its
  weight."""
  key = json.dumps([[p.fingerprint, w] for p, w in zip(parts, weights)])
  stats = {}
  for p in parts:
    for k, v in p.stats.items():
      stats[k] = stats.get(k, 0) + v
  # A PreparedData (text_dataset.py; not imported: config validation imports this
  # module, and must not need TFDS).
  return dataclasses.replace(
      parts[0], fingerprint=f'mix-{hashlib.sha256(key.encode()).hexdigest()[:16]}',
      train=Concat(p.train for p in parts), validation=Concat(p.validation for p in parts),
      stats=stats, languages=tuple(sorted({lang for p in parts for lang in p.languages})))
