"""Orbax checkpoints of the train state and the data position.

Layout of MODEL_DIR/checkpoints/<step>/ (an Orbax CheckpointManager):
  params     the model parameters (float32), one item so that the sampler and
             fine-tuning restore them alone
  opt_state  the optax state
  data       the data iterator's position (paxgpt/data/loader.py `TrainIterator.state()`)
  meta       {"step": ..., "validation_loss": ...}

Saves are asynchronous; a save that was interrupted leaves only Orbax's
temporary directory, which is never taken for a checkpoint, so a restart
resumes from the last complete one. Restoring takes abstract arrays carrying
the target shardings, so a checkpoint written under one mesh restores under
another.

Failures are one line (paxgpt/errors.py):
  - a save that fails in the background (a full disk) raises RunError naming
    the step, the path, the checkpoints kept and the errno, in one line of at
    most errors.MAX_LINE characters, at the next `check()` (trainer.py calls it
    every step); the checkpoints before it are kept, and its temporary directory
    (never taken for a checkpoint) is removed then and at `close()`;
  - a checkpoint that cannot be restored (corrupt or truncated files, an empty
    JSON item) raises CheckpointError naming the checkpoint and the innermost
    cause Orbax reported; one written for another model shape raises
    ShapeMismatchError naming the parameter and both shapes. `restore_newest`
    (training's resume) skips the unrestorable ones, newest first, and moves
    them to MODEL_DIR/unrestorable_checkpoints/;
  - a checkpoint that a running train deletes while `restore_params` reads it
    (keep-last-K) is read again from the newest one, or, for a chosen --step,
    reported as removed while being read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import os
import re
import shutil
import time

import gin
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from paxgpt.config.checks import check_types
from paxgpt.errors import MAX_LINE, CheckpointError, ConfigError, RunError, UsageError

CHECKPOINT_SUBDIR = "checkpoints"
UNRESTORABLE_SUBDIR = "unrestorable_checkpoints"
ITEMS = ("params", "opt_state", "data", "meta")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """save_every_steps: steps between saves (the last step is always saved).
  keep: how many of the most recent checkpoints to keep.
  keep_best: also keep this many with the lowest validation loss (0: none).
  async_save: write in the background while training goes on."""
  save_every_steps: int = 1000
  keep: int = 3
  keep_best: int = 0
  async_save: bool = True

  def __post_init__(self):
    check_types(self)
    for name, low in (("save_every_steps", 1), ("keep", 1), ("keep_best", 0)):
      if getattr(self, name) < low:
        raise ConfigError(f"CheckpointConfig.{name}={getattr(self, name)} must be >= {low}")


def checkpoint_dir(model_dir) -> str:
  """MODEL_DIR/checkpoints, absolute: Orbax refuses relative local paths (a
  relative MODEL_DIR such as launch/local.sh's runs/demo). URLs (gs://...) stay."""
  model_dir = os.fspath(model_dir)
  if "://" not in model_dir:
    model_dir = os.path.abspath(model_dir)
  return os.path.join(model_dir, CHECKPOINT_SUBDIR)


def _validation_loss(metrics):
  return metrics["validation_loss"]


class ShapeMismatchError(CheckpointError):
  """A checkpoint written for another model shape than the config's."""


def _cause(error, limit=300):
  """The innermost message of an exception chain: Orbax wraps the real cause
  (ZSTD_decompressStream() failed, a byte range past the end of a file, a JSON
  decode error, ENOSPC) in pages of TensorStore specs."""
  deepest, seen = error, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if not isinstance(error, (StopIteration, StopAsyncIteration)) and str(error).strip():
      deepest = error
    error = error.__cause__ or error.__context__
  text = " ".join(str(deepest).split())
  if type(deepest).__name__ not in ("Exception", "ValueError", "RuntimeError", "OSError"):
    text = f"{type(deepest).__name__}: {text}"
  os_error = re.search(r"os_error_code='?(\d+)", text)  # TensorStore's errno, at the end
  if os_error and "[Errno" not in text:
    number = int(os_error.group(1))
    text = f"[Errno {number}] {os.strerror(number)}: {text}"
  limit = max(limit, 60)
  return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _winding_down_quietly():
  """While a failed save winds down, Orbax's writes still in flight print a
  traceback each ("Event loop is closed"); the failure is reported in one line
  instead. PAXGPT_VERBOSE=1 (`paxgpt --verbose`) shows them."""
  if os.environ.get("PAXGPT_VERBOSE") == "1":
    yield
    return
  with contextlib.redirect_stderr(io.StringIO()):
    yield


def _leaf_name(path):
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _shape_mismatch(params_dir, abstract_params):
  """The parameters whose stored shapes differ from `abstract_params`'s (the
  first four, and how many more), as text; None when they agree or the
  metadata cannot be read."""
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(params_dir))
  except Exception:  # pylint: disable=broad-except  (the restore error says why)
    return None
  have = {_leaf_name(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(stored)}
  want = {_leaf_name(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
  differ = []
  for name in sorted(set(have) | set(want)):
    if name not in have:
      differ.append(f"parameter {name} is not in the checkpoint")
    elif name not in want:
      differ.append(f"the checkpoint has parameter {name}, which the config lacks")
    elif have[name] != want[name]:
      differ.append(f"parameter {name} is {have[name]} in the checkpoint but {want[name]} "
                    f"in the config")
  if not differ:
    return None
  more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
  return "; ".join(differ[:4]) + more


def restore_error(directory, step, error, abstract_params=None):
  """The CheckpointError (or ShapeMismatchError) for a failed restore of `step`."""
  path = os.path.join(directory, str(step))
  if isinstance(error, CheckpointError):
    return error
  if abstract_params is not None:
    mismatch = _shape_mismatch(os.path.join(path, "params"), abstract_params)
    if mismatch:
      return ShapeMismatchError(f"checkpoint {path} was written by another model shape: "
                                f"{mismatch}")
  return CheckpointError(f"checkpoint {path} cannot be restored: {_cause(error)}")


class Checkpointer:
  """Save and restore policy over an Orbax CheckpointManager in MODEL_DIR."""

  def __init__(self, model_dir, config: CheckpointConfig = CheckpointConfig(), *,
               read_only=False, params_restore_gb=None):
    self.config = config
    self.directory = checkpoint_dir(model_dir)
    preserve = [policies.LatestN(n=config.keep)]
    if config.keep_best:
      preserve.append(policies.BestN(get_metric_fn=_validation_loss, reverse=True,
                                     n=config.keep_best,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=config.async_save,
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        cleanup_tmp_directories=not read_only)
    # params_restore_gb bounds the parameter bytes Orbax reads at once (its default,
    # 96 GB, reads a whole model into buffers beside the arrays it makes). Only
    # `restore_params` sets it; it reads with PyTreeRestore, not StandardRestore,
    # because only that skips leaves (Orbax PLACEHOLDERs), which reading in parts needs.
    handlers = None if params_restore_gb is None else {
        "params": ocp.PyTreeCheckpointHandler(restore_concurrent_gb=params_restore_gb)}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                         item_handlers=handlers)
    self._last_save = None
    self._failed = False

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, data_state, validation_loss=None):
    """Start an asynchronous save of `state` (a TrainState) at `step`."""
    meta = {"step": int(step), "validation_loss": validation_loss}
    metrics = None if validation_loss is None else {"validation_loss": float(validation_loss)}
    with self._save_errors():  # Orbax first waits for the previous save: it may fail here
      self.manager.save(int(step), args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          opt_state=ocp.args.StandardSave(state.opt_state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
    self._last_save = int(step)

  def check(self):
    """Raise RunError if the background save has failed (cheap: call every step)."""
    with self._save_errors():
      self.manager.check_for_errors()

  @contextlib.contextmanager
  def _save_errors(self):
    try:
      yield
    except RunError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (mapped to one line)
      raise self._save_failed(e) from None

  def _save_failed(self, error):
    """RunError naming the failed save; its temporary directory is removed (the
    checkpoints before it were never touched)."""
    self._failed = True
    step = self._last_save
    with _winding_down_quietly():
      try:  # let the save's other writes end before its directory is removed
        self.manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except  (the same failure)
        pass
    self._remove_temporary(step)
    kept = [int(p.name) for p in epath.Path(self.directory).iterdir()
            if p.name.isdigit() and int(p.name) != step]  # on disk: Orbax's list may lag
    # The cause last and cut to fit, so the line names the path and what is kept in full.
    head = (f"saving checkpoint {step} to {os.path.join(self.directory, str(step))} failed "
            f"(kept checkpoints: {sorted(kept)}): ")
    return RunError(head + _cause(error, MAX_LINE - len(head)))

  def restore(self, step, abstract_params, abstract_opt_state):
    """(params, opt_state, data_state, meta) of checkpoint `step`, placed on the
    shardings carried by the abstract (ShapeDtypeStruct) trees."""
    try:
      restored = self.manager.restore(int(step), args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          opt_state=ocp.args.StandardRestore(abstract_opt_state),
          data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (mapped to one line)
      raise restore_error(self.directory, step, e, abstract_params) from None
    return restored.params, restored.opt_state, restored.data, restored.meta

  def restore_newest(self, abstract_params, abstract_opt_state):
    """(step, (params, opt_state, data_state, meta), skipped) of the newest
    checkpoint that restores; None for the step and state when there is none.
    `skipped` lists the CheckpointErrors of newer ones, which are moved to
    MODEL_DIR/unrestorable_checkpoints/ so that saves can reuse their steps.
    A shape mismatch is raised, not skipped: it is the config that is wrong."""
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = self.restore(step, abstract_params, abstract_opt_state)
      except ShapeMismatchError:
        raise
      except CheckpointError as e:
        skipped.append((step, e))
        continue
      self._set_aside([s for s, _ in skipped])
      return step, restored, [e for _, e in skipped]
    if skipped:
      raise skipped[0][1]
    return None, None, []

  def _set_aside(self, steps):
    if not steps:
      return
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), UNRESTORABLE_SUBDIR)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        while os.path.exists(target):
          target += "_"
        shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("paxgpt: unrestorable checkpoints set aside")
    self.manager.reload()

  def wait(self):
    with self._save_errors():
      self.manager.wait_until_finished()

  def _remove_temporary(self, step):
    if jax.process_index() == 0:
      for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(tmp, ignore_errors=True)

  def close(self):
    try:
      self.wait()
    except RunError:
      if not self._failed:
        raise
      # already reported by check() or save()
    finally:
      if self._failed:
        with _winding_down_quietly():
          self.manager.close()
        self._remove_temporary(self._last_save)  # writes in flight then are over now
      else:
        self.manager.close()


def restore_params(directory, abstract_params, step=None, step_flag="--step", *,
                   each_leaf=None):
  """The parameters of a run's checkpoint, placed on `shardings`.

  directory: a MODEL_DIR (or its checkpoints/ subdirectory).
  abstract_params: a tree of ShapeDtypeStructs like the model's params, each
    carrying the sharding to restore onto (Partitioner.abstract), on any mesh:
    the restore reshards.
  step: the checkpoint step; None for the latest.
  step_flag: how the user chooses the step, for the error message.
  each_leaf: None reads the tree at once. A function (path, array) -> value
    reads it one leaf at a time, largest first, and keeps each_leaf's value in
    the leaf's place: a caller that converts leaves (the sampler splits the
    stacked layers) never holds a whole leaf beside all the converted others.
    A checkpoint read again (removed while read) is read from its first leaf,
    so each_leaf must keep nothing of its own.
  Raises UsageError when there is no (such) checkpoint, CheckpointError when it
  cannot be restored (naming the saved steps).
  """
  return restore_params_at(directory, abstract_params, step, step_flag, each_leaf=each_leaf)[1]


# A checkpoint that a live run deletes while it is read (its keep policy, once a
# newer one is saved) is read again from the newest one, this many times at most.
READ_ATTEMPTS = 5
_REMOVAL_WAIT_S = 1.0  # how long a failed read waits to see its checkpoint vanish


def _removed(path, wait_s=0.0):
  """Whether the checkpoint directory `path` is gone, waiting up to wait_s for a
  deletion under way (files go first, the directory last)."""
  deadline = time.monotonic() + wait_s
  while os.path.isdir(path):
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.05)
  return True


def restore_params_at(directory, abstract_params, step=None, step_flag="--step", *,
                      each_leaf=None):
  """(step, params): `restore_params`, saying which step it restored. A
  checkpoint removed while it was read (a live run keeping the last K) is read
  again from the newest one when `step` is None, else a CheckpointError saying so."""
  directory = os.fspath(directory)
  if os.path.basename(os.path.normpath(directory)) == CHECKPOINT_SUBDIR:
    directory = os.path.dirname(os.path.normpath(directory))
  if not os.path.isdir(checkpoint_dir(directory)):
    raise UsageError(f"no checkpoint in {directory!r} (no {CHECKPOINT_SUBDIR}/ directory)")
  _check_divides(abstract_params)
  # Read one GB at a time (or the largest array): the peak stays near one copy.
  largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_params))
  checkpointer = Checkpointer(directory, read_only=True,
                              params_restore_gb=max(1, -(-largest // 10**9)))
  try:
    for _ in range(READ_ATTEMPTS):
      chosen = resolve_step(checkpointer, directory, step)
      path = os.path.join(checkpointer.directory, str(chosen))
      try:
        restored, error = _read_params(checkpointer.manager, chosen, abstract_params,
                                       each_leaf), None
      except Exception as e:  # pylint: disable=broad-except  (mapped to one line)
        restored, error = None, e
      if not _removed(path, 0.0 if error is None else _REMOVAL_WAIT_S):
        if error is None:
          return chosen, restored
        raise _unrestorable(checkpointer, chosen, error, abstract_params, step_flag) from None
      restored = error = None  # free this read (a failed one's traceback holds its leaves)
      checkpointer.manager.reload()
      if step is not None:
        raise CheckpointError(f"checkpoint {path} was removed while being read (a running "
                              f"train keeps only its last checkpoints); saved steps: "
                              f"{sorted(checkpointer.all_steps())}")
    raise CheckpointError(f"the newest checkpoint in {checkpointer.directory} was removed while "
                          f"being read, {READ_ATTEMPTS} times: a running train deletes them as "
                          f"fast as they are read (raise its CheckpointConfig.keep)")
  finally:
    checkpointer.close()


def _read_params(manager, step, abstract_params, each_leaf):
  """`abstract_params` read from checkpoint `step`: in one read, or with
  `each_leaf` one leaf per read, largest first (the rest of the tree Orbax
  PLACEHOLDERs, which it skips), keeping each_leaf(path, array) in its place.
  Both ways are the same reads of the same files, so give the same bits."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  if each_leaf is None:
    parts = [range(len(flat))]
  else:  # largest first: the big leaves are converted while little else is held
    parts = [[i] for i in sorted(range(len(flat)),
                                 key=lambda i: -flat[i][1].size * flat[i][1].dtype.itemsize)]
  values = [None] * len(flat)
  for part in parts:
    wanted = set(part)
    item = treedef.unflatten([leaf if i in wanted else ocp.PLACEHOLDER
                              for i, (_, leaf) in enumerate(flat)])
    read = manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item))))
    leaves = treedef.flatten_up_to(read.params)
    del read
    for i in part:
      values[i], leaves[i] = leaves[i], None
      if each_leaf is not None:
        values[i] = each_leaf(flat[i][0], values[i])
  return treedef.unflatten(values)


def _check_divides(abstract_params):
  """A UsageError naming the first parameter whose target sharding does not
  divide its shape (the mesh does not fit the model), before any read."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      continue
    try:
      sharding.shard_shape(tuple(leaf.shape))
    except ValueError as e:
      cause = re.sub(r"\s*\(full shape.*$", "", " ".join(str(e).split()))
      raise UsageError(f"the mesh does not fit parameter {_leaf_name(path)} of shape "
                       f"{tuple(leaf.shape)}: {cause.split('implies that ', 1)[-1]}; choose "
                       f"another --mesh") from None


def _unrestorable(checkpointer, step, error, abstract_params, step_flag):
  error = restore_error(checkpointer.directory, step, error, abstract_params)
  if isinstance(error, ShapeMismatchError):  # every step has that shape: no --step hint
    return error
  others = sorted(s for s in checkpointer.all_steps() if s != step)
  return type(error)(f"{error}; saved steps: {sorted(checkpointer.all_steps())}"
                     + (f" (choose another with {step_flag})" if others else ""))


def resolve_step(checkpointer, directory, step):
  """`step` if it was saved (the latest when None), else a UsageError."""
  steps = checkpointer.all_steps()
  if not steps:
    raise UsageError(f"no checkpoint in {os.fspath(directory)!r}")
  if step is None:
    return checkpointer.latest_step()
  if step not in steps:
    raise UsageError(f"no checkpoint for step {step} in {os.fspath(directory)!r}; saved "
                     f"steps: {sorted(steps)}")
  return step
