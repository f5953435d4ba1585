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

import functools
import hashlib
import os

import seqio
import tensorflow as tf

from tasks.errors import VocabularyError


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
  from tasks.gpt2_bpe import GPT2BPEVocabulary  # tiktoken is loaded only when used
  return GPT2BPEVocabulary(location)


def spec_tag(spec: str) -> str:
  """A short name-safe tag for a spec, used in the names of per-vocabulary tasks."""
  kind, location = parse_spec(spec)
  if kind == "byte":
    return "byte"
  digest = hashlib.sha256(os.path.abspath(location).encode()).hexdigest()[:10]
  return f"{kind}_{digest}"
