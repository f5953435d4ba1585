"""`paxgpt info`, the accounting behind it, and the CLI's handling of bad input."""
import json

import gin
import pytest

from paxgpt.model import accounting
from paxgpt.model import info
from paxgpt.model import gpt
from paxgpt.model import sharding
from paxgpt.cli import main
from conftest import closed_form_params

# GPT-3 Table 2.1 sizes. The table rounds to two significant figures: the
# architecture it lists has 355.9M parameters for "350M", 1.316B for "1.3B",
# 2.652B for "2.7B" and 12.85B for "13.0B" (d_model 5120); GPT-2 medium and
# GPT-Neo 2.7B, of the same shapes, report the same counts. So the exact count
# is checked against the closed form, and against the table to within its
# rounding (2%).
TABLE_2_1 = {"small": 125e6, "medium": 350e6, "large": 760e6, "xl": 1.3e9, "2p7b": 2.7e9,
             "6p7b": 6.7e9, "13b": 13.0e9, "175b": 175.0e9}


def run_cli(capsys, *argv):
  gin.clear_config()
  code = main.main(list(argv))
  out, err = capsys.readouterr()
  gin.clear_config()
  return code, out, err


def info_json(capsys, size, *extra):
  code, out, err = run_cli(capsys, "info", f"--gin_file=gin/models/gpt3_{size}.gin", "--json",
                           *extra)
  assert code == 0, err
  return json.loads(out)


@pytest.mark.parametrize("size", sorted(TABLE_2_1))
def test_param_counts_of_gpt3_sizes(capsys, size):
  report = info_json(capsys, size, "--mesh=data:1,fsdp:8,tensor:1")
  config = gpt.GPTConfig(**{k: report[k] for k in (
      "num_layers", "d_model", "num_heads", "head_dim", "vocab_size")}, max_len=2048)
  assert report["params"] == closed_form_params(config)
  assert report["params"] == pytest.approx(TABLE_2_1[size], rel=0.02)
  assert report["d_ff"] == 4 * report["d_model"]
  assert report["padded_vocab_size"] == 50304
  embedding = (50304 + 2048) * report["d_model"]
  assert report["params_non_embedding"] == report["params"] - embedding


def test_flops_per_token_of_gpt3_small(capsys):
  report = info_json(capsys, "small")
  n = report["params_non_embedding"] + 50304 * 768
  # 6 layers dense causal (avg (T+1)/2 keys) + 6 banded (W=256), T=2048
  dense_keys = 2049 / 2
  banded_keys = (256 * 257 / 2 + (2048 - 256) * 256) / 2048
  attention = 12 * 768 * 6 * (dense_keys + banded_keys)
  assert report["flops_per_token"] == pytest.approx(6 * n + attention, rel=1e-12)


def test_gpt3_175b_is_sharded_almost_everywhere(capsys):
  report = info_json(capsys, "175b", "--mesh=data:1,fsdp:16,tensor:4")
  assert report["unsharded_param_fraction"] < 0.01
  # float32 weights over 64 devices, to within the few replicated bytes
  assert report["param_bytes_per_device"] == pytest.approx(report["params"] * 4 / 64, rel=0.01)


def test_bytes_per_device_by_hand():
  config = gpt.GPTConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=4, max_len=32)
  variables = gpt.abstract_variables(config)
  per_device, replicated = accounting.bytes_per_device(
      variables, {"data": 2, "fsdp": 4, "tensor": 2})
  # every weight has an embed (fsdp=4) axis; heads/mlp/vocab add tensor=2;
  # 'layers' and 'length' stay whole.
  p = variables["params"]
  sizes = {
      "embed+tensor": 256 * 64 + 2 * (4 * 64 * 64 + 2 * 64 * 256),
      "embed only": 32 * 64 + 2 * (2 * 64 + 4 * 64) + 2 * 64,  # biases, LayerNorms
      "tensor only": 2 * (3 * 64 + 256),
  }
  expected = 4 * (sizes["embed+tensor"] / 8 + sizes["embed only"] / 4 + sizes["tensor only"] / 2)
  assert per_device == expected and replicated == 0.0
  assert set(p["layers"]) == {"0_dense", "1_banded"}


def test_text_output(capsys):
  code, out, _ = run_cli(capsys, "info", "--gin_file=gin/models/gpt3_tiny.gin",
                         "--mesh=data:1,fsdp:1,tensor:1")
  config = gpt.GPTConfig(vocab_size=259, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                           max_len=128, window=16)
  total = closed_form_params(config)
  embedding = config.padded_vocab_size * 64 + 128 * 64
  assert code == 0
  assert out.splitlines()[:2] == [
      "GPT: 2 layers, d_model 64, 4 heads x 16, d_ff 256, vocab 259 (padded 384), "
      "attention dense/banded (W=16)",
      f"parameters:            {total:,} ({total - embedding:,} non-embedding)"]
  assert out.splitlines()[4] == "replicated fraction:   1.0000"


@pytest.mark.parametrize("argv, needle", [
    (["info", "--gin_file=gin/models/gpt3_tiny.gin", "--gin.NoSuchThing.x=1"], "NoSuchThing"),
    (["info", "--gin_file=gin/models/gpt3_tiny.gin", "--gin.GPTConfig.num_layerz=2"],
     "num_layerz"),
    (["info"], "--gin_file"),
    (["info", "--gin_file=gin/models/no_such.gin"], "no_such.gin"),
    (["info", "--gin_file=gin/models/gpt3_tiny.gin", "--mesh=data:3,fsdp:-1,tensor:1"],
     "data:3,fsdp:-1,tensor:1"),
    (["info", "--gin_file=gin/models/gpt3_tiny.gin", "--mesh=data:1,fsdp:1,tensor:8"],
     "num_heads=4"),
    (["info", "--gin_file=gin/models/gpt3_tiny.gin", "--mesh=dta:2"], "dta:2"),
    (["info", "--gin_file=gin/models/gpt3_tiny.gin", "--no_such_flag"], "--no_such_flag"),
    (["infoo"], "infoo"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
  code, _, err = run_cli(capsys, *argv)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("paxgpt: error:"), err
  assert needle in lines[0]


def test_mesh_resolution():
  assert sharding.resolve_mesh_shape(8, data=2, fsdp=-1, tensor=2) == (2, 2, 2)
  with pytest.raises(sharding.MeshError, match="needs 6 devices but there are 8"):
    sharding.resolve_mesh_shape(8, data=2, fsdp=3, tensor=1)
  with pytest.raises(sharding.MeshError, match="at most one axis"):
    sharding.resolve_mesh_shape(8, data=-1, fsdp=-1)
  assert info.mesh_axis_sizes("fsdp:16,tensor:4") == {"data": 1, "fsdp": 16, "tensor": 4}
