"""A batch-decoding workload through paxgpt's engine, its static sampler and transformers.

  python -m paxgpt.bench.decode --workload [--requests=96] [--slots=32]
      [--models=gpt2,gpt_neo] [--decoders=engine,uniform,static,hf_static,hf_cb]
      [--hf_threads=N] [--seed=0]

One process, one set of random weights per model (built in transformers, mapped
into paxgpt through paxgpt/interop/hf.py), float32, greedy, EOS unreachable (so
every request decodes exactly its max_tokens). The workload follows vLLM's
benchmark style: prompt lengths uniform in 8-300 tokens, max_tokens lognormal
with median 24 (sigma 1) clipped to 4-256, fixed per request. The decoders:

  engine     paxgpt's continuous-batching engine (paxgpt/decoding/engine.py),
             `--slots` slots; timed twice: the first run compiles ("cold")
  uniform    the same engine on a uniform workload of as many requests, every
             prompt and max_tokens at the mixed workload's means
  static     today's static sampler (sampling.Decoder.sample) batched as `paxgpt
             sample` batched before the engine: chunks of 8 batches sorted by
             prompt length, `--slots` rows a batch, each batch decoding until its
             longest max_tokens
  hf_static  transformers generate() in the same static batches (left padding)
  hf_cb      transformers continuous batching (init_continuous_batching,
             per-request max_new_tokens, `--slots` requests a batch at most)

Printed per model: wall seconds, useful output tokens/s (the tokens the requests
asked for / wall), total tokens/s (prompt + output), slot occupancy (the share of
the decoded row-tokens a request kept: the engine's shrunk tail decodes fewer
rows), the ratio to the engine, and how many
requests' greedy ids equal the engine's. paxgpt's timings other than "cold"
exclude compilation (programs compiled by an earlier run of the same shapes).
A benchmark, not a test.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import numpy as np

from paxgpt.decoding import engine as engine_lib
from paxgpt.decoding import sampling
from paxgpt.interop import hf as hf_lib

DECODERS = ("engine", "uniform", "static", "hf_static", "hf_cb")
MODELS = ("gpt2", "gpt_neo")


@dataclasses.dataclass
class Workload:
  prompts: list  # HF ids
  max_tokens: list

  @property
  def output_tokens(self):
    return int(sum(self.max_tokens))

  @property
  def prompt_tokens(self):
    return int(sum(len(p) for p in self.prompts))


def mixed(n, vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(8, 301, n)
  max_tokens = np.clip(np.round(rng.lognormal(np.log(24), 1.0, n)), 4, 256).astype(int)
  prompts = [rng.integers(1, vocab_size, k).tolist() for k in lengths]
  return Workload(prompts, max_tokens.tolist())


def uniform_like(work, vocab_size, seed=1):
  """As many requests, every prompt and max_tokens at `work`'s means."""
  rng = np.random.default_rng(seed)
  n = len(work.prompts)
  length = round(work.prompt_tokens / n)
  return Workload([rng.integers(1, vocab_size, length).tolist() for _ in range(n)],
                  [round(work.output_tokens / n)] * n)


def hf_model(name, seed=0):
  """A random transformers model of GPT-2-124M's or GPT-Neo-125M's shape, eval mode,
  EOS unreachable (no EOS id: every row decodes all its new tokens)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  if name == "gpt2":
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                                     n_head=12, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config)
  else:
    config = transformers.GPTNeoConfig(
        vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
        num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256,
        bos_token_id=None, eos_token_id=None)
    model = transformers.GPTNeoForCausalLM(config)
  model.eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def paxgpt_params(model, partitioner):
  """(GPTConfig, unrolled params) of a transformers model, mapped as `paxgpt import` maps it."""
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    _, model_type, config, weights = hf_lib.read_hf(tmp)
    params, _ = hf_lib.stream_params(weights, model_type, config, partitioner)
  return config, sampling.decode_params(params, config, partitioner, consume=True)


@dataclasses.dataclass
class Result:
  name: str
  wall_s: float
  ids: list | None  # per request, HF ids
  occupancy: float | None = None
  note: str = ""


def run_engine(engine, work, name):
  requests = [engine_lib.Request(ids=[t + hf_lib.SHIFT for t in p], max_tokens=m,
                                 key=sampling.row_key(0, 0), temperature=0.0)
              for p, m in zip(work.prompts, work.max_tokens)]
  ids = [None] * len(requests)
  engine.stats = engine_lib.Stats()
  start = time.perf_counter()
  engine.run(requests, lambda i, out, _: ids.__setitem__(i, [t - hf_lib.SHIFT for t in out]))
  wall = time.perf_counter() - start
  stats = engine.stats
  note = (f"prefill {stats.insert_s:.1f} s in {stats.inserts} packs "
          f"({stats.prompt_tokens / max(stats.pack_tokens, 1):.0%} filled), decode "
          f"{stats.generate_s:.1f} s in {stats.generate_calls} calls, the tail shrunk "
          f"{stats.shrinks} times")
  return Result(name, wall, ids, stats.occupancy, note)


def static_batches(work, slots):
  """Today's `paxgpt sample` batching: chunks of 8 batches sorted by prompt length."""
  order, chunk = [], 8 * slots
  for start in range(0, len(work.prompts), chunk):
    rows = sorted(range(start, min(start + chunk, len(work.prompts))),
                  key=lambda i: len(work.prompts[i]))
    order += [rows[i:i + slots] for i in range(0, len(rows), slots)]
  return order


def _occupancy(work, batches):
  used = sum(work.max_tokens[i] for b in batches for i in b)
  slot_steps = sum(len(b) * max(work.max_tokens[i] for i in b) for b in batches)
  return used / slot_steps


def run_static(decoder, work, slots):
  ids = [None] * len(work.prompts)
  batches = static_batches(work, slots)
  start = time.perf_counter()
  for batch in batches:
    prompts = [[t + hf_lib.SHIFT for t in work.prompts[i]] for i in batch]
    width = -(-max(map(len, prompts)) // 16) * 16
    max_new = -(-max(work.max_tokens[i] for i in batch) // 16) * 16
    rows = sampling.make_rows(len(batch), temperature=0.0,
                              max_tokens=[work.max_tokens[i] for i in batch])
    out, _ = decoder.sample(prompts, rows, width=width, max_new_tokens=max_new,
                            rows_to=min(slots, 1 << (len(batch) - 1).bit_length()))
    for i, row in zip(batch, out):
      ids[i] = [t - hf_lib.SHIFT for t in row]
  return Result("static", time.perf_counter() - start, ids, _occupancy(work, batches))


def run_hf_static(model, work, slots):
  import torch
  ids = [None] * len(work.prompts)
  batches = static_batches(work, slots)
  start = time.perf_counter()
  with torch.inference_mode():
    for batch in batches:
      width = max(len(work.prompts[i]) for i in batch)
      tokens = torch.zeros((len(batch), width), dtype=torch.long)
      mask = torch.zeros((len(batch), width), dtype=torch.long)
      for row, i in enumerate(batch):  # left padding, as decoder-only batching needs
        tokens[row, width - len(work.prompts[i]):] = torch.tensor(work.prompts[i])
        mask[row, width - len(work.prompts[i]):] = 1
      new = max(work.max_tokens[i] for i in batch)
      out = model.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=new,
                           min_new_tokens=new)[:, width:].tolist()
      for row, i in enumerate(batch):
        ids[i] = out[row][:work.max_tokens[i]]
  return Result("hf_static", time.perf_counter() - start, ids, _occupancy(work, batches))


def run_hf_cb(model, work, slots):
  import torch
  from transformers import GenerationConfig
  from transformers.generation.configuration_utils import ContinuousBatchingConfig
  config = GenerationConfig(do_sample=False, max_new_tokens=max(work.max_tokens),
                            eos_token_id=-1, pad_token_id=0)
  ids = [None] * len(work.prompts)
  start = time.perf_counter()
  try:
    with torch.inference_mode(), model.continuous_batching_context_manager(
        generation_config=config, warmup=False,
        continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=slots)) as cb:
      for i, (p, m) in enumerate(zip(work.prompts, work.max_tokens)):
        cb.add_request(p, request_id=str(i), max_new_tokens=m, eos_token_id=-1)
      left = len(work.prompts)
      while left:
        result = cb.get_result(timeout=5)
        if result is None:
          if not cb.is_running():
            raise RuntimeError("the continuous batching loop stopped")
          continue
        if result.is_finished():
          ids[int(result.request_id)] = list(result.generated_tokens)
          left -= 1
  except Exception as e:  # pylint: disable=broad-except  (a row of the table, not a crash)
    return Result("hf_cb", time.perf_counter() - start, None,
                  note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
  wall = time.perf_counter() - start
  # Its worker thread logs an error and still returns the requests, short (GPT-Neo in
  # transformers 5.24: PagedAttentionCache.update() misses its `kwargs`).
  short = sum(len(i) < m for i, m in zip(ids, work.max_tokens))
  if short:
    return Result("hf_cb", wall, None, note=f"failed: {short}/{len(ids)} requests came back "
                                            f"short of their max_tokens (its error on stderr)")
  return Result("hf_cb", wall, ids)


def _same(ids, reference):
  if ids is None or reference is None:
    return "-"
  return f"{sum(a == b for a, b in zip(ids, reference))}/{len(reference)}"


def bench_model(name, args, partitioner, decoders):
  model = hf_model(name)
  config, params = paxgpt_params(model, partitioner)
  vocab = model.config.vocab_size
  work = mixed(args.requests, vocab, args.seed)
  print(f"\n{name}: {config.num_layers} layers, d_model {config.d_model}, "
        f"{'/'.join(config.attention_pattern)} attention (window {config.window}), "
        f"{len(work.prompts)} requests: prompts {min(map(len, work.prompts))}-"
        f"{max(map(len, work.prompts))} tokens (mean {work.prompt_tokens / len(work.prompts):.1f}),"
        f" max_tokens {min(work.max_tokens)}-{max(work.max_tokens)} "
        f"(mean {work.output_tokens / len(work.prompts):.1f}), {args.slots} slots", flush=True)
  engine = engine_lib.Engine(config, params, partitioner, eos_id=None, slots=args.slots,
                             steps_per_call=args.steps_per_call,
                             prefill_tokens=args.prefill_tokens)
  results, uniform = [], None
  if "engine" in decoders or "uniform" in decoders:
    cold = run_engine(engine, work, "engine, cold (compiles)")
    results.append(cold)
    results.append(run_engine(engine, work, "engine"))
  if "uniform" in decoders:
    uniform = uniform_like(work, vocab)
    run_engine(engine, uniform, "uniform")  # compiles its pack widths
    results.append(run_engine(engine, uniform, "engine, uniform workload"))
  if "static" in decoders:
    decoder = sampling.Decoder(config, params, partitioner, eos_id=None)
    run_static(decoder, work, args.slots)  # compiles
    results.append(run_static(decoder, work, args.slots))
  if "hf_static" in decoders:
    results.append(run_hf_static(model, work, args.slots))
  if "hf_cb" in decoders:
    results.append(run_hf_cb(model, work, args.slots))
  reference = next((r for r in results if r.name == "engine"), None)
  print(f"| decoder | wall s | useful output tok/s | total tok/s | slot occupancy | "
        f"engine / this | greedy ids = engine's | note |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  engine_rate = None if reference is None else work.output_tokens / reference.wall_s
  for r in results:
    tokens = uniform if r.name == "engine, uniform workload" else work
    rate = tokens.output_tokens / r.wall_s
    total = (tokens.output_tokens + tokens.prompt_tokens) / r.wall_s
    if r.ids is None or engine_rate is None:
      ratio = "-"
    elif tokens is uniform:
      ratio = f"mixed at {engine_rate / rate:.0%} of this"
    else:
      ratio = f"{engine_rate / rate:.2f}x"
    same = "-" if tokens is uniform else _same(r.ids, reference.ids if reference else None)
    occupancy = "-" if r.occupancy is None else f"{r.occupancy:.0%}"
    failed = r.note.startswith("failed")
    rate, total = ("-", "-") if failed else (f"{rate:.1f}", f"{total:.1f}")
    print(f"| {r.name} | {r.wall_s:.1f} | {rate} | {total} | {occupancy} | {ratio} | "
          f"{same} | {r.note} |", flush=True)
  return results


def main(args, partitioner):
  import torch
  import transformers
  if args.hf_threads:
    torch.set_num_threads(args.hf_threads)
  decoders = args.decoders.split(",")
  bad = [d for d in decoders if d not in DECODERS] + [
      m for m in args.models.split(",") if m not in MODELS]
  if bad:
    raise ValueError(f"unknown decoder or model {bad[0]!r} (decoders: {DECODERS}, "
                     f"models: {MODELS})")
  print(f"decode workload: paxgpt engine vs static sampler vs transformers "
        f"{transformers.__version__} (torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads), {len(jax.devices())} x {jax.devices()[0].device_kind}, float32, greedy, "
        f"EOS unreachable")
  for name in args.models.split(","):
    bench_model(name, args, partitioner, decoders)
  return 0
