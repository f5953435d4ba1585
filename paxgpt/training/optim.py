"""The GPT-3 optimizer (Brown et al. 2020, Appendix B) with optax.

Adam (b1 0.9, b2 0.95, eps 1e-8), gradients clipped to global norm 1.0,
decoupled weight decay 0.1 on the weight matrices only (not on biases,
LayerNorm or embeddings), a linear warmup then a cosine decay to 10% of the
peak learning rate (held there afterwards), and optionally GPT-3's batch-size
ramp. Peak learning rates of Table 2.1 live in gin/models as
PEAK_LEARNING_RATE.
"""
from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import optax

from paxgpt.config.checks import check_types
from paxgpt.errors import ConfigError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """GPT-3's recipe; steps count optimizer updates.

  decay_steps: the step at which the cosine reaches final_fraction * peak
    (None: the run's number of steps). GPT-3 decays over 260B tokens and
    warms up over 375M tokens; divide by the batch in tokens for steps.
  warmup_tokens / decay_tokens: the same in tokens (GPT-3: 375e6 and 260e9);
    when set they override the step counts, divided by the batch in tokens.
  batch_ramp_steps / batch_ramp_start: GPT-3's batch-size ramp: the batch grows
    linearly from `batch_ramp_start` of the full batch to all of it over the
    first `batch_ramp_steps` steps (0: no ramp). See `batch_ramp_units`.
  """
  peak_learning_rate: float = 6e-4
  warmup_steps: int = 0
  decay_steps: int | None = None
  final_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  weight_decay: float = 0.1
  warmup_tokens: float | None = None
  decay_tokens: float | None = None
  batch_ramp_steps: int = 0
  batch_ramp_start: float = 1 / 16

  def __post_init__(self):
    check_types(self)
    if not self.peak_learning_rate > 0:
      raise ConfigError(f"OptimizerConfig.peak_learning_rate={self.peak_learning_rate} "
                        f"must be positive")
    if self.warmup_steps < 0 or self.batch_ramp_steps < 0:
      raise ConfigError(f"OptimizerConfig: warmup_steps={self.warmup_steps} and "
                        f"batch_ramp_steps={self.batch_ramp_steps} must be >= 0")
    if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
      raise ConfigError(f"OptimizerConfig.decay_steps={self.decay_steps} is before the end "
                        f"of warmup ({self.warmup_steps})")
    if not 0 <= self.final_fraction <= 1:
      raise ConfigError(f"OptimizerConfig.final_fraction={self.final_fraction} must be in "
                        f"[0, 1]")
    if not 0 < self.batch_ramp_start <= 1:
      raise ConfigError(f"OptimizerConfig.batch_ramp_start={self.batch_ramp_start} must be "
                        f"in (0, 1]")


def in_steps(config: OptimizerConfig, tokens_per_step: int | None) -> OptimizerConfig:
  """`config` with warmup_tokens / decay_tokens turned into step counts."""
  changes = {}
  for tokens, steps in (("warmup_tokens", "warmup_steps"), ("decay_tokens", "decay_steps")):
    value = getattr(config, tokens)
    if value is not None:
      if not tokens_per_step:
        raise ConfigError(f"OptimizerConfig.{tokens} needs the batch size in tokens")
      changes[steps] = int(round(value / tokens_per_step))
      changes[tokens] = None
  if "decay_steps" in changes:
    changes["decay_steps"] = max(changes["decay_steps"],
                                 changes.get("warmup_steps", config.warmup_steps))
  return dataclasses.replace(config, **changes) if changes else config


def learning_rate_schedule(config: OptimizerConfig, total_steps: int | None = None):
  """step (0-based update index) -> learning rate.

  Warmup: peak * (step + 1) / warmup_steps, so the first update already moves.
  Then cosine from peak at `warmup_steps` to final_fraction * peak at
  `decay_steps`, constant afterwards.
  """
  peak = config.peak_learning_rate
  warmup = config.warmup_steps
  decay = config.decay_steps if config.decay_steps is not None else total_steps
  if decay is None:
    raise ValueError("OptimizerConfig.decay_steps is unset and no run length was given")
  decay = max(decay, warmup)
  final = config.final_fraction

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    progress = jnp.clip((step - warmup) / max(decay - warmup, 1), 0.0, 1.0)
    cosine = peak * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return jnp.where(step < warmup, warm, cosine)
  return schedule


def _path_names(path):
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def is_decayed(names) -> bool:
  """Weight decay applies to weight matrices: kernels ('wi/kernel',
  'query_kernel', ...). Biases, LayerNorm scales and biases, and the token and
  position embeddings are left alone, as in GPT-3."""
  return bool(names) and (names[-1] == "kernel" or names[-1].endswith("_kernel"))


def weight_decay_mask(params):
  """A tree like `params` (boxed or not) of bools: True where decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(_path_names(path)),
                                          params)


def make_optimizer(config: OptimizerConfig, total_steps: int | None = None,
                   tokens_per_step: int | None = None):
  """(optax chain, schedule): the GPT-3 AdamW chain. The learning rate is
  `learning_rate_schedule`; the decay is decoupled from Adam and scaled by the
  learning rate (AdamW)."""
  config = in_steps(config, tokens_per_step)
  schedule = learning_rate_schedule(config, total_steps)
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(schedule),
  ), schedule


def batch_ramp_units(config: OptimizerConfig, step: int, full_units: int) -> int:
  """How many of the `full_units` data batches the update at `step` averages.

  GPT-3 grows the batch linearly from a small value to the full one over the
  first tokens of training. Here the full batch is `full_units` batches of the
  data pipeline; the ramp starts at ceil(batch_ramp_start * full_units) and
  reaches full_units at `batch_ramp_steps`. Each distinct value compiles the
  train step once.
  """
  if full_units < 1:
    raise ValueError(f"full_units={full_units} must be >= 1")
  if config.batch_ramp_steps == 0 or step >= config.batch_ramp_steps:
    return full_units
  start = max(1, math.ceil(config.batch_ramp_start * full_units))
  frac = step / config.batch_ramp_steps
  return min(full_units, max(start, math.floor(start + frac * (full_units - start) + 1e-9)))
