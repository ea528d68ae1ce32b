"""Passkey scores of a trained `experiments/passkey_memory.py` run, near vs far.

  .venv/bin/python bench/passkey_reach.py runs/pk_mem 1     # memory=1's workdir
  .venv/bin/python bench/passkey_reach.py runs/pk_nomem 0

'far': the passkey line ends more than num_layers * CHUNK tokens before the first answer
token. Then neither model can reach it locally: the sliding windows of the memory=0 model
stack to a receptive field of num_layers * CHUNK tokens, and a memory=1 position sees
only its own chunk; only memory can bring it. 'near': the rest. Uses the in-loop
evaluation's examples (config.passkey.seed). Prints JSON.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import passkey_memory  # pylint: disable=wrong-import-position
from xenith.train import checkpointing  # pylint: disable=wrong-import-position
from xenith.data import passkey_examples  # pylint: disable=wrong-import-position
from xenith.data import pipeline  # pylint: disable=wrong-import-position
from xenith.eval import passkey  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('memory', choices=('0', '1'))
  parser.add_argument('--lengths', default='256,512,1024')
  parser.add_argument('--num_examples', type=int, default=100)
  args = parser.parse_args()
  config = passkey_memory.get_config(f'memory={args.memory}')
  reach = config.model.num_layers * passkey_memory.CHUNK  # The windows' receptive field.
  tokenizer = pipeline.load_tokenizer(config)
  model, params = checkpointing.load_model(config.model, args.workdir)
  predict = jax.jit(passkey.make_predict_fn(model))
  out = {}
  for length in map(int, args.lengths.split(',')):
    examples = passkey_examples.make_examples(
        tokenizer, length, args.num_examples, seed=config.passkey.seed,
        digits=config.passkey.digits)
    scores = passkey.evaluate_by_reach(lambda t, p: predict(params, t, p), examples,
                                       tokenizer, reach, batch_size=20)
    out.update({f'{name}_{length}': r for name, r in scores.items()})
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
