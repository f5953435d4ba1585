"""Train state, the sharded train and eval steps, and the training loop.

The API other modules use:

  state = abstract_train_state(model_config, optimizer, partitioner)  # boxed shapes
  step = make_train_step(model_config, optimizer, partitioner, num_microbatches=4)
  step.lower(nn.unbox(state), abstract_batch(8, 256)).compile()       # `paxgpt plan`
  new_state, metrics = step(state, batch)                             # state donated
  train(model_dir)                                                    # the loop (gin)

The step's input and output shardings come from the logical axis rules
(Partitioner.tree_shardings on the boxed abstract state); the batch is split
into microbatches whose gradients are summed in a `lax.scan`, so a large
global batch fits; parameters and optimizer state stay float32 while the
model computes in GPTConfig.dtype (bfloat16 by default).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from paxgpt import accounting, checkpoint, model, optim, sharding
from paxgpt.errors import UsageError
from paxgpt.metrics import MetricsWriter

try:  # the data side (TensorFlow, SeqIO); the train step itself needs only JAX
  from paxgpt import data as data_lib
except ImportError:  # a JAX-only box (e.g. `paxgpt plan`, GPU benchmarks)
  data_lib = None

BATCH_NAMES = ("batch", "length")


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before saving that state."""


@flax.struct.dataclass
class TrainState:
  params: dict
  opt_state: optax.OptState
  step: jax.Array


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
  report_baseline: fit the byte 4-gram baseline (paxgpt/baseline.py) and log
    its validation cross-entropy next to the model's.
  jax_smi: track device memory with jax-smi.
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

  def __post_init__(self):
    for name in ("num_steps", "num_microbatches", "batch_units", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
    if self.eval_every < 0:
      raise ValueError(f"TrainConfig.eval_every={self.eval_every} must be >= 0")


def _model_fn(config, deterministic):
  gpt = model.GPT(config)

  def apply(params, batch, rng):
    return gpt.apply({"params": params}, batch["decoder_input_tokens"],
                     positions=batch["decoder_positions"],
                     segment_ids=batch["decoder_segment_ids"], deterministic=deterministic,
                     rngs=None if deterministic else {"dropout": rng})
  return apply


def abstract_train_state(model_config, optimizer, partitioner=None):
  """TrainState of ShapeDtypeStructs in flax LogicallyPartitioned boxes (the
  step is a plain int32 scalar); nothing is allocated. `partitioner` is
  unused (shapes do not depend on the mesh) and kept for a uniform call."""
  del partitioner
  params = model.abstract_variables(model_config)["params"]
  opt_state = jax.eval_shape(optimizer.init, params)
  return TrainState(params=params, opt_state=opt_state,
                    step=jax.ShapeDtypeStruct((), jnp.int32))


def state_shardings(abstract_state, partitioner):
  """NamedShardings for every leaf of a boxed TrainState (unboxed tree shape)."""
  return partitioner.tree_shardings(abstract_state)


def abstract_batch(batch_size, sequence_length, partitioner=None):
  """The batch the step takes, as ShapeDtypeStructs (sharded on batch when a
  partitioner is given)."""
  s = None if partitioner is None else partitioner.sharding(BATCH_NAMES)
  return {name: jax.ShapeDtypeStruct((batch_size, sequence_length), jnp.int32, sharding=s)
          for name in BATCH_FEATURES}


BATCH_FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                  "decoder_segment_ids", "decoder_positions")


class ShardedStep:
  """A jitted step whose tracing happens under the partitioner's mesh and
  rules. Call it, or `.lower(*abstract_args)` it, like the jitted function."""

  def __init__(self, jitted, partitioner, state_shardings=None):
    self.jitted = jitted
    self.partitioner = partitioner
    self.state_shardings = state_shardings

  def __call__(self, *args):
    with self.partitioner.activate():
      return self.jitted(*args)

  def lower(self, *args):
    with self.partitioner.activate():
      return self.jitted.lower(*args)


def _split_microbatches(batch, num_microbatches, partitioner):
  """[B, L] -> [M, B/M, L], microbatch m = rows m, m+M, ...: every device keeps
  a share of each microbatch, so the scan never moves rows between devices."""
  spec = partitioner.sharding((None,) + BATCH_NAMES)

  def split(x):
    b = x.shape[0]
    x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree_util.tree_map(split, batch)


def _sum_loss_and_grads(apply, params, batch, rng, z_loss):
  """Gradient of the *summed* weighted loss of one (micro)batch, so sums over
  microbatches divided by the total weight equal the full-batch mean."""
  def summed(p):
    logits = apply(p, batch, rng)
    _, aux = model.lm_loss(logits, batch["decoder_target_tokens"],
                           batch["decoder_loss_weights"], z_loss)
    z_sum = aux["z_loss"] * jnp.maximum(aux["weight_sum"], 1.0)
    return aux["nll_sum"] + z_loss * z_sum, (aux["nll_sum"], aux["weight_sum"], z_sum)
  (_, sums), grads = jax.value_and_grad(summed, has_aux=True)(params)
  return grads, sums


def make_train_step(model_config, optimizer, partitioner, *, num_microbatches=1,
                    z_loss=0.0, schedule=None, seed=0, abstract_state=None):
  """The jitted, sharded train step `(state, batch) -> (state, metrics)`.

  The state is donated; metrics (replicated scalars): loss (mean over
  non-padding targets, z-loss included), cross_entropy, z_loss, grad_norm
  (before clipping), learning_rate (needs `schedule`), tokens (weight sum).
  """
  abstract_state = abstract_state or abstract_train_state(model_config, optimizer)
  shardings = state_shardings(abstract_state, partitioner)
  batch_shardings = {k: partitioner.sharding(BATCH_NAMES) for k in BATCH_FEATURES}
  deterministic = model_config.dropout_rate == 0
  apply = _model_fn(model_config, deterministic)
  base_key = jax.random.key(seed)

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_key, state.step)
    batch = {k: batch[k] for k in BATCH_FEATURES}
    if num_microbatches == 1:
      grads, (nll, weight, z_sum) = _sum_loss_and_grads(apply, state.params, batch, rng,
                                                         z_loss)
    else:
      micro = _split_microbatches(batch, num_microbatches, partitioner)

      def body(carry, xs):
        i, mb = xs
        g, s = _sum_loss_and_grads(apply, state.params, mb, jax.random.fold_in(rng, i),
                                   z_loss)
        return jax.tree_util.tree_map(jnp.add, carry, (g, s)), None
      zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params),
               (jnp.zeros((), jnp.float32),) * 3)
      (grads, (nll, weight, z_sum)), _ = jax.lax.scan(
          body, zeros, (jnp.arange(num_microbatches), micro))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": (nll + z_loss * z_sum) / denom, "cross_entropy": nll / denom,
               "z_loss": z_sum / denom, "grad_norm": optax.tree.norm(grads),
               "tokens": weight}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, partitioner.replicated()), donate_argnums=0)
  return ShardedStep(jitted, partitioner, shardings)


def make_eval_step(model_config, partitioner, params_shardings):
  """Jitted `(params, batch) -> (nll_sum, weight_sum)` over non-padding targets."""
  apply = _model_fn(model_config, True)

  def eval_fn(params, batch):
    logits = apply(params, batch, None)
    _, aux = model.lm_loss(logits, batch["decoder_target_tokens"],
                           batch["decoder_loss_weights"])
    return aux["nll_sum"], aux["weight_sum"]
  batch_shardings = {k: partitioner.sharding(BATCH_NAMES) for k in BATCH_FEATURES}
  return ShardedStep(jax.jit(eval_fn, in_shardings=(params_shardings, batch_shardings),
                             out_shardings=partitioner.replicated()), partitioner)


def evaluate_params(eval_step, params, batches):
  """Validation loss (nats per target token), perplexity and token count."""
  nll, weight = 0.0, 0.0
  for batch in batches:
    n, w = eval_step(params, {k: batch[k] for k in BATCH_FEATURES})
    nll, weight = nll + n, weight + w
  weight = float(weight)
  if weight == 0:
    raise UsageError("the validation split gave no tokens to evaluate")
  loss = float(nll) / weight
  return {"validation_loss": loss, "validation_perplexity": float(np.exp(min(loss, 80.0))),
          "validation_tokens": int(weight)}


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
    if data_lib is None:
      raise UsageError("training needs the data pipeline (paxgpt.data: TensorFlow, SeqIO)")
    self.data_lib = data_lib
    self.model_dir = os.fspath(model_dir)
    self.model_config, self.opt_config, self.cfg = model_config, opt_config, train_config
    self.partitioner = partitioner
    self.data_config = _with_batch_size(data_config, train_config)
    _check_shapes(model_config, self.data_config, train_config, partitioner)
    tokens_per_step = (self.data_config.batch_size * self.data_config.sequence_length
                       * train_config.batch_units)
    if train_config.train_tokens is not None:
      train_config = dataclasses.replace(
          train_config, num_steps=max(1, int(train_config.train_tokens // tokens_per_step)),
          train_tokens=None)
      self.cfg = train_config
    self.optimizer, self.schedule = optim.make_optimizer(opt_config, train_config.num_steps,
                                                         tokens_per_step)
    self.abstract = abstract_train_state(model_config, self.optimizer)
    self.shardings = state_shardings(self.abstract, partitioner)
    self._steps = {}
    self.eval_step = make_eval_step(model_config, partitioner, self.shardings.params)
    self.checkpointer = checkpoint.Checkpointer(self.model_dir, ckpt_config)
    self.data = data_lib.TrainIterator(self.data_config, partitioner)
    _, non_embedding = accounting.param_counts(model.abstract_variables(model_config))
    self.flops_per_token = accounting.flops_per_token(model_config, non_embedding,
                                                      self.data_config.sequence_length)
    self.chip = accounting.chip_of(jax.devices()[0])
    self.is_chief = jax.process_index() == 0

  def step_fn(self, units):
    if units not in self._steps:
      self._steps[units] = make_train_step(
          self.model_config, self.optimizer, self.partitioner,
          num_microbatches=units * self.cfg.num_microbatches, z_loss=self.cfg.z_loss,
          schedule=self.schedule, seed=self.cfg.seed, abstract_state=self.abstract)
    return self._steps[units]

  def next_batch(self, units):
    batches = [next(self.data) for _ in range(units)]
    if units == 1:
      return batches[0]
    return {k: jnp.concatenate([b[k] for b in batches]) for k in BATCH_FEATURES}

  def initial_state(self):
    """(state, validation_loss) from MODEL_DIR's latest checkpoint, else from
    init_from's parameters, else freshly initialised."""
    abstract = nn.unbox(self.abstract)
    with_sharding = lambda tree, sh: jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
    latest = self.checkpointer.latest_step()
    if latest is not None:
      params, opt_state, data_state, meta = self.checkpointer.restore(
          latest, with_sharding(abstract.params, self.shardings.params),
          with_sharding(abstract.opt_state, self.shardings.opt_state))
      self.data.restore(data_state)
      step = jax.device_put(jnp.int32(latest), self.shardings.step)
      return TrainState(params, opt_state, step), meta.get("validation_loss")
    init_opt = jax.jit(self.optimizer.init, out_shardings=self.shardings.opt_state)
    if self.cfg.init_from:
      params = checkpoint.restore_params(self.cfg.init_from, abstract.params,
                                         self.shardings.params, self.cfg.init_step)
    else:
      gpt = model.GPT(self.model_config)
      tokens = jnp.zeros((1, min(8, self.model_config.max_len)), jnp.int32)
      init = jax.jit(lambda key: nn.unbox(gpt.init(key, tokens))["params"],
                     out_shardings=self.shardings.params)
      with self.partitioner.activate():
        params = init(jax.random.key(self.cfg.seed))
    step = jax.device_put(jnp.int32(0), self.shardings.step)
    return TrainState(params, init_opt(params), step), None

  def validate(self, params):
    batches = self.data_lib.eval_batches(self.data_config, self.partitioner)
    return evaluate_params(self.eval_step, params, batches)

  def save(self, state, step, validation_loss):
    self.checkpointer.save(step, state, self.data.state(), validation_loss)


def _check_finite(step, metrics):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise NonFiniteLossError(
        f"the loss is {loss} at step {step}; training stopped without saving this state "
        f"(the last good checkpoint is kept). Lower the learning rate or check the data.")
  return loss


@gin.configurable(denylist=["mesh", "on_step"])
def train(model_dir=gin.REQUIRED, *, mesh=None, on_step=None, model_config=None,
          data_config=None, optimizer_config=None, train_config=None,
          checkpoint_config=None):
  """Train (or resume) in `model_dir` up to TrainConfig.num_steps.

  Configs default to their gin-configured values. `mesh` defaults to
  sharding.make_mesh(). `on_step(step)` is called after each step (tests use
  it). Returns {"step", "loss", "validation_loss", "wall_s", "stopped_by"}.
  """
  with _SigtermFlag() as sigterm:  # from the start: a SIGTERM while compiling counts too
    return _train(model_dir, mesh, on_step, model_config, data_config, optimizer_config,
                  train_config, checkpoint_config, sigterm)


def _train(model_dir, mesh, on_step, model_config, data_config, optimizer_config,
           train_config, checkpoint_config, sigterm):
  start_time = time.time()
  cfg = train_config or TrainConfig()
  model_config = model_config or model.GPTConfig()
  partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
  run = _Run(model_dir, model_config, data_config or data_lib.DataConfig(),
             optimizer_config or optim.OptimizerConfig(), cfg,
             checkpoint_config or checkpoint.CheckpointConfig(), partitioner)
  cfg = run.cfg  # with num_steps resolved from train_tokens
  writer = MetricsWriter(run.model_dir, cfg.num_steps, enabled=run.is_chief)
  if cfg.jax_smi and run.is_chief:
    import jax_smi
    jax_smi.initialise_tracking()
  try:
    return _loop(run, writer, cfg, start_time, on_step, sigterm)
  finally:
    run.checkpointer.close()
    writer.close()


def _loop(run, writer, cfg, start_time, on_step, sigterm):
  state, validation_loss = run.initial_state()
  step = int(state.step)
  if step:
    writer.message(f"resumed from {run.checkpointer.directory} at step {step}")
  baseline = None
  if cfg.report_baseline and run.is_chief:
    from paxgpt.baseline import BackgroundBaseline
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
    interval_tokens += units * run.data_config.batch_size * run.data_config.sequence_length
    if on_step is not None:
      on_step(step)
    stop, out_of_time = _any_process(
        sigterm.raised, bool(cfg.time_limit_s) and time.time() - start_time > cfg.time_limit_s)
    is_last = step == cfg.num_steps or out_of_time
    evaluate = is_last or (cfg.eval_every and step % cfg.eval_every == 0)
    log = is_last or evaluate or step % cfg.log_every == 0
    save = is_last or stop or step % run.checkpointer.config.save_every_steps == 0
    if log or save:  # never log or save a state whose loss is not finite
      summary["loss"] = _check_finite(*pending)
      pending = None
    now = time.time()  # throughput of the train steps only, before any validation
    tokens_per_sec = interval_tokens / max(now - interval_start, 1e-9)
    record = run.validate(state.params) if evaluate else {}
    if evaluate:
      validation_loss = summary["validation_loss"] = record["validation_loss"]
    if log:
      record.update({k: float(v) for k, v in metrics.items()})
      record.update({
          "tokens_per_sec": tokens_per_sec, "elapsed_s": now - start_time,
          "mfu": accounting.mfu(tokens_per_sec, run.flops_per_token, run.chip, devices),
          "memory_bytes": _memory_bytes()})
      writer.write(step, record)
      interval_start, interval_tokens = time.time(), 0
    if save:
      run.save(state, step, validation_loss if evaluate else None)
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
  model_config = model_config or model.GPTConfig()
  data_config = data_config or data_lib.DataConfig()
  partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
  if not os.path.isdir(checkpoint.checkpoint_dir(model_dir)):
    raise UsageError(f"MODEL_DIR={os.fspath(model_dir)!r} has no checkpoints (no "
                     f"{checkpoint.CHECKPOINT_SUBDIR}/ directory)")
  checkpointer = checkpoint.Checkpointer(model_dir, read_only=True)
  try:
    step = checkpoint.resolve_step(checkpointer, model_dir, step)
  finally:
    checkpointer.close()
  boxed = model.abstract_variables(model_config)["params"]
  shardings = partitioner.tree_shardings(boxed)
  params = checkpoint.restore_params(model_dir, nn.unbox(boxed), shardings, step)
  eval_step = make_eval_step(model_config, partitioner, shardings)
  result = evaluate_params(eval_step, params, data_lib.eval_batches(data_config, partitioner))
  return {"step": step, **result}


def _mesh_from_args(args):
  overrides = sharding.parse_mesh_flag(args.mesh) if getattr(args, "mesh", None) else {}
  return sharding.make_mesh(**overrides)


def _as_usage_error(fn):
  """Usage errors and bad data settings (paxgpt.data.DataError) reach the CLI as
  one line naming the problem."""
  @functools.wraps(fn)
  def wrapper(args):
    try:
      return fn(args)
    except ((UsageError,) + ((data_lib.DataError,) if data_lib else ())) as e:
      # gin appends "In call to configurable ..." to errors raised inside `train`.
      raise UsageError(str(e).split(" In call to configurable")[0].strip()) from e
  return wrapper


@_as_usage_error
def train_command(args):
  """`paxgpt train`: exit 0 when done (or stopped by SIGTERM after saving), 1
  when the loss became NaN/Inf."""
  try:
    summary = train(mesh=_mesh_from_args(args))
  except NonFiniteLossError as e:
    print(f"paxgpt: error: {e}", flush=True)
    return 1
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in summary.items()}), flush=True)
  return 0


@_as_usage_error
def eval_command(args):
  """`paxgpt eval`: prints one JSON object (step, validation loss, perplexity)."""
  result = evaluate(mesh=_mesh_from_args(args), step=args.step)
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return 0
