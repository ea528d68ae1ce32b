"""Greedy samples from fixed prompts at each evaluation, written as TensorBoard text.

`config.sample_prompts` (a tuple of strings; () = off) and `config.sample_new_tokens`.
The params in memory continue each prompt with `xenith.generate.generate` at
temperature 0, exactly as `main.py --mode=generate` would from the checkpoint saved at
that step. The prompts go in one left-padded batch, so the generation compiles once.
"""

import jax
import jax.numpy as jnp
import numpy as np

from xenith import generate as generate_lib
from xenith.model import memory as memory_lib


class SampleWriter:
  """`write(writer, step, params)` writes `samples/<i>`: prompt i and its continuation."""

  def __init__(self, config, model, tokenizer):
    self._prompts = tuple(config.get('sample_prompts', ()) or ())
    self._new_tokens = config.get('sample_new_tokens', 32)
    self._model, self._tokenizer = model, tokenizer
    self._key = jax.random.key(config.seed)  # Unused: greedy.
    # Each prompt as `generate_text` feeds it: BOS, then its pieces.
    self._tokens = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in self._prompts]

  @property
  def enabled(self) -> bool:
    return bool(self._prompts)

  def generate(self, params) -> list[list[int]]:
    """Each prompt's ids and its greedy continuation's, without the BOS."""
    if memory_lib.enabled(self._model.config):  # No left padding: one prompt at a time.
      rows = [np.asarray(jax.device_get(self._run(params, jnp.asarray([t], jnp.int32))[0]))[0]
              for t in self._tokens]
      return [[int(x) for x in row[1:]] for row in rows]
    lengths = [len(t) for t in self._tokens]
    width = max(lengths)
    prompt = np.zeros((len(self._tokens), width), np.int32)  # [prompts, width], left-padded.
    for row, tokens in enumerate(self._tokens):
      prompt[row, width - len(tokens):] = tokens
    out = np.asarray(jax.device_get(self._run(
        params, jnp.asarray(prompt), prompt_lengths=jnp.asarray(lengths, jnp.int32))))
    # Row r's ids: after its padding and its BOS.
    return [[int(x) for x in out[row, width - n + 1:]] for row, n in enumerate(lengths)]

  def decode(self, ids: list[int]) -> str:
    """The text of `ids`; ids past the tokenizer's pieces (a model's vocab_size may be
    larger) show as <id>, where `generate_text` would fail."""
    parts, run = [], []
    for i in ids:
      if i < self._tokenizer.vocab_size:
        run.append(i)
      else:
        parts += [self._tokenizer.decode(run), f'<{i}>']
        run = []
    return ''.join(parts + [self._tokenizer.decode(run)])

  def _run(self, params, prompt, **kwargs):
    return generate_lib.generate(self._model, params, prompt, self._key,
                                 max_new_tokens=self._new_tokens, **kwargs)

  def write(self, writer, step: int, params) -> None:
    if self.enabled:
      texts = [self.decode(ids) for ids in self.generate(params)]
      writer.write_texts(step, {f'samples/{i}': text for i, text in enumerate(texts)})
