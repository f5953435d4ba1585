"""The paxgpt CLI, t5x style:

  paxgpt COMMAND --gin_file=FILE [--gin_file=...] [--gin.NAME=VALUE ...] [flags]

Commands: train, eval, sample, info, plan, vocab, import, export, fewshot. eval and
sample without --gin_file use gin/runs/eval.gin / sample.gin and the model
config that MODEL_DIR carries (model.json). Gin files are looked up relative
to the working directory, then to the paxgpt checkout.

The error contract, applied here and nowhere else: bad input (an unknown gin
binding, a parameter typo, a missing --gin_file, a bad config value, a mesh
that does not fit the devices, a bad task, vocabulary or data file) ends with
one line on stderr, "paxgpt: error: ...", naming the input, and exit code 2.
Library code raises the errors of `input_errors()`; it never prints or exits.
Config dataclasses raise ConfigError (paxgpt/config/checks.py), checkpoints
CheckpointError, a MODEL_DIR owned by another run RunDirBusyError: all
UsageErrors. A run that fails for a reason outside its input (a full disk, a
NaN loss: paxgpt.errors.RunError) is one line on stderr too, with exit code 1.

Start-up logs of TensorFlow, XLA and absl (CUDA probing on a CPU box, Orbax's
notes), for every command, and the wind-down tracebacks of a failed Orbax read
or write are hidden unless --verbose is given (any command).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import re
import sys
import threading

from paxgpt import distributed
from paxgpt.config.gin_flags import parse_gin, register_configurables, split_gin_flags
from paxgpt.errors import RunError, UsageError, one_line


@dataclasses.dataclass(frozen=True)
class Command:
  function: str  # in paxgpt/cli/commands.py
  help: str
  needs_gin: bool = True
  flags: tuple = ()  # (name, kwargs for argparse.add_argument)
  # Gin files used when no --gin_file is given (None: at least one is required).
  default_gin: tuple | None = None


MESH_FLAG = ("--mesh", dict(default=None,
                            help="mesh axis sizes (within a slice), e.g. data:1,fsdp:8,tensor:1 "
                                 "(-1: the rest; stage:N pipelines the layers)"))
DCN_FLAG = ("--dcn", dict(default=None,
                          help="axis sizes across slices, e.g. data:4 or stage:2 (default: data "
                               "over all TPU slices; CPU/GPU: one slice per process)"))
JSON_FLAG = ("--json", dict(action="store_true", help="print one JSON object"))

COMMANDS = {
    "train": Command("train", "train (or resume) a model in MODEL_DIR",
                     flags=(MESH_FLAG, DCN_FLAG)),
    "eval": Command("evaluate",
                    "validation loss and perplexity of a checkpoint",
                    default_gin=("gin/runs/eval.gin",),
                    flags=(MESH_FLAG, DCN_FLAG, ("--step", dict(type=int, default=None,
                                                      help="checkpoint step (default latest)")))),
    "sample": Command("sample",
                      "sample completions for a JSONL file of prompts",
                      default_gin=("gin/runs/sample.gin",),
                      flags=(MESH_FLAG, DCN_FLAG,
                             ("--prompts", dict(required=True, help="input JSONL")),
                             ("--output", dict(required=True, help="output JSONL")),
                             ("--step", dict(type=int, default=None,
                                             help="checkpoint step (default latest)")))),
    "info": Command("info",
                    "parameters, FLOPs per token and bytes per device of a model",
                    flags=(MESH_FLAG, JSON_FLAG,
                           ("--seq_len", dict(type=int, default=None,
                                              help="sequence length for FLOPs (default max_len)")))),
    "plan": Command("plan",
                    "compile the train step for a mesh and report per-device memory",
                    flags=(MESH_FLAG, DCN_FLAG, JSON_FLAG,
                           ("--batch", dict(type=int, default=None, help="global batch size")),
                           ("--num_slices", dict(type=int, default=1,
                                                 help="TPU slices of --topology each (default 1)")),
                           ("--microbatches", dict(default=None,
                                                   help="N, or auto: the fewest that fit "
                                                        "(default TrainConfig.num_microbatches)")),
                           ("--chip", dict(default=None, help="v4|v5e|v5p|v6e|h100|h200")),
                           ("--topology", dict(default=None,
                                               help="TPU topology, e.g. 4x4x8 (needs libtpu)")),
                           ("--remat", dict(default="full", choices=(
                               "none", "full", "save_qkv_proj", "save_dot_except_mlpwi",
                               "dots_saveable"),  # gpt.REMAT_POLICIES (main imports no JAX)
                                            help="rematerialisation policy (default full)")),
                           ("--mfu", dict(type=float, default=0.4,
                                          help="MFU assumed for the step time (default 0.4)")),
                           ("--flops", dict(default="compiled", choices=("compiled", "analytic"),
                                            help="also count the FLOPs per step with the "
                                                 "compiler (two more compiles; default) or "
                                                 "only analytically")),
                           ("--seq_len", dict(type=int, default=None,
                                              help="sequence length (default max_len)")))),
    "vocab": Command("vocab",
                     "train a SentencePiece vocabulary on a task's train split", needs_gin=False,
                     flags=(("--task", dict(required=True, help="registered task name")),
                            ("--size", dict(type=int, required=True, help="vocabulary size")),
                            ("--output", dict(required=True, help="output directory")))),
    "import": Command("import_hf",
                      "write a MODEL_DIR from a transformers GPT-Neo / GPT-2 directory",
                      needs_gin=False,
                      flags=(MESH_FLAG,
                             ("--hf_dir", dict(required=True, help="transformers directory")),
                             ("--model_dir", dict(required=True, help="new MODEL_DIR")),
                             ("--dtype", dict(default="float32",
                                              choices=("float32", "bfloat16"),
                                              help="GPTConfig.dtype to record (compute)")))),
    "export": Command("export",
                      "write a transformers directory from a MODEL_DIR checkpoint",
                      default_gin=(),
                      flags=(MESH_FLAG,
                             ("--model_dir", dict(required=True, help="paxgpt MODEL_DIR")),
                             ("--hf_dir", dict(required=True, help="new transformers directory")),
                             ("--step", dict(type=int, default=None,
                                             help="checkpoint step (default latest)")))),
    "fewshot": Command("fewshot",
                       "zero-/few-shot scores of a checkpoint with lm-evaluation-harness tasks",
                       default_gin=(),
                       flags=(MESH_FLAG,
                              ("--tasks", dict(required=True,
                                               help="comma-separated lm-eval task names")),
                              ("--num_fewshot", dict(type=int, default=None,
                                                     help="examples in each prompt (default: "
                                                          "the task's)")),
                              ("--limit", dict(type=float, default=None,
                                               help="documents per task (< 1: a fraction)")),
                              ("--include_path", dict(default=None,
                                                      help="directory of extra task YAMLs")),
                              ("--output", dict(default=None, help="results JSON file")),
                              ("--log_samples", dict(action="store_true",
                                                     help="per-request results in --output")),
                              ("--batch_size", dict(type=int, default=16,
                                                    help="rows per forward pass (default 16)")),
                              ("--bootstrap_iters", dict(type=int, default=0,
                                                         help="> 0: standard errors (default "
                                                              "0: none)")),
                              ("--step", dict(type=int, default=None,
                                              help="checkpoint step (default latest)")))),
}

# Commands that run on every process of a multi-host run (paxgpt/distributed.py).
MULTI_PROCESS_COMMANDS = ("train", "eval", "sample")


class _Parser(argparse.ArgumentParser):
  """argparse that reports a bad flag as one line and exit code 2."""

  def error(self, message):
    raise UsageError(f"{self.prog}: {message}")


def input_errors():
  """The exception types that mean "the user's input is wrong": exit 2, one
  line. The data side's types are included where it is installed."""
  errors = [UsageError]
  try:
    from paxgpt.data import loader
    import tasks
    errors += [loader.DataError, tasks.VocabularyError, tasks.UnknownTaskError,
               tasks.TextFilesError]
  except ImportError:  # a JAX-only box
    pass
  return tuple(errors)


def _may_start(text, prefixes):
  """Whether the start of a line, `text`, may be one of `prefixes` once complete."""
  return any(p.startswith(text) or text.startswith(p) for p in prefixes)


class _Block:
  """The lines of one traceback being held (its header and chained causes too).
  state: "preamble" (after a header such as asyncio's "Exception in callback",
  before its traceback), "traceback" (up to the exception's own line), "ended"."""

  def __init__(self, state):
    self.state, self.lines, self.noise = state, [], False
    self.chained = False  # the last words were "During handling of the above exception"


class QuietStderr:
  """sys.stderr without the tracebacks of asyncio callbacks that fire after
  Orbax closed its event loop ("RuntimeError: Event loop is closed"): a failed
  checkpoint read or write leaves dozens; its cause is reported in one line.
  Every other line passes through unchanged.

  Orbax's and TensorStore's threads print those tracebacks at the same time, so
  each thread's text is parsed on its own (their lines interleave on the
  stream). A traceback is held from its header ("Traceback ...", "Exception
  ignored in ...", asyncio's "Exception in callback ...") to its exception line,
  through chained causes ("During handling of the above exception ..."), and up
  to the next line or flush: then it is written, unless a line of it is the noise."""

  NOISE = "RuntimeError: Event loop is closed"
  TRACEBACK = "Traceback (most recent call last):"
  HEADERS = (TRACEBACK, "Exception ignored in", "Exception in callback",
             "Task exception was never retrieved")
  CHAINS = ("During handling of the above exception", "The above exception was the direct")
  EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")

  def __init__(self, stream, thread_id=threading.get_ident):
    self._stream, self._thread_id = stream, thread_id
    self._lock = threading.Lock()
    self._partial = {}  # thread id -> the text after its last newline
    self._held = {}  # thread id -> _Block

  def write(self, text):
    me = self._thread_id()
    with self._lock:
      lines = (self._partial.pop(me, "") + text).split("\n")
      partial = lines.pop()
      for line in lines:
        self._line(me, line + "\n")
      if partial:
        block = self._held.get(me)
        if block is not None and block.state == "ended" and not _may_start(
            partial, self.CHAINS + self.HEADERS):
          self._release(me)
          block = None
        if block is not None or _may_start(partial, self.HEADERS):
          self._partial[me] = partial  # maybe part of a traceback: wait for the line's end
        else:
          self._stream.write(partial)  # a line in progress (a progress bar): now
    return len(text)

  def _line(self, me, line):
    block = self._held.get(me)
    text = line.rstrip("\n")
    if block is not None and block.state == "ended":  # a chained cause, or the next line
      chained = text.startswith(self.CHAINS)
      if not text.strip() or chained or (block.chained and text.startswith(self.TRACEBACK)):
        block.lines.append(line)
        block.chained = chained or (block.chained and not text.strip())
        if text.startswith(self.TRACEBACK):
          block.state = "traceback"
        return
      self._release(me)
      block = None
    if block is None:
      if not text.startswith(self.HEADERS):
        self._stream.write(line)
        return
      block = self._held[me] = _Block(
          "traceback" if text.startswith(self.TRACEBACK) else "preamble")
      block.lines.append(line)
      return
    block.lines.append(line)
    block.noise = block.noise or text.strip() == self.NOISE
    if text.startswith(self.TRACEBACK):
      block.state = "traceback"
    elif block.state == "preamble":
      if self.EXCEPTION.match(text):  # a header's exception without a traceback
        block.state = "ended"
    elif text and not text.startswith((" ", "\t")):  # the exception's own line
      block.state = "ended"

  def _release(self, me):
    block = self._held.pop(me)
    if not block.noise:
      self._stream.write("".join(block.lines))

  def flush(self):
    with self._lock:
      for me in [t for t, b in self._held.items() if b.state != "traceback"]:
        self._release(me)
    self._stream.flush()

  def __getattr__(self, name):  # fileno, isatty, encoding, ...
    return getattr(self._stream, name)


def quiet_start_up():
  """Hide absl's log lines (Orbax's warnings about read-only checkpoint managers,
  its pages of errors for a failed save, which paxgpt reports in one line) and
  the Python loggers' notes; `start_up_logs_hidden` hides the C++ ones. The
  wind-down of a failed Orbax read or write (its asyncio tasks' "exception was
  never retrieved", "coroutine ... was never awaited") is hidden too: the
  failure itself is reported in one line."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import logging
  import warnings
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.FATAL)
  except ImportError:  # a box without absl has no absl log lines either
    pass
  for name in ("jax", "orbax", "tensorflow"):
    logging.getLogger(name).setLevel(logging.ERROR)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                          category=RuntimeWarning)


def main(argv=None):
  """Run one command; returns its exit code (2 for bad input, reported as one
  line on stderr)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  quiet = "--verbose" not in argv
  if quiet:
    quiet_start_up()
    if not isinstance(sys.stderr, QuietStderr):
      sys.stderr = QuietStderr(sys.stderr)
  else:
    argv.remove("--verbose")
    os.environ["PAXGPT_VERBOSE"] = "1"  # library code's own quiet paths (checkpoint.py)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    for name, cmd in COMMANDS.items():
      print(f"  {name:8s} {cmd.help}")
    return 0
  try:
    return _run(argv[0], argv[1:], quiet)
  except input_errors() as e:
    print(f"paxgpt: error: {one_line(e)}", file=sys.stderr)
    return 2
  except RunError as e:
    print(f"paxgpt: error: {one_line(e)}", file=sys.stderr)
    _ABANDON_THREADS.append(True)
    return 1


@contextlib.contextmanager
def start_up_logs_hidden(quiet=True):
  """Send file descriptor 2 to /dev/null while TensorFlow loads: its C++ start-up
  lines (oneDNN, "Could not find cuda drivers", cuInit on a CPU box) are written
  before any log level applies. Python errors raised inside still surface: they
  are printed after stderr is back."""
  if not quiet:
    yield
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _run(name, argv, quiet=False):
  if name not in COMMANDS:
    raise UsageError(f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}")
  cmd = COMMANDS[name]
  files, bindings, rest = split_gin_flags(argv)
  parser = _Parser(prog=f"paxgpt {name}", description=cmd.help)
  for flag, kwargs in cmd.flags:
    parser.add_argument(flag, **kwargs)
  if name in MULTI_PROCESS_COMMANDS:
    for flag, kwargs in distributed.FLAGS:
      parser.add_argument(flag, **kwargs)
  args = parser.parse_args(rest)
  function = getattr(importlib.import_module("paxgpt.cli.commands"), cmd.function)
  with start_up_logs_hidden(quiet):  # every command: import and export load TensorFlow too
    _load_libraries(cmd.needs_gin)
  if cmd.needs_gin:
    if not files and cmd.default_gin is None:
      raise UsageError(f"paxgpt {name} needs at least one --gin_file")
    files = files or list(cmd.default_gin)
    parse_gin(files, bindings)
  elif files or bindings:
    raise UsageError(f"paxgpt {name} takes no gin flags")
  if name in MULTI_PROCESS_COMMANDS:  # join a multi-host run before any device is used
    distributed.initialize_from_args(args)
  return int(function(args) or 0)


def _load_libraries(needs_gin):
  """Import what prints start-up lines: gin's configurables (the data side with
  them), or the data side alone (vocabularies) for the commands without gin."""
  if needs_gin:
    register_configurables()
    return
  try:
    importlib.import_module("tasks")
  except ImportError:  # a JAX-only box: no TensorFlow to quiet
    pass


# Set when a run failed outside its input (RunError): the I/O threads of a failed
# checkpoint save may never end, so the process exits without waiting for them.
_ABANDON_THREADS = []


def entry_point():
  code = main()
  if _ABANDON_THREADS:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  if code and "--verbose" not in sys.argv[1:]:
    # The error is already said in one line. Orbax's reads and writes still in
    # flight when a restore or save failed print pages of "Exception ignored" and
    # "Event loop is closed" tracebacks as the interpreter shuts down.
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
  sys.exit(code)


if __name__ == "__main__":
  entry_point()
