"""Multi-host runs on this machine (launch/cpu_multiprocess.sh: N processes x M fake
CPU devices joined by jax.distributed on loopback), and a run that moves.

One experiment: gpt3_tiny on a mixture of two JSONL tasks of short documents
(several packed per row of 64 bytes), batch 8, 6 steps.

  reference   1 process x 8 devices, mesh fsdp 8, uninterrupted
  moved       2 x 4 (fsdp 8) stopped at step 3, then resumed in the same MODEL_DIR
              on 4 x 2 (fsdp 4 x tensor 2) to step 6
  two, four   uninterrupted on 2 x 4 (fsdp 8) and on 4 x 2 (data 2 x fsdp 2 x tensor 2)

Every step's loss (and validation loss) equals the reference's within float32
tolerance: the data stream and the restored weights do not depend on the layout.
Bad input (a resume with other data settings, a process count that does not divide
the batch) is one line and exit code 2. The runs are shared by the tests below
(one module fixture), three groups at a time to bound the machine's load.
"""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQUENCE_LENGTH = 64
STEPS = 6
LIMIT_S = 900  # generous: the machine running the suite may be shared

EXPERIMENT = """
include 'gin/models/gpt3_tiny.gin'
include 'gin/runs/pretrain.gin'
SEQUENCE_LENGTH = {length}
DataConfig.mixture_or_task = @tasks.mixture()
tasks.mixture.name = 'elastic_mix'
tasks.mixture.tasks_and_rates = [(@prose/tasks.text_files_task(), 2.0),
                                 (@code/tasks.text_files_task(), 1.0)]
prose/tasks.text_files_task.name = 'elastic_prose'
prose/tasks.text_files_task.train_files = ['{dir}/prose_train.jsonl']
prose/tasks.text_files_task.validation_files = ['{dir}/prose_validation.jsonl']
code/tasks.text_files_task.name = 'elastic_code'
code/tasks.text_files_task.train_files = ['{dir}/code_train.jsonl']
code/tasks.text_files_task.validation_files = ['{dir}/code_validation.jsonl']
DataConfig.batch_size = 8
DataConfig.shuffle_buffer = 64
DataConfig.eval_max_batches = None
TrainConfig.train_tokens = None
TrainConfig.batch_tokens = None
TrainConfig.num_steps = {steps}
TrainConfig.log_every = 1
TrainConfig.eval_every = 3
# A schedule of its own (not of num_steps), so a run stopped early is the same run.
OptimizerConfig.warmup_tokens = None
OptimizerConfig.decay_tokens = None
OptimizerConfig.warmup_steps = 2
OptimizerConfig.decay_steps = {steps}
OptimizerConfig.peak_learning_rate = 3e-3
CheckpointConfig.save_every_steps = 3
CheckpointConfig.async_save = False
"""


def _documents(rng, count, make):
  return [{"text": make(rng)} for _ in range(count)]


def _prose(rng):
  return "".join(rng.choice("abcdefghij klmnop,.") for _ in range(rng.randint(4, 20)))


def _code(rng):
  name = "".join(rng.choice("xyzuvw") for _ in range(rng.randint(1, 4)))
  return f"{name} = a * {rng.randint(0, 99)}"


def _write_experiment(directory):
  """The corpus: documents of 4 to 20 bytes, so a row of 64 packs several."""
  rng = random.Random(0)
  for name, make, train, validation in (("prose", _prose, 64, 8), ("code", _code, 40, 8)):
    for split, count in (("train", train), ("validation", validation)):
      with open(os.path.join(directory, f"{name}_{split}.jsonl"), "w") as f:
        for doc in _documents(rng, count, make):
          f.write(json.dumps(doc) + "\n")
  path = os.path.join(directory, "experiment.gin")
  with open(path, "w") as f:
    f.write(EXPERIMENT.format(length=SEQUENCE_LENGTH, dir=directory, steps=STEPS))
  return path


def _env(devices):
  # PYTHON: launch/cpu_multiprocess.sh starts this interpreter, not whatever python
  # a checkout without .venv would find.
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "JAX_NUM_CPU_DEVICES": str(devices), "PYTHON": sys.executable}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  for key in ("PAXGPT_COORDINATOR_ADDRESS", "PAXGPT_NUM_PROCESSES", "PAXGPT_PROCESS_ID",
              "PAXGPT_DISTRIBUTED", "SLURM_NTASKS"):
    env.pop(key, None)
  return env


def _start(processes, devices, log_dir, *args):
  """`paxgpt ARGS` on `processes` x `devices`: a Popen (its own process group) whose
  output is process 0's."""
  if processes == 1:
    command = [sys.executable, "-m", "paxgpt.cli", *args]
  else:
    command = ["bash", "launch/cpu_multiprocess.sh", "--processes", str(processes),
               "--devices", str(devices), "--timeout", str(LIMIT_S), "--log_dir",
               str(log_dir), "--", *args]
  return subprocess.Popen(command, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(runs):
  """{name: (returncode, stdout, stderr)} once every run of a group has ended; the
  runs still going are killed if one overruns."""
  done = {}
  try:
    for name, process in runs.items():
      out, err = process.communicate(timeout=LIMIT_S + 60)
      done[name] = (process.returncode, out, err)
  finally:
    for process in runs.values():
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
  return done


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, filter(str.strip, f)) if "event" not in r]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  base = tmp_path_factory.mktemp("multihost")
  return base, _write_experiment(str(base))


@pytest.fixture(scope="module")
def runs(experiment):
  base, gin_file = experiment
  dirs = {name: base / name for name in ("reference", "moved", "two", "four")}

  def train(name, processes, devices, mesh, *extra):
    return _start(processes, devices, base / f"logs_{name}", "train", f"--gin_file={gin_file}",
                  f"--mesh={mesh}", f"--gin.MODEL_DIR='{dirs[name.split('_')[0]]}'", *extra)

  done = _finish({  # group 1
      "reference": train("reference", 1, 8, "data:1,fsdp:8,tensor:1"),
      "moved_first": train("moved_first", 2, 4, "data:1,fsdp:8,tensor:1",
                           "--gin.TrainConfig.num_steps=3"),
      "two": train("two", 2, 4, "data:1,fsdp:8,tensor:1")})
  done.update(_finish({  # group 2: the move, and the bad input
      "moved": train("moved", 4, 2, "data:1,fsdp:4,tensor:2"),
      "other_data": _start(1, 8, None, "train", f"--gin_file={gin_file}",
                           f"--gin.MODEL_DIR='{dirs['two']}'", "--gin.DataConfig.seed=1"),
      "three": _start(3, 1, base / "logs_three", "train", f"--gin_file={gin_file}",
                      f"--gin.MODEL_DIR='{dirs['reference']}'")}))
  done.update(_finish({  # group 3: 4 processes uninterrupted, the moved run's checkpoint
      "four": train("four", 4, 2, "data:2,fsdp:2,tensor:2"),
      "eval": _start(1, 8, None, "eval", f"--gin_file={gin_file}",
                     f"--gin.MODEL_DIR='{dirs['moved']}'",
                     f"--gin.evaluate.model_dir='{dirs['moved']}'")}))
  return base, dirs, done


def _ok(done, name):
  code, out, err = done[name]
  assert code == 0, f"{name}: exit {code}\n{out[-3000:]}\n{err[-3000:]}"
  return out + err


def _same_losses(got, reference):
  assert [r["step"] for r in got] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
  for g, r in zip(got, reference):
    assert g["tokens"] == r["tokens"], g["step"]
    assert g["loss"] == pytest.approx(r["loss"], rel=2e-5), g["step"]
    if "validation_loss" in r:
      assert g["validation_loss"] == pytest.approx(r["validation_loss"], rel=2e-5), g["step"]


@pytest.mark.slow
def test_the_task_packs_several_documents_per_row_from_both_tasks(experiment):
  """The experiment's data, read here: a mixture whose rows hold several documents."""
  import tasks
  from paxgpt.data import loader
  from paxgpt.model.sharding import Partitioner, make_mesh
  base, _ = experiment
  names = []
  for name in ("prose", "code"):
    names.append(tasks.text_files_task(
        name=f"elastic_{name}", train_files=str(base / f"{name}_train.jsonl"),
        validation_files=str(base / f"{name}_validation.jsonl")))
  tasks.registry.register_mixture("elastic_mix", [(names[0], 2.0), (names[1], 1.0)])
  config = loader.DataConfig(mixture_or_task="elastic_mix", sequence_length=SEQUENCE_LENGTH,
                             batch_size=8, shuffle_buffer=64)
  batch = {k: np.asarray(v) for k, v in next(loader.TrainIterator(
      config, Partitioner(make_mesh()))).items()}
  documents = batch["decoder_segment_ids"].max(axis=1)
  assert documents.min() >= 2 and documents.mean() >= 3
  vocab = loader.get_vocabulary(config)
  text = vocab.decode([t for t in batch["decoder_target_tokens"].ravel().tolist()
                       if t not in (0, vocab.eos_id)])
  assert text.count(" = a * ") >= 4  # code documents next to prose ones


@pytest.mark.slow
def test_a_run_stopped_on_2x4_and_resumed_on_4x2_with_another_mesh_matches_1x8(runs):
  _, dirs, done = runs
  _ok(done, "reference"), _ok(done, "moved_first")
  resumed = _ok(done, "moved")
  reference = _metrics(dirs["reference"])
  _same_losses(_metrics(dirs["moved"]), reference)
  assert reference[-1]["loss"] < reference[0]["loss"]  # the updates did something
  assert ("at step 3 on 4 processes × 2 devices, mesh fsdp:4,tensor:2 (saved on 2 "
          "processes × 4 devices, mesh fsdp:8)") in resumed
  # The checkpoint the four processes wrote restores in one process on 8 devices.
  code, out, err = done["eval"]
  assert code == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["step"] == STEPS
  assert result["validation_loss"] == pytest.approx(reference[-1]["validation_loss"], rel=2e-5)


@pytest.mark.slow
def test_uninterrupted_runs_on_1_2_and_4_processes_give_the_same_losses(runs):
  base, dirs, done = runs
  _ok(done, "two"), _ok(done, "four")
  reference = _metrics(dirs["reference"])
  for name in ("two", "four"):
    _same_losses(_metrics(dirs[name]), reference)
  worker_log = (base / "logs_four" / "process_3.log").read_text()
  assert "process 3 of 4 joining coordinator 127.0.0.1:" in worker_log
  assert "step 1/" not in worker_log  # process 0 alone writes logs and metrics


@pytest.mark.slow
def test_bad_resumes_are_one_line_and_exit_2(runs):
  base, _, done = runs
  code, _, err = done["other_data"]
  assert code == 2, err[-3000:]
  assert err.strip().splitlines() == [
      "paxgpt: error: the saved data position is for other data settings (seed: saved 0, "
      "now 1); resume with the saved settings, or set DataConfig.restore_position=False to "
      "start the data stream afresh"]
  code, out, err = done["three"]  # the launcher stops the others at the first failure
  assert code == 2, out[-3000:] + err[-3000:]
  log = (base / "logs_three" / "process_0.log").read_text().strip().splitlines()
  assert log[-1] == ("paxgpt: error: DataConfig.batch_size=8 is not divisible by the 3 "
                     "processes of this run: run it on a process count that divides it "
                     "(1, 2, 4, 8)"), log
  assert not any("Traceback" in line for line in log)


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
