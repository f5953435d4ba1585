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
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from paxgpt.model import gpt
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


def abstract_train_state(model_config, optimizer):
  """TrainState of ShapeDtypeStructs in flax LogicallyPartitioned boxes (the
  step is a plain int32 scalar); nothing is allocated."""
  params = gpt.abstract_variables(model_config)["params"]
  opt_state = jax.eval_shape(optimizer.init, params)
  return TrainState(params=params, opt_state=opt_state,
                    step=jax.ShapeDtypeStruct((), jnp.int32))


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


def _sum_loss_and_grads(apply, params, batch, rng, z_loss):
  """Gradient of the *summed* weighted loss of one (micro)batch, so sums over
  microbatches divided by the total weight equal the full-batch mean."""
  def summed(p):
    logits = apply(p, batch, rng)
    _, aux = gpt.lm_loss(logits, batch["decoder_target_tokens"],
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
  shardings = partitioner.tree_shardings(abstract_state)
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
  return ShardedStep(jitted, partitioner)


def make_eval_step(model_config, partitioner, params_shardings):
  """Jitted `(params, batch) -> (nll_sum, weight_sum)` over non-padding targets."""
  apply = _model_fn(model_config, True)

  def eval_fn(params, batch):
    logits = apply(params, batch, None)
    _, aux = gpt.lm_loss(logits, batch["decoder_target_tokens"],
                           batch["decoder_loss_weights"])
    return aux["nll_sum"], aux["weight_sum"]
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
