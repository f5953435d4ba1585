"""SeqIO task or mixture -> global `jax.Array` batches: one stream whatever the
number of processes, with a global, resumable position.

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
  train.restore(saved)                    # the next batch is the one that followed `saved`,
                                          # on any process count, device count and mesh
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

The global stream. Global batch i is the same rows in the same order on any number
of processes and devices: it is made of K = DataConfig.row_streams independent row
streams (paxgpt/data/streams.py; by default the largest divisor of B up to 64),
stream s filling rows [s * B/K, (s + 1) * B/K) of every batch. A process runs only
the streams of the rows its devices hold (`addressable_devices_indices_map` of the batch
sharding) and the global jax.Array is made from those rows
(`jax.make_array_from_callback`), all of them in one tf.data pipeline. With K >=
the process count each process packs just its own B/P rows; with fewer streams a
process packs whole streams and keeps its rows (K = 1: every process runs the
whole stream). The position is global: each
stream's (rows read, then (epoch, rows of that epoch read) per task), so a run
restores it on any process count, device count or mesh, and each process seeks only
its streams.

Validation is one unshuffled pass over the whole split that every process reads
and packs in full, keeping its rows: the same global batches on any layout, only the
last one padded, no agreement needed on where it ends (its cost: the whole pass on
every host, see paxgpt/bench/data.py).

Errors: an unknown task name raises tasks.UnknownTaskError; bad files (a JSONL line
that is not JSON, ...) raise DataError naming the file and line; a saved state from
other data settings, or an older per-process one that cannot be continued, raises
DataError naming the differences and what to do; a batch size that the process
count does not divide raises DataError.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional

import gin
import jax
import numpy as np
import seqio

import tasks
from paxgpt.config.checks import check_types
from paxgpt.data import streams
from paxgpt.data.streams import FEATURES, DataError  # noqa: F401  (the loader's API)
from paxgpt.model.sharding import Partitioner

STATE_FORMAT = 2  # 1: per-process positions (before row streams)
# Row streams by default at most: as many processes share the work without overlap;
# more streams cost each process more pipelines (and shuffle buffers) of its own.
DEFAULT_MAX_STREAMS = 64

@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the trainer reads.

  mixture_or_task: a name registered by `tasks` ('pydoc_topics', 'c4_gpt3',
    'c4_pydoc_mix', or one from `tasks.text_files_task` / `tasks.mixture`).
  vocabulary: a spec: 'byte', 'spm:/path/model.model', 'gpt2:/dir'.
  sequence_length: tokens per row.
  batch_size: rows per step over all processes.
  seed: shuffling (and mixing) seed; the same seed gives the same batches.
  shuffle_buffer: examples in each row stream's shuffle buffer (a process holds
    the buffers of the streams it packs).
  row_streams: independent packed streams that make up the batch, a divisor of
    batch_size (None: the largest divisor up to 64, so runs of up to 64 processes
    share the work without overlap). A process packs the streams of its rows:
    with row_streams >= processes just its own rows, with fewer the rows of whole
    streams (a process's cost is at most batch_size / row_streams rows a batch).
    Each stream reads 1/row_streams of every task: whole files when a task has at
    least that many, else every row_streams-th example (reading them all). 1: the
    whole split in one stream, exact epochs over it (what one process read before).
  restore_position: False: a resumed run starts the data stream afresh (batch 0)
    instead of at the checkpoint's position (for a position that cannot be
    continued: other data settings, an older format).
  eval_max_batches: cap on evaluation batches (None: the whole validation split).
  tfds_data_dir: where TFDS tasks (c4_gpt3) find their data (None: TFDS's default,
    ~/tensorflow_datasets or $TFDS_DATA_DIR).
  The saved position is tied to the settings that shape the stream (all but
  restore_position, eval_split, eval_max_batches and tfds_data_dir).
  """
  mixture_or_task: str = "pydoc_topics"
  vocabulary: str = "byte"
  sequence_length: int = 2048
  batch_size: int = 8
  seed: int = 0
  shuffle_buffer: int = 1_000
  row_streams: Optional[int] = None
  restore_position: bool = True
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
    if self.row_streams is not None and (self.row_streams < 1
                                         or self.batch_size % self.row_streams):
      raise DataError(f"DataConfig.row_streams={self.row_streams} must divide "
                      f"DataConfig.batch_size={self.batch_size}")

  @property
  def num_streams(self) -> int:
    """K, the row streams of a batch (see row_streams)."""
    if self.row_streams is not None:
      return self.row_streams
    return max(k for k in range(1, min(self.batch_size, DEFAULT_MAX_STREAMS) + 1)
               if self.batch_size % k == 0)


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


def check_process_count(config: DataConfig) -> None:
  """Raise DataError unless every process of this run holds an equal share of rows."""
  processes = jax.process_count()
  if config.batch_size % processes:
    divisors = [n for n in range(1, config.batch_size + 1) if config.batch_size % n == 0]
    shown = ", ".join(map(str, divisors[:8])) + (", ..." if len(divisors) > 8 else "")
    raise DataError(f"DataConfig.batch_size={config.batch_size} is not divisible by the "
                    f"{processes} processes of this run: run it on a process count that "
                    f"divides it ({shown})")


def held_rows(sharding, shape) -> np.ndarray:
  """The sorted global rows that this process's devices hold of an array of `shape`
  laid out by `sharding`."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    rows.update(range(*index[0].indices(shape[0])))
  return np.asarray(sorted(rows), np.int64)


def layout(partitioner: Partitioner) -> dict:
  """Where a stream is read: processes, this process's devices, the mesh."""
  mine = [d for d in partitioner.mesh.devices.flat if d.process_index == jax.process_index()]
  return {"processes": jax.process_count(), "devices": len(mine),
          "mesh": {a: int(s) for a, s in partitioner.mesh.shape.items()}}


def describe_layout(where: Mapping) -> str:
  """'4 processes × 2 devices, mesh fsdp:4,tensor:2' (axes of size 1 left out)."""
  def count(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"
  axes = ",".join(f"{a}:{s}" for a, s in where["mesh"].items() if s > 1) or "of one device"
  return (f"{count(where['processes'], 'process')} × {count(where['devices'], 'device')}, "
          f"mesh {axes}")


def _to_global(rows: Mapping[str, np.ndarray], sharding, shape, row_index=None):
  """Global arrays from this process's rows: `rows[f][row_index[g]]` is global row
  g (row_index None: `rows` holds every row)."""
  def place(values):
    def shard(index):
      local = values[index[0]] if row_index is None else values[row_index[index[0]]]
      return local[:, index[1]]
    return jax.make_array_from_callback(shape, sharding, shard)
  return {f: place(v) for f, v in rows.items()}


class HostRows:
  """This process's numpy rows of the endless training stream: the rows of the
  row streams `stream_ids` (sorted), stream by stream, B/K rows each per batch."""

  def __init__(self, config: DataConfig, split: str, stream_ids):
    self.config, self.split = config, split
    self.stream_ids = [int(s) for s in stream_ids]
    self.rows_per_stream = config.batch_size // config.num_streams
    start = streams.start_position(config, split)  # checks the name and split now
    self.positions = {s: start for s in self.stream_ids}
    self._iterator = None

  def seek(self, positions: Mapping[int, tuple]) -> None:
    """Continue each stream from its position; pipelines are built at the next batch."""
    width = len(streams.start_position(self.config, self.split))
    for s in self.stream_ids:
      position = tuple(int(p) for p in positions[s])
      if len(position) != width or any(p < 0 for p in position):
        raise DataError(f"data position {position} of row stream {s} does not fit "
                        f"{self.config.mixture_or_task!r}")
      self.positions[s] = position
    self._iterator = None

  def _build(self):
    rows = streams.train_rows(self.config, self.split, self.stream_ids,
                              [self.positions[s] for s in self.stream_ids])
    return streams.numpy_rows(rows, len(self.stream_ids) * self.rows_per_stream,
                              f"{self.config.mixture_or_task!r} split {self.split!r}",
                              drop_remainder=True)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._build()
    rows = next(self._iterator)
    n = self.rows_per_stream
    for i, s in enumerate(self.stream_ids):  # stream i's rows: [i * n, (i + 1) * n)
      mine = slice(i * n, (i + 1) * n)
      self.positions[s] = streams.advance(self.positions[s], rows[streams.EPOCH][mine],
                                          rows[streams.SOURCE][mine])
    return {f: rows[f].astype(np.int32) for f in FEATURES}


class TrainIterator:
  """Endless global training batches; see the module docstring."""

  def __init__(self, config: DataConfig, partitioner: Partitioner):
    self.config = config
    check_process_count(config)
    partitioner.check_divisible("DataConfig.batch_size", config.batch_size, "batch")
    self.sharding = partitioner.sharding(("batch", "length"))
    self._shape = (config.batch_size, config.sequence_length)
    self.layout = layout(partitioner)
    per_stream = config.batch_size // config.num_streams
    rows = held_rows(self.sharding, self._shape)
    stream_ids = np.unique(rows // per_stream)
    self._host = HostRows(config, config.train_split, stream_ids)
    # Global row -> its place in this process's rows (-1: another process's).
    self._row_index = np.full(config.batch_size, -1, np.int64)
    for i, s in enumerate(stream_ids):
      self._row_index[s * per_stream:(s + 1) * per_stream] = np.arange(per_stream) + i * per_stream
    self._batches = 0
    self.saved_layout = None
    self.restarted = False

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    rows = next(self._host)
    self._batches += 1
    return _to_global(rows, self.sharding, self._shape, self._row_index)

  def _identity(self) -> dict:
    c = self.config
    return {"mixture_or_task": c.mixture_or_task, "vocabulary": c.vocabulary,
            "sequence_length": c.sequence_length, "batch_size": c.batch_size,
            "row_streams": c.num_streams, "seed": c.seed, "shuffle_buffer": c.shuffle_buffer,
            "split": c.train_split}

  def state(self) -> dict:
    """JSON-able: what was read so far, per row stream, and where. A collective when
    there are several processes (call it on every process, as the checkpoint save is)."""
    width = len(streams.start_position(self.config, self.config.train_split))
    positions = np.full((self.config.num_streams, width), -1, np.int64)
    for s, position in self._host.positions.items():
      positions[s] = position
    if jax.process_count() > 1:  # each stream from a process that reads it
      from jax.experimental import multihost_utils
      positions = np.max(np.asarray(multihost_utils.process_allgather(positions)), axis=0)
    return {"format": STATE_FORMAT, "batches": self._batches, "positions": positions.tolist(),
            **self._identity(), "layout": self.layout}

  def restore(self, state: Mapping) -> None:
    """Continue after the position in `state` (from `state()` of a run with the same
    data settings, on any layout); with restore_position False, start afresh."""
    self.saved_layout = state.get("layout")
    if not self.config.restore_position:
      self.restarted = True
      return
    state = self._upgraded(state)
    expected = self._identity()
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if changed:
      details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
      raise DataError(f"the saved data position is for other data settings ({details}); "
                      f"resume with the saved settings, or set "
                      f"DataConfig.restore_position=False to start the data stream afresh")
    positions = state["positions"]
    if len(positions) != self.config.num_streams:
      raise DataError(f"the saved data position has {len(positions)} row streams, not "
                      f"{self.config.num_streams}")
    self._host.seek({s: positions[s] for s in self._host.stream_ids})
    self._batches = int(state["batches"])

  def _upgraded(self, state: Mapping) -> Mapping:
    """A format-1 state (per-process positions) as format 2: one process's stream is
    row stream 0 of 1; several processes' streams cannot be continued."""
    if state.get("format") == STATE_FORMAT:
      return state
    if state.get("format") != 1:
      raise DataError(f"data state format {state.get('format')!r} is not {STATE_FORMAT}")
    processes = state.get("process_count")
    fresh = ("or set DataConfig.restore_position=False to keep the weights and optimizer "
             "state and start the data stream afresh")
    if processes != 1:
      raise DataError(f"the checkpoint's data position was saved per process ({processes} "
                      f"processes) by a paxgpt before the global data stream; it cannot be "
                      f"continued: resume with the paxgpt that wrote it on {processes} "
                      f"processes, {fresh}")
    if self.config.num_streams != 1:
      raise DataError(f"the checkpoint's data position was saved by a paxgpt before the "
                      f"global data stream (one process): continue it exactly with "
                      f"DataConfig.row_streams=1, {fresh}")
    upgraded = {k: v for k, v in state.items() if k != "process_count"}
    return {**upgraded, "format": STATE_FORMAT, "row_streams": 1}

  def resume_note(self) -> str:
    """What changed since the checkpoint, for the trainer's resume line ('' if nothing)."""
    note = ""
    if self.saved_layout and dict(self.saved_layout) != self.layout:
      note = (f" on {describe_layout(self.layout)} "
              f"(saved on {describe_layout(self.saved_layout)})")
    if self.restarted:
      note += "; the data stream starts afresh (DataConfig.restore_position=False)"
    return note


def eval_batches(config: DataConfig, partitioner: Partitioner) -> Iterator[dict]:
  """One pass over `config.eval_split` (at most `eval_max_batches`): global batches of
  the same shape as training; padding rows have zero loss weights. Every process
  packs the whole pass and places its rows, so all yield the same batches."""
  partitioner.check_divisible("DataConfig.batch_size", config.batch_size, "batch")
  sharding = partitioner.sharding(("batch", "length"))
  shape = (config.batch_size, config.sequence_length)
  what = f"{config.mixture_or_task!r} split {config.eval_split!r}"
  batches = streams.numpy_rows(streams.eval_rows(config, config.eval_split),
                               config.batch_size, what, drop_remainder=False)
  for count, batch in enumerate(batches):
    if config.eval_max_batches is not None and count >= config.eval_max_batches:
      return
    batch = {f: batch[f].astype(np.int32) for f in FEATURES}
    missing = config.batch_size - len(batch["decoder_target_tokens"])
    if missing:  # the last batch: pad to the static shape
      batch = {f: np.pad(v, ((0, missing), (0, 0))) for f, v in batch.items()}
    yield _to_global(batch, sharding, shape)
