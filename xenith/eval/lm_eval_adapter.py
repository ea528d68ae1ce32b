"""Xenith as an EleutherAI lm-evaluation-harness model: `--mode=lm_eval`.

  python main.py --mode=lm_eval --workdir=runs/tiny --tasks=hellaswag,my_task \
      --include_path=<folder of task YAMLs> [--num_fewshot=0] [--limit=100]

`XenithLM` answers the harness's three request types with a workdir's checkpoint and
tokenizer:
  loglikelihood(context, continuation): log p(continuation | BOS + context), and
    whether the continuation is the greedy (argmax) one, token by token;
  loglikelihood_rolling(text): log p(text | BOS), in windows of max_seq_len tokens, each
    scoring new tokens with as much earlier text as fits (lm-eval's rolling windows);
  generate_until(context, {until, max_gen_toks, ...}): Xenith's KV-cache `generate`,
    greedy unless do_sample, cut at EOS and at the first `until` string.
Requests are batched (rows sorted by length, padded to power-of-two lengths so few
shapes compile). `run_tasks` runs harness tasks in-process, offline (HF_*_OFFLINE), and
writes `<workdir>/lm_eval/results_step<N>.json` and TensorBoard scalars
`lm_eval/<task>/<metric>`.
"""

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm_eval.api import model as lm_model
from lm_eval import utils as lm_utils

from xenith import atomic_files
from xenith import generate as generate_lib
from xenith import storage
from xenith.data import pipeline
from xenith.errors import ConfigError
from xenith.errors import FlagError
from xenith.model import memory
from xenith.train import checkpointing
from xenith.train import run_record
from xenith.train import steps


def _bucket(n: int, limit: int, floor: int = 8) -> int:
  """The padded length of an n-token row: the next power of two, at most `limit`."""
  return min(max(floor, 1 << max(n - 1, 0).bit_length()), max(limit, n))


def _make_score_fn(model):
  """score(params, tokens, targets, mask), each [b, L] -> (sum of log p(target) over
  mask [b], whether every masked target is the argmax [b])."""

  def score(params, tokens, targets, mask):
    length = tokens.shape[1]
    real = (mask | (jnp.cumsum(mask[:, ::-1], axis=1)[:, ::-1] > 0)).astype(jnp.int32)
    batch = {'inputs': tokens, 'segment_ids': real,
             'positions': jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)}
    logits, _ = steps.apply_model(model, params, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [b, L, vocab]
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | ~mask
    return jnp.where(mask, target_logp, 0.0).sum(axis=1), greedy.all(axis=1)

  return jax.jit(score)


class XenithLM(lm_model.LM):
  """A Xenith language model for the harness (see the module doc)."""

  def __init__(self, model, params, tokenizer, max_seq_len: int, batch_size: int = 8,
               seed: int = 0):
    super().__init__()
    if memory.enabled(model.config):
      raise ConfigError('model.memory', 'lm_eval does not support memory models yet')
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_seq_len, self.batch_size, self.seed = max_seq_len, batch_size, seed
    self._score = _make_score_fn(model)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, step: int | None = None,
                   batch_size: int = 8) -> 'XenithLM':
    """The workdir's checkpoint `step` (None: newest) with its config and tokenizer."""
    from xenith.eval import standalone  # pylint: disable=g-import-not-at-top
    config = config if config is not None else run_record.read_config(workdir)
    if config.get('task') == 'classification':
      raise ConfigError('task', 'lm_eval needs a language model, not a classifier')
    step = standalone.pick_step(workdir, step)
    tokenizer = pipeline.load_tokenizer(config, workdir)
    model, params = checkpointing.load_model(
        config.model, f'{storage.check_supported(workdir)}/checkpoints/{step}')
    lm = cls(model, params, tokenizer, config.max_seq_len, batch_size, config.seed)
    lm.step = step
    return lm

  # Tokens.

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context tokens, continuation tokens), the continuation's tokens cut from the
    whole text's (so they tokenize as in running text); trailing spaces of the context
    move to the continuation, where a SentencePiece word starts."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tokenizer.encode(context + continuation)
    start = len(self.tokenizer.encode(context)) if context else 0
    return [self.tokenizer.bos_id, *whole[:start]], whole[start:]

  # Scoring.

  def score_tokens(self, pairs: list[tuple[list[int], list[int]]]
                   ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) for token pairs, batched."""
    rows = []
    for context, continuation in pairs:
      if not continuation:
        rows.append(None)
        continue
      whole = (context + continuation)[-(self.max_seq_len + 1):]
      scored = min(len(continuation), len(whole) - 1)
      rows.append((whole[:-1], whole[1:], scored))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    order = sorted((i for i, r in enumerate(rows) if r is not None),
                   key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      ids = order[start:start + self.batch_size]
      length = _bucket(len(rows[ids[0]][0]), self.max_seq_len)
      tokens = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      mask = np.zeros((self.batch_size, length), bool)
      for row, i in enumerate(ids):
        inputs, target, scored = rows[i]
        tokens[row, :len(inputs)] = inputs
        targets[row, :len(target)] = target
        mask[row, len(target) - scored:len(target)] = True
      sums, greedy = jax.device_get(self._score(self.params, tokens, targets, mask))
      for row, i in enumerate(ids):
        out[i] = (float(sums[row]), bool(greedy[row]))
    return out

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    results = self.score_tokens([self.encode_pair(*r.args) for r in requests])
    for request, result in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', request.args, result)
    return results

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """The (context, continuation) token windows that together score all of `text`."""
    return [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        token_list=self.tokenizer.encode(text), prefix_token=self.tokenizer.bos_id,
        max_seq_len=self.max_seq_len, context_len=1)]

  def loglikelihood_rolling(self, requests) -> list[float]:
    windows = [self.rolling_windows(r.args[0]) for r in requests]
    flat = self.score_tokens([w for ws in windows for w in ws])
    results, start = [], 0
    for request, ws in zip(requests, windows):
      total = sum(s for s, _ in flat[start:start + len(ws)])
      start += len(ws)
      results.append(total)
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return results

  # Generation.

  def _cut(self, tokens: list[int], until: list[str]) -> str:
    if self.tokenizer.eos_id in tokens:
      tokens = tokens[:tokens.index(self.tokenizer.eos_id)]
    text = self.tokenizer.decode(tokens)
    for stop in until:
      if stop and stop in text:
        text = text[:text.index(stop)]
    return text

  def generate_until(self, requests) -> list[str]:
    groups: dict[tuple[int, float], list[int]] = {}
    settings = []
    for i, request in enumerate(requests):
      kwargs = dict(request.args[1])
      until = kwargs.get('until') or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.get('max_gen_toks', 256))
      temperature = float(kwargs.get('temperature', 0.0)) if kwargs.get('do_sample') else 0.0
      settings.append(until)
      groups.setdefault((max_new, temperature), []).append(i)
    out = [''] * len(requests)
    key = jax.random.key(self.seed)
    for (max_new, temperature), ids in groups.items():
      keep = max(1, self.max_seq_len - max_new)  # Prompt + output within max_seq_len.
      prompts = {i: ([self.tokenizer.bos_id] + self.tokenizer.encode(requests[i].args[0]))[-keep:]
                 for i in ids}
      ids = sorted(ids, key=lambda i: -len(prompts[i]))
      for start in range(0, len(ids), self.batch_size):
        chunk = ids[start:start + self.batch_size]
        length = _bucket(len(prompts[chunk[0]]), keep, floor=1)
        padded = np.zeros((self.batch_size, length), np.int32)
        lengths = np.ones((self.batch_size,), np.int32)
        for row, i in enumerate(chunk):  # Left-padded: each row ends at the last column.
          padded[row, length - len(prompts[i]):] = prompts[i]
          lengths[row] = len(prompts[i])
        key, sub = jax.random.split(key)
        tokens = np.asarray(generate_lib.generate(
            self.model, self.params, jnp.asarray(padded), sub, max_new_tokens=max_new,
            temperature=temperature, prompt_lengths=jnp.asarray(lengths)))
        for row, i in enumerate(chunk):
          out[i] = self._cut([int(t) for t in tokens[row, length:]], settings[i])
          self.cache_hook.add_partial('generate_until', requests[i].args, out[i])
    return out


def _scalars(results: dict[str, Any]) -> dict[str, float]:
  """{'lm_eval/<task>/<metric>': value} of the harness's results (stderrs left out;
  a filter other than 'none' is appended: acc_strict)."""
  out = {}
  for task, metrics in results.get('results', {}).items():
    for key, value in metrics.items():
      metric, _, filter_name = key.partition(',')
      if (not filter_name or 'stderr' in metric or isinstance(value, bool)
          or not isinstance(value, (int, float)) or not math.isfinite(value)):
        continue
      suffix = '' if filter_name == 'none' else f'_{filter_name}'
      out[f'lm_eval/{task}/{metric}{suffix}'] = float(value)
  return out


def run_tasks(workdir: str, tasks: list[str], *, config=None, step: int | None = None,
              include_path: str | None = None, num_fewshot: int | None = None,
              limit: int | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
              lm: XenithLM | None = None) -> tuple[str, str]:
  """Runs harness `tasks` on the workdir's checkpoint (or on `lm`, loaded from it
  already); returns (lm-eval's table, the results JSON path). Unknown tasks fail
  (FlagError) before the model loads."""
  # Offline: task data comes from local files; nothing may reach the hub.
  os.environ['HF_DATASETS_OFFLINE'] = '1'
  os.environ['HF_HUB_OFFLINE'] = '1'
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval import tasks as lm_tasks  # pylint: disable=g-import-not-at-top
  if include_path and not storage.path(include_path).is_dir():
    raise FlagError(f'--include_path={include_path}: no such folder.')
  manager = None
  if include_path:  # Indexing the harness's ~15k built-in tasks takes half a minute:
    manager = lm_tasks.TaskManager(include_path=include_path, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):  # only when a task is not local.
      manager = None
  manager = manager or lm_tasks.TaskManager(include_path=include_path)
  known = set(manager.all_tasks)
  unknown = [t for t in tasks if t not in known]
  if unknown:
    raise FlagError(f'--tasks: unknown lm-eval task(s) {unknown}; define them in a YAML '
                    'under --include_path, or check the names (lm-eval ls tasks).')
  lm = lm or XenithLM.from_workdir(workdir, config, step, batch_size)
  results = lm_eval.simple_evaluate(
      model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
      task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters)
  table = lm_utils.make_table(results)
  if results.get('groups'):
    table += '\n' + lm_utils.make_table(results, 'groups')
  path = f'{storage.check_supported(workdir)}/lm_eval/results_step{lm.step}.json'
  storage.path(path).parent.mkdir(parents=True, exist_ok=True)
  keep = {k: results[k] for k in ('results', 'groups', 'configs', 'versions', 'n-shot',
                                  'higher_is_better', 'n-samples') if k in results}
  atomic_files.write_json(path, json.loads(json.dumps(
      {'step': lm.step, 'tasks': list(tasks), **keep}, default=str)), indent=1)
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir)
  writer.write_scalars(lm.step, _scalars(results))
  writer.flush()
  return table, path
