"""`pydoc_topics`: the bundled offline corpus.

The English reference topics that ship with CPython (`pydoc_data.topics`, the
text behind `help('if')`, ...): one document per topic, identical texts kept once,
about 460 KB. 90/10 train/validation by document (the 10% with the smallest
SHA-256 of their text), so the split is the same on every machine.
"""
from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from tasks import preprocessors, registry

NAME = "pydoc_topics"
VALIDATION_FRACTION = 0.1
SHUFFLE_BUFFER = 10_000


@functools.lru_cache(maxsize=None)
def documents() -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]}: the topic texts in topic-name order."""
  from pydoc_data import topics
  texts = [topics.topics[name] for name in sorted(topics.topics)]
  return preprocessors.split_documents(texts, VALIDATION_FRACTION)


def _dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
  del shuffle_files, seed  # one in-memory "file"; the Task shuffles examples
  return tf.data.Dataset.from_tensor_slices({"text": documents()[split]})


def register(name: str, vocabulary: seqio.Vocabulary):
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(_dataset_fn, splits=("train", "validation")),
      preprocessors=preprocessors.document_preprocessors(),
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
      shuffle_buffer_size=SHUFFLE_BUFFER,
      metric_fns=[])


registry.register_task_factory(NAME, register)
