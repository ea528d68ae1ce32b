"""Language adapters (xenith/model/language_adapters.py): a new adapter is the base model,
each token gets its language's adapter (NumPy reference), gradients reach only that
adapter, a frozen base stays put, packed mixed-language rows equal each document alone;
the data pipeline's language ids; the train loop with adapters."""

import functools
import json
import os
import pathlib
import random

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import default
from experiments import moe as moe_experiment
from xenith.config_validation import ConfigError, validate
from xenith.data import documents
from xenith.data import pipeline
from xenith.errors import DataError
from xenith.model import language_adapters
from xenith.model import lora
from xenith.model.build import make_model
from xenith.sizing import describe
from xenith.train import optimizer
from xenith.train.steps import make_loss_fn, make_train_step
from xenith.train.train_state import init_train_state

VOCAB = 64
LANGUAGES = ('hin', 'eng', 'mix')
BOTTLENECK = 8


def _key(seed):
  return jax.random.key(seed, impl='rbg')  # Faster init compiles on CPU.


def _config(scan_layers=False, with_moe=False, num_layers=2, languages=LANGUAGES):
  """Tiny config (embed 32) with language adapters on `languages`."""
  config = default.get_config('size=tiny')
  config.global_batch_size = 4
  config.max_seq_len = 16
  config.optimizer.warmup_steps = 0
  config.model.update(vocab_size=VOCAB, embed_dim=32, num_heads=2, num_kv_heads=1,
                      head_dim=16, mlp_dim=64, num_layers=num_layers, scan_layers=scan_layers)
  config.model.language_adapters.languages = languages
  config.model.language_adapters.bottleneck_dim = BOTTLENECK
  if with_moe:  # block_1 is MoE.
    config.model.moe.update(moe_experiment.MOE_SIZES['tiny'], expert_mlp_dim=32)
  return config


def _plain(config):
  plain = config.copy_and_resolve_references()
  plain.model.language_adapters.languages = ()
  return plain


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(model.apply, static_argnames=('deterministic', 'method', 'mutable',
                                               'capture_intermediates'))


def _init(model, seed=0):
  return nn.unbox(jax.jit(model.init)(_key(seed), jnp.zeros((1, 16), jnp.int32)))['params']


def _flat(params):
  return traverse_util.flatten_dict(params, sep='/')


def _is_adapter(name):
  return name.endswith(lora.LANGUAGE_ADAPTER_PARAMS)


def _with_base(params, base):
  """`params` with every base param replaced by `base`'s (same names)."""
  flat = _flat(params)
  assert set(flat) - {k for k in flat if _is_adapter(k)} == set(_flat(base))
  flat.update(_flat(base))
  return traverse_util.unflatten_dict(flat, sep='/')


def _random_up(params, seed=3):
  """`params` with random `up` (down is random from init): adapters that do something."""
  flat = _flat(params)
  for i, (name, x) in enumerate(sorted(flat.items())):
    if name.endswith(language_adapters.UP):
      flat[name] = 0.3 * jax.random.normal(jax.random.key(seed + i), x.shape)
  return traverse_util.unflatten_dict(flat, sep='/')


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 1, VOCAB, jnp.int32)


CASES = [(False, False), (True, True)]  # Unscanned dense; scanned stacks with MoE.


def _rows(tokens, lengths):
  """Model inputs for rows of documents of `lengths` (in order, then padding)."""
  segments, positions = [], []
  for row in lengths:
    pad = tokens.shape[1] - sum(row)
    segments.append(sum(([i + 1] * n for i, n in enumerate(row)), []) + [0] * pad)
    positions.append(sum((list(range(n)) for n in row), []) + [0] * pad)
  return dict(segment_ids=jnp.asarray(segments, jnp.int32),
              positions=jnp.asarray(positions, jnp.int32))


@pytest.mark.parametrize('scan_layers,with_moe', CASES)
def test_new_adapters_are_the_base_and_packed_languages_equal_each_document_alone(
    scan_layers, with_moe):
  config = _config(scan_layers, with_moe)
  model, plain_model = make_model(config.model), make_model(_plain(config).model)
  base = _init(plain_model)
  params = _with_base(_init(model, seed=1), base)
  flat = _flat(params)
  adapters = {k: x.shape for k, x in flat.items() if _is_adapter(k)}
  # One down [L, embed, b] and up [L, b, embed] per layer (a scanned stack in front).
  assert sum(np.prod(s) for s in adapters.values()) == 2 * 2 * 3 * 32 * BOTTLENECK
  assert any('/moe/' in k for k in flat) == with_moe
  assert all(not flat[k].any() for k in adapters if k.endswith(language_adapters.UP))

  # Packed rows of two documents each (7 and 9 tokens) in different languages: 'hin' then
  # 'eng', 'mix' then none, and the other way round.
  first, second = 7, 9
  tokens = _tokens((4, first + second), seed=7)
  ids = [(1, 2), (3, 0), (2, 1), (0, 3)]
  languages = jnp.asarray([[a] * first + [b] * second for a, b in ids], jnp.int32)
  packed = _rows(tokens, [(first, second)] * 4)
  # A new adapter is the base model, whatever the languages (or none given).
  want = _apply(plain_model)({'params': base}, tokens, **packed)
  np.testing.assert_array_equal(
      _apply(model)({'params': params}, tokens, languages=languages, **packed), want)
  np.testing.assert_array_equal(_apply(model)({'params': params}, tokens, **packed), want)

  # Trained adapters (random up): each document alone in a row, with its language.
  params = _random_up(params)
  got = _apply(model)({'params': params}, tokens, languages=languages, **packed)
  assert np.abs(got - want).max() > 1e-2  # The adapters do something.
  for part, (start, length) in enumerate(((0, first), (first, second))):
    alone_tokens = jnp.zeros_like(tokens).at[:, :length].set(tokens[:, start:start + length])
    alone_languages = jnp.asarray([[row[part]] * 16 for row in ids], jnp.int32)
    alone = _apply(model)({'params': params}, alone_tokens, languages=alone_languages,
                          **_rows(tokens, [(length,)] * 4))
    np.testing.assert_allclose(got[:, start:start + length], alone[:, :length],
                               rtol=1e-5, atol=1e-5)
    for row, pair in enumerate(ids):  # Language 0 tokens are the base model's.
      if pair[part] == 0:
        np.testing.assert_allclose(got[row, start:start + length],
                                   want[row, start:start + length], rtol=1e-5, atol=1e-5)
  # The language matters: the documents as 'eng' everywhere give other logits.
  as_eng = _apply(model)({'params': params}, tokens, languages=jnp.full_like(languages, 2),
                         **packed)
  assert np.abs(as_eng[0, :first] - got[0, :first]).max() > 1e-2


def test_one_layer_matches_a_numpy_reference():
  """In a one-layer model the adapter takes the MLP branch h and gives h + relu(h @ down_l)
  @ up_l for a token of language l (h for l = 0), which is what joins the residual."""
  config = _config(num_layers=1)
  model = make_model(config.model)
  params = _random_up(_init(model))
  tokens = _tokens((2, 16), seed=4)
  languages = jnp.asarray(np.random.default_rng(1).integers(0, 4, (2, 16)), jnp.int32)
  _, state = _apply(model)({'params': params}, tokens, languages=languages,
                           capture_intermediates=True, mutable=('intermediates',))
  seen = state['intermediates']
  f64 = lambda a: np.asarray(a, np.float64)
  block = seen['block_0']
  h = f64(block['mlp']['__call__'][0])  # [batch, seq, embed]
  down = f64(params['block_0']['language_adapter'][language_adapters.DOWN])  # [L, e, b]
  up = f64(params['block_0']['language_adapter'][language_adapters.UP])  # [L, b, e]
  want = h.copy()
  ids = np.asarray(languages)
  for b, s in np.ndindex(ids.shape):
    if ids[b, s]:
      l = ids[b, s] - 1
      want[b, s] += np.maximum(h[b, s] @ down[l], 0) @ up[l]
  got = f64(block['language_adapter']['__call__'][0])
  assert np.abs(got - h).max() > 1e-2  # The adapters do something.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The block's output is its input plus the attention branch plus the adapted MLP branch.
  x = f64(seen['embed']['__call__'][0])
  np.testing.assert_allclose(f64(block['__call__'][0][0]),
                             x + f64(block['attn']['__call__'][0]) + want,
                             rtol=1e-5, atol=1e-5)


def _batch(tokens, languages):
  """One document per row, the whole row."""
  rows, length = tokens.shape
  return {'inputs': tokens, 'segment_ids': jnp.ones((rows, length), jnp.int32),
          'positions': jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
          'languages': jnp.asarray(languages, jnp.int32)}


def test_gradients_reach_only_the_examples_language():
  config = _config(scan_layers=True, with_moe=True)
  model = make_model(config.model)
  params = _random_up(_init(model))  # Else down's gradient is 0 through up = 0.
  grad_fn = jax.jit(jax.grad(make_loss_fn(model)))
  tokens = _tokens((1, 16), seed=5)
  for language in range(len(LANGUAGES) + 1):
    grads = _flat(jax.device_get(
        grad_fn(params, _batch(tokens, jnp.full((1, 16), language)), _key(0))))
    for name, g in grads.items():
      if not _is_adapter(name):
        continue
      lead = g.ndim - 3  # The scan's layer axis.
      for other in range(len(LANGUAGES)):  # Adapter `other` is language id other + 1.
        reached = np.abs(np.take(g, other, axis=lead)).max() > 0
        assert reached == (other + 1 == language), (name, language, other)


def test_train_only_adapters_freezes_the_base():
  config = _config(num_layers=1)
  config.model.language_adapters.train_only_adapters = True
  model, tx = make_model(config.model), optimizer.create_optimizer(config)
  state = init_train_state(model, tx, config.max_seq_len, _key(0), None)
  params = _flat(state.params)
  adapter_size = sum(x.size for k, x in params.items() if _is_adapter(k))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * adapter_size  # No state for the base.
  assert describe.describe(config, 1)['trained_params'] == adapter_size
  batch = _batch(_tokens((4, 16), seed=6), np.repeat([[1], [2], [3], [0]], 16, axis=1))
  train_step = jax.jit(make_train_step(model, tx, skip_nonfinite=False))
  for i in range(2):
    state, metrics = train_step(state, batch, _key(i))
  assert np.isfinite(metrics.compute()['loss'])
  after = _flat(state.params)
  for name, before in params.items():
    if _is_adapter(name):
      assert np.abs(after[name] - before).max() > 0, name
    else:
      np.testing.assert_array_equal(after[name], before, err_msg=name)


@pytest.mark.parametrize('field,value,message', [
    ('languages', ('hin', 'hin'), 'twice'),
    ('languages', ('hin', ''), 'tuple of language names'),
    ('bottleneck_dim', 0, 'positive int'),
])
def test_invalid_fields_are_named(field, value, message):
  config = _config()
  config.model.language_adapters[field] = value
  with pytest.raises(ConfigError, match=f'model.language_adapters.{field}: .*{message}'):
    validate(config, num_devices=1)


def test_memory_decoder_and_disagreeing_freezing_are_rejected():
  validate(_config(), num_devices=1)
  config = _config()
  config.model.memory.chunk_size = 8
  with pytest.raises(ConfigError, match='languages: language adapters do not support the '
                     'memory decoder'):
    validate(config, num_devices=1)
  config = _config()
  config.model.lora.rank = 2  # lora.train_only_adapters is True by default.
  with pytest.raises(ConfigError, match='train_only_adapters: False differs'):
    validate(config, num_devices=1)
  config.model.language_adapters.train_only_adapters = True
  validate(config, num_devices=1)


# The data pipeline.

_WORDS = {'hin': 'namaste dhanyavad accha bahut pyaar ghar khana pani'.split(),
          'eng': 'hello thanks good very love house food water'.split(),
          '': 'alpha beta gamma delta epsilon zeta eta theta'.split()}


def _write_corpus(root: pathlib.Path, languages=('hin', 'eng', '')) -> pathlib.Path:
  """.jsonl records in `languages` ('' = no "language" field; words of their own), and a
  .txt document (no language)."""
  rng = random.Random(0)
  root.mkdir(parents=True, exist_ok=True)
  records = []
  for i in range(45):
    language = languages[i % len(languages)]
    record = {'text': ' '.join(rng.choice(_WORDS[language]) for _ in range(rng.randint(5, 30)))}
    if language:
      record['language'] = language
    records.append(record)
  (root / 'docs.jsonl').write_text('\n'.join(json.dumps(r) for r in records) + '\n')
  (root / 'plain.txt').write_text(' '.join(rng.choice(_WORDS['']) for _ in range(60)))
  return root


def _data_config(root, cache, languages=LANGUAGES):
  config = _config(languages=languages)
  config.model.vocab_size = 300
  config.max_seq_len = 32
  config.global_batch_size = 4
  config.data.source = 'folder'
  config.data.path = str(root)
  config.data.cache_dir = str(cache)
  config.data.validation_fraction = 0.2
  return config


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return _write_corpus(tmp_path_factory.mktemp('corpus'))


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


def _check_languages(batch, tokenizer):
  """Every document piece's tokens carry the id of the language its words are from."""
  ids = {'': 0, **{name: i for i, name in enumerate(LANGUAGES, 1)}}
  by_word = {w: ids[language] for language, words in _WORDS.items() for w in words}
  seen = set()
  for row in range(batch['inputs'].shape[0]):
    segments, languages = batch['segment_ids'][row], batch['languages'][row]
    assert not languages[segments == 0].any()  # Padding: 0.
    for segment in set(segments[segments > 0].tolist()):
      mask = segments == segment
      words = tokenizer.decode([int(t) for t in batch['inputs'][row][mask]]).split()
      # Each document's words are from one language (a piece cut from the rest of its
      # document at a row's edge may hold only part of a word).
      want = {by_word[w] for w in words if w in by_word}
      assert len(want) <= 1, words
      if want:
        assert set(languages[mask].tolist()) == want, words
        seen |= want
      else:
        assert len(set(languages[mask].tolist())) == 1
  return seen


def test_batches_carry_each_documents_language(corpus, cache):
  ds = pipeline.create_datasets(_data_config(corpus, cache))
  it = iter(ds.train)
  seen = set()
  for _ in range(6):
    batch = next(it)
    assert set(batch) == {'inputs', 'segment_ids', 'positions', 'languages'}
    assert batch['languages'].dtype == np.int32
    seen |= _check_languages(batch, ds.tokenizer)
  assert seen == {0, 1, 2}  # 'hin', 'eng', and none (no field; the .txt file).
  for batch in ds.eval_batches():
    _check_languages(batch, ds.tokenizer)
  # A restored iterator continues with the same batches, languages included.
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  restored = iter(ds.train)
  restored.set_state(json.loads(json.dumps(state)))  # As Orbax stores it.
  for batch in want:
    got = next(restored)
    for k in batch:
      np.testing.assert_array_equal(got[k], batch[k], err_msg=k)
  # Without adapters the batches are as before: no languages.
  off = pipeline.create_datasets(_data_config(corpus, cache, languages=()))
  assert set(next(iter(off.train))) == {'inputs', 'segment_ids', 'positions'}


def test_unknown_language_fails_before_tokenizing(corpus, tmp_path):
  with pytest.raises(DataError, match=r"languages \['eng'\] that config.model."
                     r"language_adapters.languages=\('hin', 'mix'\) does not list"):
    pipeline.create_datasets(_data_config(corpus, tmp_path, languages=('hin', 'mix')))
  assert not list(tmp_path.rglob('*.model'))  # No tokenizer was trained.


def test_language_field_must_be_a_string(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"text": "hello", "language": 3}\n')
  with pytest.raises(DataError, match=r'a.jsonl:1: field "language" must be a string'):
    list(documents.read_folder(tmp_path))


@pytest.mark.slow
def test_train_loop_runs_with_adapters_on_a_frozen_base(corpus, cache, tmp_path):
  from xenith.train import loop as train  # pylint: disable=g-import-not-at-top
  config = _data_config(corpus, cache)
  config.model.language_adapters.train_only_adapters = True
  config.num_train_steps = 3
  config.global_batch_size = 8  # conftest's 8 CPU devices.
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.num_eval_batches = 1
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(config, workdir)
  assert final['step'] == 3
  assert np.isfinite(final['train/loss']) and np.isfinite(final['eval/loss'])
  saved = _flat(ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', '3', 'state'))['params'])
  ups = [k for k in saved if k.endswith(language_adapters.UP)]
  assert len(ups) == 2 and all(np.abs(saved[k]).max() > 0 for k in ups)  # They trained.
