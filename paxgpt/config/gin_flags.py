"""Gin flags and files, t5x style: `--gin_file=FILE` (repeatable) and
`--gin.NAME=VALUE`, parsed with the configurables of every command registered,
so an experiment file parses the same under every command and a typo is an
error. Used by the CLI and by the benchmarks that take gin flags.
"""
from __future__ import annotations

import importlib
import os
import re

import gin

from paxgpt.errors import UsageError, one_line

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# gin appends the whole config to some parse errors (an undefined macro).
_GIN_CONFIG_DUMP = re.compile(r"\s*in config string:.*$", re.S)
# The modules that define gin configurables.
CONFIGURABLE_MODULES = ("paxgpt.model.gpt", "paxgpt.model.sharding", "paxgpt.model.pipeline",
                        "paxgpt.training.optim",
                        "paxgpt.store.checkpoint", "paxgpt.data.loader",
                        "paxgpt.training.trainer", "paxgpt.decoding.offline")


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
        raise UsageError(f"{arg}: expected --gin.NAME=VALUE")
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
    raise UsageError(f"gin: {_explain_gin_error(e, bindings)}") from e


def _explain_gin_error(error, bindings):
  """gin's message, with the two cases it words badly said plainly."""
  text = _GIN_CONFIG_DUMP.sub("", str(error))
  macro = re.search(r"No bindings specified for '([\w.]+)/gin\.macro'", text)
  if macro:
    name = macro.group(1)
    return (f"%{name} is not defined: bind it (--gin.{name}=VALUE) or include a gin file "
            f"that does")
  token = re.search(r"malformed node or string.*Failed to parse token '([^']*)'", text, re.S)
  if token:
    value = token.group(1)
    named = [b.split("=", 1)[0] for b in bindings if b.split("=", 1)[1].strip() == value]
    where = f"--gin.{named[0]}={value}" if named else f"value {value}"
    return (f"{where}: not a gin value; strings need quotes, e.g. "
            f"--gin.{named[0] if named else 'NAME'}=\"'{value}'\"")
  return one_line(text)




def register_configurables():
  """Every gin configurable that gin files may bind."""
  for module in CONFIGURABLE_MODULES:
    importlib.import_module(module)
