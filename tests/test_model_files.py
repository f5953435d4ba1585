"""paxgpt/config/model_files.py: gin/models/*.gin read without gin gives the
GPTConfig that gin itself builds from the same file."""
import os

import gin
import pytest

from paxgpt.config import model_files
from paxgpt.model import gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(f[:-4] for f in os.listdir(
    os.path.join(ROOT, "gin", "models"))))
def test_model_config_reads_the_same_shapes_as_gin(name):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "models", f"{name}.gin")],
                                        [])
    assert model_files.model_config(name) == gpt.GPTConfig()
  finally:
    gin.clear_config()


def test_model_config_refuses_a_binding_it_cannot_read(tmp_path, monkeypatch):
  (tmp_path / "gin" / "models").mkdir(parents=True)
  (tmp_path / "gin" / "models" / "odd.gin").write_text("GPTConfig.num_layers = %LAYERS\n")
  monkeypatch.setattr(model_files, "REPO_ROOT", str(tmp_path))
  with pytest.raises(ValueError, match="odd.gin:1"):
    model_files.model_config("odd")
