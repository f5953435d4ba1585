"""SeqIO task or mixture -> global `jax.Array` batches, with a resumable position.

The trainer's whole API:

  config = DataConfig(mixture_or_task="pydoc_topics", vocabulary="byte",
                      sequence_length=2048, batch_size=8, seed=0)   # gin-configurable
  vocab = get_vocabulary(config)          # seqio.Vocabulary: vocab.vocab_size, .eos_id,
                                          # .encode(str), .decode(ids)
  check_model_vocab_size(config, model_config.vocab_size)   # DataError if too small
  train = TrainIterator(config, partitioner)
  batch = next(train)                     # {name: jax.Array [batch_size, sequence_length]
                                          #  int32}, sharded partitioner.sharding(("batch",
                                          #  "length"))
  saved = train.state()                   # small JSON-able dict: save it with the checkpoint
  train.restore(saved)                    # the next batch is the one that followed `saved`
  for batch in eval_batches(config, partitioner):   # one pass over the validation split
    ...

Batch keys (seqio's packed decoder-only features, GPT-3 style packing: documents end
with EOS and are packed into full rows; segment ids keep them apart):

  decoder_target_tokens  the tokens to predict (0 = padding)
  decoder_input_tokens   targets shifted right within each document; a document
                         starts from EOS, as in GPT's token stream
  decoder_loss_weights   1 on real tokens, 0 on padding (and on eval padding rows)
  decoder_segment_ids    1, 2, ... per document in the row, 0 on padding
  decoder_positions      0, 1, ... within each document

Each process reads its own shard (seqio.ShardInfo(process_index, process_count)) and
contributes batch_size // process_count rows. Training repeats the train split
forever: each epoch reads a task in its stored order, shuffles it with a seed from
(seed, epoch) and packs within the epoch, all in one tf.data pipeline (a flat_map
over epochs). A mixture mixes its tasks' packed rows, row i drawn from task j with
probability rate_j / sum(rates) by a stateless RNG keyed by (seed, i). The position
per process is (rows read, then (epoch, rows of that epoch read) per task): restore
builds the pipeline there and skips those rows, so resuming replays at most one
epoch of preprocessing per task and then yields exactly the batches of the
uninterrupted run. `state()` gathers all processes' positions (a collective: call it
on every process, as the checkpoint save is).

Errors: an unknown task name raises tasks.UnknownTaskError; bad files (a JSONL line
that is not JSON, ...) raise DataError naming the file and line; a saved state from
other data settings raises DataError naming the differences.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Mapping, Optional

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

import tasks
from paxgpt.config.checks import check_types
from paxgpt.model.sharding import Partitioner, process_rows

FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")
STATE_FORMAT = 1

try:  # the input pipeline runs on the host; keep TF off any accelerator
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
  pass


class DataError(ValueError):
  """A data configuration or saved data state that cannot be used."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the trainer reads.

  mixture_or_task: a name registered by `tasks` ('pydoc_topics', 'c4_gpt3',
    'c4_pydoc_mix', or one from `tasks.text_files_task`).
  vocabulary: a spec: 'byte', 'spm:/path/model.model', 'gpt2:/dir'.
  sequence_length: tokens per row.
  batch_size: rows per step over all processes.
  seed: shuffling (and mixing) seed; the same seed gives the same batches.
  shuffle_buffer: examples in the shuffle buffer (per process).
  eval_max_batches: cap on evaluation batches (None: the whole validation split).
  tfds_data_dir: where TFDS tasks (c4_gpt3) find their data (None: TFDS's default,
    ~/tensorflow_datasets or $TFDS_DATA_DIR).
  """
  mixture_or_task: str = "pydoc_topics"
  vocabulary: str = "byte"
  sequence_length: int = 2048
  batch_size: int = 8
  seed: int = 0
  shuffle_buffer: int = 10_000
  train_split: str = "train"
  eval_split: str = "validation"
  eval_max_batches: Optional[int] = None
  tfds_data_dir: Optional[str] = None

  def __post_init__(self):
    check_types(self)
    for field in ("sequence_length", "batch_size", "shuffle_buffer"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise DataError(f"DataConfig.{field}={value!r} must be a positive integer")
    if self.eval_max_batches is not None and self.eval_max_batches < 1:
      raise DataError(f"DataConfig.eval_max_batches={self.eval_max_batches} must be >= 1")


def get_vocabulary(config: DataConfig) -> seqio.Vocabulary:
  """The vocabulary of the configured spec (the model checks vocab_size against it)."""
  return tasks.get_vocabulary(config.vocabulary)


def vocab_size(config: DataConfig) -> int:
  """Ids the data can contain (padding included): the model needs at least this many."""
  return get_vocabulary(config).vocab_size


def check_model_vocab_size(config: DataConfig, model_vocab_size: int) -> None:
  """Raise DataError unless a model with `model_vocab_size` ids can embed the data."""
  needed = vocab_size(config)
  if model_vocab_size < needed:
    raise DataError(f"vocabulary {config.vocabulary!r} has {needed} ids but the model's "
                    f"vocab_size is {model_vocab_size}")


EPOCH = "epoch"  # extra per-row fields inside the pipeline: the epoch a row came from
SOURCE = "source"  # and the index of its task in the mixture (0 for a task)


def epoch_seed(seed, epoch):
  """A distinct, reproducible shuffle seed per epoch (works on tf int64 tensors)."""
  return (seed * 1_000_003 + epoch * 7_919 + 1) % 2_147_483_647


def sources(config: DataConfig, split: str) -> list[tuple[seqio.Task, float]]:
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


def start_position(config: DataConfig, split: str) -> tuple[int, ...]:
  """The position before any row: (rows read, then (epoch, row) per task)."""
  return (0,) * (1 + 2 * len(sources(config, split)))


def _zero_padding_inputs(row):
  # seqio feeds bos (here EOS) at padding positions too; padding is all zeros here.
  padding = tf.equal(row["decoder_segment_ids"], 0)
  return {**row, "decoder_input_tokens": tf.where(padding, 0, row["decoder_input_tokens"])}


def _pack(examples: tf.data.Dataset, config: DataConfig, eos_id: int) -> tf.data.Dataset:
  """seqio's decoder-only packing: whole pieces into rows, segment ids, positions;
  a piece's first input token is EOS (bos_id), as in GPT's token stream."""
  converter = seqio.DecoderFeatureConverter(pack=True, bos_id=eos_id)
  rows = converter(examples, {"targets": config.sequence_length})
  return rows.map(_zero_padding_inputs, num_parallel_calls=tf.data.AUTOTUNE)


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def _examples(task: seqio.Task, config: DataConfig, split: str,
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


def _task_rows(config: DataConfig, task: seqio.Task, split: str, shard_info: seqio.ShardInfo,
               start_epoch: int, start_row: int, source: int) -> tf.data.Dataset:
  """Endless packed rows of one task's shard from (start_epoch, start_row).

  Each epoch reads the task in its stored order, shuffles with the seed of (seed,
  epoch) and packs within the epoch. Built once: the epoch loop is a flat_map, so a
  new epoch costs no pipeline construction."""
  eos_id = task.output_features["targets"].vocabulary.eos_id
  stored = _examples(task, config, split, shard_info)
  first = _read_errors_clearly(iter(stored.take(1)), f"task {task.name!r} split {split!r}")
  if next(first, None) is None:
    raise DataError(f"task {task.name!r} split {split!r} shard "
                    f"{shard_info.index}/{shard_info.num_shards} has no examples")

  def epoch_rows(epoch):
    shuffled = stored.shuffle(config.shuffle_buffer, seed=epoch_seed(config.seed, epoch))
    rows = _pack(shuffled, config, eos_id)
    rows = rows.skip(tf.where(tf.equal(epoch, start_epoch), tf.cast(start_row, tf.int64), 0))
    return rows.map(lambda r: {**r, EPOCH: epoch, SOURCE: tf.constant(source, tf.int64)})
  return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_rows)


def train_rows(config: DataConfig, split: str, shard_info: seqio.ShardInfo,
               position: Optional[tuple[int, ...]] = None) -> tf.data.Dataset:
  """Endless packed rows of one shard from `position` (see `start_position`), with
  the extra fields EPOCH and SOURCE.

  A mixture mixes its tasks' rows: row i comes from task j with probability
  rate_j / sum(rates), drawn from a stateless RNG keyed by (seed, i), so the rates
  are token proportions (rows are full) and a restore needs no replay."""
  pairs = sources(config, split)
  position = tuple(start_position(config, split) if position is None else position)
  if len(position) != 1 + 2 * len(pairs):
    raise DataError(f"data position {position} does not fit {config.mixture_or_task!r}")
  streams = [_task_rows(config, task, split, shard_info, position[1 + 2 * i],
                        position[2 + 2 * i], i) for i, (task, _) in enumerate(pairs)]
  if len(streams) == 1:
    return _deterministic(streams[0])
  rates = np.asarray([rate for _, rate in pairs], np.float64)
  logits = tf.constant(np.log(rates / rates.sum())[None, :], tf.float32)

  def pick(index):
    seed = tf.stack([tf.constant(config.seed, tf.int64), index])
    return tf.random.stateless_categorical(logits, 1, seed=seed, dtype=tf.int64)[0, 0]
  choices = tf.data.Dataset.range(position[0], 2**62).map(pick)
  return _deterministic(tf.data.Dataset.choose_from_datasets(streams, choices))


def eval_rows(config: DataConfig, split: str, shard_info: seqio.ShardInfo) -> tf.data.Dataset:
  """One unshuffled pass of packed rows of one shard (a mixture: each task in turn)."""
  rows = None
  for task, _ in sources(config, split):
    packed = _pack(_examples(task, config, split, shard_info), config,
                   task.output_features["targets"].vocabulary.eos_id)
    rows = packed if rows is None else rows.concatenate(packed)
  return _deterministic(rows)


def advance(position: tuple[int, ...], epochs: np.ndarray, source_ids: np.ndarray
            ) -> tuple[int, ...]:
  """The position after a batch whose rows came from these epochs and tasks."""
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


def _read_errors_clearly(iterator, what):
  """TF wraps a Python error raised while reading (e.g. a bad JSONL line) in an
  OpError whose message starts with the original; surface just that."""
  while True:
    try:
      item = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      first_line = re.sub(r"^\{\{[^}]*\}\}\s*", "", e.message.strip().split("\n", 1)[0])
      raise DataError(f"reading {what}: {first_line}") from None
    yield item


class HostBatches:
  """This process's numpy batches {feature: [rows, sequence_length] int32} of one
  split and shard.

  repeat=True: endless epochs, reshuffled per epoch (training); `position` is
  (rows read, then (epoch, rows of that epoch read) per task) and `seek(position)`
  continues from there. repeat=False: one unshuffled pass, the last batch padded with
  all-zero rows (evaluation).
  """

  def __init__(self, config: DataConfig, split: str, shard_info: seqio.ShardInfo,
               rows: int, *, repeat: bool):
    self.config = config
    self.split = split
    self.shard_info = shard_info
    self.rows = rows
    self.repeat = repeat
    self._what = f"{config.mixture_or_task!r} split {split!r}"
    self.seek(start_position(config, split))  # checks the name and split now

  @property
  def position(self) -> tuple[int, ...]:
    return self._position

  def seek(self, position) -> None:
    """Continue from `position`; the pipeline is built at the next batch."""
    position = tuple(int(p) for p in position)
    if any(p < 0 for p in position):
      raise DataError(f"data position {position} is negative")
    if len(position) != len(start_position(self.config, self.split)):
      raise DataError(f"data position {position} does not fit "
                      f"{self.config.mixture_or_task!r}")
    if not self.repeat and any(position):
      raise DataError("a single pass starts at its beginning")
    self._position = position
    self._batches = None

  def _build(self):
    if self.repeat:
      rows = train_rows(self.config, self.split, self.shard_info, self._position)
      batches = rows.batch(self.rows, drop_remainder=True)
    else:
      batches = eval_rows(self.config, self.split, self.shard_info).batch(self.rows)
    return _read_errors_clearly(batches.prefetch(2).as_numpy_iterator(), self._what)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batches is None:
      self._batches = self._build()
    batch = next(self._batches)
    if self.repeat:
      self._position = advance(self._position, batch[EPOCH], batch[SOURCE])
    batch = {f: batch[f].astype(np.int32) for f in FEATURES}
    missing = self.rows - len(batch["decoder_target_tokens"])
    if missing:  # only at the end of a single pass: pad to the static shape
      batch = {f: np.pad(v, ((0, missing), (0, 0))) for f, v in batch.items()}
    return batch


def _this_process(config: DataConfig, partitioner: Partitioner) -> seqio.ShardInfo:
  """This process's data shard: its block of the batch's rows (processes that hold
  the same rows, a pipeline stage axis across processes, read the same shard)."""
  partitioner.check_divisible("DataConfig.batch_size", config.batch_size, "batch")
  index, count = process_rows(partitioner.mesh, config.batch_size)
  return seqio.ShardInfo(index=index, num_shards=count)


def whole_split() -> seqio.ShardInfo:
  """The shard that is the whole split (one reader)."""
  return seqio.ShardInfo(index=0, num_shards=1)


def _rows_per_process(config: DataConfig, partitioner: Partitioner) -> int:
  processes = jax.process_count()
  if config.batch_size % processes:
    raise DataError(f"DataConfig.batch_size={config.batch_size} is not divisible by the "
                    f"{processes} processes")
  return config.batch_size // _this_process(config, partitioner).num_shards


def _to_global(batch: Mapping[str, np.ndarray], sharding, global_shape):
  return {k: jax.make_array_from_process_local_data(sharding, v, global_shape)
          for k, v in batch.items()}


class TrainIterator:
  """Endless global training batches; see the module docstring."""

  def __init__(self, config: DataConfig, partitioner: Partitioner):
    self.config = config
    self.sharding = partitioner.sharding(("batch", "length"))
    self._shape = (config.batch_size, config.sequence_length)
    self._host = HostBatches(config, config.train_split, _this_process(config, partitioner),
                             _rows_per_process(config, partitioner), repeat=True)
    self._step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = next(self._host)
    self._step += 1
    return _to_global(batch, self.sharding, self._shape)

  def _identity(self) -> dict:
    c = self.config
    return {"mixture_or_task": c.mixture_or_task, "vocabulary": c.vocabulary,
            "sequence_length": c.sequence_length, "batch_size": c.batch_size,
            "seed": c.seed, "shuffle_buffer": c.shuffle_buffer, "split": c.train_split,
            "process_count": jax.process_count()}

  def state(self) -> dict:
    """JSON-able: what was read so far. A collective when there are several processes."""
    position = np.asarray(self._host.position, np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      positions = np.asarray(multihost_utils.process_allgather(position))
    else:
      positions = position[None]
    return {"format": STATE_FORMAT, "batches": self._step,
            "positions": positions.tolist(), **self._identity()}

  def restore(self, state: Mapping) -> None:
    """Continue after the position in `state` (from `state()` of a run with the same
    data settings and process count)."""
    if state.get("format") != STATE_FORMAT:
      raise DataError(f"data state format {state.get('format')!r} is not {STATE_FORMAT}")
    expected = self._identity()
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if changed:
      details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
      raise DataError(f"the saved data position is for other data settings ({details}); "
                      f"resume with the same settings or start the data from scratch")
    self._host.seek(state["positions"][jax.process_index()])
    self._step = int(state["batches"])


def eval_batches(config: DataConfig, partitioner: Partitioner) -> Iterator[dict]:
  """One pass over `config.eval_split` (at most `eval_max_batches`): global batches of
  the same shape as training; padding rows have zero loss weights. Every process
  yields the same number of batches (several processes: counted first)."""
  sharding = partitioner.sharding(("batch", "length"))
  shape = (config.batch_size, config.sequence_length)
  rows = _rows_per_process(config, partitioner)
  host = HostBatches(config, config.eval_split, _this_process(config, partitioner), rows,
                     repeat=False)
  limit = config.eval_max_batches
  if jax.process_count() > 1:
    # Shards differ in length; all processes must take part in every global batch.
    from jax.experimental import multihost_utils
    counter = HostBatches(config, config.eval_split, _this_process(config, partitioner), rows,
                          repeat=False)
    mine = sum(1 for _ in counter) if limit is None else limit
    limit = int(np.max(multihost_utils.process_allgather(np.int64(mine))))
  count = 0
  for batch in host:
    if limit is not None and count >= limit:
      return
    yield _to_global(batch, sharding, shape)
    count += 1
  zeros = {f: np.zeros((rows, config.sequence_length), np.int32) for f in FEATURES}
  while limit is not None and count < limit and jax.process_count() > 1:
    yield _to_global(zeros, sharding, shape)
    count += 1
