"""One run owns its MODEL_DIR: a second `paxgpt train` on it is refused.

  lock = RunLock.acquire(model_dir)   # RunDirBusyError naming the holder's host and pid
  lock.stale                          # the holder left behind by a run that died, or None
  lock.release()
  path, lock = staging_dir(out, flag) # a hidden directory beside `out`, owned until released

The lock is an exclusive, non-blocking flock on MODEL_DIR/.paxgpt.lock, which
holds the owner's {"host", "pid", "started"} so a refused run can name it. The
kernel drops a flock when its process dies (kill -9 included), so the lock of a
dead process is stale by construction; the file it leaves is reported as such
and taken over. On release the file is emptied, and removed only with what
`acquire` created when the run wrote nothing else there (a refused run leaves
no MODEL_DIR behind). A lock file may thus vanish: `acquire` checks after its
flock that the file it locked is still the one at the path, else tries again,
so two runs never hold two files of the same name.

Directories that `paxgpt import` and `export` build beside their output
(`.NAME.partial-*`, renamed to NAME when complete) are owned the same way: the
next `staging_dir` for NAME removes those whose process died (a killed import)
and refuses while a live process still writes one.

A multi-host run is one owner: only process 0 takes the lock (trainer.py agrees
the outcome over all processes). `acquire_file` locks any file the same way
(`paxgpt sample`'s output, paxgpt/decoding/output.py); its owner removes it.
URLs (gs://...) have no flock and are not locked. A MODEL_DIR that cannot be created or written is a UsageError.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import tempfile
import time

from paxgpt.errors import RunDirBusyError, UsageError

LOCK_FILE = ".paxgpt.lock"
_ATTEMPTS = 20  # lock files removed by their releasing owners while being opened


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


def _missing_directories(directory):
  """`directory` and its ancestors that do not exist, outermost first."""
  missing = []
  while not os.path.exists(directory) and not os.path.islink(directory):
    missing.append(directory)
    parent = os.path.dirname(directory)
    if parent == directory:
      break
    directory = parent
  return missing[::-1]


def _is_locked_path(fd, path):
  """Whether `path` is still the file open as `fd` (its owner may have removed it)."""
  try:
    here, there = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return False
  return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _flock(fd, path, name, other):
  """Take the exclusive lock of `fd` or close it and raise: RunDirBusyError
  naming the holder when another process has it."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _read_holder(fd)
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      busy = RunDirBusyError(f"{name} is in use by another run ({describe(holder)}); "
                             f"wait for it to end or {other}")
      busy.holder = holder
      raise busy from None
    raise UsageError(f"{name}: cannot lock {path}: {e.strerror or e}") from None


class RunLock:
  """The held lock of one MODEL_DIR (holds nothing when MODEL_DIR is a URL)."""

  def __init__(self, path, fd, stale, created=(), created_file=False):
    self.path, self._fd, self.stale = path, fd, stale
    self._created, self._created_file = list(created), created_file

  @classmethod
  def acquire(cls, model_dir, create=True):
    """The lock of `model_dir`. create=False takes only an existing lock file
    and returns None where there is none (sweeping up after a dead process)."""
    model_dir = os.fspath(model_dir)
    if "://" in model_dir:
      return cls(None, None, None)
    directory = os.path.abspath(model_dir)
    path = os.path.join(directory, LOCK_FILE)
    for _ in range(_ATTEMPTS):
      created, created_file = [], False
      try:
        if create:
          created = _missing_directories(directory)
          os.makedirs(directory, exist_ok=True)
          try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created_file = True
          except FileExistsError:
            fd = os.open(path, os.O_RDWR)
        else:
          fd = os.open(path, os.O_RDWR)
      except FileNotFoundError:
        if not create:
          return None
        continue  # removed with its directory by an owner releasing it: again
      except OSError as e:
        raise UsageError(f"MODEL_DIR={model_dir!r} cannot be written: "
                         f"{e.strerror or e}") from None
      _flock(fd, path, f"MODEL_DIR={model_dir!r}", "use another MODEL_DIR")
      if _is_locked_path(fd, path):
        break
      os.close(fd)  # its owner removed it after we opened it: lock the one there now
    else:
      raise UsageError(f"MODEL_DIR={model_dir!r}: {path} keeps being removed")
    return cls._own(path, fd, created, created_file)

  @classmethod
  def acquire_file(cls, path, name, other):
    """Own the lock file `path` for `name` (e.g. "--output=OUT"); its owner
    deletes it when done (`remove`). `other` ends the refusal ("use another ...")."""
    for _ in range(_ATTEMPTS):
      try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise UsageError(f"{name} cannot be written: {e.strerror or e}") from None
      _flock(fd, path, name, other)
      if _is_locked_path(fd, path):
        return cls._own(path, fd)
      os.close(fd)  # its owner removed it after we opened it: lock the one there now
    raise UsageError(f"{name}: {path} keeps being removed")

  @classmethod
  def _own(cls, path, fd, created=(), created_file=False):
    stale = _read_holder(fd)  # what a dead owner left behind
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return cls(path, fd, stale, created, created_file)

  def _wrote_nothing(self):
    """Whether the lock's directory holds nothing but the lock file (and, when
    `acquire` created the directory, empty directories)."""
    directory = os.path.dirname(self.path)
    try:
      for folder, _, files in os.walk(directory):
        if files != ([LOCK_FILE] if folder == directory else []):
          return False
        if not self._created and folder != directory:
          return False
      return os.path.isdir(directory)
    except OSError:
      return False

  def release(self):
    """Unlock; when the run wrote nothing into MODEL_DIR, also remove the lock
    file and the directories `acquire` created (while still locked)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
      if self._created_file and self._wrote_nothing():
        self._remove_created()
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  def _remove_created(self):
    os.unlink(self.path)
    directory = os.path.dirname(self.path)
    if not self._created:
      return
    folders = [f for f, _, _ in os.walk(directory)][::-1]  # deepest first
    for folder in folders + self._created[-2::-1]:  # then the ancestors acquire created
      try:
        os.rmdir(folder)
      except OSError:  # another process put something there: keep the rest
        return

  def remove(self):
    """Remove the lock file, then unlock (a staging directory about to be renamed
    into an output that must not carry it)."""
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None


def staging_dir(out, flag):
  """(path, lock): a new directory `.NAME.partial-<random>` beside `out`, locked by
  this process. Those a dead process left for the same `out` are removed first;
  one that a live process still writes is RunDirBusyError naming it (`flag` is
  how the user named `out`, e.g. --model_dir)."""
  parent, name = os.path.split(os.path.abspath(out))
  prefix = f".{name}.partial-"
  for path in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
    try:
      lock = RunLock.acquire(path, create=False)
    except RunDirBusyError as e:
      raise RunDirBusyError(f"{flag}={out} is being written by another process "
                            f"({describe(e.holder)}, in {path}); wait for it to end") from None
    if lock is None:  # no lock file: not a paxgpt staging directory, or being renamed
      continue
    try:
      shutil.rmtree(path, ignore_errors=True)
    finally:
      lock.release()
  try:
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
  except OSError as e:
    raise UsageError(f"{flag}={out}: cannot write {parent}: {e.strerror or e}") from None
  return path, RunLock.acquire(path)
