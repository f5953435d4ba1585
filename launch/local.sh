#!/usr/bin/env bash
# The CPU demo end to end: set up .venv, train the ~0.9M-parameter GPT-3-shaped byte
# model of gin/experiments/demo.gin on pydoc_topics (under ten minutes on a laptop
# CPU), then use it. MODEL_DIR defaults to runs/demo; a second run resumes there.
#   bash launch/local.sh            # or: MODEL_DIR=/tmp/demo bash launch/local.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
MODEL_DIR="${MODEL_DIR:-runs/demo}"

echo "== training gin/experiments/demo.gin into $MODEL_DIR"
paxgpt train --gin_file=gin/experiments/demo.gin --gin.MODEL_DIR="'$MODEL_DIR'"

echo "== evaluating the latest checkpoint"
paxgpt eval --gin_file=gin/experiments/demo.gin --gin_file=gin/runs/eval.gin \
  --gin.MODEL_DIR="'$MODEL_DIR'"

echo "== sampling launch/demo_prompts.jsonl from the latest checkpoint"
paxgpt sample --gin_file=gin/experiments/demo.gin --gin_file=gin/runs/sample.gin \
  --gin.CHECKPOINT_DIR="'$MODEL_DIR'" --prompts=launch/demo_prompts.jsonl \
  --output="$MODEL_DIR/samples.jsonl"
python - "$MODEL_DIR/samples.jsonl" <<'PRINT'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
  out = json.loads(line)
  if "error" in out:
    print(f"-- line {out['line']}: {out['error']}")
    continue
  for text, reason in zip(out["completions"], out["finish_reason"]):
    print(f"-- {out['prompt']!r} ({reason}):\n{out['prompt']}{text}\n")
PRINT
