"""Decode throughput: tokens per second of the KV-cached sampler per batch size.

  python -m paxgpt.bench_decode [--gin_file=FILE (default gin/experiments/demo.gin)]
      [--gin.NAME=VALUE]
      [--batch_sizes=1,8,32] [--prompt_len=32] [--new_tokens=64] [--mesh=data:1,fsdp:-1]
      [--checkpoint_dir=DIR]

Random weights unless --checkpoint_dir is given (a training MODEL_DIR). Greedy
decoding with no EOS, so every row decodes all new tokens. Prints a table: the
prefill time, the time per decode step (one token for every row), and decode
tokens per second (batch x decoded tokens / decode time). The first call of each
shape compiles and is not timed.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from paxgpt.cli import main as cli
from paxgpt import model, sampling, sharding
from paxgpt.errors import UsageError

DEFAULT_GIN = "gin/experiments/demo.gin"


def register_run_configurables():
  """Experiment files bind the trainer's and the data's settings too; register
  them so such files parse. The data side needs TensorFlow: on a JAX-only box
  pass a gin/models file instead."""
  from paxgpt import trainer  # noqa: F401
  try:
    from paxgpt import data  # noqa: F401
  except ImportError:
    pass


def measure(decoder, batch, prompt_len, new_tokens, vocab_size, repeats=2, seed=0):
  """(prefill seconds, decode seconds) for one batch, best of `repeats`."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(3, vocab_size, size=(batch, prompt_len)).astype(np.int32)
  lengths = np.full(batch, prompt_len, np.int32)
  rows = sampling.make_rows(batch, temperature=0.0, max_tokens=new_tokens)
  prefill = decoder._prefill_fn(new_tokens, 0)
  decode = decoder._decode_fn(0)
  put = decoder._put
  best = (float("inf"), float("inf"))
  with decoder.partitioner.activate():
    device_rows = put(jax.tree.map(jnp.asarray, rows))
    tokens, lengths = put(jnp.asarray(prompts)), put(jnp.asarray(lengths))
    for attempt in range(repeats + 1):  # the first one compiles
      start = time.perf_counter()
      state = prefill(decoder.params, tokens, lengths, device_rows)
      jax.block_until_ready(state.tokens)
      middle = time.perf_counter()
      state = decode(decoder.params, state, device_rows, jnp.int32(new_tokens))
      jax.block_until_ready(state.tokens)
      end = time.perf_counter()
      if int(state.step) != new_tokens:
        raise RuntimeError(f"decoded {int(state.step)} of {new_tokens} tokens")
      if attempt:
        best = (min(best[0], middle - start), min(best[1], end - middle))
  return best


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  files, bindings, rest = cli.split_gin_flags(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="1,8,32")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--mesh", default=None)
  parser.add_argument("--checkpoint_dir", default=None)
  args = parser.parse_args(rest)
  register_run_configurables()
  # Experiment files require MODEL_DIR (for training); the benchmark trains nothing.
  cli.parse_gin(files or [DEFAULT_GIN], [f"MODEL_DIR = {args.checkpoint_dir!r}"] + bindings)
  config = model.GPTConfig()
  overrides = sharding.parse_mesh_flag(args.mesh) if args.mesh else {}
  partitioner = sharding.Partitioner(sharding.make_mesh(**overrides))
  if args.checkpoint_dir:
    from paxgpt import checkpoint
    abstract, shardings = sampling.abstract_params(config, partitioner)
    params = checkpoint.restore_params(args.checkpoint_dir, abstract, shardings)
    weights = args.checkpoint_dir
  else:
    params = sampling.init_params(config, partitioner)
    weights = "random"
  decoder = sampling.Decoder(config, params, partitioner, eos_id=None)
  device = jax.devices()[0]
  print(f"decode benchmark: {config.num_layers} layers, d_model {config.d_model}, "
        f"{config.dtype}, {weights} weights, {len(jax.devices())} x {device.device_kind}, "
        f"mesh {dict(partitioner.axis_sizes)}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens")
  print(f"{'batch':>6} {'prefill ms':>11} {'ms/step':>9} {'decode tok/s':>13}")
  for batch in (int(b) for b in args.batch_sizes.split(",")):
    prefill_s, decode_s = measure(decoder, batch, args.prompt_len, args.new_tokens,
                                  config.vocab_size)
    steps = args.new_tokens - 1  # the prefill chose the first token
    print(f"{batch:>6} {prefill_s * 1e3:>11.2f} {decode_s / steps * 1e3:>9.3f} "
          f"{batch * steps / decode_s:>13.1f}", flush=True)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except UsageError as e:
    cli.fail(cli.one_line(e))
