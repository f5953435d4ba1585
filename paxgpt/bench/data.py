"""Input pipeline throughput, and what a small model consumes, as a table.

  PYTHONPATH=. .venv/bin/python -m paxgpt.bench.data [--sequence_length 2048]
      [--batch_size 8] [--batches 40] [--spm_size 2048] [--model_steps 10]

Rows: the bundled task with the byte vocabulary and with a SentencePiece vocabulary
trained here on its train split, each as host numpy batches (TF pipeline only) and
as global jax.Arrays (TrainIterator); then a
jitted value_and_grad of gpt3_tiny's mean cross-entropy (reference attention,
sequence 256) on batches from the pipeline: the tokens per second the trainer
would ask of it on this machine. Timings exclude the first batch / compile.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

import tasks
from paxgpt.data import loader
from paxgpt.model.sharding import Partitioner, make_mesh


def time_batches(iterator, batches: int) -> tuple[float, float]:
  """(seconds for `batches` batches after the first, fraction of real tokens)."""
  first = next(iterator)
  jax.block_until_ready(first)
  real, total = 0, 0
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
    jax.block_until_ready(batch)
    weights = np.asarray(batch["decoder_loss_weights"])
    real += int(weights.sum())
    total += weights.size
  return time.perf_counter() - start, real / total


def pipeline_rows(config: loader.DataConfig, partitioner: Partitioner, batches: int):
  tokens = config.batch_size * config.sequence_length * batches
  host = loader.HostBatches(config, config.train_split, loader.whole_split(),
                          config.batch_size, repeat=True)
  seconds, fill = time_batches(host, batches)
  rows = [("host numpy", tokens / seconds, fill)]
  seconds, fill = time_batches(loader.TrainIterator(config, partitioner), batches)
  rows.append(("global jax.Array", tokens / seconds, fill))
  return rows


def model_row(partitioner: Partitioner, batch_size: int, steps: int):
  """gpt3_tiny forward + backward at sequence 256 on pipeline batches, or None."""
  import gin
  import flax.linen as nn
  from paxgpt.model import gpt as model_lib
  length = 256
  gin_file = os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin", "models",
                          "gpt3_tiny.gin")
  with gin.unlock_config():
    gin.parse_config_files_and_bindings([gin_file], [f"GPTConfig.max_len = {length}"])
  config = model_lib.GPTConfig(attention_backend="reference")
  gin.clear_config()
  gpt = model_lib.GPT(config)
  data_config = loader.DataConfig(sequence_length=length, batch_size=batch_size)
  if loader.vocab_size(data_config) > config.vocab_size:
    raise ValueError("gpt3_tiny's vocabulary is smaller than the byte vocabulary")
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sequence_length", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--spm_size", type=int, default=2048)
  parser.add_argument("--model_steps", type=int, default=10)
  parser.add_argument("--model_batch_size", type=int, default=8)
  args = parser.parse_args(argv)

  partitioner = Partitioner(make_mesh())
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
        f"rows of {args.sequence_length} tokens, batch {args.batch_size}")
  table = []
  byte = loader.DataConfig(sequence_length=args.sequence_length, batch_size=args.batch_size)
  for name, tokens_per_s, fill in pipeline_rows(byte, partitioner, args.batches):
    table.append((f"pydoc_topics byte, {name}", tokens_per_s, fill))

  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    path = tasks.train_sentencepiece("pydoc_topics", args.spm_size, tmp)
    train_seconds = time.perf_counter() - start
    spm = loader.DataConfig(vocabulary=f"spm:{path}", sequence_length=args.sequence_length,
                          batch_size=args.batch_size)
    for name, tokens_per_s, fill in pipeline_rows(spm, partitioner, args.batches):
      table.append((f"pydoc_topics spm{args.spm_size}, {name}", tokens_per_s, fill))
  print(f"(SentencePiece BPE {args.spm_size} trained on pydoc_topics in {train_seconds:.1f} s)")

  print(f"\n{'what':<44} {'tokens/s':>12} {'real tokens':>12}")
  for what, tokens_per_s, fill in table:
    print(f"{what:<44} {tokens_per_s:>12,.0f} {fill:>11.1%}")
  tokens_per_s, loss = model_row(partitioner, args.model_batch_size, args.model_steps)
  print(f"{'gpt3_tiny fwd+bwd, seq 256, reference attn':<44} {tokens_per_s:>12,.0f} "
        f"{'':>12}  (loss {loss:.3f})")


if __name__ == "__main__":
  main()
