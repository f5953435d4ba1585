"""Training a SentencePiece vocabulary (BPE with byte fallback) on the train
split of a registered task: what `paxgpt vocab` runs. The result is used with
the spec 'spm:PATH' (tasks/vocabularies.py)."""
from __future__ import annotations

import collections
import os
from typing import Iterable

from tasks import registry
from tasks.errors import VocabularyError


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



def task_train_texts(task_name: str, max_documents: int | None = None) -> Iterable[str]:
  """The raw text of a task's train split (the source's 'text' field, in order)."""
  task = registry.get_task(task_name)
  dataset = task.source.get_dataset(split="train", shuffle=False)
  if max_documents is not None:
    dataset = dataset.take(max_documents)
  for example in dataset.as_numpy_iterator():
    if "text" not in example:
      raise VocabularyError(f"task {task_name!r}: its source has no 'text' field "
                            f"(fields: {sorted(example)})")
    yield example["text"].decode("utf-8")
