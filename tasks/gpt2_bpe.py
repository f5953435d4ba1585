"""GPT-2's byte-level BPE as a seqio vocabulary (the 'gpt2:' spec of
tasks/vocabularies.py), through tiktoken, from local files only.

Ids are tiktoken's shifted up by one, so that 0 is padding; EOS is
<|endoftext|>. Read from OpenAI's `encoder.json` + `vocab.bpe`, or from a
`*.tiktoken` rank file.
"""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import seqio
import tensorflow as tf
import tiktoken

from tasks.vocabularies import VocabularyError

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


def _find_gpt2_files(location: str) -> tuple[dict[bytes, int], int | None]:
  if os.path.isfile(location):
    return load_tiktoken_ranks(location), None
  if not os.path.isdir(location):
    raise VocabularyError(f"gpt2 vocabulary: {location} is neither a directory nor a "
                          ".tiktoken file")
  encoder_json = os.path.join(location, "encoder.json")
  vocab_bpe = os.path.join(location, "vocab.bpe")
  if os.path.isfile(encoder_json) and os.path.isfile(vocab_bpe):
    return load_gpt2_ranks(encoder_json, vocab_bpe)
  tiktoken_files = sorted(n for n in os.listdir(location) if n.endswith(".tiktoken"))
  if len(tiktoken_files) == 1:
    return load_tiktoken_ranks(os.path.join(location, tiktoken_files[0])), None
  raise VocabularyError(f"gpt2 vocabulary: {location} holds neither encoder.json + "
                        f"vocab.bpe nor exactly one .tiktoken file")


class GPT2BPEVocabulary(seqio.Vocabulary):
  """GPT-2 byte-level BPE (tiktoken) with every id shifted up by one, so that 0 is
  padding. EOS is <|endoftext|> (tiktoken id 50256 -> 50257 for GPT-2's files).
  There is no UNK: every byte string has an encoding."""

  def __init__(self, location: str):
    super().__init__(extra_ids=0)
    self._location = location
    ranks, eot_id = _find_gpt2_files(location)
    if eot_id is None:
      eot_id = len(ranks)
    self._encoding = tiktoken.Encoding(
        name=f"gpt2:{location}", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: eot_id})
    self._tiktoken_size = max(len(ranks), eot_id + 1)

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
