#!/usr/bin/env bash
# The GPU figures in one prepared run (paxgpt/bench/gpu_check.py): Triton kernel
# correctness, attention TFLOP/s against cuDNN and XLA, train-step MFU per
# attention backend and remat policy, decode tokens/s against the HBM roofline.
# Prints one Markdown table and writes the same rows as JSON.
#
#   bash launch/gpu_check.sh [--json PATH] [--budget_s S] [--sections kernels,...] [--smoke]
#
# On one H100/H200 it ends within 8 minutes of wall time, compilation included
# (the sections share --budget_s, default 400 s; rows past it are listed as
# skipped). Without a GPU, or with --smoke, it runs the same code on tiny shapes
# (Pallas GPU kernels in interpret mode) in under a minute.
#
# What the GPU box needs: Python >= 3.11 with jax[cuda] (0.10 or later, CUDA
# 12/13), flax, optax, orbax-checkpoint and numpy; no TensorFlow, SeqIO or t5
# (the batches are synthetic), no network. The one missing piece is gin-config,
# which paxgpt's modules import (pure Python, 61 kB). Carry its wheel in .whl/
# (git ignores it):
#
#   here:   python -m pip download --no-deps -d .whl gin-config==0.5.0
#   there:  nothing to install: when `import gin` fails, this script puts
#           .whl/gin_config-*.whl on PYTHONPATH (a pure-Python wheel imports
#           straight from the zip).
#
# With the device tool (the repository root is the working directory; the
# table comes back in the output's tail and, with the JSON and the log, in $OUT):
#   run(command='bash launch/gpu_check.sh --json "$OUT/gpu_check.json"
#                2> "$OUT/gpu_check.log" | tee "$OUT/gpu_check.md"',
#       carry=[".whl"], timeout_s=540)
#
# PAXGPT_PYTHON overrides the interpreter (default: python3).
# XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.90 here (JAX's default 0.75)
# so that the train step's batch search may use most of the device.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PAXGPT_PYTHON:-python3}"

if ! "$python" -c "import gin; gin.configurable" 2>/dev/null; then
  wheel="$(find .whl -maxdepth 1 -name 'gin_config-*.whl' 2>/dev/null | sort | tail -n 1)"
  if [ -z "$wheel" ]; then
    echo "gpu_check.sh: gin-config is not installed and no .whl/gin_config-*.whl was carried;" \
      "run 'python -m pip download --no-deps -d .whl gin-config==0.5.0' where there is a" \
      "network and carry .whl" >&2
    exit 2
  fi
  export PYTHONPATH="$root/$wheel${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

exec "$python" -m paxgpt.bench.gpu_check "$@"
