"""Hugging Face tokenizers as `config.data.tokenizer` (against the `tokenizers` and
`transformers` libraries that own the format), the special-token rule, the vocabulary
check, and either kind pinned in a workdir and read back."""

import json

import pytest
import sentencepiece as spm
import tokenizers
import transformers

from experiments import default
from xenith.config_validation import validate
from test_hf_export_tokenizer import byte_level_bpe
from xenith.data import hf_tokenizer
from xenith.data import tokenizer as tokenizer_lib
from xenith.errors import ConfigError
from xenith.errors import DataError
from xenith.errors import WorkdirError
from xenith.train import run_record

TEXT = 'NURSE: Thou art the night, my lord! 42 ü'


def _hf_folder(folder, specials, config=None):
  """`folder` with a byte-level BPE tokenizer.json (and `config` as its
  tokenizer_config.json); the folder's path as a string."""
  folder.mkdir()
  byte_level_bpe(300, specials).save(str(folder / 'tokenizer.json'))
  if config is not None:
    (folder / 'tokenizer_config.json').write_text(json.dumps(config))
  return str(folder)


def _load(spec, vocab_size=512):
  return tokenizer_lib.load_tokenizer(spec, vocab_size=vocab_size, cache=None)


def test_an_hf_folder_encodes_and_decodes_as_transformers_does(tmp_path):
  """A folder with tokenizer.json + tokenizer_config.json: the special ids are those the
  config names (not the first-listed specials), and encode/decode agree with
  transformers' PreTrainedTokenizerFast on the same files."""
  folder = _hf_folder(tmp_path / 'tok', ['<x>', '<pad>', '<s>', '</s>'], config={
      'bos_token': '<s>', 'eos_token': {'content': '</s>'}, 'pad_token': '<pad>'})
  tok = _load(folder)
  reference = transformers.PreTrainedTokenizerFast(
      tokenizer_file=f'{folder}/tokenizer.json', bos_token='<s>', eos_token='</s>',
      pad_token='<pad>')
  assert tok.kind == 'hf' and tok.vocab_size == len(reference)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (reference.bos_token_id,
                                                  reference.eos_token_id,
                                                  reference.pad_token_id) == (2, 3, 1)
  ids = reference(TEXT, add_special_tokens=False)['input_ids']
  assert tok.encode(TEXT) == ids and tok.encode_batch([TEXT, 'ROMEO']) == [
      ids, reference('ROMEO', add_special_tokens=False)['input_ids']]
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == TEXT
  assert tok.id_to_piece(ids[0]) == reference.convert_ids_to_tokens(ids[0])
  assert tok.piece_id('</s>') == 3 and tok.piece_id('<nope>') is None
  # The tokenizer.json file alone, beside its config, is the same tokenizer.
  assert _load(f'{folder}/tokenizer.json').digest == tok.digest


def test_without_bos_or_pad_the_eos_token_stands_in_and_without_eos_is_an_error(tmp_path):
  tok = _load(_hf_folder(tmp_path / 'gpt2', ['<|endoftext|>']))  # No tokenizer_config.
  eot = tokenizers.Tokenizer.from_file(str(tmp_path / 'gpt2' / 'tokenizer.json')
                                       ).token_to_id('<|endoftext|>')
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot)
  with pytest.raises(DataError, match=r'has no EOS token') as e:
    _load(_hf_folder(tmp_path / 'none', ['<unk>']))
  assert '\n' not in str(e.value)
  with pytest.raises(DataError, match=r"eos_token='<end>' not in its vocabulary"):
    _load(_hf_folder(tmp_path / 'bad', ['</s>'], config={'eos_token': '<end>'}))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_a_config_error(tmp_path):
  folder = _hf_folder(tmp_path / 'tok', ['</s>'])
  with pytest.raises(ConfigError, match=r'^config.model.vocab_size: 256 is less than the '
                     r'300 pieces of tokenizer') as e:
    _load(folder, vocab_size=256)
  assert '\n' not in str(e.value)
  with pytest.raises(DataError, match='a Hugging Face tokenizer.json or a folder'):
    _load(str(tmp_path / 'missing'))
  # main.py's validation takes the folder and its tokenizer.json, and names a missing one.
  config = default.get_config('size=tiny')
  for spec in (folder, f'{folder}/tokenizer.json'):
    config.data.tokenizer = spec
    validate(config, num_devices=None)
  config.data.tokenizer = str(tmp_path / 'missing')
  with pytest.raises(ConfigError, match=r"^config.data.tokenizer: '.*missing' is neither"):
    validate(config, num_devices=None)


def _sentencepiece(tmp_path):
  """A small Xenith SentencePiece model (pad 0, unk 1, bos 2, eos 3) and its file."""
  proto = tokenizer_lib._train(  # pylint: disable=protected-access
      [TEXT, 'ROMEO: I love the night, my lord.'] * 50, 300)
  path = tmp_path / 'sp.model'
  path.write_bytes(proto)
  return tokenizer_lib.Tokenizer(proto, name='sp'), path


def test_either_kind_is_pinned_in_the_workdir_and_a_change_is_refused(tmp_path):
  """The run record pins an HF tokenizer as tokenizer.json + tokenizer_config.json and
  reads it back; a resume with another tokenizer stops; an allowed change to a
  SentencePiece one replaces the files; a workdir that has only tokenizer.model (made
  before HF tokenizers) reads as SentencePiece."""
  config = default.get_config('size=tiny')
  hf = _load(_hf_folder(tmp_path / 'tok', ['<|endoftext|>']))
  sp, sp_path = _sentencepiece(tmp_path)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  record = run_record.RunRecord(str(workdir))
  record.write(config, hf, 'data', 0, ())
  assert sorted(p.name for p in workdir.iterdir()) == ['run.json', 'tokenizer.json',
                                                       'tokenizer_config.json']
  pinned = tokenizer_lib.read_pinned(str(workdir))
  assert pinned.kind == 'hf' and pinned.digest == hf.digest
  assert pinned.encode(TEXT) == hf.encode(TEXT) and pinned.eos_id == hf.eos_id
  with pytest.raises(WorkdirError, match=r'changed: the tokenizer .*--allow_changes='
                     r'tokenizer'):
    run_record.RunRecord(str(workdir)).check_data(sp, 'data', ())
  run_record.RunRecord(str(workdir)).write(config, sp, 'data', 1, ('tokenizer',))
  assert sorted(p.name for p in workdir.iterdir()) == ['run.json', 'tokenizer.model']
  old = tmp_path / 'old'  # The layout of a workdir from before: tokenizer.model only.
  old.mkdir()
  (old / 'tokenizer.model').write_bytes(sp_path.read_bytes())
  pinned = tokenizer_lib.read_pinned(str(old))
  assert pinned.kind == 'sentencepiece' and pinned.digest == sp.digest
  assert pinned.encode(TEXT) == spm.SentencePieceProcessor(
      model_file=str(sp_path)).encode(TEXT)
  assert tokenizer_lib.read_pinned(str(tmp_path / 'tok' / 'missing')) is None


def _exported(tokenizer, out):
  """`tokenizer`'s export files beside a Mistral config.json in `out`, loaded by
  transformers.AutoTokenizer."""
  out.mkdir()
  for name, data in tokenizer.export_files().items():
    (out / name).write_bytes(data)
  (out / 'config.json').write_text(json.dumps({'model_type': 'mistral'}))
  return transformers.AutoTokenizer.from_pretrained(out)


def test_sentencepiece_export_files_load_in_transformers_as_llama(tmp_path):
  """tokenizer.model + tokenizer_config.json + tokenizer.json, beside a Mistral
  config.json: AutoTokenizer adds BOS (not EOS), has pad 0, unk 1, bos 2, eos 3, and
  encodes and decodes as SentencePiece does."""
  sp, sp_path = _sentencepiece(tmp_path)
  hf = _exported(sp, tmp_path / 'hf')
  assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
  assert sp.special_token_ids() == {'pad_token_id': 0, 'unk_token_id': 1,
                                    'bos_token_id': 2, 'eos_token_id': 3}
  reference = spm.SentencePieceProcessor(model_file=str(sp_path))
  for text in (TEXT, 'ROMEO:\nI love the night.\n', 'tabs\tand 2025'):
    assert hf(text)['input_ids'] == [2, *reference.encode(text)], text
    assert hf.decode(hf(text)['input_ids'], skip_special_tokens=True) == text
  assert hf_tokenizer.TOKENIZER_JSON in sp.export_files()


def test_hf_export_files_load_in_transformers(tmp_path):
  """An HF tokenizer's export files, beside a Mistral config.json: AutoTokenizer has its
  special tokens and encodes as Xenith does."""
  tok = _load(_hf_folder(tmp_path / 'tok', ['<pad>', '<s>', '</s>']))
  hf = _exported(tok, tmp_path / 'hf')
  assert tok.special_token_ids() == {'pad_token_id': 0, 'bos_token_id': 1,
                                     'eos_token_id': 2}
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
  assert hf(TEXT, add_special_tokens=False)['input_ids'] == tok.encode(TEXT)
