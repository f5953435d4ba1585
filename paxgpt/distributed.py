"""Multi-host start-up: join every process of a run with jax.distributed.

Where the run says it spans several processes, `initialize` calls
`jax.distributed.initialize` before the command touches a device:

  explicit   --coordinator_address/--num_processes/--process_id flags, or the
             PAXGPT_COORDINATOR_ADDRESS, PAXGPT_NUM_PROCESSES, PAXGPT_PROCESS_ID
             environment variables (launch/cpu_multiprocess.sh, gpu_cluster.sbatch)
  SLURM      a job step with SLURM_NTASKS > 1: process id and count from SLURM_PROCID
             and SLURM_NTASKS, the coordinator from PAXGPT_COORDINATOR_ADDRESS if set,
             else JAX's own SLURM detection
  TPU pod    PAXGPT_DISTRIBUTED=auto (launch/tpu_pod.sh sets it), or
             TPU_WORKER_HOSTNAMES listing several hosts: JAX reads the pod's metadata

A single process (none of the above) starts nothing. JAX's own client and
coordination service abort the process (exit 134, a C++ stack) when a peer does not
answer, so with explicit flags paxgpt meets its peers first, on the coordinator's
port, before JAX takes it: process 0 listens there and waits for a hello from every
other process (`wait_for_peers`), and each other process connects and says hello
(`wait_for_coordinator`). Either side gives up after `timeout_s` with a UsageError
naming the address (and, on process 0, the missing process ids); the
initialisation timeout bounds the rest of the handshake.

After start-up every process runs the same program: each packs the rows of the
global batch that its devices hold (paxgpt/data/loader.py: the same batches on any
process count), all take part in Orbax checkpoint writes, and only process 0
(`jax.process_index() == 0`) writes logs and summaries.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

from paxgpt.errors import UsageError

DEFAULT_TIMEOUT_S = 120
ENV_ADDRESS = "PAXGPT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PAXGPT_NUM_PROCESSES"
ENV_PROCESS_ID = "PAXGPT_PROCESS_ID"
ENV_TIMEOUT = "PAXGPT_DISTRIBUTED_TIMEOUT_S"
ENV_MODE = "PAXGPT_DISTRIBUTED"

# (flag, argparse kwargs) that main.py adds to the commands that run on every process.
FLAGS = (
    ("--coordinator_address", dict(default=None,
                                   help=f"HOST:PORT of process 0 (env {ENV_ADDRESS})")),
    ("--num_processes", dict(type=int, default=None,
                             help=f"processes in the run (env {ENV_NUM_PROCESSES})")),
    ("--process_id", dict(type=int, default=None,
                          help=f"this process's index (env {ENV_PROCESS_ID})")),
    ("--distributed_timeout_s", dict(type=int, default=None,
                                     help=f"start-up time limit (env {ENV_TIMEOUT}, "
                                          f"default {DEFAULT_TIMEOUT_S})")),
)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the run; `source` says which rule decided."""
  source: str  # 'single', 'explicit', 'slurm' or 'auto'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S

  @property
  def multi_process(self):
    return self.source != "single"


def _int_setting(name, flag_value, env_name, env):
  if flag_value is not None:
    return flag_value
  text = env.get(env_name)
  if text is None or text == "":
    return None
  try:
    return int(text)
  except ValueError:
    raise UsageError(f"{env_name}={text!r}: expected an integer ({name})") from None


def resolve(coordinator_address=None, num_processes=None, process_id=None, timeout_s=None,
            env=None):
  """Decide from flags and environment how (and whether) to join a multi-process run."""
  env = os.environ if env is None else env
  timeout_s = _int_setting("timeout", timeout_s, ENV_TIMEOUT, env)
  timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
  if timeout_s < 1:
    raise UsageError(f"distributed timeout {timeout_s}s: must be at least 1 second")
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  count = _int_setting("process count", num_processes, ENV_NUM_PROCESSES, env)
  index = _int_setting("process id", process_id, ENV_PROCESS_ID, env)

  slurm_tasks = _int_setting("SLURM task count", None, "SLURM_NTASKS", env)
  if address is None and count is None and index is None and slurm_tasks and slurm_tasks > 1:
    index = _int_setting("SLURM process id", None, "SLURM_PROCID", env)
    if index is None:
      raise UsageError(f"SLURM_NTASKS={slurm_tasks} but SLURM_PROCID is unset: "
                       "start the processes with srun")
    return Plan("slurm", address, slurm_tasks, index, timeout_s)
  if slurm_tasks and slurm_tasks > 1 and address is not None and count is None:
    count, index = slurm_tasks, _int_setting("SLURM process id", index, "SLURM_PROCID", env)

  if address is None and count is None and index is None:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if env.get(ENV_MODE) == "auto" or len(hosts) > 1:
      return Plan("auto", timeout_s=timeout_s)
    return Plan("single", timeout_s=timeout_s)

  missing = [name for name, value in (("--coordinator_address", address),
                                      ("--num_processes", count),
                                      ("--process_id", index)) if value is None]
  if missing:
    raise UsageError(f"a multi-process run needs {', '.join(missing)} as well "
                     f"(given: address={address}, processes={count}, process id={index})")
  _check_address(address)
  if count < 1:
    raise UsageError(f"--num_processes={count}: must be at least 1")
  if not 0 <= index < count:
    raise UsageError(f"--process_id={index} is outside 0..{count - 1} "
                     f"for --num_processes={count}")
  if count == 1:
    return Plan("single", timeout_s=timeout_s)
  return Plan("explicit", address, count, index, timeout_s)


def _check_address(address):
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UsageError(f"coordinator address {address!r}: expected HOST:PORT")


HELLO = "paxgpt-peer"


def wait_for_peers(address, num_processes, timeout_s):
  """Process 0: listen on the coordinator's port until processes 1..N-1 have each
  said hello (`wait_for_coordinator(..., process_id=k)`), then free the port for
  JAX. UsageError naming the missing process ids after `timeout_s` seconds."""
  _, _, port = address.rpartition(":")
  waiting = set(range(1, num_processes))
  deadline = time.monotonic() + timeout_s
  try:
    server = socket.create_server(("", int(port)))
  except OSError as e:
    raise UsageError(f"coordinator {address}: cannot listen on port {port} "
                     f"({e.strerror or e})") from None
  with server:
    while waiting:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise UsageError(f"coordinator {address}: process(es) "
                         f"{', '.join(map(str, sorted(waiting)))} of {num_processes} did "
                         f"not connect within {timeout_s}s; are they running with the same "
                         f"--coordinator_address?")
      server.settimeout(remaining)
      try:
        connection, _ = server.accept()
      except socket.timeout:
        continue
      with connection:
        connection.settimeout(min(remaining, 5.0))
        try:
          words = connection.recv(64).decode("ascii", "replace").split()
          connection.recv(1)  # until the peer closes: the wait, not the port, stays with it
        except OSError:
          continue
      if len(words) == 2 and words[0] == HELLO and words[1].isdigit():
        waiting.discard(int(words[1]))


def wait_for_coordinator(address, timeout_s, poll_s=0.25, process_id=None):
  """Block until something accepts TCP connections at HOST:PORT (and, given
  `process_id`, say hello to process 0's `wait_for_peers`), or raise a UsageError
  after `timeout_s` seconds."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  last_error = None
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise UsageError(f"coordinator {address} did not answer within {timeout_s}s "
                       f"({last_error}); is process 0 running and the address reachable?")
    try:
      with socket.create_connection((host, int(port)), timeout=min(remaining, 2.0)) as peer:
        if process_id is not None:
          peer.sendall(f"{HELLO} {process_id}\n".encode("ascii"))
        return
    except OSError as err:
      last_error = err.strerror or type(err).__name__
      time.sleep(min(poll_s, max(remaining, 0)))


def initialize(plan: Plan, log=None):
  """Join the run described by `plan`; a no-op for a single process."""
  if not plan.multi_process:
    return plan
  import jax
  log = log or (lambda text: print(text, file=sys.stderr, flush=True))
  started = time.monotonic()
  if plan.source == "auto":
    log(f"paxgpt: joining a multi-host run (cluster auto-detection, timeout {plan.timeout_s}s)")
    jax.distributed.initialize(initialization_timeout=plan.timeout_s)
    return plan
  if plan.coordinator_address is None:  # SLURM without an explicit address: JAX's detection
    log(f"paxgpt: process {plan.process_id} of {plan.num_processes} joining via SLURM "
        f"(timeout {plan.timeout_s}s)")
    jax.distributed.initialize(num_processes=plan.num_processes, process_id=plan.process_id,
                               initialization_timeout=plan.timeout_s)
    return plan
  log(f"paxgpt: process {plan.process_id} of {plan.num_processes} joining coordinator "
      f"{plan.coordinator_address} (timeout {plan.timeout_s}s)")
  if plan.process_id == 0:
    wait_for_peers(plan.coordinator_address, plan.num_processes, plan.timeout_s)
  else:
    wait_for_coordinator(plan.coordinator_address, plan.timeout_s, process_id=plan.process_id)
  remaining = max(1, int(plan.timeout_s - (time.monotonic() - started)))
  jax.distributed.initialize(coordinator_address=plan.coordinator_address,
                             num_processes=plan.num_processes, process_id=plan.process_id,
                             initialization_timeout=remaining)
  return plan


def initialize_from_args(args):
  """The CLI's start-up: resolve flags + environment and join the run."""
  return initialize(resolve(getattr(args, "coordinator_address", None),
                            getattr(args, "num_processes", None),
                            getattr(args, "process_id", None),
                            getattr(args, "distributed_timeout_s", None)))

