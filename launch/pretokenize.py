r"""Tokenizes a text source once into a pre-tokenized corpus (data.source='tokens').

  python launch/pretokenize.py --config=experiments/default.py \
      --config.data.source=folder --config.data.path=/data/books \
      --config.data.tokenizer=/models/spm.model --out=/data/books_tokens

Writes `--out/train.array_record`, `--out/<data.eval_split>.array_record`,
`--out/metadata.json` and the tokenizer's files (xenith/data/pretokenized.py); train on
it with --config.data.source=tokens --config.data.path=<out> --config.data.tokenizer=<out>.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # Run as a script: make `xenith` and `experiments` importable.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

from xenith.data import tokenize_corpus
from xenith.errors import DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config naming the '
                                          'text source and tokenizer.')
_OUT = flags.DEFINE_string('out', None, 'The new corpus folder.')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv
  try:
    meta = tokenize_corpus.write(_CONFIG.value, _OUT.value)
  except DataError as e:
    sys.exit(f'DataError: {e}')
  print(f'Wrote {_OUT.value}: ' + ', '.join(
      f'{name} {s["documents"]} documents / {s["tokens"]} tokens'
      for name, s in meta['splits'].items()))


if __name__ == '__main__':
  app.run(main)
