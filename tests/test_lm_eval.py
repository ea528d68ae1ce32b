"""The lm-evaluation-harness adapter (xenith/eval/lm_eval_adapter.py) on the tiny trained
workdir: log-likelihoods against a NumPy log-softmax over the model's logits, rolling
windows against windows cut by hand, generation against Xenith's greedy `generate`, and
--mode=lm_eval offline on task YAMLs over local JSONL files the test writes."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

import eval_workdir
import event_files
from xenith import generate
from xenith.eval import lm_eval_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def lm():
  workdir, _ = eval_workdir.trained()
  return lm_eval_adapter.XenithLM.from_workdir(workdir, batch_size=4)


@functools.cache
def _apply(model):
  return jax.jit(lambda params, tokens: model.apply({'params': params}, tokens))


def _log_probs(lm, tokens):
  """NumPy log-softmax of the model's logits over one row of `tokens`: [len, vocab]. (The
  row is zero-padded to max_seq_len for one compile; causal attention ignores the rest.)"""
  row = np.zeros((1, lm.max_seq_len), np.int32)
  row[0, :len(tokens)] = tokens
  logits = np.asarray(_apply(lm.model)(lm.params, row), np.float64)[0, :len(tokens)]
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _continuation_log_prob(lm, context, continuation):
  """log p(continuation | context), both token lists, and whether each is the argmax."""
  logp = _log_probs(lm, context + continuation)
  start = len(context) - 1  # Position t predicts token t + 1.
  picked = [logp[start + i, tok] for i, tok in enumerate(continuation)]
  greedy = all(np.argmax(logp[start + i]) == tok for i, tok in enumerate(continuation))
  return float(np.sum(picked)), greedy


def _request(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_numpy_and_is_greedy(lm):
  tok = lm.tokenizer
  pairs = [('ROMEO: What light', ' through yonder window breaks'),
           ('To be, or not', ' to be'), ('', 'Hello there'), ('KING: ', 'my lord')]
  got = lm.loglikelihood([_request('loglikelihood', *p) for p in pairs])
  for (context, continuation), (value, greedy) in zip(pairs, got):
    ctx = [tok.bos_id] + (tok.encode(context.rstrip()) if context else [])
    whole = tok.encode(context + continuation)
    # The continuation's tokens as running text tokenizes them.
    cont = whole[len(tok.encode(context.rstrip())):] if context else whole
    want, want_greedy = _continuation_log_prob(lm, ctx, cont)
    assert value == pytest.approx(want, rel=1e-4, abs=1e-4), (context, continuation)
    assert greedy == want_greedy
  # is_greedy both ways: the model's own argmax token after a context, and another one.
  context = [tok.bos_id] + tok.encode('JULIET: O Romeo, Romeo')
  best = int(np.argmax(_log_probs(lm, context)[-1]))
  other = (best + 7) % tok.vocab_size
  (best_lp, best_greedy), (other_lp, other_greedy) = lm.score_tokens(
      [(context, [best]), (context, [other])])
  assert best_greedy and not other_greedy
  assert best_lp == pytest.approx(_log_probs(lm, context)[-1, best], abs=1e-4)
  assert other_lp < best_lp


def test_loglikelihood_rolling_sums_windows_of_max_seq_len(lm):
  """A text of ~2.5 windows: its rolling log-likelihood is the sum over non-overlapping
  windows of max_seq_len predicted tokens, each read with max_seq_len tokens of input
  (the first from BOS, the last right-aligned to the text's end)."""
  text = ' '.join(['Now is the winter of our discontent made glorious summer by this sun'
                   ' of York, and all the clouds that loured upon our house'] * 4)
  tokens = lm.tokenizer.encode(text)
  n, m = len(tokens), lm.max_seq_len
  assert 2 * m < n < 4 * m
  stream = [lm.tokenizer.bos_id] + tokens  # stream[i + 1] is tokens[i].
  want = 0.0
  for start in range(0, n, m):  # Predict tokens[start:stop].
    stop = min(start + m, n)
    first = max(0, stop - m)  # Input stream[first:stop]: m tokens, or from BOS.
    logp = _log_probs(lm, stream[first:stop])
    want += sum(logp[i - first, stream[i + 1]] for i in range(start, stop))
  got = lm.loglikelihood_rolling([_request('loglikelihood_rolling', text)])
  assert got[0] == pytest.approx(want, rel=1e-4)


def test_generate_until_is_greedy_generate_cut_at_until(lm):
  """Two prompts of one token length: Xenith's greedy `generate` on them (no padding),
  cut at EOS, is what generate_until returns, cut before the first `until` string."""
  tok = lm.tokenizer
  by_length = {}
  for p in ('ROMEO:', 'JULIET:', 'KING:', 'QUEEN:', 'HAMLET:', 'Good morrow', 'My lord,',
            'First Citizen:', 'What say you', 'Come hither'):
    by_length.setdefault(len(tok.encode(p)), []).append(p)
  prompts = next(ps for ps in by_length.values() if len(ps) >= 2)[:2]
  ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
  out = np.asarray(generate.generate(lm.model, lm.params, jnp.asarray(ids, jnp.int32),
                                     jax.random.key(0), max_new_tokens=12))
  full = []
  for row in out[:, len(ids[0]):].tolist():
    full.append(tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row))
  assert len(full[0].strip()) >= 2, full
  stops = [full[0].strip()[1], 'no such stop']
  got = lm.generate_until([
      _request('generate_until', p, {'until': [s], 'max_gen_toks': 12})
      for p, s in zip(prompts, stops)])
  assert got[0] == full[0][:full[0].index(stops[0])] and len(got[0]) < len(full[0])
  assert got[1] == full[1]


def _write_tasks(folder):
  """Two tasks over JSONL files: multiple choice and generate_until."""
  folder.mkdir()
  mc = [{'question': 'ROMEO: What light through yonder', 'choices': [' window', ' sword',
                                                                      ' horse'], 'gold': 0},
        {'question': 'To be, or not to', 'choices': [' be', ' fly'], 'gold': 0},
        {'question': 'My kingdom for a', 'choices': [' dog', ' horse', ' cup'], 'gold': 1}]
  gen = [{'prompt': 'KING:', 'target': 'x'}, {'prompt': 'Good morrow', 'target': 'y'}]
  for name, rows in (('mc', mc), ('gen', gen)):
    with open(folder / f'{name}.jsonl', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  (folder / 'xenith_mc.yaml').write_text(f"""task: xenith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
""")
  (folder / 'xenith_gen.yaml').write_text(f"""task: xenith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""")
  return mc


def test_harness_runs_local_tasks_offline(lm, tmp_path, monkeypatch):
  """lm-eval's own evaluator (`run_tasks`, what --mode=lm_eval calls) on a
  multiple-choice and a generate_until task defined in YAMLs over JSONL files: the
  accuracy is the share of questions whose likeliest choice (NumPy over the model's
  logits) is the gold one; results JSON and TensorBoard lm_eval/<task>/<metric>."""
  workdir, _ = eval_workdir.trained()
  mc = _write_tasks(tmp_path / 'tasks')
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
  monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf' / 'datasets'))
  table, path = lm_eval_adapter.run_tasks(
      workdir, ['xenith_mc', 'xenith_gen'], include_path=str(tmp_path / 'tasks'), lm=lm)
  assert 'xenith_mc' in table and 'acc' in table
  assert path == os.path.join(workdir, 'lm_eval', 'results_step4.json')
  with open(path) as f:
    written = json.load(f)
  tok = lm.tokenizer
  right = []
  for row in mc:
    scores = []
    for choice in row['choices']:
      whole = tok.encode(row['question'] + choice)
      start = len(tok.encode(row['question']))
      scores.append(_continuation_log_prob(
          lm, [tok.bos_id] + whole[:start], whole[start:])[0])
    right.append(int(np.argmax(scores)) == row['gold'])
  assert written['results']['xenith_mc']['acc,none'] == pytest.approx(np.mean(right))
  assert 'exact_match,none' in written['results']['xenith_gen']
  scalars = event_files.read_scalars(workdir)
  assert scalars['lm_eval/xenith_mc/acc'] == [(4, pytest.approx(np.mean(right)))]
  assert 'lm_eval/xenith_gen/exact_match' in scalars
