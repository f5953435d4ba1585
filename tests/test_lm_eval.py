"""paxgpt as an lm-evaluation-harness model: the harness's own `hf` backend and
`paxgpt` score a random tiny GPT-Neo (built with transformers, imported with
`paxgpt import`) identically on the local tasks of tasks/lm_eval/, zero- and
2-shot; the same on an 8-device mesh; `paxgpt fewshot`, `lm_eval --model paxgpt`
(python -m paxgpt.interop.lm_eval_model), few-shot scores in training, bad input.

Offline: the tasks read local JSONL files (relative to the checkout), and the
harness never downloads (HF_*_OFFLINE)."""
import dataclasses
import json
import os
import subprocess
import sys

import gin
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from conftest import one_device, tiny  # noqa: E402
from paxgpt.training import optim  # noqa: E402
from paxgpt.bench import lm_eval as bench_lm_eval
from paxgpt.store import checkpoint
from paxgpt.data import loader
from paxgpt.interop import lm_eval_model
from paxgpt.training import metrics
from paxgpt.training import trainer  # noqa: E402
from paxgpt.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(ROOT, "tasks", "lm_eval")
TASKS = ["paxgpt_lastword", "paxgpt_choice", "paxgpt_qa", "paxgpt_documents"]
LOGLIKELIHOOD_TASKS = ["paxgpt_lastword", "paxgpt_choice"]
SHOTS = (0, 2)
MAX_LEN = 128  # the tiny GPT-Neo's context


@pytest.fixture(scope="module", autouse=True)
def _in_checkout():
  """The local tasks' data_files are relative to the checkout."""
  before = os.getcwd()
  os.chdir(ROOT)
  yield
  os.chdir(before)


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
  """(transformers directory, MODEL_DIR imported from it)."""
  root = tmp_path_factory.mktemp("lm_eval")
  hf_dir = bench_lm_eval.write_tiny_gpt_neo(str(root / "hf"), max_len=MAX_LEN)
  return hf_dir, bench_lm_eval.import_hf(hf_dir, str(root / "model"))


@pytest.fixture(scope="module")
def hf_lm(neo):
  from lm_eval.models.huggingface import HFLM
  return HFLM(pretrained=neo[0], device="cpu", dtype="float32", batch_size=4)


@pytest.fixture(scope="module")
def hf_results(hf_lm):
  """{shots: results with samples} of the harness's own hf backend."""
  return {k: lm_eval_model.evaluate(hf_lm, TASKS, num_fewshot=k, include_path=TASK_DIR,
                                    log_samples=True) for k in SHOTS}


@pytest.fixture(scope="module")
def pax_lm(neo):
  # Stop strings checked every 4 tokens: rows stop before max_gen_toks.
  return lm_eval_model.PaxGPTLM(model_dir=neo[1], mesh=one_device().mesh, batch_size=4,
                                stop_check_every=4)


@pytest.fixture(scope="module")
def pax_results(pax_lm):
  return {k: lm_eval_model.evaluate(pax_lm, TASKS, num_fewshot=k, include_path=TASK_DIR,
                                    log_samples=True) for k in SHOTS}


def _samples(results, task):
  """A task's per-document samples as JSON has them (tuples become lists), so
  results read back from `--output` compare with those in memory."""
  samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
  return json.loads(json.dumps(samples, default=str))


def _assert_same_samples(ours, theirs, task, abs_tol):
  """Same prompts (the harness built them), same numbers per request."""
  a, b = _samples(ours, task), _samples(theirs, task)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x["arguments"] == y["arguments"]
    for got, want in zip(x["resps"], y["resps"]):
      got, want = got[0], want[0]
      if isinstance(want, str):
        assert got == want
      elif isinstance(want, list):  # (log-likelihood, is_greedy): a float32 sum over
        # the continuation, so a few ulps of its size apart on another mesh
        assert got[0] == pytest.approx(want[0], rel=1e-6, abs=abs_tol)
        assert got[1] == want[1]
      else:  # a rolling document total: float32 sums over hundreds of tokens
        assert got == pytest.approx(want, rel=1e-6, abs=abs_tol)


@pytest.mark.parametrize("shots", SHOTS)
def test_loglikelihoods_and_choices_match_hf_backend(pax_results, hf_results, shots):
  ours, theirs = pax_results[shots], hf_results[shots]
  for task in LOGLIKELIHOOD_TASKS:
    _assert_same_samples(ours, theirs, task, abs_tol=1e-4)
  for task, metric in (("paxgpt_lastword", "acc,none"), ("paxgpt_choice", "acc,none"),
                       ("paxgpt_choice", "acc_norm,none")):
    assert ours["results"][task][metric] == theirs["results"][task][metric]
  if shots:  # the harness, not paxgpt, put the K examples into each prompt
    context = _samples(ours, "paxgpt_lastword")[0]["arguments"][0][0]
    assert context.count("\n\n") == shots


@pytest.mark.parametrize("shots", SHOTS)
def test_generations_match_hf_backend(pax_results, hf_results, shots):
  ours, theirs = pax_results[shots], hf_results[shots]
  _assert_same_samples(ours, theirs, "paxgpt_qa", abs_tol=0)
  assert (ours["results"]["paxgpt_qa"]["exact_match,none"]
          == theirs["results"]["paxgpt_qa"]["exact_match,none"])


def test_stop_strings_cut_generations_as_hf_backend(pax_lm, hf_lm, pax_results):
  """A random model rarely writes the task's stops, so each prompt gets a stop
  string taken from the middle of its own free-running output: both backends
  must cut there, identically."""
  from lm_eval.api.instance import Instance

  def requests(stops):
    return [Instance("generate_until", {}, (p, {"until": s, "max_gen_toks": 12}), i)
            for i, (p, s) in enumerate(zip(prompts, stops))]
  prompts = [s["arguments"][0][0] for s in _samples(pax_results[2], "paxgpt_qa")]
  free = pax_lm.generate_until(requests([[]] * len(prompts)))
  assert free == hf_lm.generate_until(requests([[]] * len(prompts)))
  keep = [i for i, text in enumerate(free) if text.isascii() and len(text) >= 6]
  assert len(keep) >= 2
  prompts = [prompts[i] for i in keep]
  stops = [[free[i][len(free[i]) // 2:len(free[i]) // 2 + 2]] for i in keep]
  cut = pax_lm.generate_until(requests(stops))
  assert cut == hf_lm.generate_until(requests(stops))
  for i, text, stop in zip(keep, cut, stops):
    assert text == free[i].split(stop[0])[0] and len(text) < len(free[i])


def test_rolling_loglikelihood_matches_hf_backend(pax_lm, pax_results, hf_results):
  docs = _samples(pax_results[0], "paxgpt_documents")
  lengths = [len(pax_lm.tok_encode(d["arguments"][0][0])) for d in docs]
  assert max(lengths) > 2 * MAX_LEN and min(lengths) < MAX_LEN  # several windows, and one
  for shots in SHOTS:
    _assert_same_samples(pax_results[shots], hf_results[shots], "paxgpt_documents", 1e-4)
  for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
    assert pax_results[0]["results"]["paxgpt_documents"][metric] == pytest.approx(
        hf_results[0]["results"]["paxgpt_documents"][metric], rel=1e-6)


def test_fewshot_command_on_8_devices_matches_one_device(neo, pax_results, tmp_path, capsys):
  output = tmp_path / "results.json"
  code = _fewshot(f"--gin.MODEL_DIR='{neo[1]}'", f"--tasks={','.join(TASKS)}",
                  "--num_fewshot=2", f"--include_path={TASK_DIR}",
                  "--mesh=data:2,fsdp:2,tensor:2", "--batch_size=4", f"--output={output}",
                  "--log_samples")
  assert code == 0
  table = capsys.readouterr().out
  assert "paxgpt_choice" in table and "acc_norm" in table
  eight = json.loads(output.read_text())
  assert eight["config"]["paxgpt_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  for task in TASKS:
    _assert_same_samples(eight, pax_results[2], task, abs_tol=1e-5)


def test_lm_eval_command_line_resolves_paxgpt(neo):
  """`lm_eval --model paxgpt` from a shell, through `python -m paxgpt.interop.lm_eval_model`."""
  result = subprocess.run(
      [sys.executable, "-m", "paxgpt.interop.lm_eval_model", "--model", "paxgpt", "--model_args",
       f"model_dir={neo[1]},mesh=data:1+fsdp:-1+tensor:1", "--tasks", "paxgpt_lastword",
       "--include_path", TASK_DIR, "--limit", "1", "--batch_size", "4"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "paxgpt_lastword" in result.stdout and "perplexity" in result.stdout


def _fewshot(*flags):
  """`paxgpt fewshot FLAGS` in this process (gin cleared after: it locks)."""
  try:
    return main.main(["fewshot", *flags])
  finally:
    gin.clear_config()


def _error_line(capsys):
  """The one error line, last on stderr (after any of the harness's progress bars)."""
  err = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in err if line.startswith("paxgpt: error: ")]
  assert len(errors) == 1 and err[-1] == errors[0]
  return errors[0]


def test_unknown_task_is_exit_2(neo, capsys):
  code = _fewshot(f"--gin.MODEL_DIR='{neo[1]}'", "--tasks=paxgpt_lastword,nope",
                  f"--include_path={TASK_DIR}")
  assert code == 2 and "unknown lm-eval task 'nope'" in _error_line(capsys)


def test_model_dir_without_checkpoint_is_exit_2(tmp_path, capsys):
  code = _fewshot(f"--gin.MODEL_DIR='{tmp_path}'", "--tasks=paxgpt_lastword",
                  f"--include_path={TASK_DIR}")
  assert code == 2 and "has no checkpoints" in _error_line(capsys)


def test_continuation_longer_than_the_context_is_exit_2(neo, tmp_path, capsys):
  """A loglikelihood request whose continuation alone exceeds the context: the
  harness windows only rolling requests (a long context is cut on the left)."""
  rows = tmp_path / "long.jsonl"
  rows.write_text(json.dumps({"text": "Start " + "word " * 300 + "end"}) + "\n")
  (tmp_path / "long.yaml").write_text(
      "task: paxgpt_too_long\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {rows}\noutput_type: loglikelihood\ntest_split: test\n"
      "doc_to_text: 'Start'\ndoc_to_target: \"{{text[5:]}}\"\ntarget_delimiter: ''\n"
      "metric_list:\n  - metric: acc\n")
  code = _fewshot(f"--gin.MODEL_DIR='{neo[1]}'", "--tasks=paxgpt_too_long",
                  f"--include_path={tmp_path}")
  line = _error_line(capsys)
  assert code == 2 and "longer than the model's context of 128" in line


def test_train_logs_fewshot_scores(tmp_path):
  model_dir = tmp_path / "run"
  trainer.train(
      model_dir, mesh=one_device().mesh, model_config=dataclasses.replace(tiny(), max_len=64),
      data_config=loader.DataConfig(mixture_or_task="pydoc_topics", sequence_length=32,
                                  batch_size=4, eval_max_batches=1),
      optimizer_config=optim.OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=1,
                                             decay_steps=4),
      train_config=trainer.TrainConfig(num_steps=3, log_every=10, eval_every=2,
                                       fewshot_tasks=("paxgpt_choice",), fewshot_every=2,
                                       fewshot_num_fewshot=1, fewshot_limit=3,
                                       fewshot_include_path=TASK_DIR),
      checkpoint_config=checkpoint.CheckpointConfig(save_every_steps=3, async_save=False))
  records = {r["step"]: r for r in metrics.read_metrics(model_dir)}
  assert sorted(records) == [2, 3]  # every 2 steps, and at the end
  for record in records.values():
    assert "validation_loss" in record
    assert 0.0 <= record["fewshot/paxgpt_choice/acc"] <= 1.0
    assert 0.0 <= record["fewshot/paxgpt_choice/acc_norm"] <= 1.0


def test_generations_start_as_the_models_prompts_do(pax_lm):
  # An imported model (prompt_start "none", as the hf backend) and one in training
  # ("eos", as `paxgpt sample` on a model paxgpt trained) build the same request but
  # for the leading EOS; the context is cut to leave room for max_gen_toks.
  kwargs = {"until": ["\n"], "max_gen_toks": 8}
  group = [(0, "The capital of", kwargs)]
  ids = pax_lm.tok_encode("The capital of")
  imported, _ = pax_lm._requests(group, dict(kwargs), max_prompt=100)
  assert pax_lm.prompt_start == "none" and imported[0].ids == ids
  trained = lm_eval_model.PaxGPTLM.from_params(pax_lm.config, pax_lm.params, pax_lm.vocab,
                                               pax_lm.partitioner, batch_size=4)
  eos_first, _ = trained._requests(group, dict(kwargs), max_prompt=100)
  assert eos_first[0].ids == [pax_lm.vocab.eos_id] + ids
  cut, _ = trained._requests(group, dict(kwargs), max_prompt=3)
  assert cut[0].ids == [pax_lm.vocab.eos_id] + ids[-2:]
