"""Hugging Face interoperability: Mixtral / Mistral checkpoints <-> Xenith `Decoder` params.

  module, params = xenith.from_pretrained('path/to/hf_dir')    # Mixtral or Mistral
  logits = module.apply({'params': params}, tokens)            # [batch, seq, vocab]
  xenith.save_pretrained('path/to/out', module, params)        # config.json + safetensors

Xenith's export format is the Hugging Face one (config.json + model.safetensors, loadable
by `transformers.AutoModelForCausalLM`), so `from_pretrained` reads both.

Mapping (HF Linear weights are [out, in]; Xenith kernels [in, out], heads kept apart):
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
`moe_layers` (MoE).

RoPE: Xenith pairs features i and i + D/2, as HF's `rotate_half` does, so q/k kernels need
no permutation. RMSNorm: both compute x * rsqrt(mean(x^2) + eps) in float32, then scale.
Tied embeddings: Xenith's tied head divides the logits by sqrt(H) (its table is unit
scale); HF's does not. The factor is folded into final_norm/scale on import (and taken out
again on export, chosen so the HF value round-trips bit-exactly when sqrt(H) is a power
of two, else within one float32 ulp).

Sliding window (Mistral/Mixtral `sliding_window`, when `use_sliding_window` is not
False): every layer gets that window (`config.model.attention.window_sizes=(W,)`, no
global tokens), the mask HF applies (query i sees key j iff i - j < W); export writes it
back. Xenith patterns HF cannot express (several windows, global tokens, a full-attention
prefix) are refused on export.
"""

import importlib.util
import json
import math
import os
from typing import Any

from flax import traverse_util
import ml_collections
import ml_dtypes
import numpy as np

from xenith.errors import HfFormatError

SUPPORTED_ARCHITECTURES = ('MistralForCausalLM', 'MixtralForCausalLM')
_MODEL_TYPES = {'mistral': 'MistralForCausalLM', 'mixtral': 'MixtralForCausalLM'}
SAFETENSORS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'

_ST_DTYPES = {'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
              'BF16': np.dtype(ml_dtypes.bfloat16), 'F64': np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}


# ---------------------------------------------------------------------------------------
# safetensors IO (the format is an 8-byte header length, a JSON header, raw bytes). Own
# reader/writer so that bfloat16 works with NumPy (via ml_dtypes) and no extra dependency.


def read_safetensors(filename: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file, memory-mapped, in their stored dtype."""
  with open(filename, 'rb') as f:
    header_len = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(header_len))
  data = np.memmap(filename, dtype=np.uint8, mode='r', offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _ST_DTYPES:
      raise HfFormatError(f'{filename}: tensor {name} has unsupported dtype {info["dtype"]}.')
    start, end = info['data_offsets']
    out[name] = data[start:end].view(_ST_DTYPES[info['dtype']]).reshape(info['shape'])
  return out


def write_safetensors(filename: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes `tensors` (name -> array) as one .safetensors file, names sorted."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    header[name] = {'dtype': _ST_NAMES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  header['__metadata__'] = {'format': 'pt'}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  with open(filename, 'wb') as f:
    f.write(len(blob).to_bytes(8, 'little'))
    f.write(blob)
    for array in arrays:
      f.write(array.tobytes())


def read_hf_dir(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json as a dict, all tensors) of a HF checkpoint directory.

  Reads model.safetensors, or the shards named by model.safetensors.index.json, or every
  *.safetensors file. Raises HfFormatError for a missing directory or file.
  """
  if not os.path.isdir(path):
    raise HfFormatError(f'{path} is not a directory.')
  config_file = os.path.join(path, 'config.json')
  if not os.path.isfile(config_file):
    raise HfFormatError(f'{path} has no config.json; expected a Hugging Face checkpoint '
                        'directory (config.json + *.safetensors).')
  with open(config_file) as f:
    hf_config = json.load(f)
  architecture(hf_config)  # Unsupported architectures fail before any weight is read.
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
  if not files:
    raise HfFormatError(f'{path} has no *.safetensors weights (PyTorch .bin files are not '
                        'supported; convert them with transformers save_pretrained).')
  tensors = {}
  for name in files:
    filename = os.path.join(path, name)
    if not os.path.isfile(filename):
      raise HfFormatError(f'{filename}, listed in {INDEX_FILE}, is missing.')
    tensors.update(read_safetensors(filename))
  return hf_config, tensors


# ---------------------------------------------------------------------------------------
# Configs.


def default_config() -> ml_collections.ConfigDict:
  """experiments/default.py's full config (the repo's defaults for every field)."""
  filename = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'experiments', 'default.py')
  spec = importlib.util.spec_from_file_location('_xenith_default_config', filename)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def architecture(hf_config: dict[str, Any]) -> str:
  """'MistralForCausalLM' or 'MixtralForCausalLM'; HfFormatError for anything else."""
  archs = hf_config.get('architectures') or []
  arch = archs[0] if archs else _MODEL_TYPES.get(hf_config.get('model_type'))
  if arch not in SUPPORTED_ARCHITECTURES:
    raise HfFormatError(
        f'Unsupported architecture {arch or hf_config.get("model_type")!r}; Xenith imports '
        f'{" and ".join(SUPPORTED_ARCHITECTURES)}.')
  return arch


def _rope_theta(hf_config: dict[str, Any]) -> float:
  rope = hf_config.get('rope_parameters') or hf_config.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    raise HfFormatError(f'Unsupported RoPE type {rope_type!r}; only plain RoPE is mapped.')
  return float(rope.get('rope_theta', hf_config.get('rope_theta', 10_000.0)))


def model_config_from_hf(hf_config: dict[str, Any]) -> ml_collections.ConfigDict:
  """A Xenith `config.model` (all fields, defaults elsewhere) equivalent to `hf_config`."""
  arch = architecture(hf_config)
  if hf_config.get('hidden_act', 'silu') != 'silu':
    raise HfFormatError(f'Unsupported hidden_act {hf_config["hidden_act"]!r}; Xenith '
                        'uses SwiGLU (silu).')
  hidden, heads = hf_config['hidden_size'], hf_config['num_attention_heads']
  model = default_config().model
  model.vocab_size = hf_config['vocab_size']
  model.embed_dim = hidden
  model.num_layers = hf_config['num_hidden_layers']
  model.num_heads = heads
  model.num_kv_heads = hf_config.get('num_key_value_heads') or heads
  model.head_dim = hf_config.get('head_dim') or hidden // heads
  model.mlp_dim = hf_config['intermediate_size']
  model.norm = 'rmsnorm'
  model.norm_eps = float(hf_config.get('rms_norm_eps', 1e-6))
  model.tie_embeddings = bool(hf_config.get('tie_word_embeddings', False))
  model.rope_theta = _rope_theta(hf_config)
  model.rope_scaling.type = 'none'
  model.rope_scaling.original_max_position = int(
      hf_config.get('max_position_embeddings', model.rope_scaling.original_max_position))
  model.dropout_rate = 0.0
  model.lora.rank = 0
  window = hf_config.get('sliding_window')
  if window and hf_config.get('use_sliding_window', True):
    model.attention.window_sizes = (int(window),)
    model.attention.full_attention_layers = 0
    model.attention.num_global_tokens = 0
    model.attention.dynamic_windows = False
  if arch == 'MixtralForCausalLM':
    model.moe.num_experts = hf_config['num_local_experts']
    model.moe.num_experts_per_token = hf_config['num_experts_per_tok']
    model.moe.expert_mlp_dim = hf_config['intermediate_size']
    model.moe.num_shared_experts = 0
    model.moe.first_dense_layers = 0
    model.moe.moe_every = 1
    model.moe.normalize_top_k = True  # MixtralTopKRouter renormalises the top-k.
    model.moe.load_balance_loss_weight = float(hf_config.get('router_aux_loss_coef', 0.02))
    model.moe.router_z_loss_weight = 0.0  # Mixtral trains without a z-loss.
  else:
    model.moe.num_experts = 0
  return model


def check_exportable(model: ml_collections.ConfigDict) -> None:
  """HfFormatError unless `model` (a `config.model`) has a Mistral/Mixtral equivalent."""
  problems = []
  if model.norm != 'rmsnorm':
    problems.append(f'norm={model.norm!r} (HF has rmsnorm)')
  if model.rope_scaling.type != 'none':
    problems.append(f'rope_scaling.type={model.rope_scaling.type!r}')
  if model.get('lora') and model.lora.rank:
    problems.append('LoRA adapters (merge them first: launch/merge_lora.py)')
  memory = model.get('memory')
  if memory and memory.chunk_size:
    problems.append('chunk-summary memory (memory.chunk_size > 0)')
  attn = model.get('attention')
  if attn and attn.window_sizes and (
      len(set(attn.window_sizes)) > 1 or attn.num_global_tokens or attn.dynamic_windows
      or attn.full_attention_layers):
    problems.append('an attention pattern other than one sliding window in every layer')
  moe = model.moe
  if moe.num_experts:
    if moe.num_shared_experts:
      problems.append('shared experts')
    if moe.first_dense_layers or moe.moe_every != 1:
      problems.append('dense layers between MoE layers')
    if not moe.normalize_top_k:
      problems.append('moe.normalize_top_k=False (Mixtral renormalises)')
    if (moe.expert_mlp_dim or model.mlp_dim) != model.mlp_dim:
      problems.append('moe.expert_mlp_dim != mlp_dim')
  if problems:
    raise HfFormatError('This model has no Mistral/Mixtral equivalent: ' + '; '.join(problems))


def hf_config_from_model(model: ml_collections.ConfigDict,
                         base: dict[str, Any] | None = None,
                         dtype: str = 'float32') -> dict[str, Any]:
  """The config.json for `model`; fields of `base` (an imported config) not set here are
  kept (token ids, sliding_window, max_position_embeddings, ...)."""
  check_exportable(model)
  moe = model.moe.num_experts > 0
  arch = 'MixtralForCausalLM' if moe else 'MistralForCausalLM'
  out = dict(base or {})
  if out and out.get('architectures', [arch])[0] != arch:
    out = {}  # The base describes another architecture: start afresh.
  out.update({
      'architectures': [arch],
      'model_type': 'mixtral' if moe else 'mistral',
      'vocab_size': model.vocab_size,
      'hidden_size': model.embed_dim,
      'num_hidden_layers': model.num_layers,
      'num_attention_heads': model.num_heads,
      'num_key_value_heads': model.num_kv_heads,
      'head_dim': model.head_dim,
      'intermediate_size': model.mlp_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': model.norm_eps,
      'tie_word_embeddings': bool(model.tie_embeddings),
      'rope_parameters': {'rope_theta': model.rope_theta, 'rope_type': 'default'},
      'attention_dropout': 0.0,
      'dtype': dtype,
  })
  out.pop('rope_theta', None)
  out.pop('rope_scaling', None)
  out.pop('torch_dtype', None)
  out.setdefault('max_position_embeddings', model.rope_scaling.original_max_position)
  attn = model.get('attention')
  if attn and attn.window_sizes:
    out['sliding_window'] = int(attn.window_sizes[0])
    out['use_sliding_window'] = True
  elif out.get('use_sliding_window', True):
    out['sliding_window'] = None
  if moe:
    out.update({'num_local_experts': model.moe.num_experts,
                'num_experts_per_tok': model.moe.num_experts_per_token})
    out.setdefault('router_aux_loss_coef', model.moe.load_balance_loss_weight)
  return out


# ---------------------------------------------------------------------------------------
# Weights.


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


def hf_to_params(tensors: dict[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
  """Xenith params (nested dict of float32 NumPy arrays) from HF tensors."""
  H, N, K, D = model.embed_dim, model.num_heads, model.num_kv_heads, model.head_dim
  used = set()

  def get(name):
    if name not in tensors:
      raise HfFormatError(f'Tensor {name} is missing from the checkpoint.')
    used.add(name)
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
  if model.tie_embeddings:
    norm = _fold_norm_scale(norm, math.sqrt(H))
    used.add('lm_head.weight')  # Some tied checkpoints store a copy; it is not needed.
  else:
    flat[('head', 'kernel')] = linear('lm_head')
  flat[('final_norm', 'scale')] = norm

  unused = sorted(set(tensors) - used)
  unused = [n for n in unused if not n.endswith('rotary_emb.inv_freq')]
  if unused:
    raise HfFormatError(f'{len(unused)} tensors do not fit the config, e.g. {unused[:3]}.')
  _place_blocks(flat, blocks, model)
  return traverse_util.unflatten_dict(flat)


def _place_blocks(flat, blocks, model) -> None:
  if not model.scan_layers:
    for i, b in enumerate(blocks):
      flat.update({(f'block_{i}',) + k: v for k, v in b.items()})
    return
  group = 'moe_layers' if model.moe.num_experts else 'layers'
  for key in blocks[0]:
    flat[(group,) + key] = np.stack([b[key] for b in blocks])


def _blocks(flat, model) -> list[dict]:
  if not model.scan_layers:
    return [{k[1:]: v for k, v in flat.items() if k[0] == f'block_{i}'}
            for i in range(model.num_layers)]
  group = 'moe_layers' if model.moe.num_experts else 'layers'
  stacked = {k[1:]: v for k, v in flat.items() if k[0] == group}
  return [{k: v[i] for k, v in stacked.items()} for i in range(model.num_layers)]


def params_to_hf(params: dict, model: ml_collections.ConfigDict,
                 dtype: str = 'float32') -> dict[str, np.ndarray]:
  """HF tensors (name -> array in `dtype`) from Xenith params."""
  check_exportable(model)
  np_dtype = _ST_DTYPES[_DTYPE_NAMES[dtype]]
  flat = {k: _f32(v) for k, v in traverse_util.flatten_dict(params).items()}
  H, N, D = model.embed_dim, model.num_heads, model.head_dim
  out = {}

  def put(name, value):
    out[name] = np.ascontiguousarray(value).astype(np_dtype)

  put('model.embed_tokens.weight', flat[('embed', 'embedding')])
  for i, b in enumerate(_blocks(flat, model)):
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


# ---------------------------------------------------------------------------------------
# Public API.


def _hf_dtype(hf_config: dict[str, Any]) -> str:
  dtype = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
  return dtype if dtype in _DTYPE_NAMES else 'float32'


def load_hf(path: str, *, scan_layers: bool = False
            ) -> tuple[ml_collections.ConfigDict, dict, dict[str, Any]]:
  """(Xenith `config.model`, params as NumPy float32, HF config dict) from a HF directory."""
  hf_config, tensors = read_hf_dir(path)
  model = model_config_from_hf(hf_config)
  model.scan_layers = scan_layers
  return model, hf_to_params(tensors, model), hf_config


def from_pretrained(path: str, *, dtype: str = 'float32', scan_layers: bool = False,
                    moe_dispatch: str | None = None):
  """(module, params) from a HF Mixtral/Mistral directory, a `save_pretrained` export, or
  a workdir written by `main.py --mode=import_hf`.

  `module.apply({'params': params}, tokens)` gives logits [batch, seq, vocab] float32.
  dtype: the compute dtype ('float32' or 'bfloat16'; params are float32 either way).
  The HF config is kept as `module.hf_config`, so `save_pretrained` writes it back.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from xenith.model import build  # pylint: disable=g-import-not-at-top

  if os.path.isfile(os.path.join(path, CONFIG_JSON)):  # An import_hf workdir.
    model, params, hf_config = _load_workdir(path)
    if scan_layers != model.scan_layers:
      flat = traverse_util.flatten_dict(params)
      blocks = _blocks(flat, model)
      flat = {k: v for k, v in flat.items() if k[0] in ('embed', 'final_norm', 'head')}
      model.scan_layers = scan_layers
      _place_blocks(flat, blocks, model)
      params = traverse_util.unflatten_dict(flat)
  else:
    model, params, hf_config = load_hf(path, scan_layers=scan_layers)
  model.dtype = dtype
  if moe_dispatch:
    model.moe.dispatch = moe_dispatch
  module = build.make_model(model)
  object.__setattr__(module, 'hf_config', hf_config)
  return module, jax.tree.map(jnp.asarray, params)


def save_hf(path: str, model: ml_collections.ConfigDict, params: dict,
            hf_config: dict[str, Any] | None = None, dtype: str | None = None) -> None:
  """Writes `path`/config.json and `path`/model.safetensors."""
  dtype = dtype or (_hf_dtype(hf_config) if hf_config else 'float32')
  tensors = params_to_hf(params, model, dtype)
  config = hf_config_from_model(model, hf_config, dtype)
  os.makedirs(path, exist_ok=True)
  write_safetensors(os.path.join(path, SAFETENSORS_FILE), tensors)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  stale = os.path.join(path, INDEX_FILE)
  if os.path.exists(stale):
    os.remove(stale)


def save_pretrained(path: str, module, params: dict, *,
                    hf_config: dict[str, Any] | None = None, dtype: str | None = None
                    ) -> None:
  """Writes `module` (a Xenith `Decoder`) with `params` as a HF checkpoint directory.

  config.json + model.safetensors, loadable by transformers (MixtralForCausalLM for MoE
  models, MistralForCausalLM otherwise) and by `from_pretrained`. hf_config: fields to
  keep (default: `module.hf_config` when the module came from `from_pretrained`).
  dtype: of the saved tensors; default that of the imported checkpoint, else float32.
  Raises HfFormatError for models HF cannot express (LoRA adapters, shared experts...).
  """
  if hf_config is None:
    hf_config = getattr(module, 'hf_config', None)
  model = module.config.as_configdict()
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(np.asarray, params)
  save_hf(path, model, params, hf_config, dtype)


# ---------------------------------------------------------------------------------------
# Workdirs (main.py --mode=import_hf / export_hf).

CONFIG_JSON = 'xenith_config.json'  # Flattened overrides of experiments/default.py.
CONFIG_PY = 'config.py'  # The same, as a config file for main.py --config.
HF_CONFIG_JSON = 'hf_config.json'  # The imported config.json (fields Xenith has no use for).
IMPORT_STEP = 0

_CONFIG_PY_TEMPLATE = '''"""Xenith config of the Hugging Face checkpoint {source}.

Written by main.py --mode=import_hf. Fine-tune the imported weights in a new workdir:

  python main.py --config={config_py} --workdir=<new run dir>

config.init_from_checkpoint loads them; the data's tokenizer must match the model's
vocabulary (config.data.tokenizer).
"""

import json

from experiments import default

OVERRIDES = json.loads(r\'\'\'{overrides}\'\'\')


def get_config(arg=None):
  config = default.get_config(arg)
  config.update_from_flattened_dict(OVERRIDES)
  return config
'''


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {'.'.join(k): v for k, v in traverse_util.flatten_dict(config.to_dict()).items()}


def config_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields of `config` that differ from experiments/default.py, flattened."""
  base = _flat_config(default_config())
  return {k: v for k, v in _flat_config(config).items() if base.get(k) != v}


def config_from_overrides(overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  config = default_config()
  config.update_from_flattened_dict(overrides)
  return config


def import_to_workdir(hf_dir: str, workdir: str) -> ml_collections.ConfigDict:
  """HF checkpoint -> `workdir`/checkpoints/0 (Orbax params) + config files; the config."""
  from xenith import checkpointing  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  model, params, hf_config = load_hf(hf_dir)
  config = default_config()
  config.model = model
  if model.vocab_size == 32000:  # Mistral-7B v0.1 / Mixtral-8x7B's SentencePiece model.
    config.data.tokenizer = 'mixtral'
  step_dir = os.path.join(workdir, 'checkpoints', str(IMPORT_STEP))
  if os.path.exists(step_dir):
    raise HfFormatError(f'{step_dir} exists already; import into a new --workdir.')
  config.init_from_checkpoint = step_dir
  os.makedirs(workdir, exist_ok=True)
  checkpointing.save_params(os.path.join(step_dir, 'state'), params)
  overrides = config_overrides(config)
  with open(os.path.join(workdir, CONFIG_JSON), 'w') as f:
    json.dump(overrides, f, indent=2, sort_keys=True)
  with open(os.path.join(workdir, HF_CONFIG_JSON), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  config_py = os.path.join(workdir, CONFIG_PY)
  with open(config_py, 'w') as f:
    f.write(_CONFIG_PY_TEMPLATE.format(
        source=f'imported from {os.path.abspath(hf_dir)}', config_py=config_py,
        overrides=json.dumps(overrides, indent=2, sort_keys=True)))
  return config


def _load_workdir(workdir: str, config: ml_collections.ConfigDict | None = None
                  ) -> tuple[ml_collections.ConfigDict, dict, dict[str, Any] | None]:
  """(config.model, NumPy params, HF config or None) of the newest params in `workdir`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from xenith import checkpointing  # pylint: disable=g-import-not-at-top
  from xenith.model import build  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  if config is None:
    config_json = os.path.join(workdir, CONFIG_JSON)
    if not os.path.isfile(config_json):
      raise HfFormatError(f'{workdir} has no {CONFIG_JSON} (not an import); pass the '
                          "run's --config.")
    with open(config_json) as f:
      config = config_from_overrides(json.load(f))
  model = config.model
  check_exportable(model)
  # HF fields Xenith has no use for: from an import's workdir, or, for a fine-tune of an
  # import, from the import it started from (init_from_checkpoint = <import>/checkpoints/0).
  hf_config = None
  init = config.get('init_from_checkpoint') or ''
  for d in (workdir, os.path.dirname(os.path.dirname(os.path.abspath(init))) if init else ''):
    name = os.path.join(d, HF_CONFIG_JSON)
    if d and os.path.isfile(name):
      with open(name) as f:
        hf_config = json.load(f)
      break
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = nn.meta.unbox(jax.eval_shape(
      build.make_model(model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
  )['params'])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
  params = jax.tree.map(np.asarray, checkpointing.load_params(workdir, abstract))
  return model, params, hf_config


def export_from_workdir(workdir: str, hf_dir: str,
                        config: ml_collections.ConfigDict | None = None,
                        dtype: str | None = None) -> None:
  """The newest params in `workdir` (a train run or an import) -> HF checkpoint `hf_dir`.

  config: the run's config; default `workdir`/xenith_config.json (written by the import).
  """
  model, params, hf_config = _load_workdir(workdir, config)
  save_hf(hf_dir, model, params, hf_config, dtype)
