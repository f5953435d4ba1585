"""The errors a user is shown as one line (paxgpt/cli/main.py maps them).

  UsageError       the user asked for something wrong: exit code 2
    ConfigError    a config dataclass field has a bad type or value; the message
                   names `Class.field=value` (raised by paxgpt/config.py and the
                   configs' __post_init__)
    CheckpointError  a checkpoint cannot be used (corrupt, another model's shape,
                   unreadable); the message names the checkpoint directory
    RunDirBusyError  another live run owns MODEL_DIR; the message names its host
                   and pid (paxgpt/run_lock.py)
  RunError         the run failed for a reason outside its input (a full disk
                   during a save): one line, exit code 1

Library code raises these and never prints or exits; the message is complete
without a traceback.
"""


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
