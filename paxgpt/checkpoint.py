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

from paxgpt.config import check_types
from paxgpt.errors import ConfigError, UsageError

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
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    return restored.params
  finally:
    checkpointer.close()


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
