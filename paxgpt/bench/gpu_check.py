"""The GPU figures in one prepared run: `python -m paxgpt.bench.gpu_check [--smoke] [--json PATH]`.

  python -m paxgpt.bench.gpu_check [--smoke] [--json PATH] [--budget_s S]
      [--sections kernels,attention,train,decode,engine]

(`bash launch/gpu_check.sh` sets up a bare GPU box and calls this.) A driver,
not a fourth copy of the benchmarks: each section calls the code that owns
its figure.

  kernels    Triton forward and backward against the float32 reference, dense
             and banded, bf16 and f32, head dims 64/80/128, with and without
             segment ids (kernels.bench.check_against_reference).
  attention  dense causal and banded (W = 256) at 2k/4k/8k/16k tokens per
             sequence, head dims 64 and 128, bf16: forward and forward+backward
             TFLOP/s inside the mask for Pallas GPU, cuDNN and XLA (the pure-JAX
             reference), with ratios to cuDNN from the same run
             (kernels.bench.measure).
  tune       the Pallas GPU kernel's tile settings (block sizes forward and
             backward, warps, pipeline stages) at 4k tokens, dense and banded,
             head dims 128 and 64: forward and forward+backward time of each
             candidate against cuDNN, the default first (kernels.bench.measure).
  train      the real train step (paxgpt.train_step.make_train_step, GPT-3
             optimizer) for gpt3_small/medium/xl at seq 2048 on synthetic
             batches, per attention backend and remat policy, at the largest
             power-of-two batch that fits: tokens/s, MFU against the chip's
             bf16 peak (accounting.CHIPS), the compiled step's memory.
  decode     the sampler's prefill + decode loop (paxgpt.bench_decode.measure)
             for gpt3_small and gpt3_xl at batch 1/32/128, 128 new tokens after
             a 512-token prompt: tokens/s and the percentage of the HBM roofline
             (weights + KV cache bytes read per step / chip bandwidth).
  engine     the continuous-batching engine's decode calls (paxgpt/decoding/engine.py
             generate, Triton decode attention) for gpt3_small and gpt3_xl at
             64/128/256 slots, each slot at its own position (256-768 tokens in,
             as a running engine's slots are): tokens/s and the percentage of the
             HBM roofline (weights + the KV cache the rows hold, which is what the
             kernel reads, per step / bandwidth); first the decode kernel alone,
             Pallas GPU against the XLA path, on one layer's ragged cache.

It prints one Markdown table (a row as each figure is measured) and writes the
same rows as JSON ({"meta": ..., "rows": [...]}) to --json.

Invariants:
  - Every planned row appears, measured or not: a row that fails (OOM, a shape
    cuDNN refuses) records the error in its `note` with status "error"; a row
    whose section ran out of time has status "skipped"; the run goes on.
  - The JSON file is rewritten after every row, so a slot cut short still
    leaves every figure measured so far.
  - Time: the sections share --budget_s (default 400 s, counted from main()'s
    start), split among the selected sections by SHARES; a section that
    finishes early leaves its time to the next ones. A row starts only while
    its section has time left, so one row (a large compile) can overrun by its
    own length.
  - --smoke (and any run without a GPU) runs the same code paths with tiny
    shapes, the Pallas GPU kernels in interpret mode, in well under a minute;
    tests/test_gpu_check.py runs it, so the check cannot rot between slots.

Model shapes come from gin/models/*.gin, read without gin
(paxgpt/config/model_files.py), so the files stay the one source of truth.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels import bench as kernel_bench
from paxgpt.model import accounting
from paxgpt.model import gpt
from paxgpt.training import optim
from paxgpt.config.model_files import model_config
from paxgpt.decoding import sampling
from paxgpt.model import sharding
from paxgpt.training import train_step

SECTIONS = ("kernels", "attention", "tune", "train", "decode", "engine")
# Each section's share of the budget; the sections a run selects split the whole
# budget in these proportions (a section that ends early leaves its time to the
# next ones).
SHARES = {"kernels": 0.08, "attention": 0.18, "tune": 0.12, "train": 0.30, "decode": 0.12,
          "engine": 0.20}
LABELS = {"gpu": "pallas-gpu", "cudnn": "cudnn", "reference": "xla", "tpu": "pallas-tpu"}
# Tolerances of tests/test_kernels_gpu.py: compiled on a GPU, and interpret mode.
TOLERANCE = {True: {"float32": 1e-4, "bfloat16": 3e-2},
             False: {"float32": 2e-5, "bfloat16": 2e-2}}
# The compiled train step may plan up to this share of the device's memory.
MEMORY_FILL = 0.9


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every shape the run measures; FULL on a GPU, SMOKE on CPU or with --smoke."""
  name: str
  # (dtype, seq_len, head_dim, window, segments, block options)
  kernel_cases: tuple
  attention: dict  # kernels.bench sizes: tokens, seqs, head_dims, width, window; runs
  # (seq_len, head_dim, window): the shapes each tile candidate is timed at
  tune_shapes: tuple
  # {label: kernels.gpu.attention options}; the first is the kernel's default
  tune_candidates: dict
  train_seq: int
  # (model, attention backend, remat policy[, scan_layers]) in priority order:
  # rows past the section's time are skipped, so the figures that matter most
  # come first. scan_layers defaults to True (GPTConfig's training default).
  train_rows: tuple
  train_first_batch: dict  # {model: {remat: rows}}: the batch search's first compile
  train_max_batch: int
  train_steps: int
  decode_models: tuple
  decode_batches: tuple
  prompt_len: int
  new_tokens: int
  decode_repeats: int
  engine_models: tuple
  engine_slots: tuple
  engine_positions: tuple  # (lowest, highest) position a slot starts at
  engine_steps: int  # steps per generate call
  engine_calls: int  # timed calls (after one that compiles)
  decode_kernel: tuple  # (batch, heads, slots, head_dim) of the kernel rows
  budget_s: float


FULL = Plan(
    name="full",
    kernel_cases=(
        ("float32", 512, 64, None, False, {}),
        ("float32", 512, 80, 192, True, {}),
        ("float32", 512, 128, 320, False, {}),
        ("float32", 512, 80, None, True, {}),
        ("bfloat16", 512, 64, 192, True, {}),
        ("bfloat16", 512, 128, None, True, {}),
        ("bfloat16", 512, 80, 160, False, {}),
        ("bfloat16", 512, 128, 256, True, dict(block_q=64, block_k=32)),
        ("bfloat16", 512, 128, None, True, dict(block_q=128, block_k=64, block_q_bwd=64,
                                                block_k_bwd=128)),
        ("bfloat16", 512, 128, 192, False, dict(block_q=128, block_k=128, num_warps=8)),
    ),
    attention=dict(kernel_bench.FULL, runs=5),
    tune_shapes=((4096, 128, None), (4096, 128, 256), (4096, 64, None)),
    tune_candidates={
        "default": {},
        "q128 k64": dict(block_q=128, block_k=64),
        "q128 k64 bwd q64 k128": dict(block_q=128, block_k=64, block_q_bwd=64,
                                      block_k_bwd=128),
        "q128 k64 bwd q128 k64 s3": dict(block_q=128, block_k=64, num_stages=3),
        "q128 k128 w8": dict(block_q=128, block_k=128, num_warps=8),
        "q64 k64 w4 s3": dict(num_warps=4, num_stages=3),
    },
    train_seq=2048,
    # By priority, grouped by model where that costs nothing (a new model
    # initialises a new state): cuDNN before Pallas of the same model so the
    # Pallas row carries its ratio.
    train_rows=(
        ("gpt3_small", "cudnn", "none"), ("gpt3_small", "gpu", "none"),
        ("gpt3_small", "reference", "none"),
        ("gpt3_xl", "cudnn", "none"), ("gpt3_xl", "gpu", "none"),
        ("gpt3_small", "gpu", "none", False), ("gpt3_xl", "gpu", "none", False),
        ("gpt3_xl", "gpu", "dots_saveable"),
        ("gpt3_medium", "gpu", "none"),
        ("gpt3_xl", "gpu", "full"), ("gpt3_xl", "reference", "none"),
        ("gpt3_small", "gpu", "dots_saveable"), ("gpt3_small", "gpu", "full"),
        ("gpt3_medium", "cudnn", "none"), ("gpt3_medium", "reference", "none"),
        ("gpt3_medium", "gpu", "dots_saveable"), ("gpt3_medium", "gpu", "full"),
    ),
    # Guesses near the fit on an H200 (the search corrects them from the plan).
    train_first_batch={"gpt3_small": {"none": 32, "dots_saveable": 32, "full": 64},
                       "gpt3_medium": {"none": 16, "dots_saveable": 16, "full": 64},
                       "gpt3_xl": {"none": 4, "dots_saveable": 8, "full": 32}},
    train_max_batch=64,
    train_steps=3,
    decode_models=("gpt3_small", "gpt3_xl"),
    decode_batches=(1, 32, 128),
    prompt_len=512,
    new_tokens=128,
    decode_repeats=1,
    engine_models=("gpt3_small", "gpt3_xl"),
    engine_slots=(64, 128, 256),
    engine_positions=(256, 768),
    engine_steps=16,
    engine_calls=3,
    decode_kernel=(128, 16, 2048, 128),
    budget_s=400.0,
)

SMOKE = Plan(
    name="smoke",
    kernel_cases=(
        ("float32", 48, 80, 20, True, dict(block_q=16, block_k=16)),
        ("bfloat16", 32, 64, None, False, dict(block_q=16, block_k=16)),
    ),
    attention=dict(tokens=128, seqs=(64,), head_dims=(32,), width=64, window=16, runs=1),
    tune_shapes=((64, 32, 16),),
    tune_candidates={"default": {}, "q32 k16": dict(block_q=32, block_k=16)},
    train_seq=32,
    train_rows=(("gpt3_tiny", "cudnn", "none"), ("gpt3_tiny", "gpu", "none"),
                ("gpt3_tiny", "reference", "full"), ("gpt3_tiny", "reference", "full", False)),
    train_first_batch={"gpt3_tiny": {"none": 4, "dots_saveable": 4, "full": 4}},
    train_max_batch=4,
    train_steps=1,
    decode_models=("gpt3_tiny",),
    decode_batches=(2,),
    prompt_len=8,
    new_tokens=4,
    decode_repeats=1,
    engine_models=("gpt3_tiny",),
    engine_slots=(4,),
    engine_positions=(4, 40),
    engine_steps=4,
    engine_calls=1,
    decode_kernel=(2, 2, 64, 16),
    budget_s=600.0,
)

# ---------------------------------------------------------------- bookkeeping

class Clock:
  """The run's start and the selected sections' deadlines, in seconds since it."""

  def __init__(self, budget_s, sections=SECTIONS):
    self.budget_s = budget_s
    self.start = time.monotonic()
    total = sum(SHARES[s] for s in sections)
    self.deadlines, done = {}, 0.0
    for section in sections:
      done += SHARES[section] / total
      self.deadlines[section] = budget_s * done

  def elapsed(self):
    return time.monotonic() - self.start

  def left(self, section):
    return self.deadlines[section] - self.elapsed()


def _one_line(err):
  text = str(err).strip()
  lines = [line for line in text.splitlines() if line.strip()]
  return f"{type(err).__name__}: {(lines or [''])[0][:160]}"


def _json_safe(x):
  """NaN and infinities become None (JSON has no spelling for them)."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  return x


class Report:
  """The rows: printed as Markdown table lines as they come, and the whole
  list rewritten to the JSON path after each."""

  COLUMNS = ("section", "case", "backend", "batch", "result", "vs cuDNN (f / f+b)", "status")

  def __init__(self, path, meta, clock, out=None):
    self.path, self.meta, self.clock, self.rows = path, meta, clock, []
    self.out = out or sys.stdout
    self.out.write("| " + " | ".join(self.COLUMNS) + " |\n")
    self.out.write("|" + "|".join(" --- " for _ in self.COLUMNS) + "|\n")
    self.out.flush()

  def add(self, row):
    row = _json_safe(row)
    self.rows.append(row)
    cells = (row["section"], row["case"], LABELS.get(row["backend"], row["backend"]),
             row.get("batch", "-"), _result(row), _versus(row), _status(row))
    self.out.write("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |\n")
    self.out.flush()
    self.write()

  def write(self):
    if not self.path:
      return
    meta = dict(self.meta, wall_s=round(self.clock.elapsed(), 1))
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"meta": meta, "rows": self.rows}, f, indent=1)
    os.replace(tmp, self.path)


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _result(row):
  if row["status"] in ("error", "skipped"):
    return row.get("note", "")
  section = row["section"]
  if section == "kernels":
    worst = "non-finite" if row["max_error"] is None else f"{row['max_error']:.1e}"
    return f"max err {worst} (tol {row['tolerance']:.0e})"
  if section in ("attention", "tune"):
    return (f"fwd {_fmt(row['fwd_ms'], '.3g')} ms {_fmt(row['fwd_tflops'], '.3g')} TF/s; "
            f"f+b {_fmt(row['fwd_bwd_ms'], '.3g')} ms {_fmt(row['fwd_bwd_tflops'], '.3g')} TF/s")
  if section == "train":
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    return (f"{row['tokens_per_s']:,.0f} tok/s, {row['step_ms']:.0f} ms/step, MFU {mfu}, "
            f"{_fmt(row['memory_gib'], '.3g')} GiB, compile {row['compile_s']:.0f} s")
  roofline = "-" if row["roofline_fraction"] is None else f"{100 * row['roofline_fraction']:.0f}%"
  if "tokens_per_s" not in row:  # the engine section's decode kernel rows
    return (f"{row['ms_per_step']:.3f} ms per layer, {row['kv_bytes_per_step'] / 2**20:.0f} MiB "
            f"held, {roofline} of HBM roofline")
  return (f"{row['tokens_per_s']:,.0f} tok/s, {row['ms_per_step']:.2f} ms/step, "
          f"{roofline} of HBM roofline")


def _versus(row):
  if row["status"] != "ok":
    return "-"
  fwd, both = row.get("vs_cudnn_fwd"), row.get("vs_cudnn_fwd_bwd", row.get("vs_cudnn"))
  if fwd is None and both is None:
    return "-"
  return " / ".join(f"{r:.2f}x" for r in (fwd, both) if r is not None)


def _status(row):
  return {"ok": "ok", "pass": "pass", "FAIL": "**FAIL**", "error": "error",
          "skipped": "skipped"}[row["status"]]


def _skip(report, row, why):
  report.add(dict(row, status="skipped", note=why))


def _on_gpu():
  return jax.default_backend() == "gpu"


# ---------------------------------------------------------------- sections

def run_kernels(plan, report, clock):
  interpret = not _on_gpu()
  backend = "gpu"
  for dtype, seq_len, head_dim, window, segments, blocks in plan.kernel_cases:
    mask = "dense" if window is None else f"band{window}"
    row = dict(section="kernels", backend=backend, batch=2, dtype=dtype, seq_len=seq_len,
               head_dim=head_dim, window=window, segments=segments, blocks=blocks,
               case=f"{dtype} T{seq_len} D{head_dim} {mask}" + (" seg" if segments else "")
               + (" " + ",".join(f"{k}={v}" for k, v in blocks.items()) if blocks else ""))
    if clock.left("kernels") <= 0:
      _skip(report, row, "skipped: over the section's time")
      continue
    tolerance = TOLERANCE[not interpret][dtype]
    try:
      errors = kernel_bench.check_against_reference(
          backend, (2, seq_len, 2, head_dim), jnp.dtype(dtype), window, segments,
          interpret=interpret, **blocks)
    except Exception as err:  # one case that cannot compile: say so, check the rest
      report.add(dict(row, status="error", note=_one_line(err)))
      continue
    worst = max(errors.values())
    report.add(dict(row, status="pass" if worst <= tolerance else "FAIL", errors=errors,
                    max_error=worst, tolerance=tolerance))


def run_attention(plan, report, clock):
  sizes = plan.attention
  interpret = not _on_gpu()
  platform = jax.default_backend()
  present = kernel_bench.available_backends(platform, interpret)
  backends = ("gpu", "cudnn", "reference")
  memory_limit = kernel_bench.memory_limit_bytes()
  for seq_len in sizes["seqs"]:
    for head_dim in sizes["head_dims"]:
      batch, heads = sizes["tokens"] // seq_len, sizes["width"] // head_dim
      shape = (batch, seq_len, heads, head_dim)
      for window in (None, sizes["window"]):
        mask = "dense" if window is None else f"band{window}"
        base = dict(section="attention", case=f"T{seq_len} D{head_dim} H{heads} {mask}",
                    batch=batch, seq_len=seq_len, head_dim=head_dim, heads=heads,
                    window=window, dtype="bfloat16")
        results = {}
        for backend in backends:
          if backend not in present:
            results[backend] = {"skip": f"skipped: {backend} does not run on {platform}"}
          elif clock.left("attention") <= 0:
            results[backend] = {"skip": "skipped: over the section's time"}
          else:
            results[backend] = kernel_bench.measure(backend, shape, window, sizes["runs"],
                                                    interpret, memory_limit, {})
        flops = kernel_bench.attention_flops(batch, heads, head_dim, seq_len, window)
        cudnn = results.get("cudnn", {})
        for backend in backends:
          res, row = results[backend], dict(base, backend=backend)
          if "skip" in res:
            _skip(report, row, res["skip"])
          elif "note" in res:
            status = "skipped" if res["note"].startswith("skipped") else "error"
            report.add(dict(row, status=status, note=res["note"]))
          else:
            row.update(status="ok", fwd_ms=res["fwd"], fwd_bwd_ms=res["fwd+bwd"],
                       fwd_tflops=flops[0] / res["fwd"] / 1e9,
                       fwd_bwd_tflops=flops[1] / res["fwd+bwd"] / 1e9,
                       vs_cudnn_fwd=cudnn["fwd"] / res["fwd"] if "fwd" in cudnn else None,
                       vs_cudnn_fwd_bwd=(cudnn["fwd+bwd"] / res["fwd+bwd"]
                                         if "fwd+bwd" in cudnn else None))
            report.add(row)
        results.clear()  # drop the forward outputs before the next shape


def run_tune(plan, report, clock):
  interpret = not _on_gpu()
  present = kernel_bench.available_backends(jax.default_backend(), interpret)
  memory_limit = kernel_bench.memory_limit_bytes()
  tokens = plan.attention["tokens"]
  width = plan.attention["width"]
  for seq_len, head_dim, window in plan.tune_shapes:
    batch, heads = max(1, tokens // seq_len), max(1, width // head_dim)
    shape = (batch, seq_len, heads, head_dim)
    mask = "dense" if window is None else f"band{window}"
    flops = kernel_bench.attention_flops(batch, heads, head_dim, seq_len, window)
    cudnn = {}
    if "cudnn" in present and clock.left("tune") > 0:
      cudnn = kernel_bench.measure("cudnn", shape, window, plan.attention["runs"], interpret,
                                   memory_limit, {})
      cudnn.pop("out", None)
    for label, options in plan.tune_candidates.items():
      row = dict(section="tune", case=f"T{seq_len} D{head_dim} H{heads} {mask} {label}",
                 backend="gpu", batch=batch, seq_len=seq_len, head_dim=head_dim,
                 heads=heads, window=window, options=options, dtype="bfloat16")
      if clock.left("tune") <= 0:
        _skip(report, row, "skipped: over the section's time")
        continue
      res = kernel_bench.measure("gpu", shape, window, plan.attention["runs"], interpret,
                                 memory_limit, options)
      if "note" in res:
        report.add(dict(row, status="error", note=res["note"]))
        continue
      report.add(dict(row, status="ok", fwd_ms=res["fwd"], fwd_bwd_ms=res["fwd+bwd"],
                      fwd_tflops=flops[0] / res["fwd"] / 1e9,
                      fwd_bwd_tflops=flops[1] / res["fwd+bwd"] / 1e9,
                      vs_cudnn_fwd=cudnn["fwd"] / res["fwd"] if "fwd" in cudnn else None,
                      vs_cudnn_fwd_bwd=(cudnn["fwd+bwd"] / res["fwd+bwd"]
                                        if "fwd+bwd" in cudnn else None)))


def _memory(compiled):
  """(fixed bytes, temporary bytes) the compiled step plans per device (the
  donated state is updated in place, so arguments + outputs - aliased), or
  None where the backend gives no memory analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  fixed = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           - stats.alias_size_in_bytes)
  return int(fixed), int(stats.temp_size_in_bytes)


def _largest_batch(fixed, temp, batch, max_batch, limit):
  """The largest power of two <= max_batch whose planned memory fits, taking
  the temporaries as proportional to the batch (at least 1)."""
  per_row = temp / batch
  best = 1
  while best * 2 <= max_batch and fixed + per_row * best * 2 <= MEMORY_FILL * limit:
    best *= 2
  return best


def _synthetic_batch(batch, seq_len, vocab_size, partitioner, seed=0):
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1))
  host = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": np.ones((batch, seq_len)),
          "decoder_segment_ids": np.ones((batch, seq_len)),
          "decoder_positions": np.broadcast_to(np.arange(seq_len), (batch, seq_len))}
  where = partitioner.sharding(train_step.BATCH_NAMES)
  return {k: jax.device_put(np.asarray(v, np.int32), where) for k, v in host.items()}


class _Trainer:
  """Compiles the train step for one (config, batch) and keeps one state per
  model alive across rows (parameter values do not change a step's speed)."""

  def __init__(self, partitioner):
    self.partitioner = partitioner
    self.optimizer, self.schedule = optim.make_optimizer(optim.OptimizerConfig(), 1000)
    self.state, self.state_of = None, None

  def compile(self, config, batch, seq_len):
    """(the state's shardings, the compiled step)."""
    abstract = train_step.abstract_train_state(config, self.optimizer)
    step = train_step.make_train_step(config, self.optimizer, self.partitioner,
                                      schedule=self.schedule, abstract_state=abstract)
    args = (self.partitioner.abstract(abstract),
            train_step.abstract_batch(batch, seq_len, self.partitioner))
    return self.partitioner.tree_shardings(abstract), step.lower(*args).compile()

  def state_for(self, name, config, shardings):
    if self.state_of != name:
      self.state = self.state_of = None
      gc.collect()
      network = gpt.GPT(config)
      tokens = jnp.zeros((1, min(8, config.max_len)), jnp.int32)
      init = jax.jit(lambda key: nn.unbox(network.init(key, tokens))["params"],
                     out_shardings=shardings.params)
      with self.partitioner.activate():
        params = init(jax.random.key(0))
      opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
      step_count = jax.device_put(jnp.int32(0), shardings.step)
      self.state = train_step.TrainState(params=params, opt_state=opt_state, step=step_count)
      self.state_of = name
    return self.state

  def time_steps(self, compiled, batch, steps):
    """Seconds per step after one untimed step; the final loss."""
    state, metrics = compiled(self.state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    self.state = state
    return (time.perf_counter() - start) / steps, float(metrics["loss"])


def _is_oom(err):
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_train(plan, report, clock):
  interpret = not _on_gpu()
  present = kernel_bench.available_backends(jax.default_backend(), interpret)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  trainer = _Trainer(sharding.Partitioner(mesh))
  limit = kernel_bench.memory_limit_bytes()
  chip = accounting.chip_of(jax.devices()[0])
  seq_len = plan.train_seq
  fitted = {}  # (model, remat) -> batch found by an earlier row: the next row's first try
  speeds = {}  # (model, remat, backend) -> tokens/s, for the ratio to cuDNN
  for name, backend, remat, *scan in plan.train_rows:
    scan_layers = scan[0] if scan else True
    layers = "" if scan_layers else " unrolled"
    row = dict(section="train", case=f"{name} T{seq_len} remat {remat}{layers}",
               backend=backend, model=name, remat=remat, seq_len=seq_len,
               scan_layers=scan_layers)
    if backend not in present:
      _skip(report, row, f"skipped: {backend} does not run on {jax.default_backend()}")
      continue
    if clock.left("train") <= 0:
      _skip(report, row, "skipped: over the section's time")
      continue
    config = model_config(name, attention_backend=backend, remat_policy=remat,
                          attention_interpret=interpret and backend == "gpu",
                          scan_layers=scan_layers)
    try:
      result = _train_row(trainer, name, config, seq_len, plan, limit, fitted.get(
          (name, remat), plan.train_first_batch[name][remat]), clock)
    except Exception as err:  # OOM at batch 1, a backend that cannot train: record, go on
      report.add(dict(row, status="error", note=_one_line(err)))
      continue
    fitted[(name, remat)] = result["batch"]
    _, non_embedding = accounting.param_counts(gpt.abstract_variables(config))
    flops_per_token = accounting.flops_per_token(config, non_embedding, seq_len)
    tokens_per_s = result["batch"] * seq_len / result["step_s"]
    if scan_layers:
      speeds[(name, remat, backend)] = tokens_per_s
    cudnn = speeds.get((name, remat, "cudnn"))
    stats = jax.devices()[0].memory_stats() or {}
    report.add(dict(row, status="ok", batch=result["batch"], step_ms=1e3 * result["step_s"],
                    tokens_per_s=tokens_per_s, loss=result["loss"],
                    model_tflops=tokens_per_s * flops_per_token / 1e12,
                    mfu=accounting.mfu(tokens_per_s, flops_per_token, chip, 1),
                    memory_gib=None if result["memory"] is None else result["memory"] / 2**30,
                    process_peak_gib=(stats["peak_bytes_in_use"] / 2**30
                                      if "peak_bytes_in_use" in stats else None),
                    vs_cudnn=None if cudnn is None or backend == "cudnn"
                    else tokens_per_s / cudnn,
                    tries=result["tries"], compile_s=result["compile_s"]))
  trainer.state = None


def _train_row(trainer, name, config, seq_len, plan, limit, first_batch, clock):
  """Compile at `first_batch`, move once to the largest batch the compiler's
  memory plan says fits, run. A plan over the device's memory, or an
  out-of-memory error (compiling or running), halves the batch and tries again
  while the section has time."""
  batch, tries, searched = min(first_batch, plan.train_max_batch), [], False
  while True:
    tries.append(batch)
    running = False
    try:
      compile_start = time.perf_counter()
      shardings, compiled = trainer.compile(config, batch, seq_len)
      compile_s = time.perf_counter() - compile_start
      memory = _memory(compiled)
      if memory is not None and not searched:
        searched = True
        best = _largest_batch(*memory, batch, plan.train_max_batch, limit)
        if best != batch:
          batch, compiled = best, None
          continue
      if memory is not None and sum(memory) > limit and batch > 1:
        batch, compiled = batch // 2, None
        continue
      running = True
      trainer.state_for((name, config.scan_layers), config, shardings)
      step_s, loss = trainer.time_steps(
          compiled, _synthetic_batch(batch, seq_len, config.vocab_size, trainer.partitioner),
          plan.train_steps)
      return dict(batch=batch, step_s=step_s, loss=loss, tries=tries, compile_s=compile_s,
                  memory=None if memory is None else sum(memory))
    except Exception as err:
      if running:  # a donated state is gone after a failed step: start afresh
        trainer.state = trainer.state_of = None
      if not _is_oom(err) or batch == 1 or clock.left("train") <= 0:
        raise
      searched, batch, compiled = True, batch // 2, None


def _kv_bytes_per_step(config, batch, cache_length):
  """Bytes of keys and values one decode step reads: each layer attends over
  its whole cache buffer (dense: cache_length slots, banded: min(W, that))."""
  itemsize = jnp.dtype(config.dtype).itemsize
  total = 0
  for kind in config.attention_pattern:
    window = config.layer_window(kind)
    slots = cache_length if window is None else min(window, cache_length)
    total += config.num_periods * 2 * batch * slots * config.num_heads * config.head_dim
  return total * itemsize


def run_decode(plan, report, clock):
  chip = accounting.CHIPS.get(accounting.chip_of(jax.devices()[0]), {})
  bandwidth = chip.get("hbm_bandwidth")
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  partitioner = sharding.Partitioner(mesh)
  decoders = {}
  steps = plan.new_tokens - 1  # the prefill chooses the first new token
  for batch in plan.decode_batches:
    for name in plan.decode_models:
      config = model_config(name)
      backend = config.attention_backend or kernels.default_backend()
      row = dict(section="decode", case=f"{name} prompt {plan.prompt_len} +{plan.new_tokens}",
                 backend=backend, batch=batch, model=name, prompt_len=plan.prompt_len,
                 new_tokens=plan.new_tokens)
      if clock.left("decode") <= 0:
        _skip(report, row, "skipped: over the section's time")
        continue
      try:
        # Imported here: a break in the decode bench costs this section's rows only.
        from paxgpt.bench import decode as bench_decode
        if name not in decoders:
          params = sampling.init_params(config, partitioner)
          decoders[name] = sampling.Decoder(config, params, partitioner, eos_id=None)
        decoder = decoders[name]
        prefill_s, decode_s = bench_decode.measure(decoder, batch, plan.prompt_len,
                                                   plan.new_tokens, config.vocab_size,
                                                   repeats=plan.decode_repeats)
      except Exception as err:  # OOM or a shape the kernels refuse: record, go on
        report.add(dict(row, status="error", note=_one_line(err)))
        continue
      weight_bytes = sum(x.nbytes for x in jax.tree.leaves(decoder.params))
      kv_bytes = _kv_bytes_per_step(config, batch, plan.prompt_len + plan.new_tokens)
      step_s = decode_s / steps
      roofline_s = None if bandwidth is None else (weight_bytes + kv_bytes) / bandwidth
      report.add(dict(row, status="ok", tokens_per_s=batch * steps / decode_s,
                      ms_per_step=1e3 * step_s, prefill_ms=1e3 * prefill_s,
                      weight_bytes=weight_bytes, kv_bytes_per_step=kv_bytes,
                      roofline_ms=None if roofline_s is None else 1e3 * roofline_s,
                      roofline_fraction=None if roofline_s is None else roofline_s / step_s))


def _held_kv_bytes(config, positions, capacity):
  """Bytes of keys and values the engine's slots hold at `positions` (what the
  decode kernel reads in a step: each row up to its own length, a ring its W)."""
  itemsize = jnp.dtype(config.dtype).itemsize
  total = 0
  for kind in config.attention_pattern:
    window = config.layer_window(kind)
    slots = capacity if window is None else min(window, capacity)
    held = np.minimum(np.asarray(positions) + 1, slots).sum()
    total += config.num_periods * 2 * int(held) * config.num_heads * config.head_dim
  return total * itemsize


def _time_calls(fn, calls):
  """Seconds per call of fn() (which returns something to block on), best of `calls`."""
  jax.block_until_ready(fn())  # compiles
  best = float("inf")
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def _decode_kernel_rows(plan, report, clock, bandwidth):
  batch, heads, slots, head_dim = plan.decode_kernel
  rng = np.random.default_rng(0)
  lengths = jnp.asarray(rng.integers(slots // 8, slots, batch), jnp.int32)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, heads, head_dim), jnp.bfloat16)
  k, v = (jax.random.normal(key, (batch, heads, slots, head_dim), jnp.bfloat16)
          for key in keys[1:])
  held = 2 * int(lengths.sum()) * heads * head_dim * 2
  for backend in ("gpu", "reference"):
    row = dict(section="engine", case=f"decode attention B{batch} H{heads} S{slots} D{head_dim}",
               backend=backend, batch=batch)
    if clock.left("engine") <= 0:
      _skip(report, row, "skipped: over the section's time")
      continue
    try:
      fn = jax.jit(lambda q, k, v, n, b=backend: kernels.decode_attention(
          q, k, v, n, backend=b, interpret=not _on_gpu()))
      seconds = _time_calls(lambda: fn(q, k, v, lengths), 3)
    except Exception as err:
      report.add(dict(row, status="error", note=_one_line(err)))
      continue
    roofline = None if bandwidth is None else held / bandwidth
    report.add(dict(row, status="ok", ms_per_step=1e3 * seconds, kv_bytes_per_step=held,
                    roofline_ms=None if roofline is None else 1e3 * roofline,
                    roofline_fraction=None if roofline is None else roofline / seconds))


def _engine_slots(engine, slots, capacity, positions, seed=0):
  """An engine state whose slots all run, each at its own position, with random
  keys in its cache (what a filled engine holds; no prefill to compile)."""
  from paxgpt.decoding import engine as engine_lib
  model = engine.model
  vocab = engine.config.padded_vocab_size

  def make(key):
    state = engine_lib.empty_slots(model, slots, capacity, vocab)
    keys = jax.random.split(key, len(jax.tree.leaves(state.cache)) + 1)
    leaves, treedef = jax.tree.flatten(state.cache)
    cache = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                               for k, x in zip(keys[1:], leaves)])
    tokens = jax.random.randint(keys[0], state.tokens.shape, 1, engine.config.vocab_size)
    position = jnp.asarray(positions, jnp.int32)
    return state.replace(cache=cache, tokens=tokens, position=position,
                         last=tokens[jnp.arange(slots), position],
                         finish=jnp.zeros(slots, jnp.int32),
                         rows=state.rows.replace(max_tokens=jnp.full(slots, capacity)))
  shardings = engine._shardings(jax.eval_shape(make, jax.random.key(seed)))
  with engine.partitioner.activate():
    return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


def run_engine(plan, report, clock):
  from paxgpt.decoding import engine as engine_lib
  chip = accounting.CHIPS.get(accounting.chip_of(jax.devices()[0]), {})
  bandwidth = chip.get("hbm_bandwidth")
  _decode_kernel_rows(plan, report, clock, bandwidth)
  partitioner = sharding.Partitioner(sharding.make_mesh(devices=jax.devices()[:1]))
  low, high = plan.engine_positions
  steps = plan.engine_steps
  rules = sampling.Rules(sample=False, top_k=0, top_p=False, penalty=False, max_ngram=0)
  for name in plan.engine_models:
    config = model_config(name)
    params = None
    for slots in plan.engine_slots:
      backend = config.attention_backend or kernels.default_backend()
      row = dict(section="engine", case=f"{name} engine, positions {low}-{high}", model=name,
                 backend=backend, batch=slots, steps_per_call=steps)
      if clock.left("engine") <= 0:
        _skip(report, row, "skipped: over the section's time")
        continue
      try:
        if params is None:
          params = sampling.decode_params(sampling.init_params(config, partitioner), config,
                                          partitioner, consume=True)
        engine = engine_lib.Engine(config, params, partitioner, eos_id=None, slots=slots,
                                   steps_per_call=steps)
        capacity = -(-(high + steps * (plan.engine_calls + 1) + 1) // 128) * 128
        positions = np.random.default_rng(slots).integers(low, high + 1, slots)
        state = {"s": _engine_slots(engine, slots, capacity, positions)}
        stop = np.zeros(slots, bool)

        def call():
          state["s"], out = engine._generate(state["s"], stop, rules)
          return out
        seconds = _time_calls(call, plan.engine_calls)
      except Exception as err:  # OOM or a shape the kernels refuse: record, go on
        report.add(dict(row, status="error", note=_one_line(err)))
        continue
      weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
      # The timed calls ran from (1 + calls // 2) calls in on average: the rows' mean length.
      middle = positions + steps * (1 + plan.engine_calls / 2)
      kv_bytes = _held_kv_bytes(config, middle, capacity)
      step_s = seconds / steps
      roofline_s = None if bandwidth is None else (weight_bytes + kv_bytes) / bandwidth
      report.add(dict(row, status="ok", tokens_per_s=slots / step_s, ms_per_step=1e3 * step_s,
                      weight_bytes=weight_bytes, kv_bytes_per_step=kv_bytes,
                      buffer_kv_bytes=_kv_bytes_per_step(config, slots, capacity),
                      roofline_ms=None if roofline_s is None else 1e3 * roofline_s,
                      roofline_fraction=None if roofline_s is None else roofline_s / step_s))
      del engine, state
    del params
    gc.collect()


RUNNERS = {"kernels": run_kernels, "attention": run_attention, "tune": run_tune,
           "train": run_train, "decode": run_decode, "engine": run_engine}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, kernels in interpret mode (always so without a GPU)")
  parser.add_argument("--json", default=None, help="write the rows as JSON to this path")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="seconds from start-up that the sections share (default: the plan's)")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {','.join(SECTIONS)}")
  args = parser.parse_args(argv)
  sections = [s for s in args.sections.split(",") if s]
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
  plan = FULL if _on_gpu() and not args.smoke else SMOKE
  clock = Clock(plan.budget_s if args.budget_s is None else args.budget_s, sections)
  device = jax.devices()[0]
  chip = accounting.chip_of(device)
  meta = dict(plan=plan.name, platform=jax.default_backend(), device_kind=device.device_kind,
              chip=chip, chip_figures=accounting.CHIPS.get(chip), jax=jax.__version__,
              budget_s=clock.budget_s, sections=sections)
  print(f"# paxgpt GPU check ({plan.name} shapes): jax {jax.__version__}, "
        f"{device.device_kind} ({jax.default_backend()}), chip {chip or 'unknown'}, "
        f"budget {clock.budget_s:.0f} s" + ("" if _on_gpu() else ", Pallas GPU in interpret mode"))
  print()
  report = Report(args.json, meta, clock)
  section_s = report.meta["section_s"] = {}
  for section in sections:
    start = clock.elapsed()
    try:
      RUNNERS[section](plan, report, clock)
    except Exception as err:  # outside any row (e.g. the mesh): record it, run the rest
      report.add(dict(section=section, case="(the section)", backend="-", status="error",
                      note=_one_line(err)))
    section_s[section] = round(clock.elapsed() - start, 1)
    gc.collect()
  report.write()
  counts = {s: sum(r["status"] == s for r in report.rows)
            for s in ("ok", "pass", "FAIL", "error", "skipped")}
  print()
  print(f"# {len(report.rows)} rows: " + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f"; {clock.elapsed():.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in section_s.items()) + ")"
        + (f"; JSON: {args.json}" if args.json else ""))
  print("# kernels: error = max|got - want| / (max(1, max|want|) + |want|) over out, dq, dk, "
        "dv; attention TF/s counts visible pairs (4*B*H*D*pairs fwd, 2.5x for bwd); "
        "vs cuDNN = cuDNN time / this time; train memory = the compiled step's plan "
        "(arguments + outputs - donated + temporaries); decode roofline = (weights + KV "
        "cache bytes per step) / HBM bandwidth / measured step time; engine roofline "
        "counts the KV cache the slots hold (the kernel's reads), not the buffer")
  return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
  sys.exit(main())
