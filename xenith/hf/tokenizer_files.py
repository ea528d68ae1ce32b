"""A Hugging Face export's tokenizer: its files, and the token ids in config.json and
generation_config.json, so that `transformers.AutoTokenizer` and `generate` use the ids
the model was trained with (not Hugging Face's defaults, bos 1 and eos 2).

Xenith's SentencePiece models go out as tokenizer.model + tokenizer_config.json +
special_tokens_map.json (a Llama tokenizer that adds BOS, not EOS; pad 0, unk 1, bos 2,
eos 3); a Hugging Face tokenizer as its tokenizer.json + tokenizer_config.json.
"""

import os
from typing import Any

from xenith import atomic_files

GENERATION_CONFIG = 'generation_config.json'


def with_token_ids(hf_config: dict[str, Any] | None, tokenizer) -> dict[str, Any]:
  """`hf_config` (None: empty) with the tokenizer's bos/eos/pad(/unk)_token_id."""
  return {**(hf_config or {}), **tokenizer.special_token_ids()}


def write(path: str, tokenizer) -> None:
  """Writes `tokenizer`'s export files and generation_config.json into the folder `path`."""
  for name, data in tokenizer.export_files().items():
    atomic_files.write_bytes(os.path.join(path, name), data)
  ids = tokenizer.special_token_ids()
  atomic_files.write_json(os.path.join(path, GENERATION_CONFIG),
                          {k: ids[k] for k in ('bos_token_id', 'eos_token_id',
                                               'pad_token_id')},
                          indent=2, sort_keys=True)
