"""HF config.json (Mistral / Mixtral) <-> Xenith `config.model`.

Sliding window (`sliding_window`, when `use_sliding_window` is not False): every layer
gets that window (`attention.window_sizes=(W,)`, no global tokens), the mask HF applies
(query i sees key j iff i - j < W). Xenith models HF cannot express (several windows,
global tokens, LoRA adapters, shared experts, ...: `export_problems`) are saved in
Xenith's native format instead (native.py).
"""

from typing import Any

import ml_collections

from xenith import config_defaults
from xenith.errors import HfFormatError
from xenith.model import lora

SUPPORTED_ARCHITECTURES = ('MistralForCausalLM', 'MixtralForCausalLM')
_MODEL_TYPES = {'mistral': 'MistralForCausalLM', 'mixtral': 'MixtralForCausalLM'}
# config.json of Xenith's native format (native.py), which transformers cannot load.
NATIVE_ARCHITECTURE = 'XenithForCausalLM'
NATIVE_MODEL_TYPE = 'xenith'


def _architectures(hf_config: dict[str, Any]) -> list[str]:
  archs = hf_config.get('architectures') or []
  return [archs] if isinstance(archs, str) else archs


def is_native(config_json: dict[str, Any]) -> bool:
  """Whether a config.json (as a dict) describes a Xenith-native checkpoint."""
  return (config_json.get('model_type') == NATIVE_MODEL_TYPE
          or NATIVE_ARCHITECTURE in _architectures(config_json))


def architecture(hf_config: dict[str, Any]) -> str:
  """'MistralForCausalLM' or 'MixtralForCausalLM'; HfFormatError for anything else."""
  if is_native(hf_config):
    raise HfFormatError(
        'This is a Xenith-native checkpoint (model_type "xenith": a model Mistral/Mixtral '
        'cannot express), not a Hugging Face one; load it with xenith.from_pretrained.')
  archs = _architectures(hf_config)
  arch = archs[0] if archs else _MODEL_TYPES.get(hf_config.get('model_type'))
  if arch not in SUPPORTED_ARCHITECTURES:
    raise HfFormatError(
        f'Unsupported architecture {arch or hf_config.get("model_type")!r}; Xenith imports '
        f'{" and ".join(SUPPORTED_ARCHITECTURES)}.')
  return arch


def _number(hf_config: dict[str, Any], key: str, default: float) -> float:
  """hf_config[key], a number >= 0, or `default` if it is absent."""
  value = hf_config.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
    raise HfFormatError(f'{key} must be a number >= 0, found {value!r}.')
  return float(value)


def _count(hf_config: dict[str, Any], key: str, default: int | None = None) -> int:
  """hf_config[key], a positive integer; without a default the key is required."""
  value = hf_config.get(key)
  if value is None and default is not None:
    return default
  if value is None:
    raise HfFormatError(f'missing the required key {key!r}.')
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise HfFormatError(f'{key} must be a positive integer, found {value!r}.')
  return value


def _rope_theta(hf_config: dict[str, Any]) -> float:
  # transformers 5 writes `rope_parameters`, 4.x `rope_theta` (+ `rope_scaling`).
  rope = hf_config.get('rope_parameters') or hf_config.get('rope_scaling') or {}
  if not isinstance(rope, dict):
    raise HfFormatError(f'rope_parameters / rope_scaling must be an object, found {rope!r}.')
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    raise HfFormatError(f'Unsupported RoPE type {rope_type!r}; only plain RoPE is mapped.')
  return _number({**hf_config, **rope}, 'rope_theta', 10_000.0)


def _head_counts(hf_config: dict[str, Any]) -> tuple[int, int, int]:
  """(num_attention_heads, num_key_value_heads, head_dim), checked to fit together."""
  hidden, heads = _count(hf_config, 'hidden_size'), _count(hf_config, 'num_attention_heads')
  kv_heads = _count(hf_config, 'num_key_value_heads', heads)
  if heads % kv_heads:
    raise HfFormatError(f'num_attention_heads={heads} is not divisible by '
                        f'num_key_value_heads={kv_heads}.')
  if hf_config.get('head_dim') is None and hidden % heads:
    raise HfFormatError(f'hidden_size={hidden} is not divisible by num_attention_heads='
                        f'{heads}, and there is no head_dim.')
  return heads, kv_heads, _count(hf_config, 'head_dim', hidden // heads)


def model_config_from_hf(hf_config: dict[str, Any]) -> ml_collections.ConfigDict:
  """A Xenith `config.model` (all fields, defaults elsewhere) equivalent to `hf_config`.

  HfFormatError if a required key is missing, a size is no positive integer or the head
  counts do not divide.
  """
  arch = architecture(hf_config)
  if hf_config.get('hidden_act', 'silu') != 'silu':
    raise HfFormatError(f'Unsupported hidden_act {hf_config["hidden_act"]!r}; Xenith '
                        'uses SwiGLU (silu).')
  heads, kv_heads, head_dim = _head_counts(hf_config)
  model = config_defaults.get_config().model
  model.vocab_size = _count(hf_config, 'vocab_size')
  model.embed_dim = hf_config['hidden_size']
  model.num_layers = _count(hf_config, 'num_hidden_layers')
  model.num_heads, model.num_kv_heads, model.head_dim = heads, kv_heads, head_dim
  model.mlp_dim = _count(hf_config, 'intermediate_size')
  model.norm = 'rmsnorm'
  model.norm_eps = _number(hf_config, 'rms_norm_eps', 1e-6)
  model.tie_embeddings = bool(hf_config.get('tie_word_embeddings', False))
  model.rope_theta = _rope_theta(hf_config)
  model.rope_scaling.type = 'none'
  model.rope_scaling.original_max_position = _count(
      hf_config, 'max_position_embeddings', model.rope_scaling.original_max_position)
  model.dropout_rate = 0.0
  model.lora.rank = 0
  if hf_config.get('sliding_window') and hf_config.get('use_sliding_window', True):
    model.attention.window_sizes = (_count(hf_config, 'sliding_window'),)
    model.attention.full_attention_layers = 0
    model.attention.num_global_tokens = 0
    model.attention.dynamic_windows = False
  if arch == 'MixtralForCausalLM':
    model.moe.num_experts = _count(hf_config, 'num_local_experts')
    model.moe.num_experts_per_token = _count(hf_config, 'num_experts_per_tok')
    if model.moe.num_experts_per_token > model.moe.num_experts:
      raise HfFormatError(f'num_experts_per_tok={model.moe.num_experts_per_token} exceeds '
                          f'num_local_experts={model.moe.num_experts}.')
    model.moe.expert_mlp_dim = model.mlp_dim
    model.moe.num_shared_experts = 0
    model.moe.first_dense_layers = 0
    model.moe.moe_every = 1
    model.moe.normalize_top_k = True  # MixtralTopKRouter renormalises the top-k.
    model.moe.load_balance_loss_weight = _number(hf_config, 'router_aux_loss_coef', 0.02)
    model.moe.router_z_loss_weight = 0.0  # Mixtral trains without a z-loss.
  else:
    model.moe.num_experts = 0
  return model


def export_problems(model: ml_collections.ConfigDict) -> list[str]:
  """Every reason why `model` has no Mistral/Mixtral equivalent; [] if it has one."""
  problems = []
  if model.norm != 'rmsnorm':
    problems.append(f'norm={model.norm!r} (HF has rmsnorm)')
  if model.rope_scaling.type != 'none':
    problems.append(f'rope_scaling.type={model.rope_scaling.type!r}')
  if lora.enabled(model):
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
  return problems


def check_exportable(model: ml_collections.ConfigDict) -> None:
  """HfFormatError, naming every reason, unless `model` has a Mistral/Mixtral equivalent."""
  problems = export_problems(model)
  if problems:
    raise HfFormatError('This model has no Mistral/Mixtral equivalent: ' + '; '.join(problems))


def hf_config_from_model(model: ml_collections.ConfigDict,
                         base: dict[str, Any] | None = None,
                         dtype: str = 'float32') -> dict[str, Any]:
  """The config.json for `model` (a `config.model`) with tensors in `dtype`.

  Fields of `base` (e.g. the imported config.json) that Xenith has no field for are kept:
  token ids, max_position_embeddings, ...
  """
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
  # Older spellings of what `rope_parameters` and `dtype` now say.
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


def tensor_dtype(hf_config: dict[str, Any]) -> str:
  """The dtype config.json gives its tensors: 'float32', 'bfloat16' or 'float16'.

  float32 for anything else, so an export of an unusual checkpoint loses no precision.
  """
  dtype = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
  return dtype if dtype in ('float32', 'bfloat16', 'float16') else 'float32'
