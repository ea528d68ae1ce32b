"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `end_lr_fraction` of it."""
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.learning_rate,
      warmup_steps=opt.warmup_steps,
      decay_steps=config.num_train_steps,
      end_value=opt.learning_rate * opt.end_lr_fraction)


def _decay_mask(params):
  # Matrices decay; norm scales and biases (vectors) do not.
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer for `config.optimizer`, stepping `config.num_train_steps` times."""
  opt = config.optimizer
  adamw = optax.adamw(
      learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
      weight_decay=opt.weight_decay, mask=_decay_mask)
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
  return adamw
