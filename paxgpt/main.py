"""The paxgpt CLI, t5x style:

  paxgpt COMMAND --gin_file=FILE [--gin_file=...] [--gin.NAME=VALUE ...] [flags]

Commands: train, eval, sample, info, plan, vocab. Gin files are looked up
relative to the working directory, then to the paxgpt checkout. Any bad input
(an unknown gin binding, a parameter typo, a missing --gin_file, a mesh that
does not fit the devices) ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys

import gin

from paxgpt import distributed
from paxgpt.errors import UsageError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Command:
  target: str  # "module:function", imported only when the command runs
  help: str
  needs_gin: bool = True
  flags: tuple = ()  # (name, kwargs for argparse.add_argument)


MESH_FLAG = ("--mesh", dict(default=None,
                            help="mesh axis sizes, e.g. data:1,fsdp:8,tensor:1 (-1: the rest)"))
JSON_FLAG = ("--json", dict(action="store_true", help="print one JSON object"))

COMMANDS = {
    "train": Command("paxgpt.trainer:train_command", "train (or resume) a model in MODEL_DIR",
                     flags=(MESH_FLAG,)),
    "eval": Command("paxgpt.trainer:eval_command",
                    "validation loss and perplexity of a checkpoint",
                    flags=(MESH_FLAG, ("--step", dict(type=int, default=None,
                                                      help="checkpoint step (default latest)")))),
    "sample": Command("paxgpt.sampling_cli:sample_command",
                      "sample completions for a JSONL file of prompts",
                      flags=(MESH_FLAG,
                             ("--prompts", dict(required=True, help="input JSONL")),
                             ("--output", dict(required=True, help="output JSONL")),
                             ("--step", dict(type=int, default=None,
                                             help="checkpoint step (default latest)")))),
    "info": Command("paxgpt.info:info_command",
                    "parameters, FLOPs per token and bytes per device of a model",
                    flags=(MESH_FLAG, JSON_FLAG,
                           ("--seq_len", dict(type=int, default=None,
                                              help="sequence length for FLOPs (default max_len)")))),
    "plan": Command("paxgpt.plan:plan_command",
                    "compile the train step for a mesh and report per-device memory",
                    flags=(MESH_FLAG, JSON_FLAG,
                           ("--batch", dict(type=int, default=None, help="global batch size")),
                           ("--chip", dict(default=None, help="v4|v5e|v5p|v6e|h100|h200")),
                           ("--topology", dict(default=None,
                                               help="TPU topology, e.g. 4x4x8 (needs libtpu)")),
                           ("--remat", dict(default="full", choices=("none", "full",
                                                                     "dots_saveable"),
                                            help="rematerialisation policy (default full)")),
                           ("--mfu", dict(type=float, default=0.4,
                                          help="MFU assumed for the step time (default 0.4)")),
                           ("--seq_len", dict(type=int, default=None,
                                              help="sequence length (default max_len)")))),
    "vocab": Command("tasks.vocabularies:vocab_command",
                     "train a SentencePiece vocabulary on a task's train split", needs_gin=False,
                     flags=(("--task", dict(required=True, help="registered task name")),
                            ("--size", dict(type=int, required=True, help="vocabulary size")),
                            ("--output", dict(required=True, help="output directory")))),
}

# Commands that run on every process of a multi-host run (paxgpt/distributed.py).
MULTI_PROCESS_COMMANDS = ("train", "eval", "sample")


class _Parser(argparse.ArgumentParser):
  """argparse that reports a bad flag as one line and exit code 2."""

  def error(self, message):
    fail(f"{self.prog}: {message}")


def fail(message):
  print(f"paxgpt: error: {message}", file=sys.stderr)
  sys.exit(2)


def one_line(text):
  return re.sub(r"\s+", " ", str(text)).strip()


def split_gin_flags(argv):
  """Pull --gin_file=F and --gin.NAME=VALUE out of argv (t5x's flag style)."""
  files, bindings, rest = [], [], []
  it = iter(argv)
  for arg in it:
    if arg == "--gin_file":
      files.append(next(it, ""))
    elif arg.startswith("--gin_file="):
      files.append(arg.split("=", 1)[1])
    elif arg.startswith("--gin."):
      binding = arg[len("--gin."):]
      if "=" not in binding:
        fail(f"{arg}: expected --gin.NAME=VALUE")
      bindings.append(binding)
    else:
      rest.append(arg)
  return files, bindings, rest


def resolve_gin_file(path):
  for candidate in (path, os.path.join(REPO_ROOT, path)):
    if os.path.isfile(candidate):
      return candidate
  raise UsageError(f"--gin_file={path}: no such file")


def parse_gin(files, bindings):
  gin.add_config_file_search_path(REPO_ROOT)
  try:
    gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in files], bindings,
                                        finalize_config=True)
  except (ValueError, KeyError, TypeError, SyntaxError, IOError) as e:
    raise UsageError(f"gin: {one_line(e)}") from e


def load(target):
  module_name, function = target.split(":")
  return getattr(importlib.import_module(module_name), function)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    for name, cmd in COMMANDS.items():
      print(f"  {name:8s} {cmd.help}")
    return 0
  name, argv = argv[0], argv[1:]
  if name not in COMMANDS:
    fail(f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}")
  cmd = COMMANDS[name]
  files, bindings, rest = split_gin_flags(argv)
  parser = _Parser(prog=f"paxgpt {name}", description=cmd.help)
  for flag, kwargs in cmd.flags:
    parser.add_argument(flag, **kwargs)
  if name in MULTI_PROCESS_COMMANDS:
    for flag, kwargs in distributed.FLAGS:
      parser.add_argument(flag, **kwargs)
  args = parser.parse_args(rest)
  try:
    function = load(cmd.target)  # registers the command's gin configurables
    if cmd.needs_gin:
      if not files:
        raise UsageError(f"paxgpt {name} needs at least one --gin_file")
      parse_gin(files, bindings)
    elif files or bindings:
      raise UsageError(f"paxgpt {name} takes no gin flags")
    if name in MULTI_PROCESS_COMMANDS:  # join a multi-host run before any device is used
      distributed.initialize_from_args(args)
    result = function(args)
  except UsageError as e:
    fail(one_line(e))
  return int(result or 0)


def entry_point():
  sys.exit(main())


if __name__ == "__main__":
  entry_point()
