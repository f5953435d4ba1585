"""`paxgpt sample`'s output file: owned by one run, resumable, never truncated.

  out = OutputFile.open("OUT.jsonl", fingerprint)
  out.done             # {line number: its finished output line} of an earlier run
  out.write(obj)       # one finished input line, appended and flushed
  out.finish()         # OUT written in input order, the partial file removed
  out.close()          # any other ending: the partial file stays for a rerun

While a run works, its lines go to OUT.partial in the order they finish. Its
first line is a header: {"paxgpt_sample_partial": 1, "fingerprint": {...}}
(what the lines depend on: the prompts file's content, the checkpoint and
step, the model, the request defaults). A rerun of the same command finds
OUT.partial, checks the fingerprint, keeps every finished line byte for byte
and skips those input lines; a partial file of another fingerprint is refused
(a UsageError naming what differs) and left as it is. Only a torn last line
(the process died while writing it) is cut. OUT itself is replaced once, at the
end, from the partial file sorted by input line (through a temporary file and a
rename), so a failed or refused run never touches it.

One writer: OUT.lock is flocked (paxgpt/store/run_lock.py) for the whole run,
so a second run on the same --output is refused in one line naming the first;
the kernel drops the lock of a process that died, kill -9 included.
"""
from __future__ import annotations

import json
import os
import time

from paxgpt.errors import RunError, UsageError
from paxgpt.store import run_lock

HEADER_KEY = "paxgpt_sample_partial"
FORMAT = 1
SYNC_EVERY_S = 1.0


def _differences(found, wanted):
  """'name' for each fingerprint entry that differs ('settings.temperature', ...)."""
  out = []
  for key in sorted(set(found) | set(wanted)):
    a, b = found.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{key}.{name}" for name in _differences(a, b)]
    elif a != b:
      out.append(key)
  return out


class OutputFile:
  """The partial output of one run (see the module docstring)."""

  def __init__(self, output, lock, handle, done, created):
    self.output, self.partial = output, output + ".partial"
    self._lock, self._file, self.done, self._created = lock, handle, done, created
    self.written = 0  # lines this run wrote
    self._synced = time.monotonic()

  @classmethod
  def open(cls, output, fingerprint):
    """Take --output for this run (UsageError where it cannot be written, is
    another run's, or belongs to other prompts, checkpoint or settings)."""
    output = os.fspath(output)
    name = f"--output={output}"
    if os.path.isdir(output):
      raise UsageError(f"{name}: is a directory")
    if os.path.exists(output) and not os.access(output, os.W_OK):
      raise UsageError(f"{name}: the file is read-only")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
      raise UsageError(f"{name}: cannot write {output}.partial: No such file or directory")
    lock = run_lock.RunLock.acquire_file(output + ".lock", name, "use another --output")
    try:
      return cls._open_partial(output, name, fingerprint, lock)
    except BaseException:
      lock.remove()
      raise

  @classmethod
  def _open_partial(cls, output, name, fingerprint, lock):
    partial = output + ".partial"
    header = json.dumps({HEADER_KEY: FORMAT, "fingerprint": fingerprint},
                        ensure_ascii=False) + "\n"
    try:
      if not os.path.exists(partial):
        handle = open(partial, "xb")
        handle.write(header.encode("utf-8"))
        handle.flush()
        return cls(output, lock, handle, {}, created=True)
      with open(partial, "rb") as f:
        raw = f.read()
      done, keep = _finished_lines(raw, partial, fingerprint, header, name)
      handle = open(partial, "r+b")
      if keep < len(raw):  # a line torn by the run that died
        handle.truncate(keep)
      handle.seek(keep)
      if keep == 0:
        handle.write(header.encode("utf-8"))
        handle.flush()
    except OSError as e:
      raise UsageError(f"{name}: cannot write {partial}: {e.strerror}") from None
    return cls(output, lock, handle, done, created=False)

  def write(self, obj):
    """Append one finished line: flushed at once (a killed process loses nothing),
    made durable (fsync) at most once a second (a machine that fails, little)."""
    self._file.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
    self._file.flush()
    self.written += 1
    now = time.monotonic()
    if now - self._synced > SYNC_EVERY_S:
      os.fsync(self._file.fileno())
      self._synced = now

  def finish(self):
    """Write OUT: every finished line in input order (the kept ones byte for byte).
    A failure (a full disk) is a RunError; the partial file stays complete."""
    temporary = f"{self.output}.tmp-{os.getpid()}"
    try:
      self._file.flush()
      os.fsync(self._file.fileno())
      self._file.close()
      with open(self.partial, "rb") as f:
        lines = f.read().splitlines(keepends=True)[1:]
      lines.sort(key=lambda raw: json.loads(raw)["line"])
      with open(temporary, "wb") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(temporary, self.output)
    except OSError as e:
      if os.path.exists(temporary):
        os.remove(temporary)
      self._lock.remove()
      raise RunError(f"--output={self.output}: cannot write it ({e.strerror}); every finished "
                     f"line is kept in {self.partial}: run the same command again to write "
                     f"it") from None
    finally:
      self._file.close()
    os.remove(self.partial)
    self._lock.remove()

  def close(self):
    """End without OUT: the partial file stays, unless this run made it and
    finished nothing (a run refused or failed at start-up leaves no litter)."""
    if self._file.closed:
      return
    self._file.close()
    if self._created and not self.written:
      os.remove(self.partial)
    self._lock.remove()


def _finished_lines(raw, partial, fingerprint, header, name):
  """({line: raw bytes}, bytes to keep) of an existing partial file; UsageError
  when it is not one of this command's. A torn last line is not kept."""
  lines = raw.split(b"\n")  # the last piece is what follows the last newline
  if len(lines) == 1 and header.encode("utf-8").startswith(raw):
    return {}, 0  # the run died writing the header: start the file again
  try:
    found = json.loads(lines[0])
    if found.get(HEADER_KEY) != FORMAT:
      raise ValueError(found)
    found = found["fingerprint"]
  except (ValueError, KeyError, TypeError, AttributeError):
    raise UsageError(f"{name}: {partial} exists but is not a paxgpt sample partial file; "
                     f"move it away to start over") from None
  differ = _differences(found, fingerprint)
  if differ:
    raise UsageError(f"{name}: {partial} was written for another run ({', '.join(differ)} "
                     f"differ); rerun with the same prompts, checkpoint and settings to "
                     f"continue it, or move it away to start over")
  done, keep = {}, len(lines[0]) + 1
  for number, line in enumerate(lines[1:-1], start=2):
    try:
      line_number = json.loads(line)["line"]
    except (ValueError, KeyError, TypeError):
      raise UsageError(f"{name}: {partial} line {number} is damaged; move the file away to "
                       f"start over") from None
    if line_number in done:
      raise UsageError(f"{name}: {partial} holds input line {line_number} twice; move the "
                       f"file away to start over")
    done[line_number] = line + b"\n"
    keep += len(line) + 1
  return done, keep
