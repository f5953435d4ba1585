"""`paxgpt import` / `paxgpt export` against transformers (torch on CPU): tiny
random GPTNeoForCausalLM and GPT2LMHeadModel (5 heads of 12, a window of 5
shorter than the sequences, a 300-token vocabulary trained with the tokenizers
library), saved with save_pretrained; logits, sampling rules and beam search
compared with transformers' own; round trips; bad input."""
import json
import os
import shutil

import gin
import jax
import numpy as np
import pytest

from conftest import BPE_TEXTS, byte_level_bpe
from paxgpt.interop import hf
from paxgpt.model import gpt
from paxgpt.store import model_dir
from paxgpt.model import sharding
from paxgpt.cli import main
from paxgpt.errors import UsageError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MESH = "data:4,fsdp:2,tensor:1"  # d_model 60 splits over fsdp=2; 5 heads stay whole
WINDOW = 5
MAX_NEW = 16  # continuations longer than the window


def cli(*argv):
  try:
    return main.main([str(a) for a in argv])
  finally:
    gin.clear_config()


def build(arch, directory):
  """A random tiny transformers model and its tokenizer, saved; returns the model.
  initializer_range is large so that logits are far apart and greedy choices do
  not hinge on float rounding; EOS's embedding row is zero (logit exactly 0), so
  EOS, which paxgpt's rules never penalise or ban, never decides a comparison."""
  tokenizer = byte_level_bpe(directory)
  eos = tokenizer.eos_token_id
  vocab = len(tokenizer)
  torch.manual_seed(0)
  common = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, initializer_range=0.2)
  if arch == "gpt_neo":
    config = transformers.GPTNeoConfig(
        hidden_size=60, num_layers=4, num_heads=5, attention_types=[[["global", "local"], 2]],
        window_size=WINDOW, max_position_embeddings=64, intermediate_size=100, **common)
    hf_model = transformers.GPTNeoForCausalLM(config)
  else:
    config = transformers.GPT2Config(n_embd=60, n_layer=3, n_head=5, n_positions=64, n_inner=100,
                                     **common)
    hf_model = transformers.GPT2LMHeadModel(config)
  with torch.no_grad():
    hf_model.get_input_embeddings().weight[eos] = 0.0
  hf_model.eval()
  hf_model.save_pretrained(str(directory))
  return hf_model, tokenizer


@pytest.fixture(scope="module", params=["gpt_neo", "gpt2"], name="imported")
def _imported(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(request.param)
  hf_model, tokenizer = build(request.param, root / "hf")
  assert cli("import", f"--hf_dir={root / 'hf'}", f"--model_dir={root / 'pax'}",
             f"--mesh={MESH}") == 0
  return request.param, hf_model, tokenizer, root


def restore(directory):
  return hf.restore(directory, mesh=sharding.mesh_from_flag(MESH))


def hf_logits(hf_model, ids):
  with torch.no_grad():
    return hf_model(torch.tensor(ids)).logits.numpy()


def test_logits_equal_transformers(imported):
  arch, hf_model, tokenizer, root = imported
  cfg, spec, params = restore(root / "pax")
  vocab = len(tokenizer)
  assert (cfg.num_heads, cfg.head_dim, cfg.vocab_size, cfg.padded_vocab_size) == (5, 12, 301, 384)
  assert cfg.attention_pattern == (("dense", "banded") if arch == "gpt_neo" else ("dense",))
  assert spec == f"gpt2:{root / 'pax' / 'vocabulary'}"
  ids = np.random.RandomState(0).randint(0, vocab, (2, 48))
  ours = np.asarray(gpt.GPT(cfg).apply({"params": params}, ids + 1))
  theirs = hf_logits(hf_model, ids)
  np.testing.assert_allclose(ours[..., 1:vocab + 1], theirs, rtol=1e-5,
                             atol=1e-5 * np.abs(theirs).max())
  assert np.linalg.norm(ours[..., 1:vocab + 1] - theirs) < 1e-5 * np.linalg.norm(theirs)
  # Padding id 0 and the padded rows never win.
  assert (ours[..., 0] == gpt.PADDING_LOGIT).all()
  assert (ours[..., vocab + 1:] == gpt.PADDING_LOGIT).all()


REQUESTS = [
    dict(prompt="Hello world, it's", greedy=True),
    dict(prompt=" café 東京", greedy=True, repetition_penalty=1.5),
    dict(prompt="don't we'll 123", greedy=True, no_repeat_ngram_size=2),
    dict(prompt="Hello world, it's", beam_size=3, length_penalty=0.0),
]
GENERATE = [
    dict(do_sample=False),
    dict(do_sample=False, repetition_penalty=1.5),
    dict(do_sample=False, no_repeat_ngram_size=2),
    dict(do_sample=False, num_beams=3, length_penalty=0.0),
]


def test_sample_with_no_model_gin_equals_generate(imported, tmp_path):
  # An imported model's prompts start as transformers' do: generate(tokenizer(prompt)).
  arch, hf_model, tokenizer, root = imported
  assert model_dir.prompt_start(root / "pax") == "none"
  prompts = tmp_path / "in.jsonl"
  prompts.write_text("".join(json.dumps({**r, "max_tokens": MAX_NEW}) + "\n" for r in REQUESTS))
  out = tmp_path / "out.jsonl"
  assert cli("sample", f"--gin.CHECKPOINT_DIR='{root / 'pax'}'", f"--prompts={prompts}",
             f"--output={out}", f"--mesh={MESH}") == 0
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  eos = tokenizer.eos_token_id
  for request, settings, line in zip(REQUESTS, GENERATE, lines):
    prompt = tokenizer(request["prompt"])["input_ids"]
    with torch.no_grad():
      full = hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW,
                               pad_token_id=eos, **settings)[0].tolist()
    want = full[len(prompt):]
    want = want[:want.index(eos)] if eos in want else want
    assert [t - 1 for t in line["tokens"][0]] == want, (arch, request)
    assert len(want) > WINDOW


def test_export_loads_in_transformers_and_round_trips(imported, tmp_path):
  arch, hf_model, tokenizer, root = imported
  assert cli("export", f"--model_dir={root / 'pax'}", f"--hf_dir={tmp_path / 'out'}",
             f"--mesh={MESH}") == 0
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.partial")]
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert type(exported) is type(hf_model)
  ids = np.random.RandomState(1).randint(0, len(tokenizer), (2, 40))
  np.testing.assert_allclose(hf_logits(exported, ids), hf_logits(hf_model, ids), rtol=0,
                             atol=1e-6)
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  for text in BPE_TEXTS:
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
  # Import again: the same parameters (within float32 rounding) and config.
  assert cli("import", f"--hf_dir={tmp_path / 'out'}", f"--model_dir={tmp_path / 'again'}",
             f"--mesh={MESH}") == 0
  cfg1, _, params1 = restore(root / "pax")
  cfg2, _, params2 = restore(tmp_path / "again")
  assert cfg1 == cfg2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                                       atol=1e-7), params1, params2)


def _json_lines(capsys):
  return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]


# One architecture is enough for the training loop.
@pytest.mark.parametrize("imported", ["gpt_neo"], indirect=True)
def test_fine_tuning_from_an_imported_model_lowers_the_loss(imported, tmp_path, capsys):
  arch, _, _, root = imported
  data = ["--gin.DataConfig.sequence_length=32", "--gin.DataConfig.eval_max_batches=2",
          "--gin.DataConfig.batch_size=8", f"--mesh={MESH}"]
  capsys.readouterr()
  # eval with no gin file: model.json's config and vocabulary.
  assert cli("eval", f"--gin.MODEL_DIR='{root / 'pax'}'", *data) == 0
  before = _json_lines(capsys)[-1]
  assert before["step"] == 0
  imported_config, vocabulary = model_dir.read(root / "pax")
  run = tmp_path / "ft"
  assert cli("train", "--gin_file=gin/runs/finetune.gin", f"--gin.MODEL_DIR='{run}'",
             f"--gin.INIT_FROM='{root / 'pax'}'", "--gin.TASK='pydoc_topics'",
             f"--gin.VOCABULARY='{vocabulary}'", "--gin.PEAK_LEARNING_RATE=3e-3",
             "--gin.BATCH_TOKENS=256", "--gin.OptimizerConfig.peak_learning_rate=3e-3",
             "--gin.TrainConfig.num_steps=30", "--gin.TrainConfig.eval_every=0",
             "--gin.OptimizerConfig.warmup_steps=3", "--gin.CheckpointConfig.async_save=False",
             *data) == 0
  after = _json_lines(capsys)[-1]
  assert model_dir.read(run)[0] == imported_config  # the run carries the imported config
  assert (run / "config.gin").read_text().count("TrainConfig.init_from") == 1
  assert after["step"] == 30
  assert after["validation_loss"] < before["validation_loss"] - 1.0, (before, after)


def _only_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("paxgpt: error: "), err
  return err[0]


def _import_fails(source, out, capsys):
  assert cli("import", f"--hf_dir={source}", f"--model_dir={out}", f"--mesh={MESH}") == 2
  assert not out.exists()
  assert not [n for n in os.listdir(out.parent) if ".partial" in n]
  return _only_line(capsys)


def _copy(source, target, skip=()):
  target.mkdir()
  for name in os.listdir(source):
    if name not in skip:
      (target / name).write_bytes((source / name).read_bytes())


# The checks do not depend on the architecture.
@pytest.mark.parametrize("imported", ["gpt2"], indirect=True)
def test_bad_input_exits_2_naming_it_and_writes_nothing(imported, tmp_path, capsys):
  arch, _, _, root = imported
  source = root / "hf"
  out = tmp_path / "out"
  _copy(source, tmp_path / "no_config", skip=("config.json",))
  assert "no config.json" in _import_fails(tmp_path / "no_config", out, capsys)

  config = json.loads((source / "config.json").read_text())
  for field, value, named in [("model_type", "bert", "model_type"),
                              ("scale_attn_by_inverse_layer_idx", True,
                               "scale_attn_by_inverse_layer_idx"),
                              ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn"),
                              ("activation_function", "relu", "activation_function")]:
    bad = tmp_path / f"bad_{field}"
    _copy(source, bad)
    (bad / "config.json").write_text(json.dumps({**config, field: value}))
    assert named in _import_fails(bad, out, capsys)

  only_bin = tmp_path / "only_bin"
  _copy(source, only_bin, skip=("model.safetensors",))
  (only_bin / "pytorch_model.bin").write_bytes(b"pickle")
  assert "only pytorch_model.bin" in _import_fails(only_bin, out, capsys)

  truncated = tmp_path / "truncated"
  _copy(source, truncated)
  data = (source / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
  assert "truncated safetensors" in _import_fails(truncated, out, capsys)

  # A model gin that does not match the checkpoint: exit 2 naming the fields.
  prompts = tmp_path / "in.jsonl"
  prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
  assert cli("sample", "--gin_file=gin/models/gpt3_tiny.gin", "--gin_file=gin/runs/sample.gin",
             f"--gin.CHECKPOINT_DIR='{root / 'pax'}'", f"--prompts={prompts}",
             f"--output={tmp_path / 'o.jsonl'}", f"--mesh={MESH}") == 2
  line = _only_line(capsys)
  assert "does not match" in line and "d_model=64 (checkpoint: 60)" in line
  # Without model.json (a run from before it existed) the stored shapes name them.
  bare = tmp_path / "bare"
  shutil.copytree(root / "pax", bare)
  os.remove(bare / "model.json")
  assert cli("sample", "--gin_file=gin/models/gpt3_tiny.gin", "--gin_file=gin/runs/sample.gin",
             f"--gin.CHECKPOINT_DIR='{bare}'", f"--prompts={prompts}",
             f"--output={tmp_path / 'o.jsonl'}", f"--mesh={MESH}") == 2
  line = _only_line(capsys)
  assert "was written by another model shape" in line
  assert ("parameter layers.0_dense.attention.key_kernel is (3, 60, 5, 12) in the checkpoint "
          "but (1, 64, 4, 16) in the config") in line


def test_config_translation_round_trips_and_refuses_what_it_cannot_express():
  for arch, config in [("gpt_neo", dict(model_type="gpt_neo", hidden_size=60, num_heads=5,
                                        num_layers=6, vocab_size=300,
                                        attention_types=[[["global", "global", "local"], 2]],
                                        window_size=7, max_position_embeddings=32)),
                       ("gpt2", dict(model_type="gpt2", n_embd=60, n_head=5, n_layer=2,
                                     n_positions=32, vocab_size=300,
                                     scale_attn_weights=False))]:
    model_type, kwargs = hf.config_from_hf(config)
    cfg = gpt.GPTConfig(**kwargs)
    assert model_type == arch
    again_type, again = hf.config_to_hf(cfg)
    assert again_type == arch and hf.config_from_hf(again)[1] == kwargs
  cfg = gpt.GPTConfig(**hf.config_from_hf(config)[1])
  assert cfg.attention_scale == 1.0 and cfg.qkv_bias
  with pytest.raises(UsageError, match="qkv_bias=True"):
    hf.config_to_hf(gpt.GPTConfig(vocab_size=300, num_layers=2, d_model=64, num_heads=4))


@pytest.mark.parametrize("pattern,arch", [(("dense", "banded"), "GPTNeoForCausalLM"),
                                          (("dense",), "GPT2LMHeadModel")])
def test_a_model_trained_in_paxgpt_exports_with_its_attention_scale(pattern, arch, tmp_path):
  """paxgpt scales q.k by 1/sqrt(head_dim); GPT-Neo does not, so export folds
  the scale into q_proj. A dense/banded model needs qkv_bias=False (GPT-Neo's
  q/k/v have none); an all-dense one keeps its biases (GPT-2's c_attn)."""
  import types
  from paxgpt.store import checkpoint
  from paxgpt.decoding import sampling
  cfg = gpt.GPTConfig(vocab_size=259, num_layers=2, d_model=60, num_heads=5, max_len=64,
                        window=WINDOW, attention_pattern=pattern, dtype="float32",
                        qkv_bias=len(pattern) == 1, init_std=0.2)
  partitioner = sharding.Partitioner(sharding.mesh_from_flag(MESH))
  params = sampling.init_params(cfg, partitioner, seed=3)
  if cfg.qkv_bias:  # nonzero biases, so that the export of c_attn's bias is checked
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "bias" in jax.tree_util.keystr(p) else x, params)
  run = tmp_path / "run"
  saver = checkpoint.Checkpointer(run, checkpoint.CheckpointConfig(async_save=False))
  saver.save(5, types.SimpleNamespace(params=params, opt_state={"count": np.zeros((), np.int32)}),
             {"epoch": 0})
  saver.close()
  model_dir.write(run, cfg, "byte")
  assert cli("export", f"--model_dir={run}", f"--hf_dir={tmp_path / 'out'}",
             f"--mesh={MESH}") == 0
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert type(exported).__name__ == arch
  assert not (tmp_path / "out" / "tokenizer_config.json").exists()  # byte vocabulary
  ids = np.random.RandomState(2).randint(1, 259, (2, 40))
  ours = np.asarray(gpt.GPT(cfg).apply({"params": params}, ids))[..., 1:259]
  theirs = hf_logits(exported, ids - 1)
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


# The weights' files do not depend on the architecture.
@pytest.mark.parametrize("imported", ["gpt2"], indirect=True)
def test_sharded_safetensors_import_like_one_file(imported, tmp_path):
  arch, hf_model, tokenizer, root = imported
  hf_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
  tokenizer.save_pretrained(str(tmp_path / "sharded"))
  files = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files
  assert len([n for n in files if n.endswith(".safetensors")]) > 2
  assert cli("import", f"--hf_dir={tmp_path / 'sharded'}", f"--model_dir={tmp_path / 'pax'}",
             f"--mesh={MESH}") == 0
  _, _, one = restore(root / "pax")
  _, _, sharded = restore(tmp_path / "pax")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               one, sharded)
