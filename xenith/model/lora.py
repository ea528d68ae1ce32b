"""LoRA: low-rank adapters on chosen linear layers, base freezing, and merging.

A linear layer named in `config.model.lora.targets` computes

  y = x @ W + (alpha / rank) * dropout(x) @ A @ B,

with A: [*contracted, rank] initialised like W (fan-in scaling) and B: [rank, *features]
initialised to zero, so a freshly adapted model computes exactly the base model. The
adapters sit beside the kernel they adapt (`.../query/{kernel, lora_a, lora_b}`); the
computation is `layers.DenseGeneral`'s. Layers are chosen by their module name, so one
name adapts that layer in every block.

The target 'experts' adapts the MoE experts (moe.py, `experts/{gate, up, down}`
[exp, in, out]) with one adapter per expert and weight: `<w>_lora_a` [exp, in, rank]
and `<w>_lora_b` [exp, rank, out] beside `<w>` (`.../experts/{gate, gate_lora_a,
gate_lora_b, ...}`). The experts compute with the effective weights
W_e + (alpha / rank) * A_e @ B_e (formed in float32, then cast to the compute dtype), so
every dispatch method runs unchanged; the backward pass forms the full [exp, in, out]
weight gradient to reach A and B. As the adapter is folded into the weight there is no adapter
input to drop: `lora.dropout` must be 0 when 'experts' is targeted (config_validation
rejects it); it works on the other targets.

Adapter params are those whose name ends in `lora_a` / `lora_b` (`is_adapter`);
`merge_lora` folds `lora_a` / `lora_b` into the `kernel` beside them and `<w>_lora_a` /
`<w>_lora_b` into `<w>`, treating leading axes (the scan layer axis, the expert axis) as
batch axes.
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
# Adapter param names end in these (`lora_a` beside a `kernel`, `<w>_lora_a` beside a
# param `<w>`); every other param is the base model.
ADAPTER_PARAMS = ('lora_a', 'lora_b')
# Logical axis name of the rank axis (replicated: it is small).
RANK_AXIS = 'lora_rank'


def _settings(model_config):
  # Configs built before LoRA existed (or by hand) have no lora block: LoRA is off.
  return model_config.get('lora') if hasattr(model_config, 'get') else None


def enabled(model_config: ml_collections.ConfigDict) -> bool:
  """Whether the model has adapters (`lora.rank > 0`)."""
  settings = _settings(model_config)
  return settings is not None and settings.rank > 0


def trains_only_adapters(model_config: ml_collections.ConfigDict) -> bool:
  """Whether the base is frozen: adapters on and `lora.train_only_adapters`."""
  return enabled(model_config) and bool(model_config.lora.train_only_adapters)


def scale(model_config: ml_collections.ConfigDict) -> float:
  """alpha / rank, the factor on the adapters' output."""
  return model_config.lora.alpha / model_config.lora.rank


def layer_rank(model_config: ml_collections.ConfigDict, layer_name: str | None) -> int:
  """The adapter rank of the linear layer named `layer_name`; 0 = no adapter."""
  if not enabled(model_config) or layer_name not in model_config.lora.targets:
    return 0
  return model_config.lora.rank


def is_adapter_name(name: Any) -> bool:
  """Whether `name`, one key of a param path, names an adapter param."""
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
  """Folds the adapters into the weights they adapt: W + (alpha / rank) * A @ B.

  Args:
    params: unboxed params of a model with adapters (`model_config.lora.rank > 0`).
    model_config: that model's `config.model`.

  Returns:
    Params of the plain model (`plain_config(model_config)`), adapters removed; its
    outputs equal the adapted model's up to float rounding.
  """
  if not enabled(model_config):
    raise ValueError('merge_lora needs a config with adapters (model.lora.rank > 0).')
  factor = scale(model_config)

  def merge(tree):
    if not isinstance(tree, Mapping):
      return tree
    tree = dict(tree)
    for name_a in [k for k in tree if isinstance(k, str) and k.endswith('lora_a')]:
      name_b, target = name_a[:-1] + 'b', _adapted_param(name_a)
      a, b = tree.pop(name_a), tree.pop(name_b)
      if a.shape[-1] != model_config.lora.rank:
        raise ValueError(f'Adapter rank {a.shape[-1]} != config rank '
                         f'{model_config.lora.rank}.')
      tree[target] = adapted_weight(tree[target], a, b, factor)
    return {k: merge(v) for k, v in tree.items()}

  return merge(params)


def plain_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `model_config` without adapters: the config of `merge_lora`'s output."""
  plain = ml_collections.ConfigDict(model_config.to_dict())
  plain.lora.rank = 0
  return plain


def num_adapter_params(params: Any) -> int:
  """Number of adapter parameters in `params`."""
  return sum(math.prod(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)
             if is_adapter(p))
