"""Observability (docs/observability.md): one tiny training run with every feature on,
read back by each tool's own reader.

- profile_steps: xprof (TensorBoard's profile plugin) converts the trace to its tools.
- sample_prompts: the text in the event files is the greedy continuation that plain
  full-sequence forward passes (no KV cache, no padding) give with the saved params.
- log_histograms_every_steps: one histogram per param leaf and per gradient leaf, whose
  bucket counts add up to the leaf's size and whose edges are the leaf's min and max.
- loggers: metrics.jsonl and the offline W&B run (its .wandb file decoded with wandb's
  protobuf records) hold the TensorBoard scalars.
"""

import collections
import glob
import json
import os
import random
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import event_files
from experiments import default
from xenith import config_validation
from xenith.errors import ConfigError
from xenith.model.build import make_model
from xenith.train import checkpointing
from xenith.train import loggers
from xenith.train import samples

NUM_STEPS = 4
EVAL_STEPS = (2, 4)
HISTOGRAM_STEPS = (2, 4)
# Of different lengths: the shorter one is left-padded in the samples' batch.
PROMPTS = ('the king', 'my lord doth love the sea and gold')
NEW_TOKENS = 6
WORDS = ('the king', 'a fair rose', 'doth', 'love', 'night', 'sweet', 'crown', 'and',
         'my lord', 'is', 'dead', 'thou', 'art', 'sea', 'gold')


def _config(corpus, cache):
  config = default.get_config('size=tiny')
  config.max_seq_len = 32
  config.global_batch_size = 8  # conftest's 8 CPU devices.
  config.data.source = 'folder'
  config.data.path = str(corpus)
  config.data.cache_dir = str(cache)
  config.data.validation_fraction = 0.2
  config.num_train_steps = NUM_STEPS
  config.optimizer.warmup_steps = 1
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = NUM_STEPS
  config.num_eval_batches = 1
  config.profile_steps = (3, 1)  # A step that compiles nothing: a small trace.
  config.sample_prompts = PROMPTS
  config.sample_new_tokens = NEW_TOKENS
  config.log_histograms_every_steps = 2
  config.loggers = ('tensorboard', 'jsonl', 'wandb')
  config.wandb.mode = 'offline'
  config.wandb.name = 'tiny'
  return config


@pytest.fixture(scope='module')
def final_params(run):
  """(model, params) of the run's last checkpoint (step 4), as generate loads them."""
  config, workdir = run
  model = make_model(config.model)
  # Shapes only (no init compile): the saved params are read into them.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32)))['params']
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      shapes)
  return model, checkpointing.load_params(workdir, like)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir) of a finished 4-step run with every feature on."""
  from xenith.train import loop  # pylint: disable=g-import-not-at-top
  corpus = tmp_path_factory.mktemp('corpus')
  rng = random.Random(0)
  (corpus / 'docs.txt').write_text('\n\n'.join(
      ' '.join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) for _ in range(120)))
  config = _config(corpus, tmp_path_factory.mktemp('cache'))
  config_validation.validate(config, num_devices=jax.device_count())
  workdir = str(tmp_path_factory.mktemp('run'))
  os.environ['WANDB_SILENT'] = 'true'
  loop.train_and_evaluate(config, workdir)
  return config, workdir


def _summaries(workdir, plugin):
  """{tag: {step: ndarray}} of the event files' values written by `plugin`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = collections.defaultdict(dict)
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == plugin:
          out[value.tag][event.step] = tf.make_ndarray(value.tensor)
  return dict(out)


@pytest.mark.slow
def test_profile_is_readable_by_xprof(run):
  from xprof.convert import raw_to_tool_data  # pylint: disable=g-import-not-at-top
  _, workdir = run
  # Where TensorBoard's profile plugin looks, with the workdir as its logdir.
  paths = glob.glob(os.path.join(workdir, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(paths) == 1, paths
  assert 'overview_page' in raw_to_tool_data.xspace_to_tool_names(paths)
  data, _ = raw_to_tool_data.xspace_to_tool_data(paths, 'trace_viewer', {})
  # The loop's step annotations: the one profiled step (3), not the others.
  steps = {e['args']['step_num'] for e in json.loads(data)['traceEvents']
           if str(e.get('name')).startswith('train ') and 'step_num' in e.get('args', {})}
  assert steps == {'3'}, steps


def _greedy_by_full_forward(model, params, tokens, n):
  """Greedy continuation by a forward pass over the whole sequence for each new token
  (no cache, no padding). The sequence sits in a fixed [1, len + n] row (one compile):
  a causal model's logits at t do not depend on the zeros after t."""
  tokens, width = list(tokens), len(tokens) + n
  apply = jax.jit(lambda x: model.apply({'params': params}, x, segment_ids=jnp.ones_like(x),
                                        positions=jnp.arange(width)[None]))
  for _ in range(n):
    row = np.zeros((1, width), np.int32)
    row[0, :len(tokens)] = tokens
    tokens.append(int(np.argmax(np.asarray(apply(row)[0, len(tokens) - 1]))))
  return tokens


@pytest.mark.slow
def test_samples_at_each_eval_are_greedy_continuations(run, final_params):
  from xenith.data import pipeline  # pylint: disable=g-import-not-at-top
  config, workdir = run
  texts = _summaries(workdir, 'text')
  assert sorted(texts) == [f'samples/{i}' for i in range(len(PROMPTS))]
  for tag in texts:
    assert sorted(texts[tag]) == list(EVAL_STEPS)
  tokenizer = pipeline.load_tokenizer(config, workdir)
  model, params = final_params
  for i, prompt in enumerate(PROMPTS):
    tokens = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
    want = tokenizer.decode(_greedy_by_full_forward(model, params, tokens, NEW_TOKENS)[1:])
    got = texts[f'samples/{i}'][NUM_STEPS].item().decode()
    assert got == want
    assert got.startswith(prompt) and len(got) > len(prompt)
  # The trained tiny model mostly repeats its last token, which hides the prompts'
  # padding; params scaled by 3 make every token of the prompt count.
  sharp = jax.tree.map(lambda x: 3 * x, params)
  got = samples.SampleWriter(config, model, tokenizer).generate(sharp)
  for i, prompt in enumerate(PROMPTS):
    tokens = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
    assert got[i] == _greedy_by_full_forward(model, sharp, tokens, NEW_TOKENS)[1:], prompt


@pytest.mark.slow
def test_histograms_of_params_and_grads(run, final_params):
  _, workdir = run
  histograms = _summaries(workdir, 'histograms')
  _, params = final_params
  leaves = {'/'.join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert set(histograms) == ({f'params/{k}' for k in leaves} | {f'grads/{k}' for k in leaves})
  for tag, by_step in histograms.items():
    assert sorted(by_step) == list(HISTOGRAM_STEPS), tag
    leaf = leaves[tag.split('/', 1)[1]]
    for buckets in by_step.values():  # [buckets, 3]: left edge, right edge, count.
      assert buckets.shape[1] == 3 and buckets[:, 2].sum() == leaf.size, tag
  for name, leaf in leaves.items():  # The params after step 4: edges are their range.
    buckets = histograms[f'params/{name}'][NUM_STEPS]
    np.testing.assert_allclose([buckets[0, 0], buckets[-1, 1]], [leaf.min(), leaf.max()],
                               rtol=1e-5, atol=1e-7)
  # Gradients, not params: their global norm is the logged train/grad_norm of the step
  # (bucket centres stand for the values, hence the tolerance).
  grad_norm = event_files.last_per_step(event_files.read_scalars(workdir)['train/grad_norm'])
  for step in HISTOGRAM_STEPS:
    square_sum = sum(float((b[:, 2] * ((b[:, 0] + b[:, 1]) / 2) ** 2).sum())
                     for tag, s in histograms.items() if tag.startswith('grads/')
                     for b in [s[step]])
    assert np.sqrt(square_sum) == pytest.approx(grad_norm[step], rel=0.25)


def _tb_scalars(workdir):
  """{step: {tag: value}} of the TensorBoard event files."""
  out = collections.defaultdict(dict)
  for tag, points in event_files.read_scalars(workdir).items():
    for step, value in points:
      out[step][tag] = value
  return dict(out)


@pytest.mark.slow
def test_jsonl_holds_the_tensorboard_scalars(run):
  _, workdir = run
  by_step = collections.defaultdict(dict)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      by_step[record.pop('step')].update(record)
  tb = _tb_scalars(workdir)
  assert sorted(by_step) == sorted(tb) == list(range(NUM_STEPS + 1))
  for step, scalars in tb.items():
    assert by_step[step].keys() == scalars.keys(), step
    np.testing.assert_allclose([by_step[step][k] for k in scalars], list(scalars.values()),
                               rtol=1e-6)


def _wandb_records(path):
  """The records of a .wandb file: W&B's LevelDB-style log (a header, then 32 KiB blocks
  of chunks with a 7-byte header: crc32c, length, type) of `Record` protobufs."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B', data[:7]
  block, header = 32768, 7
  pos, pending, records = 7, b'', []
  while pos + header <= len(data):
    if block - pos % block < header:  # A block's tail too short for a header: padding.
      pos += block - pos % block
      continue
    length, kind = struct.unpack('<HB', data[pos + 4:pos + header])
    if kind == 0 and length == 0:
      break
    chunk = data[pos + header:pos + header + length]
    pos += header + length
    pending += chunk
    if kind in (1, 4):  # FULL or LAST.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b''
    elif kind == 2:  # FIRST.
      pending = chunk
  return records


@pytest.mark.slow
def test_wandb_offline_run_holds_the_tensorboard_scalars(run):
  config, workdir = run
  runs = glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', 'run-*.wandb'))
  assert len(runs) == 1, runs
  with open(os.path.join(workdir, loggers.WANDB_ID_NAME)) as f:
    run_id = f.read().strip()
  assert runs[0].endswith(f'run-{run_id}.wandb')
  records = _wandb_records(runs[0])
  history = collections.defaultdict(dict)
  for record in records:
    if record.WhichOneof('record_type') == 'run':
      assert (record.run.run_id, record.run.project, record.run.display_name) == (
          run_id, config.wandb.project, 'tiny')
    if record.WhichOneof('record_type') == 'history':
      items = {'/'.join(i.nested_key) or i.key: json.loads(i.value_json)
               for i in record.history.item}
      history[items.pop('_step')].update(items)
  tb = _tb_scalars(workdir)
  assert sorted(history) == list(range(NUM_STEPS + 1))
  for step, scalars in tb.items():
    np.testing.assert_allclose([history[step][k] for k in scalars], list(scalars.values()),
                               rtol=1e-6, err_msg=str(step))


def test_jsonl_resume_drops_lines_past_the_restored_step(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  writer = loggers.JsonlWriter(path, initial_step=0)
  for step in range(5):
    writer.write_scalars(step, {'loss': float(step)})
  writer.close()
  writer = loggers.JsonlWriter(path, initial_step=2)  # Restored step 2: 3 and 4 redone.
  writer.write_scalars(3, {'loss': 30.0})
  writer.close()
  with open(path) as f:
    assert [json.loads(line) for line in f] == [
        {'step': s, 'loss': float(s)} for s in range(3)] + [{'step': 3, 'loss': 30.0}]
  loggers.JsonlWriter(path, initial_step=0).close()  # A new run starts it afresh.
  assert os.path.getsize(path) == 0


@pytest.mark.parametrize('field, value, message', [
    ('profile_steps', (0, 2), r'config.profile_steps: \(0, 2\) must be \(\) \(off\)'),
    ('profile_steps', (-1, 2), r'config.profile_steps: \(-1, 2\) must be'),
    ('profile_steps', (3, 5), r'config.profile_steps: \(3, 5\) goes past '
                              r'config.num_train_steps=4'),
    ('loggers', ('tensorboard', 'mlflow'), r"config.loggers: \('mlflow',\) are not loggers"),
    ('log_histograms_every_steps', -1, 'config.log_histograms_every_steps: -1 must be'),
    ('sample_prompts', ('',), r"config.sample_prompts: \('',\) must be a tuple"),
])
def test_bad_settings_are_one_line_config_errors(tmp_path, field, value, message):
  config = _config(tmp_path, tmp_path)
  config[field] = value
  with pytest.raises(ConfigError, match=message) as error:
    config_validation.validate(config, num_devices=8)
  assert '\n' not in str(error.value)
