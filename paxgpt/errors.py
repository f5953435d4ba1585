"""The errors a user is shown as one line (paxgpt/cli/main.py maps them).

  UsageError       the user asked for something wrong: exit code 2
    ConfigError    a config dataclass field has a bad type or value; the message
                   names `Class.field=value` (raised by paxgpt/config/checks.py and the
                   configs' __post_init__)
    CheckpointError  a checkpoint cannot be used (corrupt, another model's shape,
                   unreadable); the message names the checkpoint directory
    RunDirBusyError  another live run owns MODEL_DIR (or writes the same import or
                   export output); the message names its host and pid
                   (paxgpt/store/run_lock.py)
  RunError         the run failed for a reason outside its input (a full disk
                   during a save, a NaN loss: training.trainer.NonFiniteLossError):
                   one line, exit code 1

Library code raises these and never prints or exits; the message is complete
without a traceback; `one_line` is how every command prints one.
"""
import re

# gin appends where a configurable was called to errors raised inside it.
_GIN_SUFFIX = re.compile(r"\s*In call to configurable .*$", re.S)
MAX_LINE = 400


def one_line(text):
  """An error's message as one line of at most MAX_LINE characters."""
  line = re.sub(r"\s+", " ", _GIN_SUFFIX.sub("", str(text))).strip()
  return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


class UsageError(ValueError):
  pass


class ConfigError(UsageError):
  pass


class CheckpointError(UsageError):
  pass


class RunDirBusyError(UsageError):
  pass


class RunError(RuntimeError):
  pass
