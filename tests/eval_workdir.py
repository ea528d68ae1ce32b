"""One tiny trained language-model workdir, shared by the evaluation tests (trained once
per test session, in-process on conftest's 8 CPU devices)."""

import atexit
import functools
import shutil
import tempfile

from experiments import default

NUM_STEPS = 4  # Checkpoints at steps 2 and 4.


def config():
  """The tiny Shakespeare config the workdir is trained with (passkey lengths on)."""
  c = default.get_config('size=tiny')
  c.num_train_steps = NUM_STEPS
  c.optimizer.warmup_steps = 1
  c.optimizer.learning_rate = 3e-3
  c.log_every_steps = 2
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 5
  c.num_eval_batches = 1
  c.passkey.lengths = (128,)
  c.passkey.num_examples = 2
  c.passkey.batch_size = 8  # conftest's 8 devices.
  return c


@functools.cache
def trained() -> tuple[str, dict]:
  """(workdir, training's final metrics)."""
  from xenith.train import loop  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix='xenith_eval_')
  atexit.register(shutil.rmtree, workdir, True)
  return workdir, loop.train_and_evaluate(config(), workdir)
