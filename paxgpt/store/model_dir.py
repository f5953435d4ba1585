"""What a MODEL_DIR carries besides its checkpoints: the model's config.

  MODEL_DIR/model.json   {"format": 1, "model": {GPTConfig fields}, "vocabulary": spec,
                          "prompt_start": "eos" | "none"}
  MODEL_DIR/config.gin   the gin config the run started with, for the record
  MODEL_DIR/checkpoints/ Orbax (paxgpt/store/checkpoint.py)

  write(model_dir, model_config, vocabulary_spec, gin_config=None)
  read(model_dir) -> (GPTConfig, vocabulary spec) or None
  resolve(model_dir) -> (GPTConfig, vocabulary spec or None): what a command uses
  prompt_start(model_dir) -> "eos" or "none": how the model's prompts start

`paxgpt train` and `paxgpt import` write model.json; eval, sample, export and
fine-tuning read it when gin binds no GPTConfig parameter (no model gin file).
When gin does bind the model and model.json disagrees on a field that changes
the parameters or the function they compute (SHAPE_FIELDS), that is a
UsageError naming the fields; so is a missing model.json when gin binds no
model, and a resumed run's vocabulary that is not model.json's. A vocabulary whose files lie inside MODEL_DIR is
stored relative to it (the directory can be moved) and read back absolute.
model.json is written through a temporary file and a rename, so a reader never
sees half of one.

The prompt convention is a property of the model, so `paxgpt sample` and
`paxgpt fewshot` generate from the same ids: "eos" for a model paxgpt trained
(every training document follows an EOS, paxgpt/data/loader.py), "none" for an
imported one (the tokenizer's ids as they are, as transformers' generate has
them). A model.json without the field is "eos" (every MODEL_DIR before it was
trained here, or imported and then decoded with EOS first).
"""
from __future__ import annotations

import dataclasses
import json

import gin
from etils import epath

from paxgpt.model import gpt
from paxgpt.errors import UsageError

MODEL_JSON = "model.json"
PROMPT_STARTS = ("eos", "none")
CONFIG_GIN = "config.gin"
FORMAT = 1
# GPTConfig fields that change the parameters' shapes or what they compute; the
# others (dtype, remat, backend, dropout, init) are choices of the run.
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff",
                "max_len", "vocab_pad_multiple", "attention_pattern", "window",
                "layer_norm_epsilon", "attention_scale", "qkv_bias", "masked_ids")


def _is_local(path) -> bool:
  return "://" not in str(path)


def _path(model_dir) -> epath.Path:
  path = epath.Path(model_dir)
  return path.absolute() if _is_local(model_dir) else path


def _store_spec(model_dir: epath.Path, spec: str) -> str:
  kind, sep, location = spec.partition(":")
  if not sep or not _is_local(location):
    return spec
  location = epath.Path(location).absolute()
  try:
    return f"{kind}:{location.relative_to(model_dir)}"
  except ValueError:  # outside MODEL_DIR: keep the absolute path
    return f"{kind}:{location}"


def _load_spec(model_dir: epath.Path, spec: str) -> str:
  kind, sep, location = spec.partition(":")
  if not sep or not _is_local(location) or location.startswith("/"):
    return spec
  return f"{kind}:{model_dir / location}"


def config_dict(config: gpt.GPTConfig) -> dict:
  out = dataclasses.asdict(config)
  out["attention_pattern"] = list(config.attention_pattern)
  out["masked_ids"] = list(config.masked_ids)
  return out


def write(model_dir, model_config: gpt.GPTConfig, vocabulary_spec: str | None,
          gin_config: str | None = None, prompt_start: str = "eos"):
  """Write model.json (and config.gin when given) into MODEL_DIR (created)."""
  if prompt_start not in PROMPT_STARTS:
    raise ValueError(f"prompt_start={prompt_start!r} is not one of {PROMPT_STARTS}")
  directory = _path(model_dir)
  directory.mkdir(parents=True, exist_ok=True)
  spec = None if vocabulary_spec is None else _store_spec(directory, vocabulary_spec)
  text = json.dumps({"format": FORMAT, "model": config_dict(model_config),
                     "vocabulary": spec, "prompt_start": prompt_start}, indent=1) + "\n"
  temporary = directory / f".{MODEL_JSON}.tmp"
  temporary.write_text(text)
  temporary.replace(directory / MODEL_JSON)  # overwrites: a resumed run rewrites it
  if gin_config is not None:
    (directory / CONFIG_GIN).write_text(gin_config)


def read(model_dir):
  """(GPTConfig, vocabulary spec or None) from MODEL_DIR/model.json; None when
  there is none (a run from before model.json existed)."""
  directory = _path(model_dir)
  path = directory / MODEL_JSON
  if not path.exists():
    return None
  try:
    obj = json.loads(path.read_text())
    fields = obj["model"]
    known = {f.name for f in dataclasses.fields(gpt.GPTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise UsageError(f"{path}: unknown model fields {unknown} (written by a newer paxgpt?)")
    config = gpt.GPTConfig(**{**fields, "attention_pattern": tuple(fields["attention_pattern"]),
                                "masked_ids": tuple(fields.get("masked_ids", ()))})
  except (ValueError, KeyError, TypeError) as e:
    if isinstance(e, UsageError):
      raise
    raise UsageError(f"{path}: not a paxgpt model config ({e})") from None
  spec = obj.get("vocabulary")
  return config, None if spec is None else _load_spec(directory, spec)


def differences(expected: gpt.GPTConfig, found: gpt.GPTConfig, fields=SHAPE_FIELDS):
  """['name=A (checkpoint: B)', ...] for the fields where the configs disagree."""
  return [f"{name}={getattr(expected, name)!r} (checkpoint: {getattr(found, name)!r})"
          for name in fields if getattr(expected, name) != getattr(found, name)]


def gin_bound(name) -> bool:
  """Whether gin binds `name` ('Configurable.parameter')."""
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def gin_bindings(fields) -> dict:
  """{field: value} of the GPTConfig parameters among `fields` that gin binds."""
  out = {}
  for name in fields:
    try:
      out[name] = gin.query_parameter(f"GPTConfig.{name}")
    except ValueError:
      continue
  return out


def gin_binds_model() -> bool:
  """Whether the parsed gin config binds the model's shape (a model gin file)."""
  return bool(gin_bindings(SHAPE_FIELDS))


def check_matches(model_dir, model_config: gpt.GPTConfig, vocabulary_spec=None):
  """UsageError naming the fields where `model_config` disagrees with MODEL_DIR's
  model.json (nothing when there is none), or naming both vocabularies when
  `vocabulary_spec` is given and is not the one model.json records: a resumed
  run keeps its vocabulary, or its checkpoints would decode with another."""
  stored = read(model_dir)
  if stored is None:
    return
  diff = differences(model_config, stored[0])
  if diff:
    raise UsageError(f"the model config does not match {model_dir}'s checkpoint "
                     f"({MODEL_JSON}): {', '.join(diff)}")
  if vocabulary_spec is not None and stored[1] is not None:
    directory = _path(model_dir)
    if _load_spec(directory, _store_spec(directory, vocabulary_spec)) != stored[1]:
      raise UsageError(f"vocabulary {vocabulary_spec!r} is not the one {model_dir} was "
                       f"trained with ({stored[1]!r}, in {MODEL_JSON}); resume with it or "
                       f"use another MODEL_DIR")


def resolve(model_dir, model_config: gpt.GPTConfig | None = None):
  """(GPTConfig, vocabulary spec or None) for a command on MODEL_DIR's checkpoints:
  model.json's config when gin binds no model (its run-time fields, such as
  dtype, still taken from gin where bound), else gin's, checked against model.json.
  `model_config` stands for gin's when given."""
  stored = read(model_dir)
  if model_config is None and stored is None and not gin_binds_model():
    if not _path(model_dir).is_dir():
      raise UsageError(f"{model_dir}: no such directory")
    raise UsageError(f"{_path(model_dir) / MODEL_JSON} is missing, so the model's shape is "
                     f"unknown: give the model's gin file (--gin_file=gin/models/...)")
  if model_config is None and stored is not None and not gin_binds_model():
    run_fields = [f.name for f in dataclasses.fields(gpt.GPTConfig)
                  if f.name not in SHAPE_FIELDS]
    return dataclasses.replace(stored[0], **gin_bindings(run_fields)), stored[1]
  model_config = model_config or gpt.GPTConfig()
  if stored is not None:
    check_matches(model_dir, model_config)
  return model_config, None if stored is None else stored[1]


def prompt_start(model_dir) -> str:
  """MODEL_DIR's prompt convention (PROMPT_STARTS; "eos" when model.json has none
  or there is no model.json)."""
  path = _path(model_dir) / MODEL_JSON
  if not path.exists():
    return "eos"
  try:
    value = json.loads(path.read_text()).get("prompt_start", "eos")
  except (ValueError, AttributeError) as e:
    raise UsageError(f"{path}: not a paxgpt model config ({e})") from None
  if value not in PROMPT_STARTS:
    raise UsageError(f"{path}: prompt_start={value!r} is not one of {list(PROMPT_STARTS)}")
  return value
