"""Text generation with the KV cache: prefill the prompt, then one token per step.

`generate` runs entirely under one `jax.jit`: the prompt fills the cache in one call
(`xenith/model/kv_cache.py`), then a `lax.scan` appends one sampled token at a time, so
each new token costs one single-token forward pass. Greedy at temperature 0, else
sampling from softmax(logits / temperature), optionally restricted to the top k.
"""

import functools

import jax
import jax.numpy as jnp

from xenith.model import kv_cache


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
             temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """Continues `prompt` by `max_new_tokens` tokens.

  Args:
    model: a `Decoder` (`transformer.make_model`); memory mode is not supported.
    params: its params.
    prompt: [batch, prompt_len] int32 token ids, one document per row, all rows the same
      length (the cache decodes rows in lockstep).
    key: PRNG key for sampling (unused when greedy).
    max_new_tokens: tokens to add.
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: with temperature > 0, sample among the k most likely tokens only; 0 = all.

  Returns:
    [batch, prompt_len + max_new_tokens] int32: the prompt and its continuation.
  """
  batch, prompt_len = prompt.shape
  length = prompt_len + max_new_tokens
  apply = functools.partial(model.apply, cache_length=length, mutable=['cache'])
  logits, variables = apply({'params': params, 'cache': kv_cache.init_cache(model, batch, length)},
                            prompt)

  def step(carry, key):
    cache, last_logits = carry
    token = _sample(last_logits, key, temperature, top_k)
    logits, variables = apply({'params': params, 'cache': cache}, token[:, None])
    return (variables['cache'], logits[:, -1]), token

  keys = jax.random.split(key, max_new_tokens)
  _, tokens = jax.lax.scan(step, (variables['cache'], logits[:, -1]), keys)
  return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1)
