"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

import jax
import ml_collections
import optax

from xenith.model import classifier
from xenith.model import lora


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `end_lr_fraction` of it."""
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.learning_rate,
      warmup_steps=opt.warmup_steps,
      decay_steps=config.num_train_steps,
      end_value=opt.learning_rate * opt.end_lr_fraction)


# Params named so are elementwise (norm scales and biases): they never decay, whatever
# their rank (a scan stacks a norm scale into [layers, embed]).
NO_DECAY_PARAMS = ('scale', 'bias')


def _param_name(path) -> str | None:
  """The param's own name: the last dict key of its path (a logical-axis box adds an
  attribute key after it)."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return names[-1] if names else None


def decays(path) -> bool:
  """Whether weight decay applies to the param at `path` (a `jax.tree_util` key path).

  Every weight matrix decays: kernels, embeddings, experts, LoRA adapters, the memory
  summarizer's queries. Norm scales and biases (`NO_DECAY_PARAMS`) do not.
  """
  return _param_name(path) not in NO_DECAY_PARAMS


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def _adapter_labels(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 'adapter' if lora.is_adapter(p) else 'frozen', params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer for `config.optimizer`, stepping `config.num_train_steps` times.

  With `config.model.lora.train_only_adapters` it updates only the LoRA adapters (and a
  classifier's head; with `classification.freeze_base` only those): the base params get
  zero updates (no weight decay either) and no optimizer state, and
  gradients are clipped by the adapters' norm.
  """
  opt = config.optimizer
  tx = optax.adamw(
      learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
      weight_decay=opt.weight_decay, mask=_decay_mask)
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  if classifier.freezes_base(config):
    tx = optax.multi_transform(
        {'adapter': tx, 'frozen': optax.set_to_zero()}, _adapter_labels)
  return tx
