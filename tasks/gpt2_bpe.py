"""GPT-2's byte-level BPE as a seqio vocabulary (the 'gpt2:' spec of
tasks/vocabularies.py), from local files only.

Ids are the files' own ids shifted up by one, so that 0 is padding; EOS is
<|endoftext|>. A directory is read in this order:
  encoder.json + vocab.bpe   OpenAI's layout (must be GPT-2's bytes-then-merges order)
  tokenizer.json             a tokenizers-library file (transformers' save_pretrained)
  vocab.json + merges.txt    transformers' slow-tokenizer layout
  one *.tiktoken file        tiktoken's rank file (or the path of such a file)
Where the ids are in GPT-2's order (the 256 byte tokens in GPT-2's alphabet order,
then one per merge in merge order, specials after), tiktoken encodes; otherwise
(e.g. a byte-level BPE trained with the tokenizers library, whose specials and
alphabet come first) the tokenizers library does, with the file's own merges.
Either way the ids equal transformers' AutoTokenizer's on the same files, plus one.
"""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import seqio
import tensorflow as tf
import tiktoken

from tasks.errors import VocabularyError

END_OF_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer (tiktoken's r50k pattern): contractions, letters, digits,
# other symbols, whitespace.
GPT2_SPLIT_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")


def _data_gym_byte_alphabet() -> dict[str, int]:
  """GPT-2's printable stand-in character for each byte (the encoder.json alphabet):
  printable Latin-1 bytes stand for themselves, the rest map to chr(256 + n)."""
  printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  alphabet = {chr(b): b for b in printable}
  extra = 0
  for b in range(256):
    if b not in alphabet.values():
      alphabet[chr(256 + extra)] = b
      extra += 1
  return alphabet


def _decode_data_gym(token: str, alphabet: dict[str, int], where: str) -> bytes:
  try:
    return bytes(alphabet[c] for c in token)
  except KeyError as e:
    raise VocabularyError(f"{where}: token {token!r} has a character outside GPT-2's "
                          f"byte alphabet: {e.args[0]!r}") from None


def load_gpt2_ranks(encoder_json: str, vocab_bpe: str) -> tuple[dict[bytes, int], int | None]:
  """Mergeable ranks from GPT-2's `encoder.json` + `vocab.bpe`, checked against each
  other; returns (ranks, id of <|endoftext|> in encoder.json or None)."""
  alphabet = _data_gym_byte_alphabet()
  with open(encoder_json, encoding="utf-8") as f:
    try:
      encoder = json.load(f)
    except json.JSONDecodeError as e:
      raise VocabularyError(f"{encoder_json}: not JSON ({e})") from None
  if not isinstance(encoder, dict):
    raise VocabularyError(f"{encoder_json}: expected a JSON object token -> id")
  eot_id = encoder.pop(END_OF_TEXT, None)
  encoder.pop("<|startoftext|>", None)
  from_encoder = {_decode_data_gym(k, alphabet, encoder_json): v for k, v in encoder.items()}

  # The ranks tiktoken needs: single bytes in alphabet order, then one per merge.
  ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())}
  with open(vocab_bpe, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for line_number, line in enumerate(lines[1:], start=2):  # line 1 is a version header
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise VocabularyError(f"{vocab_bpe} line {line_number}: expected two tokens, "
                            f"got {line!r}")
    merged = b"".join(_decode_data_gym(p, alphabet, f"{vocab_bpe} line {line_number}")
                      for p in parts)
    ranks[merged] = len(ranks)
  if from_encoder != ranks:
    raise VocabularyError(f"{encoder_json} does not match the merges in {vocab_bpe} "
                          f"({len(from_encoder)} vs {len(ranks)} tokens)")
  return ranks, eot_id


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
  ranks = {}
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError:
        raise VocabularyError(f"{path} line {line_number}: expected 'BASE64 RANK', "
                              f"got {line[:80]!r}") from None
  return ranks


# The files a directory may hold, by layout (what `paxgpt export` writes and
# `paxgpt import` copies).
TOKENIZER_FILES = ("encoder.json", "vocab.bpe", "tokenizer.json", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json")


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise VocabularyError(f"{path}: not JSON ({e})") from None


def _read_merges(path) -> list[str]:
  """merges.txt: one 'left right' pair a line, after an optional '#version' line."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and lines[0].startswith("#version"):
    lines = lines[1:]
  merges = []
  for number, line in enumerate(lines, start=1):
    if line.strip():
      if len(line.split()) != 2:
        raise VocabularyError(f"{path}: merge {number} is not two tokens: {line!r}")
      merges.append(line)
  return merges


def _gpt2_order_ranks(vocab: dict[str, int], merges: list[str], where: str):
  """(ranks, EOS id) when `vocab` is in GPT-2's order (tiktoken can encode it
  exactly), else None."""
  alphabet = _data_gym_byte_alphabet()
  vocab = dict(vocab)
  eot_id = vocab.pop(END_OF_TEXT, None)
  ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())}
  try:
    for merge in merges:
      left, right = merge.split()
      ranks[_decode_data_gym(left, alphabet, where)
            + _decode_data_gym(right, alphabet, where)] = len(ranks)
    as_bytes = {_decode_data_gym(k, alphabet, where): v for k, v in vocab.items()}
  except VocabularyError:
    return None
  if as_bytes != ranks or (eot_id is not None and eot_id < len(ranks)):
    return None
  return ranks, eot_id


def _load_tokenizers(location: str):
  """The tokenizers-library tokenizer of a directory's tokenizer.json or
  vocab.json + merges.txt, checked to be a byte-level BPE."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  path = os.path.join(location, "tokenizer.json")
  if os.path.isfile(path):
    spec = _read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
      raise VocabularyError(f"{path}: not a byte-level BPE (model {model.get('type')!r}, "
                            f"pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:60]})")
    try:
      return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side's errors name no file
      raise VocabularyError(f"{path}: {e}") from None
  vocab_json, merges_txt = (os.path.join(location, n) for n in ("vocab.json", "merges.txt"))
  try:
    bpe = models.BPE.from_file(vocab_json, merges_txt)
  except Exception as e:
    raise VocabularyError(f"{vocab_json} + merges.txt: {e}") from None
  tok = tokenizers.Tokenizer(bpe)
  # transformers' GPT2Tokenizer on these files: GPT-2's regex split, no prefix space.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  if END_OF_TEXT in _read_json(vocab_json):
    tok.add_special_tokens([END_OF_TEXT])
  return tok


def _find_gpt2_files(location: str):
  """(ranks, EOS id or None) for tiktoken, or a tokenizers.Tokenizer."""
  if os.path.isfile(location):
    return load_tiktoken_ranks(location), None
  if not os.path.isdir(location):
    raise VocabularyError(f"gpt2 vocabulary: {location} is neither a directory nor a "
                          ".tiktoken file")
  encoder_json = os.path.join(location, "encoder.json")
  vocab_bpe = os.path.join(location, "vocab.bpe")
  if os.path.isfile(encoder_json) and os.path.isfile(vocab_bpe):
    return load_gpt2_ranks(encoder_json, vocab_bpe)
  tokenizer_json = os.path.join(location, "tokenizer.json")
  vocab_json, merges_txt = (os.path.join(location, n) for n in ("vocab.json", "merges.txt"))
  if os.path.isfile(tokenizer_json):
    model = _read_json(tokenizer_json).get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = [t for t in _read_json(tokenizer_json).get("added_tokens", [])
             if t.get("content") != END_OF_TEXT]
    found = None if added else _gpt2_order_ranks(model.get("vocab", {}), merges,
                                                 tokenizer_json)
    return found or _load_tokenizers(location)
  if os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
    return (_gpt2_order_ranks(_read_json(vocab_json), _read_merges(merges_txt), vocab_json)
            or _load_tokenizers(location))
  tiktoken_files = sorted(n for n in os.listdir(location) if n.endswith(".tiktoken"))
  if len(tiktoken_files) == 1:
    return load_tiktoken_ranks(os.path.join(location, tiktoken_files[0])), None
  raise VocabularyError(f"gpt2 vocabulary: {location} holds neither encoder.json + "
                        f"vocab.bpe, tokenizer.json, vocab.json + merges.txt nor exactly "
                        f"one .tiktoken file")


class _TokenizersBackend:
  """The tokenizers library behind the same interface as a tiktoken Encoding.
  Encoding goes through a copy without the special tokens, so that
  '<|endoftext|>' written in a document is text, as with tiktoken's
  encode_ordinary (AutoTokenizer would make it EOS)."""

  def __init__(self, tokenizer, where):
    import tokenizers
    self._tok = tokenizer
    self.eot_token = tokenizer.token_to_id(END_OF_TEXT)
    if self.eot_token is None:
      raise VocabularyError(f"gpt2 vocabulary {where}: no {END_OF_TEXT} token")
    self.n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if not t.get("special")]
    self._ordinary = tokenizers.Tokenizer.from_str(json.dumps(spec))

  def encode_ordinary(self, text):
    return self._ordinary.encode(text, add_special_tokens=False).ids

  def decode(self, ids, errors="replace"):
    del errors  # the byte-level decoder replaces broken UTF-8 as tiktoken does
    return self._tok.decode(ids, skip_special_tokens=False)


class GPT2BPEVocabulary(seqio.Vocabulary):
  """GPT-2 byte-level BPE (tiktoken) with every id shifted up by one, so that 0 is
  padding. EOS is <|endoftext|> (tiktoken id 50256 -> 50257 for GPT-2's files).
  There is no UNK: every byte string has an encoding."""

  def __init__(self, location: str):
    super().__init__(extra_ids=0)
    self._location = location
    found = _find_gpt2_files(location)
    if not isinstance(found, tuple):
      self._encoding = _TokenizersBackend(found, location)
      self._tiktoken_size = self._encoding.n_vocab
      return
    ranks, eot_id = found
    if eot_id is None:
      eot_id = len(ranks)
    self._encoding = tiktoken.Encoding(
        name=f"gpt2:{location}", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: eot_id})
    self._tiktoken_size = max(len(ranks), eot_id + 1)

  @property
  def backend(self) -> str:
    """'tiktoken' or 'tokenizers': which library encodes."""
    return "tokenizers" if isinstance(self._encoding, _TokenizersBackend) else "tiktoken"

  @property
  def location(self) -> str:
    return self._location

  @property
  def bos_id(self):
    return None

  @property
  def eos_id(self) -> int:
    return self._encoding.eot_token + 1

  @property
  def unk_id(self):
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self._tiktoken_size + 1

  def _encode(self, s) -> list[int]:
    s = s.decode("utf-8") if isinstance(s, bytes) else s
    # Ordinary encoding: '<|endoftext|>' written in a document is text, not EOS.
    return [i + 1 for i in self._encoding.encode_ordinary(s)]

  def _decode(self, ids) -> str:
    ids = [int(i) - 1 for i in ids]
    ids = [i for i in ids if 0 <= i < self._tiktoken_size and i != self._encoding.eot_token]
    return self._encoding.decode(ids, errors="replace")

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(text):  # a 0-d bytes array from numpy_function
      return np.asarray(self._encode(np.asarray(text).item()), np.int32)
    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def decode_rows(rows):
      rows = np.asarray(rows)
      flat = rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows.reshape(1, 1)
      out = [self._decode(r).encode("utf-8") for r in flat]
      return np.asarray(out, dtype=object).reshape(rows.shape[:-1])
    text = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
    return tf.ensure_shape(text, ids.shape[:-1])

  def __eq__(self, other):
    return isinstance(other, GPT2BPEVocabulary) and other.location == self.location

  def __hash__(self):
    return hash(("gpt2", self._location))


# ---------------------------------------------------------------------------
# Specs.
