"""`paxgpt sample`: JSONL requests in, completions out; bad lines, stop strings,
beams, checkpoints."""
import dataclasses
import functools
import json
import types

import gin
import jax
import jax.numpy as jnp
import pytest

from conftest import TINY, one_device, tiny
from paxgpt.store import checkpoint
from paxgpt.model import gpt
from paxgpt.decoding import engine
from paxgpt.decoding import sampling
from paxgpt.decoding import offline
from paxgpt.model import sharding
from paxgpt.cli import main

MODEL = dict(max_len=64, init_std=0.3)  # conftest's TINY with these changes
CONFIG = offline.SampleConfig(slots=4, max_tokens=6, temperature=0.0, prompt_bucket=16,
                              steps_per_call=2, seed=11)


@functools.lru_cache(maxsize=None)
def setup():
  import tasks
  config = tiny(**MODEL)
  partitioner = one_device()
  params = sampling.init_params(config, partitioner, seed=1)
  vocab = tasks.get_vocabulary("byte")
  unrolled = sampling.decode_params(params, config, partitioner)
  return config, params, vocab, (
      engine.Engine(config, unrolled, partitioner, vocab.eos_id, slots=CONFIG.slots,
                    steps_per_call=CONFIG.steps_per_call),
      sampling.Decoder(config, unrolled, partitioner, vocab.eos_id))


def run(lines, config=CONFIG):
  model_config, _, vocab, (eng, decoder) = setup()
  return offline.run_requests(eng, decoder, vocab, [json.dumps(x) if isinstance(x, dict) else x
                                                    for x in lines], config, model_config.max_len)


def test_requests_in_order_with_bad_lines_reported_and_the_rest_processed():
  long_prompt = "x" * 60
  outputs, errors = run([
      {"prompt": "Hello", "n": 2, "max_tokens": 5},
      "{not json",
      {"prompt": "Hi", "temprature": 0.5},
      {"prompt": "abc", "top_p": 1.5},
      "",
      {"prompt": long_prompt},
      {"prompt": "Hello", "beam_size": 2, "n": 2, "max_tokens": 4, "id": "b"},
      {"prompt": "Hello", "beam_size": 2, "top_k": 3},
      {"prompt": "Hello", "max_tokens": 3, "greedy": True},
  ])
  assert errors == 5
  assert [o["line"] for o in outputs] == [1, 2, 3, 4, 6, 7, 8, 9]
  by_line = {o["line"]: o for o in outputs}
  assert "line 2" in by_line[2]["error"] and "JSON" in by_line[2]["error"]
  assert "line 3" in by_line[3]["error"] and "'temprature'" in by_line[3]["error"]
  assert "line 4" in by_line[4]["error"] and "'top_p'" in by_line[4]["error"]
  assert "line 6" in by_line[6]["error"] and "context of 64 tokens" in by_line[6]["error"]
  assert "line 8" in by_line[8]["error"] and "'top_k'" in by_line[8]["error"]

  first = by_line[1]
  assert first["prompt"] == "Hello" and len(first["completions"]) == 2
  assert first["completions"][0] == first["completions"][1]  # greedy (temperature 0)
  assert all(len(t) <= 5 for t in first["tokens"])
  _, _, vocab, _ = setup()
  for text, ids, reason in zip(first["completions"], first["tokens"], first["finish_reason"]):
    assert vocab.decode(ids) == text and reason in ("eos", "length")
    assert reason == "eos" or len(ids) == 5
  # max_tokens=3 gives the first 3 tokens of the same greedy continuation.
  assert by_line[9]["tokens"][0] == first["tokens"][0][:3]

  beams = by_line[7]
  assert beams["id"] == "b" and len(beams["completions"]) == 2 and len(beams["scores"]) == 2
  assert beams["scores"][0] >= beams["scores"][1]


def test_stop_strings_end_and_trim_the_completion():
  # Batches of 3 rows (padded to 4) reuse the programs compiled above.
  outputs, _ = run([{"prompt": "The cat", "max_tokens": 6}, {"prompt": "A"}, {"prompt": "B"}])
  text = outputs[0]["completions"][0]
  assert len(text) >= 4
  stop = text[3]
  outputs, errors = run([{"prompt": "The cat", "max_tokens": 6, "stop": ["\u2603", stop]},
                         {"prompt": "The cat", "max_tokens": 6, "stop": "\u2603"},
                         {"prompt": "B"}])
  assert errors == 0
  stopped, untouched, _ = outputs
  assert stopped["completions"] == [text[:text.find(stop)]]
  assert stopped["finish_reason"] == ["stop"]
  assert stop not in setup()[2].decode(stopped["tokens"][0])
  assert untouched["completions"] == [text] and untouched["finish_reason"] != ["stop"]


def test_trim_at_stop_keeps_tokens_wholly_before_the_stop():
  _, _, vocab, _ = setup()
  ids = list(vocab.encode("one. two. three"))
  text, kept, stopped = offline.trim_at_stop(ids, [". t", "zzz"], vocab)
  assert (text, vocab.decode(kept), stopped) == ("one", "one", True)
  assert offline.trim_at_stop(ids, ["zzz"], vocab) == ("one. two. three", ids, False)


def test_seeded_requests_are_reproducible_and_report_their_seed():
  request = {"prompt": "Once", "temperature": 1.0, "seed": 5, "n": 2, "max_tokens": 6}
  a, _ = run([request, {"prompt": "X"}])  # 3 rows, padded to 4 as below
  b, _ = run([{"prompt": "Other", "temperature": 0.9, "top_k": 4, "seed": 1}, request])
  assert a[0]["tokens"] == b[1]["tokens"] and a[0]["seed"] == 5
  assert a[0]["tokens"][0] != a[0]["tokens"][1]  # n samples differ from each other


def _save_checkpoint(model_dir, params):
  ckpt = checkpoint.Checkpointer(model_dir, checkpoint.CheckpointConfig(async_save=False))
  state = types.SimpleNamespace(params=params, opt_state={"count": jnp.zeros((), jnp.int32)})
  ckpt.save(3, state, {"epoch": 0})
  ckpt.close()


def _cli(tmp_path, checkpoint_dir, extra=()):
  out = tmp_path / "out.jsonl"
  bindings = [f"--gin.GPTConfig.{k}={v!r}" for k, v in {**TINY, **MODEL}.items()]
  try:
    return main.main(["sample", "--gin_file=gin/runs/sample.gin",
                      f"--gin.CHECKPOINT_DIR='{checkpoint_dir}'", "--gin.SampleConfig.max_tokens=5",
                      "--gin.SampleConfig.temperature=0.0", "--prompts", str(tmp_path / "in.jsonl"),
                      "--output", str(out), "--mesh", "data:2,fsdp:2,tensor:2", *bindings,
                      *extra]), out
  finally:
    gin.clear_config()


def test_sample_command_restores_a_checkpoint_onto_its_own_mesh(tmp_path):
  config, params, vocab, decoder = setup()
  _save_checkpoint(tmp_path / "run", params)
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hello", "id": 1}) + "\n"
                                     + json.dumps({"prompt": "Hi", "bogus": 1}) + "\n")
  code, out = _cli(tmp_path, tmp_path / "run", ["--step", "3"])
  assert code == 1  # one bad line
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert lines[1]["line"] == 2 and "'bogus'" in lines[1]["error"]
  # The same greedy tokens as the in-memory parameters on one device.
  want, _ = run([{"prompt": "Hello", "max_tokens": 5}])
  assert lines[0]["tokens"] == want[0]["tokens"] and lines[0]["id"] == 1


def test_sample_command_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hello"}) + "\n")
  (tmp_path / "empty").mkdir()
  code, _ = _cli(tmp_path, tmp_path / "empty")
  assert code == 2
  assert "no checkpoint in" in capsys.readouterr().err


def test_sample_config_rejects_bad_values():
  with pytest.raises(ValueError, match="slots=0"):
    dataclasses.replace(CONFIG, slots=0)
