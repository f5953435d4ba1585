"""A multi-host run on this machine: launch/cpu_multiprocess.sh starts 2 processes x
2 fake CPU devices joined by jax.distributed on loopback. It must train exactly
as 1 process x 4 devices on the same global batch, write logs from process 0
only, and leave a checkpoint that a 1-process run restores."""
import json
import os
import random
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQUENCE_LENGTH = 64
STEPS = 3
LIMIT_S = 420

# Every document is one full row (63 bytes + EOS), rows are not shuffled
# (shuffle_buffer 1) and processes take documents round-robin, so each step's
# global batch holds the same 8 documents with 1 process or 2 (in another row
# order, which the token-mean loss and the summed gradients do not see).
EXPERIMENT = """
include 'gin/models/gpt3_tiny.gin'
include 'gin/runs/pretrain.gin'
SEQUENCE_LENGTH = {length}
DataConfig.mixture_or_task = @tasks.text_files_task()
tasks.text_files_task.name = 'multihost_rows'
tasks.text_files_task.train_files = ['{dir}/train.jsonl']
tasks.text_files_task.validation_files = ['{dir}/validation.jsonl']
DataConfig.batch_size = 8
DataConfig.shuffle_buffer = 1
DataConfig.eval_max_batches = None
TrainConfig.train_tokens = None
TrainConfig.batch_tokens = None
TrainConfig.num_steps = {steps}
TrainConfig.log_every = 1
TrainConfig.eval_every = 0
OptimizerConfig.warmup_tokens = None
OptimizerConfig.decay_tokens = None
OptimizerConfig.peak_learning_rate = 3e-3
CheckpointConfig.async_save = False
"""


def _write_experiment(directory):
  rng = random.Random(0)
  letters = "abcdefghijklmnopqrstuvwxyz ,."
  for split, count in (("train", 40), ("validation", 8)):
    with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
      for _ in range(count):
        text = "".join(rng.choice(letters) for _ in range(SEQUENCE_LENGTH - 1))
        f.write(json.dumps({"text": text}) + "\n")
  path = os.path.join(directory, "experiment.gin")
  with open(path, "w") as f:
    f.write(EXPERIMENT.format(length=SEQUENCE_LENGTH, dir=directory, steps=STEPS))
  return path


def _env(devices):
  # PYTHON: launch/cpu_multiprocess.sh starts this interpreter, not whatever python
  # a checkout without .venv would find.
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "JAX_NUM_CPU_DEVICES": str(devices), "PYTHON": sys.executable}
  for key in ("PAXGPT_COORDINATOR_ADDRESS", "PAXGPT_NUM_PROCESSES", "PAXGPT_PROCESS_ID",
              "PAXGPT_DISTRIBUTED", "SLURM_NTASKS"):
    env.pop(key, None)
  return env


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores(tmp_path):
  gin_file = _write_experiment(str(tmp_path))
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  common = [f"--gin_file={gin_file}", "--mesh=data:1,fsdp:4,tensor:1"]
  start = time.monotonic()
  multi = subprocess.Popen(
      ["bash", "launch/cpu_multiprocess.sh", "--processes", "2", "--devices", "2",
       "--timeout", str(LIMIT_S), "--log_dir", str(tmp_path / "logs"), "--", "train", *common,
       f"--gin.MODEL_DIR='{multi_dir}'"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  single = subprocess.Popen(
      [sys.executable, "-m", "paxgpt.cli", "train", *common, f"--gin.MODEL_DIR='{single_dir}'"],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  multi_out, _ = multi.communicate(timeout=LIMIT_S + 30)
  multi_s = time.monotonic() - start
  single_out, _ = single.communicate(timeout=LIMIT_S)
  assert multi.returncode == 0, multi_out[-4000:]
  assert single.returncode == 0, single_out[-4000:]
  assert multi_s < LIMIT_S  # both processes stopped by themselves

  multi_log, single_log = _metrics(multi_dir), _metrics(single_dir)
  assert [r["step"] for r in multi_log] == list(range(1, STEPS + 1))  # one writer only
  for m, s in zip(multi_log, single_log, strict=True):
    for key in ("loss", "grad_norm", "tokens"):
      assert m[key] == pytest.approx(s[key], rel=2e-5), (m["step"], key)
  assert multi_log[0]["tokens"] == 8 * SEQUENCE_LENGTH
  assert multi_log[-1]["loss"] < multi_log[0]["loss"]  # the updates did something
  final_validation = multi_log[-1]["validation_loss"]
  assert final_validation == pytest.approx(single_log[-1]["validation_loss"], rel=2e-5)
  worker_log = (tmp_path / "logs" / "process_1.log").read_text()
  assert "process 1 of 2 joining coordinator 127.0.0.1:" in worker_log
  assert "step 1/" not in worker_log and not os.path.exists(multi_dir / "process_1")

  # The checkpoint written by both processes restores in one process on 8 devices.
  evaluated = subprocess.run(
      [sys.executable, "-m", "paxgpt.cli", "eval", f"--gin_file={gin_file}",
       f"--gin.MODEL_DIR='{multi_dir}'", f"--gin.evaluate.model_dir='{multi_dir}'",
       "--mesh=data:1,fsdp:8,tensor:1"],
      cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=LIMIT_S)
  assert evaluated.returncode == 0, evaluated.stderr[-4000:]
  result = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert result["step"] == STEPS
  assert result["validation_loss"] == pytest.approx(final_validation, rel=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dcn, mesh, extra", [
    ("data:2", "data:2,fsdp:4,tensor:1", []),
    ("stage:2", "stage:2,data:1,fsdp:4,tensor:1",
     ["--gin.GPTConfig.num_layers=4", "--gin.TrainConfig.num_microbatches=2"]),
])
def test_two_process_slices_train_like_one_slice_of_the_same_shape(tmp_path, dcn, mesh, extra):
  """2 processes x 4 devices as two slices, --dcn=data:2 (data parallelism across
  the processes, fsdp within each) or --dcn=stage:2 (a pipeline stage per
  process: both read the same rows), give the losses of one process x 8 devices
  on the mesh of the same shape; a DCN size that the processes do not make is
  one line and exit code 2."""
  gin_file = _write_experiment(str(tmp_path))
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  launch = ["bash", "launch/cpu_multiprocess.sh", "--processes", "2", "--devices", "4",
            "--timeout", str(LIMIT_S)]
  multi = subprocess.Popen(
      launch + ["--log_dir", str(tmp_path / "logs"), "--", "train", f"--gin_file={gin_file}",
                "--mesh=data:1,fsdp:4,tensor:1", f"--dcn={dcn}", f"--gin.MODEL_DIR='{multi_dir}'",
                *extra],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  single = subprocess.Popen(
      [sys.executable, "-m", "paxgpt.cli", "train", f"--gin_file={gin_file}", f"--mesh={mesh}",
       f"--gin.MODEL_DIR='{single_dir}'", *extra],
      cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  multi_out, _ = multi.communicate(timeout=LIMIT_S + 30)
  single_out, _ = single.communicate(timeout=LIMIT_S)
  assert multi.returncode == 0, multi_out[-4000:]
  assert single.returncode == 0, single_out[-4000:]
  multi_log, single_log = _metrics(multi_dir), _metrics(single_dir)
  assert [r["step"] for r in multi_log] == list(range(1, STEPS + 1))
  for m, s in zip(multi_log, single_log, strict=True):
    for key in ("loss", "grad_norm", "tokens"):
      assert m[key] == pytest.approx(s[key], rel=2e-5), (m["step"], key)
  assert multi_log[-1]["loss"] < multi_log[0]["loss"]
  if dcn != "data:2":
    return
  bad = subprocess.run(
      launch + ["--log_dir", str(tmp_path / "bad_logs"), "--", "train", f"--gin_file={gin_file}",
                "--mesh=data:1,fsdp:4,tensor:1", "--dcn=data:4",
                f"--gin.MODEL_DIR='{tmp_path / 'bad'}'"],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=LIMIT_S)
  assert bad.returncode == 2
  errors = [line for line in bad.stdout.splitlines() if line.startswith("paxgpt: error:")]
  assert errors == ["paxgpt: error: --dcn data:4 needs 4 slices but there are 2 (slices: one "
                    "per process)"]
