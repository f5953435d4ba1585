"""Vocabularies, chosen by a short spec string.

Specs (the value of `DataConfig.vocabulary` in gin):

  'byte'             seqio.ByteVocabulary: UTF-8 bytes + 3 (0 pad, 1 EOS, 2 UNK); the
                     bundled demo's default, needs no files.
  'spm:/path/m.model' a SentencePiece model (0 pad, 1 EOS, 2 UNK), e.g. one trained by
                     `train_sentencepiece` (BPE with byte fallback).
  'gpt2:/dir'        GPT-2 byte-level BPE through tiktoken from local files: either
                     `encoder.json` + `vocab.bpe` in /dir, or a `*.tiktoken` file (the
                     path itself or the one such file in /dir). Never downloads.

Every vocabulary keeps id 0 for padding, so `vocab_size` counts it; the model's
embedding must have at least `vocab_size` rows.
"""
from __future__ import annotations

import base64
import collections
import functools
import hashlib
import json
import os
import sys
from typing import Iterable

import numpy as np
import seqio
import tensorflow as tf
import tiktoken

END_OF_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer (tiktoken's r50k pattern): contractions, letters, digits,
# other symbols, whitespace.
GPT2_SPLIT_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")


class VocabularyError(ValueError):
  """A vocabulary spec or file that cannot be used."""


# ---------------------------------------------------------------------------
# GPT-2 BPE through tiktoken.


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


def parse_spec(spec: str) -> tuple[str, str]:
  """'spm:/a/b.model' -> ('spm', '/a/b.model'); 'byte' -> ('byte', '')."""
  kind, _, location = spec.partition(":")
  if kind == "byte" and not location:
    return kind, ""
  if kind in ("spm", "gpt2") and location:
    return kind, location
  raise VocabularyError(f"vocabulary spec {spec!r}: expected 'byte', "
                        f"'spm:/path/to/model' or 'gpt2:/dir/or/file.tiktoken'")


@functools.lru_cache(maxsize=None)
def get_vocabulary(spec: str) -> seqio.Vocabulary:
  """The vocabulary for a spec (cached: one object per spec, so tasks compare equal)."""
  kind, location = parse_spec(spec)
  if kind == "byte":
    return seqio.ByteVocabulary()
  if kind == "spm":
    if not tf.io.gfile.exists(location):
      raise VocabularyError(f"vocabulary spec {spec!r}: no SentencePiece model at {location}")
    vocab = seqio.SentencePieceVocabulary(location)
    try:
      ids = (vocab.tokenizer.pad_id(), vocab.eos_id, vocab.unk_id)
    except Exception as e:  # sentencepiece's parse errors name no file
      raise VocabularyError(f"{location}: not a SentencePiece model ({e})") from None
    if ids != (0, 1, 2):
      raise VocabularyError(f"{location}: pad/eos/unk ids are {ids}, seqio needs (0, 1, 2); "
                            f"train it with `train_sentencepiece`")
    return vocab
  if not os.path.exists(location):
    raise VocabularyError(f"vocabulary spec {spec!r}: {location} does not exist")
  return GPT2BPEVocabulary(location)


def spec_tag(spec: str) -> str:
  """A short name-safe tag for a spec, used in the names of per-vocabulary tasks."""
  kind, location = parse_spec(spec)
  if kind == "byte":
    return "byte"
  digest = hashlib.sha256(os.path.abspath(location).encode()).hexdigest()[:10]
  return f"{kind}_{digest}"


# ---------------------------------------------------------------------------
# Training a SentencePiece model on a task's text.


def _training_lines(texts: Iterable[str], max_line_bytes: int) -> Iterable[str]:
  """SentencePiece trains on sentences; documents become their non-empty lines, long
  lines cut into pieces it accepts (it drops sentences over its length limit)."""
  for text in texts:
    for line in text.split("\n"):
      while line:
        piece = line[:max_line_bytes // 4]  # <= 4 UTF-8 bytes per character
        line = line[len(piece):]
        if piece.strip():
          yield piece


def _character_coverage(lines: list[str], size: int) -> float:
  """1.0 when every character fits in half the non-reserved ids; otherwise the
  coverage (SentencePiece allows 0.98 to 1) that keeps the most frequent characters
  within that budget, the rest falling back to bytes, so small vocabularies keep
  room for merges."""
  counts = collections.Counter(c for line in lines for c in line)
  budget = max(1, (size - _SPM_RESERVED_IDS) // 2)
  if len(counts) <= budget:
    return 1.0
  frequencies = sorted(counts.values(), reverse=True)
  total = sum(frequencies)
  lowest = 0.98
  needed, covered = 0, 0
  while covered / total < lowest:  # SentencePiece's rule: add chars until covered
    covered += frequencies[needed]
    needed += 1
  if _SPM_RESERVED_IDS + needed >= size:
    raise VocabularyError(f"SentencePiece size {size} is too small for this text: 98% "
                          f"of it needs {needed} characters besides the "
                          f"{_SPM_RESERVED_IDS} reserved ids; ask for at least "
                          f"{_SPM_RESERVED_IDS + 2 * needed}")
  kept = sum(frequencies[:budget - 1])
  # Halfway into the budget-th character's share keeps exactly `budget` characters.
  return max(lowest, (kept + frequencies[budget - 1] / 2) / total)


_SPM_RESERVED_IDS = 3 + 256  # pad, EOS, UNK and the 256 byte-fallback pieces


def train_sentencepiece_on_texts(texts: Iterable[str], size: int, model_path: str) -> str:
  """Trains a BPE SentencePiece model with byte fallback (0 pad, 1 EOS, 2 UNK, no BOS)
  on `texts`, writes `model_path` and returns it. Identity normalization and kept
  whitespace make decode(encode(text)) == text for any text."""
  import sentencepiece as spm
  if size < _SPM_RESERVED_IDS + 16:
    raise VocabularyError(f"SentencePiece size {size}: byte fallback takes "
                          f"{_SPM_RESERVED_IDS} ids; ask for at least "
                          f"{_SPM_RESERVED_IDS + 16}")
  max_line_bytes = 4192
  lines = list(_training_lines(texts, max_line_bytes))
  if not lines:
    raise VocabularyError("no text to train a SentencePiece model on")
  prefix = model_path[:-len(".model")] if model_path.endswith(".model") else model_path
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_prefix=prefix, vocab_size=size, model_type="bpe", byte_fallback=True,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
      max_sentence_length=max_line_bytes,
      character_coverage=_character_coverage(lines, size),
      hard_vocab_limit=True, num_threads=2, minloglevel=2)
  return prefix + ".model"


def train_sentencepiece(task_name: str, size: int, output_dir: str,
                        max_documents: int = 100_000) -> str:
  """Trains a SentencePiece BPE model on the train split of a registered task (its
  raw text, at most `max_documents` documents) and returns the model path
  `output_dir/{task_name}_bpe{size}.model`; use it as the spec 'spm:PATH'."""
  texts = task_train_texts(task_name, max_documents)
  path = os.path.join(output_dir, f"{task_name}_bpe{size}.model")
  return train_sentencepiece_on_texts(texts, size, path)


def vocab_command(args) -> int:
  """`paxgpt vocab --task=NAME --size=N --output=DIR` (wired in paxgpt/main.py):
  trains the model, prints its path and the spec that selects it. A bad task name,
  size or text is one line on stderr and exit code 2, like the CLI's other errors."""
  from tasks import registry  # here, not at the top: registry imports this module
  try:
    path = train_sentencepiece(args.task, args.size, args.output)
  except (VocabularyError, registry.UnknownTaskError, ValueError) as e:
    print(f"paxgpt: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(path)
  print(f"use it with: DataConfig.vocabulary = 'spm:{path}'")
  return 0


def task_train_texts(task_name: str, max_documents: int | None = None) -> Iterable[str]:
  """The raw text of a task's train split (the source's 'text' field, in order)."""
  from tasks import registry  # here, not at the top: registry imports this module
  task = registry.get_task(task_name)
  dataset = task.source.get_dataset(split="train", shuffle=False)
  if max_documents is not None:
    dataset = dataset.take(max_documents)
  for example in dataset.as_numpy_iterator():
    if "text" not in example:
      raise VocabularyError(f"task {task_name!r}: its source has no 'text' field "
                            f"(fields: {sorted(example)})")
    yield example["text"].decode("utf-8")
