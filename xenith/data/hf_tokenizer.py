"""Hugging Face tokenizers (`tokenizer.json`) behind Xenith's `Tokenizer` interface.

`config.data.tokenizer` may name a `tokenizer.json` file or a folder holding one (a
Hugging Face tokenizer directory). It is read with the `tokenizers` library from local
files only. Its special tokens:
  - from the folder's `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`), or
    its `special_tokens_map.json`;
  - else the added special token with a well-known name (`KNOWN`: `<s>`, `</s>`,
    `<|endoftext|>`, `<pad>`, ...).
An EOS token is required (documents end with it): without one, a one-line DataError.
Without a BOS token the EOS token doubles as BOS (GPT-2's convention: one token between
documents); without a PAD token, padding uses the EOS id (Xenith masks padding by
segment ids, so its id only matters to an exported model's `pad_token_id`).
"""

import hashlib
import json

import tokenizers

from xenith import storage
from xenith.errors import DataError

TOKENIZER_JSON = 'tokenizer.json'
TOKENIZER_CONFIG = 'tokenizer_config.json'
SPECIAL_TOKENS_MAP = 'special_tokens_map.json'
# Names that mark a special token's role when no tokenizer_config.json says, in order.
KNOWN = {
    'bos_token': ('<s>', '<|begin_of_text|>', '<bos>', '<|startoftext|>', '[BOS]'),
    'eos_token': ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '[EOS]'),
    'pad_token': ('<pad>', '<|pad|>', '[PAD]'),
}


def _content(token) -> str | None:
  """A special token as tokenizer_config.json gives it: a string or {'content': ...}."""
  return token.get('content') if isinstance(token, dict) else token


class HfTokenizer:
  """A `tokenizers.Tokenizer` with the ids the pipeline needs (see the module doc)."""

  kind = 'hf'

  def __init__(self, tokenizer_json: bytes, special: dict[str, str | None], name: str):
    """tokenizer_json: the file's bytes; special: {'bos_token': '<s>' or None, ...}."""
    self.name = name
    self._json = tokenizer_json
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode())
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises plain Exception)
      raise DataError(f'{name}: not a Hugging Face tokenizer.json ({e}).') from None
    added = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
    special = dict(special)
    for role, names in KNOWN.items():
      if special.get(role) is None:
        special[role] = next((n for n in names if n in added), None)
    if special['eos_token'] is None:
      raise DataError(f'Tokenizer {name!r} has no EOS token (no eos_token in its '
                      f'{TOKENIZER_CONFIG}, none of {list(KNOWN["eos_token"])}); '
                      'Xenith ends every document with one.')
    missing = [f'{role}={token!r}' for role, token in special.items()
               if token is not None and self._tok.token_to_id(token) is None]
    if missing:
      raise DataError(f'Tokenizer {name!r}: {", ".join(missing)} not in its vocabulary.')
    special['bos_token'] = special['bos_token'] or special['eos_token']
    special['pad_token'] = special['pad_token'] or special['eos_token']
    self.special = special
    self._ids = {role: self._tok.token_to_id(token) for role, token in special.items()}

  @classmethod
  def from_path(cls, spec: str) -> 'HfTokenizer':
    """From a `tokenizer.json` file or a folder holding one (local or gs://)."""
    path = storage.path(spec, 'config.data.tokenizer')
    folder = path if path.is_dir() else path.parent  # Its settings sit beside it.
    special = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # The config wins.
      if storage.is_file(folder / name):
        try:
          settings = json.loads((folder / name).read_text())
        except ValueError as e:
          raise DataError(f'{folder / name}: not JSON ({e}).') from None
        special.update({role: _content(settings[role]) for role in KNOWN
                        if settings.get(role) is not None})
    file = folder / TOKENIZER_JSON if path.is_dir() else path
    return cls(file.read_bytes(), special, name=str(file))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._ids['bos_token']

  @property
  def eos_id(self) -> int:
    return self._ids['eos_token']

  @property
  def pad_id(self) -> int:
    return self._ids['pad_token']

  @property
  def digest(self) -> str:
    """A short hash of tokenizer.json and the special tokens."""
    settings = json.dumps(self.special, sort_keys=True).encode()
    return hashlib.sha256(self._json + b'\0' + settings).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS (no post-processor specials)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
    del num_threads  # tokenizers picks its own (RAYON_NUM_THREADS).
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    """The text of `ids`; special tokens (BOS, EOS, padding) are dropped."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def piece_id(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def files(self) -> dict[str, bytes]:
    """The files that hold this tokenizer (a run pins them; an HF export writes them):
    tokenizer.json as given, and a tokenizer_config.json naming the special tokens."""
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', **self.special,
              'add_bos_token': False, 'add_eos_token': False}
    return {TOKENIZER_JSON: self._json,
            TOKENIZER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode()}

  def export_files(self) -> dict[str, bytes]:
    """The files of a Hugging Face export: those a run pins (`AutoTokenizer` reads them)."""
    return self.files()

  def special_token_ids(self) -> dict[str, int]:
    """config.json's token ids: {'bos_token_id': .., 'eos_token_id': .., 'pad_token_id': ..}."""
    return {f'{role}_id': i for role, i in self._ids.items()}
