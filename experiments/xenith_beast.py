"""xenith_beast, the second seed model, with every feature its seed names.

  python main.py --config=experiments/xenith_beast.py --mode=describe --num_devices=64
  python main.py --config=experiments/xenith_beast.py:size=small --workdir=runs/beast_small

The seed's `ModelArgs`: dim 8192, 80 layers, 64 query / 16 KV heads, 64 routed experts
with 8 active plus a shared expert, 32k context, full attention in the first layers and
sparse attention with dynamic window sizing later, RoPE with YaRN, RMSNorm or LayerNorm
(`--config.model.norm=layernorm`), 4096-token chunks summarized into 128 vectors each, a
memory bank of 200 chunk summaries with LRU eviction, LoRA on the queries (rank 256) and
a LoRA-adapted output layer. Config arguments (comma-separated): `size=full|small|tiny`
(full: the seed, for describe; small / tiny: twins that train on 2 CPU cores), `lora=R`
(the LoRA variant: rank R on the queries and the output head, the base frozen; the seed
says 256), `memory=off` (the same model without memory).

Assumptions where the seed is silent (docs/seed_models.md): the dense prefix, FFN widths
and full-attention layers are the first 8 layers with xenith_mini's widths (dense FFN
24,576, experts and the shared expert 3,072); sparse layers split the KV heads between
windows of 512 and 2048 tokens at the 4096-token chunk, scaled with the input length
(dynamic windows: rounded up to 64, clipped to 256..8192; a 32k input without memory gets
4096 and 8192); YaRN extends a model trained at 8k to 32k (factor 4); the bank holds 200 x
128 = 25,600 summary vectors; the short-term memory is the previous chunk (4096 tokens);
every 10th layer reads the bank.
"""

from experiments import seed

SIZES = {
    'full': dict(embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=16, head_dim=128,
                 mlp_dim=24_576, expert_mlp_dim=3072, num_experts=64, top_k=8,
                 vocab_size=32_000, max_seq_len=32_768, global_batch_size=64,
                 num_dense=8, windows=(512, 2048), min_window=256, max_window=8192,
                 chunk=4096, summary=128, bank_chunks=200, summarizer_layers=2,
                 summarizer_heads=16, memory_every=10),
    'small': dict(embed_dim=128, num_layers=10, num_heads=8, num_kv_heads=4, head_dim=16,
                  mlp_dim=384, expert_mlp_dim=48, num_experts=16, top_k=2,
                  vocab_size=2048, max_seq_len=512, global_batch_size=8,
                  num_dense=1, windows=(64, 128), min_window=64, max_window=256,
                  chunk=128, summary=8, bank_chunks=8, summarizer_layers=1,
                  summarizer_heads=4, memory_every=5),
    'tiny': dict(embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                 mlp_dim=96, expert_mlp_dim=12, num_experts=8, top_k=2,
                 vocab_size=512, max_seq_len=64, global_batch_size=4,
                 num_dense=1, windows=(4, 16), min_window=4, max_window=64,
                 chunk=16, summary=2, bank_chunks=4, summarizer_layers=1,
                 summarizer_heads=2, memory_every=2),
}
_YARN_FACTOR = 4.0  # Assumed: trained at 1/4 of the context, extended with YaRN.


def get_config(arg: str | None = None):
  """xenith_beast at `size` (full, small, tiny), optionally `lora=R` or `memory=off`."""
  size, lora_rank, memory_on = seed.parse(arg, SIZES)
  s = SIZES[size]
  config = seed.base_config('xenith_beast', size, s)

  m = config.model
  m.norm = 'rmsnorm'  # The seed allows either; --config.model.norm=layernorm.
  m.moe.num_experts = s['num_experts']
  m.moe.num_experts_per_token = s['top_k']
  m.moe.expert_mlp_dim = s['expert_mlp_dim']
  m.moe.num_shared_experts = 1
  m.moe.first_dense_layers = s['num_dense']  # Assumed.

  a = m.attention
  a.full_attention_layers = s['num_dense']  # Assumed: full attention in the dense prefix.
  a.window_sizes = s['windows']
  a.window_split = 'heads'
  a.dynamic_windows = True  # Windows scale with the input length.
  # The memory model attends chunk by chunk, so windows are sized at the chunk's length.
  a.window_reference_length = s['chunk']
  a.min_window = s['min_window']
  a.max_window = s['max_window']

  r = m.rope_scaling
  r.type = 'yarn'
  r.factor = _YARN_FACTOR
  r.original_max_position = int(s['max_seq_len'] // _YARN_FACTOR)

  if memory_on:
    mem = m.memory
    mem.chunk_size = s['chunk']
    mem.short_term_tokens = s['chunk']  # Assumed: the previous chunk.
    mem.summary_tokens = s['summary']
    mem.bank_size = s['bank_chunks'] * s['summary']  # 200 chunk summaries.
    mem.summarizer_layers = s['summarizer_layers']
    mem.summarizer_heads = s['summarizer_heads']
    mem.summarizer_self_attention = True
    mem.eviction = 'lru'
    every = s['memory_every']
    mem.layers = tuple(range(every - 1, s['num_layers'], every))
    mem.tbptt_chunks = 2

  if lora_rank:
    m.lora.rank = 0
    m.lora.target_ranks.query = lora_rank
    m.lora.target_ranks.head = lora_rank
    m.lora.train_only_adapters = True

  seed.finish(config, size, expert_parallelism=8)
  return config
