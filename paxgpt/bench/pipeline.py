"""Pipeline stages against none on the same devices: the train step's time with
the periods over `stage` x fsdp and over fsdp alone, as a table of ratios
measured in one run (a benchmark, not a test).

  python -m paxgpt.bench.pipeline [--layers=8] [--d_model=128] [--batch=32] [--seq=64]
      [--stages=2] [--microbatches=4] [--steps=5]

Rows (all on every visible device, the same model, batch and microbatches,
float32): stage 1 (fsdp over all devices, the microbatches accumulated), stage
S with repeats 1 and with repeats 2 (fsdp over the rest). Each row reports
the median step time, its ratio to stage 1, and the bubble (S-1)/(R*M+S-1).
The losses agree (the pipelined step is the unpipelined one's arithmetic).
On fake CPU devices every device shares the host's cores: a stage's idle
iterations (the bubble) cost real time here, as they do on an accelerator that
waits, and so do the collectives (host memory copies; an 8-way fsdp gather
costs more than a 4-way one), so the ratio is the schedule's overhead mixed
with the mesh's, not a prediction for an accelerator.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from paxgpt.model import gpt
from paxgpt.model import pipeline
from paxgpt.model import sharding
from paxgpt.training import optim
from paxgpt.training import train_step


def _batch(config, batch, seq):
  tokens = np.random.default_rng(0).integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
  return {"decoder_target_tokens": tokens, "decoder_input_tokens": tokens,
          "decoder_loss_weights": np.ones_like(tokens), "decoder_segment_ids": np.ones_like(tokens),
          "decoder_positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape)}


def time_step(config, stages, repeats, microbatches, data, steps):
  """(compile s, median step s, first loss) of the train step on a mesh of
  `stages` x fsdp over every device."""
  devices = len(jax.devices())
  mesh = sharding.make_mesh(stage=stages, fsdp=devices // stages)
  partitioner = sharding.Partitioner(mesh)
  pipe = pipeline.make(mesh, config, microbatches,
                       pipeline.PipelineConfig(repeats=repeats))
  optimizer, schedule = optim.make_optimizer(optim.OptimizerConfig(), 1000)
  layout = train_step.StateLayout(config, optimizer, partitioner, pipe)
  network = gpt.GPT(config)
  init = jax.jit(lambda key: nn.unbox(network.init(key, jnp.zeros((1, 8), jnp.int32)))["params"],
                 out_shardings=partitioner.tree_shardings(layout.stored_abstract.params))
  with partitioner.activate():
    params = layout.run("params", init(jax.random.key(0)))
  state = train_step.TrainState(params, optimizer.init(params), jnp.int32(0))
  step = train_step.make_train_step(config, optimizer, partitioner, schedule=schedule,
                                    num_microbatches=microbatches, pipeline=pipe,
                                    abstract_state=layout.run_abstract)
  data = jax.device_put(data, partitioner.sharding(train_step.BATCH_NAMES))
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  times, first = [], None
  for _ in range(steps + 1):  # the first call is a warm-up
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    first = float(metrics["loss"]) if first is None else first
  return compile_s, float(np.median(times[1:])), first


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--stages", type=int, default=2)
  parser.add_argument("--microbatches", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  config = gpt.GPTConfig(vocab_size=259, num_layers=args.layers, d_model=args.d_model,
                         num_heads=4, max_len=args.seq, window=args.seq // 2,
                         dtype="float32", remat_policy="full")
  data = _batch(config, args.batch, args.seq)
  s, m = args.stages, args.microbatches
  print(f"train step, {len(jax.devices())} x {jax.devices()[0].device_kind}, {args.layers} "
        f"layers d_model {args.d_model}, batch {args.batch} x {args.seq}, {m} microbatches, "
        f"median of {args.steps} steps")
  print(f"{'mesh':<22} {'repeats':>7} {'bubble':>7} {'step ms':>8} {'vs stage 1':>10} "
        f"{'compile s':>9} {'loss':>8}")
  rows = [(1, 1), (s, 1), (s, 2)]
  base = None
  for stages, repeats in rows:
    compile_s, step_s, loss = time_step(config, stages, repeats, m, data, args.steps)
    base = base or step_s
    bubble = pipeline.Pipeline(stages, repeats, m).bubble if stages > 1 else 0.0
    mesh = f"stage {stages} x fsdp {len(jax.devices()) // stages}"
    print(f"{mesh:<22} {repeats:>7} {bubble:>7.1%} {step_s * 1e3:>8.1f} {step_s / base:>9.2f}x "
          f"{compile_s:>9.1f} {loss:>8.4f}", flush=True)


if __name__ == "__main__":
  main()
