"""Decode throughput: tokens per second of the KV-cached sampler per batch size.

  python -m paxgpt.bench.decode [--gin_file=FILE (default gin/experiments/demo.gin)]
      [--gin.NAME=VALUE]
      [--batch_sizes=1,8,32] [--prompt_len=32] [--new_tokens=64] [--mesh=data:1,fsdp:-1]
      [--checkpoint_dir=DIR] [--scan_layers] [--repeats=3]
  python -m paxgpt.bench.decode --vs_hf [--batch_sizes=1,8,32] [--prompt_len=64]
      [--new_tokens=128] [--hf_threads=N]
  python -m paxgpt.bench.decode --workload [--requests=96] [--slots=32] [--models=gpt2,gpt_neo]
      [--decoders=engine,uniform,static,hf_static,hf_cb] [--hf_threads=N]
      (paxgpt/bench/workload.py: mixed prompt and output lengths through the decode
      engine, the static sampler and transformers)

Random weights unless --checkpoint_dir is given (a training MODEL_DIR). Greedy
decoding with no EOS, so every row decodes all new tokens. Prints a table: the
prefill time, the time per decode step (one token for every row), and tokens
per second (batch x new tokens / (prefill + decode) time, the basis on which
transformers' generate() is timed). The first call of each shape compiles; its
wall time is reported ("1st call s") and it is not timed. The rest are the best
of `--repeats` (the first runs of a large batch also pay for fresh memory). --scan_layers decodes with the scanned layer
stack instead of the unrolled one.

--vs_hf builds a GPT-Neo-125M-shaped model (12 layers, d 768, 12 heads, window
256, vocab 50257, float32) in transformers with random weights, maps it into
paxgpt, and times transformers' generate() (torch, eager) against the Decoder
on the same prompts, with the ratio and whether every row's tokens are identical.
--hf_threads sets torch's intra-op threads (default: torch's choice); on a
machine shared with other work, torch's spinning OpenMP threads slow down many
times over while one thread does not, so pick the faster. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax
import numpy as np

from paxgpt.config import gin_flags
from paxgpt.interop import hf as hf_lib
from paxgpt.model import gpt
from paxgpt.decoding import sampling
from paxgpt.model import sharding
from paxgpt.errors import UsageError, one_line

DEFAULT_GIN = "gin/experiments/demo.gin"


def random_prompts(batch, prompt_len, vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(3, vocab_size, size=(batch, prompt_len)).astype(np.int32)


def measure(decoder, batch, prompt_len, new_tokens, vocab_size, repeats=2, seed=0):
  """(prefill s, decode s) of greedy decoding for a batch of random prompts, best
  of `repeats` after a compiling call (what paxgpt/bench/gpu_check.py times)."""
  prompts = random_prompts(batch, prompt_len, vocab_size, seed)
  _, prefill_s, decode_s, _ = time_batch(decoder, prompts, new_tokens, repeats)
  return prefill_s, decode_s


def time_batch(decoder, prompts, new_tokens, repeats=3):
  """(first call s, prefill s, decode s, token lists) for one batch: the first
  call compiles, then the best of `repeats`."""
  batch = len(prompts)
  rows = sampling.make_rows(batch, temperature=0.0, max_tokens=new_tokens)
  prompts = [list(p) for p in prompts]
  best, first = (float("inf"), float("inf")), 0.0
  for attempt in range(repeats + 1):
    start = time.perf_counter()
    run = decoder.prefill(prompts, rows)
    jax.block_until_ready(run.state.tokens)
    middle = time.perf_counter()
    run = decoder.decode(run, new_tokens)
    jax.block_until_ready(run.state.tokens)
    end = time.perf_counter()
    if int(run.state.step) != new_tokens:
      raise RuntimeError(f"decoded {int(run.state.step)} of {new_tokens} tokens")
    if attempt:
      best = (min(best[0], middle - start), min(best[1], end - middle))
    else:
      first = end - start
  ids, _ = sampling.generated(run.state)
  return first, best[0], best[1], ids[:batch]


# ---------------------------------------------------------------------------
# Against transformers' generate().


def hf_neo(seed=0):
  """A randomly initialised transformers GPT-Neo of GPT-Neo-125M's shape (float32,
  global/local layers, window 256), eval mode."""
  import torch
  from transformers import GPTNeoConfig, GPTNeoForCausalLM
  torch.manual_seed(seed)
  hf = GPTNeoForCausalLM(GPTNeoConfig(
      vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
      num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
  hf.generation_config.eos_token_id = None  # decode every new token, as paxgpt's rows do
  hf.generation_config.pad_token_id = 0
  return hf


def paxgpt_from_hf(hf_model, partitioner):
  """(GPTConfig, params) of a transformers model through paxgpt/interop/hf.py's own
  tables, as `paxgpt import` maps it (ids shifted by hf.SHIFT)."""
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    _, model_type, config, weights = hf_lib.read_hf(tmp)
    params, _ = hf_lib.stream_params(weights, model_type, config, partitioner)
  return config, params


def hf_generate(hf, prompts, new_tokens):
  """(seconds, new token ids [batch, new_tokens]) of greedy generate()."""
  import torch
  ids = torch.from_numpy(np.asarray(prompts, np.int64))
  with torch.inference_mode():
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
  return seconds, out[:, ids.shape[1]:].numpy()


def vs_hf(args, partitioner):
  import torch
  if args.hf_threads:
    torch.set_num_threads(args.hf_threads)
  hf = hf_neo()
  config, params = paxgpt_from_hf(hf, partitioner)
  decoder = sampling.Decoder(config, params, partitioner, eos_id=None,
                             scan_layers=args.scan_layers)
  print(f"decode vs transformers {__import__('transformers').__version__} generate() "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads): GPT-Neo-125M shape, "
        f"random weights, float32, {len(jax.devices())} x {jax.devices()[0].device_kind}, "
        f"{'scanned' if args.scan_layers else 'unrolled'} layers, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy")
  print(f"{'batch':>6} {'1st call s':>10} {'prefill ms':>11} {'ms/step':>9} {'paxgpt tok/s':>13} "
        f"{'HF tok/s':>9} {'paxgpt/HF':>10} {'tokens':>10}")
  hf_vocab = config.vocab_size - hf_lib.SHIFT
  hf_generate(hf, random_prompts(1, args.prompt_len, hf_vocab), 2)  # warm up torch
  for batch in args.batch_sizes:
    prompts = random_prompts(batch, args.prompt_len, hf_vocab)
    first_s, prefill_s, decode_s, ids = time_batch(decoder, prompts + hf_lib.SHIFT,
                                                   args.new_tokens, args.repeats)
    ids = [[i - hf_lib.SHIFT for i in row] for row in ids]
    hf_s, hf_ids = hf_generate(hf, prompts, args.new_tokens)
    ours = batch * args.new_tokens / (prefill_s + decode_s)
    theirs = batch * args.new_tokens / hf_s
    same = sum(list(a) == list(b) for a, b in zip(ids, hf_ids.tolist()))
    print(f"{batch:>6} {first_s:>10.1f} {prefill_s * 1e3:>11.1f} "
          f"{decode_s / (args.new_tokens - 1) * 1e3:>9.2f} {ours:>13.1f} {theirs:>9.1f} "
          f"{ours / theirs:>9.2f}x {f'{same}/{batch} same':>10}", flush=True)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  files, bindings, rest = gin_flags.split_gin_flags(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="1,8,32")
  parser.add_argument("--prompt_len", type=int, default=None)
  parser.add_argument("--new_tokens", type=int, default=None)
  parser.add_argument("--mesh", default=None)
  parser.add_argument("--checkpoint_dir", default=None)
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--vs_hf", action="store_true")
  parser.add_argument("--hf_threads", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workload", action="store_true")
  parser.add_argument("--requests", type=int, default=96)
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--steps_per_call", type=int, default=8)
  parser.add_argument("--prefill_tokens", type=int, default=512)
  parser.add_argument("--models", default="gpt2,gpt_neo")
  parser.add_argument("--decoders", default="engine,uniform,static,hf_static,hf_cb")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(rest)
  if args.workload:
    if files or bindings or args.checkpoint_dir or args.vs_hf:
      raise UsageError("--workload builds its own models: no gin flags, --checkpoint_dir or "
                       "--vs_hf")
    from paxgpt.bench import workload
    return workload.main(args, sharding.Partitioner(sharding.mesh_from_flag(args.mesh)))
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  args.prompt_len = args.prompt_len or (64 if args.vs_hf else 32)
  args.new_tokens = args.new_tokens or (128 if args.vs_hf else 64)
  if args.vs_hf and (files or bindings or args.checkpoint_dir):
    raise UsageError("--vs_hf builds its own GPT-Neo-shaped model: no gin flags or "
                     "--checkpoint_dir")
  if args.vs_hf:
    vs_hf(args, sharding.Partitioner(sharding.mesh_from_flag(args.mesh)))
    return 0
  gin_flags.register_configurables()
  # Experiment files require MODEL_DIR (for training); the benchmark trains nothing.
  gin_flags.parse_gin(files or [DEFAULT_GIN], [f"MODEL_DIR = {args.checkpoint_dir!r}"] + bindings)
  config = gpt.GPTConfig()
  partitioner = sharding.Partitioner(sharding.mesh_from_flag(args.mesh))
  if args.checkpoint_dir:
    from paxgpt.store import checkpoint
    params = checkpoint.restore_params(
        args.checkpoint_dir, partitioner.abstract(gpt.abstract_variables(config)["params"]))
    weights = args.checkpoint_dir
  else:
    params = sampling.init_params(config, partitioner)
    weights = "random"
  decoder = sampling.Decoder(config, params, partitioner, eos_id=None,
                             scan_layers=args.scan_layers)
  device = jax.devices()[0]
  print(f"decode benchmark: {config.num_layers} layers, d_model {config.d_model}, "
        f"{config.dtype}, {weights} weights, {len(jax.devices())} x {device.device_kind}, "
        f"mesh {dict(partitioner.axis_sizes)}, {'scanned' if args.scan_layers else 'unrolled'} "
        f"layers, prompt {args.prompt_len}, {args.new_tokens} new tokens")
  print(f"{'batch':>6} {'1st call s':>10} {'prefill ms':>11} {'ms/step':>9} {'tok/s':>9}")
  for batch in args.batch_sizes:
    prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
    first_s, prefill_s, decode_s, _ = time_batch(decoder, prompts, args.new_tokens, args.repeats)
    print(f"{batch:>6} {first_s:>10.1f} {prefill_s * 1e3:>11.2f} "
          f"{decode_s / (args.new_tokens - 1) * 1e3:>9.3f} "
          f"{batch * args.new_tokens / (prefill_s + decode_s):>9.1f}", flush=True)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except UsageError as e:
    print(f"paxgpt: error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
