"""xenith_mini, the first seed model: 64 layers (8 dense + 56 MoE), 32 experts top-6.

Shapes from the project's seed document. It cannot train here; use it
to size runs: `python main.py --config=experiments/xenith_mini.py --mode=describe
--num_devices=16` (a TPU v4-32 has 16 chips). The seed's "~50B parameters, ~10B
active" is not what these shapes give: docs/describe.md has the real figures.
"""

from experiments import default


def get_config(arg: str | None = None):
  """The seed shapes; `arg` is unused (there is one size)."""
  del arg
  config = default.get_config('size=base')
  config.size = 'xenith_mini'
  config.max_seq_len = 262_144  # 256k context (dense attention until sparse attention lands).
  config.global_batch_size = 16
  config.data.tokenizer = 'mixtral'  # Mistral/Mixtral 32k SentencePiece vocabulary.

  m = config.model
  m.vocab_size = 32_000
  m.embed_dim = 8192
  m.num_layers = 64
  m.num_heads = 64
  m.num_kv_heads = 16
  m.head_dim = 128
  m.mlp_dim = 24_576  # Dense FFN of the first 8 layers.
  m.tie_embeddings = False
  m.dtype = 'bfloat16'
  m.remat = 'full'
  m.scan_layers = True
  m.moe.num_experts = 32
  m.moe.num_experts_per_token = 6
  m.moe.expert_mlp_dim = 3072
  m.moe.first_dense_layers = 8
  # The seed's "rank-128 LoRA in all linear layers" is for fine-tuning: set
  # --config.model.lora.rank=128 (the seven projections) and, for the head and the experts
  # too, --config.model.lora.target_ranks.head=128 --config.model.lora.target_ranks.experts=128
  # on a fine-tuning run, not in pre-training (docs/lora.md).

  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  config.mesh.expert = 8
  return config
