"""Pipeline stages: the stack of periods split over the `stage` mesh axis and run
with a circular schedule (microbatches, repeats, remat), as MaxText's
layers/pipeline.py and Praxis' LayerwiseShardablePipelined do under GSPMD.

With S stages and R repeats the P periods (one dense + one banded layer each)
form S*R chunks of c = P / (S*R) periods; chunk r*S + s runs on stage s in
repeat r, so a microbatch goes round the ring of stages R times. The stacked
parameters are laid out [R, S, c, ...] (`to_stages`; S is split over `stage`).
Each iteration runs every stage at once (vmap over S) on the activation it
holds, then passes the activations one stage on (jnp.roll over the
stage-split axis: one collective permute). Microbatch m enters stage 0 at
iteration m; between repeats its activation waits in stage 0's buffer until
its turn, which is why a circular schedule needs M >= S. The loop runs
R*M + S - 1 iterations; stage s idles in S - 1 of them, so the bubble is
(S - 1) / (R*M + S - 1) (`Pipeline.bubble`, counted from `Pipeline.schedule`).

The numbers are the unpipelined model's: microbatch i takes the train step's
key for microbatch i, period p the key nn.scan gives period p under the same
scope name, so dropout masks agree; the embedding and the head are GPT's own
(GPT(part="embed" | "head")). Checkpoints keep the unpipelined layout
(`from_stages`), so the sampler, export and few-shot read a pipelined run's
checkpoint, and a pipelined run resumes from an unpipelined one.

Memory: each iteration is rematerialised keeping only its periods' inputs, never
a stage's selected weights (they are re-selected from the stacked ones, a loop
constant, in the backward pass); inside, GPTConfig.remat_policy applies per
layer or per period (remat_scope) as without a pipeline (what a policy saves inside a period, e.g.
dots_saveable's matmuls, is recomputed once more: only the inputs cross
iterations).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from paxgpt.config.checks import check_types
from paxgpt.errors import ConfigError, UsageError
from paxgpt.model import gpt
from paxgpt.model import sharding

# What an iteration keeps for the backward pass: each period's input (the stage's
# input is the first). Everything else, the stage's selected weights above all, is
# recomputed from the stacked weights (a loop constant) and these.
PERIOD_INPUT = "pipeline_period_input"
STAGE_NAMES = ("layer_repeats", "stage")  # the logical names of [R, S] in front of a stacked leaf
STATE_NAMES = ("activation_stage",) + gpt.BATCH_LENGTH_EMBED


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How a mesh with a `stage` axis pipelines the periods (no stage axis: unused).

  repeats: times each microbatch goes round the stages (the circular schedule:
    the periods form stages x repeats chunks).
  microbatches: microbatches per pipeline pass (None: all of
    TrainConfig.num_microbatches in one pass); passes accumulate gradients.
  """
  repeats: int = 1
  microbatches: int | None = None

  def __post_init__(self):
    check_types(self)
    if self.repeats < 1:
      raise ConfigError(f"PipelineConfig.repeats={self.repeats} must be >= 1")
    if self.microbatches is not None and self.microbatches < 1:
      raise ConfigError(f"PipelineConfig.microbatches={self.microbatches} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A checked pipeline: `stages` (the mesh's stage axis), `repeats`, and
  `microbatches` per pass."""
  stages: int
  repeats: int
  microbatches: int

  @property
  def iterations(self):
    return self.repeats * self.microbatches + self.stages - 1

  def schedule(self):
    """[iterations, stages]: the visit each stage works on in each iteration,
    repeat * microbatches + microbatch, or -1 where it idles. The loop in
    `run_stages` computes the same visit, t - s, as it goes."""
    visit = _visit(np.arange(self.iterations)[:, None], np.arange(self.stages)[None, :])
    return np.where((visit >= 0) & (visit < self.repeats * self.microbatches), visit, -1)

  @property
  def bubble(self):
    """The fraction of stage-iterations that idle, counted from `schedule`."""
    return float(np.mean(self.schedule() < 0))

  def describe(self):
    return {"stages": self.stages, "repeats": self.repeats, "microbatches": self.microbatches,
            "iterations": self.iterations, "bubble": self.bubble}


def _visit(t, stage):
  """The visit (repeat * M + microbatch) stage `stage` works on at iteration `t`."""
  return t - stage


def make(mesh, model_config, num_microbatches, config=None):
  """The run's Pipeline for `mesh` (None when it has no stage axis), checked
  against the model and TrainConfig.num_microbatches."""
  stages = sharding.stage_count(mesh)
  if stages == 1:
    return None
  config = config or PipelineConfig()
  pipe = Pipeline(stages, config.repeats, config.microbatches or num_microbatches)
  check(pipe, model_config, num_microbatches)
  return pipe


def check(pipe, model_config, num_microbatches):
  """UsageError unless `pipe` can run `model_config` with `num_microbatches`."""
  periods, pattern = model_config.num_periods, len(model_config.attention_pattern)
  chunks = pipe.stages * pipe.repeats
  if not model_config.scan_layers:
    raise UsageError("pipeline stages need the stacked periods: GPTConfig.scan_layers=True")
  if periods % chunks:
    raise UsageError(f"GPTConfig.num_layers={model_config.num_layers} makes {periods} layer "
                     f"periods ({pattern} layers each), which {pipe.stages} stages x "
                     f"{pipe.repeats} repeats (PipelineConfig.repeats) do not divide")
  if num_microbatches % pipe.microbatches:
    raise UsageError(f"TrainConfig.num_microbatches={num_microbatches} is not a multiple of "
                     f"PipelineConfig.microbatches={pipe.microbatches}")
  if pipe.repeats > 1 and pipe.microbatches < pipe.stages:
    raise UsageError(f"a circular pipeline (PipelineConfig.repeats={pipe.repeats}) needs at "
                     f"least as many microbatches per pass as stages: {pipe.microbatches} < "
                     f"{pipe.stages}")
  return pipe


# ---------------------------------------------------------------- layouts

def _is_stack(node):
  return isinstance(node, Mapping) and "layers" in node


def _relayout(leaf, shape_fn, names_fn):
  """A stacked leaf (array, ShapeDtypeStruct or flax LogicallyPartitioned box)
  with a new shape and, for a box, new logical names."""
  if isinstance(leaf, nn.LogicallyPartitioned):
    return leaf.replace(value=_relayout(leaf.value, shape_fn, names_fn),
                        names=names_fn(tuple(leaf.names)))
  shape = shape_fn(tuple(leaf.shape))
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(shape, leaf.dtype)
  return jnp.reshape(leaf, shape)


def _map_stacked(tree, shape_fn, names_fn):
  """`_relayout` on every leaf of every 'layers' subtree of `tree` (parameters,
  the optimizer's moments, boxed abstract shapes)."""
  def convert(node):
    if not _is_stack(node):
      return node
    layers = jax.tree.map(lambda x: _relayout(x, shape_fn, names_fn), node["layers"],
                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return {**node, "layers": layers}
  return jax.tree.map(convert, tree, is_leaf=_is_stack)


def to_stages(tree, pipe):
  """The scanned layout [P, ...] -> the pipelined one [R, S, P / (R*S), ...]
  (a reshape: chunk r*S + s holds periods (r*S + s)*c ... (r*S + s + 1)*c - 1)."""
  def shape(s):
    chunk = s[0] // (pipe.repeats * pipe.stages)
    return (pipe.repeats, pipe.stages, chunk) + s[1:]
  return _map_stacked(tree, shape, lambda names: STAGE_NAMES + names)


def from_stages(tree):
  """The inverse of `to_stages`: what checkpoints, the sampler and export hold."""
  return _map_stacked(tree, lambda s: (s[0] * s[1] * s[2],) + s[3:], lambda names: names[2:])


def split_over_stages(boxed_tree):
  """Boxes of the scanned layout whose period axis is split over `stage`: how a
  pipelined run holds the unpipelined layout while it saves or restores it
  (a stage's share of the periods, not all of them on every stage)."""
  return _map_stacked(boxed_tree, lambda s: s, lambda names: ("stage",) + names[1:])


# ---------------------------------------------------------------- the schedule

class _Period(nn.Module):
  """One period, called as GPT calls its periods: an nn.scan (of length 1 here)
  named 'layers', so that flax folds the same names and counters into its
  dropout keys; its key is not split, it is period p's own (`period_keys`)."""
  config: gpt.GPTConfig
  deterministic: bool
  period: type

  @nn.compact
  def __call__(self, x, segment_ids):
    stack = nn.scan(self.period, variable_axes={"params": 0},
                    split_rngs={"params": False, "dropout": False}, in_axes=nn.broadcast,
                    length=1)
    return stack(self.config, self.deterministic, name="layers")(x, segment_ids)[0]


def period_keys(keys, num_periods):
  """[M] microbatch keys -> [M, P]: period p's key as nn.scan splits it."""
  return jax.vmap(lambda k: jax.random.split(jax.random.clone(k), num_periods))(keys)


def run_stages(model_config, pipe, stacked, xs, segment_ids=None, keys=None,
               deterministic=True):
  """The periods over microbatches through the pipeline.

  stacked: the 'layers' parameters in the pipelined layout; xs [M, b, L, D]
  the microbatches' embeddings; segment_ids [M, b, L] or None; keys [M, P]
  (`period_keys`) when not deterministic. Returns the periods' output [M, b, L, D].
  """
  stages, repeats, micro = pipe.stages, pipe.repeats, pipe.microbatches
  chunk = model_config.num_periods // (stages * repeats)
  # Per-layer remat (remat_scope "layer") happens inside gpt.Period; "period" remats here.
  period = gpt._remat(gpt.Period, gpt._remat_policy(model_config, None, "period"), scanned=True)
  module = _Period(model_config, deterministic, period)
  stage_ids = jnp.arange(stages)

  def stage_fn(weights, x, segments, stage_keys):
    def body(x, per_period):
      w, key = per_period
      x = checkpoint_name(x, PERIOD_INPUT)
      rngs = None if deterministic else {"dropout": key}
      w = jax.tree.map(lambda a: a[None], w)  # _Period's scan of length 1
      return module.apply({"params": {"layers": w}}, x, segments, rngs=rngs), None
    return jax.lax.scan(body, x, (weights, stage_keys))[0]

  def compute(stacked, x, t):
    visit = _visit(t, stage_ids)
    m = jnp.mod(visit, micro)
    r = jnp.clip(visit // micro, 0, repeats - 1)
    # Stage s's chunk in its current repeat: a select over the (few) repeats, so
    # that every device reads only its own stage's weights.
    pick = r[None, :] == jnp.arange(repeats)[:, None]  # [R, S]
    weights = jax.tree.map(
        lambda w: jnp.sum(jnp.where(pick.reshape(pick.shape + (1,) * (w.ndim - 2)), w,
                                    jnp.zeros((), w.dtype)), axis=0), stacked)
    segments = None if segment_ids is None else segment_ids[m]
    stage_keys = None
    if keys is not None:
      first = (r * stages + stage_ids) * chunk
      stage_keys = keys[m[:, None], first[:, None] + jnp.arange(chunk)[None, :]]
    return jax.vmap(stage_fn, spmd_axis_name=sharding.STAGE_AXIS)(weights, x, segments,
                                                                   stage_keys)

  compute = jax.checkpoint(
      compute, prevent_cse=False,
      policy=jax.checkpoint_policies.save_only_these_names(PERIOD_INPUT))

  def constrain(x, names):
    return nn.with_logical_constraint(x, names)

  # Stage s's buffer: the microbatches waiting for stage 0 (only stage 0's copy is
  # read), and slot M where the rotations of the first S - 1 iterations go.
  buffer = jnp.broadcast_to(xs[None], (stages,) + xs.shape)
  buffer = jnp.concatenate([buffer, jnp.zeros_like(buffer[:, :1])], axis=1)
  buffer = constrain(buffer, STATE_NAMES[:1] + (None,) + STATE_NAMES[1:])
  state = constrain(jnp.zeros((stages,) + xs.shape[1:], xs.dtype), STATE_NAMES)
  first_stage = (stage_ids == 0).reshape((stages,) + (1,) * (xs.ndim - 1))

  def iteration(carry, t):
    buffer, state = carry
    waiting = jax.lax.dynamic_index_in_dim(buffer, t % micro, axis=1, keepdims=False)
    out = compute(stacked, jnp.where(first_stage, waiting, state), t)
    rotated = constrain(jnp.roll(out, 1, axis=0), STATE_NAMES)
    # What reaches stage 0 now is the last stage's output for visit t - S + 1.
    slot = jnp.where(t >= stages - 1, (t - stages + 1) % micro, micro)
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, rotated, slot, axis=1)
    return (buffer, rotated), None

  (buffer, _), _ = jax.lax.scan(iteration, (buffer, state), jnp.arange(pipe.iterations))
  return buffer[0, :micro]


def pass_sums(model_config, pipe, params, micro, keys, deterministic, sums_fn):
  """One pipeline pass: `micro` ({feature: [M, b, L]}) through GPT's embedding,
  the pipelined periods and GPT's head; returns the sum over the microbatches
  of `sums_fn(logits, microbatch)` (a tuple of scalars). keys [M]: each
  microbatch's dropout key (None when deterministic)."""
  outer = {k: v for k, v in params.items() if k != "layers"}

  def embed(tokens, positions, segments, key):
    rngs = None if deterministic else {"dropout": key}
    return gpt.GPT(model_config, part="embed").apply(
        {"params": outer}, tokens, positions=positions, segment_ids=segments,
        deterministic=deterministic, rngs=rngs)
  xs = jax.vmap(embed)(micro["decoder_input_tokens"], micro["decoder_positions"],
                       micro["decoder_segment_ids"], keys)
  ys = run_stages(model_config, pipe, params["layers"], xs, micro["decoder_segment_ids"],
                  None if deterministic else period_keys(keys, model_config.num_periods),
                  deterministic)

  @jax.checkpoint  # one microbatch's logits at a time, recomputed for the backward pass
  def head(y, batch):
    logits = gpt.GPT(model_config, part="head").apply(
        {"params": outer}, batch["decoder_input_tokens"], hidden=y)
    return sums_fn(logits, batch)
  _, sums = jax.lax.scan(lambda _, xs: (None, head(*xs)), None, (ys, micro))
  return jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)
