"""xenith_beast, the second seed model: 80 layers, 64 experts top-8 plus a shared expert.

From the seed's `ModelArgs` (dim 8192, 80 layers, 64/16 heads, 64 routed experts with 8
active, 32k context). The seed leaves the dense prefix and the FFN widths open; this
config assumes xenith_mini's (8 dense layers of FFN 24,576, experts of 3,072, one shared
expert of 3,072). The seed's chunk-summary memory (chunks of 4096, 128 summaries, a
bank of 200) arrives with the long-context work. Size it with
`python main.py --config=experiments/xenith_beast.py --mode=describe --num_devices=64`.
The seed's fine-tuning LoRA (rank 256 on the queries and the output head) is
`--config.model.lora.rank=0 --config.model.lora.target_ranks.query=256
--config.model.lora.target_ranks.head=256` (docs/lora.md).
"""

from experiments import default


def get_config(arg: str | None = None):
  """The seed shapes; `arg` is unused (there is one size)."""
  del arg
  config = default.get_config('size=base')
  config.size = 'xenith_beast'
  config.max_seq_len = 32_768  # 32k context.
  config.global_batch_size = 64
  config.data.tokenizer = 'mixtral'

  m = config.model
  m.vocab_size = 32_000
  m.embed_dim = 8192
  m.num_layers = 80
  m.num_heads = 64
  m.num_kv_heads = 16
  m.head_dim = 128
  m.mlp_dim = 24_576  # Assumed, as in xenith_mini.
  m.tie_embeddings = False
  m.dtype = 'bfloat16'
  m.remat = 'full'
  m.scan_layers = True
  m.moe.num_experts = 64
  m.moe.num_experts_per_token = 8
  m.moe.expert_mlp_dim = 3072  # Assumed, as in xenith_mini.
  m.moe.num_shared_experts = 1
  m.moe.first_dense_layers = 8  # Assumed, as in xenith_mini.

  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  config.mesh.expert = 8
  return config
