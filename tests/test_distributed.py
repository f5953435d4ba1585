"""Multi-host start-up: which rule applies, bad settings, a coordinator that never answers."""
import os
import socket
import subprocess
import sys
import time

import pytest

from paxgpt import distributed
from paxgpt.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_settings_is_a_single_process():
  plan = distributed.resolve(env={})
  assert plan == distributed.Plan("single", timeout_s=distributed.DEFAULT_TIMEOUT_S)
  assert not plan.multi_process
  assert distributed.initialize(plan) is plan  # starts nothing


def test_flags_win_over_environment():
  env = {"PAXGPT_COORDINATOR_ADDRESS": "10.0.0.1:1234", "PAXGPT_NUM_PROCESSES": "4",
         "PAXGPT_PROCESS_ID": "3", "PAXGPT_DISTRIBUTED_TIMEOUT_S": "30"}
  assert distributed.resolve(env=env) == distributed.Plan("explicit", "10.0.0.1:1234", 4, 3, 30)
  plan = distributed.resolve("host:99", 2, 0, 7, env=env)
  assert plan == distributed.Plan("explicit", "host:99", 2, 0, 7)


def test_slurm_job_steps():
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "5"}
  assert distributed.resolve(env=env) == distributed.Plan("slurm", None, 16, 5, 120)
  # gpu_cluster.sbatch exports the coordinator; process id and count come from SLURM.
  env["PAXGPT_COORDINATOR_ADDRESS"] = "node7:23000"
  assert distributed.resolve(env=env) == distributed.Plan("explicit", "node7:23000", 16, 5, 120)
  # A one-task allocation (e.g. salloc for a single process) is a single process.
  assert not distributed.resolve(env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).multi_process


def test_tpu_pod_uses_jax_cluster_detection():
  assert distributed.resolve(env={"PAXGPT_DISTRIBUTED": "auto"}).source == "auto"
  assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}).source == "auto"
  # paxgpt/__init__.py sets TPU_WORKER_HOSTNAMES=localhost on machines without a TPU.
  assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "localhost"}).source == "single"


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(coordinator_address="h:1"), {}, "needs --num_processes, --process_id"),
    (dict(num_processes=2, process_id=0), {}, "needs --coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {},
     "--process_id=2 is outside 0..1"),
    (dict(coordinator_address="nohost", num_processes=2, process_id=0), {},
     "'nohost': expected HOST:PORT"),
    (dict(coordinator_address="h:70000", num_processes=2, process_id=0), {},
     "'h:70000': expected HOST:PORT"),
    ({}, {"PAXGPT_NUM_PROCESSES": "two"}, "PAXGPT_NUM_PROCESSES='two': expected an integer"),
    ({}, {"SLURM_NTASKS": "4"}, "SLURM_PROCID is unset"),
    (dict(timeout_s=0), {}, "must be at least 1 second"),
])
def test_bad_settings_are_usage_errors(kwargs, env, message):
  with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
    distributed.resolve(env=env, **kwargs)


def _closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_wait_for_coordinator_gives_up_after_the_timeout():
  port = _closed_port()
  start = time.monotonic()
  with pytest.raises(UsageError, match=f"coordinator 127.0.0.1:{port} did not answer within 1s"):
    distributed.wait_for_coordinator(f"127.0.0.1:{port}", 1, poll_s=0.05)
  assert 0.9 < time.monotonic() - start < 5


def test_wait_for_coordinator_returns_once_the_port_listens():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    start = time.monotonic()
    distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 5)
    assert time.monotonic() - start < 1


def test_process_0_without_its_peers_gives_up_in_one_line():
  port = _closed_port()
  with pytest.raises(UsageError, match=rf"coordinator 127.0.0.1:{port}: process\(es\) 1, 2 of "
                                       rf"3 did not connect within 1s"):
    distributed.wait_for_peers(f"127.0.0.1:{port}", 3, 1)


def test_process_0_meets_its_peers_then_frees_the_port_for_jax():
  import threading
  port = _closed_port()
  address = f"127.0.0.1:{port}"
  peers = [threading.Thread(target=distributed.wait_for_coordinator,
                            args=(address, 30), kwargs=dict(poll_s=0.05, process_id=k))
           for k in (1, 2)]
  for peer in peers:
    peer.start()
  distributed.wait_for_peers(address, 3, 30)
  for peer in peers:
    peer.join()
  socket.create_server(("", port)).close()  # JAX's coordination service can bind it


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  for key in ("PAXGPT_COORDINATOR_ADDRESS", "PAXGPT_NUM_PROCESSES", "PAXGPT_PROCESS_ID",
              "PAXGPT_DISTRIBUTED", "SLURM_NTASKS"):
    env.pop(key, None)
  return subprocess.Popen([sys.executable, "-m", "paxgpt.cli", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_bad_coordinator_and_bad_mesh_exit_2_with_a_clear_line(tmp_path):
  """Process 1 of 2 whose coordinator never answers stops after its timeout (JAX's
  own client would abort or wait 5 minutes); a mesh that does not match the
  devices names both counts. Both run at once to save start-up time."""
  gin_flags = ["--gin_file=gin/models/gpt3_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
               f"--gin.MODEL_DIR='{tmp_path}'"]
  port = _closed_port()
  start = time.monotonic()
  orphan = _cli("train", *gin_flags, f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2", "--process_id=1", "--distributed_timeout_s=3")
  mesh = _cli("train", *gin_flags, "--mesh=data:1,fsdp:3,tensor:1")
  _, orphan_err = orphan.communicate(timeout=120)
  elapsed = time.monotonic() - start
  _, mesh_err = mesh.communicate(timeout=120)
  assert orphan.returncode == 2, orphan_err
  assert orphan_err.strip().splitlines()[-1] == (
      f"paxgpt: error: coordinator 127.0.0.1:{port} did not answer within 3s (Connection "
      f"refused); is process 0 running and the address reachable?")
  assert elapsed < 100  # start-up (imports) + the 3 s timeout, not JAX's 5 minutes
  assert mesh.returncode == 2, mesh_err
  assert mesh_err.strip().splitlines()[-1].startswith(
      "paxgpt: error: mesh data:1,fsdp:3,tensor:1 needs 3 devices but there are 8")
