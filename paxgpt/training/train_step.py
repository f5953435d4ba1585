"""The train state and the sharded train and eval steps: JAX, Flax and Optax
only (no TensorFlow, no data pipeline), so `paxgpt plan`, the benchmarks and
the GPU check use exactly the step that `paxgpt train` runs.

  state = abstract_train_state(model_config, optimizer)              # boxed shapes
  step = make_train_step(model_config, optimizer, partitioner, num_microbatches=4)
  step.lower(partitioner.abstract(state), abstract_batch(8, 256, partitioner)).compile()
  new_state, metrics = step(state, batch)                            # state donated
  eval_step = make_eval_step(model_config, partitioner, params_shardings)
  evaluate_params(eval_step, params, batches)   # validation loss, perplexity, tokens
  score_step = make_score_step(model_config, partitioner, params_shardings)
  logprob, greedy = score_step(params, batch)   # per row: few-shot scoring (lm_eval_model.py)

The step's input and output shardings come from the logical axis rules
(Partitioner.tree_shardings on the boxed abstract state); the batch is split
into microbatches whose gradients are summed in a `lax.scan`, so a large
global batch fits; parameters and optimizer state stay float32 while the
model computes in GPTConfig.dtype (bfloat16 by default).

On a mesh with a `stage` axis the periods are pipelined (paxgpt/model/pipeline.py):
  pipe = pipeline.make(mesh, model_config, num_microbatches)
  state = abstract_train_state(model_config, optimizer, pipe)   # [R, S, c, ...] stacks
  step = make_train_step(..., num_microbatches=8, pipeline=pipe)
The microbatches go through the stages PipelineConfig.microbatches at a time
(a pass); passes accumulate like microbatches do. Microbatch i has the same
rows and the same dropout key as without a pipeline, so the losses and
gradients are the unpipelined step's. `StateLayout` moves a state between the
run's layout and the unpipelined one that checkpoints hold.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from paxgpt.model import gpt
from paxgpt.model import pipeline as pipeline_lib
from paxgpt.errors import UsageError

BATCH_NAMES = ("batch", "length")


@flax.struct.dataclass
class TrainState:
  params: dict
  opt_state: optax.OptState
  step: jax.Array


def _model_fn(config, deterministic):
  network = gpt.GPT(config)

  def apply(params, batch, rng):
    return network.apply({"params": params}, batch["decoder_input_tokens"],
                     positions=batch["decoder_positions"],
                     segment_ids=batch["decoder_segment_ids"], deterministic=deterministic,
                     rngs=None if deterministic else {"dropout": rng})
  return apply


def abstract_train_state(model_config, optimizer, pipeline=None):
  """TrainState of ShapeDtypeStructs in flax LogicallyPartitioned boxes (the
  step is a plain int32 scalar; with a `pipeline`, its stacked layout);
  nothing is allocated."""
  params = gpt.abstract_variables(model_config)["params"]
  if pipeline is not None:
    params = pipeline_lib.to_stages(params, pipeline)
  opt_state = jax.eval_shape(optimizer.init, params)
  return TrainState(params=params, opt_state=opt_state,
                    step=jax.ShapeDtypeStruct((), jnp.int32))


def abstract_batch(batch_size, sequence_length, partitioner=None):
  """The batch the step takes, as ShapeDtypeStructs (sharded on batch when a
  partitioner is given)."""
  s = None if partitioner is None else partitioner.sharding(BATCH_NAMES)
  return {name: jax.ShapeDtypeStruct((batch_size, sequence_length), jnp.int32, sharding=s)
          for name in BATCH_FEATURES}


class StateLayout:
  """A run's train state and the unpipelined layout that checkpoints hold:
  the same without a pipeline; with one, `stored` and `run` move the stacked
  periods between [P, ...] (split over `stage` while held) and [R, S, c, ...]."""

  def __init__(self, model_config, optimizer, partitioner, pipeline=None):
    self.pipeline = pipeline
    self.run_abstract = abstract_train_state(model_config, optimizer, pipeline)
    plain = abstract_train_state(model_config, optimizer)
    self.stored_abstract = plain if pipeline is None else pipeline_lib.split_over_stages(plain)
    self._shardings = {"run": partitioner.tree_shardings(self.run_abstract),
                       "stored": partitioner.tree_shardings(self.stored_abstract),
                       "plain": partitioner.tree_shardings(plain)}
    self._programs = {}
    self._partitioner = partitioner

  def _convert(self, to, part, tree):
    if self.pipeline is None:
      return tree
    if (to, part) not in self._programs:
      fn = ((lambda t: pipeline_lib.to_stages(t, self.pipeline)) if to == "run"
            else pipeline_lib.from_stages)
      self._programs[to, part] = jax.jit(fn, out_shardings=getattr(self._shardings[to], part))
    with self._partitioner.activate():
      return self._programs[to, part](tree)

  def stored(self, part, tree):
    """`part` ('params' or 'opt_state') of the run's state in the checkpoints' layout."""
    return self._convert("stored", part, tree)

  def run(self, part, tree):
    """`part` from the checkpoints' layout in the run's."""
    return self._convert("run", part, tree)

  def plain_params(self, params):
    """The run's parameters as an unpipelined model on this mesh takes them
    (periods on every stage): what the sampler and few-shot scoring read."""
    return self._convert("plain", "params", params)


BATCH_FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                  "decoder_segment_ids", "decoder_positions")


class ShardedStep:
  """A jitted step whose tracing happens under the partitioner's mesh and
  rules. Call it, or `.lower(*abstract_args)` it, like the jitted function."""

  def __init__(self, jitted, partitioner):
    self.jitted = jitted
    self.partitioner = partitioner

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


def _summed(logits, batch, z_loss):
  """(objective, (nll_sum, weight_sum, z_sum)) of one (micro)batch: sums, so
  that sums over microbatches divided by the total weight equal the full-batch mean."""
  _, aux = gpt.lm_loss(logits, batch["decoder_target_tokens"],
                       batch["decoder_loss_weights"], z_loss)
  z_sum = aux["z_loss"] * jnp.maximum(aux["weight_sum"], 1.0)
  return aux["nll_sum"] + z_loss * z_sum, (aux["nll_sum"], aux["weight_sum"], z_sum)


def _sum_loss_and_grads(apply, params, batch, rng, z_loss):
  """Gradient of the *summed* weighted loss of one (micro)batch."""
  def summed(p):
    return _summed(apply(p, batch, rng), batch, z_loss)
  (_, sums), grads = jax.value_and_grad(summed, has_aux=True)(params)
  return grads, sums


def _pass_loss_and_grads(model_config, pipeline, deterministic, params, micro, keys, z_loss):
  """The same for one pipeline pass of microbatches ({feature: [M, b, L]})."""
  def summed(p):
    sums = pipeline_lib.pass_sums(model_config, pipeline, p, micro, keys, deterministic,
                                  lambda logits, mb: _summed(logits, mb, z_loss))
    return sums[0], sums[1]
  (_, sums), grads = jax.value_and_grad(summed, has_aux=True)(params)
  return grads, sums


def _microbatch_keys(rng, count):
  """Microbatch i's dropout key: the step's key alone, else folded with i."""
  if count == 1:
    return rng[None]
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(count))


def make_train_step(model_config, optimizer, partitioner, *, num_microbatches=1,
                    z_loss=0.0, schedule=None, seed=0, abstract_state=None, pipeline=None):
  """The jitted, sharded train step `(state, batch) -> (state, metrics)`.

  The state is donated; metrics (replicated scalars): loss (mean over
  non-padding targets, z-loss included), cross_entropy, z_loss, grad_norm
  (before clipping), learning_rate (needs `schedule`), tokens (weight sum).
  `pipeline` (pipeline.make): run the periods through its stages; the state
  is in its layout.
  """
  abstract_state = abstract_state or abstract_train_state(model_config, optimizer, pipeline)
  shardings = partitioner.tree_shardings(abstract_state)
  batch_shardings = {k: partitioner.sharding(BATCH_NAMES) for k in BATCH_FEATURES}
  deterministic = model_config.dropout_rate == 0
  apply = _model_fn(model_config, deterministic)
  base_key = jax.random.key(seed)
  if pipeline is not None and num_microbatches % pipeline.microbatches:
    raise UsageError(f"{num_microbatches} microbatches do not split into pipeline passes of "
                     f"{pipeline.microbatches}")

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_key, state.step)
    batch = {k: batch[k] for k in BATCH_FEATURES}
    keys = _microbatch_keys(rng, num_microbatches)
    if pipeline is not None:  # units: passes of pipeline.microbatches microbatches
      per_pass = pipeline.microbatches
      micro = _split_microbatches(batch, num_microbatches, partitioner)
      units = jax.tree.map(lambda x: x.reshape((-1, per_pass) + x.shape[1:]), (micro, keys))

      def unit_grads(unit):
        return _pass_loss_and_grads(model_config, pipeline, deterministic, state.params,
                                    *unit, z_loss)
    elif num_microbatches == 1:
      units = jax.tree.map(lambda x: x[None], (batch, rng))

      def unit_grads(unit):
        return _sum_loss_and_grads(apply, state.params, *unit, z_loss)
    else:
      units = (_split_microbatches(batch, num_microbatches, partitioner), keys)

      def unit_grads(unit):
        return _sum_loss_and_grads(apply, state.params, *unit, z_loss)
    if jax.tree.leaves(units)[0].shape[0] == 1:
      grads, (nll, weight, z_sum) = unit_grads(jax.tree.map(lambda x: x[0], units))
    else:
      def body(carry, unit):
        return jax.tree_util.tree_map(jnp.add, carry, unit_grads(unit)), None
      zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params),
               (jnp.zeros((), jnp.float32),) * 3)
      (grads, (nll, weight, z_sum)), _ = jax.lax.scan(body, zeros, units)
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
  return ShardedStep(jitted, partitioner)


def make_eval_step(model_config, partitioner, params_shardings, pipeline=None):
  """Jitted `(params, batch) -> (nll_sum, weight_sum)` over non-padding targets
  (with a `pipeline`: through its stages, the batch in one pass)."""
  apply = _model_fn(model_config, True)

  def sums(logits, batch):
    _, aux = gpt.lm_loss(logits, batch["decoder_target_tokens"],
                           batch["decoder_loss_weights"])
    return aux["nll_sum"], aux["weight_sum"]

  def eval_fn(params, batch):
    if pipeline is None:
      return sums(apply(params, batch, None), batch)
    micro = _split_microbatches(batch, pipeline.microbatches, partitioner)
    return pipeline_lib.pass_sums(model_config, pipeline, params, micro, None, True, sums)
  batch_shardings = {k: partitioner.sharding(BATCH_NAMES) for k in BATCH_FEATURES}
  return ShardedStep(jax.jit(eval_fn, in_shardings=(params_shardings, batch_shardings),
                             out_shardings=partitioner.replicated()), partitioner)


def make_score_step(model_config, partitioner, params_shardings):
  """Jitted `(params, batch) -> (logprob [B], greedy [B])`: per row, the summed
  log-probability of the targets whose loss weight is 1, and whether each of
  them is the argmax. The distribution is over real ids only: the padding id 0
  never stands for text, so it takes no probability (the embedding's extra rows
  already get PADDING_LOGIT)."""
  apply = _model_fn(model_config, True)

  def score_fn(params, batch):
    logits = apply(params, batch, None)
    logits = logits.at[..., 0].set(-jnp.inf)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    targets = batch["decoder_target_tokens"]
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    weights = batch["decoder_loss_weights"] > 0
    logprob = jnp.sum(jnp.where(weights, picked, 0.0), axis=-1)
    greedy = jnp.all(~weights | (jnp.argmax(logits, axis=-1) == targets), axis=-1)
    return logprob, greedy
  batch_shardings = {k: partitioner.sharding(BATCH_NAMES) for k in BATCH_FEATURES}
  return ShardedStep(jax.jit(score_fn, in_shardings=(params_shardings, batch_shardings),
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
