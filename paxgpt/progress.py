"""Progress bars for long commands, on a terminal only.

  with Progress(total, "sample", unit="lines") as p:   # train, eval, sample, import
    for ...: p.update(1)
  for item in progress(items, "eval", total=None, unit="batches"): ...

total=None (an unknown count): the count and the rate, without bar or time left.

On a terminal (stderr by default) a bar is rewritten in place with the count,
the rate and the time left; into a file or a pipe Progress prints nothing, so
log files keep plain lines. Training's status line (paxgpt/training/metrics.py) uses the
same pieces (Rate, bar, duration). No dependency beyond the standard library.
"""
from __future__ import annotations

import sys
import time


def duration(seconds):
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes = f"{rest // 60:02d}:{rest % 60:02d}"
  return f"{hours}:{minutes}" if hours else minutes


def is_tty(stream):
  return hasattr(stream, "isatty") and stream.isatty()


class Rate:
  """Items per second since the first update (a resumed run starts counting at
  its first step, not at zero) and the time left to `total`."""

  def __init__(self, total):
    self.total, self._start = total, None  # total None: no time left

  def update(self, done, now=None):
    now = time.monotonic() if now is None else now
    if self._start is None:
      self._start = (now, done)
      return None, None
    seconds, items = now - self._start[0], done - self._start[1]
    if seconds <= 0 or items <= 0:
      return None, None
    rate = items / seconds
    return rate, None if self.total is None else max(self.total - done, 0) / rate


def bar(done, total, width=20):
  filled = int(width * min(done / max(total, 1), 1))
  return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
  """A progress bar with rate and time left, on a terminal only (stderr by
  default); elsewhere it prints nothing. For eval, sample, import or any loop
  over a known number of items.

    with Progress(total, "sample", unit="lines") as progress:
      for ...: progress.update(1)
  """

  def __init__(self, total, label, unit="items", stream=None):
    self.total, self.label, self.unit = total, label, unit
    self.stream = stream or sys.stderr
    self.tty = is_tty(self.stream)
    self.done = 0
    self._rate = Rate(total)
    self._rate.update(0)

  def update(self, n=1):
    self.done += n
    if not self.tty:
      return
    rate, left = self._rate.update(self.done)
    if self.total is None:
      speed = "" if rate is None else f" {rate:.3g} {self.unit}/s"
      self.stream.write(f"\r\033[K{self.label} {self.done} {self.unit}{speed}")
    else:
      speed = "" if rate is None else f" {rate:.3g} {self.unit}/s, {duration(left)} left"
      self.stream.write(f"\r\033[K{self.label} {bar(self.done, self.total)} "
                        f"{self.done}/{self.total}{speed}")
    self.stream.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.tty and self.done:
      self.stream.write("\n")
      self.stream.flush()


def progress(items, label, total=None, unit="items", stream=None):
  """`items`, passed through, with a Progress bar advanced by each."""
  with Progress(total, label, unit, stream) as shown:
    for item in items:
      yield item
      shown.update(1)
