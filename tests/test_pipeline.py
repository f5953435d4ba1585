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
  """fsdp 2 alone, and stages x fsdp 2 (the first 2 * stages devices)."""
  devices = jax.devices()
  flat = sharding.Partitioner(sharding.make_mesh(fsdp=2, devices=devices[:2]))
  staged = sharding.Partitioner(sharding.make_mesh(stage=stages, fsdp=2,
                                                   devices=devices[:2 * stages]))
  return flat, staged


def _states(config, optimizer, stages, pipe):
  """The same fresh state on fsdp 2 and, in the pipelined layout, on stages x fsdp 2."""
  flat, staged = _partitioners(stages)
  layout = train_step.StateLayout(config, optimizer, staged, pipe)
  plain = init_train_state(config, optimizer, staged)  # unpipelined layout on the staged mesh
  piped = train_step.TrainState(layout.run("params", plain.params),
                                layout.run("opt_state", plain.opt_state), plain.step)
  return (flat, init_train_state(config, optimizer, flat)), (staged, piped), layout


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


@pytest.mark.parametrize("config, stages, repeats, micro", [
    (EIGHT, 2, 2, 4), (SIXTEEN, 4, 2, 8), (EIGHT, 2, 1, 2)])
def test_pipelined_loss_and_gradients_are_the_unpipelined_ones(config, stages, repeats, micro):
  """One step of plain gradient descent (lr 1) through each: the parameters'
  change is the gradient. 2 stages x 2 repeats of one period, 4 x 2 of one,
  2 x 1 of two periods each; dropout on."""
  import optax
  sgd = optax.sgd(1.0)
  pipe = pipeline.check(pipeline.Pipeline(stages, repeats, micro), config, micro)
  (flat, state), (staged, piped_state), layout = _states(config, sgd, stages, pipe)
  start = jax.device_get(state.params)
  batch = _batch(2 * micro)
  plain = train_step.make_train_step(config, sgd, flat, num_microbatches=micro, seed=3)
  piped = train_step.make_train_step(config, sgd, staged, num_microbatches=micro, seed=3,
                                     pipeline=pipe)
  new, want = plain(state, batch)
  new_piped, got = piped(piped_state, batch)
  assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
  assert float(got["tokens"]) == float(want["tokens"]) == float(
      jnp.sum(batch["decoder_loss_weights"]))
  assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=1e-5)
  for (path, a), b, s0 in zip(jax.tree_util.tree_leaves_with_path(
      jax.device_get(layout.stored("params", new_piped.params))),
      jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(start)):
    np.testing.assert_allclose(s0 - a, s0 - b, rtol=1e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # The dropout masks are in play: without them the loss is another.
  deterministic = train_step.make_train_step(
      dataclasses.replace(config, dropout_rate=0.0), sgd, flat, num_microbatches=micro,
      seed=3)(init_train_state(config, sgd, flat), batch)[1]
  assert abs(float(deterministic["loss"]) - float(want["loss"])) > 1e-4


@pytest.mark.slow
def test_twenty_steps_of_losses_match_within_float32():
  pipe = pipeline.check(pipeline.Pipeline(2, 2, 4), EIGHT, 8)  # 2 passes of 4
  (flat, state), (staged, pstate), layout = _states(EIGHT, OPTIMIZER, 2, pipe)
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
  assert want[-1] < want[0] - 0.1  # it learned something
  for a, b in zip(jax.tree.leaves(jax.device_get(layout.stored("params", pstate.params))),
                  jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_layouts_round_trip_exactly_and_name_the_stage_axis():
  pipe = pipeline.Pipeline(2, 2, 4)
  boxed = train_step.abstract_train_state(EIGHT, OPTIMIZER, pipe)
  kernel = boxed.params["layers"]["0_dense"]["mlp"]["wi"]["kernel"]
  assert kernel.value.shape == (2, 2, 1, 64, 256)
  assert kernel.names == ("layer_repeats", "stage", "layers", "embed", "mlp")
  mu = boxed.opt_state[1].mu["layers"]["0_dense"]["mlp"]["wi"]["kernel"]
  assert mu.value.shape == (2, 2, 1, 64, 256)
  _, staged = _partitioners(2)
  spec = staged.tree_shardings(boxed).params["layers"]["0_dense"]["mlp"]["wi"]["kernel"].spec
  assert tuple(spec) == (None, "stage", None, "fsdp", "tensor")
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
     "GPTConfig.num_layers=6 makes 3 layer periods \\(2 layers each\\), which 4 stages x 1 "
     "repeats"),
    (pipeline.Pipeline(2, 2, 4), tiny(num_layers=4), 4,
     "makes 2 layer periods \\(2 layers each\\), which 2 stages x 2 repeats"),
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


# --- bad input through the CLI: one line, exit code 2 ------------------------

def _cli(capsys, *argv):
  import gin
  from paxgpt.cli import main
  gin.clear_config()
  try:
    code = main.main(list(argv))
  finally:
    gin.clear_config()
  return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--gin_file=gin/models/gpt3_tiny.gin", "--mesh=data:1,fsdp:4,tensor:1",
      "--dcn=data:2"],
     "--dcn data:2 needs 2 slices but there are 1 (slices: one per process)"),
    (["plan", "--gin_file=gin/models/gpt3_tiny.gin", "--mesh=stage:2,data:1,fsdp:4,tensor:1",
      "--batch=8"],
     "GPTConfig.num_layers=2 makes 1 layer periods (2 layers each), which 2 stages x 1 "
     "repeats (PipelineConfig.repeats) do not divide"),
    (["plan", "--gin_file=gin/models/gpt3_tiny.gin", "--mesh=data:1,fsdp:8,tensor:1",
      "--batch=8", "--microbatches=3"],
     "--batch=8 in 3 microbatches does not split evenly over the 8 batch shards"),
    (["plan", "--gin_file=gin/models/gpt3_tiny.gin", "--gin.GPTConfig.num_layers=8",
      "--mesh=stage:2,data:1,fsdp:4,tensor:1", "--batch=16", "--microbatches=4",
      "--gin.PipelineConfig.microbatches=3"],
     "TrainConfig.num_microbatches=4 is not a multiple of PipelineConfig.microbatches=3"),
    (["plan", "--gin_file=gin/models/gpt3_tiny.gin", "--microbatches=two"],
     "--microbatches=two: expected a positive count or auto"),
    (["plan", "--gin_file=gin/models/gpt3_tiny.gin", "--num_slices=2"],
     "--num_slices and --dcn need --topology (several TPU slices)"),
])
def test_bad_slices_stages_and_microbatches_are_one_line_and_exit_2(capsys, tmp_path, argv,
                                                                    message):
  if argv[0] == "train":
    argv = argv + [f"--gin.MODEL_DIR='{tmp_path}'"]
  code, err = _cli(capsys, *argv)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert lines[0] == f"paxgpt: error: {message}"


# --- the loop: checkpoints in the unpipelined layout -------------------------

LOOP_MODEL = tiny(num_layers=4, max_len=32, dropout_rate=0.1, remat_policy="full")


def _train(model_dir, mesh, num_steps):
  from paxgpt.data import loader
  from paxgpt.store import checkpoint
  from paxgpt.training import trainer
  return trainer.train(
      model_dir, mesh=mesh, model_config=LOOP_MODEL,
      data_config=loader.DataConfig(mixture_or_task="pydoc_topics", sequence_length=32,
                                    batch_size=4, eval_max_batches=1),
      optimizer_config=optim.OptimizerConfig(peak_learning_rate=3e-3, warmup_steps=1,
                                             decay_steps=8),
      train_config=trainer.TrainConfig(num_steps=num_steps, log_every=1, num_microbatches=4),
      checkpoint_config=checkpoint.CheckpointConfig(save_every_steps=3, async_save=False))


@pytest.mark.slow
def test_pipelined_checkpoints_are_unpipelined_ones_both_ways(tmp_path):
  """A pipelined run (2 stages of one period) and an unpipelined one train alike;
  the pipelined checkpoint holds the unpipelined layout, so the unpipelined
  sampler reads it and decodes the same tokens; and a pipelined run resumes
  from an unpipelined checkpoint."""
  import shutil
  from paxgpt.decoding import sampling
  from paxgpt.store import checkpoint
  from paxgpt.training import metrics
  from conftest import one_device
  staged = sharding.make_mesh(stage=2, fsdp=1, devices=jax.devices()[:2])
  flat = sharding.make_mesh(fsdp=1, devices=jax.devices()[2:3])
  _train(tmp_path / "piped", staged, 3)
  _train(tmp_path / "plain", flat, 3)
  losses = {name: [r["loss"] for r in metrics.read_metrics(tmp_path / name)]
            for name in ("piped", "plain")}
  np.testing.assert_allclose(losses["piped"], losses["plain"], rtol=1e-5)

  config = dataclasses.replace(LOOP_MODEL, dropout_rate=0.0)
  partitioner = one_device()
  abstract = partitioner.abstract(gpt.abstract_variables(config)["params"])
  restored = {name: checkpoint.restore_params(tmp_path / name, abstract) for name in losses}
  for a, b in zip(jax.tree.leaves(restored["piped"]), jax.tree.leaves(restored["plain"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  prompts = [[1, 72, 101, 108], [1, 87, 104]]
  tokens = {}
  for name, params in restored.items():
    decoder = sampling.Decoder(config, params, partitioner, eos_id=1)
    tokens[name], _ = decoder.sample(prompts, sampling.make_rows(2, temperature=0.0,
                                                                 max_tokens=12))
  assert tokens["piped"] == tokens["plain"] and all(len(t) for t in tokens["plain"])

  # Back: the unpipelined checkpoint resumes into the pipelined layout.
  shutil.copytree(tmp_path / "plain", tmp_path / "resumed")
  _train(tmp_path / "resumed", staged, 5)
  _train(tmp_path / "plain", flat, 5)
  resumed = {r["step"]: r["loss"] for r in metrics.read_metrics(tmp_path / "resumed")}
  plain = {r["step"]: r["loss"] for r in metrics.read_metrics(tmp_path / "plain")}
  assert resumed[4] == pytest.approx(plain[4], rel=1e-5)
  assert resumed[5] == pytest.approx(plain[5], rel=1e-5)


def test_info_counts_each_stages_share_of_the_periods():
  from paxgpt.model import accounting, info
  variables = gpt.abstract_variables(SIXTEEN)
  flat = {"data": 1, "fsdp": 2, "tensor": 1}
  layers = {"params": variables["params"]["layers"]}
  outer = {"params": {k: v for k, v in variables["params"].items() if k != "layers"}}
  layer_bytes, _ = accounting.bytes_per_device(layers, flat)
  outer_bytes, _ = accounting.bytes_per_device(outer, flat)
  staged = info.describe(SIXTEEN, {"stage": 4, **flat})
  assert staged["param_bytes_per_device"] == layer_bytes // 4 + outer_bytes
  assert info.describe(SIXTEEN, flat)["param_bytes_per_device"] == layer_bytes + outer_bytes
  assert info.mesh_axis_sizes("stage:4,fsdp:2", 8) == {"stage": 4, **flat}
