"""`paxgpt plan`: will this model train on that mesh? Ask the compiler.

Lowers and compiles the sharded train step for a mesh on abstract inputs (no
weights are allocated) and reports, per device, the parameter, optimizer-state
and temporary bytes from `compiled.memory_analysis()`, the FLOPs per step
(accounting.flops_per_token x tokens), whether the total fits the chip's HBM
(accounting.CHIPS) and the step time at a stated MFU.

Devices: with --topology (and libtpu installed) the compile-only devices of a
TPU slice from `jax.experimental.topologies.get_topology_desc`, so the figures
come from the real TPU compiler and the Pallas attention kernels are compiled
inside shard_map; otherwise as many fake CPU devices as the mesh has (the CPU
compiler's figures: the same sharding, another backend's fusion and layout).

The step is the trainer's own (paxgpt.train_step.make_train_step with the GPT-3
optimizer; gin's TrainConfig.num_microbatches applies), with full remat unless
--remat says otherwise. A step the TPU compiler refuses for lack of HBM is
reported as not fitting, with the temporaries its message names.
"""
from __future__ import annotations

import dataclasses
import math
import re

import gin
import jax
import numpy as np

from paxgpt.model import accounting
from paxgpt.model import info
from paxgpt.model import gpt
from paxgpt.model import pipeline
from paxgpt.training import hlo_traffic
from paxgpt.training import optim
from paxgpt.model import sharding
from paxgpt.training import train_step
from paxgpt.training import trainer
from paxgpt.errors import UsageError

DEFAULT_MFU = 0.4
DEFAULT_REMAT = "full"
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
# libtpu's chip configurations: v4 and v5p expose one megacore device per chip.
_CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore", "v5e": "default", "v6e": "default"}

# ---------------------------------------------------------------- devices

def parse_topology(chip, topology):
  """('v5p', '4x8x8') from --chip and --topology (which may carry the chip: v5p:4x8x8)."""
  name, _, dims = topology.rpartition(":")
  if name:
    if chip not in (None, name):
      raise UsageError(f"--topology={topology} names chip {name} but --chip={chip}")
    chip = name
  if chip is None:
    raise UsageError(f"--topology={topology}: say which chip with --chip "
                     f"({'|'.join(TPU_CHIPS)}) or --topology=CHIP:{dims}")
  if chip not in TPU_CHIPS:
    raise UsageError(f"--topology is for TPU chips ({', '.join(TPU_CHIPS)}); --chip={chip}")
  parts = dims.split("x")
  if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) not in (2, 3):
    raise UsageError(f"--topology={topology}: expected e.g. 4x4x8 (or 16x16 for {chip})")
  return chip, dims


def topology_devices(chip, dims, num_slices=1):
  """Compile-only TPU devices of `num_slices` `chip` slices shaped `dims` (needs
  libtpu, no TPU); several slices' devices carry their slice_index."""
  from jax.experimental import topologies
  if num_slices < 1:
    raise UsageError(f"--num_slices={num_slices}: must be at least 1")
  try:
    topo = topologies.get_topology_desc(topology_name=f"{chip}:{dims}", platform="tpu",
                                        chip_config_name=_CHIP_CONFIG[chip],
                                        num_slices=num_slices)
  except (RuntimeError, ValueError, NotImplementedError) as err:
    raise UsageError(f"--topology={chip}:{dims}: libtpu could not describe it "
                     f"({str(err).splitlines()[0][:200]})") from None
  return list(topo.devices)


def cpu_devices(count):
  """`count` CPU devices, asking JAX for that many fake ones when it has not started."""
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    pass  # the backend already runs (e.g. under pytest): use what it has
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise UsageError(f"the mesh needs {count} devices but this process already has "
                     f"{len(devices)} CPU devices; run `paxgpt plan` in a fresh process or set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
  return devices[:count]


# ---------------------------------------------------------------- train step

def _trainer_step(config, partitioner, batch_size, seq_len, microbatches=None):
  """The trainer's own jitted train step (GPT-3 optimizer, gin's TrainConfig
  microbatches unless `microbatches` says; pipelined on a mesh with a stage
  axis) and its abstract arguments."""
  train_config = trainer.TrainConfig()
  micro, shards = microbatches or train_config.num_microbatches, partitioner.shards("batch")
  if batch_size % micro or (batch_size // micro) % shards:
    raise UsageError(f"--batch={batch_size} in {micro} microbatches does not split evenly "
                     f"over the {shards} batch shards")
  pipe = pipeline.make(partitioner.mesh, config, micro)
  optimizer, schedule = optim.make_optimizer(optim.OptimizerConfig(), train_config.num_steps,
                                             batch_size * seq_len)
  boxed = train_step.abstract_train_state(config, optimizer, pipe)
  step = train_step.make_train_step(config, optimizer, partitioner, schedule=schedule,
                                    num_microbatches=micro, abstract_state=boxed,
                                    pipeline=pipe)
  state = partitioner.abstract(boxed)
  batch = train_step.abstract_batch(batch_size, seq_len, partitioner)
  return step, (state, batch), state.params, state.opt_state


# ---------------------------------------------------------------- the plan

def bytes_on_one_device(tree):
  """Bytes of the first device's shards of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def lower_train_step(config, devices, axis_sizes, batch_size, seq_len, mesh=None,
                     microbatches=None, rules=sharding.LOGICAL_AXIS_RULES):
  """(lowered step, sharded abstract params, sharded abstract optimizer state).
  `mesh`: the devices' mesh when it is not `make_mesh(**axis_sizes)` (several
  slices: `hybrid_mesh`); `microbatches`: instead of TrainConfig.num_microbatches."""
  if len(devices) != math.prod(axis_sizes.values()):
    raise sharding.MeshError(
        f"mesh {','.join(f'{k}:{v}' for k, v in axis_sizes.items())} needs "
        f"{math.prod(axis_sizes.values())} devices but there are {len(devices)}")
  info.check_model_on_mesh(config, axis_sizes)
  batch_shards = sharding.shard_count("batch", axis_sizes)
  if batch_size % batch_shards:
    axes = " x ".join(sharding.mesh_axes_of("batch"))
    raise UsageError(f"--batch={batch_size} is not divisible by {axes} = {batch_shards}")
  if seq_len > config.max_len:
    raise UsageError(f"--seq_len={seq_len} exceeds the model's max_len={config.max_len}")
  mesh = mesh or sharding.make_mesh(**axis_sizes, devices=devices)
  partitioner = sharding.Partitioner(mesh, rules)
  step, abstract_args, params, opt_state = _trainer_step(config, partitioner, batch_size,
                                                        seq_len, microbatches)
  lowered = step.lower(*abstract_args)  # ShardedStep traces under the mesh and rules
  return lowered, params, opt_state


def compile_train_step(config, devices, axis_sizes, batch_size, seq_len, compiler_options=None):
  """(compiled step, sharded abstract params, sharded abstract optimizer state)."""
  lowered, params, opt_state = lower_train_step(config, devices, axis_sizes, batch_size,
                                                seq_len)
  return lowered.compile(compiler_options), params, opt_state


# The TPU compiler refuses a program that does not fit, e.g. "RESOURCE_EXHAUSTED: Ran out
# of memory on HBM, the total memory required for HLO temporaries (23.36G) exceeds
# available HBM (15.75G)."
_TPU_OOM = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)")
# ... or "CompileTimeHbmOom: ... Used 17.85G of 15.75G hbm.": everything, not only temporaries.
_TPU_OOM_USED = re.compile(r"Used ([0-9.]+)([KMGT]) of [0-9.]+[KMGT] hbm")


def _size(found):
  return int(float(found.group(1)) * 2**(10 * "KMGT".index(found.group(2)) + 10))


def compile_plan(config, devices, axis_sizes, batch_size, seq_len, chip, mfu=DEFAULT_MFU,
                 compiler_options=None, count_flops=True, mesh=None, microbatches=None):
  """Compile the train step on `devices` and return the plan's figures as a dict
  (with `count_flops`, also the compiler's FLOPs per step: flop_figures)."""
  lowered, params, opt_state = lower_train_step(config, devices, axis_sizes, batch_size,
                                                seq_len, mesh, microbatches)
  try:
    compiled = lowered.compile(compiler_options)
  except jax.errors.JaxRuntimeError as err:
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    report = _out_of_memory_figures(str(err), params, opt_state, config, devices, axis_sizes,
                                    batch_size, seq_len, chip, mfu)
    compiled = None
  else:
    report = plan_figures(compiled, params, opt_state, config, devices, axis_sizes, batch_size,
                          seq_len, chip, mfu)
  mesh = mesh or sharding.make_mesh(**axis_sizes, devices=devices)
  if count_flops:
    report.update(flop_figures(config, devices, axis_sizes, batch_size, seq_len,
                               report["flops_per_step"], mesh))
  return with_scale_figures(report, compiled, mesh, config, microbatches)


def _out_of_memory_figures(message, params, opt_state, config, devices, axis_sizes,
                           batch_size, seq_len, chip, mfu):
  """Figures for a step the compiler refused: the state from the shardings, the
  temporaries from the compiler's message."""
  state = bytes_on_one_device(params) + bytes_on_one_device(opt_state)
  batch_rows = sharding.local_shape((batch_size,), ("batch",), axis_sizes)[0]
  arguments = state + len(train_step.BATCH_FEATURES) * 4 * batch_rows * seq_len
  found, used = _TPU_OOM.search(message), _TPU_OOM_USED.search(message)
  temp = _size(found) if found else max(0, _size(used) - arguments) if used else None
  report = plan_figures(None, params, opt_state, config, devices, axis_sizes, batch_size,
                        seq_len, chip, mfu,
                        memory=(arguments, state, state, temp if temp is not None else 0))
  report.update(fits=False, compiler_error=message.strip().splitlines()[0][:300])
  if temp is None:
    report["temp_bytes_per_device"] = report["total_bytes_per_device"] = None
  return report


def plan_figures(compiled, params, opt_state, config, devices, axis_sizes, batch_size, seq_len,
                 chip, mfu=DEFAULT_MFU, memory=None):
  """The plan's figures (a JSON-able dict) from a compiled train step, or from
  `memory` = (argument, output, alias, temp) bytes per device."""
  if memory is None:
    stats = compiled.memory_analysis()
    memory = (stats.argument_size_in_bytes, stats.output_size_in_bytes,
              stats.alias_size_in_bytes, stats.temp_size_in_bytes)
  argument, output, alias, temp = (int(m) for m in memory)
  param_bytes, opt_bytes = bytes_on_one_device(params), bytes_on_one_device(opt_state)
  total = argument + output - alias + temp  # donated state is updated in place

  variables = gpt.abstract_variables(config)
  params_total, non_embedding = accounting.param_counts(variables)
  flops_per_token = accounting.flops_per_token(config, non_embedding, seq_len)
  flops_per_step = flops_per_token * batch_size * seq_len
  spec = accounting.CHIPS.get(chip)
  step_time = (flops_per_step / (spec["peak_flops"] * len(devices) * mfu)) if spec else None
  return {
      "chip": chip,
      "devices": len(devices),
      "device_kind": devices[0].device_kind,
      "compiler": devices[0].platform,
      "mesh": dict(axis_sizes),
      "batch": batch_size,
      "seq_len": seq_len,
      "remat_policy": config.remat_policy,
      "attention_backend": config.attention_backend,
      "params": params_total,
      "param_bytes_per_device": param_bytes,
      "optimizer_bytes_per_device": opt_bytes,
      "argument_bytes_per_device": argument,
      "output_bytes_per_device": output,
      "alias_bytes_per_device": alias,
      "temp_bytes_per_device": temp,
      "total_bytes_per_device": total,
      "hbm_bytes_per_device": spec["hbm_bytes"] if spec else None,
      "fits": (total <= spec["hbm_bytes"]) if spec else None,
      "flops_per_token": flops_per_token,
      "num_periods": config.num_periods,
      "flops_per_step": flops_per_step,
      "mfu": mfu,
      "step_time_s": step_time,
  }


# ---------------------------------------------------------------- FLOPs per step

# Next to matmuls on FSDP meshes the TPU compiler turns all-gathers and
# reduce-scatters into windowed-einsum loops, whose bodies cost_analysis counts
# once: the compiles that count FLOPs turn those loops off.
_TPU_FLOP_COUNT_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                           "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
FLOPS_SOURCE = ("compiler: the train step with 1 and 2 unrolled periods, no microbatch loop "
                "(F1, F2); per step = F1 + (periods - 1) (F2 - F1)")


def program_flops(compiled, num_devices):
  """The compiler's FLOP count of a compiled SPMD program, over all devices. XLA
  counts the body of a while loop (a scan over periods or microbatches) once,
  whatever its trip count: a scanned model's count is one period's."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older jax
  return float(cost["flops"]) * num_devices


_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-done)?\(.*?replica_groups=(\S+)")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.-]+) \(.*\) -> .* \{\s*$")


def _group_size(groups):
  """Devices per replica group, from HLO's replica_groups text."""
  if groups.startswith("{{"):
    return groups[2:].split("}")[0].count(",") + 1
  if groups.startswith("["):  # iota form: [groups, size]<=[...]
    return int(groups[1:].split("]")[0].split(",")[-1])
  if groups.startswith("mesh["):  # mesh['a'=2,'b'=4] {'b'}: the named axes' sizes
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", groups.split("]")[0]))
    named = re.findall(r"'(\w+)'", groups.split("]", 1)[1]) if "{" in groups else []
    return math.prod(int(sizes[a]) for a in named) if named else math.prod(
        int(v) for v in sizes.values())
  return 1


def collective_bytes(hlo_text):
  """{kind: bytes one device sends} of a compiled program's collectives, by the ring
  counts: all-reduce 2 (n - 1) / n of its size, all-gather and reduce-scatter
  (n - 1) / n of the gathered size, all-to-all (n - 1) / n, a permute all of it.
  The TPU compiler writes a reduce-scatter as an all-reduce inside an
  `all-reduce-scatter` fusion. Loop bodies count once, as FLOPs do."""
  totals = {}
  computation = ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    found = _COLLECTIVE.search(line)
    if not found:
      continue
    shapes, kind, groups = found.group(1), found.group(2), found.group(4)
    size = sum(_ITEMSIZE.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shapes))
    n = _group_size(groups)
    if n <= 1:
      continue
    if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
      kind = "reduce-scatter"
    share = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(kind, (n - 1) / n)
    totals[kind] = totals.get(kind, 0.0) + share * size
  return totals


_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
             "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1}


def counted_per_step(config, devices, axis_sizes, batch_size, seq_len, mesh=None,
                     rules=sharding.LOGICAL_AXIS_RULES):
  """What the compiler counts for the step, every layer included (FLOPS_SOURCE):
  {"flops", "flops_per_period", "flops_outside_periods", "collective_bytes"} where
  collective_bytes is {kind: bytes one device sends per step} (collective_bytes()).
  The periods are alike, so one period costs C2 - C1 and everything else
  (embeddings, logits, loss, the optimizer on the other weights) C1 - (C2 - C1)."""
  options = _TPU_FLOP_COUNT_OPTIONS if devices[0].platform == "tpu" else None
  flops, sent = [], []
  for periods in (1, 2):
    unrolled = dataclasses.replace(config, scan_layers=False,
                                   num_layers=periods * len(config.attention_pattern))
    lowered, _, _ = lower_train_step(unrolled, devices, axis_sizes, batch_size, seq_len,
                                     mesh=mesh, microbatches=1, rules=rules)
    compiled = lowered.compile(options)
    flops.append(program_flops(compiled, len(devices)))
    sent.append(collective_bytes(compiled.as_text()))
  per_step = lambda one, two: one + (config.num_periods - 1) * (two - one)
  kinds = sorted(set(sent[0]) | set(sent[1]))
  return {"flops": per_step(*flops), "flops_per_period": flops[1] - flops[0],
          "flops_outside_periods": 2 * flops[0] - flops[1],
          "collective_bytes": {k: per_step(sent[0].get(k, 0.0), sent[1].get(k, 0.0))
                               for k in kinds}}


def flop_figures(config, devices, axis_sizes, batch_size, seq_len, analytic_flops_per_step,
                 mesh=None):
  """The plan's FLOPs fields: the compiler's count per step (None where even the
  two-period step does not fit, or on a pipelined mesh, whose stages need the
  periods stacked), where it came from, and its ratio to the analytic count
  (accounting.flops_per_token: 6N + attention), which is what remat adds."""
  counted = dict.fromkeys(("flops", "flops_per_period", "flops_outside_periods",
                           "collective_bytes"))
  if mesh is None or sharding.stage_count(mesh) == 1:
    try:
      counted = counted_per_step(config, devices, axis_sizes, batch_size, seq_len, mesh)
    except jax.errors.JaxRuntimeError as err:
      if "RESOURCE_EXHAUSTED" not in str(err):
        raise
  total = counted["flops"]
  return {"flops_per_step_compiled": total,
          "flops_per_period_compiled": counted["flops_per_period"],
          "flops_outside_periods_compiled": counted["flops_outside_periods"],
          "flops_source": FLOPS_SOURCE,
          "flops_compiled_over_analytic": (total / analytic_flops_per_step) if total else None,
          "collective_bytes_per_step_per_device": counted["collective_bytes"]}


# ---------------------------------------------------------------- slices and stages

def with_scale_figures(report, compiled, mesh, config, microbatches=None):
  """`report` plus the figures of several slices and pipeline stages: the DCN
  size of each mesh axis, the bytes each chip sends over DCN per step (from the
  compiled program; None when it did not compile), the microbatches, the
  pipeline's schedule and bubble; the step time at the stated MFU then counts
  the bubble as idle time."""
  micro = microbatches or trainer.TrainConfig().num_microbatches
  pipe = pipeline.make(mesh, config, micro)
  dcn = sharding.dcn_sizes(mesh)
  transfers, unknown = ({}, 0) if compiled is None else hlo_traffic.dcn_transfers(
      compiled.as_text())
  report.update(
      num_slices=math.prod(dcn.values()), dcn=dcn, microbatches=micro,
      dcn_bytes_per_step=sum(transfers.values()) if compiled is not None else None,
      dcn_transfers=transfers, dcn_loops_without_trip_count=unknown,
      pipeline=pipe.describe() if pipe else None)
  if pipe and report["step_time_s"]:
    report["step_time_s"] /= 1 - pipe.bubble
  return report


def parse_microbatches(text):
  """--microbatches: None (TrainConfig's), "auto" or a positive count."""
  if text is None or text == "auto":
    return text
  if not str(text).isdigit() or int(text) < 1:
    raise UsageError(f"--microbatches={text}: expected a positive count or auto")
  return int(text)


def fewest_microbatches(compile_with, counts):
  """The plan with the fewest microbatches that fits: `compile_with(m)` is a
  plan's report for m microbatches, `counts` the candidate counts. Memory falls
  as microbatches rise, so a binary search compiles only a few of them. The
  report lists what was tried."""
  tried, best = [], None
  low, high = 0, len(counts) - 1
  while low <= high:
    middle = (low + high) // 2
    report = compile_with(counts[middle])
    tried.append({"microbatches": counts[middle], "fits": report["fits"],
                  "total_bytes_per_device": report.get("total_bytes_per_device")})
    if report["fits"]:
      best, high = report, middle - 1
    else:
      low = middle + 1
  if best is None:
    report["microbatch_search"] = tried
    return report  # the most microbatches, which do not fit either
  best["microbatch_search"] = sorted(tried, key=lambda t: t["microbatches"])
  return best


def microbatch_counts(mesh, config, batch_size):
  """The microbatch counts a batch splits into: even over the batch shards, and
  whole pipeline passes when the mesh has stages."""
  shards = sharding.shard_count("batch", dict(mesh.shape))
  counts = []
  for m in range(1, batch_size + 1):
    if batch_size % m or (batch_size // m) % shards:
      continue
    try:
      pipeline.make(mesh, config, m)
    except UsageError:
      continue
    counts.append(m)
  if not counts:
    raise UsageError(f"--microbatches=auto: no microbatch count splits --batch={batch_size} "
                     f"evenly over the {shards} batch shards (and the pipeline's passes)")
  return counts


def _default_batch(batch_shards, seq_len):
  """GPT-3's batch (the %BATCH_TOKENS macro) in sequences, a multiple of the batch shards."""
  try:
    tokens = gin.query_parameter("%BATCH_TOKENS")
  except (ValueError, KeyError):
    tokens = None
  if not tokens:
    return batch_shards
  return max(1, tokens // seq_len // batch_shards) * batch_shards


def plan(mesh_flag=None, batch=None, chip=None, topology=None, remat=DEFAULT_REMAT,
         mfu=DEFAULT_MFU, seq_len=None, count_flops=True, num_slices=1, dcn=None,
         microbatches=None):
  """The figures of `paxgpt plan` for gin's GPTConfig (see the module docstring).
  num_slices: TPU slices (with --topology, each of that shape); dcn: the
  --dcn flag (default: data over the slices); microbatches: a count, "auto"
  (the fewest that fit) or None (TrainConfig.num_microbatches); count_flops: the
  compiler's FLOPs per step too (two more compiles, of the unrolled step)."""
  if not 0 < mfu <= 1:
    raise UsageError(f"--mfu={mfu}: expected a fraction in (0, 1]")
  config = gpt.GPTConfig()
  if topology:
    chip, dims = parse_topology(chip, topology)
    devices = topology_devices(chip, dims, num_slices)
    mesh = sharding.mesh_from_flag(mesh_flag, devices, dcn)
    # Pallas (Mosaic) attention under shard_map, as the TPU run would use.
    config = dataclasses.replace(config, attention_backend="tpu", attention_interpret=False)
  else:
    if num_slices != 1 or dcn:
      raise UsageError("--num_slices and --dcn need --topology (several TPU slices)")
    chip = chip or "v5p"
    if chip not in accounting.CHIPS:
      raise UsageError(f"--chip={chip}: expected one of {'|'.join(accounting.CHIPS)}")
    ici = info.mesh_axis_sizes(mesh_flag, None if mesh_flag else jax.device_count())
    devices = cpu_devices(math.prod(ici.values()))
    mesh = sharding.make_mesh(**ici, devices=devices)
    config = dataclasses.replace(config, attention_backend="reference")
  axis_sizes = dict(mesh.shape)
  config = dataclasses.replace(config, remat_policy=remat)
  seq_len = seq_len or config.max_len
  shards = sharding.shard_count("batch", axis_sizes)
  batch = batch or _default_batch(shards, seq_len)
  if batch < 1:
    raise UsageError(f"--batch={batch}: must be positive")

  def compile_with(count, flops=count_flops):
    return compile_plan(config, devices, axis_sizes, batch, seq_len, chip, mfu,
                        count_flops=flops, mesh=mesh, microbatches=count)
  if microbatches != "auto":
    return compile_with(microbatches)
  report = fewest_microbatches(lambda count: compile_with(count, flops=False),
                               microbatch_counts(mesh, config, batch))
  if count_flops:  # once, for the plan found (the count is per step, whatever the split)
    report.update(flop_figures(config, devices, axis_sizes, batch, seq_len,
                               report["flops_per_step"], mesh))
  return report


def format_report(r):
  def gib(b):
    if b is None:
      return "   (unknown)"
    return f"{b / 2**30:8.2f} GiB" if b >= 2**30 else f"{b / 2**20:8.2f} MiB"
  mesh = ",".join(f"{k}:{v}" for k, v in r["mesh"].items())
  lines = [
      f"train step compiled for {r['devices']} x {r['device_kind']} ({r['compiler']} compiler), "
      f"mesh {mesh}, batch {r['batch']} x {r['seq_len']}, remat {r['remat_policy']}, "
      f"attention {r['attention_backend']}",
      f"  parameters            {gib(r['param_bytes_per_device'])} per device "
      f"({r['params']:,} params)",
      f"  optimizer state       {gib(r['optimizer_bytes_per_device'])} per device",
      f"  temporaries           {gib(r['temp_bytes_per_device'])} per device",
      f"  total                 {gib(r['total_bytes_per_device'])} per device "
      f"(arguments + outputs - donated + temporaries)",
      f"  FLOPs per step        {r['flops_per_step']:.4g} analytic "
      f"({r['flops_per_token']:.4g} per token: 6N + attention)",
  ]
  if r.get("flops_per_step_compiled"):
    lines.append(
        f"                        {r['flops_per_step_compiled']:.4g} compiled "
        f"({r['flops_outside_periods_compiled']:.4g} + {r['num_periods']} periods x "
        f"{r['flops_per_period_compiled']:.4g}), {r['flops_compiled_over_analytic']:.3f}x "
        f"the analytic count (the recompute of remat {r['remat_policy']})")
  if r.get("collective_bytes_per_step_per_device"):
    sent = r["collective_bytes_per_step_per_device"]
    lines.append(f"  collectives per step   {gib(sum(sent.values())).strip()} sent per device ("
                 + ", ".join(f"{k} {gib(v).strip()}" for k, v in sent.items()) + ")")
  if r.get("num_slices", 1) > 1 or r.get("pipeline"):
    dcn = ",".join(f"{k}:{v}" for k, v in r["dcn"].items() if v > 1) or "none"
    sent = ("(not compiled)" if r["dcn_bytes_per_step"] is None
            else f"{gib(r['dcn_bytes_per_step']).strip()} per chip per step "
                 f"({', '.join(f'{k} {gib(v).strip()}' for k, v in r['dcn_transfers'].items())})")
    lines.append(f"  slices                {r['num_slices']} (axes over DCN: {dcn}); "
                 f"DCN sends {sent}")
  lines.append(f"  microbatches          {r.get('microbatches', 1)}")
  if r.get("pipeline"):
    p = r["pipeline"]
    lines.append(f"  pipeline              {p['stages']} stages x {p['repeats']} repeats, "
                 f"{p['microbatches']} microbatches per pass: {p['iterations']} iterations, "
                 f"bubble {p['bubble']:.1%} (step time below counts it)")
  if r.get("microbatch_search"):
    tried = ", ".join(f"{t['microbatches']} {'fits' if t['fits'] else 'no'}"
                      for t in r["microbatch_search"])
    found = f"{r['microbatches']} fit" if r["fits"] else "none fit"
    lines.append(f"  microbatch search     {found} (compiled: {tried})")
  if r.get("compiler_error"):
    lines.append(f"  the compiler refused it: {r['compiler_error']}")
  if r["hbm_bytes_per_device"]:
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(f"  {r['chip']} HBM {gib(r['hbm_bytes_per_device']).strip()}: {verdict}")
    lines.append(f"  step time at {r['mfu']:.0%} MFU: {r['step_time_s']:.3f} s "
                 f"({r['batch'] * r['seq_len'] / r['step_time_s']:,.0f} tokens/s)")
  return "\n".join(lines)
