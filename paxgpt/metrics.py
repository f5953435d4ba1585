"""Where training metrics go: a progress line, TensorBoard, MODEL_DIR/metrics.jsonl.

Only one process (process 0) writes; the others get a writer that does
nothing. TensorBoard event files are written with tensorboard's own record
format and protos, so TensorFlow is not imported (the train step must run on
a box with JAX only).
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"


class TensorBoardWriter:
  """Scalar summaries in one events file (readable by `tensorboard --logdir`)."""

  def __init__(self, logdir):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "wb")
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    self._records.write(event.SerializeToString())

  def scalars(self, step, values):
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
        for tag, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._records.flush()

  def close(self):
    self._records.close()


def _format(value):
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


class ProgressLine:
  """A status line rewritten in place on a terminal; plain lines otherwise."""

  SHOWN = ("loss", "validation_loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu")

  def __init__(self, total_steps, stream=None):
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def update(self, step, values):
    width = len(str(self.total_steps))
    done = step / max(self.total_steps, 1)
    bar = ""
    if self.tty:
      filled = int(20 * done)
      bar = "[" + "#" * filled + "." * (20 - filled) + "] "
    parts = [f"{k}={_format(values[k])}" for k in self.SHOWN if values.get(k) is not None]
    line = f"{bar}step {step:>{width}}/{self.total_steps} " + " ".join(parts)
    if self.tty:
      self.stream.write("\r\033[K" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text):
    """A line of its own (ends an in-place line first)."""
    self.stream.write(("\n" if self.tty else "") + text + "\n")
    self.stream.flush()

  def close(self):
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


class MetricsWriter:
  """One `write(step, values)` per logged step, to all three sinks."""

  def __init__(self, model_dir, total_steps, *, enabled=True, stream=None):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(model_dir, exist_ok=True)
    self.jsonl_path = os.path.join(model_dir, METRICS_FILE)
    self._jsonl = open(self.jsonl_path, "a")
    self._tensorboard = TensorBoardWriter(os.path.join(model_dir, TENSORBOARD_SUBDIR))
    self.progress = ProgressLine(total_steps, stream)

  def write(self, step, values):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: v for k, v in values.items() if v is not None}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    self._tensorboard.scalars(step, values)
    self.progress.update(step, values)

  def message(self, text):
    if self.enabled:
      self.progress.message(text)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
      self.progress.close()


def read_metrics(model_dir):
  """The records of MODEL_DIR/metrics.jsonl, in order (for tests and reports)."""
  with open(os.path.join(model_dir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
