"""`paxgpt sample`'s output survives the run (paxgpt/decoding/output.py, offline.py):
the issue-24 cases it owns (work lost 1, 2 and 5; SIGTERM during sample), a kill -9
in the middle of a 300-line run and the same command again, per-line number checks,
and a 2-process run that writes the 1-process output."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import pytest

from conftest import TINY, one_device, tiny
from paxgpt.decoding import offline
from paxgpt.decoding import output as output_lib
from paxgpt.decoding import sampling
from paxgpt.errors import RunDirBusyError, RunError, UsageError
from paxgpt.store import checkpoint
from paxgpt.store import model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(max_len=128, init_std=0.3)


# --- the output file on its own ---------------------------------------------

def _fingerprint(**changes):
  return {"prompts_sha256": "abc", "step": 3, "settings": {"temperature": 0.0, **changes}}


def test_work_lost_2_second_writer_is_refused(tmp_path):
  output = str(tmp_path / "out.jsonl")
  first = output_lib.OutputFile.open(output, _fingerprint())
  with pytest.raises(RunDirBusyError) as refused:
    output_lib.OutputFile.open(output, _fingerprint())
  message = str(refused.value)
  assert "\n" not in message and f"--output={output}" in message
  assert f"pid {os.getpid()}" in message
  first.write({"line": 1, "completions": ["a"]})
  first.finish()
  assert open(output).read() == '{"line": 1, "completions": ["a"]}\n'
  assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # no partial, no lock left
  output_lib.OutputFile.open(output, _fingerprint()).close()  # free again


def test_work_lost_1_a_partial_file_of_another_run_is_refused_and_kept(tmp_path):
  output = str(tmp_path / "out.jsonl")
  out = output_lib.OutputFile.open(output, _fingerprint())
  out.write({"line": 2, "completions": ["x"]})
  out.close()
  before = open(output + ".partial", "rb").read()
  with pytest.raises(UsageError, match=r"was written for another run \(settings.temperature "
                                       r"differ\)"):
    output_lib.OutputFile.open(output, _fingerprint(temperature=1.0))
  assert open(output + ".partial", "rb").read() == before and not os.path.exists(output)


def test_work_lost_1_a_torn_last_line_is_cut_and_the_rest_kept(tmp_path):
  output = str(tmp_path / "out.jsonl")
  out = output_lib.OutputFile.open(output, _fingerprint())
  out.write({"line": 5, "completions": ["é"]})
  out.close()
  with open(output + ".partial", "ab") as f:
    f.write(b'{"line": 6, "compl')  # the process died here
  again = output_lib.OutputFile.open(output, _fingerprint())
  assert again.done == {5: '{"line": 5, "completions": ["é"]}\n'.encode()}
  again.write({"line": 6, "completions": ["y"]})
  again.finish()
  assert [json.loads(x)["line"] for x in open(output, encoding="utf-8")] == [5, 6]


def test_an_output_that_cannot_be_written_at_the_end_keeps_the_partial(tmp_path, monkeypatch):
  output = str(tmp_path / "out.jsonl")
  out = output_lib.OutputFile.open(output, _fingerprint())
  out.write({"line": 1, "completions": ["a"]})
  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(output_lib.os, "replace", full_disk)
  with pytest.raises(RunError, match=r"cannot write it \(No space left on device\); every "
                                     r"finished line is kept in .*out.jsonl.partial"):
    out.finish()
  monkeypatch.undo()
  assert output_lib.OutputFile.open(output, _fingerprint()).done == {
      1: b'{"line": 1, "completions": ["a"]}\n'}  # and a rerun takes it over


# --- sample_file on a fake model ---------------------------------------------

class _Engine:
  """Answers "A" to every request; raises KeyboardInterrupt at request `fail_at`."""

  def __init__(self, fail_at=None):
    self.fail_at, self.prompts = fail_at, []

  def run(self, requests, on_finish, interrupted=None):
    import tasks
    token = tasks.get_vocabulary("byte").encode("A")[0]
    for index, request in enumerate(requests):
      if index == self.fail_at:
        raise KeyboardInterrupt
      self.prompts.append(request.ids)
      on_finish(index, [token], sampling.LENGTH)


def _fake(monkeypatch, engines, **settings):
  import tasks
  config = offline.SampleConfig(checkpoint_dir="unused", max_tokens=1, seed=3, **settings)
  monkeypatch.setattr(offline, "SampleConfig", lambda: config)
  monkeypatch.setattr(offline, "_model", lambda config, step: (
      tiny(**MODEL), tasks.get_vocabulary("byte"), "byte", "eos", 3))
  monkeypatch.setattr(offline, "load_decoders", lambda *a: (engines.pop(0), None))


def test_work_lost_5_lone_surrogate_is_one_bad_line(tmp_path, monkeypatch):
  prompts = tmp_path / "in.jsonl"
  prompts.write_text('{"prompt": "good"}\n{"prompt": "\\ud800"}\n{"prompt": "x", "id": "\\udfff"}\n'
                     '{"prompt": "also good"}\n')
  output = tmp_path / "out.jsonl"
  _fake(monkeypatch, [_Engine()])
  assert offline.sample_file(str(prompts), str(output)) == 1  # bad lines: exit code 1
  lines = [json.loads(x) for x in output.read_text(encoding="utf-8").splitlines()]
  assert [x["line"] for x in lines] == [1, 2, 3, 4]
  assert lines[0]["completions"] == ["A"] and lines[3]["completions"] == ["A"]
  assert "line 2: field 'prompt' holds a lone surrogate" in lines[1]["error"]
  assert "line 3: field 'id' holds a lone surrogate" in lines[2]["error"]


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"], ids=["empty", "blank"])
def test_work_lost_1_an_empty_or_blank_prompts_file_never_replaces_out(tmp_path, monkeypatch,
                                                                       text):
  prompts, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  prompts.write_text(text)
  output.write_text("finished work\n")
  _fake(monkeypatch, [_Engine()])
  with pytest.raises(UsageError, match=r"--prompts=.*no request lines"):
    offline.sample_file(str(prompts), str(output))
  assert output.read_text() == "finished work\n"
  assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


def test_work_lost_1_a_rerun_that_fails_at_start_up_keeps_the_partial(tmp_path, monkeypatch):
  prompts, output = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
  prompts.write_text('{"prompt": "p"}\n')
  out = output_lib.OutputFile.open(output, _fingerprint())
  out.write({"line": 1, "completions": ["kept"]})
  out.close()
  before = open(output + ".partial", "rb").read()
  config = offline.SampleConfig(checkpoint_dir=str(tmp_path / "mistyped"), vocabulary="byte")
  monkeypatch.setattr(offline, "SampleConfig", lambda: config)
  with pytest.raises(UsageError, match="mistyped"):
    offline.sample_file(str(prompts), output)
  assert open(output + ".partial", "rb").read() == before


def test_work_lost_1_an_interrupted_run_continues_and_never_truncates(tmp_path, monkeypatch):
  prompts, output = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
  prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(6)))
  second = _Engine()
  _fake(monkeypatch, [_Engine(fail_at=4), second])
  with pytest.raises(KeyboardInterrupt):
    offline.sample_file(str(prompts), output)
  kept = open(output + ".partial", "rb").read().splitlines(keepends=True)[1:]
  assert len(kept) == 4
  assert offline.sample_file(str(prompts), output) == 0
  assert len(second.prompts) == 2  # only the lines not finished before
  final = open(output, "rb").read().splitlines(keepends=True)
  assert [json.loads(x)["line"] for x in final] == list(range(1, 7)) and final[:4] == kept


def test_prompt_start_is_the_models_convention_and_a_line_can_override_it(monkeypatch):
  import tasks
  vocab = tasks.get_vocabulary("byte")
  config = offline.SampleConfig(seed=1, max_tokens=8)
  parse = lambda text, start: offline.parse_request(1, text, config, vocab, 128, start).ids
  encoded = list(vocab.encode("hi"))
  assert parse('{"prompt": "hi"}', "eos") == [vocab.eos_id] + encoded
  assert parse('{"prompt": "hi"}', "none") == encoded
  assert parse('{"prompt": "hi", "prompt_start": "none"}', "eos") == encoded
  assert parse('{"prompt": "", "prompt_start": "none"}', "eos") == [vocab.eos_id]
  with pytest.raises(offline.RequestError, match="field 'prompt_start' must be one of"):
    parse('{"prompt": "hi", "prompt_start": "bos"}', "eos")


@pytest.mark.parametrize("field, value", [
    ("temperature", 1e308), ("top_p", -1e300), ("repetition_penalty", 3.5e38),
    ("length_penalty", 1e39), ("top_k", 2**40), ("seed", 2**31), ("max_tokens", 2**63),
    ("no_repeat_ngram_size", 10**9),
])
def test_traceback_numbers_that_overflow_the_device_are_one_bad_line(field, value):
  import tasks
  line = json.dumps({"prompt": "x", field: value})
  with pytest.raises(offline.RequestError, match=f"line 4: field '{field}' must be"):
    offline.parse_request(4, line, offline.SampleConfig(), tasks.get_vocabulary("byte"), 64)


# --- the real command: kill -9, SIGTERM, two processes -------------------------

def _line(i):
  """300 requests of every kind: greedy, seeded samples, n=2, stop strings, beams."""
  request = {"prompt": f"request {i}: " + "abc " * (i % 9), "max_tokens": 1 + (i * 7) % 24,
             "id": i}
  if i % 4 == 1:
    request.update(temperature=0.9, top_k=20)
  if i % 10 == 3:
    request.update(n=2, temperature=1.0)
  if i % 8 == 5:
    request["stop"] = ["e", "q"]
  if i % 50 == 7:
    request = {"prompt": f"beam {i}", "beam_size": 2, "max_tokens": 6}
  return json.dumps(request) + "\n"


@pytest.fixture(scope="module", name="run_dir")
def _run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample_runs")
  config = tiny(**MODEL)
  params = sampling.init_params(config, one_device(), seed=1)
  ckpt = checkpoint.Checkpointer(root / "model", checkpoint.CheckpointConfig(async_save=False))
  ckpt.save(3, types.SimpleNamespace(params=params, opt_state={"count": jnp.zeros((), jnp.int32)}),
            {"epoch": 0})
  ckpt.close()
  model_dir.write(root / "model", config, "byte")
  (root / "in.jsonl").write_text("".join(_line(i) for i in range(300)))
  return root


def _command(root, output, processes=1):
  args = ["sample", f"--gin.CHECKPOINT_DIR='{root / 'model'}'", "--gin.SampleConfig.seed=11",
          "--gin.SampleConfig.slots=8", "--gin.SampleConfig.steps_per_call=2",
          f"--prompts={root / 'in.jsonl'}", f"--output={output}", "--mesh=data:2,fsdp:2,tensor:1"]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHON": sys.executable}
  if processes == 1:
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    return [sys.executable, "-m", "paxgpt.cli", *args], env
  return ["bash", os.path.join(ROOT, "launch/cpu_multiprocess.sh"), "--processes",
          str(processes), "--devices", "2", "--timeout", "400", "--", *args], env


def _finished_lines(path):
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n") - 1  # the header
  except FileNotFoundError:
    return 0


def _start_and_wait_for(root, output, lines):
  command, env = _command(root, output)
  process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  deadline = time.monotonic() + 300
  while _finished_lines(str(output) + ".partial") < lines:
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.05)
  return process


@pytest.fixture(scope="module", name="clean_output")
def _clean_output(run_dir):
  output = run_dir / "clean.jsonl"
  command, env = _command(run_dir, output)
  result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
  assert result.returncode == 0, result.stderr
  return output.read_bytes()


@pytest.mark.slow
def test_work_lost_1_rerun_continues_from_the_partial_file(run_dir, clean_output):
  output = run_dir / "killed.jsonl"
  process = _start_and_wait_for(run_dir, output, 60)
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  assert not output.exists()
  before = open(str(output) + ".partial", "rb").read().splitlines(keepends=True)[1:]
  assert 60 <= len(before) < 300
  command, env = _command(run_dir, output)
  result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
  assert result.returncode == 0, result.stderr
  assert f"({len(before)} kept from an earlier run)" in result.stdout
  final = output.read_bytes()
  lines = final.splitlines(keepends=True)
  assert [json.loads(x)["line"] for x in lines] == list(range(1, 301))  # once each, in order
  assert set(before) <= set(lines)  # the finished ones byte for byte
  assert final == clean_output  # and the whole file is the uninterrupted run's
  assert not os.path.exists(str(output) + ".partial")


@pytest.mark.slow
def test_traceback_sigterm_during_sample_says_what_is_kept(run_dir):
  output = run_dir / "terminated.jsonl"
  process = _start_and_wait_for(run_dir, output, 20)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  kept = _finished_lines(str(output) + ".partial")
  assert process.returncode == 1
  assert stderr.splitlines() == [
      f"paxgpt: error: sample stopped by SIGTERM after {kept} of 300 lines; the finished lines "
      f"are kept in {output}.partial: run the same command again to continue"]
  assert 20 <= kept < 300 and not output.exists()


@pytest.mark.slow
def test_two_processes_write_the_one_process_output(run_dir, clean_output):
  output = run_dir / "two.jsonl"
  command, env = _command(run_dir, output, processes=2)
  result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=450)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert output.read_bytes() == clean_output
