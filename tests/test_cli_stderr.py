"""What `paxgpt` prints on stderr, counted over whole processes (issue 24): the
quiet start-up covers `import` and `export` (no line on success, one on bad
input), and the cases whose "Event loop is closed" tracebacks used to get past
the filter now and then (a restore that fails: eval or sample on a MODEL_DIR
whose model.json was edited; a full disk during a save) print exactly one line
each, in ten repetitions run in one process so that they stay cheap."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import init_train_state, one_device, tiny, tiny_hf_and_model_dir
from paxgpt.store import checkpoint
from paxgpt.store import model_dir as model_dir_lib
from paxgpt.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPETITIONS = 10


def _environment(*paths):
  """This environment as a user's shell has it: without conftest's
  TF_CPP_MIN_LOG_LEVEL (TensorFlow's start-up lines show unless paxgpt hides them)."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  return {**env, "PYTHONPATH": os.pathsep.join((REPO,) + paths)}


def _paxgpt(*argv):
  """(exit code, stderr lines) of `python -m paxgpt.cli ARGV` in a fresh process."""
  result = subprocess.run([sys.executable, "-m", "paxgpt.cli", *map(str, argv)], cwd=REPO,
                          env=_environment(), capture_output=True, text=True, timeout=600)
  return result.returncode, result.stderr.splitlines()


@pytest.mark.slow
def test_import_and_export_start_up_is_quiet(tmp_path):
  hf_dir, _ = tiny_hf_and_model_dir(str(tmp_path / "source"))
  assert _paxgpt("import", f"--hf_dir={hf_dir}", f"--model_dir={tmp_path / 'model'}") == (0, [])
  assert _paxgpt("export", f"--model_dir={tmp_path / 'model'}",
                 f"--hf_dir={tmp_path / 'hf'}") == (0, [])
  code, err = _paxgpt("import", f"--hf_dir={tmp_path / 'nowhere'}",
                      f"--model_dir={tmp_path / 'other'}")
  assert code == 2 and err == [f"paxgpt: error: --hf_dir={tmp_path / 'nowhere'}: no such "
                               f"directory"]
  (tmp_path / "file").write_text("")
  code, err = _paxgpt("export", f"--model_dir={tmp_path / 'model'}",
                      f"--hf_dir={tmp_path / 'file' / 'out'}")
  assert code == 2 and err == [f"paxgpt: error: --hf_dir={tmp_path / 'file' / 'out'}: "
                               f"{tmp_path / 'file'} is not a directory"]


# Runs in a fresh process: REPETITIONS times eval and sample on the MODEL_DIR
# argv[1] (its model.json names another shape than its checkpoint), then
# REPETITIONS checkpoint saves that hit a full disk, each reported as the CLI does.
WIND_DOWN = textwrap.dedent("""
    import errno, os, sys
    import gin
    from paxgpt.cli import main
    from paxgpt import errors
    from paxgpt.store import checkpoint
    from conftest import init_train_state, one_device, tiny
    from paxgpt.training import optim
    model_dir, prompts, out, repetitions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    for _ in range(repetitions):
      for argv in (["eval", f"--gin.MODEL_DIR='{model_dir}'"],
                   ["sample", f"--gin.CHECKPOINT_DIR='{model_dir}'", f"--prompts={prompts}",
                    f"--output={out}/o.jsonl"]):
        assert main.main(argv + ["--mesh=data:1,fsdp:8,tensor:1"]) == 2
        gin.clear_config()
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
    real = handler.JsonCheckpointHandler._save_fn
    optimizer, _ = optim.make_optimizer(optim.OptimizerConfig(decay_steps=10))
    state = init_train_state(tiny(max_len=32, window=8), optimizer, one_device())
    for n in range(repetitions):
      handler.JsonCheckpointHandler._save_fn = real
      ckpt = checkpoint.Checkpointer(f"{out}/full_{n}", checkpoint.CheckpointConfig(keep=5))
      ckpt.save(1, state, {"position": 1})
      ckpt.wait()
      async def full_disk(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
      handler.JsonCheckpointHandler._save_fn = full_disk
      ckpt.save(2, state, {"position": 2})
      try:
        ckpt.wait()
      except errors.RunError as e:  # as paxgpt/cli/main.py reports it
        print(f"paxgpt: error: {errors.one_line(e)}", file=sys.stderr)
      ckpt.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


@pytest.mark.slow
def test_the_flaky_wind_down_cases_print_one_line_each_in_ten_repetitions(tmp_path):
  config = tiny(max_len=32, window=8)
  optimizer, _ = optim.make_optimizer(optim.OptimizerConfig(decay_steps=10))
  ckpt = checkpoint.Checkpointer(tmp_path / "run", checkpoint.CheckpointConfig(async_save=False))
  ckpt.save(1, init_train_state(config, optimizer, one_device()), {"position": 1})
  ckpt.close()
  model_dir_lib.write(tmp_path / "run", tiny(max_len=32, window=8, d_model=32, head_dim=8),
                      "byte")  # an edited model.json: another shape than the checkpoint's
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hello"}) + "\n")
  result = subprocess.run(
      [sys.executable, "-c", WIND_DOWN, str(tmp_path / "run"), str(tmp_path / "in.jsonl"),
       str(tmp_path), str(REPETITIONS)],
      cwd=REPO, env=_environment(os.path.join(REPO, "tests")), capture_output=True, text=True,
      timeout=900)
  err = result.stderr.splitlines()
  assert result.returncode == 0, result.stderr[-3000:]
  shape = [line for line in err if "was written by another model shape" in line]
  full = [line for line in err if "[Errno 28] No space left on device" in line]
  assert len(shape) == 2 * REPETITIONS and len(full) == REPETITIONS, err
  assert len(err) == 3 * REPETITIONS and all(l.startswith("paxgpt: error: ") for l in err), err
  assert all("kept checkpoints: [1]" in line for line in full)
