"""`paxgpt plan`: the train step compiled for a mesh on abstract inputs, its
per-device memory checked against arithmetic on the sharded shapes."""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from paxgpt.model import accounting
from paxgpt.model import gpt
from paxgpt.training import plan
from paxgpt.cli import commands
from paxgpt.errors import UsageError
from paxgpt.model import sharding
from paxgpt.model.sharding import MeshError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed "
                                  "(pip install 'jax[tpu]'); TPU compilation needs it")


@pytest.fixture
def model_gin():
  def parse(name):
    gin.clear_config()
    gin.parse_config_file(os.path.join(ROOT, "gin", "models", f"{name}.gin"))
  yield parse
  gin.clear_config()


def _args(**kwargs):
  defaults = dict(mesh=None, batch=None, chip=None, topology=None, json=True, remat="full",
                  mfu=0.4, seq_len=None, flops="analytic", num_slices=1, dcn=None,
                  microbatches=None)
  return argparse.Namespace(**{**defaults, **kwargs})


def _batch_bytes_per_device(batch, seq_len, batch_shards):
  return 5 * (batch // batch_shards) * seq_len * 4  # five int32 features


def test_gpt3_xl_on_8_fake_devices(model_gin, capsys):
  model_gin("gpt3_xl")
  assert commands.plan(_args(mesh="data:1,fsdp:4,tensor:2", batch=8)) == 0
  report = json.loads(capsys.readouterr().out)
  config = gpt.GPTConfig()
  variables = gpt.abstract_variables(config)
  params, non_embedding = accounting.param_counts(variables)
  mesh = {"data": 1, "fsdp": 4, "tensor": 2}
  expected_params, _ = accounting.bytes_per_device(variables, mesh)
  assert report["mesh"] == mesh and report["devices"] == 8 and report["compiler"] == "cpu"
  assert report["remat_policy"] == "full" and report["params"] == params
  # Parameters: arithmetic on the logical specs; Adam keeps two float32 moments each.
  assert report["param_bytes_per_device"] == expected_params
  assert report["optimizer_bytes_per_device"] == pytest.approx(2 * expected_params, rel=1e-6)
  assert (report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
          == pytest.approx(params * 12 / 8, rel=0.05))
  # The compiler's own argument size: the state shards, the batch shard, the step.
  state = report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
  expected_arguments = state + _batch_bytes_per_device(8, 2048, 4)
  assert report["argument_bytes_per_device"] == pytest.approx(expected_arguments, rel=1e-4)
  assert report["alias_bytes_per_device"] == pytest.approx(state, rel=1e-4)  # donated
  # Temporaries hold at least the float32 gradients (the parameters' shards).
  assert expected_params <= report["temp_bytes_per_device"] < 40 * 2**30
  assert report["fits"] is True and report["chip"] == "v5p"
  flops = accounting.flops_per_token(config, non_embedding, 2048) * 8 * 2048
  assert report["flops_per_step"] == pytest.approx(flops)
  assert report["step_time_s"] == pytest.approx(flops / (459e12 * 8 * 0.4))
  text = plan.format_report(report)
  assert f"{report['param_bytes_per_device'] / 2**20:8.2f} MiB per device" in text
  assert "v5p HBM 88.48 GiB: fits" in text
  assert f"step time at 40% MFU: {report['step_time_s']:.3f} s" in text


def test_gpt3_175b_on_256_fake_devices_matches_12_bytes_per_param():
  """The issue's figure: fsdp 64 x tensor 4, batch 256 x 2048, full remat, through the
  CLI in a fresh process (256 fake CPU devices)."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  # XLA reads a blank XLA_FLAGS as a file name: drop the variable when empty.
  flags = env.pop("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  if flags.strip():
    env["XLA_FLAGS"] = flags.strip()
  result = subprocess.run(
      [sys.executable, "-m", "paxgpt.cli", "plan", "--gin_file=gin/models/gpt3_175b.gin",
       "--mesh=data:1,fsdp:64,tensor:4", "--batch=256", "--chip=v5p", "--json",
       "--flops=analytic"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 256 and report["batch"] == 256 and report["seq_len"] == 2048
  state = report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
  assert state == pytest.approx(175e9 * 12 / 256, rel=0.10)
  assert report["argument_bytes_per_device"] == pytest.approx(
      state + _batch_bytes_per_device(256, 2048, 64), rel=1e-4)
  assert report["temp_bytes_per_device"] >= report["param_bytes_per_device"]  # the gradients
  assert report["fits"] == (report["total_bytes_per_device"] <= 95e9)


def test_default_batch_is_gpt3s_in_whole_shards(model_gin):
  model_gin("gpt3_175b")  # BATCH_TOKENS = 3.2M tokens = 1568 sequences of 2048
  assert plan._default_batch(64, 2048) == 1536
  assert plan._default_batch(1, 2048) == 1568
  gin.clear_config()
  assert plan._default_batch(8, 2048) == 8  # no macro: one sequence per batch shard


@pytest.mark.parametrize("chip, topology, expected", [
    (None, "v5p:4x8x8", ("v5p", "4x8x8")), ("v4", "4x4x8", ("v4", "4x4x8")),
    ("v5e", "v5e:16x16", ("v5e", "16x16"))])
def test_parse_topology(chip, topology, expected):
  assert plan.parse_topology(chip, topology) == expected


@pytest.mark.parametrize("chip, topology, message", [
    (None, "4x4x8", "say which chip"), ("v4", "v5p:2x2x2", "names chip v5p but --chip=v4"),
    ("h100", "2x2", "--topology is for TPU chips"), ("v5p", "4x4x", "expected e.g. 4x4x8")])
def test_parse_topology_rejects_bad_input(chip, topology, message):
  with pytest.raises(UsageError, match=message):
    plan.parse_topology(chip, topology)


def test_bad_batch_and_mesh_are_usage_errors(model_gin):
  model_gin("gpt3_tiny")
  with pytest.raises(UsageError, match=r"--batch=6 is not divisible by data x fsdp = 4"):
    commands.plan(_args(mesh="data:1,fsdp:4,tensor:2", batch=6))
  with pytest.raises(MeshError, match=r"num_heads=4 is not divisible by the tensor mesh axis "
                                      r"size 8"):
    commands.plan(_args(mesh="data:1,fsdp:1,tensor:8", batch=8))
  with pytest.raises(UsageError, match=r"--chip=a100: expected one of"):
    commands.plan(_args(mesh="data:1,fsdp:8,tensor:1", chip="a100"))


@needs_libtpu
def test_topology_and_mesh_of_different_sizes_name_both_counts(model_gin):
  model_gin("gpt3_tiny")
  with pytest.raises(MeshError, match=r"mesh data:1,fsdp:4,tensor:1 needs 4 devices but "
                                      r"there are 8"):
    commands.plan(_args(mesh="data:1,fsdp:4,tensor:1", topology="v5p:2x2x2", batch=8))


@pytest.mark.tpu_compile
@needs_libtpu
def test_gpt3_small_train_step_compiles_for_v5p_2x2x2_with_pallas_attention(model_gin):
  """The whole sharded train step, Mosaic attention kernels under shard_map, compiled
  by the real TPU compiler for 8 v5p chips; its per-chip memory is below HBM."""
  model_gin("gpt3_small")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  devices = plan.topology_devices("v5p", "2x2x2")
  assert len(devices) == 8 and "v5" in devices[0].device_kind.lower()
  config = dataclasses.replace(gpt.GPTConfig(), attention_backend="tpu", remat_policy="full")
  mesh = {"data": 1, "fsdp": 4, "tensor": 2}
  # Low optimisation effort where JAX still has the option (jax 0.10; gone in 0.12):
  # the same program and memory plan, a third of the compile time (the figures in
  # the README come from the full-effort CLI).
  low_effort = ({"exec_time_optimization_effort": -1.0}
                if hasattr(jax.config, "jax_exec_time_optimization_effort") else None)
  compiled, params, opt_state = plan.compile_train_step(config, devices, mesh, 8, 1024,
                                                        low_effort)
  hlo = compiled.as_text()
  assert "tpu_custom_call" in hlo  # the Pallas kernels, not the reference attention
  report = plan.plan_figures(compiled, params, opt_state, config, devices, mesh, 8, 1024, "v5p")
  expected_params, _ = accounting.bytes_per_device(gpt.abstract_variables(config), mesh)
  assert report["compiler"] == "tpu"
  assert report["param_bytes_per_device"] == expected_params
  # The TPU compiler's argument bytes: the state and batch shards padded to TPU tiles
  # (small bias and LayerNorm vectors round up to (8, 128) tiles).
  state = report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
  unpadded = state + _batch_bytes_per_device(8, 1024, 4)
  assert unpadded <= report["argument_bytes_per_device"] < 1.1 * unpadded
  assert report["temp_bytes_per_device"] >= report["param_bytes_per_device"]  # the gradients
  assert report["total_bytes_per_device"] < accounting.CHIPS["v5p"]["hbm_bytes"]
  assert report["fits"] is True
  assert math.isclose(report["hbm_bytes_per_device"], 95e9)


def test_a_step_the_tpu_compiler_refuses_is_reported_as_not_fitting(model_gin):
  """libtpu does not compile a program whose temporaries exceed HBM; the plan
  reports the state from the shardings and the temporaries from its message."""
  model_gin("gpt3_tiny")
  config = dataclasses.replace(gpt.GPTConfig(), attention_backend="reference")
  mesh = {"data": 1, "fsdp": 4, "tensor": 2}
  devices = jax.devices()[:8]
  _, params, opt_state = plan.lower_train_step(config, devices, mesh, 8, 128)
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (23.36G) exceeds available HBM (15.75G).\nmore detail")
  report = plan._out_of_memory_figures(message, params, opt_state, config, devices, mesh, 8,
                                       128, "v5e", 0.4)
  expected_params, _ = accounting.bytes_per_device(gpt.abstract_variables(config), mesh)
  assert report["param_bytes_per_device"] == expected_params
  assert report["temp_bytes_per_device"] == int(23.36 * 2**30)
  state = report["param_bytes_per_device"] + report["optimizer_bytes_per_device"]
  assert report["total_bytes_per_device"] == state + 5 * 4 * 2 * 128 + int(23.36 * 2**30)
  assert report["fits"] is False and report["compiler_error"] == message.splitlines()[0]
  assert "the compiler refused it: RESOURCE_EXHAUSTED" in plan.format_report(report)
  # The other form names everything the program needs.
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. "
             "Ran out of memory in memory space hbm. Used 17.85G of 15.75G hbm. Exceeded hbm "
             "capacity by 2.10G.")
  report = plan._out_of_memory_figures(message, params, opt_state, config, devices, mesh, 8,
                                       128, "v5e", 0.4)
  assert report["total_bytes_per_device"] == int(17.85 * 2**30)
  assert report["fits"] is False


@pytest.mark.tpu_compile
@needs_libtpu
@pytest.mark.parametrize("dtype, microbatches", [("float32", 1), ("bfloat16", 2)])
def test_two_slices_send_each_microbatchs_gradients_over_dcn(dtype, microbatches):
  """2 x v5e 2x2 with data parallelism across the slices (the default), compiled
  by the TPU compiler: what each chip sends over DCN per step is its shard of
  the gradients in the compute dtype, once per microbatch (XLA reduces them
  inside the accumulation loop). A model whose shards fill whole (8, 128) tiles
  makes the count exact."""
  devices = plan.topology_devices("v5e", "2x2", num_slices=2)
  mesh = sharding.mesh_from_flag("data:1,fsdp:4,tensor:1", devices)
  config = gpt.GPTConfig(vocab_size=259, num_layers=16, d_model=1024, num_heads=8,
                         head_dim=128, max_len=128, dtype=dtype, attention_backend="tpu",
                         remat_policy="full")
  report = plan.compile_plan(config, devices, dict(mesh.shape), 16, 128, "v5e",
                             compiler_options={"exec_time_optimization_effort": -1.0},
                             count_flops=False, mesh=mesh, microbatches=microbatches)
  assert report["num_slices"] == 2 and report["dcn"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert set(report["dcn_transfers"]) == {"ALL_REDUCE"}
  # Every parameter is split over fsdp but the biases of heads (the tensor axis, 1 here).
  shard = (report["param_bytes_per_device"] / 4 * np.dtype(jax.numpy.dtype(dtype)).itemsize)
  assert report["dcn_bytes_per_step"] == pytest.approx(microbatches * shard, rel=0.01)
  assert report["dcn_loops_without_trip_count"] == 0
  assert "slices                2 (axes over DCN: data:2)" in plan.format_report(report)


def test_compiled_flops_count_every_layer_of_a_scanned_model(model_gin):
  """cost_analysis counts a scan's body once, so the plan counts FLOPs on unrolled
  1- and 2-period steps. For gpt3_small (6 periods, scanned) that count equals the
  compiler's own count of the whole model unrolled within 1%, while the scanned
  program's raw count sees about one period."""
  model_gin("gpt3_small")
  config = dataclasses.replace(gpt.GPTConfig(), attention_backend="reference",
                               remat_policy="full")
  mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  devices, batch, seq_len = jax.devices()[:8], 8, 256
  report = plan.compile_plan(config, devices, mesh, batch, seq_len, "v5p")
  assert config.scan_layers and report["num_periods"] == 6

  def count(cfg):
    lowered, _, _ = plan.lower_train_step(cfg, devices, mesh, batch, seq_len,
                                          microbatches=1)
    return plan.program_flops(lowered.compile(), len(devices))
  unrolled = count(dataclasses.replace(config, scan_layers=False))
  assert report["flops_per_step_compiled"] == pytest.approx(unrolled, rel=0.01)
  scanned_raw = count(config)
  assert scanned_raw < 0.4 * unrolled  # the scan's body counted once
  outside, per_period = (report["flops_outside_periods_compiled"],
                         report["flops_per_period_compiled"])
  assert scanned_raw == pytest.approx(outside + per_period, rel=0.05)
  # Against the analytic count: full remat recomputes most of a forward pass (2N of
  # the 6N per weight), and the output projection onto the vocabulary is never
  # recomputed, so the ratio lies between 1 and 4/3.
  assert report["flops_per_step"] == pytest.approx(
      accounting.flops_per_token(config, accounting.param_counts(
          gpt.abstract_variables(config))[1], seq_len) * batch * seq_len)
  ratio = report["flops_compiled_over_analytic"]
  assert ratio == pytest.approx(report["flops_per_step_compiled"] / report["flops_per_step"])
  assert 1.0 < ratio < 4 / 3
  assert "compiled" in plan.format_report(report)
