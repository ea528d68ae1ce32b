"""The library's default config: every field Xenith reads, each defined and commented once.

A small dense decoder (experiments/default.py's `small` size) trained on the embedded
Shakespeare corpus. Experiments start from it (experiments/default.py adds the
size presets); the Hugging Face import (xenith/hf) fills its `model` from a config.json.
"""

import ml_collections

# Logical axis names (on params and activations) -> mesh axes. MaxText-style names;
# the mesh axes are `data`, `fsdp`, `tensor`, `expert` (see `config.mesh`).
LOGICAL_AXIS_RULES = (
    # Activations.
    ('activation_batch', ('data', 'fsdp', 'expert')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    # Parameters.
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('layers', None),
    ('exp', 'expert'),
    ('lora_rank', None),  # LoRA adapter rank (small): replicated.
    ('adapter_languages', None),  # Language adapters' language axis: replicated.
    ('adapter_bottleneck', None),  # Language adapters' bottleneck (small): replicated.
)


def get_config() -> ml_collections.ConfigDict:
  """The full default config (a new ConfigDict on every call)."""
  config = ml_collections.ConfigDict()
  # The size preset (experiments/default.py's SIZES) this config started from (for HParams).
  config.size = 'small'
  config.seed = 0  # Seeds param init, dropout and data shuffling.
  # 'lm' (next-token prediction on packed text) or 'classification' (a label per
  # document: `classification` below, xenith/model/classifier.py, docs/classification.md).
  config.task = 'lm'

  # Loop.
  config.num_train_steps = 350  # Total optimizer steps (~1.3 s each for `small` on 2 cores).
  config.log_every_steps = 50  # Train metrics are written every this many steps.
  config.eval_every_steps = 100  # Evaluate on the validation split every this many steps.
  config.num_eval_batches = 16  # Validation batches per evaluation; -1 = the whole split.
  config.checkpoint_every_steps = 100  # Save a checkpoint every this many steps.
  config.keep_checkpoints = 3  # Keep this many most recent checkpoints.
  config.global_batch_size = 32  # Sequences per step, all devices.
  config.max_seq_len = 128  # Tokens per packed training sequence.
  config.on_nonfinite = 'stop'  # Non-finite loss/grads: 'stop' the run or 'skip' the update.
  # With on_nonfinite='skip': stop after this many skipped updates in a row (>= 1).
  config.max_consecutive_nonfinite = 20
  config.peak_flops_per_device = 0.0  # For train/mfu; 0 = look up the accelerator (CPU: measure).
  # A workdir (or its checkpoints/, a step or a merged-params dir) whose params seed a new
  # run, e.g. the base model of a LoRA fine-tune; new params (adapters) are initialised
  # fresh. '' = random init. Ignored once the run has its own checkpoint (resume).
  config.init_from_checkpoint = ''

  # Optimizer: AdamW, linear warmup then cosine decay, global-norm clipping.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-3  # Peak learning rate.
  config.optimizer.warmup_steps = 50  # Linear warmup from 0 to the peak.
  config.optimizer.end_lr_fraction = 0.1  # Final learning rate as a fraction of the peak.
  config.optimizer.b1 = 0.9  # Adam beta1.
  config.optimizer.b2 = 0.95  # Adam beta2.
  config.optimizer.eps = 1e-8  # Adam epsilon.
  config.optimizer.weight_decay = 0.1  # Decoupled weight decay (not on norm scales or biases).
  config.optimizer.grad_clip_norm = 1.0  # Clip gradients to this global norm; 0 = off.

  # Model: a pre-norm decoder-only transformer.
  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = 2048  # Embedding rows; the tokenizer must fit in it.
  config.model.embed_dim = 256  # Width of the residual stream.
  config.model.num_layers = 4  # Decoder blocks.
  config.model.num_heads = 8  # Query heads.
  config.model.num_kv_heads = 2  # Key/value heads (grouped-query attention).
  config.model.head_dim = 32  # Width of each attention head.
  config.model.mlp_dim = 768  # Hidden width of the SwiGLU MLP.
  # Attention pattern and kernel (xenith/model/attention_pattern.py, attention.py).
  config.model.attention = ml_collections.ConfigDict()
  # 'auto' (CPU: blockwise, GPU: cudnn where it can express the mask, TPU: splash),
  # 'dense' (masked reference, O(seq^2) memory), 'blockwise' (pure JAX), 'cudnn', 'splash'.
  config.model.attention.implementation = 'auto'
  config.model.attention.block_size = 64  # Tokens per block (blockwise, splash).
  # Sliding windows of the sparse layers; () = every layer attends to all earlier tokens.
  config.model.attention.window_sizes = ()
  config.model.attention.full_attention_layers = 0  # The first N layers stay full causal.
  # 'heads': each sparse layer splits its KV heads into one group per window (the first
  # groups take one head more when the windows do not divide them); 'layers': sparse
  # layers take the windows in turn.
  config.model.attention.window_split = 'heads'
  # The first G tokens are global in sparse layers: every later token sees them.
  config.model.attention.num_global_tokens = 0
  # Scale windows with the sequence length T: w * T / window_reference_length, rounded
  # up to 64 and clipped to [min_window, max_window]; False = windows as configured.
  config.model.attention.dynamic_windows = False
  config.model.attention.window_reference_length = config.max_seq_len  # T at which w holds.
  config.model.attention.min_window = 64  # Lower bound of a dynamic window.
  config.model.attention.max_window = 8192  # Upper bound of a dynamic window.
  # Chunk-summary memory (xenith/model/memory/); experiments/memory.py turns it on.
  config.model.memory = ml_collections.ConfigDict()
  config.model.memory.chunk_size = 0  # C: tokens per chunk; 0 = memory off.
  config.model.memory.summary_tokens = 4  # S: learned queries (summaries) per chunk.
  config.model.memory.summarizer_layers = 1  # Cross-attention + MLP layers of the summarizer.
  config.model.memory.summarizer_heads = 4  # Heads of the summarizer's cross-attention.
  # Each summarizer layer starts with self-attention among the S summaries (a transformer
  # summarizer; new params); False = cross-attention and MLP only (older checkpoints).
  config.model.memory.summarizer_self_attention = False
  config.model.memory.bank_size = 16  # M: summaries kept; then the least-used are evicted.
  config.model.memory.layers = ()  # Layers whose attention also attends to the bank.
  config.model.memory.tbptt_chunks = 2  # K: gradients reach back at most K chunks; 0 = all.
  # R: the stream's last R tokens before a chunk whose keys/values it also sees (per layer;
  # may exceed chunk_size, spanning several chunks); 0 = none.
  config.model.memory.short_term_tokens = 0
  config.model.memory.usage_decay = 0.9  # Bank usage = decay * usage + attention mass, per chunk.
  # Which full-bank slots a write evicts: 'least_used' (lowest usage) or 'lru' (least
  # recently read); ties: the oldest.
  config.model.memory.eviction = 'least_used'
  # 'lru': a slot is read in a chunk when the attention probability it gets, averaged
  # over the chunk's queries and the memory layers (mean over heads), exceeds this.
  config.model.memory.lru_read_threshold = 0.01
  # Mixture-of-Experts (xenith/model/moe.py) in place of the MLP in some layers;
  # experiments/moe.py turns it on.
  config.model.moe = ml_collections.ConfigDict()
  config.model.moe.num_experts = 0  # Routed experts per MoE layer; 0 = dense model.
  config.model.moe.num_experts_per_token = 2  # Top-k: experts each token is routed to.
  config.model.moe.expert_mlp_dim = 0  # Hidden width of each expert; 0 = model.mlp_dim.
  # Always-on experts beside the routed ones, one SwiGLU of width n * expert_mlp_dim.
  config.model.moe.num_shared_experts = 0
  config.model.moe.first_dense_layers = 0  # The first K layers keep the dense MLP.
  config.model.moe.moe_every = 1  # Then every n-th layer is MoE (layers K+n-1, K+2n-1...).
  # True: top-k weights renormalised to sum to 1 (Mixtral); False: raw softmax (Switch).
  config.model.moe.normalize_top_k = True
  # 'auto' (CPU: dropless_gather, GPU/TPU: dropless_ragged), 'dropless_gather',
  # 'dropless_ragged', 'capacity' (drops overflow) or 'dense' (all experts; reference).
  config.model.moe.dispatch = 'auto'
  config.model.moe.capacity_factor = 1.25  # 'capacity': slots per expert = factor * T * k / E.
  config.model.moe.block_size = 256  # 'dropless_gather': rows per grouped-matmul block.
  config.model.moe.load_balance_loss_weight = 0.01  # Switch load-balance loss weight.
  config.model.moe.router_z_loss_weight = 0.001  # ST-MoE router z-loss weight.
  # Weight of the mean router entropy; > 0 sharpens routing, < 0 spreads it.
  config.model.moe.router_entropy_loss_weight = 0.0
  config.model.norm = 'rmsnorm'  # 'rmsnorm' or 'layernorm'.
  config.model.norm_eps = 1e-6  # Epsilon inside the norms.
  config.model.tie_embeddings = True  # Output head reuses the token embedding matrix.
  config.model.rope_theta = 10_000.0  # RoPE base wavelength.
  # RoPE context extension (xenith/model/rope.py). YaRN as in Hugging Face transformers.
  config.model.rope_scaling = ml_collections.ConfigDict()
  config.model.rope_scaling.type = 'none'  # 'none' (plain RoPE) or 'yarn'.
  config.model.rope_scaling.factor = 1.0  # YaRN: new context / original context (>= 1).
  # YaRN: context length the weights were trained at (set it to that run's max_seq_len).
  config.model.rope_scaling.original_max_position = config.max_seq_len
  config.model.rope_scaling.beta_fast = 32.0  # YaRN: dims turning more often keep their frequency.
  config.model.rope_scaling.beta_slow = 1.0  # YaRN: dims turning less often are interpolated.
  config.model.rope_scaling.truncate = True  # YaRN: round the ramp ends to whole dims.
  # YaRN scale on cos/sin (q.k gets its square); 0 = 0.1 * ln(factor) + 1, or from mscale.
  config.model.rope_scaling.attention_factor = 0.0
  # YaRN, DeepSeek-style (both > 0, attention_factor 0): the attention factor is
  # mscale(factor, mscale) / mscale(factor, mscale_all_dim), mscale(f, m) = 0.1 * m * ln(f) + 1.
  config.model.rope_scaling.mscale = 0.0  # Numerator's multiplier; 0 = off.
  config.model.rope_scaling.mscale_all_dim = 0.0  # Denominator's multiplier; 0 = off.
  # Positions per chunk of the fused output head + cross-entropy (xenith/model/chunked_loss.py):
  # no [batch, seq, vocab] logits in the train and eval steps; 0 = full logits.
  config.model.loss_chunk_size = 64
  config.model.dropout_rate = 0.0  # Dropout on residual branches during training.
  config.model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay fp32).
  config.model.remat = 'none'  # Rematerialise blocks: 'none', 'full', 'dots', 'dots_no_batch'.
  # Stack blocks with nn.scan (faster compiles for deep models); layers that differ are
  # scanned as repeating units (xenith/model/layer_stacks.py).
  config.model.scan_layers = False
  # LoRA adapters (xenith/model/lora.py): x W + alpha / r * x A B on the layers named
  # in `targets` (r = `rank`) or given a rank in `target_ranks` (r = that rank).
  # experiments/lora_finetune.py turns them on for fine-tuning.
  config.model.lora = ml_collections.ConfigDict()
  config.model.lora.rank = 0  # Adapter rank of the `targets`; 0 = none (but see target_ranks).
  config.model.lora.alpha = 16.0  # A layer's adapter output scale is alpha / (its rank).
  config.model.lora.dropout = 0.0  # Dropout on the adapters' input during training.
  # Layers (module names) that get adapters; any of 'query', 'key', 'value', 'out' (attention),
  # 'gate', 'up', 'down' (MLP), 'head' (untied output head only), 'experts' (MoE experts:
  # per-expert adapters folded into the expert weights; needs dropout = 0).
  config.model.lora.targets = ('query', 'key', 'value', 'out', 'gate', 'up', 'down')
  # Per-target ranks, one field per target above: -1 = `rank` if the target is in
  # `targets`, else no adapter; 0 = no adapter; > 0 = that rank, in `targets` or not. E.g.
  # rank=0, target_ranks.query=256, target_ranks.head=256: queries and head at rank 256.
  config.model.lora.target_ranks = ml_collections.ConfigDict(
      {t: -1 for t in ('query', 'key', 'value', 'out', 'gate', 'up', 'down', 'head',
                       'experts')})
  # Train only the adapters: the base gets no gradients and no optimizer state.
  config.model.lora.train_only_adapters = True
  # Per-language bottleneck adapters (xenith/model/language_adapters.py): each block's MLP
  # branch h gets h + relu(h @ down) @ up of the token's language (batches carry
  # `languages`, from each .jsonl record's "language" field).
  config.model.language_adapters = ml_collections.ConfigDict()
  # Language names, e.g. ('hin', 'eng', 'mix'); the i-th is id i (0 = no adapter); () = off.
  config.model.language_adapters.languages = ()
  config.model.language_adapters.bottleneck_dim = 64  # b: down is [embed, b], up [b, embed].
  # Train only the adapters (LoRA's too, if on): the base gets no gradients and no
  # optimizer state; False = the base trains with them.
  config.model.language_adapters.train_only_adapters = False

  # Data: documents -> TFDS array_record -> grain -> SentencePiece -> packed sequences.
  config.data = ml_collections.ConfigDict()
  # 'shakespeare' (embedded corpus), 'folder', or 'passkey' (synthetic passkey examples, one
  # per max_seq_len row: xenith/data/passkey_source.py, experiments/passkey_memory.py).
  # task='classification': 'folder' (labelled: xenith/data/labelled.py) or a built-in
  # labelled task, 'shakespeare_genre' or 'hinglish_langid' (docs/classification.md).
  config.data.source = 'shakespeare'
  config.data.path = ''  # For source='folder': a folder of .txt / .jsonl files.
  config.data.tokenizer = 'train'  # 'train' (SentencePiece on the train split), 'mixtral', or a .model path.
  # Hinglish (docs/hinglish.md): prefix each document with its detected language tag
  # (<HIN>/<ENG>/<MIX>); tokenizer='train' then trains with NFC and the tags as pieces 4-11.
  config.data.language_tags = False
  config.data.validation_fraction = 0.02  # Share of passages held out for evaluation.
  config.data.eval_split = 'validation'  # The split evaluations read: 'validation' or 'train'.
  config.data.cache_dir = ''  # Downloads, prepared datasets, tokenizers; '' = ~/.cache/xenith.

  # config.task='classification': labelled documents (xenith/data/labelled.py), one per
  # row, padded to length buckets; documents longer than max_seq_len are truncated.
  config.classification = ml_collections.ConfigDict()
  # 'last' (the hidden state at the document's last token, its EOS) or 'mean' (over its
  # tokens): the vector the label head reads.
  config.classification.pooling = 'last'
  config.classification.labels = ()  # Label names in output order; () = the train split's, sorted.
  # Train only the label head (and LoRA adapters, if any): a linear probe of the base.
  config.classification.freeze_base = False

  # Passkey retrieval (xenith/eval/passkey.py): a number hidden at a random depth in filler
  # text, asked for at the end; exact-match and per-digit accuracy per length.
  config.passkey = ml_collections.ConfigDict()
  config.passkey.lengths = ()  # Lengths in tokens, increasing, e.g. (1024, 2048); () = off.
  config.passkey.num_examples = 8  # Examples per length.
  config.passkey.every_steps = 0  # Run every this many steps and at the last; 0 = with eval.
  config.passkey.seed = 0  # Seeds the passkeys and their depths (the same at every evaluation).
  config.passkey.digits = 5  # Digits per passkey (exact-match chance 10**-digits).
  config.passkey.batch_size = 1  # Examples per forward pass (rounded up to batch parallelism).

  # Device mesh: sizes of the axes; -1 fills the remaining devices (at most one -1).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data parallelism (replicated params).
  config.mesh.fsdp = 1  # Fully sharded data parallelism (params sharded over 'embed').
  config.mesh.tensor = 1  # Tensor parallelism (heads, mlp, vocab).
  config.mesh.expert = 1  # Expert parallelism (used by MoE layers).
  config.logical_axis_rules = LOGICAL_AXIS_RULES  # Logical axis name -> mesh axes.
  return config
