"""MoE variant of the default experiment: the same decoder with routed-expert MLPs.

The first layer keeps its dense MLP; the others are Mixture-of-Experts layers (top-2
of several SwiGLU experts whose summed width matches the dense MLP's FLOPs per token)
with the load-balance and z router losses. Router losses and expert loads go to
TensorBoard (`train/aux_loss`, `moe/layer_<i>/...`).

  python main.py --config=experiments/moe.py --workdir=runs/moe
  python main.py --config=experiments/moe.py:size=tiny --workdir=runs/moe_tiny \
      --config.model.moe.dispatch=capacity
"""

import ml_collections

from experiments import default

# MoE fields per size (the rest of the model is default.SIZES[size]). Top-2 of experts
# half the dense mlp_dim wide: the same active FLOPs as the dense model, E/2 times its
# MLP parameters.
MOE_SIZES = {
    'tiny': dict(num_experts=4, expert_mlp_dim=64, first_dense_layers=1),
    'small': dict(num_experts=8, expert_mlp_dim=384, first_dense_layers=1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config of `arg`'s size (tiny or small) with MoE layers on."""
  size = default.parse_arg(arg).get('size', 'small')
  if size not in MOE_SIZES:
    raise ValueError(f'Unknown size {size!r} for the MoE experiment; choose one of '
                     f'{sorted(MOE_SIZES)}.')
  config = default.get_config(arg)
  config.model.moe.update(MOE_SIZES[size])
  config.model.moe.num_experts_per_token = 2
  return config
