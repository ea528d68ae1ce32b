"""A workdir pins what it was trained with (issue 12, item 2): a resume on changed data
stops with one line, the tokenizer is never retrained under a run, `--allow_changes`
lets an intended change through and is recorded, generate uses the pinned tokenizer."""

import json
import os
import subprocess
import sys

from experiments import default
from helpers import single_device_env
from test_data import VOCAB, write_corpus
from xenith.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, corpus, cache, steps, *flags):
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=experiments/default.py:size=tiny',
       f'--workdir={workdir}', '--config.data.source=folder', f'--config.data.path={corpus}',
       f'--config.data.cache_dir={cache}', f'--config.model.vocab_size={VOCAB}',
       '--config.data.validation_fraction=0.2', f'--config.num_train_steps={steps}',
       '--config.optimizer.warmup_steps=2', '--config.checkpoint_every_steps=5',
       '--config.eval_every_steps=5', '--config.num_eval_batches=1', *flags],
      cwd=ROOT, env=single_device_env(), capture_output=True, text=True, timeout=600,
      check=False)
  return result


def test_a_resume_on_changed_data_stops_unless_allowed(tmp_path):
  corpus, cache, workdir = tmp_path / 'corpus', tmp_path / 'cache', tmp_path / 'run'
  write_corpus(corpus)
  first = _main(workdir, corpus, cache, 5)
  assert first.returncode == 0, first.stderr[-3000:]
  record = json.loads((workdir / 'run.json').read_text())
  assert record['config']['model.vocab_size'] == VOCAB
  start = record['starts'][0]
  assert start['step'] == 0 and start['packages']['jax']
  assert 'git_commit' in start['code']
  pinned = (workdir / 'tokenizer.model').read_bytes()

  # The corpus changes: a resume (more steps, allowed) stops, naming the data.
  with open(corpus / 'play0.txt', 'a') as f:
    f.write('\n\nA new scene, never seen before: zounds, quoth the ghost.\n')
  stopped = _main(workdir, corpus, cache, 10, '--allow_changes=num_train_steps')
  assert stopped.returncode == 1
  last = stopped.stderr.strip().splitlines()[-1]
  assert last.startswith('WorkdirError: This workdir was trained with another setup; '
                         'changed: the data ('), last
  assert 'tokenizer' not in last  # Pinned: not retrained on the new corpus.
  assert last.endswith('--allow_changes=data.'), last
  # A config change is named too.
  stopped = _main(workdir, corpus, cache, 10)
  assert 'config.num_train_steps (5 -> 10)' in stopped.stderr.strip().splitlines()[-1]

  # Allowed: it resumes with the pinned tokenizer and records the change.
  resumed = _main(workdir, corpus, cache, 10, '--allow_changes=num_train_steps,data')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Restored checkpoint for step 5' in resumed.stderr
  record = json.loads((workdir / 'run.json').read_text())
  assert [s['allowed_changes'] for s in record['starts']] == [
      [], ['num_train_steps', 'data']]
  assert record['config']['num_train_steps'] == 10
  assert (workdir / 'tokenizer.model').read_bytes() == pinned

  # generate (and anything that loads a run's tokenizer) takes the pinned copy.
  config = default.get_config('size=tiny')
  config.data.source, config.data.path = 'folder', str(corpus)
  config.data.cache_dir, config.model.vocab_size = str(cache), VOCAB
  assert pipeline.load_tokenizer(config, str(workdir)).model_proto == pinned


def test_fields_added_since_the_record_count_as_their_defaults(tmp_path):
  """A record written before a config field existed: the field at its default is no
  change, at another value it is."""
  from xenith.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  from xenith.train import run_record  # pylint: disable=g-import-not-at-top
  config = default.get_config('size=tiny')
  record = run_record.RunRecord(str(tmp_path))
  flat = {k: v for k, v in run_record._flat(config).items()  # pylint: disable=protected-access
          if not k.startswith('classification.') and k != 'task'}
  record.record = {'config': flat}
  record.check_config(config, ())
  config.task = 'classification'
  try:
    record.check_config(config, ())
  except WorkdirError as e:
    assert "config.task ('lm' -> 'classification')" in str(e)
  else:
    raise AssertionError('a changed new field passed')

