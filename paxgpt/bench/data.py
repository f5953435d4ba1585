"""The input pipeline's cost per process, on 1 and on 4 processes, next to what a
gpt3_tiny step consumes; and that cost for GPT-3 175B's batch on 64 hosts.

  PYTHONPATH=. .venv/bin/python -m paxgpt.bench.data [--sequence_length 2048]
      [--batch_size 8] [--batches 400] [--repeats 4] [--processes 1,4]
      [--spm_size 2048] [--model_steps 10]

Each process count runs as that many processes joined by jax.distributed on
loopback, 8 fake CPU devices in all (mesh fsdp 8), on a corpus of 64 JSONL files
(pydoc_topics' train split `--repeats` times over) with the byte vocabulary and
with a SentencePiece vocabulary trained here on pydoc_topics, shuffle buffers of
64 examples. Every
process times `--batches` global batches after its first (the pipeline's start-up,
reported apart; the validation pass is timed whole). tf.data runs ahead of its consumer into large autotuned buffers,
so a rate over a few batches says little: the batches here span several epochs of
every row stream (hence the small corpus), whose restarts they pay for.

  global stream      TrainIterator (paxgpt/data/loader.py): a process packs the
                     row streams of the rows its devices hold (default streams)
  whole stream       the same with DataConfig.row_streams=1: every process packs
                     every row and keeps its own (the simplest global stream)
  validation pass    eval_batches: every process packs the whole pass (here one
                     pass over the train split, for enough batches)

Per process: the rows it packs and holds, tokens packed per second (wall time; the
processes share this machine's cores), CPU seconds per million tokens packed (the
process's CPU time, all threads: what a host pays, whatever else runs), global
batches per second, and the seconds to its first batch. Then a jitted value_and_grad of gpt3_tiny (reference attention,
sequence 256) on pipeline batches: the tokens per second a train step consumes
here. The last lines scale the measured CPU cost per token to GPT-3 175B's batch
(1536 x 2048 tokens) on 64 hosts.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

RESULT = "bench-data-result "
DEVICES = 8


CORPUS = "bench_corpus"
FILES = 64


def write_corpus(directory, repeats):
  """pydoc_topics' train split `repeats` times over in FILES JSONL files; its
  validation split in one more."""
  from tasks import pydoc_topics
  docs = pydoc_topics.documents()
  train = docs["train"] * repeats
  for i in range(FILES):
    with open(os.path.join(directory, f"part{i:02d}.jsonl"), "w") as f:
      f.writelines(json.dumps({"text": d}) + "\n" for d in train[i::FILES])
  with open(os.path.join(directory, "validation.jsonl"), "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs["validation"])
  return sum(len(d.encode()) for d in train)


def register_corpus(directory):
  import tasks
  return tasks.text_files_task(name=CORPUS, train_files=os.path.join(directory, "part*.jsonl"),
                               validation_files=os.path.join(directory, "validation.jsonl"))


def _measure(name, batches_of, rows_packed, rows_held, config, batches, *, whole_pass=False):
  """Time up to `batches` batches of the iterator `batches_of()` after its first
  (whole_pass: a finite pass, timed from its start, first batch included: tf.data
  packs much of it while the first batch is awaited)."""
  start = time.perf_counter()
  cpu = time.process_time()
  iterator = batches_of()
  jax.block_until_ready(next(iterator))
  first, done = time.perf_counter() - start, int(whole_pass)
  if not whole_pass:
    start, cpu = time.perf_counter(), time.process_time()
  for batch in iterator:
    jax.block_until_ready(batch)
    done += 1
    if done == batches:
      break
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  packed = rows_packed * config.sequence_length * done
  return {"what": name, "rows_packed": rows_packed, "rows_held": rows_held,
          "tokens_per_s": packed / seconds, "cpu_s_per_m": cpu / packed * 1e6,
          "batches_per_s": done / seconds, "batches": done, "first_s": first}


def worker(args):
  """One process of a measured run: its results as lines on stdout."""
  import dataclasses
  from paxgpt import distributed
  from paxgpt.data import loader
  from paxgpt.model.sharding import Partitioner, make_mesh
  distributed.initialize(distributed.resolve(), log=lambda text: None)
  register_corpus(args.corpus)
  partitioner = Partitioner(make_mesh(fsdp=-1))
  shape = (args.batch_size, args.sequence_length)
  held = loader.held_rows(partitioner.sharding(("batch", "length")), shape)
  for vocabulary in ("byte", f"spm:{args.spm}"):
    config = loader.DataConfig(mixture_or_task=CORPUS, vocabulary=vocabulary,
                               sequence_length=args.sequence_length,
                               batch_size=args.batch_size, shuffle_buffer=64,
                               eval_split="train")
    whole = dataclasses.replace(config, row_streams=1)
    per_stream = config.batch_size // config.num_streams
    packed = len(np.unique(held // per_stream)) * per_stream  # the rows of whole streams
    rows = [
        _measure("global stream", lambda: loader.TrainIterator(config, partitioner),
                 packed, len(held), config, args.batches),
        _measure("whole stream", lambda: loader.TrainIterator(whole, partitioner),
                 args.batch_size, len(held), config, args.batches),
        _measure("validation pass", lambda: iter(loader.eval_batches(config, partitioner)),
                 args.batch_size, len(held), config, args.batches, whole_pass=True)]
    for row in rows:
      print(RESULT + json.dumps({**row, "vocabulary": vocabulary.split(":")[0],
                                 "process": jax.process_index(),
                                 "processes": jax.process_count()}), flush=True)


def run_processes(count, args, spm, corpus):
  """Start `count` worker processes on loopback; their result rows."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // count}",
         "JAX_NUM_CPU_DEVICES": str(DEVICES // count)}
  if count > 1:
    env.update({"PAXGPT_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "PAXGPT_NUM_PROCESSES": str(count)})
  command = [sys.executable, "-m", "paxgpt.bench.data", "--worker", f"--spm={spm}",
             f"--corpus={corpus}",
             f"--sequence_length={args.sequence_length}", f"--batch_size={args.batch_size}",
             f"--batches={args.batches}"]
  ids = [{"PAXGPT_PROCESS_ID": str(i)} if count > 1 else {} for i in range(count)]
  workers = [subprocess.Popen(command, env={**env, **ids[i]},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(count)]
  rows = []
  for process in workers:
    out, err = process.communicate()
    if process.returncode:
      raise RuntimeError(f"a benchmark process failed ({process.returncode}): {err[-2000:]}")
    rows += [json.loads(line[len(RESULT):]) for line in out.splitlines()
             if line.startswith(RESULT)]
  return rows


def model_row(batch_size: int, steps: int):
  """gpt3_tiny forward + backward at sequence 256 on pipeline batches: tokens/s."""
  import gin
  import flax.linen as nn
  from paxgpt.data import loader
  from paxgpt.model import gpt as model_lib
  from paxgpt.model.sharding import Partitioner, make_mesh
  partitioner = Partitioner(make_mesh())
  length = 256
  gin_file = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "gin",
                          "models", "gpt3_tiny.gin")
  with gin.unlock_config():
    gin.parse_config_files_and_bindings([gin_file], [f"GPTConfig.max_len = {length}"])
  config = model_lib.GPTConfig(attention_backend="reference")
  gin.clear_config()
  gpt = model_lib.GPT(config)
  data_config = loader.DataConfig(sequence_length=length, batch_size=batch_size)
  batches = loader.TrainIterator(data_config, partitioner)
  with partitioner.activate():
    params = nn.unbox(jax.jit(gpt.init)(jax.random.key(0),
                                        next(batches)["decoder_input_tokens"]))["params"]

    def loss_fn(params, batch):
      logits = gpt.apply({"params": params}, batch["decoder_input_tokens"],
                         positions=batch["decoder_positions"],
                         segment_ids=batch["decoder_segment_ids"])
      loss, _ = model_lib.lm_loss(logits, batch["decoder_target_tokens"],
                                  batch["decoder_loss_weights"])
      return loss

    step = jax.jit(jax.value_and_grad(loss_fn))
    jax.block_until_ready(step(params, next(batches)))  # compile
    start = time.perf_counter()
    for _ in range(steps):
      loss, grads = step(params, next(batches))
    jax.block_until_ready((loss, grads))
    seconds = time.perf_counter() - start
  return batch_size * length * steps / seconds, float(loss)


def gpt3_175b_step_s(tokens, hosts, chips_per_host=4, chip="v5p", mfu=0.5):
  """Seconds per step of GPT-3 175B on `tokens` a step, at an assumed MFU."""
  from paxgpt.config.model_files import model_config
  from paxgpt.model import accounting, gpt
  config = model_config("gpt3_175b")
  _, non_embedding = accounting.param_counts(gpt.abstract_variables(config))
  flops = accounting.flops_per_token(config, non_embedding, 2048) * tokens
  return flops / (hosts * chips_per_host * accounting.CHIPS[chip]["peak_flops"] * mfu)


def extrapolate(rows, eval_batches=50):
  """GPT-3 175B's batch on 64 hosts, at the measured CPU cost per token (spm rows)."""
  from paxgpt.data import loader
  batch, length, hosts = 1536, 2048, 64
  config = loader.DataConfig(batch_size=batch, sequence_length=length)
  streams = config.num_streams
  rows_per_host = batch // hosts
  packed_rows = max(rows_per_host, batch // streams)  # whole streams when fewer than hosts
  cost = {what: min(r["cpu_s_per_m"] for r in rows
                    if r["what"] == what and r["vocabulary"] == "spm") / 1e6
          for what in ("global stream", "whole stream")}
  step_s = gpt3_175b_step_s(batch * length, hosts)
  ours = packed_rows * length * cost["global stream"]
  whole = batch * length * cost["whole stream"]
  # A long pass packs at the whole stream's cost per token (the same packing, no
  # shuffle); the short pass measured above is mostly its start-up.
  validation = eval_batches * batch * length * cost["whole stream"]
  print(f"\nGPT-3 175B, batch {batch} x {length} tokens on {hosts} hosts (at the lowest "
        f"SentencePiece CPU cost per token measured above):")
  print(f"  global stream: {streams} row streams by default, so each host packs "
        f"{packed_rows} rows = {packed_rows * length:,} tokens a step: "
        f"{ours:.3f} CPU s per global batch")
  print(f"  every host packing the whole batch (row_streams=1): {batch * length:,} tokens: "
        f"{whole:.1f} CPU s per global batch ({whole / ours:.0f}x)")
  print(f"  a step at an assumed 50% MFU on {hosts} hosts x 4 v5p chips: {step_s:.0f} s; "
        f"the host's share of it: {ours / step_s:.2%} of one core (whole batch: "
        f"{whole / step_s:.0%})")
  print(f"  validation ({eval_batches} batches, every host packs all, at the whole stream's "
        f"cost per token): {validation:.0f} CPU s per pass per host")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sequence_length", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=400)
  parser.add_argument("--repeats", type=int, default=4)
  parser.add_argument("--processes", default="1,4")
  parser.add_argument("--spm_size", type=int, default=2048)
  parser.add_argument("--model_steps", type=int, default=10)
  parser.add_argument("--model_batch_size", type=int, default=8)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--spm", help=argparse.SUPPRESS)
  parser.add_argument("--corpus", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args)

  import tasks
  counts = [int(n) for n in args.processes.split(",")]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    spm = tasks.train_sentencepiece("pydoc_topics", args.spm_size, tmp)
    print(f"SentencePiece BPE {args.spm_size} trained on pydoc_topics in "
          f"{time.perf_counter() - start:.1f} s")
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus)
    size = write_corpus(corpus, args.repeats)
    print(f"corpus: {FILES} JSONL files, {size / 1e6:.1f} MB; rows of {args.sequence_length} "
          f"tokens, batch {args.batch_size}, {DEVICES} CPU devices in all (mesh fsdp "
          f"{DEVICES}), {os.cpu_count()} cores")
    for count in counts:
      rows += run_processes(count, args, spm, corpus)

  print(f"\n{'processes':>9} {'vocab':>5} {'what':<16} {'rows packed/held':>16} "
        f"{'tokens/s per process':>21} {'CPU s per M tokens':>19} {'batches/s':>10} "
        f"{'first batch s':>14}")
  for count in counts:
    for vocabulary in ("byte", "spm"):
      for what in ("global stream", "whole stream", "validation pass"):
        mine = [r for r in rows if (r["processes"], r["vocabulary"], r["what"]) ==
                (count, vocabulary, what)]
        mean = {k: np.mean([r[k] for r in mine])
                for k in ("tokens_per_s", "cpu_s_per_m", "batches_per_s", "first_s")}
        print(f"{count:>9} {vocabulary:>5} {what:<16} "
              f"{mine[0]['rows_packed']:>7}/{mine[0]['rows_held']:<8} "
              f"{mean['tokens_per_s']:>21,.0f} {mean['cpu_s_per_m']:>19.2f} "
              f"{mean['batches_per_s']:>10.2f} {mean['first_s']:>14.1f}")
  tokens_per_s, loss = model_row(args.model_batch_size, args.model_steps)
  print(f"\ngpt3_tiny fwd+bwd, seq 256, reference attention, 1 process x {jax.device_count()} "
        f"devices: {tokens_per_s:,.0f} tokens/s consumed (loss {loss:.3f})")
  extrapolate(rows)


if __name__ == "__main__":
  main()
