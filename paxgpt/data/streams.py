"""Packed rows of one row stream, or of a whole split: SeqIO and tf.data.

The global batch is made of `DataConfig.row_streams` independent streams
(paxgpt/data/loader.py puts them together). Stream s of K:

  reads shard s of K of each task (seqio.ShardInfo(s, K): whole files when a task
    has at least K of them, else every K-th example),
  repeats it forever: each epoch reads the shard in its stored order, shuffles it
    with a seed from (seed, epoch, s) and packs within the epoch (GPT-3 style:
    documents end with EOS and are packed whole into full rows), all in one
    tf.data pipeline (a flat_map over epochs),
  mixes its tasks' packed rows (a mixture): global row g of the run (g = batch *
    batch_size + row) comes from task j with probability rate_j / sum(rates), drawn
    from a stateless RNG keyed by (seed, g), so the rates are token proportions
    and the draw of a row depends neither on K nor on who reads it.

A stream's position is (rows read, then (epoch, rows of that epoch read) per
task): `train_rows(..., position)` builds the pipeline there and skips those
rows, replaying at most one epoch of its shard per task. With K = 1 the stream
is the whole split, exactly the single-process stream of paxgpt before the
global stream (seeds and draws reduce to the same formulas).

`eval_rows` is one unshuffled pass over a whole split (a mixture: each task in
turn), packed the same way.

Rows carry the features of seqio's packed decoder-only converter (see loader.py)
plus EPOCH and SOURCE: the epoch and mixture task each row came from.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf

import tasks

FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")
EPOCH = "epoch"  # extra per-row fields inside the pipeline: the epoch a row came from
SOURCE = "source"  # and the index of its task in the mixture (0 for a task)

try:  # the input pipeline runs on the host; keep TF off any accelerator
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
  pass


class DataError(ValueError):
  """A data configuration or saved data state that cannot be used."""


def epoch_seed(seed, epoch, stream=0):
  """A distinct, reproducible shuffle seed per (epoch, stream) (works on tf int64
  tensors); stream 0's is the seed paxgpt used before row streams."""
  return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729 + 1) % 2_147_483_647


def sources(config, split: str) -> list[tuple[seqio.Task, float]]:
  """(task, rate) of the configured task (rate 1) or of each task of the mixture
  that has `split`."""
  if config.tfds_data_dir:
    seqio.set_tfds_data_dir_override(config.tfds_data_dir)
  provider = seqio.get_mixture_or_task(
      tasks.task_name_for(config.mixture_or_task, config.vocabulary))
  if isinstance(provider, seqio.Mixture):
    pairs = [(t, float(provider.get_rate(t))) for t in provider.tasks if split in t.splits]
  else:
    pairs = [(provider, 1.0)] if split in provider.splits else []
  if not pairs:
    raise DataError(f"{config.mixture_or_task!r} has no split {split!r} "
                    f"(it has {list(provider.splits)})")
  return pairs


def start_position(config, split: str) -> tuple[int, ...]:
  """A stream's position before any row: (rows read, then (epoch, row) per task)."""
  return (0,) * (1 + 2 * len(sources(config, split)))


def _zero_padding_inputs(row):
  # seqio feeds bos (here EOS) at padding positions too; padding is all zeros here.
  padding = tf.equal(row["decoder_segment_ids"], 0)
  return {**row, "decoder_input_tokens": tf.where(padding, 0, row["decoder_input_tokens"])}


def _pack(examples: tf.data.Dataset, config, eos_id: int) -> tf.data.Dataset:
  """seqio's decoder-only packing: whole pieces into rows, segment ids, positions;
  a piece's first input token is EOS (bos_id), as in GPT's token stream."""
  converter = seqio.DecoderFeatureConverter(pack=True, bos_id=eos_id)
  rows = converter(examples, {"targets": config.sequence_length})
  return rows.map(_zero_padding_inputs, num_parallel_calls=tf.data.AUTOTUNE)


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def _examples(task: seqio.Task, config, split: str,
              shard_info: seqio.ShardInfo) -> tf.data.Dataset:
  """The task's tokenized pieces in stored order (seqio does no shuffling here)."""
  try:
    return task.get_dataset(sequence_length={"targets": config.sequence_length},
                            split=split, shuffle=False, shard_info=shard_info, num_epochs=1)
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
    if not isinstance(task.source, seqio.TfdsDataSource):
      raise
    where = config.tfds_data_dir or "TFDS's default data dir"
    raise DataError(f"task {task.name!r} reads the TFDS dataset "
                    f"{task.source.tfds_dataset.name!r}, which is not prepared in {where} "
                    f"(prepare it with `tfds build`, or set DataConfig.tfds_data_dir): "
                    f"{e}") from None


def _check_not_empty(examples: tf.data.Dataset, task: seqio.Task, split: str, stream,
                     count: int):
  """An op that fails (InvalidArgumentError, our message) when the shard is empty:
  an empty shard would otherwise loop over empty epochs forever."""
  needs = (f"; it needs at least {count} documents, one per row stream (fewer: set "
           f"DataConfig.row_streams lower)" if count > 1 else "")
  found = examples.take(1).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
  return tf.debugging.assert_positive(
      found, message=f"task {task.name!r} split {split!r} has no examples for a row stream "
                     f"of {count}{needs}")


def _task_rows(config, task: seqio.Task, split: str, stream, stored: tf.data.Dataset,
               start_epoch, start_row, source: int) -> tf.data.Dataset:
  """Endless packed rows of one task's shard `stored` (of row stream `stream`) from
  (start_epoch, start_row). The epoch loop is a flat_map: a new epoch costs no
  construction."""
  eos_id = task.output_features["targets"].vocabulary.eos_id
  with tf.control_dependencies([_check_not_empty(stored, task, split, stream,
                                                 config.num_streams)]):
    start_epoch = tf.identity(start_epoch)

  def epoch_rows(epoch):
    shuffled = stored.shuffle(config.shuffle_buffer,
                              seed=epoch_seed(config.seed, epoch, stream))
    rows = _pack(shuffled, config, eos_id)
    rows = rows.skip(tf.where(tf.equal(epoch, start_epoch), start_row, 0))
    return rows.map(lambda r: {**r, EPOCH: epoch, SOURCE: tf.constant(source, tf.int64)})
  # Built inside the interleave's function, where TF would trace epoch_rows with
  # AutoGraph off; seqio's packing loop needs it on.
  from tensorflow.python.autograph.core import ag_ctx  # pylint: disable=g-direct-tensorflow-import
  with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.UNSPECIFIED):
    return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_rows)


def train_rows(config, split: str, stream_ids, positions) -> tf.data.Dataset:
  """Endless packed rows of the row streams `stream_ids` (a process's streams) in
  batch order: B/K rows of each stream in turn, with the extra fields EPOCH and
  SOURCE. `positions[i]` is stream_ids[i]'s position (see `start_position`).

  One tf.data pipeline for all of them: each stream's shards are elements of a
  dataset that a (parallel, deterministic) interleave turns into rows, so the
  packing graph is traced once whatever the number of streams."""
  pairs = sources(config, split)
  width = 1 + 2 * len(pairs)
  count, per_batch = config.num_streams, config.batch_size // config.num_streams
  elements = None
  for stream, position in zip(stream_ids, positions):
    if len(position) != width:
      raise DataError(f"data position {tuple(position)} does not fit "
                      f"{config.mixture_or_task!r}")
    shards = tuple(_examples(task, config, split, seqio.ShardInfo(int(stream), count))
                   for task, _ in pairs)
    element = tf.data.Dataset.from_tensors(
        (tf.constant(stream, tf.int64), tf.constant(position, tf.int64), shards))
    elements = element if elements is None else elements.concatenate(element)
  rates = np.asarray([rate for _, rate in pairs], np.float64)
  logits = tf.constant(np.log(rates / rates.sum())[None, :], tf.float32)

  def stream_rows(stream, position, shards):
    parts = [_task_rows(config, task, split, stream, shards[i], position[1 + 2 * i],
                        position[2 + 2 * i], i) for i, (task, _) in enumerate(pairs)]
    if len(parts) == 1:
      return parts[0]

    def pick(n):  # the stream's n-th row is global row g of the run
      g = (n // per_batch) * config.batch_size + stream * per_batch + n % per_batch
      seed = tf.stack([tf.constant(config.seed, tf.int64), g])
      return tf.random.stateless_categorical(logits, 1, seed=seed, dtype=tf.int64)[0, 0]
    choices = tf.data.Dataset.range(position[0], 2**62).map(pick)
    return tf.data.Dataset.choose_from_datasets(parts, choices)
  rows = elements.interleave(tf.autograph.experimental.do_not_convert(stream_rows),
                             cycle_length=len(stream_ids), block_length=per_batch,
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _deterministic(rows)


def eval_rows(config, split: str) -> tf.data.Dataset:
  """One unshuffled pass of packed rows over the whole split (a mixture: each task
  in turn)."""
  rows = None
  for task, _ in sources(config, split):
    packed = _pack(_examples(task, config, split, seqio.ShardInfo(0, 1)), config,
                   task.output_features["targets"].vocabulary.eos_id)
    rows = packed if rows is None else rows.concatenate(packed)
  return _deterministic(rows)


def advance(position: tuple[int, ...], epochs: np.ndarray, source_ids: np.ndarray
            ) -> tuple[int, ...]:
  """A stream's position after rows that came from these epochs and tasks."""
  position = list(position)
  position[0] += len(epochs)
  for i in range((len(position) - 1) // 2):
    mine = epochs[source_ids == i]
    if not len(mine):
      continue
    last = int(mine[-1])  # a task's epochs only grow
    epoch, row = position[1 + 2 * i], position[2 + 2 * i]
    position[1 + 2 * i] = last
    position[2 + 2 * i] = (row if last == epoch else 0) + int(np.sum(mine == last))
  return tuple(position)


def read_errors_clearly(iterator, what):
  """TF wraps a Python error raised while reading (e.g. a bad JSONL line) in an
  OpError whose message starts with the original; surface just that."""
  while True:
    try:
      item = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      first_line = re.sub(r"^\{\{[^}]*\}\}\s*", "", e.message.strip().split("\n", 1)[0])
      check = re.search(r"assertion failed: \[(.*?)\s*\]\s*\[Condition", first_line)
      if check:  # one of the pipeline's own checks (an empty row stream): its message
        raise DataError(check.group(1).replace("\\'", "'")) from None
      raise DataError(f"reading {what}: {first_line}") from None
    yield item


def numpy_rows(dataset: tf.data.Dataset, rows: int, what: str, *, drop_remainder: bool):
  """Batches {feature (and EPOCH, SOURCE): numpy [rows, ...]} of a rows dataset,
  prefetched in the background; errors as one line naming `what`."""
  batches = dataset.batch(rows, drop_remainder=drop_remainder).prefetch(2)
  return read_errors_clearly(batches.as_numpy_iterator(), what)
