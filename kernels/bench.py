"""Attention kernel benchmark: `python -m kernels.bench [--backends ...] [--quick]`.

Prints, for each backend present on the platform (gpu: Pallas Triton, cudnn:
jax.nn.dot_product_attention(implementation='cudnn'), tpu: Pallas Mosaic,
reference: pure JAX), the forward and forward+backward time and TFLOP/s in
bfloat16 at a fixed token count, dense causal and banded. FLOPs count only
pairs inside the mask: 4*B*H*D*pairs forward, 2.5x that for the backward.
Ratios compare with cudnn and the reference measured in the same run; "band x"
is the banded forward+backward speed-up over dense for the same backend/shape.
On CPU (or with --quick) the shapes are tiny so it runs in seconds; the gpu
backend runs on CPU only with --interpret.

`check_against_reference(...)` is the correctness core the GPU check
(paxgpt/bench/gpu_check.py) runs compiled: a kernel's output and dq, dk, dv against
the float32 reference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import api, masks, reference

FULL = dict(tokens=16384, seqs=(2048, 4096, 8192, 16384), head_dims=(64, 128), width=2048,
            window=256)
QUICK = dict(tokens=512, seqs=(128, 256), head_dims=(64, 128), width=128, window=32)
BACKWARD_FACTOR = 2.5
# The reference keeps about this many [B, H, T, T] float32 buffers alive.
REFERENCE_SCORE_BUFFERS = {"fwd": 3, "fwd+bwd": 6}


def available_backends(platform, interpret):
  if platform == "gpu":
    return ["gpu", "cudnn", "reference"]
  if platform == "tpu":
    return ["tpu", "reference"]
  return (["gpu"] if interpret else []) + ["reference"]


def memory_limit_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"]
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def attention_flops(batch, heads, head_dim, seq_len, window):
  forward = 4 * batch * heads * head_dim * masks.visible_pairs(seq_len, window)
  return forward, forward * (1 + BACKWARD_FACTOR)


def median_ms(fn, args, runs):
  """Compile, warm up, then the median wall time of `runs` synchronised calls."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def make_fns(backend, window, interpret, gpu_options):
  options = dict(gpu_options, interpret=interpret) if backend == "gpu" else {}

  def forward(q, k, v):
    return api.attention(q, k, v, window=window, backend=backend, **options)

  def forward_backward(q, k, v, d_out):
    out, vjp = jax.vjp(forward, q, k, v)
    return out, vjp(d_out)

  return jax.jit(forward), jax.jit(forward_backward)


def measure(backend, shape, window, runs, interpret, memory_limit, gpu_options):
  """{'fwd': ms, 'fwd+bwd': ms, 'out': forward output} or {'note': why not}."""
  batch, seq_len, heads, head_dim = shape
  if backend == "reference":
    need = batch * heads * seq_len * seq_len * 4 * REFERENCE_SCORE_BUFFERS["fwd+bwd"]
    if need > 0.8 * memory_limit:
      return {"note": f"skipped: T^2 scores need ~{need / 2**30:.0f} GiB"}
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  forward, forward_backward = make_fns(backend, window, interpret, gpu_options)
  try:
    result = {"fwd": median_ms(forward, (q, k, v), runs),
              "fwd+bwd": median_ms(forward_backward, (q, k, v, d_out), runs)}
  except Exception as err:  # a backend that cannot run this shape: say so, keep going
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return {"note": f"error: {first_line[:60]}"}
  result["out"] = forward(q, k, v)
  return result


def packed_segment_ids(batch, seq_len, seed=1):
  """Packed documents: ids increase at random boundaries, different per row."""
  starts = np.random.RandomState(seed).rand(batch, seq_len) < 0.08
  starts[:, 0] = False
  return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def values_and_grads(backend, q, k, v, d_out, *, causal=True, window=None, segment_ids=None,
                     interpret=False, **options):
  """((out, dq, dk, dv) of `backend`, the same of the reference in float32 at
  'highest' precision) for one set of inputs: what every kernel check compares."""
  kernel_options = dict(options, interpret=interpret) if backend == "gpu" else {}
  masking = dict(causal=causal, window=window, segment_ids=segment_ids)

  def kernel(q, k, v):
    return api.attention(q, k, v, backend=backend, **masking, **kernel_options)

  def spec(q, k, v):
    return reference.attention(q, k, v, **masking)

  def run(fn):
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return (out, *vjp(d_out))

  with jax.default_matmul_precision("highest"):
    expected = run(spec)
  return run(kernel), expected


def check_against_reference(backend, shape, dtype, window=None, segments=False,
                            interpret=False, **options):
  """{'out'|'dq'|'dk'|'dv': error} of `backend` against the reference (see
  `values_and_grads`) on random inputs of `shape` [B, T, H, D] and `dtype`.

  error = max |got - want| / (max(1, max|want|) + |want|): at most `tol` exactly
  when got is allclose to want with rtol = tol and atol = tol * max(1, max|want|)
  (gradients of long rows grow with the sequence, hence the scale). NaN/Inf
  give an infinite error.
  """
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  segment_ids = packed_segment_ids(shape[0], shape[1]) if segments else None
  got, expected = values_and_grads(backend, q, k, v, d_out, window=window,
                                   segment_ids=segment_ids, interpret=interpret, **options)
  errors = {}
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
    if g.shape != e.shape or not np.all(np.isfinite(g)):
      errors[name] = float("inf")
      continue
    scale = max(1.0, float(np.abs(e).max()))
    errors[name] = float(np.max(np.abs(g - e) / (scale + np.abs(e))))
  return errors


def max_abs_diff(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def ratio(mine, other, key):
  if key not in mine or key not in other:
    return "-"
  return f"{other[key] / mine[key]:.2f}x"


def run(args):
  platform = jax.default_backend()
  quick = args.quick or platform == "cpu"
  sizes = QUICK if quick else FULL
  present = available_backends(platform, args.interpret)
  backends = args.backends or present
  missing = [b for b in backends if b not in present]
  if missing:
    raise SystemExit(f"backends {missing} cannot run on platform {platform!r} "
                     f"(present: {present}; gpu on CPU needs --interpret)")
  runs = args.runs or (3 if quick else 10)
  memory_limit = memory_limit_bytes()
  gpu_options = {name: getattr(args, name) for name in
                 ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps", "num_stages")
                 if getattr(args, name) is not None}
  print(f"# attention benchmark: jax {jax.__version__}, {jax.devices()[0].device_kind} "
        f"({platform}), bfloat16, {sizes['tokens']} tokens per batch, "
        f"heads*head_dim={sizes['width']}, median of {runs} runs"
        + (", quick shapes" if quick else "")
        + (f", gpu options {gpu_options}" if gpu_options else ""))
  header = ("backend", "seq", "batch", "heads", "dim", "mask", "fwd ms", "fwd TF/s",
            "f+b ms", "f+b TF/s", "vs cudnn f/f+b", "vs ref f/f+b", "band x", "max|err|")
  widths = (9, 6, 5, 5, 4, 9, 9, 8, 9, 8, 14, 14, 7, 9)
  print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
  for seq_len in sizes["seqs"]:
    for head_dim in sizes["head_dims"]:
      batch, heads = sizes["tokens"] // seq_len, sizes["width"] // head_dim
      shape = (batch, seq_len, heads, head_dim)
      dense_times = {}
      for window in (None, sizes["window"]):
        results = {b: measure(b, shape, window, runs, args.interpret, memory_limit,
                              gpu_options) for b in backends}
        flops = attention_flops(batch, heads, head_dim, seq_len, window)
        for backend in backends:
          res = results[backend]
          cells = [backend, seq_len, batch, heads, head_dim,
                   "dense" if window is None else f"band{window}"]
          if "note" in res:
            print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + "  " + res["note"])
            continue
          band = "-"
          if window is None:
            dense_times[backend] = res["fwd+bwd"]
          elif backend in dense_times:
            band = f"{dense_times[backend] / res['fwd+bwd']:.2f}x"
          ref = results.get("reference", {})
          err = "-"
          if "out" in ref and backend != "reference":
            err = f"{max_abs_diff(res['out'], ref['out']):.1e}"
          cells += [f"{res['fwd']:.3f}", f"{flops[0] / res['fwd'] / 1e9:.3g}",
                    f"{res['fwd+bwd']:.3f}", f"{flops[1] / res['fwd+bwd'] / 1e9:.3g}",
                    f"{ratio(res, results.get('cudnn', {}), 'fwd')} "
                    f"{ratio(res, results.get('cudnn', {}), 'fwd+bwd')}",
                    f"{ratio(res, ref, 'fwd')} {ratio(res, ref, 'fwd+bwd')}", band, err]
          print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))
        sys.stdout.flush()
  print("# vs X = time of X / time of this backend (>1: faster than X); TF/s counts only "
        "visible pairs (4*B*H*D*pairs fwd, 2.5x for bwd); band x = dense f+b time / banded "
        "f+b time")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backends", nargs="+", choices=api.BACKENDS,
                      help="default: every backend present on this platform")
  parser.add_argument("--quick", action="store_true", help="tiny shapes (always on CPU)")
  parser.add_argument("--interpret", action="store_true",
                      help="run the Pallas gpu kernels in interpret mode (for CPU)")
  parser.add_argument("--runs", type=int, help="timed runs per measurement (median)")
  for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps", "num_stages"):
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int,
                        help=f"{name} of the Pallas gpu kernels (default: theirs)")
  run(parser.parse_args(argv))


if __name__ == "__main__":
  main()
