"""LoRA: low-rank adapters on chosen linear layers, base freezing, and merging.

A linear layer with an adapter computes

  y = x @ W + (alpha / r) * dropout(x) @ A @ B,

where r is that layer's rank (`layer_rank`): `lora.target_ranks.<target>` when it is >= 0
(0 = no adapter), else `lora.rank` for the targets in `lora.targets` and no adapter for
the others. So each target has its own rank, and the scale alpha / r is per layer (one
`alpha` for all). A: [*contracted, r] is initialised like W (fan-in scaling) and
B: [r, *features] to zero, so a freshly adapted model computes exactly the base model. The
adapters sit beside the kernel they adapt (`.../query/{kernel, lora_a, lora_b}`); the
computation is `layers.DenseGeneral`'s. Layers are chosen by their module name, so one
name adapts that layer in every block.

The target 'experts' adapts the MoE experts (moe.py, `experts/{gate, up, down}`
[exp, in, out]) with one adapter per expert and weight: `<w>_lora_a` [exp, in, r]
and `<w>_lora_b` [exp, r, out] beside `<w>` (`.../experts/{gate, gate_lora_a,
gate_lora_b, ...}`). The experts compute with the effective weights
W_e + (alpha / r) * A_e @ B_e (formed in float32, then cast to the compute dtype), so
every dispatch method runs unchanged; the backward pass forms the full [exp, in, out]
weight gradient to reach A and B. As the adapter is folded into the weight there is no adapter
input to drop: `lora.dropout` must be 0 when 'experts' has adapters (config_validation
rejects it); it works on the other targets.

Adapter params (`is_adapter`) are those whose name ends in `lora_a` / `lora_b`, and the
language adapters' (`language_adapters.py`);
`merge_lora` folds `lora_a` / `lora_b` into the `kernel` beside them and `<w>_lora_a` /
`<w>_lora_b` into `<w>` (each at its own layer's scale), treating leading axes (the scan
layer axis, the expert axis) as batch axes.
"""

from collections.abc import Mapping
import math
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

# Module names of the linear layers that can carry adapters.
TARGETS = (
    'query', 'key', 'value', 'out',  # Attention projections (attention.py).
    'gate', 'up', 'down',  # SwiGLU MLP (mlp.py).
    'head',  # Untied output head (transformer.py); the tied head is the embedding.
    'experts',  # MoE experts' gate, up and down (moe.py), one adapter per expert.
)
# LoRA adapter param names end in these (`lora_a` beside a `kernel`, `<w>_lora_a` beside
# a param `<w>`).
ADAPTER_PARAMS = ('lora_a', 'lora_b')
# The language adapters' params (language_adapters.py). Params named by neither tuple
# are the base model.
LANGUAGE_ADAPTER_PARAMS = ('adapter_down', 'adapter_up')
# Logical axis name of the rank axis (replicated: it is small).
RANK_AXIS = 'lora_rank'


def _settings(model_config):
  # Configs built before LoRA existed (or by hand) have no lora block: LoRA is off.
  return model_config.get('lora') if hasattr(model_config, 'get') else None


def enabled(model_config: ml_collections.ConfigDict) -> bool:
  """Whether some target has adapters (`layer_rank` > 0 for one of `TARGETS`)."""
  return any(layer_rank(model_config, t) for t in TARGETS)


def trains_only_adapters(model_config: ml_collections.ConfigDict) -> bool:
  """Whether the base is frozen: LoRA adapters on and `lora.train_only_adapters`, or
  language adapters (`language_adapters.py`) on and their `train_only_adapters`. All
  adapters (`is_adapter`) then train, whichever kind asked."""
  languages = model_config.get('language_adapters') if hasattr(model_config, 'get') else None
  return ((enabled(model_config) and bool(model_config.lora.train_only_adapters))
          or bool(languages and languages.languages and languages.train_only_adapters))


def scale(model_config: ml_collections.ConfigDict, layer_name: str) -> float:
  """alpha / r, the factor on the adapter output of the layer named `layer_name` (rank r)."""
  rank = layer_rank(model_config, layer_name)
  if not rank:
    raise ValueError(f'The layer {layer_name!r} has no LoRA adapter.')
  return model_config.lora.alpha / rank


def layer_rank(model_config: ml_collections.ConfigDict, layer_name: str | None) -> int:
  """The adapter rank of the linear layer named `layer_name`; 0 = no adapter.

  `lora.target_ranks.<layer_name>` if it is >= 0, else `lora.rank` if the layer is in
  `lora.targets`, else 0. Configs without `target_ranks` (older ones) use `rank` alone.
  """
  settings = _settings(model_config)
  if settings is None or layer_name not in TARGETS:
    return 0
  target_ranks = settings.get('target_ranks')
  own = target_ranks.get(layer_name, -1) if target_ranks is not None else -1
  if own >= 0:
    return own
  return settings.rank if layer_name in settings.targets else 0


def ranks(model_config: ml_collections.ConfigDict) -> dict[str, int]:
  """{target: rank} for the targets that have adapters."""
  return {t: r for t in TARGETS if (r := layer_rank(model_config, t))}


# Modules that are new beside a trained base and train while it is frozen, like the
# adapters: a classifier's label head (classifier.py).
TRAINED_WITH_ADAPTERS = ('classifier',)


def is_adapter_name(name: Any) -> bool:
  """Whether `name`, one key of a param path, names an adapter param: LoRA factors,
  language adapters, or a module that trains with them (`TRAINED_WITH_ADAPTERS`)."""
  return isinstance(name, str) and (name.endswith(ADAPTER_PARAMS + LANGUAGE_ADAPTER_PARAMS)
                                    or name in TRAINED_WITH_ADAPTERS)


def is_lora_factor_name(name: Any) -> bool:
  """Whether `name` names a LoRA factor (A or B), which merging folds into its weight."""
  return isinstance(name, str) and name.endswith(ADAPTER_PARAMS)


def is_adapter(path: tuple[Any, ...]) -> bool:
  """Whether a `jax.tree_util` key path (boxed or not) leads to an adapter param."""
  return any(is_adapter_name(getattr(k, 'key', None)) for k in path)


def adapter_mask(params: Any) -> Any:
  """A tree like `params` with True at adapters and False at base params."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter(p), params)


def _stop_base_gradients(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x if is_adapter(p) else jax.lax.stop_gradient(x), params)


def frozen_base(module_class: type[nn.Module]) -> type[nn.Module]:
  """`module_class` whose base params pass no gradient (adapters train).

  The optimizer's freezing (`optimizer.create_optimizer`) alone would give the same
  updates, but the backward pass would still compute every base weight gradient (about a
  third of a train step) and `train/grad_norm` would count them. The param tree is
  unchanged.
  """
  # mutable=True, not init=True: with init=True flax re-reads the params from the
  # mutable collections only, so an apply with another mutable collection (the MoE
  # router stats) would lose them. mutable=True lets init create the params; in an
  # apply they stay immutable, as the caller made them.
  # `forward` is the decoders' one compact method (their __call__ goes through it).
  return nn.map_variables(module_class, 'params', trans_in_fn=_stop_base_gradients,
                          mutable=True, methods=['forward'])


def _low_rank_product(a: jax.Array, b: jax.Array, kernel_shape) -> jax.Array:
  """A @ B in the kernel's shape; leading axes shared by A, B and the kernel (the scan
  layer axis, an expert axis) are batch axes.

  a: [*lead, *contracted, rank]; b: [*lead, rank, *features] -> [*lead, *contracted,
  *features].
  """
  num_lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  lead = a.shape[:num_lead]
  rank = a.shape[-1]
  a = a.reshape(*lead, -1, rank)
  b = b.reshape(*lead, rank, -1)
  product = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return product.reshape(kernel_shape)


def adapted_weight(kernel: jax.Array, a: jax.Array, b: jax.Array, factor: float,
                   dtype: Any = None) -> jax.Array:
  """kernel + factor * A @ B, formed in float32, in `dtype` (default: the kernel's).

  Shapes as in `_low_rank_product`; leading axes of all three are batch axes.
  """
  delta = factor * _low_rank_product(
      a.astype(jnp.float32), b.astype(jnp.float32), kernel.shape)
  dtype = kernel.dtype if dtype is None else dtype
  return (kernel.astype(jnp.float32) + delta).astype(dtype)


def _adapted_param(adapter_a: str) -> str:
  """The param an A adapter adapts: 'lora_a' -> 'kernel', '<w>_lora_a' -> '<w>'."""
  return adapter_a[:-len('_lora_a')] if adapter_a != 'lora_a' else 'kernel'


def merge_lora(params: Mapping[str, Any],
               model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Folds the adapters into the weights they adapt: W + (alpha / r) * A @ B.

  r is the rank of the layer holding the adapter (its module name is the target, e.g.
  `.../query/lora_a` or `.../experts/gate_lora_a`), checked against A's last axis.

  Args:
    params: unboxed params of a model with adapters (`enabled(model_config)`).
    model_config: that model's `config.model`.

  Returns:
    Params of the plain model (`plain_config(model_config)`), adapters removed; its
    outputs equal the adapted model's up to float rounding.
  """
  if not enabled(model_config):
    raise ValueError('merge_lora needs a config with adapters (model.lora.rank or '
                     'model.lora.target_ranks > 0).')

  def merge(tree, module_name):
    if not isinstance(tree, Mapping):
      return tree
    tree = dict(tree)
    for name_a in [k for k in tree if isinstance(k, str) and k.endswith('lora_a')]:
      name_b, target = name_a[:-1] + 'b', _adapted_param(name_a)
      a, b = tree.pop(name_a), tree.pop(name_b)
      rank = layer_rank(model_config, module_name)
      if a.shape[-1] != rank:
        raise ValueError(f'Adapter {module_name}/{name_a} has rank {a.shape[-1]}; the config '
                         f'gives {module_name!r} rank {rank}.')
      tree[target] = adapted_weight(tree[target], a, b, model_config.lora.alpha / rank)
    return {k: merge(v, k) for k, v in tree.items()}

  return merge(params, None)


def plain_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `model_config` without adapters: the config of `merge_lora`'s output."""
  plain = ml_collections.ConfigDict(model_config.to_dict())
  plain.lora.rank = 0
  for target in plain.lora.get('target_ranks', {}):
    plain.lora.target_ranks[target] = -1  # Follows `rank`: none.
  return plain


def num_adapter_params(params: Any) -> int:
  """Number of adapter parameters in `params`."""
  return sum(math.prod(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)
             if is_adapter(p))
