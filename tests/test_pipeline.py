"""Pipeline stages (paxgpt/model/pipeline.py): the schedule's bubble, the
unpipelined model's losses and gradients (dropout included) through 2 and 4
stages with a circular schedule, checkpoints in the unpipelined layout that
the sampler reads, and the bad inputs."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_train_state, tiny
from paxgpt.errors import UsageError
from paxgpt.model import gpt
from paxgpt.model import pipeline
from paxgpt.model import sharding
from paxgpt.training import optim
from paxgpt.training import train_step

OPTIMIZER, SCHEDULE = optim.make_optimizer(
    optim.OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=1, decay_steps=30))
# 8 layers = 4 periods: 2 stages x 2 repeats of one period each; 16 layers = 8
# periods: 4 stages x 2 repeats, or 2 stages x 2 repeats of two periods each.
EIGHT = tiny(num_layers=8, dropout_rate=0.1, remat_policy="full")
SIXTEEN = tiny(num_layers=16, dropout_rate=0.1, remat_policy="full")


def _batch(rows, length=32, seed=0):
  """Two packed documents per row and a padded tail."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, 259, (rows, length))
  split = length // 3
  segments = np.where(np.arange(length) < split, 1, 2)[None].repeat(rows, 0)
  positions = np.where(np.arange(length) < split, np.arange(length),
                       np.arange(length) - split)[None].repeat(rows, 0)
  inputs = np.roll(targets, 1, axis=1)
  inputs[positions == 0] = 1
  real = np.arange(length)[None] < (length - rng.integers(0, length // 4, rows))[:, None]
  batch = {"decoder_target_tokens": targets * real, "decoder_input_tokens": inputs * real,
           "decoder_loss_weights": real, "decoder_segment_ids": segments * real,
           "decoder_positions": positions * real}
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def _partitioners(stages):
  flat = sharding.Partitioner(sharding.make_mesh(fsdp=8))
  staged = sharding.Partitioner(sharding.make_mesh(stage=stages, fsdp=8 // stages))
  return flat, staged


def _pipelined_state(state, layout):
  return train_step.TrainState(layout.run("params", state.params),
                               layout.run("opt_state", state.opt_state), state.step)


@pytest.mark.parametrize("stages, repeats, micro", [(1, 1, 1), (2, 1, 1), (2, 2, 4), (4, 2, 8),
                                                    (4, 3, 5), (8, 1, 16)])
def test_bubble_is_the_circular_schedules_formula(stages, repeats, micro):
  pipe = pipeline.Pipeline(stages, repeats, micro)
  schedule = pipe.schedule()
  assert schedule.shape == (repeats * micro + stages - 1, stages)
  for s in range(stages):  # each stage makes every visit once, in order
    visits = schedule[:, s][schedule[:, s] >= 0]
    assert visits.tolist() == list(range(repeats * micro))
  # Visit v = r*M + m of stage s feeds stage s + 1 one iteration later, and the
  # last stage's output of repeat r reaches stage 0 before its repeat r + 1.
  done = {(s, int(v)): t for t, row in enumerate(schedule) for s, v in enumerate(row) if v >= 0}
  for (s, v), t in done.items():
    if s + 1 < stages:
      assert done[s + 1, v] == t + 1
    elif v + micro < repeats * micro:
      assert done[0, v + micro] > t
  assert pipe.bubble == pytest.approx((stages - 1) / (repeats * micro + stages - 1))


def test_plan_reports_the_bubble_and_the_loop_runs_that_many_iterations():
  import gin
  from paxgpt.training import plan
  mesh = sharding.make_mesh(stage=2, fsdp=4)
  config = dataclasses.replace(EIGHT, attention_backend="reference")
  gin.bind_parameter("PipelineConfig.repeats", 2)
  try:
    report = plan.compile_plan(config, jax.devices(), dict(mesh.shape), 16, 32, "v5p",
                               mesh=mesh, microbatches=4)
  finally:
    gin.clear_config()
  assert report["pipeline"] == {"stages": 2, "repeats": 2, "microbatches": 4,
                                "iterations": 9, "bubble": pytest.approx(1 / 9)}
  assert report["microbatches"] == 4 and report["mesh"]["stage"] == 2
  # The step time at the stated MFU counts the bubble as idle.
  compute = report["flops_per_step"] / (459e12 * 8 * 0.4)
  assert report["step_time_s"] == pytest.approx(compute / (1 - 1 / 9))
  # The loop itself: one scan of R*M + S - 1 iterations around the stages.
  pipe = pipeline.Pipeline(2, 2, 4)
  stacked = pipeline.to_stages(nn.unbox(gpt.abstract_variables(config)["params"]),
                               pipe)["layers"]
  xs = jax.ShapeDtypeStruct((4, 4, 32, config.d_model), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda w, x: pipeline.run_stages(config, pipe, w, x))(stacked, xs)
  lengths = [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert lengths == [9]


def _microbatch_grads(config, partitioner, params, batch, count, rng):
  """Unpipelined: the summed loss and gradients of `count` microbatches, as the
  train step accumulates them."""
  apply = train_step._model_fn(config, False)
  micro = train_step._split_microbatches(batch, count, partitioner)
  keys = train_step._microbatch_keys(rng, count)
  total = None
  for i in range(count):
    mb = jax.tree.map(lambda x: x[i], micro)
    grads, sums = train_step._sum_loss_and_grads(apply, params, mb, keys[i], 0.0)
    total = (grads, sums) if total is None else jax.tree.map(jnp.add, total, (grads, sums))
  return total


@pytest.mark.parametrize("config, stages, micro", [(EIGHT, 2, 4), (SIXTEEN, 4, 8),
                                                   (SIXTEEN, 2, 4)])
def test_pipelined_loss_and_gradients_are_the_unpipelined_ones(config, stages, micro):
  flat, staged = _partitioners(stages)
  pipe = pipeline.check(pipeline.Pipeline(stages, 2, micro), config, micro)
  state = init_train_state(config, OPTIMIZER, flat)
  layout = train_step.StateLayout(config, OPTIMIZER, staged, pipe)
  batch = _batch(8 * micro)
  rng = jax.random.key(3)
  with flat.activate():
    want_grads, want = jax.jit(_microbatch_grads, static_argnums=(0, 1, 4))(
        config, flat, state.params, batch, micro, rng)

  def pipelined(params, batch):
    micro_batch = train_step._split_microbatches(batch, micro, staged)
    keys = train_step._microbatch_keys(rng, micro)
    grads, sums = train_step._pass_loss_and_grads(config, pipe, False, params, micro_batch,
                                                  keys, 0.0)
    return pipeline.from_stages(grads), sums
  with staged.activate():
    got_grads, got = jax.jit(pipelined)(layout.run("params", state.params), batch)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  assert float(want[1]) == float(jnp.sum(batch["decoder_loss_weights"]))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                          jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6 * float(want[1]),
                               rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  # Without dropout the masks differ: the gradients would too (dropout is exercised).
  assert float(jnp.abs(want[0] - _microbatch_grads(
      dataclasses.replace(config, dropout_rate=0.0), flat, state.params, batch, micro,
      rng)[1][0])) > 1.0


@pytest.mark.slow
def test_twenty_steps_of_losses_match_within_float32():
  flat, staged = _partitioners(2)
  pipe = pipeline.check(pipeline.Pipeline(2, 2, 4), EIGHT, 8)  # 2 passes of 4
  layout = train_step.StateLayout(EIGHT, OPTIMIZER, staged, pipe)
  state = init_train_state(EIGHT, OPTIMIZER, flat)
  pstate = _pipelined_state(state, layout)
  plain = train_step.make_train_step(EIGHT, OPTIMIZER, flat, num_microbatches=8,
                                     schedule=SCHEDULE)
  piped = train_step.make_train_step(EIGHT, OPTIMIZER, staged, num_microbatches=8,
                                     schedule=SCHEDULE, pipeline=pipe)
  want, got = [], []
  for step in range(20):
    batch = _batch(16, seed=step % 5)
    state, m = plain(state, batch)
    pstate, pm = piped(pstate, batch)
    want.append(float(m["loss"]))
    got.append(float(pm["loss"]))
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert want[-1] < want[0] - 0.5  # it learned something
  for a, b in zip(jax.tree.leaves(layout.stored("params", pstate.params)),
                  jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def test_layouts_round_trip_exactly_and_name_the_stage_axis():
  pipe = pipeline.Pipeline(2, 2, 4)
  boxed = train_step.abstract_train_state(EIGHT, OPTIMIZER, pipe)
  kernel = boxed.params["layers"]["0_dense"]["mlp"]["wi"]["kernel"]
  assert kernel.value.shape == (2, 2, 1, 64, 256)
  assert kernel.names == ("layer_repeats", "stage", "layers", "embed", "mlp")
  mu = boxed.opt_state[0][0].mu["layers"]["0_dense"]["mlp"]["wi"]["kernel"]
  assert mu.value.shape == (2, 2, 1, 64, 256)
  _, staged = _partitioners(2)
  spec = staged.tree_shardings(boxed).params["layers"]["0_dense"]["mlp"]["wi"]["kernel"].spec
  assert tuple(spec) == (None, "stage", None, "fsdp", None)
  params = jax.tree.map(lambda b: jnp.arange(b.value.size, dtype=jnp.float32).reshape(
      b.value.shape), train_step.abstract_train_state(EIGHT, OPTIMIZER).params,
      is_leaf=lambda b: hasattr(b, "names"))
  staged_params = pipeline.to_stages(params, pipe)
  # Chunk r*S + s holds periods (r*S + s)*c ...: period 1 is repeat 0 of stage 1.
  w = params["layers"]["1_banded"]["attention"]["query_kernel"]
  np.testing.assert_array_equal(
      staged_params["layers"]["1_banded"]["attention"]["query_kernel"][0, 1, 0], w[1])
  np.testing.assert_array_equal(
      staged_params["layers"]["1_banded"]["attention"]["query_kernel"][1, 0, 0], w[2])
  back = pipeline.from_stages(staged_params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pipe, config, micro, message", [
    (pipeline.Pipeline(4, 1, 4), tiny(num_layers=6), 4,
     "GPTConfig.num_layers=6 makes 3 layer periods of 2, which 4 stages x 1 repeats"),
    (pipeline.Pipeline(2, 2, 4), tiny(num_layers=4), 4,
     "makes 2 layer periods of 2, which 2 stages x 2 repeats"),
    (pipeline.Pipeline(2, 1, 3), EIGHT, 4,
     "TrainConfig.num_microbatches=4 is not a multiple of PipelineConfig.microbatches=3"),
    (pipeline.Pipeline(4, 2, 2), SIXTEEN, 4, "at least as many microbatches per pass as "
                                             "stages: 2 < 4"),
    (pipeline.Pipeline(2, 1, 4), tiny(num_layers=8, scan_layers=False), 4,
     "GPTConfig.scan_layers=True"),
])
def test_bad_pipelines_are_usage_errors(pipe, config, micro, message):
  with pytest.raises(UsageError, match=message):
    pipeline.check(pipe, config, micro)


def test_pipeline_config_rejects_nonsense():
  from paxgpt.errors import ConfigError
  with pytest.raises(ConfigError, match="PipelineConfig.repeats=0"):
    pipeline.PipelineConfig(repeats=0)
  with pytest.raises(ConfigError, match="PipelineConfig.microbatches=0"):
    pipeline.PipelineConfig(microbatches=0)
  assert pipeline.make(sharding.make_mesh(fsdp=8), EIGHT, 4) is None  # no stage axis
  pipe = pipeline.make(sharding.make_mesh(stage=2, fsdp=4), EIGHT, 8,
                       pipeline.PipelineConfig(repeats=2, microbatches=4))
  assert pipe == pipeline.Pipeline(2, 2, 4)
