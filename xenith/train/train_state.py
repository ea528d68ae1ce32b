"""The train state and its creation, already sharded over the mesh."""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xenith import sharding


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds besides the data iterator: step, params, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: optax.OptState


def _init_fn(model: nn.Module, tx: optax.GradientTransformation,
             seq_len: int) -> Callable[[jax.Array], TrainState]:
  """State initialiser whose params keep their logical-axis boxes."""
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(rng, tokens)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=_drop_empty_boxes(tx.init(params)))
  return init


def _drop_empty_boxes(tree):
  """Unwraps logical-axis boxes that hold no array.

  A masked optimizer (LoRA's frozen base) keeps the params' boxes around its
  placeholders for unoptimized params; such a box has no array to shard.
  """
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree_util.tree_map(
      lambda x: x.unbox(apply_constraint=False)
      if is_box(x) and not jax.tree_util.tree_leaves(x) else x,
      tree, is_leaf=is_box)


def abstract_train_state(model, tx, seq_len, mesh, rules) -> tuple[TrainState, TrainState]:
  """Shapes and shardings of the state, from `jax.eval_shape` (nothing allocated).

  Returns (abstract state with shardings attached, shardings). Raises ConfigError when
  the mesh cannot split some parameter evenly.
  """
  boxed = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.key(0))
  shardings = sharding.logical_to_shardings(boxed, mesh, rules)
  sharding.check_divisible(boxed, shardings)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      sharding.unbox(boxed), shardings)
  return abstract, shardings


def init_train_state(model, tx, seq_len, rng, shardings) -> TrainState:
  """Initialises the state directly into its shardings (never whole on one device)."""
  init = _init_fn(model, tx, seq_len)
  return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
