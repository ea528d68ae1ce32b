"""Text generation with the KV cache: prefill the prompt, then one token per step.

`generate_text` is `main.py --mode=generate`: a run's tokenizer and newest params, the
prompt in, the text out. `generate` runs entirely under one `jax.jit`: the prompt fills
the cache in one call (`xenith/model/kv_cache.py`), then a `lax.scan` appends one sampled token at a time, so
each new token costs one single-token forward pass. Greedy at temperature 0, else
sampling from softmax(logits / temperature), optionally restricted to the top k.

A model with chunk-summary memory (`xenith/model/memory/`) keeps its memory state
instead of a KV cache: the prompt's whole chunks go through the chunked pass, the rest
of the prompt and every new token through `decode=True`, so the bank, its usage and
the short-term keys carry on exactly as in one long forward pass.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from xenith import storage
from xenith.data import pipeline
from xenith.errors import MemoryBankError
from xenith.model import kv_cache
from xenith.model import memory as memory_lib
from xenith.train import checkpointing


def _sample(logits, key, temperature: float, top_k: int):
  """logits: [batch, vocab] float32 -> [batch] int32."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature',
                                             'top_k'))
def generate(model, params, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, prompt_lengths: jax.Array | None = None,
             memory: memory_lib.MemoryState | None = None
             ) -> jax.Array | tuple[jax.Array, memory_lib.MemoryState]:
  """Continues `prompt` by `max_new_tokens` tokens.

  Args:
    model: a `Decoder` (`build.make_model`).
    params: its params.
    prompt: [batch, prompt_len] int32 token ids, one document per row; rows shorter
      than prompt_len are left-padded (any token id) and give `prompt_lengths`.
    key: PRNG key for sampling (unused when greedy).
    max_new_tokens: tokens to add.
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: with temperature > 0, sample among the k most likely tokens only; 0 = all.
    prompt_lengths: [batch] int, each row's prompt length (its last tokens); None = all
      prompt_len. The padding sits at negative positions, so each row continues exactly
      as it would alone. Not for memory models.
    memory: memory models only: the `MemoryState` to continue from (`memory.load_bank`,
      or a previous call's); None = an empty memory at stream position 0.

  Returns:
    [batch, prompt_len + max_new_tokens] int32: the prompt and its continuation; for a
    memory model also the memory state after the last of them, for the next call
    (whose prompt is then the text that follows).
  """
  if memory_lib.enabled(model.config):
    if prompt_lengths is not None:
      raise ValueError('prompt_lengths is not supported for memory models.')
    return _generate_with_memory(model, params, prompt, key, memory, max_new_tokens,
                                 temperature, top_k)
  if memory is not None:
    raise ValueError('memory= needs a model with config.memory.chunk_size > 0.')
  batch, prompt_len = prompt.shape
  length = prompt_len + max_new_tokens
  # Row b's first real token is at position 0: its padding at -padding[b]..-1.
  padding = (jnp.zeros((batch,), jnp.int32) if prompt_lengths is None
             else prompt_len - jnp.asarray(prompt_lengths, jnp.int32))
  apply = functools.partial(model.apply, cache_length=length, mutable=['cache'])
  positions = jnp.arange(prompt_len, dtype=jnp.int32)[None] - padding[:, None]
  logits, variables = apply({'params': params, 'cache': kv_cache.init_cache(model, batch, length)},
                            prompt, positions=positions)

  def step(carry, xs):
    cache, last_logits = carry
    key, t = xs
    token = _sample(last_logits, key, temperature, top_k)
    logits, variables = apply({'params': params, 'cache': cache}, token[:, None],
                              positions=(prompt_len + t - padding)[:, None])
    return (variables['cache'], logits[:, -1]), token

  keys = jax.random.split(key, max_new_tokens)
  steps = jnp.arange(max_new_tokens, dtype=jnp.int32)
  _, tokens = jax.lax.scan(step, (variables['cache'], logits[:, -1]), (keys, steps))
  return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1)


def _generate_with_memory(model, params, prompt, key, state, max_new_tokens, temperature,
                          top_k):
  """`generate` for a chunk-summary memory model; returns (tokens, memory state)."""
  def apply(tokens, **kwargs):  # -> (logits, state)
    out = model.apply({'params': params}, tokens, method='forward', **kwargs)
    return out.logits, out.memory

  chunk = model.config.memory.chunk_size
  rest = prompt
  logits = None
  if state is None:  # At stream position 0 the whole chunks are known: one fast pass.
    whole = prompt.shape[1] // chunk * chunk
    if whole:
      logits, state = apply(prompt[:, :whole])
      rest = prompt[:, whole:]
  if rest.shape[1]:
    logits, state = apply(rest, memory=state, decode=True)

  def step(carry, key):
    state, last_logits = carry
    token = _sample(last_logits, key, temperature, top_k)
    logits, state = apply(token[:, None], memory=state, decode=True)
    return (state, logits[:, -1]), token

  # Every sampled token is fed, the last one too, so the state covers the whole output.
  keys = jax.random.split(key, max_new_tokens)
  (state, _), tokens = jax.lax.scan(step, (state, logits[:, -1]), keys)
  return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1), state


def generate_text(config: ml_collections.ConfigDict, workdir: str, prompt: str, *,
                  max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                  memory_bank: str | None = None) -> str:
  """The prompt and its continuation by the newest params in `workdir`.

  With a memory model and `memory_bank` (.npz), continues the document saved there (if
  the file exists; the prompt then gets no BOS) and saves the state after the output
  there, so the next call continues the same document.
  """
  with_memory = memory_lib.enabled(config.model)
  if memory_bank and not with_memory:
    raise MemoryBankError('--memory_bank needs a memory model (config.model.memory.'
                          'chunk_size > 0).')
  state = None
  if memory_bank and storage.path(memory_bank, '--memory_bank').exists():  # Local or gs://.
    state = memory_lib.load_bank(memory_bank, like=memory_lib.init_state(config.model, 1))
  tokenizer = pipeline.load_tokenizer(config, workdir)  # The copy the run pinned.
  bos = [] if state is not None else [tokenizer.bos_id]  # A continued document has one.
  tokens = bos + list(tokenizer.encode(prompt))
  if not tokens:
    raise MemoryBankError('--prompt is empty; a continued document needs some text.')
  model, params = checkpointing.load_model(config.model, workdir)
  out = generate(model, params, jnp.asarray([tokens], jnp.int32), jax.random.key(config.seed),
                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 **({'memory': state} if with_memory else {}))
  if with_memory:
    out, state = out
    if memory_bank:
      memory_lib.save_bank(memory_bank, state)
  return tokenizer.decode([int(t) for t in out[0, len(bos):]])
