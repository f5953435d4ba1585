"""Where training metrics go: a progress line, TensorBoard, MODEL_DIR/metrics.jsonl.

  writer = MetricsWriter(model_dir, total_steps)
  writer.resumed(step)     # after a resume: see below
  writer.write(step, values); writer.message(text); writer.close()

On a terminal the status line is a bar rewritten in place with steps per second
and the time left (paxgpt/progress.py); into a file or pipe it is plain lines,
so logs stay readable.

metrics.jsonl holds one record per logged step, in step order: a resumed run
first drops the records past the checkpoint it resumed from (the previous
attempt's, which training repeats) and appends a marker
{"step": S, "event": "resumed"}; `read_metrics` skips markers unless asked.

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

from paxgpt.progress import Rate, bar, duration, is_tty

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
  """A status line rewritten in place on a terminal (a bar, steps per second
  and the time left); plain lines otherwise."""

  SHOWN = ("loss", "validation_loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu")

  def __init__(self, total_steps, stream=None):
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.tty = is_tty(self.stream)
    self._rate = Rate(total_steps)
    self._values = {}

  def tick(self, step):
    """Redraw the bar at `step` with the last values shown (terminal only)."""
    if self.tty:
      self.update(step, self._values)

  def update(self, step, values):
    self._values = values
    width = len(str(self.total_steps))
    shown = ""
    if self.tty:
      rate, left = self._rate.update(step)
      speed = "" if rate is None else f" {rate:.3g} steps/s, {duration(left)} left"
      shown = f"{bar(step, self.total_steps)}{speed} "
    parts = [f"{k}={_format(values[k])}" for k in self.SHOWN if values.get(k) is not None]
    line = f"{shown}step {step:>{width}}/{self.total_steps} " + " ".join(parts)
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

  def resumed(self, step):
    """Drop the records past `step` (a previous attempt's, which the resumed run
    repeats) and mark the resume, so that metrics.jsonl reads in step order."""
    if not self.enabled:
      return
    self._jsonl.close()
    with open(self.jsonl_path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    marker = {"step": int(step), "event": "resumed", "dropped_records": len(lines) - len(kept)}
    temporary = self.jsonl_path + ".tmp"
    with open(temporary, "w") as f:
      f.writelines(kept)
      f.write(json.dumps(marker) + "\n")
    os.replace(temporary, self.jsonl_path)
    self._jsonl = open(self.jsonl_path, "a")
    self.progress._rate = Rate(self.progress.total_steps)  # rate from here on

  def tick(self, step):
    """Every step: moves the terminal's bar (no record is written)."""
    if self.enabled:
      self.progress.tick(step)

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


def read_metrics(model_dir, events=False):
  """The records of MODEL_DIR/metrics.jsonl, in order (for tests and reports);
  with `events`, the resume markers too."""
  with open(os.path.join(model_dir, METRICS_FILE)) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if events or "event" not in r]
