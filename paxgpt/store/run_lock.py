"""One run owns its MODEL_DIR: a second `paxgpt train` on it is refused.

  lock = RunLock.acquire(model_dir)   # RunDirBusyError naming the holder's host and pid
  lock.stale                          # the holder left behind by a run that died, or None
  lock.release()

The lock is an exclusive, non-blocking flock on MODEL_DIR/.paxgpt.lock, which
holds the owner's {"host", "pid", "started"} so a refused run can name it. The
kernel drops a flock when its process dies (kill -9 included), so the lock of a
dead process is stale by construction; the file it leaves is reported as such
and taken over. The file is never deleted, only emptied on release: deleting it
would let two runs lock two different files of the same name.

A multi-host run is one owner: only process 0 takes the lock (trainer.py agrees
the outcome over all processes). `acquire_file` locks any file the same way
(`paxgpt sample`'s output, paxgpt/decoding/output.py); its owner removes it. URLs (gs://...) have no flock and are not
locked. A MODEL_DIR that cannot be created or written is a UsageError.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from paxgpt.errors import RunDirBusyError, UsageError

LOCK_FILE = ".paxgpt.lock"


def _read_holder(fd):
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", "replace").strip()
  try:
    holder = json.loads(text) if text else None
  except json.JSONDecodeError:
    return None
  return holder if isinstance(holder, dict) else None


def describe(holder):
  if not holder:
    return "another process"
  return f"host {holder.get('host')}, pid {holder.get('pid')}"


class RunLock:
  """The held lock of one MODEL_DIR (holds nothing when MODEL_DIR is a URL)."""

  def __init__(self, path, fd, stale):
    self.path, self._fd, self.stale = path, fd, stale

  @classmethod
  def acquire(cls, model_dir):
    model_dir = os.fspath(model_dir)
    if "://" in model_dir:
      return cls(None, None, None)
    path = os.path.join(os.path.abspath(model_dir), LOCK_FILE)
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
      raise UsageError(f"MODEL_DIR={model_dir!r} cannot be written: "
                       f"{e.strerror or e}") from None
    return cls._lock(path, f"MODEL_DIR={model_dir!r}", "use another MODEL_DIR")

  @classmethod
  def acquire_file(cls, path, name, other):
    """Own the lock file `path` for `name` (e.g. "--output=OUT"), which its
    owner removes on release (`release(remove=True)`): a run that opened the
    file just before the owner removed it sees that and locks the new one."""
    while True:
      lock = cls._lock(path, name, other)
      try:
        same = os.path.samestat(os.fstat(lock._fd), os.stat(path))
      except FileNotFoundError:
        same = False
      if same:
        return lock
      lock.release()

  @classmethod
  def _lock(cls, path, name, other):
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UsageError(f"{name} cannot be written: {e.strerror or e}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise RunDirBusyError(
            f"{name} is in use by another run ({describe(holder)}); wait for it to end or "
            f"{other}") from None
      raise UsageError(f"{name}: cannot lock {path}: {e.strerror or e}") from None
    stale = _read_holder(fd)  # what a dead owner left behind
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return cls(path, fd, stale)

  def release(self, remove=False):
    """Unlock; `remove` deletes the lock file first (acquire_file's locks only)."""
    if self._fd is None:
      return
    try:
      if remove:
        os.remove(self.path)
      else:
        os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None
