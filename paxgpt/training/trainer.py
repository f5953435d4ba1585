"""The training loop: data, checkpoints, metrics and the stopping rules around
the step of paxgpt/training/train_step.py; and `evaluate`, a checkpoint's validation loss.

  train(model_dir)            # gin-configured; resumes from MODEL_DIR's checkpoints
  evaluate(model_dir, step=N) # {"step", "validation_loss", ...}

The loop needs the data side (TensorFlow, SeqIO: paxgpt/data/loader.py); the step it
runs does not.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from paxgpt.model import accounting
from paxgpt.model import info
from paxgpt.store import checkpoint
from paxgpt.model import gpt
from paxgpt.store import model_dir as model_dir_lib
from paxgpt.training import optim
from paxgpt.store import run_lock
from paxgpt.model import sharding
from paxgpt.data import loader as data_lib
from paxgpt.config.checks import check_types
from paxgpt.errors import ConfigError, RunDirBusyError, RunError, UsageError
from paxgpt.training.metrics import MetricsWriter
from paxgpt.progress import progress
from paxgpt.model import pipeline as pipeline_lib
from paxgpt.training.train_step import (BATCH_FEATURES, StateLayout, TrainState,
                               evaluate_params, make_eval_step, make_train_step)


class NonFiniteLossError(RunError):
  """The loss became NaN or Inf; training stopped before saving that state (one
  line on stderr, exit code 1, as every RunError)."""


# The step counter and the schedule's step are int32 inside the compiled step.
MAX_STEPS = 2**31 - 1


def _check_step_count(name, value):
  if value > MAX_STEPS:
    raise ConfigError(f"{name}={value} exceeds {MAX_STEPS}, the most steps a run can count "
                      f"(the step counter is int32)")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """num_steps: optimizer updates in the run (a resumed run continues to it).
  train_tokens: the run's length in tokens instead (GPT-3: 300e9); sets num_steps
    from the global batch.
  num_microbatches: gradient-accumulation microbatches per data batch.
  batch_tokens: the global batch in tokens (sets DataConfig.batch_size to
    batch_tokens / sequence_length / batch_units); None keeps DataConfig's.
  batch_units: data batches per update at full batch (with the GPT-3 ramp,
    OptimizerConfig.batch_ramp_*, fewer early on).
  log_every / eval_every: steps between logged metrics / validation passes
    (0: only at the end).
  z_loss: weight of the PaLM z-loss (0: off).
  init_from / init_step: fine-tuning: a MODEL_DIR whose parameters start this
    run (fresh optimizer and step) when this run has no checkpoint yet.
  time_limit_s: wall-clock budget from the start of `train` (None: none); when
    spent, the run evaluates, saves and stops as at its last step.
  report_baseline: fit the byte 4-gram baseline (paxgpt/data/baseline.py) and log
    its validation cross-entropy next to the model's.
  jax_smi: track device memory with jax-smi.
  fewshot_tasks: lm-evaluation-harness tasks scored every `fewshot_every` steps
    (0: only at the end) and logged as fewshot/TASK/METRIC next to the
    validation loss; fewshot_num_fewshot (None: each task's default),
    fewshot_limit (documents per task), fewshot_include_path (task YAMLs).
  """
  num_steps: int = 1000
  train_tokens: float | None = None
  num_microbatches: int = 1
  batch_tokens: int | None = None
  batch_units: int = 1
  log_every: int = 10
  eval_every: int = 0
  seed: int = 0
  z_loss: float = 0.0
  init_from: str | None = None
  init_step: int | None = None
  time_limit_s: float | None = None
  report_baseline: bool = False
  jax_smi: bool = False
  fewshot_tasks: tuple = ()
  fewshot_every: int = 0
  fewshot_num_fewshot: int | None = None
  fewshot_limit: float | None = None
  fewshot_include_path: str | None = None

  def __post_init__(self):
    check_types(self)
    for name in ("num_steps", "num_microbatches", "batch_units", "log_every"):
      if getattr(self, name) < 1:
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
    for name in ("eval_every", "fewshot_every"):
      if getattr(self, name) < 0:
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
    _check_step_count("TrainConfig.num_steps", self.num_steps)
    object.__setattr__(self, "fewshot_tasks", tuple(self.fewshot_tasks))


class _SigtermFlag:
  """SIGTERM asks for a checkpoint at the next step boundary, then a clean exit.
  With several processes the flag is agreed on at every step (`_any_process`),
  so all of them save the same step."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no flag
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _any_process(*flags):
  """Each flag OR-ed over all processes (one small all-gather when there are
  several), so every process takes the same branch."""
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(f) for f in np.any(np.asarray(gathered).reshape(-1, len(flags)), axis=0))


def _memory_bytes():
  """Device memory in use where the runtime reports it (TPU, GPU), else this
  process's resident memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_in_use" in stats:
    return int(stats["bytes_in_use"])
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError):
    return None


def _with_batch_size(data_config, train_config):
  if train_config.batch_tokens is None:
    return data_config
  per_unit = data_config.sequence_length * train_config.batch_units
  if train_config.batch_tokens % per_unit:
    raise UsageError(f"TrainConfig.batch_tokens={train_config.batch_tokens} is not a "
                     f"multiple of sequence_length x batch_units = {per_unit}")
  return dataclasses.replace(data_config, batch_size=train_config.batch_tokens // per_unit)


def _check_shapes(model_config, data_config, train_config, partitioner):
  data_lib.check_process_count(data_config)  # first: a resume on another process count
  info.check_model_on_mesh(model_config, partitioner.axis_sizes)
  data_lib.check_model_vocab_size(data_config, model_config.vocab_size)
  if data_config.sequence_length > model_config.max_len:
    raise UsageError(f"DataConfig.sequence_length={data_config.sequence_length} exceeds "
                     f"GPTConfig.max_len={model_config.max_len}")
  m = train_config.num_microbatches
  if data_config.batch_size % m:
    raise UsageError(f"DataConfig.batch_size={data_config.batch_size} is not divisible by "
                     f"TrainConfig.num_microbatches={m}")
  partitioner.check_divisible("microbatch rows (batch_size / num_microbatches)",
                              data_config.batch_size // m, "batch")


class _Run:
  """The state of one `train` call: steps compiled per batch size, the data,
  the checkpointer and the writers."""

  def __init__(self, model_dir, model_config, data_config, opt_config, train_config,
               ckpt_config, partitioner):
    self.data_lib = data_lib
    self.model_dir = os.fspath(model_dir)
    self.model_config, self.opt_config, self.cfg = model_config, opt_config, train_config
    self.partitioner = partitioner
    self.data_config = _with_batch_size(data_config, train_config)
    _check_shapes(model_config, self.data_config, train_config, partitioner)
    tokens_per_step = (self.data_config.batch_size * self.data_config.sequence_length
                       * train_config.batch_units)
    if train_config.train_tokens is not None:
      steps = max(1, int(train_config.train_tokens // tokens_per_step))
      _check_step_count(f"TrainConfig.train_tokens={train_config.train_tokens:g} / "
                        f"{tokens_per_step} tokens per step", steps)
      train_config = dataclasses.replace(train_config, num_steps=steps, train_tokens=None)
      self.cfg = train_config
    if train_config.fewshot_tasks:  # a typo or a missing file fails now, not hours later
      _check_fewshot(train_config)
    self.optimizer, self.schedule = optim.make_optimizer(opt_config, train_config.num_steps,
                                                         tokens_per_step)
    # A `stage` mesh axis pipelines the periods; checkpoints keep the unpipelined layout.
    self.pipeline = pipeline_lib.make(partitioner.mesh, model_config,
                                      train_config.num_microbatches)
    self.layout = StateLayout(model_config, self.optimizer, partitioner, self.pipeline)
    self.abstract = self.layout.run_abstract
    self.shardings = partitioner.tree_shardings(self.abstract)
    self._steps = {}
    self.eval_step = make_eval_step(model_config, partitioner, self.shardings.params,
                                    self.pipeline)
    self.data = data_lib.TrainIterator(self.data_config, partitioner)
    self.checkpointer = checkpoint.Checkpointer(self.model_dir, ckpt_config)
    _, non_embedding = accounting.param_counts(gpt.abstract_variables(model_config))
    self.flops_per_token = accounting.flops_per_token(model_config, non_embedding,
                                                      self.data_config.sequence_length)
    self.chip = accounting.chip_of(jax.devices()[0])
    self.is_chief = jax.process_index() == 0
    self._fewshot_lm = None

  def step_fn(self, units):
    if units not in self._steps:
      self._steps[units] = make_train_step(
          self.model_config, self.optimizer, self.partitioner,
          num_microbatches=units * self.cfg.num_microbatches, z_loss=self.cfg.z_loss,
          schedule=self.schedule, seed=self.cfg.seed, abstract_state=self.abstract,
          pipeline=self.pipeline)
    return self._steps[units]

  def next_batch(self, units):
    batches = [next(self.data) for _ in range(units)]
    if units == 1:
      return batches[0]
    return {k: jnp.concatenate([b[k] for b in batches]) for k in BATCH_FEATURES}

  def initial_state(self):
    """(state, validation_loss) from MODEL_DIR's latest checkpoint, else from
    init_from's parameters, else freshly initialised."""
    abstract = self.partitioner.abstract(self.layout.stored_abstract)
    latest, restored, self.skipped = self.checkpointer.restore_newest(abstract.params,
                                                                     abstract.opt_state)
    if latest is not None:
      params, opt_state, data_state, meta = restored
      params, opt_state = self.layout.run("params", params), self.layout.run("opt_state",
                                                                              opt_state)
      self.data.restore(data_state)
      step = jax.device_put(jnp.int32(latest), self.shardings.step)
      return TrainState(params, opt_state, step), meta.get("validation_loss")
    init_opt = jax.jit(self.optimizer.init, out_shardings=self.shardings.opt_state)
    if self.cfg.init_from:
      params = checkpoint.restore_params(self.cfg.init_from, abstract.params,
                                         self.cfg.init_step, "TrainConfig.init_step")
    else:
      network = gpt.GPT(self.model_config)
      tokens = jnp.zeros((1, min(8, self.model_config.max_len)), jnp.int32)
      init = jax.jit(lambda key: nn.unbox(network.init(key, tokens))["params"],
                     out_shardings=self.partitioner.tree_shardings(
                         self.layout.stored_abstract.params))
      with self.partitioner.activate():
        params = init(jax.random.key(self.cfg.seed))
    params = self.layout.run("params", params)
    step = jax.device_put(jnp.int32(0), self.shardings.step)
    return TrainState(params, init_opt(params), step), None

  def validate(self, params):
    batches = self.data_lib.eval_batches(self.data_config, self.partitioner)
    return evaluate_params(self.eval_step, params, batches)

  def fewshot(self, params):
    """{'fewshot/TASK/METRIC': value}: the harness's scores of `params`
    (paxgpt/interop/lm_eval_model.py), one adapter kept so programs compile once."""
    from paxgpt.interop import lm_eval_model
    params = self.layout.plain_params(params)
    if self._fewshot_lm is None:
      self._fewshot_lm = lm_eval_model.PaxGPTLM.from_params(
          self.model_config, params, data_lib.get_vocabulary(self.data_config),
          self.partitioner)
    self._fewshot_lm.set_params(params)
    results = lm_eval_model.evaluate(
        self._fewshot_lm, self.cfg.fewshot_tasks, num_fewshot=self.cfg.fewshot_num_fewshot,
        limit=self.cfg.fewshot_limit, include_path=self.cfg.fewshot_include_path)
    return {f"fewshot/{k}": v for k, v in lm_eval_model.scalar_metrics(results).items()}

  def save(self, state, step, validation_loss):
    stored = state.replace(params=self.layout.stored("params", state.params),
                           opt_state=self.layout.stored("opt_state", state.opt_state))
    self.checkpointer.save(step, stored, self.data.state(), validation_loss)


def _check_fewshot(cfg):
  """The few-shot tasks' names, settings and data (paxgpt/interop/lm_eval_model.py)."""
  from paxgpt.interop import lm_eval_model
  lm_eval_model.check_settings(cfg.fewshot_num_fewshot, cfg.fewshot_limit,
                               ("TrainConfig.fewshot_num_fewshot", "TrainConfig.fewshot_limit"))
  manager = lm_eval_model.tasks_manager_for(cfg.fewshot_tasks, cfg.fewshot_include_path)
  names = lm_eval_model.check_tasks(manager, cfg.fewshot_tasks, cfg.fewshot_include_path)
  lm_eval_model.check_task_data(manager, names)


def _check_finite(step, metrics):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    rate = float(metrics["learning_rate"]) if "learning_rate" in metrics else None
    at = "" if rate is None else f" (learning rate {rate:g})"
    raise NonFiniteLossError(
        f"the loss is {loss} at step {step}{at}; training stopped without saving this state "
        f"(the last good checkpoint is kept). Lower OptimizerConfig.peak_learning_rate or "
        f"check the data.")
  return loss


def _model_config(model_dir, train_config, model_config, vocabulary):
  """The model to train: `model_config`, else MODEL_DIR's model.json (a resumed
  run) or init_from's (fine-tuning) when gin binds no model, else gin's;
  checked against what MODEL_DIR (its vocabulary too) and init_from carry."""
  if model_config is None:
    source = model_dir if model_dir_lib.read(model_dir) else train_config.init_from
    model_config = (model_dir_lib.resolve(source)[0] if source
                    else gpt.GPTConfig())
  model_dir_lib.check_matches(model_dir, model_config, vocabulary)
  if train_config.init_from:
    model_dir_lib.check_matches(train_config.init_from, model_config)
  return model_config


@gin.configurable(denylist=["mesh", "on_step"])
def train(model_dir=gin.REQUIRED, *, mesh=None, on_step=None, model_config=None,
          data_config=None, optimizer_config=None, train_config=None,
          checkpoint_config=None):
  """Train (or resume) in `model_dir` up to TrainConfig.num_steps.

  Configs default to their gin-configured values. `mesh` defaults to
  sharding.make_mesh(). `on_step(step)` is called after each step (tests use
  it). Returns {"step", "loss", "validation_loss", "wall_s", "stopped_by"}.
  """
  lock = _lock_model_dir(model_dir)  # before Orbax, which cleans up others' temp dirs
  try:
    with _SigtermFlag() as sigterm:  # from the start: a SIGTERM while compiling counts too
      return _train(model_dir, mesh, on_step, model_config, data_config, optimizer_config,
                    train_config, checkpoint_config, sigterm, lock)
  finally:
    lock.release()


def _lock_model_dir(model_dir):
  """Process 0 takes MODEL_DIR's lock (paxgpt/store/run_lock.py); every process learns
  the outcome, so all of a refused multi-host run stop."""
  lock, refused = None, None
  if jax.process_index() == 0:
    try:
      lock = run_lock.RunLock.acquire(model_dir)
    except UsageError as e:
      refused = e
  (any_refused,) = _any_process(refused is not None)
  if refused is not None:
    raise refused
  if any_refused:
    raise RunDirBusyError(f"MODEL_DIR={os.fspath(model_dir)!r}: process 0 could not take "
                          f"the run's lock")
  return lock or run_lock.RunLock(None, None, None)


def _train(model_dir, mesh, on_step, model_config, data_config, optimizer_config,
           train_config, checkpoint_config, sigterm, lock):
  start_time = time.time()
  cfg = train_config or TrainConfig()
  data_config = data_config or data_lib.DataConfig()
  model_config = _model_config(model_dir, cfg, model_config, data_config.vocabulary)
  partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
  run = _Run(model_dir, model_config, data_config,
             optimizer_config or optim.OptimizerConfig(), cfg,
             checkpoint_config or checkpoint.CheckpointConfig(), partitioner)
  cfg = run.cfg  # with num_steps resolved from train_tokens
  try:
    state, validation_loss = run.initial_state()
    # Written once every check passed and the resume (if any) was accepted: a
    # refused run leaves MODEL_DIR's record of its checkpoints as it was.
    if jax.process_index() == 0:  # the model's config travels with its checkpoints
      model_dir_lib.write(model_dir, model_config, data_config.vocabulary, gin.config_str())
  except BaseException:
    run.checkpointer.close()
    raise
  writer = MetricsWriter(run.model_dir, cfg.num_steps, enabled=run.is_chief)
  if lock.stale:
    writer.message(f"took over the lock of a run that ended without releasing it "
                   f"({run_lock.describe(lock.stale)})")
  if cfg.jax_smi and run.is_chief:
    import jax_smi
    jax_smi.initialise_tracking()
  try:
    return _loop(run, writer, cfg, start_time, on_step, sigterm, state, validation_loss)
  finally:
    run.checkpointer.close()
    writer.close()


def _loop(run, writer, cfg, start_time, on_step, sigterm, state, validation_loss):
  step = int(state.step)
  for error in run.skipped:
    writer.message(f"skipped: {error}; moved to {checkpoint.UNRESTORABLE_SUBDIR}/")
  if step:
    # Where it runs now, if that moved (processes, devices, mesh), and the data's fate.
    writer.message(f"resumed from {run.checkpointer.directory} at step {step}"
                   f"{run.data.resume_note()}")
    writer.resumed(step)
  baseline = None
  if cfg.report_baseline and run.is_chief:
    from paxgpt.data.baseline import BackgroundBaseline
    baseline = BackgroundBaseline(run.data_config, run.model_dir)
  devices = jax.device_count()
  summary = {"step": step, "loss": None, "validation_loss": validation_loss,
             "stopped_by": "num_steps"}
  interval_start, interval_tokens, pending = time.time(), 0, None
  while step < cfg.num_steps:
    units = optim.batch_ramp_units(run.opt_config, step, cfg.batch_units)
    batch = run.next_batch(units)
    state, metrics = run.step_fn(units)(state, batch)
    if pending is not None:  # the previous step's loss; keeps dispatch ahead
      _check_finite(*pending)
    step += 1
    pending = (step, metrics)
    writer.tick(step)
    run.checkpointer.check()  # a failed background save is reported at once
    interval_tokens += units * run.data_config.batch_size * run.data_config.sequence_length
    if on_step is not None:
      on_step(step)
    stop, out_of_time = _any_process(
        sigterm.raised, bool(cfg.time_limit_s) and time.time() - start_time > cfg.time_limit_s)
    is_last = step == cfg.num_steps or out_of_time
    evaluate = is_last or (cfg.eval_every and step % cfg.eval_every == 0)
    fewshot = bool(cfg.fewshot_tasks) and (
        is_last or (cfg.fewshot_every and step % cfg.fewshot_every == 0))
    log = is_last or evaluate or fewshot or step % cfg.log_every == 0
    save = is_last or stop or step % run.checkpointer.config.save_every_steps == 0
    if log or save:  # never log or save a state whose loss is not finite
      summary["loss"] = _check_finite(*pending)
      pending = None
    now = time.time()  # throughput of the train steps only, before any validation
    tokens_per_sec = interval_tokens / max(now - interval_start, 1e-9)
    record = run.validate(state.params) if evaluate else {}
    if evaluate:
      validation_loss = summary["validation_loss"] = record["validation_loss"]
    if save:  # before few-shot scoring: its failure must not cost the step's checkpoint
      run.save(state, step, validation_loss if evaluate else None)
    if fewshot:
      record.update(run.fewshot(state.params))
    if log:
      record.update({k: float(v) for k, v in metrics.items()})
      record.update({
          "tokens_per_sec": tokens_per_sec, "elapsed_s": now - start_time,
          "mfu": accounting.mfu(tokens_per_sec, run.flops_per_token, run.chip, devices),
          "memory_bytes": _memory_bytes()})
      writer.write(step, record)
      interval_start, interval_tokens = time.time(), 0
    if out_of_time and step < cfg.num_steps:
      writer.message(f"time limit of {cfg.time_limit_s:g}s reached at step {step}")
      summary["stopped_by"] = "time_limit"
      break
    if stop:
      run.checkpointer.wait()
      writer.message(f"SIGTERM: saved a checkpoint at step {step}; exiting")
      summary["stopped_by"] = "sigterm"
      break
  summary["step"] = step
  if baseline is not None:
    base = baseline.result()
    summary["baseline_cross_entropy"] = value = base["validation_cross_entropy"]
    loss = summary["validation_loss"]
    versus = "" if loss is None else f"; validation loss {loss:.4f} = {loss / value:.3f}x it"
    writer.message(f"byte {base['order']}-gram Kneser-Ney baseline: {value:.4f} "
                   f"nats/token{versus}")
  summary["wall_s"] = time.time() - start_time
  return summary


@gin.configurable(denylist=["mesh", "step"])
def evaluate(model_dir=gin.REQUIRED, *, mesh=None, step=None, model_config=None,
             data_config=None):
  """Validation loss and perplexity of the checkpoint `step` (default latest)
  of `model_dir`, restored onto `mesh`."""
  if not os.path.isdir(checkpoint.checkpoint_dir(model_dir)):
    raise UsageError(f"MODEL_DIR={os.fspath(model_dir)!r} has no checkpoints (no "
                     f"{checkpoint.CHECKPOINT_SUBDIR}/ directory)")
  spec = None
  if model_config is None:
    model_config, spec = model_dir_lib.resolve(model_dir)
  if data_config is None:
    data_config = data_lib.DataConfig()
    # With no data gin, the vocabulary the model carries, at most max_len long.
    if spec and not model_dir_lib.gin_bound("DataConfig.vocabulary"):
      data_config = dataclasses.replace(data_config, vocabulary=spec)
    if not model_dir_lib.gin_bound("DataConfig.sequence_length"):
      data_config = dataclasses.replace(
          data_config, sequence_length=min(data_config.sequence_length, model_config.max_len))
  partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
  info.check_model_on_mesh(model_config, partitioner.axis_sizes)
  boxed = gpt.abstract_variables(model_config)["params"]
  step, params = checkpoint.restore_params_at(model_dir, partitioner.abstract(boxed), step)
  eval_step = make_eval_step(model_config, partitioner, partitioner.tree_shardings(boxed))
  batches = progress(data_lib.eval_batches(data_config, partitioner), "eval",
                     total=data_config.eval_max_batches, unit="batches")
  result = evaluate_params(eval_step, params, batches)
  return {"step": step, **result}
