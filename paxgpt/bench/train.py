"""The train step's time with the layer periods scanned (nn.scan) against
unrolled, with the compile time of each, as a table (a benchmark, not a test).

  python -m paxgpt.bench.train [--shapes=demo,gpt3_small] [--batch=8] [--seq=128]

Shapes: `demo` (gin/experiments/demo.gin's model), or a gin/models file name.
Both variants run the same step (paxgpt/training/train_step.py, the GPT-3 optimizer,
float32, one device) on the same synthetic batch; the losses agree.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from paxgpt.config.model_files import model_config
from paxgpt.model import gpt
from paxgpt.training import optim
from paxgpt.decoding import sampling
from paxgpt.model import sharding
from paxgpt.training import train_step

DEMO = dict(vocab_size=259, num_layers=4, d_model=128, num_heads=4, head_dim=32, max_len=128,
            window=64, dropout_rate=0.05)


def config_of(shape):
  fields = DEMO if shape == "demo" else dataclasses.asdict(model_config(shape))
  return gpt.GPTConfig(**{**fields, "dtype": "float32"})


def time_step(config, batch, seq, steps):
  """(compile s, median step s, final loss) of `steps` train steps."""
  partitioner = sharding.Partitioner(sharding.make_mesh(data=1, fsdp=1, tensor=1,
                                                        devices=jax.devices()[:1]))
  optimizer, schedule = optim.make_optimizer(optim.OptimizerConfig(), 1000)
  step = train_step.make_train_step(config, optimizer, partitioner, schedule=schedule)
  params = sampling.init_params(config, partitioner)
  state = train_step.TrainState(params, optimizer.init(params), jnp.int32(0))
  tokens = np.random.default_rng(0).integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
  data = {"decoder_target_tokens": tokens, "decoder_input_tokens": tokens,
          "decoder_loss_weights": np.ones_like(tokens), "decoder_segment_ids": np.ones_like(tokens),
          "decoder_positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape)}
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps + 1):  # the first call is a warm-up
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times[1:])), float(metrics["loss"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="demo,gpt3_small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  print(f"train step, {len(jax.devices())} x {jax.devices()[0].device_kind}, float32, batch "
        f"{args.batch} x {args.seq}, median of {args.steps} steps")
  print(f"{'model':<12} {'scanned ms':>11} {'unrolled ms':>12} {'unrolled/scanned speed':>23} "
        f"{'compile s (scan / unroll)':>26}")
  for shape in args.shapes.split(","):
    config = config_of(shape)
    scanned = time_step(dataclasses.replace(config, scan_layers=True), args.batch, args.seq,
                        args.steps)
    unrolled = time_step(dataclasses.replace(config, scan_layers=False), args.batch, args.seq,
                         args.steps)
    print(f"{shape:<12} {scanned[1] * 1e3:>11.1f} {unrolled[1] * 1e3:>12.1f} "
          f"{scanned[1] / unrolled[1]:>22.2f}x {scanned[0]:>12.1f} / {unrolled[0]:<11.1f}",
          flush=True)


if __name__ == "__main__":
  main()
