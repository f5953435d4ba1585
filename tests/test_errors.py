"""The error contract and the "nothing lost" cases (issue 13), one test or more
per case: a run owns its MODEL_DIR (1), config fields are type-checked (2), the
sampler checks its output first and streams it (3) under per-line caps (4), a
corrupt checkpoint is one line and training resumes from an older one (5), a
failed save is reported at once (6), bad input is exit 2 and one stderr line
(7), start-up noise is hidden (9), resumes are marked in metrics.jsonl (10),
progress bars on a terminal only (11); and issue 24's cases, each test named
after its case (work lost 3 and 4, the traceback bullets, the noise)."""
import dataclasses
import errno
import glob
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import gin
import numpy as np
import pytest

from conftest import init_train_state, one_device, tiny
from paxgpt import errors, progress
from paxgpt.store import checkpoint
from paxgpt.data import loader
from paxgpt.training import metrics
from paxgpt.model import gpt
from paxgpt.training import optim
from paxgpt.store import run_lock
from paxgpt.decoding import sampling
from paxgpt.decoding import offline
from paxgpt.training import train_step
from paxgpt.training import trainer
from paxgpt.cli import main
from paxgpt.errors import (CheckpointError, ConfigError, RunDirBusyError, RunError,
                           UsageError)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- 1: one run owns MODEL_DIR ----------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
  held = run_lock.RunLock.acquire(tmp_path)
  try:
    with pytest.raises(RunDirBusyError, match=rf"in use by another run \(host .+, pid "
                                              rf"{os.getpid()}\)"):
      run_lock.RunLock.acquire(tmp_path)
    with pytest.raises(RunDirBusyError):  # before any config, data or Orbax work
      trainer.train(tmp_path, mesh=one_device().mesh)
  finally:
    held.release()
  run_lock.RunLock.acquire(tmp_path).release()  # free again once released


def test_the_lock_of_a_dead_process_is_stale_and_taken_over(tmp_path):
  dead = {"host": "gone", "pid": 999999, "started": 0}
  with open(tmp_path / run_lock.LOCK_FILE, "w") as f:  # no flock: its process died
    json.dump(dead, f)
  lock = run_lock.RunLock.acquire(tmp_path)
  assert lock.stale == dead and "host gone, pid 999999" in run_lock.describe(lock.stale)
  lock.release()


def test_an_unwritable_model_dir_is_a_usage_error(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UsageError, match="MODEL_DIR=.*cannot be written"):
    run_lock.RunLock.acquire(tmp_path / "file" / "run")


# --- 2 and 7: every config field is type-checked; bad values are ConfigErrors

@pytest.mark.parametrize("make, message", [
    (lambda: trainer.TrainConfig(num_steps=3.5), r"TrainConfig.num_steps=3.5 must be an integer"),
    (lambda: trainer.TrainConfig(num_steps="ten"), r"TrainConfig.num_steps='ten'"),
    (lambda: trainer.TrainConfig(eval_every=-1), r"TrainConfig.eval_every=-1 must be >= 0"),
    (lambda: trainer.TrainConfig(time_limit_s="60"), r"time_limit_s='60' must be a finite"),
    (lambda: gpt.GPTConfig(num_layers=3), r"GPTConfig.num_layers=3 is not a multiple"),
    (lambda: gpt.GPTConfig(num_heads=4.0), r"GPTConfig.num_heads=4.0 must be an integer"),
    (lambda: gpt.GPTConfig(dtype="float99"), r"GPTConfig.dtype='float99' is not a dtype"),
    (lambda: optim.OptimizerConfig(peak_learning_rate=-1e-3), r"peak_learning_rate=-0.001"),
    (lambda: optim.OptimizerConfig(b1=math.nan), r"OptimizerConfig.b1=nan must be a finite"),
    (lambda: loader.DataConfig(eval_max_batches=2.5), r"eval_max_batches=2.5 must be an integer "
                                                    r"or None"),
    (lambda: loader.DataConfig(mixture_or_task=3), r"DataConfig.mixture_or_task=3 must be a str"),
    (lambda: checkpoint.CheckpointConfig(save_every_steps=0), r"save_every_steps=0 must be >= 1"),
    (lambda: checkpoint.CheckpointConfig(async_save=1), r"async_save=1 must be true or false"),
    (lambda: offline.SampleConfig(max_tokens=True), r"SampleConfig.max_tokens=True"),
])
def test_config_values_are_checked(make, message):
  with pytest.raises(ConfigError, match=message):
    make()


def test_valid_configs_still_build():
  assert gpt.GPTConfig(attention_pattern=["dense", "banded"]).attention_pattern == (
      "dense", "banded")
  assert optim.OptimizerConfig(peak_learning_rate=1).peak_learning_rate == 1
  assert trainer.TrainConfig(train_tokens=300e9, time_limit_s=None).train_tokens == 300e9


def _cli(*args):
  result = subprocess.run([sys.executable, "-m", "paxgpt.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  return result.returncode, result.stderr.splitlines()


@pytest.mark.parametrize("binding, message", [
    ("--gin.GPTConfig.num_layers=3", "paxgpt: error: GPTConfig.num_layers=3 is not a multiple"),
    ("--gin.GPTConfig.dtype='float99'", "paxgpt: error: GPTConfig.dtype='float99' is not a"),
    ("--gin.GPTConfig.num_layers=%NOPE", "paxgpt: error: gin: %NOPE is not defined"),
    ("--gin.GPTConfig.dtype=float32", "paxgpt: error: gin: --gin.GPTConfig.dtype=float32: not "
                                      "a gin value; strings need quotes"),
])
def test_bad_input_is_exit_2_and_one_stderr_line(binding, message):
  code, stderr = _cli("info", "--gin_file=gin/models/gpt3_small.gin", binding)
  assert code == 2 and len(stderr) == 1 and stderr[0].startswith(message), stderr


def test_one_line_drops_gins_suffix_and_bounds_the_length():
  text = "GPTConfig.x=1 bad\n  In call to configurable 'GPTConfig' (<class ...>)"
  assert errors.one_line(text) == "GPTConfig.x=1 bad"
  assert len(errors.one_line("x" * 5000)) == errors.MAX_LINE


def test_a_prompts_file_that_is_not_utf8_names_the_line(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
  with pytest.raises(UsageError, match=r"prompts.jsonl line 2: not UTF-8"):
    offline.read_prompts(str(path))


def test_a_text_file_that_is_not_utf8_is_one_line(tmp_path):
  import tasks
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine\n\xff\n")
  name = tasks.text_files_task(name="not_utf8_corpus", train_files=str(bad),
                               validation_files=str(bad))
  config = loader.DataConfig(mixture_or_task=name, sequence_length=32, batch_size=8)
  with pytest.raises(loader.DataError, match=r"bad\.txt line 2: not UTF-8"):
    next(loader.TrainIterator(config, one_device()))


# --- 3: the sampler's output: checked first, streamed, renamed at the end -----

@pytest.mark.parametrize("output, message", [
    ("missing_dir/out.jsonl", "cannot write .*No such file or directory"),
    ("", "is a directory"),
])
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, output, message):
  from paxgpt.decoding import output as output_lib
  with pytest.raises(UsageError, match=message):
    output_lib.OutputFile.open(os.path.join(tmp_path, output), {})


class _FakeEngine:
  """Decodes "A" for every request; raises at request number `fail_at`."""

  def __init__(self, fail_at=None):
    self.fail_at = fail_at

  def run(self, requests, on_finish, interrupted=None):
    import tasks
    token = tasks.get_vocabulary("byte").encode("A")[0]
    for index, _ in enumerate(requests):
      if index == self.fail_at:
        raise RuntimeError("the decoder died")
      on_finish(index, [token], sampling.LENGTH)


def _fake_model(monkeypatch, engines):
  """sample_file on a fake model; each run takes the next of `engines`."""
  import tasks
  config = offline.SampleConfig(slots=1, max_tokens=1, checkpoint_dir="unused")
  monkeypatch.setattr(offline, "SampleConfig", lambda: config)
  monkeypatch.setattr(offline, "_model", lambda config, step: (
      tiny(), tasks.get_vocabulary("byte"), "byte", "eos", 3))
  monkeypatch.setattr(offline, "load_decoders", lambda *a: (engines.pop(0), None))


def test_results_are_written_as_they_complete_and_a_crash_keeps_them(tmp_path, monkeypatch,
                                                                     capsys):
  lines = [json.dumps({"prompt": f"p{i}"}) for i in range(10)]
  prompts = tmp_path / "in.jsonl"
  prompts.write_text("\n".join(lines) + "\n")
  output = str(tmp_path / "out.jsonl")
  _fake_model(monkeypatch, [_FakeEngine(fail_at=7), _FakeEngine()])
  with pytest.raises(RuntimeError, match="the decoder died"):
    offline.sample_file(str(prompts), output)
  assert not os.path.exists(output)
  kept = [json.loads(line) for line in open(output + ".partial")][1:]  # after the header
  assert [k["line"] for k in kept] == list(range(1, 8))
  assert f"stopped after {len(kept)} of {len(lines)} lines" in capsys.readouterr().err

  assert offline.sample_file(str(prompts), output) == 0  # continues from the partial file
  assert not os.path.exists(output + ".partial")
  assert [json.loads(line)["completions"] for line in open(output)] == [["A"]] * len(lines)


# --- 4: per-line caps; finite numbers -----------------------------------------

@pytest.mark.parametrize("request_, message", [
    ('{"prompt": "x", "n": 100000000, "max_tokens": 1}',
     r"field 'n' must be an integer in \[1, 1024\]"),
    ('{"prompt": "x", "beam_size": 500}', r"field 'beam_size' must be an integer in \[1, 64\]"),
    ('{"prompt": "x", "n": 1000, "max_tokens": 2000}', r"n=1000 x max_tokens=2000 exceeds "
                                                       r"the cap of 1048576"),
    ('{"prompt": "x", "temperature": Infinity}', r"field 'temperature' must be a finite number"),
    ('{"prompt": "x", "top_p": NaN}', r"field 'top_p' must be a finite number"),
])
def test_one_line_cannot_exhaust_the_host(request_, message):
  import tasks
  with pytest.raises(offline.RequestError, match="line 7: " + message):
    offline.parse_request(7, request_, offline.SampleConfig(),
                               tasks.get_vocabulary("byte"), 1 << 30)


# --- 5 and 6: checkpoints that cannot be read or written ----------------------

CONFIG = tiny(max_len=32, window=8)
OPTIMIZER, _ = optim.make_optimizer(optim.OptimizerConfig(decay_steps=10))


def _saved(directory, steps=(1, 2)):
  part = one_device()
  state = init_train_state(CONFIG, OPTIMIZER, part)
  ckpt = checkpoint.Checkpointer(directory, checkpoint.CheckpointConfig(keep=5))
  for step in steps:
    ckpt.save(step, state, {"position": step})
  ckpt.close()
  return part.abstract(train_step.abstract_train_state(CONFIG, OPTIMIZER))


def _truncate_largest(directory, step):
  files = glob.glob(os.path.join(checkpoint.checkpoint_dir(directory), str(step),
                                 "params", "ocdbt.process_0", "d", "*"))
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_a_corrupt_checkpoint_is_one_line_and_training_resumes_from_an_older_one(tmp_path):
  abstract = _saved(tmp_path)
  _truncate_largest(tmp_path, 2)
  with pytest.raises(CheckpointError) as raised:
    checkpoint.restore_params(tmp_path, abstract.params)
  text = str(raised.value)
  assert "\n" not in text and len(text) < 700
  assert f"checkpoint {checkpoint.checkpoint_dir(tmp_path)}/2 cannot be restored:" in text
  assert "saved steps: [1, 2] (choose another with --step)" in text

  ckpt = checkpoint.Checkpointer(tmp_path)
  step, restored, skipped = ckpt.restore_newest(abstract.params, abstract.opt_state)
  ckpt.close()
  assert step == 1 and restored[2] == {"position": 1}
  assert len(skipped) == 1 and "/2 cannot be restored" in str(skipped[0])
  assert os.listdir(tmp_path / checkpoint.UNRESTORABLE_SUBDIR) == ["2"]
  assert checkpoint.Checkpointer(tmp_path, read_only=True).all_steps() == [1]


def test_an_empty_json_item_and_another_model_shape_are_one_line(tmp_path):
  abstract = _saved(tmp_path, steps=(1,))
  other = one_device().abstract(gpt.abstract_variables(tiny(max_len=32, window=8,
                                                              d_model=32, head_dim=8))["params"])
  with pytest.raises(checkpoint.ShapeMismatchError,
                     match=r"/1 was written by another model shape: parameter \S+ is \(.*\) in "
                           r"the checkpoint but \(.*\) in the config"):
    checkpoint.restore_params(tmp_path, other)
  open(os.path.join(checkpoint.checkpoint_dir(tmp_path), "1", "data", "metadata"), "w").close()
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  with pytest.raises(CheckpointError, match=r"/1 cannot be restored: JSONDecodeError"):
    ckpt.restore(1, abstract.params, abstract.opt_state)
  ckpt.close()


def test_a_full_disk_during_an_async_save_is_reported_at_once(tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
  part = one_device()
  state = init_train_state(CONFIG, OPTIMIZER, part)
  ckpt = checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(keep=5))
  ckpt.save(1, state, {"position": 1})
  ckpt.wait()
  real = handler.JsonCheckpointHandler._save_fn

  async def full_disk(self, x, directory):
    if "2" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
    return await real(self, x, directory)
  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", full_disk)
  ckpt.save(2, state, {"position": 2})
  with pytest.raises(RunError) as raised:
    ckpt.wait()  # trainer.py calls check() every step; wait() is check() that blocks
  ckpt.close()  # reported once: closing does not raise it again
  text = str(raised.value)
  assert "\n" not in text and text.startswith("saving checkpoint 2 to ")
  assert "[Errno 28] No space left on device" in text and "kept checkpoints: [1]" in text
  # the failed step is never taken for a checkpoint (its temporary directory is removed
  # when the failure is seen and at close; a write still in flight may leave a fragment)
  restarted = checkpoint.Checkpointer(tmp_path)
  assert restarted.all_steps() == [1]
  restarted.close()
  assert "2" not in os.listdir(checkpoint.checkpoint_dir(tmp_path))


def test_the_wind_down_of_a_failed_save_leaves_no_tracebacks_on_stderr():
  out = io.StringIO()
  stderr = main.QuietStderr(out)
  stderr.write("Traceback (most recent call last):\n  File \"x\", line 1, in f\n")
  stderr.write("RuntimeError: Event loop is closed\n")
  stderr.write("\r\033[Kstep 3/10")  # a line in progress goes out at once
  stderr.write("\nTraceback (most recent call last):\n  File \"y\"\nValueError: real\n")
  stderr.flush()  # a traceback's chain may go on until the next line or flush
  assert out.getvalue() == ("\r\033[Kstep 3/10\nTraceback (most recent call last):\n"
                            "  File \"y\"\nValueError: real\n")


# --- 9: start-up noise ---------------------------------------------------------

def test_quiet_start_up_hides_absl_warnings():
  from absl import logging as absl_logging
  before = absl_logging.get_verbosity()
  try:
    main.quiet_start_up()
    assert absl_logging.get_verbosity() == absl_logging.FATAL
  finally:
    absl_logging.set_verbosity(before)


# --- 10: a resume is marked and the replayed rows are dropped --------------------

def test_a_resume_drops_the_replayed_rows_and_marks_the_resume(tmp_path):
  first = metrics.MetricsWriter(tmp_path, 5, stream=io.StringIO())
  for step in range(1, 5):
    first.write(step, {"loss": float(step)})
  first.close()  # died after step 4; the checkpoint is from step 2
  second = metrics.MetricsWriter(tmp_path, 5, stream=io.StringIO())
  second.resumed(2)
  for step in range(3, 6):
    second.write(step, {"loss": 10.0 + step})
  second.close()
  assert [(r["step"], r["loss"]) for r in metrics.read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]
  marker = metrics.read_metrics(tmp_path, events=True)[2]
  assert marker == {"step": 2, "event": "resumed", "dropped_records": 2}


# --- 11: progress bars with rate and time left, on a terminal only --------------

class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bars_show_rate_and_time_left_on_a_terminal_only():
  tty, pipe = _Terminal(), io.StringIO()
  for stream in (tty, pipe):
    with progress.Progress(4, "sample", unit="lines", stream=stream) as bar:
      for _ in range(4):
        bar.update(1)
  assert "sample [" in tty.getvalue() and "lines/s" in tty.getvalue()
  assert "left" in tty.getvalue() and pipe.getvalue() == ""
  assert progress.duration(3725) == "1:02:05" and progress.duration(65) == "01:05"
  unknown = _Terminal()
  assert list(progress.progress(iter(range(3)), "eval", unit="batches", stream=unknown)) == [
      0, 1, 2]
  assert "eval 3 batches" in unknown.getvalue() and "left" not in unknown.getvalue()
  line = metrics.ProgressLine(10, stream=_Terminal())
  line.update(1, {"loss": 2.0})
  line.update(2, {"loss": 1.0})
  line.tick(3)
  assert "steps/s" in line.stream.getvalue() and "step  3/10" in line.stream.getvalue()
  plain = metrics.ProgressLine(10, stream=io.StringIO())
  plain.update(1, {"loss": 2.0})
  plain.tick(2)
  assert plain.stream.getvalue() == "step  1/10 loss=2\n"


# --- issue 24: nothing lost, every mistake one line (round 2) --------------------
# A test (or more) per case of the issue, named after it. "work lost" tests check
# that the work survives (model.json byte-identical, the checkpoint present); the
# others run the command in this process and check its exit code (2; 1 for a run
# that fails, as a NaN loss does) and that stderr is exactly one line naming the
# input. tests/test_cli_stderr.py counts the lines of whole processes.

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASK_DIR = os.path.join(REPO, "tasks", "lm_eval")
# 2 steps of gin/models/gpt3_tiny.gin on pydoc_topics, 8 rows of 32 bytes.
TRAIN_FLAGS = ["--gin_file=gin/models/gpt3_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
               "--gin.TASK='pydoc_topics'", "--gin.SEQUENCE_LENGTH=32", "--gin.BATCH_TOKENS=256",
               "--gin.TrainConfig.train_tokens=None", "--gin.TrainConfig.num_steps=2",
               "--gin.OptimizerConfig.warmup_tokens=None", "--gin.OptimizerConfig.decay_tokens=None",
               "--gin.OptimizerConfig.warmup_steps=1", "--gin.OptimizerConfig.decay_steps=4",
               "--gin.DataConfig.eval_max_batches=1", "--gin.CheckpointConfig.async_save=False"]
TENSOR_8 = "--mesh=data:1,fsdp:1,tensor:8"  # the tiny model has 4 heads


def _paxgpt(capsys, *argv):
  """(exit code, stderr lines, stdout) of `paxgpt ARGV` run in this process."""
  capsys.readouterr()
  try:
    code = main.main([str(a) for a in argv])
  finally:
    gin.clear_config()
  sys.stderr.flush()
  captured = capsys.readouterr()
  return code, captured.err.splitlines(), captured.out


def _one_line(result, *named, code=2):
  """The one stderr line of a failed command, checked to name each of `named`."""
  got, err = result[:2]
  assert got == code and len(err) == 1 and err[0].startswith("paxgpt: error: "), result
  for text in named:
    assert text in err[0], (text, err[0])
  return err[0]


def _train(capsys, model_dir, *flags, mesh="--mesh=data:1,fsdp:8,tensor:1"):
  return _paxgpt(capsys, "train", *TRAIN_FLAGS, f"--gin.MODEL_DIR='{model_dir}'", mesh, *flags)


def _must_not_run(*args, **kwargs):
  raise AssertionError("the work started before the input was checked")


def _copy_hf(hf_dir, target):
  shutil.copytree(hf_dir, target)
  return target


@pytest.fixture(scope="module", name="hf_model")
def _hf_model(tmp_path_factory):
  from conftest import tiny_hf_and_model_dir
  return tiny_hf_and_model_dir(str(tmp_path_factory.mktemp("hf_model")))


@pytest.fixture(scope="module", name="trained")
def _trained(tmp_path_factory):
  """A MODEL_DIR that `paxgpt train` wrote: 2 steps of the tiny model."""
  model_dir = tmp_path_factory.mktemp("trained") / "run"
  try:
    assert main.main(["train", *TRAIN_FLAGS, f"--gin.MODEL_DIR='{model_dir}'",
                      "--mesh=data:1,fsdp:8,tensor:1"]) == 0
  finally:
    gin.clear_config()
  return model_dir


def _missing_data_task(directory):
  """A copy of tasks/lm_eval/paxgpt_choice.yaml, as task paxgpt_missing_data, in
  `directory`, whose test file does not exist; returns that file's path."""
  gone = str(directory / "gone.jsonl")
  with open(os.path.join(TASK_DIR, "paxgpt_choice.yaml"), encoding="utf-8") as f:
    text = f.read().replace("task: paxgpt_choice", "task: paxgpt_missing_data")
  (directory / "missing.yaml").write_text(
      text.replace("tasks/lm_eval/data/choice_test.jsonl", gone))
  return gone


# Work lost 3: a refused command leaves MODEL_DIR as it was, or does not create it.

def test_work_lost_3_a_refused_resume_keeps_model_json_and_config_gin(trained, hf_model,
                                                                      tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  before = {name: (run / name).read_bytes() for name in ("model.json", "config.gin")}
  steps = sorted(os.listdir(run / "checkpoints"))
  _one_line(_train(capsys, run, f"--gin.VOCABULARY='gpt2:{hf_model[0]}'"),
            f"vocabulary 'gpt2:{hf_model[0]}' is not the one {run} was trained with ('byte'")
  assert {name: (run / name).read_bytes() for name in before} == before
  assert sorted(os.listdir(run / "checkpoints")) == steps


def test_work_lost_3_a_refused_command_creates_no_model_dir(tmp_path, capsys):
  _one_line(_train(capsys, tmp_path / "new" / "run", mesh=TENSOR_8), "num_heads=4")
  _one_line(_train(capsys, tmp_path / "new" / "run", "--gin.DataConfig.sequence_length=1000"),
            "TrainConfig.batch_tokens=256")
  assert os.listdir(tmp_path) == []


def test_work_lost_3_the_lock_removes_only_what_it_created(tmp_path):
  run_lock.RunLock.acquire(tmp_path / "a" / "b").release()  # wrote nothing: nothing is left
  assert os.listdir(tmp_path) == []
  lock = run_lock.RunLock.acquire(tmp_path / "a" / "b")
  (tmp_path / "a" / "b" / "model.json").write_text("{}")
  lock.release()  # wrote something: the directory and its lock file stay
  assert sorted(os.listdir(tmp_path / "a" / "b")) == [run_lock.LOCK_FILE, "model.json"]
  (tmp_path / "mine").mkdir()  # the user's empty directory: kept, empty
  run_lock.RunLock.acquire(tmp_path / "mine").release()
  assert os.listdir(tmp_path / "mine") == []
  again = run_lock.RunLock.acquire(tmp_path / "a" / "b")  # the kept file locks as before
  with pytest.raises(RunDirBusyError):
    run_lock.RunLock.acquire(tmp_path / "a" / "b")
  again.release()


# Work lost 4: few-shot task data is checked at the start; a few-shot failure keeps
# the step's checkpoint; fewshot's --output is checked before any work.

def test_work_lost_4_missing_fewshot_data_fails_when_training_starts(tmp_path, capsys,
                                                                     monkeypatch):
  monkeypatch.chdir(REPO)  # the task's other split is relative to the checkout
  gone = _missing_data_task(tmp_path)
  _one_line(_train(capsys, tmp_path / "run", "--gin.TrainConfig.fewshot_tasks=['paxgpt_missing_data']",
                   f"--gin.TrainConfig.fewshot_include_path='{tmp_path}'"),
            "lm-eval task 'paxgpt_missing_data' cannot be loaded", gone)
  assert not (tmp_path / "run").exists()
  with pytest.raises(UsageError, match=r"TrainConfig.fewshot_limit=0.0 must be a fraction"):
    trainer._check_fewshot(trainer.TrainConfig(fewshot_tasks=("paxgpt_choice",),
                                               fewshot_limit=0.0, fewshot_include_path=TASK_DIR))


@pytest.mark.slow
def test_work_lost_4_the_final_checkpoint_survives_a_failing_fewshot(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)

  def harness_dies(self, params):
    raise RuntimeError("the harness died")
  monkeypatch.setattr(trainer._Run, "fewshot", harness_dies)
  with pytest.raises(RuntimeError, match="the harness died"):
    trainer.train(
        tmp_path, mesh=one_device().mesh, model_config=tiny(max_len=32),
        data_config=loader.DataConfig(mixture_or_task="pydoc_topics", sequence_length=32,
                                      batch_size=4, eval_max_batches=1),
        optimizer_config=optim.OptimizerConfig(warmup_steps=1, decay_steps=4),
        train_config=trainer.TrainConfig(num_steps=2, fewshot_tasks=("paxgpt_choice",),
                                         fewshot_include_path=TASK_DIR, fewshot_limit=2),
        checkpoint_config=checkpoint.CheckpointConfig(save_every_steps=1000))
  saved = checkpoint.Checkpointer(tmp_path, read_only=True)
  assert saved.all_steps() == [2]  # the last step's, written before the few-shot scores
  saved.close()


def test_work_lost_4_fewshot_output_is_checked_before_any_work(hf_model, capsys, monkeypatch):
  from paxgpt.interop import lm_eval_model
  monkeypatch.setattr(lm_eval_model, "PaxGPTLM", _must_not_run)
  _one_line(_paxgpt(capsys, "fewshot", f"--gin.MODEL_DIR='{hf_model[1]}'", "--tasks=paxgpt_choice",
                    f"--include_path={TASK_DIR}", "--output=/no/such/dir/r.json"),
            "--output=/no/such/dir/r.json: no such directory /no/such/dir")


# Tracebacks where the README promises one line.

def test_traceback_mesh_tensor_8_with_4_heads(trained, hf_model, tmp_path, capsys):
  message = "num_heads=4 is not divisible by the tensor mesh axis size 8"
  _one_line(_train(capsys, tmp_path / "run", mesh=TENSOR_8), message)
  _one_line(_paxgpt(capsys, "eval", f"--gin.MODEL_DIR='{trained}'", TENSOR_8), message)
  _one_line(_paxgpt(capsys, "export", f"--model_dir={hf_model[1]}", f"--hf_dir={tmp_path / 'o'}",
                    TENSOR_8), message)
  _one_line(_paxgpt(capsys, "import", f"--hf_dir={hf_model[0]}", f"--model_dir={tmp_path / 'i'}",
                    TENSOR_8), message)
  prompts = tmp_path.parent / f"{tmp_path.name}_prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
  _one_line(_paxgpt(capsys, "sample", f"--gin.CHECKPOINT_DIR='{trained}'", f"--prompts={prompts}",
                    f"--output={tmp_path / 'o.jsonl'}", TENSOR_8),  # every restore checks it
            "the mesh does not fit parameter", "is partitioned 8 times, but the dimension size is 4")
  assert os.listdir(tmp_path) == []


def test_traceback_export_and_import_paths_under_a_file_or_a_dangling_link(hf_model, tmp_path,
                                                                           capsys, monkeypatch):
  from paxgpt.interop import hf
  (tmp_path / "file").write_text("")
  os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
  monkeypatch.setattr(hf, "restore", _must_not_run)  # checked before the export's work
  monkeypatch.setattr(hf, "stream_params", _must_not_run)  # and the import's
  for out, named in ((tmp_path / "file" / "out", f"{tmp_path / 'file'} is not a directory"),
                     (tmp_path / "dangling", f"link to {tmp_path / 'nowhere'}, which does not")):
    _one_line(_paxgpt(capsys, "export", f"--model_dir={hf_model[1]}", f"--hf_dir={out}"),
              f"--hf_dir={out}", named)
    _one_line(_paxgpt(capsys, "import", f"--hf_dir={hf_model[0]}", f"--model_dir={out}"),
              f"--model_dir={out}", named)
  assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]


def test_traceback_export_to_a_symlinked_hf_dir_writes_into_its_target(hf_model, tmp_path,
                                                                       capsys):
  (tmp_path / "target").mkdir()
  os.symlink(tmp_path / "target", tmp_path / "link")
  code, err, _ = _paxgpt(capsys, "export", f"--model_dir={hf_model[1]}",
                         f"--hf_dir={tmp_path / 'link'}")
  assert code == 0 and err == []
  assert os.path.islink(tmp_path / "link") and sorted(os.listdir(tmp_path)) == ["link", "target"]
  assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "target"))


@pytest.mark.parametrize("field, value", [("num_heads", 0), ("hidden_size", "64"),
                                          ("vocab_size", 1e12)])
def test_traceback_hf_config_values(hf_model, tmp_path, capsys, field, value):
  bad = _copy_hf(hf_model[0], tmp_path / "hf")
  config = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**config, field: value}))
  _one_line(_paxgpt(capsys, "import", f"--hf_dir={bad}", f"--model_dir={tmp_path / 'out'}"),
            f"config.json: {field}={json.dumps(value)} must be an integer >= 1")
  assert os.listdir(tmp_path) == ["hf"]


def test_traceback_a_safetensors_header_without_data_offsets(hf_model, tmp_path, capsys):
  path = _copy_hf(hf_model[0], tmp_path / "hf") / "model.safetensors"
  data = path.read_bytes()
  (size,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + size])
  name = next(k for k in header if k != "__metadata__")
  del header[name]["data_offsets"]
  text = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
  _one_line(_paxgpt(capsys, "import", f"--hf_dir={path.parent}", f"--model_dir={tmp_path / 'o'}"),
            f"{path}: tensor {name}: its header entry has no 'data_offsets'")


@pytest.mark.parametrize("flag", ["--limit=0", "--limit=-5", "--num_fewshot=-1"])
def test_traceback_fewshot_limit_and_num_fewshot(hf_model, capsys, monkeypatch, flag):
  from paxgpt.interop import lm_eval_model
  monkeypatch.setattr(lm_eval_model, "PaxGPTLM", _must_not_run)
  name, value = flag.split("=")
  _one_line(_paxgpt(capsys, "fewshot", f"--gin.MODEL_DIR='{hf_model[1]}'", "--tasks=paxgpt_choice",
                    f"--include_path={TASK_DIR}", flag), f"{name}={value}", "must be")


def test_traceback_a_task_yaml_pointing_at_a_missing_file(hf_model, tmp_path, capsys,
                                                          monkeypatch):
  from paxgpt.interop import lm_eval_model
  monkeypatch.chdir(REPO)
  gone = _missing_data_task(tmp_path)
  monkeypatch.setattr(lm_eval_model, "PaxGPTLM", _must_not_run)
  _one_line(_paxgpt(capsys, "fewshot", f"--gin.MODEL_DIR='{hf_model[1]}'",
                    "--tasks=paxgpt_missing_data", f"--include_path={tmp_path}"),
            "lm-eval task 'paxgpt_missing_data' cannot be loaded: FileNotFoundError", gone)


def test_traceback_num_steps_beyond_int32(tmp_path, capsys):
  _one_line(_train(capsys, tmp_path / "run", "--gin.TrainConfig.num_steps=100000000000000000000"),
            "TrainConfig.num_steps=100000000000000000000 exceeds 2147483647")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_traceback_a_nan_loss_is_one_line_on_stderr(tmp_path, capsys):
  result = _train(capsys, tmp_path / "run", "--gin.PEAK_LEARNING_RATE=1e6")
  _one_line(result, "the loss is nan at step 2 (learning rate", "peak_learning_rate", code=1)
  assert "error" not in result[2] and "In call to configurable" not in result[2]
  saved = checkpoint.Checkpointer(tmp_path / "run", read_only=True)
  assert saved.all_steps() == []  # the NaN state is never saved
  saved.close()


# Noise and wrong words.

def test_noise_a_truncated_tokenizer_json_is_named_as_the_users_file(hf_model, tmp_path, capsys):
  bad = _copy_hf(hf_model[0], tmp_path / "hf")
  (bad / "tokenizer.json").write_bytes((bad / "tokenizer.json").read_bytes()[:100])
  line = _one_line(_paxgpt(capsys, "import", f"--hf_dir={bad}", f"--model_dir={tmp_path / 'o'}"),
                   f"{bad / 'tokenizer.json'}: not JSON")
  assert ".partial" not in line and os.listdir(tmp_path) == ["hf"]


def test_noise_a_deleted_model_json_is_reported_missing(trained, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  os.remove(run / "model.json")
  missing = f"{run / 'model.json'} is missing, so the model's shape is unknown"
  _one_line(_paxgpt(capsys, "eval", f"--gin.MODEL_DIR='{run}'"), missing)
  _one_line(_paxgpt(capsys, "export", f"--model_dir={run}", f"--hf_dir={tmp_path / 'o'}"), missing)
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hello"}) + "\n")
  _one_line(_paxgpt(capsys, "sample", f"--gin.CHECKPOINT_DIR='{run}'",
                    f"--prompts={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}"),
            missing)


def _steps_with_seeds(directory, steps):
  """Checkpoints `steps` of the tiny model, each with parameters of seed = step."""
  part = one_device()
  ckpt = checkpoint.Checkpointer(directory, checkpoint.CheckpointConfig(keep=5,
                                                                        async_save=False))
  for step in steps:
    ckpt.save(step, init_train_state(CONFIG, OPTIMIZER, part, seed=step), {"position": step})
  ckpt.close()
  return part.abstract(train_step.abstract_train_state(CONFIG, OPTIMIZER)).params


def test_noise_a_checkpoint_removed_while_being_read(tmp_path, monkeypatch):
  """A train keeping one checkpoint saves step 3 and deletes step 2 while eval or
  sample reads step 2 (its files first, the directory a moment later): the newest
  complete step is read instead; a chosen --step is said to be removed while being
  read, not corrupt."""
  import threading
  import orbax.checkpoint as ocp
  abstract = _steps_with_seeds(tmp_path, (1, 2, 3))
  directory = checkpoint.checkpoint_dir(tmp_path)
  os.rename(os.path.join(directory, "3"), os.path.join(tmp_path, "3"))  # not saved yet
  real = ocp.CheckpointManager.restore
  during_read = {}  # step -> what the training run does while that step is read

  def restore(self, step, *args, **kwargs):
    during_read.pop(step, lambda: None)()
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)

  def delete_under_the_reader(step):
    shutil.rmtree(os.path.join(directory, str(step), "params"))
    threading.Timer(0.2, shutil.rmtree, [os.path.join(directory, str(step))]).start()

  def save_3_and_delete_2():
    os.rename(os.path.join(tmp_path, "3"), os.path.join(directory, "3"))
    delete_under_the_reader(2)
  during_read[2] = save_3_and_delete_2
  step, params = checkpoint.restore_params_at(tmp_path, abstract)
  want = init_train_state(CONFIG, OPTIMIZER, one_device(), seed=3).params
  assert step == 3
  np.testing.assert_array_equal(np.asarray(params["token_embedding"]),
                                np.asarray(want["token_embedding"]))

  during_read[3] = lambda: delete_under_the_reader(3)
  with pytest.raises(CheckpointError, match=r"/3 was removed while being read \(a running train "
                                            r"keeps only its last checkpoints\); saved steps: "
                                            r"\[1\]"):
    checkpoint.restore_params(tmp_path, abstract, step=3)


def test_noise_a_killed_import_leaves_no_partial_directory(hf_model, tmp_path):
  from paxgpt.interop import hf
  out = tmp_path / "model"
  killed = subprocess.run(  # what `kill -9` during an import leaves: its staging directory
      [sys.executable, "-c", "import os, sys; from paxgpt.store import run_lock; "
       "path, _ = run_lock.staging_dir(sys.argv[1], '--model_dir'); "
       "open(os.path.join(path, 'weights'), 'w').write('x' * 1000); os._exit(9)", str(out)],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
  assert killed.returncode == 9 and len(os.listdir(tmp_path)) == 1
  held, lock = run_lock.staging_dir(out, "--model_dir")  # a live import to the same MODEL_DIR
  with pytest.raises(RunDirBusyError, match=rf"--model_dir={out} is being written by another "
                                            rf"process \(host .*, pid {os.getpid()}, in {held}\)"):
    hf.import_hf(hf_model[0], out)
  lock.release()
  shutil.rmtree(held)
  hf.import_hf(hf_model[0], out)  # removes the killed one's directory, then imports
  assert os.listdir(tmp_path) == ["model"]
  assert sorted(os.listdir(out)) == [run_lock.LOCK_FILE, "checkpoints", "config.gin",
                                     "model.json", "vocabulary"]


def test_noise_the_disk_full_message_keeps_the_kept_checkpoints(tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
  part = one_device()
  state = init_train_state(CONFIG, OPTIMIZER, part)
  ckpt = checkpoint.Checkpointer(tmp_path / ("long_" * 30), checkpoint.CheckpointConfig(keep=5))
  for step in (1, 2):
    ckpt.save(step, state, {"position": step})
  ckpt.wait()

  async def full_disk(self, x, directory):  # every save from now on
    raise OSError(errno.ENOSPC, "No space left on device " + "(TensorStore spec) " * 40,
                  str(directory / "metadata"))
  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", full_disk)
  ckpt.save(3, state, {"position": 3})
  with pytest.raises(RunError) as raised:
    ckpt.wait()
  ckpt.close()
  line = errors.one_line(raised.value)
  assert len(line) <= errors.MAX_LINE and line == " ".join(str(raised.value).split())
  assert "kept checkpoints: [1, 2]" in line and "[Errno 28] No space left on device" in line


def test_noise_event_loop_closed_tracebacks_of_threads_are_filtered():
  """Orbax's threads print their tracebacks at once: lines interleave; chains and
  asyncio's headers belong to the traceback they announce."""
  out = io.StringIO()
  thread = [1]
  stderr = main.QuietStderr(out, thread_id=lambda: thread[0])

  def write(ident, text):
    thread[0] = ident
    stderr.write(text)
  noise = ["Traceback (most recent call last):\n", '  File "base_events.py", line 806\n',
           "    self._check_closed()\n", "RuntimeError: Event loop is closed\n"]
  for a, b in zip(noise, noise):  # two threads, line by line
    write(1, a)
    write(2, b)
  write(1, "Exception in callback Future.set_result()\n")
  write(1, "handle: <Handle Future.set_result()>\n")
  write(1, "Traceback (most recent call last):\n  File \"x\"\nCancelledError\n\n")
  write(1, "During handling of the above exception, another exception occurred:\n\n")
  write(1, "".join(noise))
  write(2, "Exception ignored in: <coroutine object f at 0x1>\n" + "".join(noise))
  write(1, "paxgpt: error: the one line\n")
  write(2, "Traceback (most recent call last):\n  File \"y\"\nValueError: real\n")
  stderr.flush()
  assert out.getvalue() == ("paxgpt: error: the one line\n"
                            "Traceback (most recent call last):\n  File \"y\"\nValueError: real\n")
