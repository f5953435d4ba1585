"""Preprocessors shared by the tasks: documents -> EOS-terminated token pieces."""
from __future__ import annotations

import functools
import hashlib
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf
from t5.data import preprocessors as t5_preprocessors


def text_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """{'text': ...} -> {'targets': ...}, other fields dropped."""
  return dataset.map(lambda ex: {"targets": ex["text"]},
                     num_parallel_calls=tf.data.AUTOTUNE)


def append_end_of_text(dataset: tf.data.Dataset,
                       output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Ends every tokenized document with EOS (<|endoftext|> for GPT-2), so packed
  rows hold documents separated by it, as GPT-3 trained."""
  eos_id = output_features["targets"].vocabulary.eos_id

  def append(ex):
    return {**ex, "targets": tf.concat([ex["targets"], [eos_id]], axis=0)}
  return dataset.map(append, num_parallel_calls=tf.data.AUTOTUNE)


def split_to_sequence_length(dataset: tf.data.Dataset,
                             sequence_length: Optional[Mapping[str, int]] = None
                             ) -> tf.data.Dataset:
  """Cuts documents longer than the sequence into full-length pieces plus a shorter
  last piece, so that nothing is truncated later (without a sequence length, a
  no-op)."""
  if not sequence_length or sequence_length.get("targets") is None:
    return dataset
  return t5_preprocessors.split_tokens(
      dataset, max_tokens_per_segment=sequence_length["targets"], feature_key="targets")


def document_preprocessors() -> list:
  """text -> tokens -> + EOS -> pieces of at most the sequence length."""
  return [
      text_to_targets,
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      append_end_of_text,
      split_to_sequence_length,
  ]


def text_hash(text: str) -> int:
  """A stable (run-, machine- and Python-independent) 64-bit hash of a document."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_validation_document(text: str, validation_fraction: float) -> bool:
  """Per-document split for streamed corpora: a document is in validation iff its
  hash falls in the lowest `validation_fraction` of the hash range."""
  return text_hash(text) < validation_fraction * 2.0**64


def split_documents(documents: Sequence[str], validation_fraction: float
                    ) -> dict[str, list[str]]:
  """Exact split for a corpus held in memory: the `validation_fraction` of documents
  (rounded, at least one) with the smallest hashes are validation; order is kept."""
  unique = list(dict.fromkeys(documents))  # identical texts kept once
  n_validation = max(1, round(validation_fraction * len(unique)))
  by_hash = sorted(unique, key=text_hash)
  validation = set(by_hash[:n_validation])
  return {"train": [d for d in unique if d not in validation],
          "validation": [d for d in unique if d in validation]}
