"""Checks an experiment config before anything is built or compiled.

Every contradiction raises `ConfigError`, whose message is one line naming the field,
e.g. `config.model.num_heads=6 must be divisible by config.model.num_kv_heads=4`.
"""

import math
import os

import ml_collections

from xenith import sharding
from xenith import storage
from xenith.errors import ConfigError, DataError
from xenith.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from xenith.model import lora
from xenith.model.lora import TARGETS as LORA_TARGETS
from xenith.model.moe import expert_mlp_dim, is_moe_layer
from xenith.model.moe_dispatch import DISPATCHES as MOE_DISPATCHES
from xenith.model.norms import NORMS
from xenith.model.rope import ROPE_SCALING_TYPES
from xenith.model.transformer import REMAT_POLICIES

DTYPES = ('float32', 'bfloat16')
ON_NONFINITE = ('stop', 'skip')
DATA_SOURCES = ('shakespeare', 'folder', 'tfds', 'hf', 'tokens', 'passkey')
TASKS = ('lm', 'classification')
NAMED_TOKENIZERS = ('train', 'mixtral')
WINDOW_SPLITS = ('heads', 'layers')
LOGGERS = ('tensorboard', 'jsonl', 'wandb')  # xenith/train/loggers.py


def _get(config, field):
  value = config
  for part in field.split('.'):
    value = value[part]
  return value


def _require(config, field, ok, message):
  if not ok(_get(config, field)):
    raise ConfigError(field, f'{_get(config, field)!r} {message}')


def _finite(config, prefix=''):
  """Every float field, and every float in a tuple field, is finite: `inf` or `nan` (e.g.
  `--config.optimizer.learning_rate=inf`) would pass the range checks below or turn the
  first step's loss into NaN."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _finite(value, f'{prefix}{key}.')
    elif any(isinstance(v, float) and not math.isfinite(v)
             for v in (value if isinstance(value, (tuple, list)) else (value,))):
      raise ConfigError(prefix + key, f'{value!r} must be a finite number')


def _positive(config, *fields):
  for field in fields:
    _require(config, field, lambda v: isinstance(v, int) and v > 0, 'must be a positive int')


def _one_of(config, field, choices):
  _require(config, field, lambda v: v in choices, f'must be one of {choices}')


def _validate_rope(config) -> None:
  """RoPE base and `config.model.rope_scaling` (checked whatever its type)."""
  _require(config, 'model.rope_theta', lambda v: v > 1, 'must be > 1')
  r = 'model.rope_scaling.'
  _one_of(config, r + 'type', ROPE_SCALING_TYPES)
  _require(config, r + 'factor', lambda v: v >= 1, 'must be >= 1 (new context / original)')
  _positive(config, r + 'original_max_position')
  _require(config, r + 'beta_slow', lambda v: v > 0, 'must be > 0')
  scaling = config.model.rope_scaling
  if scaling.beta_fast <= scaling.beta_slow:
    raise ConfigError(r + 'beta_fast', f'{scaling.beta_fast} must be > '
                      f'config.{r}beta_slow={scaling.beta_slow}')
  _require(config, r + 'truncate', lambda v: isinstance(v, bool), 'must be True or False')
  for field in ('attention_factor', 'mscale', 'mscale_all_dim'):
    _require(config, r + field, lambda v: v >= 0, 'must be >= 0 (0 = the default)')


def _validate_lora(config) -> None:
  """`config.model.lora` (checked only when adapters are on) and `init_from_checkpoint`."""
  _require(config, 'init_from_checkpoint', lambda v: v == '' or storage.path(
      v, 'config.init_from_checkpoint').is_dir(),
           "is not a directory ('' = random init; else a workdir or checkpoint dir)")
  if 'lora' not in config.model:
    return
  f = 'model.lora.'
  settings = config.model.lora
  _require(config, f + 'rank', lambda v: isinstance(v, int) and v >= 0,
           'must be an int >= 0 (0 = no adapters)')
  _require(config, f + 'train_only_adapters', lambda v: isinstance(v, bool),
           'must be True or False')
  target_ranks = settings.get('target_ranks') or {}
  unknown = [t for t in target_ranks if t not in LORA_TARGETS]
  if unknown:
    raise ConfigError(f + 'target_ranks', f'{unknown} are not LoRA targets; choose from '
                      f'{LORA_TARGETS}')
  for t in target_ranks:
    _require(config, f'{f}target_ranks.{t}', lambda v: isinstance(v, int) and v >= -1,
             f"must be an int >= -1 (-1 = lora.rank if '{t}' is in lora.targets, "
             '0 = no adapter, > 0 = that rank)')
  targets = settings.targets
  if settings.rank > 0:  # Else `targets` is unused.
    if isinstance(targets, str) or not targets:
      raise ConfigError(f + 'targets', f'{targets!r} must be a non-empty tuple of layer '
                        f'names from {LORA_TARGETS}')
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
      raise ConfigError(f + 'targets', f'{unknown} are not LoRA targets; choose from '
                        f'{LORA_TARGETS}')
  if not lora.enabled(config.model):
    return
  _require(config, f + 'alpha', lambda v: v > 0, 'must be > 0')
  _require(config, f + 'dropout', lambda v: 0 <= v < 1, 'must be in [0, 1)')

  def source(target):  # The field that gives `target` its adapter.
    return f'target_ranks.{target}' if target_ranks.get(target, -1) > 0 else 'targets'

  if lora.layer_rank(config.model, 'head') and config.model.tie_embeddings:
    raise ConfigError(f + source('head'), "'head' needs config.model.tie_embeddings=False "
                      '(the tied head is the embedding table, which has no adapter)')
  if lora.layer_rank(config.model, 'experts') and settings.dropout > 0:
    raise ConfigError(f + 'dropout', f"{settings.dropout} must be 0 with adapters on "
                      f"'experts' (config.model.lora.{source('experts')}; expert adapters "
                      'are folded into the expert weights, so there is no adapter input to '
                      'drop; dropout works on the other targets)')


def _lora_rank_limits(m) -> dict[str, int]:
  """{target: min(inputs, outputs) of the smallest layer it adapts} for the targets
  whose layers exist in the model `m` (the kernels of attention.py, mlp.py, moe.py and
  transformer.py's head, flattened to matrices)."""
  d, q, kv = m.embed_dim, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  limits = {'query': min(d, q), 'out': min(d, q), 'key': min(d, kv), 'value': min(d, kv)}
  if not m.tie_embeddings:
    limits['head'] = min(d, m.vocab_size)
  is_moe = [is_moe_layer(m, i) for i in range(m.num_layers)]
  mlp_widths = [m.mlp_dim] if not all(is_moe) else []
  if any(is_moe):
    limits['experts'] = min(d, expert_mlp_dim(m))
    if m.moe.num_shared_experts:  # The shared experts are one SwiGLU Mlp of this width.
      mlp_widths.append(m.moe.num_shared_experts * expert_mlp_dim(m))
  if mlp_widths:
    limits.update(dict.fromkeys(('gate', 'up', 'down'), min(d, *mlp_widths)))
  return limits


def _validate_lora_ranks(config) -> None:
  """No adapter rank above its layer's smaller dimension: A B's rank cannot exceed it, so
  the extra rank only adds params and optimizer state (and lowers alpha / rank); it is
  most likely a rank meant for a bigger model. Runs after `_validate_moe` (layer kinds)."""
  m = config.model
  if 'lora' not in m or not lora.enabled(m):
    return
  target_ranks = m.lora.get('target_ranks') or {}
  for target, limit in _lora_rank_limits(m).items():
    rank = lora.layer_rank(m, target)
    if rank > limit:
      field = f'target_ranks.{target}' if target_ranks.get(target, -1) > 0 else 'rank'
      raise ConfigError(f'model.lora.{field}', f"{rank} exceeds {limit}, the smaller "
                        f"dimension (min(inputs, outputs)) of the '{target}' layers: a "
                        'LoRA rank must be <= it')


def _validate_language_adapters(config) -> None:
  """`config.model.language_adapters` (per-language adapters; languages () = off)."""
  if 'language_adapters' not in config.model:
    return
  f = 'model.language_adapters.'
  m, settings = config.model, config.model.language_adapters
  names = settings.languages
  if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
    raise ConfigError(f + 'languages', f'{names!r} must be a tuple of language names, '
                      "e.g. ('hin', 'eng', 'mix'); () = off")
  if len(set(names)) != len(names):
    raise ConfigError(f + 'languages', f'{names!r} names a language twice')
  if not names:
    return
  _positive(config, f + 'bottleneck_dim')
  if 'memory' in m and m.memory.chunk_size:
    raise ConfigError(f + 'languages', 'language adapters do not support the memory '
                      'decoder (model.memory.chunk_size > 0)')
  if (lora.enabled(m) and bool(m.lora.train_only_adapters)
      != bool(settings.train_only_adapters)):
    raise ConfigError(f + 'train_only_adapters', f'{settings.train_only_adapters} differs '
                      f'from model.lora.train_only_adapters={m.lora.train_only_adapters}: '
                      'the base is frozen for both kinds of adapter or for neither')


def _validate_attention(config) -> None:
  """`config.model.attention`: kernel, windows, global tokens, dynamic sizing."""
  if 'attention' not in config.model:
    return
  f = 'model.attention.'
  m, attn = config.model, config.model.attention
  _one_of(config, f + 'implementation', ATTENTION_IMPLEMENTATIONS)
  _positive(config, f + 'block_size')
  windows = attn.window_sizes
  if isinstance(windows, (int, str)) or any(not isinstance(w, int) or w < 1 for w in windows):
    raise ConfigError(f + 'window_sizes', f'{windows!r} must be a tuple of positive ints '
                      '(() = full attention everywhere)')
  _require(config, f + 'full_attention_layers',
           lambda v: isinstance(v, int) and 0 <= v <= m.num_layers,
           f'must be an int in [0, num_layers={m.num_layers}]')
  _one_of(config, f + 'window_split', WINDOW_SPLITS)
  _require(config, f + 'num_global_tokens', lambda v: isinstance(v, int) and v >= 0,
           'must be an int >= 0')
  if windows and attn.window_split == 'heads' and len(windows) > m.num_kv_heads:
    raise ConfigError(f + 'window_sizes', f'{len(windows)} windows are more than '
                      f'config.model.num_kv_heads={m.num_kv_heads} '
                      "(window_split='heads' gives each window a group of KV heads)")
  if attn.dynamic_windows:
    _positive(config, f + 'window_reference_length', f + 'min_window', f + 'max_window')
    if attn.min_window > attn.max_window:
      raise ConfigError(f + 'min_window', f'{attn.min_window} must be <= '
                        f'config.{f}max_window={attn.max_window}')
  if attn.implementation == 'cudnn' and windows and attn.num_global_tokens:
    raise ConfigError(f + 'implementation', "'cudnn' cannot express global tokens "
                      f"(config.{f}num_global_tokens={attn.num_global_tokens}); use "
                      "'auto' or 'blockwise'")


def _validate_memory(config) -> None:
  """`config.model.memory` (chunk-summary memory; chunk_size 0 = off)."""
  if 'memory' not in config.model:
    return
  f = 'model.memory.'
  m, mem = config.model, config.model.memory
  _require(config, f + 'chunk_size', lambda v: isinstance(v, int) and v >= 0,
           'must be an int >= 0 (0 = memory off)')
  if not mem.chunk_size:
    return
  if config.max_seq_len % mem.chunk_size:
    raise ConfigError(f + 'chunk_size', f'{mem.chunk_size} must divide '
                      f'config.max_seq_len={config.max_seq_len}')
  _positive(config, f + 'summary_tokens', f + 'summarizer_layers', f + 'summarizer_heads',
            f + 'bank_size')
  if m.embed_dim % mem.summarizer_heads:
    raise ConfigError(f + 'summarizer_heads', f'{mem.summarizer_heads} must divide '
                      f'config.model.embed_dim={m.embed_dim}')
  if mem.bank_size < mem.summary_tokens:
    raise ConfigError(f + 'bank_size', f'{mem.bank_size} must be >= '
                      f'config.{f}summary_tokens={mem.summary_tokens} (one chunk\'s summaries)')
  layers_ = mem.layers
  if (isinstance(layers_, (int, str)) or
      any(not isinstance(i, int) or not 0 <= i < m.num_layers for i in layers_)):
    raise ConfigError(f + 'layers', f'{layers_!r} must be a tuple of layer indices in '
                      f'[0, num_layers={m.num_layers})')
  if len(set(layers_)) != len(layers_):
    raise ConfigError(f + 'layers', f'{tuple(layers_)!r} has duplicates')
  _require(config, f + 'tbptt_chunks', lambda v: isinstance(v, int) and v >= 0,
           'must be an int >= 0 (0 = no truncation)')
  _require(config, f + 'short_term_tokens', lambda v: isinstance(v, int) and v >= 0,
           'must be an int >= 0 (it may span several chunks)')
  _require(config, f + 'usage_decay', lambda v: 0 <= v <= 1, 'must be in [0, 1]')
  _require(config, f + 'summarizer_self_attention', lambda v: isinstance(v, bool),
           'must be True or False')
  _one_of(config, f + 'eviction', ('least_used', 'lru'))
  _require(config, f + 'lru_read_threshold', lambda v: 0 <= v < 1,
           'must be in [0, 1) (a mean attention probability per query)')
  lengths = config.passkey.lengths if 'passkey' in config else ()
  if not isinstance(lengths, (int, str)) and any(
      isinstance(n, int) and n % mem.chunk_size for n in lengths):
    raise ConfigError('passkey.lengths', f'{tuple(lengths)!r} must be multiples of '
                      f'config.{f}chunk_size={mem.chunk_size} (the model reads whole chunks)')


def _validate_moe(config) -> None:
  """`config.model.moe`, checked only when the model has experts."""
  if 'moe' not in config.model:
    return
  f = 'model.moe.'
  _require(config, f + 'num_experts', lambda v: isinstance(v, int) and v >= 0,
           'must be an int >= 0 (0 = dense model)')
  moe = config.model.moe
  if moe.num_experts == 0:
    return
  _require(config, f + 'num_experts_per_token',
           lambda v: isinstance(v, int) and 1 <= v <= moe.num_experts,
           f'must be an int in [1, num_experts={moe.num_experts}]')
  for field in ('expert_mlp_dim', 'num_shared_experts'):
    _require(config, f + field, lambda v: isinstance(v, int) and v >= 0,
             'must be an int >= 0')
  _require(config, f + 'first_dense_layers',
           lambda v: isinstance(v, int) and 0 <= v < config.model.num_layers,
           f'must be in [0, num_layers={config.model.num_layers}) (some layer must be MoE)')
  _positive(config, f + 'moe_every', f + 'block_size')
  if moe.first_dense_layers + moe.moe_every > config.model.num_layers:
    raise ConfigError(f + 'moe_every', f'{moe.moe_every} leaves no MoE layer after '
                      f'{moe.first_dense_layers} dense ones in {config.model.num_layers}')
  _one_of(config, f + 'dispatch', MOE_DISPATCHES)
  _require(config, f + 'normalize_top_k', lambda v: isinstance(v, bool), 'must be a bool')
  _require(config, f + 'capacity_factor', lambda v: v > 0, 'must be > 0')
  for field in ('load_balance_loss_weight', 'router_z_loss_weight'):
    _require(config, f + field, lambda v: v >= 0, 'must be >= 0')


def _validate_passkey(config) -> None:
  """`config.passkey` (lengths that fit the prompt are checked with the tokenizer)."""
  if 'passkey' not in config:
    return
  f = 'passkey.'
  lengths = config.passkey.lengths
  if (isinstance(lengths, (int, str)) or
      any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths)):
    raise ConfigError(f + 'lengths', f'{lengths!r} must be a tuple of positive ints '
                      '(() = no passkey evaluation)')
  if any(a >= b for a, b in zip(lengths, lengths[1:])):
    raise ConfigError(f + 'lengths', f'{tuple(lengths)!r} must be strictly increasing')
  _positive(config, f + 'num_examples', f + 'batch_size')
  _require(config, f + 'every_steps', lambda v: isinstance(v, int) and v >= 0,
           'must be an int >= 0 (0 = with each eval)')
  _require(config, f + 'seed', lambda v: isinstance(v, int) and v >= 0, 'must be an int >= 0')
  _require(config, f + 'digits', lambda v: isinstance(v, int) and 1 <= v <= 18,
           'must be an int in [1, 18]')


def _validate_observability(config) -> None:
  """Profiling, samples, histograms and loggers (docs/observability.md)."""
  profile = tuple(config.get('profile_steps', ()) or ())
  if profile and (len(profile) != 2 or not all(isinstance(v, int) and v > 0
                                               for v in profile)):
    raise ConfigError('profile_steps', f'{profile!r} must be () (off) or (start, count), '
                      'two positive ints')
  if profile and profile[0] + profile[1] - 1 > config.num_train_steps:
    raise ConfigError('profile_steps', f'{profile!r} goes past config.num_train_steps='
                      f'{config.num_train_steps}')
  prompts = config.get('sample_prompts', ())
  if not isinstance(prompts, (tuple, list)) or not all(
      isinstance(p, str) and p for p in prompts):
    raise ConfigError('sample_prompts', f'{prompts!r} must be a tuple of non-empty strings')
  if prompts:
    _positive(config, 'sample_new_tokens')
    if config.get('task') == 'classification':
      raise ConfigError('sample_prompts', "generates text from a language model; set it "
                        "to () with task='classification'")
  if 'log_histograms_every_steps' in config:
    _require(config, 'log_histograms_every_steps', lambda v: isinstance(v, int) and v >= 0,
             'must be an int >= 0 (0 = off)')
  loggers = config.get('loggers', ('tensorboard',))
  if not isinstance(loggers, (tuple, list)):
    raise ConfigError('loggers', f'{loggers!r} must be a tuple of names from {LOGGERS}')
  unknown = [n for n in loggers if n not in LOGGERS]
  if unknown:
    raise ConfigError('loggers', f'{tuple(unknown)!r} are not loggers; choose from {LOGGERS}')


def _validate_task(config) -> bool:
  """The task and, for classification, its settings; True when classifying."""
  task = config.get('task', 'lm')
  if task not in TASKS:
    raise ConfigError('task', f'{task!r} must be one of {TASKS}')
  if task != 'classification':
    if config.get('classification') and config.classification.freeze_base:
      raise ConfigError('classification.freeze_base', "is for task='classification'")
    return False
  from xenith.data import labelled  # pylint: disable=g-import-not-at-top
  from xenith.model import classifier  # pylint: disable=g-import-not-at-top
  _one_of(config, 'classification.pooling', classifier.POOLINGS)
  sources = ('folder',) + tuple(labelled.BUILT_IN)
  _require(config, 'data.source', lambda v: v in sources,
           f"must be one of {sources} with task='classification' (labelled documents)")
  labels = config.classification.labels
  if isinstance(labels, str) or any(not isinstance(x, str) or not x for x in labels):
    raise ConfigError('classification.labels', f'{labels!r} must be a tuple of non-empty '
                      'label names (() = the train split\'s)')
  if config.passkey.lengths:
    raise ConfigError('passkey.lengths', "passkey retrieval evaluates a language model; "
                      "set it to () with task='classification'")
  return True


def _validate_data_sources(config) -> None:
  """The fields of the tfds / hf / tokens sources and of a mixture's entries."""
  from xenith.data import mixture  # pylint: disable=g-import-not-at-top
  entries = mixture.entries(config.data)  # ConfigError on a bad entry.
  for own, where in ([(c, f'data.mixture[{i}].') for i, (c, _) in enumerate(entries)]
                     or [(config.data, 'data.')]):
    if own.source not in DATA_SOURCES or own.source == 'passkey' and entries:
      raise ConfigError(where + 'source', f'{own.source!r} must be one of '
                        f'{DATA_SOURCES[:-1]}')
    if own.source == 'tfds' and not own.tfds_name:
      raise ConfigError(where + 'tfds_name', "is empty; source='tfds' reads that dataset")
    if own.source in ('hf', 'tokens') or entries and own.source == 'folder':
      if not own.path:
        raise ConfigError(where + 'path', f"is empty; source={own.source!r} reads it")
    if own.source == 'tokens' and config.data.tokenizer == 'train':
      raise ConfigError('data.tokenizer', "'train' cannot train on token ids (source="
                        "'tokens'); give the corpus folder, which holds its tokenizer")
    if not own.get('text_key', 'text'):
      raise ConfigError(where + 'text_key', 'must name the text field')
    if own.source in ('shakespeare', 'folder') and own.get('eval_split', 'validation') not in (
        'validation', 'train'):
      raise ConfigError(where + 'eval_split', f"{own.eval_split!r}: source={own.source!r} "
                        "has splits 'validation' and 'train'")


def validate(config: ml_collections.ConfigDict, num_devices: int | None,
             process_count: int = 1) -> None:
  """Raises ConfigError on the first invalid field of `config`; `num_devices=None` skips
  the checks that need the device count (mesh shape, batch divisibility)."""

  _finite(config)
  _positive(config, 'num_train_steps', 'log_every_steps', 'eval_every_steps',
            'checkpoint_every_steps', 'keep_checkpoints', 'global_batch_size', 'max_seq_len')
  _require(config, 'num_eval_batches', lambda v: v == -1 or v > 0, 'must be -1 (all) or > 0')
  _one_of(config, 'on_nonfinite', ON_NONFINITE)
  if 'max_consecutive_nonfinite' in config:
    _positive(config, 'max_consecutive_nonfinite')
  _require(config, 'peak_flops_per_device', lambda v: v >= 0, 'must be >= 0')

  opt = 'optimizer.'
  _require(config, opt + 'learning_rate', lambda v: v > 0, 'must be > 0')
  _require(config, opt + 'warmup_steps',
           lambda v: 0 <= v < config.num_train_steps, 'must be in [0, num_train_steps)')
  _require(config, opt + 'end_lr_fraction', lambda v: 0 <= v <= 1, 'must be in [0, 1]')
  _require(config, opt + 'grad_clip_norm', lambda v: v >= 0, 'must be >= 0 (0 = off)')
  _require(config, opt + 'weight_decay', lambda v: v >= 0, 'must be >= 0')
  for field in ('b1', 'b2'):
    _require(config, opt + field, lambda v: 0 <= v < 1, 'must be in [0, 1)')
  _require(config, opt + 'eps', lambda v: v >= 0, 'must be >= 0')

  m = config.model
  _positive(config, 'model.vocab_size', 'model.embed_dim', 'model.num_layers',
            'model.num_heads', 'model.num_kv_heads', 'model.head_dim', 'model.mlp_dim')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError('model.num_heads', f'{m.num_heads} must be divisible by '
                      f'config.model.num_kv_heads={m.num_kv_heads}')
  if m.head_dim % 2:
    raise ConfigError('model.head_dim', f'{m.head_dim} must be even (RoPE rotates pairs)')
  _validate_rope(config)
  _one_of(config, 'model.norm', tuple(NORMS))
  _one_of(config, 'model.dtype', DTYPES)
  _one_of(config, 'model.remat', ('none',) + tuple(REMAT_POLICIES))
  _require(config, 'model.dropout_rate', lambda v: 0 <= v < 1, 'must be in [0, 1)')
  if 'loss_chunk_size' in m:
    _require(config, 'model.loss_chunk_size', lambda v: isinstance(v, int) and v >= 0,
             'must be an int >= 0 (0 = full logits)')
  _validate_lora(config)
  _validate_moe(config)
  _validate_lora_ranks(config)
  _validate_language_adapters(config)
  _validate_attention(config)
  _validate_memory(config)
  _validate_passkey(config)
  _validate_observability(config)

  if not _validate_task(config):  # (A classifier's data source is checked there.)
    _one_of(config, 'data.source', DATA_SOURCES)
    _validate_data_sources(config)
  if config.data.source == 'folder' and not config.data.get('mixture'):
    _require(config, 'data.path', lambda v: bool(v) and os.path.isdir(storage.check_local(
        v, 'config.data.path', 'its documents are listed and read as local files')),
             "is not a folder (data.source='folder' reads .txt/.jsonl files from it)")
  tokenizer = config.data.tokenizer
  if tokenizer not in NAMED_TOKENIZERS:
    from xenith.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    try:
      tokenizer_lib.check_model_path(tokenizer)
    except DataError:
      raise ConfigError('data.tokenizer', f'{tokenizer!r} is neither one of '
                        f'{NAMED_TOKENIZERS} nor an existing SentencePiece .model file, '
                        'Hugging Face tokenizer.json or a folder holding either') from None
  _require(config, 'data.validation_fraction', lambda v: 0 < v < 1, 'must be in (0, 1)')
  if config.data.get('language_tags') and tokenizer == 'mixtral':
    raise ConfigError('data.language_tags', "True needs the tags as pieces: Mixtral's has "
                      "none; use tokenizer='train' or a model from vocab_extension")

  if num_devices is None:
    return
  shape = sharding.mesh_shape(config.mesh, num_devices)
  ways = sharding.batch_parallelism(shape, config.logical_axis_rules)
  if config.global_batch_size % ways:
    raise ConfigError('global_batch_size', f'{config.global_batch_size} must be divisible '
                      f'by the batch parallelism {ways} (mesh axes of activation_batch)')
  if config.global_batch_size % process_count:
    raise ConfigError('global_batch_size', f'{config.global_batch_size} must be divisible '
                      f'by the process count {process_count}')
