"""Users' own text as a task: globs of .txt or .jsonl files.

In gin (the evaluated reference registers the task and returns its name):

  DataConfig.mixture_or_task = @tasks.text_files_task()
  tasks.text_files_task.name = 'my_corpus'
  tasks.text_files_task.train_files = ['/data/books/*.txt']
  tasks.text_files_task.validation_files = None   # None: 10% of documents by hash
  tasks.text_files_task.documents = 'file'         # .txt: 'file' or 'blank_line'

`.txt`: one document per file, or per block between blank lines. `.jsonl`: one
document per line, the string field `text_field` ('text'). Documents are
tokenized, end with EOS, and long ones are cut into full-length pieces.
"""
from __future__ import annotations

import json
from typing import Iterator, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from tasks import preprocessors, registry

SHUFFLE_BUFFER = 10_000
_GLOB_CHARS = set("*?[")


class TextFilesError(ValueError):
  """A text file, glob or JSONL line that cannot be read as documents."""


def resolve_files(patterns: str | Sequence[str], what: str) -> list[str]:
  """Sorted files matching the globs; a missing path or empty glob is an error."""
  if isinstance(patterns, str):
    patterns = [patterns]
  if not patterns:
    raise TextFilesError(f"{what}: no file patterns given")
  files = []
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      if _GLOB_CHARS & set(pattern):
        raise TextFilesError(f"{what}: the glob {pattern!r} matches no files")
      raise TextFilesError(f"{what}: no such file: {pattern}")
    for path in matched:
      if not (path.endswith(".txt") or path.endswith(".jsonl")):
        raise TextFilesError(f"{what}: {path}: expected a .txt or .jsonl file")
      if tf.io.gfile.isdir(path):
        raise TextFilesError(f"{what}: {path} is a directory")
    files.extend(matched)
  return list(dict.fromkeys(files))


def _read_text(path: str) -> str:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except tf.errors.NotFoundError:
    raise TextFilesError(f"no such file: {path}") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise TextFilesError(f"{path} line {line}: not UTF-8 ({e.reason})") from None


def documents_in_file(path: str, documents: str = "file",
                      text_field: str = "text") -> Iterator[str]:
  """The documents of one file, in order; empty documents are skipped."""
  text = _read_text(path)
  if path.endswith(".jsonl"):
    for line_number, line in enumerate(text.split("\n"), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise TextFilesError(f"{path} line {line_number}: not JSON ({e.msg})") from None
      if not isinstance(record, dict) or text_field not in record:
        raise TextFilesError(f"{path} line {line_number}: no {text_field!r} field")
      if not isinstance(record[text_field], str):
        raise TextFilesError(f"{path} line {line_number}: {text_field!r} is "
                             f"{type(record[text_field]).__name__}, not a string")
      if record[text_field]:
        yield record[text_field]
  elif documents == "file":
    if text.strip():
      yield text
  else:
    block = []
    for line in text.split("\n"):
      if line.strip():
        block.append(line)
      elif block:
        yield "\n".join(block)
        block = []
    if block:
      yield "\n".join(block)


class TextFilesSource(seqio.DataSource):
  """Documents from files; with no validation files, split 90/10 by document hash.
  Shards by file when there are enough files, else by document index (every reader
  reads every file and keeps its share)."""

  def __init__(self, train_files: Sequence[str], validation_files: Sequence[str] | None,
               documents: str, text_field: str, validation_fraction: float):
    super().__init__(splits=("train", "validation"))
    self._files = {"train": list(train_files),
                   "validation": list(validation_files or train_files)}
    self._hash_split = validation_files is None
    self._documents = documents
    self._text_field = text_field
    self._validation_fraction = validation_fraction

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return self._files[split]

  def documents(self, split: str, file_order_seed: int | None = None,
                shard_index: int = 0, num_shards: int = 1) -> Iterator[str]:
    """The split's documents; a shard is every num_shards-th file when there are
    that many files (reading only its own), else every num_shards-th document."""
    files = list(self._files[split])
    if file_order_seed is not None:
      files = [files[i] for i in np.random.default_rng(file_order_seed).permutation(len(files))]
    if len(files) >= num_shards > 1:
      files, shard_index, num_shards = files[shard_index::num_shards], 0, 1
    index = 0
    for path in files:
      for doc in documents_in_file(path, self._documents, self._text_field):
        if self._hash_split and (preprocessors.is_validation_document(
            doc, self._validation_fraction) != (split == "validation")):
          continue
        if index % num_shards == shard_index:
          yield doc
        index += 1

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed=None,
                  shard_info: seqio.ShardInfo | None = None) -> tf.data.Dataset:
    if split not in self._files:
      raise TextFilesError(f"no split {split!r}; text files have 'train' and 'validation'")
    shard = shard_info or seqio.ShardInfo(0, 1)
    # Files in a seeded order when shuffling (the Task's buffer then shuffles
    # documents); None keeps the sorted order.
    order_seed = int(seed) if shuffle and seed is not None else None
    if shuffle and seed is None:
      order_seed = int(np.random.default_rng().integers(2**31))

    def generate():
      for doc in self.documents(split, order_seed, shard.index, shard.num_shards):
        yield {"text": doc}
    return tf.data.Dataset.from_generator(
        generate, output_signature={"text": tf.TensorSpec([], tf.string)})


@gin.configurable(module="tasks")
def text_files_task(name: str = gin.REQUIRED, train_files=gin.REQUIRED,
                    validation_files=None, documents: str = "file",
                    text_field: str = "text", validation_fraction: float = 0.1) -> str:
  """Registers a task over text files (see the module docstring); returns `name`.
  Globs are resolved now, so a missing file or empty glob fails at once."""
  if documents not in ("file", "blank_line"):
    raise TextFilesError(f"text_files_task {name!r}: documents={documents!r}, "
                         f"expected 'file' or 'blank_line'")
  if not 0 < validation_fraction < 1:
    raise TextFilesError(f"text_files_task {name!r}: validation_fraction="
                         f"{validation_fraction} must be in (0, 1)")
  train = resolve_files(train_files, f"text_files_task {name!r} train_files")
  validation = (None if validation_files is None else
                resolve_files(validation_files, f"text_files_task {name!r} validation_files"))
  source = TextFilesSource(train, validation, documents, text_field, validation_fraction)

  def register(task_name: str, vocabulary: seqio.Vocabulary):
    seqio.TaskRegistry.add(
        task_name, source=source,
        preprocessors=preprocessors.document_preprocessors(),
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
        shuffle_buffer_size=SHUFFLE_BUFFER, metric_fns=[])
  return registry.register_task_factory(name, register)
