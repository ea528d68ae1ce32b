"""What the two seed-model configs (xenith_mini.py, xenith_beast.py) share: their config
arguments, the base config of a size, and the twins' schedule and mesh."""

import ml_collections

from experiments import default

_ARGS = 'size=full|small|tiny, lora=R, memory=on|off'


def parse(arg: str | None, sizes: dict) -> tuple[str, int, bool]:
  """(size, LoRA rank (0 = none), memory on) from a config argument like
  `size=small,lora=8,memory=off`."""
  args = default.parse_arg(arg)
  size = args.pop('size', 'full')
  lora_rank = args.pop('lora', '0')
  memory = args.pop('memory', 'on')
  if args:
    raise ValueError(f'Unknown config argument(s) {sorted(args)}; known: {_ARGS}.')
  if size not in sizes:
    raise ValueError(f'Unknown size {size!r}; choose one of {sorted(sizes)}.')
  if memory not in ('on', 'off'):
    raise ValueError(f'memory={memory!r}: choose on or off.')
  if not lora_rank.isdigit():
    raise ValueError(f'lora={lora_rank!r}: give the adapter rank, e.g. lora=128.')
  return size, int(lora_rank), memory == 'on'


def base_config(name: str, size: str, s: dict) -> ml_collections.ConfigDict:
  """The default config with the size's width, depth, context and batch (`s`, a row of
  the seed's SIZES), an untied head, scanned layers, and the full size's bf16, remat
  and Mixtral tokenizer (the twins train in float32 on the Shakespeare tokenizer)."""
  config = default.get_config('size=base' if size == 'full' else f'size={size}')
  config.size = f'{name}_{size}'
  config.max_seq_len = s['max_seq_len']
  config.global_batch_size = s['global_batch_size']
  m = config.model
  for field in ('vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'num_kv_heads',
                'head_dim', 'mlp_dim'):
    m[field] = s[field]
  m.tie_embeddings = False
  m.scan_layers = True
  if size == 'full':
    config.data.tokenizer = 'mixtral'  # Mistral/Mixtral 32k SentencePiece vocabulary.
    m.dtype, m.remat = 'bfloat16', 'full'
  else:
    m.dtype, m.remat = 'float32', 'none'
  return config


def finish(config: ml_collections.ConfigDict, size: str, expert_parallelism: int) -> None:
  """The mesh (full size: FSDP x expert parallelism; twins: data parallel) and the
  twins' schedule: passkey at 1x / 2x / 4x the training length, 250 steps for small."""
  if size == 'full':
    config.mesh.update(data=1, fsdp=-1, tensor=1, expert=expert_parallelism)
    return
  config.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
  length = config.max_seq_len
  config.passkey.lengths = (length, 2 * length, 4 * length)
  config.passkey.num_examples = 8
  if size == 'small':
    config.num_train_steps = 250
    config.optimizer.warmup_steps = 25
    config.log_every_steps = 25
    config.eval_every_steps = config.checkpoint_every_steps = 125
