"""`c4_gpt3`: C4 English from TFDS with the preprocessing Pax uses for GPT-3.

Pax (paxml/tasks/lm/params/c4.py, 'c4_lm_v301_gpt'): rekey text -> targets,
tokenize, `reduce_concat_tokens` (4096 documents at a time) and
`split_tokens_to_targets_length`, so every example is a full-length slice of the
token stream. One change: each document ends with EOS before concatenation, so the
stream holds documents separated by the end-of-text token, as GPT-3 trained.

Needs the prepared TFDS data: c4/en/3.0.1 under TFDS's data dir (~/tensorflow_datasets,
$TFDS_DATA_DIR, or gin `DataConfig.tfds_data_dir`); registering reads nothing.
"""
from __future__ import annotations

import functools

import seqio
from t5.data import preprocessors as t5_preprocessors

from tasks import preprocessors, registry

NAME = "c4_gpt3"
TFDS_NAME = "c4/en:3.0.1"
SHUFFLE_BUFFER = 10_000


def _add_end_of_text(dataset, output_features):
  return preprocessors.append_end_of_text(dataset, output_features)


def _split_to_full_length(dataset, sequence_length, output_features):
  # add_eos is False on the feature: pieces are full length (EOS is already in the
  # stream, between documents).
  return t5_preprocessors.split_tokens_to_targets_length(
      dataset, sequence_length, output_features)


def register(name: str, vocabulary: seqio.Vocabulary):
  seqio.TaskRegistry.add(
      name,
      source=seqio.TfdsDataSource(
          tfds_name=TFDS_NAME,
          splits={"train": "train", "validation": "validation"}),
      preprocessors=[
          functools.partial(t5_preprocessors.rekey,
                            key_map={"targets": "text"}),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          _add_end_of_text,
          functools.partial(t5_preprocessors.reduce_concat_tokens, batch_size=4096),
          _split_to_full_length,
      ],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
      shuffle_buffer_size=SHUFFLE_BUFFER,
      metric_fns=[])


registry.register_task_factory(NAME, register)
