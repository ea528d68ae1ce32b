"""Tokenizes a text source once into a pre-tokenized corpus (`data.source='tokens'`,
xenith/data/pretokenized.py); `python launch/pretokenize.py` runs it."""

from xenith.data import pipeline
from xenith.data import pretokenized
from xenith.errors import DataError


def write(config, out: str) -> dict:
  """Tokenizes the text source that `config.data` names (its train split and
  config.data.eval_split) into the new folder `out`, with the tokenizer it names; returns
  the metadata. Train on it with data.source='tokens', data.path=data.tokenizer=`out`."""
  if config.data.source in ('tokens', 'passkey') or config.data.get('mixture'):
    raise DataError(f"Pre-tokenizing reads one text source, not {config.data.source!r} "
                    'or a mixture.')
  return pretokenized.write_corpus(
      pipeline.text_data(config), pipeline.load_tokenizer(config), out,
      config.data.get('eval_split', 'validation'))
