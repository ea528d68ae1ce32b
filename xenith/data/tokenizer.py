"""SentencePiece tokenizers: trained on the train split, Mixtral's, or a file.

`load_tokenizer(config.data.tokenizer, ...)` accepts
  'train':   a BPE SentencePiece model trained on the train split, with
             `config.model.vocab_size` pieces (byte fallback, pad=0, unk=1,
             bos=2, eos=3), cached per dataset fingerprint and vocabulary size;
             with `config.data.language_tags` the Hinglish variant: NFC text and the
             language tags (`<HIN>`, `<ENG>`, `<MIX>`, `<LANG3>`.. `<LANG7>`) as
             single pieces at ids 4-11 (docs/hinglish.md);
  'mixtral': the Mixtral-8x7B model (32,000 pieces) taken from the wheel of
             `mistral-common`, cached;
  a path:    an existing SentencePiece `.model` file, or a Hugging Face `tokenizer.json`
             or a folder holding one (`HfTokenizer`, hf_tokenizer.py).

Both kinds share one interface (vocab_size, bos_id, eos_id, pad_id, digest, encode,
encode_batch, decode, id_to_piece, piece_id, `files()` to pin it in a workdir and
`export_files()` / `special_token_ids()` for a Hugging Face export); `read_pinned(dir)`
reads either back from the files `files()` wrote.
"""

import hashlib
import io
import json
import math
import os
import pathlib
import tempfile
import unicodedata
import zipfile

from absl import logging
from etils import epath
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from xenith import atomic_files
from xenith import storage
from xenith.data import cache as cache_lib
from xenith.data import hf_tokenizer
from xenith.data import language_id
from xenith.data import passages as passages_lib
from xenith.errors import ConfigError
from xenith.errors import DataError

MIXTRAL_REQUIREMENT = 'mistral-common==1.13.1'
MIXTRAL_WHEEL = 'mistral_common-1.13.1-py3-none-any.whl'
MIXTRAL_MEMBER = 'mistral_common/data/tokenizer.model.v1'
MIXTRAL_VOCAB = 32000

# At most this many characters of the train split feed SentencePiece training;
# larger corpora are subsampled evenly (by passage) so training stays seconds.
MAX_TRAINING_CHARS = 20_000_000
# Bump when the training options below change: it names the cached model.
TRAINING_VERSION = 1
# The normalizer name that marks a model whose input is NFC-normalised (by `Tokenizer`;
# SentencePiece has no NFC rule of its own, only NFKC, which folds too much: ² -> 2).
NFC = 'nfc'
SPM_FILE = 'tokenizer.model'  # The file a SentencePiece tokenizer is pinned / exported as.


class Tokenizer:
  """A SentencePiece model with the ids the pipeline needs.

  Batches are padded with id 0 (`pad_id`). Models without a pad piece (Mixtral)
  have <unk> at 0; padding is masked by segment_ids == 0 either way. A model whose
  normalizer is named 'nfc' (`NFC`) encodes the NFC form of its input.
  """

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes, name: str):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._proto = model_proto
    self.name = name
    self.nfc = (sentencepiece_model_pb2.ModelProto.FromString(model_proto)
                .normalizer_spec.name == NFC)
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise DataError(f'Tokenizer {name!r} has no BOS or EOS piece; the data '
                      'pipeline needs both.')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model."""
    return self._proto

  @property
  def digest(self) -> str:
    """A short hash of the model, for naming files derived from it."""
    return hashlib.sha256(self._proto).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    return self._sp.encode(unicodedata.normalize('NFC', text) if self.nfc else text)

  def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
    """Token ids of many texts at once (SentencePiece's own threads)."""
    if self.nfc:
      texts = [unicodedata.normalize('NFC', t) for t in texts]
    return self._sp.encode(texts, num_threads=num_threads)

  def decode(self, ids) -> str:
    """The text of `ids`; BOS, EOS and padding (id 0) are dropped."""
    # Mixtral has <unk> at 0, which SentencePiece would render as ' ⁇ '; in
    # our batches 0 is padding, and byte fallback never produces <unk>.
    drop_zero = self._sp.is_control(0) or self._sp.is_unknown(0)
    return self._sp.decode([int(i) for i in ids if int(i) or not drop_zero])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_id(self, piece: str) -> int | None:
    """The id of a user-defined piece such as '<HIN>'; None if the model lacks it."""
    i = self._sp.piece_to_id(piece)  # <unk>'s id when there is no such piece.
    return None if self._sp.is_unknown(i) else i

  def files(self) -> dict[str, bytes]:
    """The files that hold this tokenizer, as a run pins them: {'tokenizer.model': ..}."""
    return {SPM_FILE: self._proto}

  def special_token_ids(self) -> dict[str, int]:
    """config.json's token ids (pad 0, unk 1, bos 2, eos 3 for Xenith's trained models)."""
    ids = {'bos_token_id': self.bos_id, 'eos_token_id': self.eos_id,
           'pad_token_id': self.pad_id}
    return {**ids, 'unk_token_id': self._sp.unk_id()} if self._sp.unk_id() >= 0 else ids

  def export_files(self) -> dict[str, bytes]:
    """tokenizer.model with the settings that make `transformers.AutoTokenizer` load it
    as a Llama tokenizer that adds BOS (not EOS), as Xenith's documents begin."""
    piece = lambda i: self._sp.id_to_piece(i) if 0 <= i < self.vocab_size else None
    special = {'bos_token': piece(self.bos_id), 'eos_token': piece(self.eos_id),
               'unk_token': piece(self._sp.unk_id()),
               # Mixtral has <unk> at 0: no pad piece, padding is <unk> there.
               'pad_token': piece(0) if self._sp.is_control(0) else None}
    special = {k: v for k, v in special.items() if v is not None}
    dummy_prefix = (sentencepiece_model_pb2.ModelProto.FromString(self._proto)
                    .normalizer_spec.add_dummy_prefix)
    config = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': True,
              'add_eos_token': False, 'add_prefix_space': dummy_prefix, 'legacy': False,
              'clean_up_tokenization_spaces': False, **special}
    dump = lambda d: json.dumps(d, indent=2, sort_keys=True).encode()
    files = {SPM_FILE: self._proto, 'tokenizer_config.json': dump(config),
             'special_tokens_map.json': dump(special)}
    return {**files, hf_tokenizer.TOKENIZER_JSON: _converted(files)}


def _converted(files: dict[str, bytes]) -> bytes:
  """The tokenizer.json transformers converts `files` (a Llama tokenizer.model and its
  settings) to. Exported with them: next to a config.json of model_type 'mistral',
  AutoTokenizer would otherwise build a tokenizer without the dummy prefix."""
  import transformers  # pylint: disable=g-import-not-at-top  (only an export needs it)
  with tempfile.TemporaryDirectory() as tmp:
    for name, data in files.items():
      pathlib.Path(tmp, name).write_bytes(data)
    converted = transformers.AutoTokenizer.from_pretrained(tmp)
  return converted.backend_tokenizer.to_str().encode()


def mark_nfc(model_proto: bytes) -> bytes:
  """`model_proto` with its normalizer named 'nfc': `Tokenizer` then encodes NFC text."""
  model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
  model.normalizer_spec.name = NFC
  return model.SerializeToString()


def _train(texts, vocab_size: int, *, user_symbols: tuple[str, ...] = (),
           nfc: bool = False) -> bytes:
  """Trains a BPE SentencePiece model on an iterable of texts; returns its proto.

  `user_symbols` become single pieces right after the four special ones (ids 4, 5, ..);
  `nfc` trains on NFC text and marks the model so that `Tokenizer` normalises its input.
  """
  if nfc:
    texts = (unicodedata.normalize('NFC', t) for t in texts)
  # SentencePiece trains on lines; newlines themselves become byte pieces.
  lines = (line for text in texts for line in text.split('\n') if line.strip())
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=out,
        vocab_size=vocab_size,
        # BPE trains in about a second on 5 MB (unigram takes ~10x longer).
        model_type='bpe',
        byte_fallback=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(user_symbols),
        # Keep text exactly: decode(encode(s)) == s, indentation and all.
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        # Use every line given, in order: deterministic and already capped.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # A small corpus may support fewer pieces than asked for.
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise DataError(f'SentencePiece training with config.model.vocab_size='
                    f'{vocab_size} failed: {e}') from None
  return mark_nfc(out.getvalue()) if nfc else out.getvalue()


def train_tokenizer(train_split, vocab_size: int, cache: pathlib.Path,
                    fingerprint: str, language_tags: bool = False) -> Tokenizer:
  """Trains (or loads from the cache) a tokenizer on a data source's texts.

  Args:
    train_split: random-access sequence of {'text': bytes, ...} records.
    vocab_size: the number of pieces to train.
    cache: the cache root.
    fingerprint: the prepared dataset's fingerprint (names the cached model).
    language_tags: the Hinglish variant: NFC, and the language tags as pieces 4-11.
  """
  tags = '-tags' if language_tags else ''
  path = (cache / 'tokenizers' /
          f'{fingerprint}-spm{vocab_size}{tags}-v{TRAINING_VERSION}.model')
  if not path.exists():
    with cache_lib.file_lock(cache, path.stem):
      if not path.exists():
        n = len(train_split)
        # Every passage might be full length: stride so that the cap holds.
        stride = max(1, math.ceil(
            n * passages_lib.PASSAGE_CHARS / MAX_TRAINING_CHARS))
        texts = (train_split[i]['text'].decode() for i in range(0, n, stride))
        logging.info('Training a %d-piece SentencePiece model on %s (every %d-th '
                     'passage) -> %s', vocab_size, fingerprint, stride, path)
        atomic_files.write_bytes(path, _train(
            texts, vocab_size, nfc=language_tags,
            user_symbols=language_id.RESERVED_TAGS if language_tags else ()))
  return Tokenizer(path.read_bytes(), name=str(path))


def mixtral_model_proto(cache: pathlib.Path) -> bytes:
  """Mixtral-8x7B's SentencePiece model, from the mistral-common wheel (cached)."""
  path = cache / 'tokenizers' / 'mixtral-8x7b-v1.model'
  if not path.exists():
    wheel = cache_lib.pip_download(cache, MIXTRAL_REQUIREMENT, MIXTRAL_WHEEL,
                                   binary=True)
    with zipfile.ZipFile(wheel) as zf:
      atomic_files.write_bytes(path, zf.read(MIXTRAL_MEMBER))
  return path.read_bytes()


def check_model_path(spec: str) -> epath.Path:
  """The tokenizer file named by `config.data.tokenizer` (local or gs://), if it exists: a
  SentencePiece `.model`, a Hugging Face `tokenizer.json`, or a folder's tokenizer.model
  (if it has one; a SentencePiece model) or tokenizer.json."""
  path = storage.path(spec, 'config.data.tokenizer')
  if path.is_dir():
    spm_file = path / SPM_FILE
    path = spm_file if storage.is_file(spm_file) else path / hf_tokenizer.TOKENIZER_JSON
  if not storage.is_file(path):
    raise DataError(f"config.data.tokenizer={spec!r} is not 'train', 'mixtral', an "
                    'existing SentencePiece .model file, a Hugging Face tokenizer.json '
                    'or a folder holding either.')
  return path


def read_pinned(directory) -> 'Tokenizer | hf_tokenizer.HfTokenizer | None':
  """The tokenizer pinned in `directory` (a workdir) by writing its `files()`; None if
  there is none. A SentencePiece one is tokenizer.model (workdirs from before HF
  tokenizers have only that), an HF one tokenizer.json + tokenizer_config.json."""
  directory = storage.path(directory)
  if storage.is_file(directory / SPM_FILE):
    return Tokenizer((directory / SPM_FILE).read_bytes(), name=str(directory / SPM_FILE))
  if storage.is_file(directory / hf_tokenizer.TOKENIZER_JSON):
    return hf_tokenizer.HfTokenizer.from_path(str(directory))
  return None


PINNED_FILES = (SPM_FILE, hf_tokenizer.TOKENIZER_JSON, hf_tokenizer.TOKENIZER_CONFIG)


def load_tokenizer(spec: str, *, vocab_size: int, cache: pathlib.Path,
                   train_split=None, fingerprint: str | None = None,
                   language_tags: bool = False) -> Tokenizer:
  """The tokenizer named by `config.data.tokenizer`.

  Args:
    spec: 'train', 'mixtral', the path of a SentencePiece `.model` file, or of a Hugging
      Face tokenizer.json or a folder holding one.
    vocab_size: `config.model.vocab_size`; pieces to train, and the most allowed.
    cache: the cache root.
    train_split: the train split (records with 'text' bytes), for 'train'.
    fingerprint: the dataset fingerprint, for 'train'.
    language_tags: `config.data.language_tags`: 'train' trains the Hinglish variant,
      and any tokenizer must have the language tags as pieces.

  Raises:
    DataError: unknown spec, missing file, or no language tags where they are needed.
    ConfigError: more pieces than `vocab_size`.
  """
  if spec == 'train':
    if train_split is None or fingerprint is None:
      raise DataError("tokenizer='train' needs the train split to train on.")
    tok = train_tokenizer(train_split, vocab_size, cache, fingerprint, language_tags)
  elif spec == 'mixtral':
    tok = Tokenizer(mixtral_model_proto(cache), name='mixtral')
  elif (path := check_model_path(spec)).name.endswith('.json'):
    tok = hf_tokenizer.HfTokenizer.from_path(os.fspath(path))
  else:
    try:
      tok = Tokenizer(path.read_bytes(), name=str(path))
    except RuntimeError as e:
      raise DataError(f'{path}: not a SentencePiece model ({e}).') from None
  if tok.vocab_size > vocab_size:
    raise ConfigError('model.vocab_size', f'{vocab_size} is less than the {tok.vocab_size} '
                      f'pieces of tokenizer {tok.name!r}; raise it or pick a smaller '
                      'config.data.tokenizer.')
  missing = [t for t in language_id.TAGS.values() if tok.piece_id(t) is None]
  if language_tags and missing:
    raise DataError(f'config.data.language_tags=True needs the tags {missing} as pieces '
                    f"of tokenizer {tok.name!r}; use 'train' or a model made by "
                    'xenith.data.vocab_extension.')
  return tok
