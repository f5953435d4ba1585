"""One function per `paxgpt` command: `(args) -> exit code`.

Each builds what the command needs from gin and its flags, calls the library,
and prints the result. Errors are not handled here: library code raises
(UsageError and the other input errors of paxgpt/cli/main.py), and main.py
turns them into one line on stderr and exit code 2.
"""
from __future__ import annotations

import json


def _is_chief():
  import jax
  return jax.process_index() == 0


def train(args):
  """`paxgpt train`: exit 0 when done (or stopped by SIGTERM after saving); a
  NaN/Inf loss is trainer.NonFiniteLossError, a RunError: one line, exit 1."""
  from paxgpt.model import sharding
  from paxgpt.training import trainer
  summary = trainer.train(mesh=sharding.mesh_from_flag(args.mesh, dcn=args.dcn))
  if _is_chief():
    print(json.dumps(summary), flush=True)
  return 0


def evaluate(args):
  """`paxgpt eval`: prints one JSON object (step, validation loss, perplexity)."""
  from paxgpt.model import sharding
  from paxgpt.training import trainer
  result = trainer.evaluate(mesh=sharding.mesh_from_flag(args.mesh, dcn=args.dcn),
                            step=args.step)
  if _is_chief():
    print(json.dumps(result), flush=True)
  return 0


def sample(args):
  """`paxgpt sample`: completions for a JSONL file of prompts (paxgpt/decoding/offline.py)."""
  from paxgpt.decoding import offline
  from paxgpt.model import sharding
  return offline.sample_file(args.prompts, args.output, step=args.step,
                                  mesh=sharding.mesh_from_flag(args.mesh, dcn=args.dcn))


def info(args):
  """`paxgpt info`: a model's size, FLOPs and per-device bytes, without weights."""
  from paxgpt.model import info as info_lib
  from paxgpt.model import gpt
  config = gpt.GPTConfig()
  axis_sizes = info_lib.mesh_axis_sizes(args.mesh)
  info_lib.check_model_on_mesh(config, axis_sizes)
  report = info_lib.describe(config, axis_sizes, args.seq_len)
  print(json.dumps(report) if args.json else info_lib.format_report(config, report))
  return 0


def plan(args):
  """`paxgpt plan`: compile the train step for a mesh; per-device memory."""
  from paxgpt.training import plan as plan_lib
  report = plan_lib.plan(mesh_flag=args.mesh, batch=args.batch, chip=args.chip,
                         topology=args.topology, remat=args.remat, mfu=args.mfu,
                         seq_len=args.seq_len, count_flops=args.flops == "compiled",
                         num_slices=args.num_slices, dcn=args.dcn,
                         microbatches=plan_lib.parse_microbatches(args.microbatches))
  print(json.dumps(report) if args.json else plan_lib.format_report(report))
  return 0


def vocab(args):
  """`paxgpt vocab`: train a SentencePiece vocabulary on a task's train split."""
  from tasks import spm_training
  path = spm_training.train_sentencepiece(args.task, args.size, args.output)
  print(path)
  print(f"use it with: DataConfig.vocabulary = 'spm:{path}'")
  return 0


def import_hf(args):
  """`paxgpt import`: a MODEL_DIR from a transformers GPT-Neo / GPT-2 directory."""
  from paxgpt.interop import hf
  from paxgpt.model import sharding
  summary = hf.import_hf(args.hf_dir, args.model_dir, mesh=sharding.mesh_from_flag(args.mesh),
                         dtype=args.dtype)
  print(json.dumps(summary), flush=True)
  return 0


def export(args):
  """`paxgpt export`: a transformers directory from a MODEL_DIR checkpoint."""
  from paxgpt.interop import hf
  from paxgpt.model import sharding
  summary = hf.export_hf(args.model_dir, args.hf_dir, step=args.step,
                         mesh=sharding.mesh_from_flag(args.mesh))
  print(json.dumps(summary), flush=True)
  return 0


def fewshot(args):
  """`paxgpt fewshot`: the harness's zero-/few-shot scores of MODEL_DIR's
  checkpoint (paxgpt/interop/lm_eval_model.py); prints the harness's results table."""
  import gin
  from paxgpt.interop import lm_eval_model
  from paxgpt.model import sharding
  from paxgpt.errors import UsageError
  try:
    model_dir = gin.query_parameter("%MODEL_DIR")
  except ValueError:
    raise UsageError("paxgpt fewshot needs --gin.MODEL_DIR=\"'DIR'\"") from None
  results = lm_eval_model.run(
      model_dir, args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit,
      include_path=args.include_path, step=args.step, mesh=sharding.mesh_from_flag(args.mesh),
      batch_size=args.batch_size, output=args.output, log_samples=args.log_samples,
      bootstrap_iters=args.bootstrap_iters)
  if _is_chief():
    print(lm_eval_model.results_table(results), flush=True)
  return 0
