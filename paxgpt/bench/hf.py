"""Benchmark: `paxgpt import`, `paxgpt sample` and `paxgpt export` of a random
GPT-Neo-shaped checkpoint (not a test). Prints a table: wall time, GB/s of
parameters, and peak resident memory against the model's size in bytes (goals:
import and export <= 1.5x; sample, which holds one copy of the weights, <= 1.3x
above the baseline).

  python -m paxgpt.bench.hf --shape=1.3b --workdir=/tmp/bench_hf [--keep]
      [--phases=import,sample,export]

Each command runs in its own process, so its peak resident memory
(ru_maxrss of that child) is its own; a process that only imports the same
modules gives the baseline (Python, JAX, TensorFlow) reported beside it. The
random checkpoint is written straight to safetensors, one tensor at a time,
with a small byte-level BPE vocabulary (the tokenizer does not change the
figures).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

# GPT-Neo sizes (EleutherAI's configs): hidden size, layers, heads.
SHAPES = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "1.3b": (2048, 24, 16),
          "2.7b": (2560, 32, 20)}
VOCAB = 50257


def write_random_checkpoint(directory, shape):
  """config.json, model.safetensors (float32, random) and tokenizer files."""
  from paxgpt.interop import hf
  from paxgpt.model import gpt
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  d, layers, heads = SHAPES[shape]
  os.makedirs(directory)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["a small text for a small vocabulary"], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = dict(model_type="gpt_neo", hidden_size=d, num_layers=layers, num_heads=heads,
                attention_types=[[["global", "local"], layers // 2]], window_size=256,
                max_position_embeddings=2048, vocab_size=VOCAB, eos_token_id=0,
                bos_token_id=0)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  _, kwargs = hf.config_from_hf(config)
  cfg = gpt.GPTConfig(**kwargs)
  specs = hf.hf_tensor_specs("gpt_neo", cfg)
  rng = np.random.default_rng(0)
  tensors = [(f"transformer.{name}", shape,
              lambda shape=shape: rng.standard_normal(shape, np.float32) * 0.02)
             for name, shape in specs]
  hf.write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
  return sum(int(np.prod(s)) * 4 for _, s in specs)


_MEASURE = ("import resource, sys\n"
            "{body}\n"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")


def run_child(body):
  """(wall seconds, peak RSS bytes) of Python code `body` in a fresh process
  (one CPU device: no forced host device count). The wall time is the
  command's own `wall_s` where it prints one (start-up excluded)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  start = time.time()
  result = subprocess.run([sys.executable, "-c", _MEASURE.format(body=body)],
                          capture_output=True, text=True, env=env)
  wall = time.time() - start
  peak = [line for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
  if result.returncode or not peak:
    raise SystemExit(f"{body} failed:\n{result.stderr[-3000:]}")
  for line in result.stdout.splitlines():
    if line.startswith("{") and "wall_s" in line:
      wall = json.loads(line)["wall_s"]
  return wall, int(peak[-1].split()[1]) * 1024


def _command(*argv):
  """The paxgpt command line `argv`, run as a user runs it."""
  return (f"import runpy, sys\nsys.argv = ['paxgpt', *{list(argv)!r}]\n"
          "try:\n  runpy.run_module('paxgpt.cli', run_name='__main__')\n"
          "except SystemExit as done:\n  assert not done.code, done.code")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="1.3b", choices=sorted(SHAPES))
  parser.add_argument("--workdir", default="/tmp/bench_hf")
  parser.add_argument("--keep", action="store_true", help="keep the files written")
  parser.add_argument("--phases", default="import,sample,export",
                      help="which commands to measure (import always runs)")
  args = parser.parse_args()
  phases = args.phases.split(",")
  shutil.rmtree(args.workdir, ignore_errors=True)
  source = os.path.join(args.workdir, "hf")
  start = time.time()
  model_bytes = write_random_checkpoint(source, args.shape)
  print(f"random GPT-Neo-{args.shape} checkpoint: {model_bytes / 1e9:.2f} GB float32, "
        f"written in {time.time() - start:.1f}s", flush=True)
  baseline = ("import paxgpt.cli.commands, paxgpt.interop.hf, paxgpt.training.trainer, tasks, jax, "
              "orbax.checkpoint\njax.numpy.zeros(1).block_until_ready()")
  rows = [("baseline (imports only)",) + run_child(baseline)]
  pax = os.path.join(args.workdir, "pax")
  rows.append(("import",) + run_child(_command("import", f"--hf_dir={source}",
                                               f"--model_dir={pax}")))
  if "sample" in phases:  # two short prompts: the weights dominate, not the cache
    prompts, out = (os.path.join(args.workdir, name) for name in ("in.jsonl", "out.jsonl"))
    with open(prompts, "w") as f:
      f.write('{"prompt": "a small text"}\n{"prompt": "for a small vocabulary", "n": 2}\n')
    rows.append(("sample",) + run_child(_command(
        "sample", f"--gin.CHECKPOINT_DIR='{pax}'", f"--prompts={prompts}", f"--output={out}",
        "--gin.SampleConfig.max_tokens=4", "--gin.SampleConfig.slots=8")))
  if "export" in phases:
    rows.append(("export",) + run_child(_command(
        "export", f"--model_dir={pax}", f"--hf_dir={os.path.join(args.workdir, 'out')}")))
  base = rows[0][2]
  print("\n| phase | wall s | GB/s | peak RSS GB | peak / model | (peak - baseline) / model |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, wall, peak in rows:
    rate = "" if name.startswith("baseline") else f"{model_bytes / wall / 1e9:.2f}"
    print(f"| {name} | {wall:.1f} | {rate} | {peak / 1e9:.2f} | {peak / model_bytes:.2f}x | "
          f"{(peak - base) / model_bytes:.2f}x |")
  print(f"\nmodel: {model_bytes / 1e9:.2f} GB; wall: the command's own (start-up excluded); "
        f"peak includes the baseline process (Python, JAX, TensorFlow)")
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
