"""Orbax checkpoints of the train state and the data position.

Layout of MODEL_DIR/checkpoints/<step>/ (an Orbax CheckpointManager):
  params     the model parameters (float32), one item so that the sampler and
             fine-tuning restore them alone
  opt_state  the optax state
  data       the data iterator's position (paxgpt/data.py `TrainIterator.state()`)
  meta       {"step": ..., "validation_loss": ...}

Saves are asynchronous; a save that was interrupted leaves only Orbax's
temporary directory, which is never taken for a checkpoint, so a restart
resumes from the last complete one. Restoring takes abstract arrays carrying
the target shardings, so a checkpoint written under one mesh restores under
another.
"""
from __future__ import annotations

import dataclasses
import os

import gin
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from paxgpt.errors import UsageError

CHECKPOINT_SUBDIR = "checkpoints"
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
    if self.save_every_steps < 1 or self.keep < 1 or self.keep_best < 0:
      raise ValueError(f"CheckpointConfig: save_every_steps={self.save_every_steps} and "
                       f"keep={self.keep} must be >= 1, keep_best={self.keep_best} >= 0")


def checkpoint_dir(model_dir) -> str:
  """MODEL_DIR/checkpoints, absolute: Orbax refuses relative local paths (a
  relative MODEL_DIR such as launch/local.sh's runs/demo). URLs (gs://...) stay."""
  model_dir = os.fspath(model_dir)
  if "://" not in model_dir:
    model_dir = os.path.abspath(model_dir)
  return os.path.join(model_dir, CHECKPOINT_SUBDIR)


def _validation_loss(metrics):
  return metrics["validation_loss"]


class Checkpointer:
  """Save and restore policy over an Orbax CheckpointManager in MODEL_DIR."""

  def __init__(self, model_dir, config: CheckpointConfig = CheckpointConfig(), *,
               read_only=False):
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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, data_state, validation_loss=None):
    """Start an asynchronous save of `state` (a TrainState) at `step`."""
    meta = {"step": int(step), "validation_loss": validation_loss}
    metrics = None if validation_loss is None else {"validation_loss": float(validation_loss)}
    self.manager.save(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

  def restore(self, step, abstract_params, abstract_opt_state):
    """(params, opt_state, data_state, meta) of checkpoint `step`, placed on the
    shardings carried by the abstract (ShapeDtypeStruct) trees."""
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored.params, restored.opt_state, restored.data, restored.meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory, abstract_params, step=None):
  """The parameters of a run's checkpoint, placed on `shardings`.

  directory: a MODEL_DIR (or its checkpoints/ subdirectory).
  abstract_params: a tree of ShapeDtypeStructs like the model's params, each
    carrying the sharding to restore onto (Partitioner.abstract), on any mesh:
    the restore reshards.
  step: the checkpoint step; None for the latest.
  Raises UsageError when there is no (such) checkpoint.
  """
  directory = os.fspath(directory)
  if os.path.basename(os.path.normpath(directory)) == CHECKPOINT_SUBDIR:
    directory = os.path.dirname(os.path.normpath(directory))
  if not os.path.isdir(checkpoint_dir(directory)):
    raise UsageError(f"no checkpoint in {directory!r} (no {CHECKPOINT_SUBDIR}/ directory)")
  checkpointer = Checkpointer(directory, read_only=True)
  try:
    step = resolve_step(checkpointer, directory, step)
    check_stored_shapes(os.path.join(checkpointer.directory, str(step), "params"),
                        abstract_params)
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    return restored.params
  finally:
    checkpointer.close()


def _path_name(path):
  return "/".join(str(getattr(k, "key", k)) for k in path)


def check_stored_shapes(params_dir, abstract_params):
  """UsageError naming the parameters whose shapes differ from the stored ones
  (a model config that does not match the checkpoint), instead of Orbax's
  traceback on the first of them."""
  try:
    stored = ocp.StandardCheckpointer().metadata(params_dir)
  except (OSError, ValueError, FileNotFoundError):
    return  # not readable as metadata: the restore reports it
  stored = getattr(stored, "item_metadata", stored)
  found = {_path_name(p): tuple(m.shape) for p, m in
           jax.tree_util.tree_flatten_with_path(stored)[0] if hasattr(m, "shape")}
  wanted = {_path_name(p): tuple(x.shape) for p, x in
            jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  diff = [f"{name} {wanted.get(name, 'absent')} (checkpoint: {found.get(name, 'absent')})"
          for name in sorted(set(found) | set(wanted)) if found.get(name) != wanted.get(name)]
  if diff:
    shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
    raise UsageError(f"the model config does not match the checkpoint in {params_dir}: "
                     f"{shown}")


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
