"""paxgpt's train step beside MaxText's on one TPU compiler: memory per chip and
FLOPs per step (a benchmark, not a test; no TPU needed).

  python -m paxgpt.bench.maxtext [--rows=175b,6p7b] [--maxtext_python=PATH] [--json]

MaxText is not a dependency of paxgpt: it lives in a side venv (the README's
install section: `python3.12 -m venv .venv-maxtext && .venv-maxtext/bin/pip
install 'maxtext[tpu]==0.2.5'`). For each row this compiles, with libtpu and
abstract TPU devices, MaxText's own `train_compile` train step (in that venv,
one subprocess per compile) and `paxgpt plan`'s (in this process) for the same
model, mesh, global batch, sequence 2048, full remat, bf16 compute with fp32
weights and Adam, no quantization, and prints per chip the state (the donated
parameters and optimizer state), the temporaries and the total (arguments +
outputs - donated + temporaries), and the FLOPs per step on all chips.

FLOPs: cost_analysis counts a scan's body once, so both tools' counts come from
unrolled compiles: MaxText's with 2 and 4 layers (per step F2 + (L - 2) / 2 (F4 -
F2)), paxgpt's with 1 and 2 periods of 2 layers (plan.counted_flops_per_step), both
with the TPU compiler's windowed-einsum loops off (they hide matmuls in loops too).
paxgpt's banded layers see W = 256 keys where MaxText's layers are all dense, so
the analytic attention FLOPs that difference makes are printed beside them.

  python -m paxgpt.bench.maxtext --collectives [--rows=175b]

paxgpt only (no MaxText needed): the bytes one chip sends per step in each kind of
collective (plan.collective_bytes, counted like the FLOPs), with the residual
stream split over `tensor` (the rules) and replicated (`activation_embed` unsharded).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import gin

from paxgpt.model import accounting
from paxgpt.model import gpt
from paxgpt.model import sharding
from paxgpt.training import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAXTEXT_VERSION = "0.2.5"
SEQ_LEN = 2048
_FLOP_COUNT_FLAGS = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
                     "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: a paxgpt model file and MaxText's settings for the same model."""
  name: str
  model_gin: str
  chip: str
  topology: str  # chips, as paxgpt and libtpu name it
  maxtext_topology: str  # MaxText counts TensorCores: v5p-512 is 4x8x8
  mesh: dict
  batch: int
  maxtext_model: tuple  # MaxText's model_name and overrides


ROWS = {
    "175b": Row("GPT-3 175B", "gpt3_175b", "v5p", "4x8x8", "v5p-512",
                {"data": 1, "fsdp": 64, "tensor": 4}, 256,
                ("model_name=gpt3-175b",)),
    # MaxText's gpt3-6b is another shape (3072 x 48 layers); this is GPT-3's 6.7B.
    "6p7b": Row("GPT-3 6.7B", "gpt3_6p7b", "v5p", "2x2x2", "v5p-16",
                {"data": 1, "fsdp": 8, "tensor": 1}, 16,
                ("model_name=gpt3-6b", "override_model_config=true", "base_emb_dim=4096",
                 "base_num_query_heads=32", "base_num_kv_heads=32", "base_mlp_dim=16384",
                 "base_num_decoder_layers=32", "head_dim=128", "vocab_size=50304")),
    # A small mesh with tensor 4, quick to compile (the --collectives check).
    "xl": Row("GPT-3 XL", "gpt3_xl", "v5p", "2x2x2", "v5p-16",
              {"data": 1, "fsdp": 2, "tensor": 4}, 16,
              ("model_name=gpt3-6b", "override_model_config=true", "base_emb_dim=2048",
               "base_num_query_heads=16", "base_num_kv_heads=16", "base_mlp_dim=8192",
               "base_num_decoder_layers=24", "head_dim=128", "vocab_size=50304")),
}

# Runs in MaxText's venv: its train_compile entry point, with the compiled step
# kept to read the compiler's figures.
_DRIVER = r"""
import json, os, sys
import maxtext.configs
from maxtext.trainers.pre_train import train_compile
compiled = []
jit_and_compile = train_compile.jit_and_compile
def keep(*args, **kwargs):
  compiled.append(jit_and_compile(*args, **kwargs))
  return compiled[-1]
train_compile.jit_and_compile = keep
base = os.path.join(os.path.dirname(maxtext.configs.__file__), "base.yml")
train_compile.main(["train_compile", base] + sys.argv[1:])
import libtpu
m = compiled[-1].memory_analysis()
cost = compiled[-1].cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
print("MAXTEXT_RESULT " + json.dumps({
    "flops": float(cost["flops"]), "argument": m.argument_size_in_bytes,
    "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
    "temp": m.temp_size_in_bytes, "libtpu": libtpu.__version__}))
"""


def maxtext_compile(python, row, settings, workdir):
  """The compiler's figures for MaxText's train step (one subprocess)."""
  mesh = row.mesh
  per_device_batch = row.batch / (mesh["data"] * mesh["fsdp"] * mesh["tensor"])  # per chip
  argv = [*row.maxtext_model, f"compile_topology={row.maxtext_topology}",
          "compile_topology_num_slices=1", f"ici_data_parallelism={mesh['data']}",
          f"ici_fsdp_parallelism={mesh['fsdp']}", f"ici_tensor_parallelism={mesh['tensor']}",
          f"per_device_batch_size={per_device_batch:g}", f"max_target_length={SEQ_LEN}",
          "remat_policy=full", "dtype=bfloat16", "weight_dtype=float32", "quantization=",
          "enable_checkpointing=false", "dataset_type=synthetic", "run_name=bench",
          f"base_output_directory={workdir}", *settings]
  env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_ACCELERATOR_TYPE": "v5p-8",
         "TPU_WORKER_HOSTNAMES": "localhost"}
  result = subprocess.run([python, "-c", _DRIVER, *argv], capture_output=True, text=True,
                          env=env, cwd=workdir)
  for line in result.stdout.splitlines():
    if line.startswith("MAXTEXT_RESULT "):
      return json.loads(line[len("MAXTEXT_RESULT "):])
  raise RuntimeError(f"MaxText's train_compile failed ({' '.join(argv)}):\n"
                     f"{(result.stdout + result.stderr)[-3000:]}")


def maxtext_row(python, row, layers):
  """MaxText's memory (the scanned model) and FLOPs per step (2 and 4 unrolled layers)."""
  override = () if "override_model_config=true" in row.maxtext_model else (
      "override_model_config=true",)
  with tempfile.TemporaryDirectory() as workdir:
    full = maxtext_compile(python, row, (), workdir)
    counts = [maxtext_compile(python, row, ("scan_layers=false", f"base_num_decoder_layers={n}",
                                            *override, f"compile_xla_flags={_FLOP_COUNT_FLAGS}"),
                              workdir)["flops"] for n in (2, 4)]
  chips = row.mesh["data"] * row.mesh["fsdp"] * row.mesh["tensor"]
  per_layer = (counts[1] - counts[0]) / 2
  return {"state": full["alias"], "temp": full["temp"],
          "total": full["argument"] + full["output"] - full["alias"] + full["temp"],
          "flops_per_step": (counts[0] + (layers - 2) * per_layer) * chips,
          "libtpu": full["libtpu"]}


def paxgpt_row(row):
  """`paxgpt plan`'s figures for the row (this process's libtpu)."""
  gin.clear_config()
  gin.parse_config_file(os.path.join(ROOT, "gin", "models", f"{row.model_gin}.gin"))
  mesh = ",".join(f"{k}:{v}" for k, v in row.mesh.items())
  report = plan.plan(mesh_flag=mesh, batch=row.batch, chip=row.chip, topology=row.topology,
                     remat="full", seq_len=SEQ_LEN)
  config = gpt.GPTConfig()
  gin.clear_config()
  return report, config


def pallas_attention_flops(config, mesh, batch, seq_len):
  """FLOPs per step that paxgpt's compiled count holds for its Pallas attention: the
  kernels' own cost estimates (kernels/tpu.py: 2 matmuls per visited tile forward,
  4 in the dK/dV kernel, 3 in the dQ kernel), with full remat running the forward
  twice. MaxText's splash kernel reports none: its per-layer count is its matmuls'
  alone."""
  from kernels import tpu
  block = 128
  rows = batch // (mesh["data"] * mesh["fsdp"])
  heads = config.num_heads // mesh["tensor"]
  per_device = 0
  for kind in config.attention_pattern:
    tiles = int(tpu.visited_key_blocks(seq_len, config.layer_window(kind), block, block)[1].sum())
    per_device += 2 * (2 + 2 + 4 + 3) * tiles * block * block * rows * heads * config.head_dim
  return per_device * config.num_periods * mesh["data"] * mesh["fsdp"] * mesh["tensor"]


def banded_attention_saving(config, batch, seq_len):
  """Analytic training FLOPs per step that paxgpt's banded layers save against the
  same model with every layer dense (what MaxText's gpt3 layers are)."""
  _, non_embedding = accounting.param_counts(gpt.abstract_variables(config))
  dense = dataclasses.replace(config, attention_pattern=("dense",) * len(config.attention_pattern))
  per_token = (accounting.flops_per_token(dense, non_embedding, seq_len)
               - accounting.flops_per_token(config, non_embedding, seq_len))
  return per_token * batch * seq_len


def replicated_residual_rules():
  """The logical rules with the residual stream (`activation_embed`) unsharded."""
  return tuple((name, None) if name == "activation_embed" else (name, axes)
               for name, axes in sharding.LOGICAL_AXIS_RULES)


def collectives_row(row):
  """Per-step collective bytes per chip and temporaries of paxgpt's step for the row,
  with the residual stream split over tensor and replicated."""
  gin.clear_config()
  gin.parse_config_file(os.path.join(ROOT, "gin", "models", f"{row.model_gin}.gin"))
  config = dataclasses.replace(gpt.GPTConfig(), attention_backend="tpu", remat_policy="full")
  gin.clear_config()
  devices = plan.topology_devices(row.chip, row.topology)
  out = {}
  for name, rules in (("split", sharding.LOGICAL_AXIS_RULES),
                      ("replicated", replicated_residual_rules())):
    counted = plan.counted_per_step(config, devices, row.mesh, row.batch, SEQ_LEN, rules)
    out[name] = {"collective_bytes": counted["collective_bytes"], "flops": counted["flops"]}
  return out


def format_collectives(results):
  kinds = sorted({k for r in results for v in r["variants"].values()
                  for k in v["collective_bytes"]})
  lines = ["| model | residual stream | FLOPs per step | sent per chip per step, GiB: "
           + " / ".join(kinds) + " | total |", "| --- | --- | --- | --- | --- |"]
  for r in results:
    for name, v in r["variants"].items():
      sent = v["collective_bytes"]
      lines.append(f"| {r['name']} | {name} | {v['flops']:.4g} | "
                   + " / ".join(f"{sent.get(k, 0.0) / 2**30:.1f}" for k in kinds)
                   + f" | {sum(sent.values()) / 2**30:.1f} |")
  return "\n".join(lines)


def _libtpu_version():
  try:
    import libtpu
    return libtpu.__version__
  except ImportError:
    return None


def _gib(b):
  return f"{b / 2**30:.2f}"


def format_table(results):
  lines = [
      "| model | topology, mesh, batch | MaxText per chip (state / temporaries / total, GiB) "
      "| paxgpt per chip | paxgpt / MaxText total | FLOPs per step, all chips (MaxText / "
      "paxgpt) | of which paxgpt's attention kernels | paxgpt without them / MaxText |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    m, p = r["maxtext"], r["paxgpt"]
    mesh = " × ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
    lines.append(
        f"| {r['name']} | {r['chip']} {r['topology']}, {mesh}, {r['batch']} × {SEQ_LEN} "
        f"| {_gib(m['state'])} / {_gib(m['temp'])} / **{_gib(m['total'])}** "
        f"| {_gib(p['state'])} / {_gib(p['temp'])} / **{_gib(p['total'])}** "
        f"| {p['total'] / m['total']:.3f} "
        f"| {m['flops_per_step']:.4g} / {p['flops_per_step']:.4g} "
        f"| {r['paxgpt_attention_flops']:.3g} "
        f"| {(p['flops_per_step'] - r['paxgpt_attention_flops']) / m['flops_per_step']:.4f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="175b,6p7b", help=f"of {','.join(ROWS)}")
  parser.add_argument("--maxtext_python",
                      default=os.environ.get("MAXTEXT_PYTHON",
                                             os.path.join(ROOT, ".venv-maxtext", "bin", "python")),
                      help="the Python of a venv with maxtext[tpu]==" + MAXTEXT_VERSION)
  parser.add_argument("--json", action="store_true", help="one JSON object per row as well")
  parser.add_argument("--collectives", action="store_true",
                      help="paxgpt's collectives with the residual stream split and replicated")
  args = parser.parse_args(argv)
  names = [n for n in args.rows.split(",") if n]
  unknown = [n for n in names if n not in ROWS]
  if unknown or not names:
    parser.error(f"--rows={args.rows}: expected names from {','.join(ROWS)}")
  if args.collectives:
    results = [{"name": ROWS[n].name, "variants": collectives_row(ROWS[n])} for n in names]
    if args.json:
      print(json.dumps(results))
    print(f"libtpu {_libtpu_version()}")
    print(format_collectives(results))
    return 0
  if not os.path.exists(args.maxtext_python):
    parser.error(f"--maxtext_python={args.maxtext_python} does not exist; make the venv as "
                 f"the README's install section shows")
  results = []
  for name in names:
    row = ROWS[name]
    report, config = paxgpt_row(row)
    maxtext = maxtext_row(args.maxtext_python, row, config.num_layers)
    result = {
        "name": row.name, "chip": row.chip, "topology": row.topology, "mesh": row.mesh,
        "batch": row.batch, "banded_saving": banded_attention_saving(config, row.batch, SEQ_LEN),
        "maxtext": maxtext,
        "paxgpt_attention_flops": pallas_attention_flops(config, row.mesh, row.batch, SEQ_LEN),
        "paxgpt": {"state": report["alias_bytes_per_device"],
                   "temp": report["temp_bytes_per_device"],
                   "total": report["total_bytes_per_device"],
                   "flops_per_step": report["flops_per_step_compiled"],
                   "flops_analytic": report["flops_per_step"],
                   "libtpu": _libtpu_version()}}
    results.append(result)
    if args.json:
      print(json.dumps(result), flush=True)
  versions = {r["maxtext"]["libtpu"] for r in results} | {r["paxgpt"]["libtpu"] for r in results}
  print(f"libtpu {' / '.join(sorted(map(str, versions)))} for both tools"
        + ("" if len(versions) == 1 else " (NOT one compiler: the figures do not compare)"))
  print(format_table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
