"""xenith_mini, the first seed model, with every feature its seed names.

  python main.py --config=experiments/xenith_mini.py --mode=describe --num_devices=16
  python main.py --config=experiments/xenith_mini.py:size=small --workdir=runs/mini_small
  python main.py --config=experiments/xenith_mini.py:size=tiny,memory=off ...

The seed: 64 layers (8 dense + 56 MoE, 32 experts top-6, FFN 24,576 / 3,072 per expert),
64 query / 16 KV heads, 256k context, multi-scale sliding windows 512 / 1024 / 2048 with 256
global tokens, short-term memory of 16k tokens and long-term memory "in 32k chunks" filled
by a 4-layer, 16-head transformer summarizer, rank-128 LoRA on all linear layers, the
Mixtral 32k tokenizer, a TPU v4-32 (16 chips). Config arguments (comma-separated):

  size=full|small|tiny  full: the seed (sizing and compiling only: --mode=describe);
                        small / tiny: twins with every feature at a width that trains on
                        2 CPU cores (small: 250 steps, 10-25 min; tiny: tests).
  lora=R                the seed's fine-tuning variant: rank-R adapters on every linear
                        layer (attention, MLP, experts, head), the base frozen; set
                        config.init_from_checkpoint to the pre-trained run.
  memory=off            the same model without chunk-summary memory (for comparisons).

How the seed's memory is read (its text is ambiguous, docs/seed_models.md says more):
the model reads 4096-token chunks; short-term memory is the last 16k tokens' keys and
values (the 4 previous chunks), seen by the full-attention layers; long-term memory is a
bank of 32,768 summary vectors ("32k" read as the bank's capacity, as a 16k short-term
memory spanning several chunks rules out 32k-token chunks), 512 per chunk, so the bank holds
the whole 256k context compressed 8:1; the summarizer compresses each chunk as it leaves
the working set. Assumptions where the seed is silent: the 8 dense layers are the
full-attention ones; every 8th layer reads the bank; windows split the 16 KV heads 6/5/5.
"""

from experiments import seed

# Per size: width, depth and the memory/attention lengths. The twins keep the seed's
# ratios where their width allows (dense FFN 3x embed, experts 3/8 embed, windows 1:2:4,
# short-term memory 4 chunks, 8:1 summaries; more KV heads per query head than 1:4, so
# that 3 windows still split them).
SIZES = {
    'full': dict(embed_dim=8192, num_layers=64, num_heads=64, num_kv_heads=16, head_dim=128,
                 mlp_dim=24_576, expert_mlp_dim=3072, num_experts=32, top_k=6,
                 vocab_size=32_000, max_seq_len=262_144, global_batch_size=16,
                 windows=(512, 1024, 2048), num_global=256, chunk=4096, summary=512,
                 bank=32_768, summarizer_layers=4, summarizer_heads=16, memory_every=8),
    'small': dict(embed_dim=128, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=16,
                  mlp_dim=384, expert_mlp_dim=48, num_experts=8, top_k=2,
                  vocab_size=2048, max_seq_len=512, global_batch_size=8,
                  windows=(16, 32, 64), num_global=8, chunk=128, summary=16, bank=64,
                  summarizer_layers=2, summarizer_heads=4, memory_every=4),
    'tiny': dict(embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=8,
                 mlp_dim=96, expert_mlp_dim=12, num_experts=4, top_k=2,
                 vocab_size=512, max_seq_len=64, global_batch_size=4,
                 windows=(4, 8, 16), num_global=2, chunk=16, summary=2, bank=8,
                 summarizer_layers=1, summarizer_heads=2, memory_every=2),
}
_DENSE_SHARE = 8  # One layer in 8 is a dense full-attention layer (8 of 64).


def get_config(arg: str | None = None):
  """xenith_mini at `size` (full, small, tiny), optionally `lora=R` or `memory=off`."""
  size, lora_rank, memory_on = seed.parse(arg, SIZES)
  s = SIZES[size]
  config = seed.base_config('xenith_mini', size, s)

  m = config.model
  num_dense = max(1, s['num_layers'] // _DENSE_SHARE)
  m.moe.num_experts = s['num_experts']
  m.moe.num_experts_per_token = s['top_k']
  m.moe.expert_mlp_dim = s['expert_mlp_dim']
  m.moe.first_dense_layers = num_dense

  a = m.attention
  a.window_sizes = s['windows']  # Multi-scale: each window takes a group of KV heads.
  a.window_split = 'heads'
  a.full_attention_layers = num_dense  # Assumed: the dense layers attend fully.
  a.num_global_tokens = s['num_global']
  a.window_reference_length = s['max_seq_len']

  if memory_on:
    mem = m.memory
    mem.chunk_size = s['chunk']
    mem.short_term_tokens = 4 * s['chunk']  # 16k: the 4 previous chunks.
    mem.summary_tokens = s['summary']
    mem.bank_size = s['bank']
    mem.summarizer_layers = s['summarizer_layers']
    mem.summarizer_heads = s['summarizer_heads']
    mem.summarizer_self_attention = True  # A transformer: summaries also attend to each other.
    every = s['memory_every']
    mem.layers = tuple(range(every - 1, s['num_layers'], every))  # Assumed: every 8th layer.
    mem.tbptt_chunks = 2

  if lora_rank:
    m.lora.rank = lora_rank
    m.lora.targets = ('query', 'key', 'value', 'out', 'gate', 'up', 'down', 'head',
                      'experts')
    m.lora.train_only_adapters = True

  seed.finish(config, size, expert_parallelism=min(8, s['num_experts']))
  return config
