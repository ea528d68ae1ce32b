"""Grows an existing SentencePiece vocabulary (e.g. Mixtral's) with pieces of a new
language, keeping every existing piece and id.

New pieces are appended after the last id, so a model trained on the old vocabulary
loads with a larger embedding whose first rows are the old ones (the checkpoint loader
resizes it). The pieces come from a BPE model trained on the new language's text
(`tokenizer._train`): all of its ordinary pieces not already in the base, in its merge
order, scored below every base piece. A BPE model merges by score, so base merges always
win, and text without the new characters (English) encodes to exactly the old ids; a new
piece is reachable because the pieces it merges from came with it (or were there).
"""

import pathlib

from sentencepiece import sentencepiece_model_pb2

from xenith import atomic_files
from xenith.data import language_id
from xenith.data import tokenizer as tokenizer_lib
from xenith.errors import DataError

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


def extend(base_proto: bytes, texts, num_pieces: int, *,
           user_symbols: tuple[str, ...] = language_id.RESERVED_TAGS,
           nfc: bool = True) -> bytes:
  """A SentencePiece model: `base_proto` plus pieces learned from `texts`.

  Args:
    base_proto: the serialized base model (a BPE model, e.g. Mixtral's).
    texts: the new language's text (an iterable of strings).
    num_pieces: the size of the BPE model trained on `texts`; the base gains its pieces
      that are new (fewer than this: bytes, specials and shared pieces are not added).
    user_symbols: appended first as single user-defined pieces (the language tags).
    nfc: mark the result NFC (`Tokenizer` then normalises its input; ASCII is unchanged).

  Returns:
    The extended model, serialized: ids 0..n-1 are the base's, n.. the new pieces.
  """
  base = sentencepiece_model_pb2.ModelProto.FromString(base_proto)
  if base.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(base.trainer_spec.model_type)
    raise DataError(f'Only a BPE model can be extended (merges follow scores), not {kind}.')
  learned = sentencepiece_model_pb2.ModelProto.FromString(
      tokenizer_lib._train(texts, num_pieces, nfc=nfc))  # pylint: disable=protected-access
  have = {p.piece for p in base.pieces}
  for symbol in user_symbols:
    if symbol not in have:
      base.pieces.append(_Piece(piece=symbol, score=0.0, type=_Piece.USER_DEFINED))
      have.add(symbol)
  # Below the lowest ordinary score. Pieces parked far lower (Mixtral's whitespace runs at
  # -1e9) are left out: float32 scores cannot step below them by 1.
  score = min(p.score for p in base.pieces
              if p.type == _Piece.NORMAL and p.score > -2.0**22)
  for p in learned.pieces:
    if p.type == _Piece.NORMAL and p.piece not in have:
      # Below every base piece, in the learned merge order.
      score -= 1.0
      base.pieces.append(_Piece(piece=p.piece, score=score, type=_Piece.NORMAL))
      have.add(p.piece)
  base.trainer_spec.vocab_size = len(base.pieces)
  if nfc:
    base.normalizer_spec.name = tokenizer_lib.NFC
  return base.SerializeToString()


def write_extended(base_proto: bytes, texts, num_pieces: int,
                   path: pathlib.Path) -> tokenizer_lib.Tokenizer:
  """`extend(...)` written atomically to `path` (usable as `config.data.tokenizer`)."""
  proto = extend(base_proto, texts, num_pieces)
  atomic_files.write_bytes(path, proto)
  return tokenizer_lib.Tokenizer(proto, name=str(path))
