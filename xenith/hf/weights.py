"""HF Mistral / Mixtral tensors <-> Xenith `Decoder` params.

HF Linear weights are [out, in]; Xenith kernels [in, out], with the heads kept apart:
  model.embed_tokens.weight [V, H]           -> embed/embedding [V, H]
  layers.i.self_attn.q_proj.weight [N*D, H]  -> block_i/attn/query/kernel [H, N, D]
  layers.i.self_attn.{k,v}_proj [K*D, H]     -> block_i/attn/{key,value}/kernel [H, K, D]
  layers.i.self_attn.o_proj.weight [H, N*D]  -> block_i/attn/out/kernel [N, D, H]
  layers.i.input_layernorm / post_attention_layernorm -> block_i/attn_norm, mlp_norm /scale
  Mistral  layers.i.mlp.{gate,up,down}_proj  -> block_i/mlp/{gate,up,down}/kernel (transposed)
  Mixtral  layers.i.block_sparse_moe.gate    -> block_i/moe/router/kernel [H, E]
           ...experts.e.{w1,w3,w2}           -> block_i/moe/experts/{gate,up,down}[e] (transposed)
           (also read: transformers' fused mlp.experts.gate_up_proj / down_proj layout)
  model.norm.weight                          -> final_norm/scale
  lm_head.weight [V, H]                      -> head/kernel [H, V]
With `scan_layers` the blocks are stacked on a leading axis under `layers` (dense) or
`moe_layers` (MoE): xenith/model/layer_stacks.py converts the layouts.

RoPE: Xenith pairs features i and i + D/2, as HF's `rotate_half` does, so q/k kernels need
no permutation. RMSNorm: both compute x * rsqrt(mean(x^2) + eps) in float32, then scale.
Tied embeddings: Xenith's tied head divides the logits by sqrt(H) (its table is unit
scale); HF's does not. The factor is folded into final_norm/scale on import and taken out
again on export, so that the HF value round-trips bit-exactly when sqrt(H) is a power of
two, else within one float32 ulp.
"""

import math

from flax import traverse_util
import ml_collections
import ml_dtypes
import numpy as np

from xenith.errors import HfFormatError
from xenith.model import layer_stacks

NUMPY_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16,
                'float16': np.float16}


def _fold_norm_scale(w: np.ndarray, factor: float) -> np.ndarray:
  """float32 w * factor, nudged per element so that `_unfold_norm_scale` gives w back."""
  w = np.asarray(w, np.float32)
  y = (w.astype(np.float64) * factor).astype(np.float32)
  for _ in range(4):
    back = _unfold_norm_scale(y, factor)
    wrong = back != w
    if not wrong.any():
      return y
    direction = np.where(back < w, np.inf, -np.inf).astype(np.float32)
    y = np.where(wrong, np.nextafter(y, direction), y)
  # Where sqrt(H) is not a power of two, some values have no exact preimage; those
  # round-trip within one ulp.
  return y


def _unfold_norm_scale(y: np.ndarray, factor: float) -> np.ndarray:
  return (np.asarray(y, np.float32).astype(np.float64) / factor).astype(np.float32)


def _f32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _dims(model: ml_collections.ConfigDict) -> dict[str, int]:
  """The size of each HF tensor dimension, by the config.json keys that set it."""
  return {'vocab_size': model.vocab_size, 'hidden_size': model.embed_dim,
          'intermediate_size': model.mlp_dim, '2*intermediate_size': 2 * model.mlp_dim,
          'num_local_experts': model.moe.num_experts,
          'num_attention_heads*head_dim': model.num_heads * model.head_dim,
          'num_key_value_heads*head_dim': model.num_kv_heads * model.head_dim}


def hf_layout(model: ml_collections.ConfigDict, names) -> dict[str, tuple[str, ...]]:
  """name -> dimensions (as `_dims` names them) of each tensor a HF checkpoint of `model`
  holds. names: the checkpoint's tensor names, which tell transformers' fused expert
  layout and whether a tied model stores its lm_head."""
  V, H, I, E = 'vocab_size', 'hidden_size', 'intermediate_size', 'num_local_experts'
  Q, KV = 'num_attention_heads*head_dim', 'num_key_value_heads*head_dim'
  out = {'model.embed_tokens.weight': (V, H), 'model.norm.weight': (H,)}
  if not model.tie_embeddings or 'lm_head.weight' in names:
    out['lm_head.weight'] = (V, H)
  for i in range(model.num_layers):
    p = f'model.layers.{i}.'
    out.update({p + 'self_attn.q_proj.weight': (Q, H), p + 'self_attn.k_proj.weight': (KV, H),
                p + 'self_attn.v_proj.weight': (KV, H), p + 'self_attn.o_proj.weight': (H, Q),
                p + 'input_layernorm.weight': (H,), p + 'post_attention_layernorm.weight': (H,)})
    if not model.moe.num_experts:
      out.update({p + 'mlp.gate_proj.weight': (I, H), p + 'mlp.up_proj.weight': (I, H),
                  p + 'mlp.down_proj.weight': (H, I)})
    elif p + 'mlp.experts.gate_up_proj' in names:
      out.update({p + 'mlp.gate.weight': (E, H), p + 'mlp.experts.down_proj': (E, H, I),
                  p + 'mlp.experts.gate_up_proj': (E, '2*intermediate_size', H)})
    else:
      q = p + 'block_sparse_moe.'
      out[q + 'gate.weight'] = (E, H)
      for e in range(model.moe.num_experts):
        out.update({f'{q}experts.{e}.w1.weight': (I, H), f'{q}experts.{e}.w3.weight': (I, H),
                    f'{q}experts.{e}.w2.weight': (H, I)})
  return out


def _shape(shape) -> str:
  return '[' + ', '.join(map(str, shape)) + ']'


def check_tensors(tensors, model: ml_collections.ConfigDict) -> None:
  """HfFormatError naming the file, the tensor and expected vs found shape of the first
  tensor that does not fit `model`: missing, of another shape, or not in `hf_layout`
  (extras are refused, so that no weight is dropped unnoticed; RoPE `inv_freq` buffers
  are ignored). tensors: a `safetensors_io.Tensors` (its headers; no tensor is read)."""
  dims, shapes = _dims(model), tensors.shapes
  layout = hf_layout(model, shapes)
  problems = []
  for name, labels in layout.items():
    expected = tuple(dims[d] for d in labels)
    implied = f'config.json implies {_shape(expected)} = [{", ".join(labels)}]'
    if name not in shapes:
      problems.append(f'{tensors.source}: tensor {name} is missing; {implied}.')
    elif shapes[name] != expected:
      problems.append(f'{tensors.filename(name)}: tensor {name} has shape '
                      f'{_shape(shapes[name])}; {implied}.')
  for name, shape in shapes.items():
    if name not in layout and not name.endswith('rotary_emb.inv_freq'):
      problems.append(f'{tensors.filename(name)}: unexpected tensor {name} {_shape(shape)}; '
                      'config.json implies no such tensor.')
  if problems:
    n = len(problems) - 1
    more = f' ({n} more {"tensor does" if n == 1 else "tensors do"} not fit.)' if n else ''
    raise HfFormatError(problems[0] + more)


def hf_to_params(tensors, model: ml_collections.ConfigDict) -> dict:
  """Xenith params (nested dict of float32 NumPy arrays) from HF tensors.

  tensors: a `safetensors_io.Tensors`. HfFormatError, before any tensor is read, unless
  every tensor fits `model` (`check_tensors`).
  """
  check_tensors(tensors, model)
  H, N, K, D = model.embed_dim, model.num_heads, model.num_kv_heads, model.head_dim

  def get(name):
    return _f32(tensors[name])

  def linear(name):  # HF [out, in] -> [in, out]
    return get(name + '.weight').T

  flat = {('embed', 'embedding'): get('model.embed_tokens.weight')}
  blocks = []
  for i in range(model.num_layers):
    p = f'model.layers.{i}.'
    b = {
        ('attn', 'query', 'kernel'): linear(p + 'self_attn.q_proj').reshape(H, N, D),
        ('attn', 'key', 'kernel'): linear(p + 'self_attn.k_proj').reshape(H, K, D),
        ('attn', 'value', 'kernel'): linear(p + 'self_attn.v_proj').reshape(H, K, D),
        ('attn', 'out', 'kernel'): linear(p + 'self_attn.o_proj').reshape(N, D, H),
        ('attn_norm', 'scale'): get(p + 'input_layernorm.weight'),
        ('mlp_norm', 'scale'): get(p + 'post_attention_layernorm.weight'),
    }
    if model.moe.num_experts:
      E = model.moe.num_experts
      if p + 'mlp.experts.gate_up_proj' in tensors:  # transformers' in-memory fused layout.
        gate_up = get(p + 'mlp.experts.gate_up_proj')  # [E, 2I, H]
        gate, up = np.split(gate_up, 2, axis=1)
        b[('moe', 'router', 'kernel')] = linear(p + 'mlp.gate')
        b[('moe', 'experts', 'gate')] = gate.transpose(0, 2, 1)
        b[('moe', 'experts', 'up')] = up.transpose(0, 2, 1)
        b[('moe', 'experts', 'down')] = get(p + 'mlp.experts.down_proj').transpose(0, 2, 1)
      else:
        q = p + 'block_sparse_moe.'
        b[('moe', 'router', 'kernel')] = linear(q + 'gate')
        for ours, theirs in (('gate', 'w1'), ('up', 'w3'), ('down', 'w2')):
          b[('moe', 'experts', ours)] = np.stack(
              [linear(f'{q}experts.{e}.{theirs}') for e in range(E)])
    else:
      for ours in ('gate', 'up', 'down'):
        b[('mlp', ours, 'kernel')] = linear(f'{p}mlp.{ours}_proj')
    blocks.append(b)

  norm = get('model.norm.weight')
  if model.tie_embeddings:  # Some tied checkpoints store a copy of lm_head; not needed.
    norm = _fold_norm_scale(norm, math.sqrt(H))
  else:
    flat[('head', 'kernel')] = linear('lm_head')
  flat[('final_norm', 'scale')] = norm
  return traverse_util.unflatten_dict(
      layer_stacks.join_layers(blocks, flat, model, model.scan_layers))


def restack(params: dict, model: ml_collections.ConfigDict, scan_layers: bool) -> dict:
  """`params`, laid out as `model.scan_layers` says, in the layout of `scan_layers`."""
  if scan_layers == model.scan_layers:
    return params
  blocks, rest = layer_stacks.split_layers(traverse_util.flatten_dict(params), model)
  return traverse_util.unflatten_dict(
      layer_stacks.join_layers(blocks, rest, model, scan_layers))


def _block_paths(model: ml_collections.ConfigDict) -> list[tuple[str, ...]]:
  """The param paths within one block that HF tensors map to."""
  paths = [('attn', n, 'kernel') for n in ('query', 'key', 'value', 'out')]
  paths += [('attn_norm', 'scale'), ('mlp_norm', 'scale')]
  if model.moe.num_experts:
    return paths + [('moe', 'router', 'kernel')] + [('moe', 'experts', n)
                                                   for n in ('gate', 'up', 'down')]
  return paths + [('mlp', n, 'kernel') for n in ('gate', 'up', 'down')]


def unmapped_params(params: dict, model: ml_collections.ConfigDict) -> list[str]:
  """The params ('block_0/attn/query/lora_a') that no HF tensor of `model` holds: an
  export to HF would drop them."""
  mapped = {('embed', 'embedding'), ('final_norm', 'scale')}
  if not model.tie_embeddings:
    mapped.add(('head', 'kernel'))
  mapped.update(prefix + path for prefix in layer_stacks.layer_prefixes(model)
                for path in _block_paths(model))
  return sorted('/'.join(k) for k in traverse_util.flatten_dict(params) if k not in mapped)


def params_to_hf(params: dict, model: ml_collections.ConfigDict,
                 dtype: str = 'float32') -> dict[str, np.ndarray]:
  """HF tensors (name -> array in `dtype`: 'float32', 'bfloat16' or 'float16') from
  Xenith params laid out as `model` says; `model` must pass `configs.check_exportable`.
  HfFormatError if some param has no HF tensor (`unmapped_params`): none is dropped."""
  unmapped = unmapped_params(params, model)
  if unmapped:
    raise HfFormatError(f'{len(unmapped)} params have no Mistral/Mixtral tensor: '
                        f'{", ".join(unmapped[:6])}{" ..." if len(unmapped) > 6 else ""}')
  np_dtype = NUMPY_DTYPES[dtype]
  flat = {k: _f32(v) for k, v in traverse_util.flatten_dict(params).items()}
  H, N, D = model.embed_dim, model.num_heads, model.head_dim
  out = {}

  def put(name, value):
    out[name] = np.ascontiguousarray(value).astype(np_dtype)

  put('model.embed_tokens.weight', flat[('embed', 'embedding')])
  for i, b in enumerate(layer_stacks.split_layers(flat, model)[0]):
    p = f'model.layers.{i}.'
    put(p + 'self_attn.q_proj.weight', b[('attn', 'query', 'kernel')].reshape(H, -1).T)
    put(p + 'self_attn.k_proj.weight', b[('attn', 'key', 'kernel')].reshape(H, -1).T)
    put(p + 'self_attn.v_proj.weight', b[('attn', 'value', 'kernel')].reshape(H, -1).T)
    put(p + 'self_attn.o_proj.weight', b[('attn', 'out', 'kernel')].reshape(N * D, H).T)
    put(p + 'input_layernorm.weight', b[('attn_norm', 'scale')])
    put(p + 'post_attention_layernorm.weight', b[('mlp_norm', 'scale')])
    if model.moe.num_experts:
      q = p + 'block_sparse_moe.'
      put(q + 'gate.weight', b[('moe', 'router', 'kernel')].T)
      for ours, theirs in (('gate', 'w1'), ('up', 'w3'), ('down', 'w2')):
        for e, w in enumerate(b[('moe', 'experts', ours)]):
          put(f'{q}experts.{e}.{theirs}.weight', w.T)
    else:
      for ours in ('gate', 'up', 'down'):
        put(f'{p}mlp.{ours}_proj.weight', b[('mlp', ours, 'kernel')].T)
  norm = flat[('final_norm', 'scale')]
  if model.tie_embeddings:
    norm = _unfold_norm_scale(norm, math.sqrt(H))
  else:
    put('lm_head.weight', flat[('head', 'kernel')].T)
  put('model.norm.weight', norm)
  return out
