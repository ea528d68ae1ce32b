"""LoRA fine-tuning of a trained checkpoint of experiments/default.py.

The base weights come from the `base` workdir and stay frozen (no gradients, no
optimizer state); rank-8 adapters on every attention and MLP projection train.

  python main.py --config=experiments/default.py --workdir=runs/default
  python main.py --config=experiments/lora_finetune.py:base=runs/default \
      --workdir=runs/lora_finetune
  python main.py --config=experiments/lora_finetune.py:base=runs/tiny,size=tiny ...

`size` must be the base run's size (a mismatch is reported before training). Merge the
adapters into plain weights with launch/merge_lora.py.
"""

import ml_collections

from experiments import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `base=<workdir of the trained model>` and optionally `size=` (default small)."""
  args = default.parse_arg(arg)
  base = args.pop('base', '')
  if not base:
    raise ValueError('experiments/lora_finetune.py needs the base run: '
                     'experiments/lora_finetune.py:base=runs/default')
  size = args.pop('size', 'small')
  if args:
    raise ValueError(f'Unknown config argument(s) {sorted(args)}; known: base, size.')
  config = default.get_config(f'size={size}')
  config.init_from_checkpoint = base

  config.model.lora.rank = 8
  config.model.lora.alpha = 16.0
  config.model.lora.dropout = 0.05
  config.model.lora.targets = ('query', 'key', 'value', 'out', 'gate', 'up', 'down')
  config.model.lora.train_only_adapters = True

  # A short run at a lower peak learning rate than pre-training; the adapters start
  # from B = 0, i.e. exactly the base model, so no long warmup is needed.
  config.num_train_steps = 200
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0  # Decay would pull the adapters to the base model.
  config.eval_every_steps = 50
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100
  # A different seed than the base run: new adapter init, dropout and data order.
  config.seed = 1
  return config
