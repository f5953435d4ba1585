"""Hugging Face GPT-Neo and GPT-2 checkpoints in and out of paxgpt.

  import_hf(hf_dir, model_dir, mesh=None, dtype="float32") -> summary dict
  read_hf(hf_dir) -> (config.json, model_type, GPTConfig, Weights); then
  stream_params(weights, model_type, cfg, partitioner) -> (params, bytes)
  export_hf(model_dir, hf_dir, step=None, mesh=None) -> summary dict
  config_from_hf(config_json) -> (architecture, GPTConfig kwargs)
  config_to_hf(GPTConfig, eos_id) -> (architecture, config.json dict)

One table per architecture (`TABLES`) pairs every Hugging Face tensor with the
paxgpt parameters it holds, and gives both directions of the conversion side
by side, so import and export cannot drift apart. Facts they encode, each
checked against transformers' modeling_gpt_neo.py / modeling_gpt2.py:
  - GPT-Neo's q/k/v are bias-free nn.Linear ([out, in]) and q.k is not scaled
    (attention_scale=1.0, qkv_bias=False); its out_proj has a bias.
  - GPT-2's Conv1D weights are [in, out]; c_attn fuses q, k, v along out.
  - GPT-Neo's local layer: query i sees key j iff i - window < j <= i, which
    is paxgpt's banded mask with W = window_size; `attention_types` expands
    to the per-layer pattern, whose period becomes `attention_pattern`.
  - Both use GELU with the tanh approximation ('gelu_new'), pre-LayerNorm,
    learned positions and tied embeddings.
  - paxgpt's vocabularies keep id 0 for padding, so Hugging Face id h is
    paxgpt id h + 1: embedding row 0 is zero and masked (GPTConfig.masked_ids),
    and the padded rows past vocab_size are masked too; neither is ever sampled.
A config paxgpt cannot express exactly is a UsageError naming the field.

Weights stream one tensor at a time: safetensors files are parsed here (the
header, then each tensor read with pread), each parameter is built on the
host and placed into its target sharding before the next is read, so the
model is never in host memory twice. Export writes the safetensors file the
same way, one tensor at a time. Both check the output path before any work,
write into a temporary directory beside it and rename it at the end: a failure
leaves nothing half-made, and what a killed run left is removed by the next run
to the same output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import struct
import time

import jax.numpy as jnp
import numpy as np

from paxgpt.store import checkpoint
from paxgpt.model import gpt
from paxgpt.model import info as model_info
from paxgpt.store import model_dir as model_dir_lib
from paxgpt.store import run_lock
from paxgpt.model import sharding
from paxgpt.errors import UsageError

SHIFT = 1  # paxgpt id = Hugging Face id + SHIFT (id 0 is padding)
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
VOCABULARY_SUBDIR = "vocabulary"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------
# safetensors, read and written one tensor at a time.

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def _numpy_dtype(name, where):
  if name == "BF16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  if name not in _DTYPES:
    raise UsageError(f"{where}: tensor dtype {name} is not a float type paxgpt reads")
  return np.dtype(_DTYPES[name])


class SafetensorsFile:
  """The header of a .safetensors file, checked against its size; `read(name)`
  reads one tensor with pread (no mmap: memory holds only what was read)."""

  def __init__(self, path):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise UsageError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
          raise UsageError(f"{path}: truncated safetensors file (header of {n} bytes, "
                           f"file of {size})")
        header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
      if isinstance(e, UsageError):
        raise
      raise UsageError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
      raise UsageError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    self.start = 8 + n
    self.tensors = {}
    for name, info in header.items():
      dtype, shape, (begin, end) = _header_entry(path, name, info)
      if end - begin != math.prod(shape) * dtype.itemsize or self.start + end > size:
        raise UsageError(f"{path}: truncated safetensors file (tensor {name} ends at byte "
                         f"{self.start + end}, file of {size})")
      self.tensors[name] = (dtype, shape, self.start + begin)

  def read(self, name) -> np.ndarray:
    dtype, shape, offset = self.tensors[name]
    out = np.empty(shape, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.path, "rb") as f:
      done = 0
      while done < len(view):
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got <= 0:
          raise UsageError(f"{self.path}: truncated while reading tensor {name}")
        done += got
    return out


def _header_entry(path, name, info):
  """(numpy dtype, shape, (begin, end)) of one tensor's header entry, checked."""
  def is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
  where = f"{path}: tensor {name}"
  if not isinstance(info, dict):
    raise UsageError(f"{where}: its header entry is not a JSON object")
  for field in ("dtype", "shape", "data_offsets"):
    if field not in info:
      raise UsageError(f"{where}: its header entry has no {field!r} (not a safetensors file)")
  shape, offsets = info["shape"], info["data_offsets"]
  if not isinstance(shape, list) or not all(is_count(d) for d in shape):
    raise UsageError(f"{where}: shape={json.dumps(shape)} is not a list of sizes")
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets))
      or offsets[0] > offsets[1]):
    raise UsageError(f"{where}: data_offsets={json.dumps(offsets)} is not [begin, end]")
  if not isinstance(info["dtype"], str):
    raise UsageError(f"{where}: dtype={json.dumps(info['dtype'])} is not a dtype name")
  return _numpy_dtype(info["dtype"], where), tuple(shape), tuple(offsets)


def write_safetensors(path, tensors):
  """tensors: [(name, shape, make)] where make() returns the float32 array;
  called one at a time, in order, after the header is written."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, _ in tensors:
    nbytes = math.prod(shape) * 4
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset,
                                                                           offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for name, shape, make in tensors:
      array = np.ascontiguousarray(make(), np.float32)
      if array.shape != tuple(shape):
        raise ValueError(f"{name}: made {array.shape}, declared {tuple(shape)}")
      f.write(memoryview(array.reshape(-1)).cast("B"))
      del array


class Weights:
  """The tensors of a transformers directory (model.safetensors, or the shards
  its index names), by name without the 'transformer.' prefix."""

  def __init__(self, hf_dir):
    single, index = (os.path.join(hf_dir, n) for n in (WEIGHTS, WEIGHTS_INDEX))
    if os.path.isfile(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{index}: not a safetensors index ({e})") from None
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      files = [WEIGHTS]
    else:
      others = [n for n in sorted(os.listdir(hf_dir))
                if n.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt"))]
      found = f" (it has only {', '.join(others)}: convert to safetensors first)" if others \
          else ""
      raise UsageError(f"--hf_dir={hf_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}{found}")
    self.where = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.isfile(path):
        raise UsageError(f"{index}: shard {name} is missing")
      shard = SafetensorsFile(path)
      for tensor in shard.tensors:
        self.where[tensor.removeprefix("transformer.")] = shard

  def shape(self, name):
    if name not in self.where:
      raise UsageError(f"the checkpoint has no tensor {name!r}")
    return self.where[name].tensors[name if name in self.where[name].tensors
                                    else "transformer." + name][1]

  def read(self, name) -> np.ndarray:
    shard = self.where[name]
    key = name if name in shard.tensors else "transformer." + name
    array = shard.read(key)
    return array if array.dtype == np.float32 else array.astype(np.float32)


# ---------------------------------------------------------------------------
# The tables: Hugging Face tensors <-> paxgpt parameters.


@dataclasses.dataclass(frozen=True)
class Entry:
  """HF tensors `hf` (names; '{i}' is the layer) hold paxgpt parameters `ours`
  (paths in a block, or in the top level for global entries). to_ours(hf
  arrays, cfg) -> our arrays; to_hf(our arrays, cfg) -> HF arrays."""
  hf: tuple
  ours: tuple
  to_ours: callable
  to_hf: callable
  per_layer: bool = True


def _same(arrays, cfg):
  return list(arrays)


def _ln(hf_prefix, ours):
  return [Entry((f"{hf_prefix}.weight",), (f"{ours}/scale",), _same, _same),
          Entry((f"{hf_prefix}.bias",), (f"{ours}/bias",), _same, _same)]


def _heads_in(cfg):  # [d, h*k] -> [d, h, k]
  return lambda w: w.reshape(cfg.d_model, cfg.num_heads, cfg.head_dim)


def _q_factor(cfg, hf_scale):
  """What GPT-2/GPT-Neo's q weights are multiplied by on export, so that their
  fixed q.k scale (hf_scale) gives paxgpt's (exactly 1 for imported models)."""
  ours = cfg.head_dim ** -0.5 if cfg.attention_scale is None else cfg.attention_scale
  return 1.0 if ours == hf_scale else ours / hf_scale


def _neo_scale(cfg):
  return 1.0


def _gpt2_scale(cfg):
  return 1.0 if cfg.attention_scale == 1.0 else cfg.head_dim ** -0.5


def _linear_heads(name, index, hf_scale=None):
  """nn.Linear [h*k, d] <-> our [d, h, k] kernel (index: query/key/value)."""
  def to_ours(a, cfg):
    return [_heads_in(cfg)(a[0].T)]

  def to_hf(a, cfg):
    w = a[0].reshape(cfg.d_model, -1).T
    return [w * _q_factor(cfg, hf_scale(cfg)) if hf_scale else w]
  return Entry((name,), (f"attention/{index}_kernel",), to_ours, to_hf)


def _linear_out(name):
  return Entry((name,), ("attention/out_kernel",),
               lambda a, cfg: [a[0].T.reshape(cfg.num_heads, cfg.head_dim, cfg.d_model)],
               lambda a, cfg: [a[0].reshape(-1, cfg.d_model).T])


def _transposed(name, ours):
  return Entry((name,), (ours,), lambda a, cfg: [a[0].T], lambda a, cfg: [a[0].T])


def _embedding_to_ours(a, cfg):
  table = np.zeros((cfg.padded_vocab_size, cfg.d_model), np.float32)
  table[SHIFT:SHIFT + a[0].shape[0]] = a[0]
  return [table]


def _embedding_to_hf(a, cfg):
  return [a[0][SHIFT:cfg.vocab_size]]


_GLOBAL = [
    Entry(("wte.weight",), ("token_embedding",), _embedding_to_ours, _embedding_to_hf, False),
    Entry(("wpe.weight",), ("position_embedding",), _same, _same, False),
    *[dataclasses.replace(e, per_layer=False) for e in _ln("ln_f", "ln_final")],
]

GPT_NEO = _GLOBAL + [
    *_ln("h.{i}.ln_1", "ln_attention"),
    _linear_heads("h.{i}.attn.attention.q_proj.weight", "query", _neo_scale),
    _linear_heads("h.{i}.attn.attention.k_proj.weight", "key"),
    _linear_heads("h.{i}.attn.attention.v_proj.weight", "value"),
    _linear_out("h.{i}.attn.attention.out_proj.weight"),
    Entry(("h.{i}.attn.attention.out_proj.bias",), ("attention/out_bias",), _same, _same),
    *_ln("h.{i}.ln_2", "ln_mlp"),
    _transposed("h.{i}.mlp.c_fc.weight", "mlp/wi/kernel"),
    Entry(("h.{i}.mlp.c_fc.bias",), ("mlp/wi/bias",), _same, _same),
    _transposed("h.{i}.mlp.c_proj.weight", "mlp/wo/kernel"),
    Entry(("h.{i}.mlp.c_proj.bias",), ("mlp/wo/bias",), _same, _same),
]


def _c_attn_to_ours(a, cfg):
  w, b = a  # imported: paxgpt's q.k scale is GPT-2's, so q needs no factor
  heads = (cfg.num_heads, cfg.head_dim)
  return ([_heads_in(cfg)(x) for x in np.split(w, 3, axis=1)]
          + [x.reshape(heads) for x in np.split(b, 3)])


def _c_attn_to_hf(a, cfg):
  factor = _q_factor(cfg, _gpt2_scale(cfg))
  kernels = [x.reshape(cfg.d_model, -1) for x in a[:3]]
  biases = [x.reshape(-1) for x in a[3:]] if len(a) > 3 else [
      jnp.zeros(cfg.num_heads * cfg.head_dim, jnp.float32)] * 3
  kernels[0], biases[0] = kernels[0] * factor, biases[0] * factor
  return [jnp.concatenate(kernels, axis=1), jnp.concatenate(biases)]


GPT2 = _GLOBAL + [
    *_ln("h.{i}.ln_1", "ln_attention"),
    Entry(("h.{i}.attn.c_attn.weight", "h.{i}.attn.c_attn.bias"),
          ("attention/query_kernel", "attention/key_kernel", "attention/value_kernel",
           "attention/query_bias", "attention/key_bias", "attention/value_bias"),
          _c_attn_to_ours, _c_attn_to_hf),
    Entry(("h.{i}.attn.c_proj.weight",), ("attention/out_kernel",),
          lambda a, cfg: [a[0].reshape(cfg.num_heads, cfg.head_dim, cfg.d_model)],
          lambda a, cfg: [a[0].reshape(-1, cfg.d_model)]),
    Entry(("h.{i}.attn.c_proj.bias",), ("attention/out_bias",), _same, _same),
    *_ln("h.{i}.ln_2", "ln_mlp"),
    Entry(("h.{i}.mlp.c_fc.weight",), ("mlp/wi/kernel",), _same, _same),
    Entry(("h.{i}.mlp.c_fc.bias",), ("mlp/wi/bias",), _same, _same),
    Entry(("h.{i}.mlp.c_proj.weight",), ("mlp/wo/kernel",), _same, _same),
    Entry(("h.{i}.mlp.c_proj.bias",), ("mlp/wo/bias",), _same, _same),
]

TABLES = {"gpt_neo": GPT_NEO, "gpt2": GPT2}
ARCHITECTURES = {"gpt_neo": "GPTNeoForCausalLM", "gpt2": "GPT2LMHeadModel"}


# ---------------------------------------------------------------------------
# Configs.


def _field(config, name, default=None, required=True):
  if name in config:
    return config[name]
  if required and default is None:
    raise UsageError(f"config.json: field {name!r} is missing")
  return default


def _size(config, name, default=None, low=1):
  """An integer field of config.json, at least `low`; `default` when absent or
  null (None: the field is required)."""
  value = config.get(name)
  if value is None:
    if default is None:
      raise UsageError(f"config.json: field {name!r} is missing")
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise UsageError(f"config.json: {name}={json.dumps(value)} must be an integer >= {low}")
  return value


def _positive_number(config, name, default):
  value = config.get(name, default)
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value <= 0):
    raise UsageError(f"config.json: {name}={json.dumps(value)} must be a positive number")
  return float(value)


def _layer_kinds(config, num_layers):
  """GPT-Neo's per-layer attention kinds from attention_types ([[kinds], repeat], ...)."""
  types = _field(config, "attention_types")
  layers = []
  try:
    for block, repeat in types:
      if not isinstance(block, list) or isinstance(repeat, bool) or not isinstance(repeat, int):
        raise TypeError
      layers += list(block) * repeat
  except (TypeError, ValueError):
    layers = None
  if layers is None or sorted(set(layers) - {"global", "local"}) or len(layers) != num_layers:
    raise UsageError(f"config.json: attention_types={json.dumps(types)} does not give "
                     f"num_layers={num_layers} layers of 'global'/'local'")
  return layers


def _must_be(config, name, allowed, default):
  value = config.get(name, default)
  if value not in allowed:
    raise UsageError(f"config.json: {name}={json.dumps(value)} cannot be expressed exactly in "
                     f"paxgpt (supported: {', '.join(json.dumps(a) for a in allowed)})")
  return value


def _period(layers):
  """The shortest block whose repetition is `layers`."""
  n = len(layers)
  for p in range(1, n + 1):
    if n % p == 0 and layers == layers[:p] * (n // p):
      return layers[:p]
  return layers


def config_from_hf(config: dict):
  """(model_type, GPTConfig kwargs) of a transformers config.json dict."""
  model_type = config.get("model_type")
  if model_type not in TABLES:
    raise UsageError(f"config.json: model_type={json.dumps(model_type)} is not supported "
                     f"(supported: {', '.join(TABLES)})")
  _must_be(config, "activation_function", GELU_TANH, "gelu_new")
  _must_be(config, "tie_word_embeddings", (True,), True)
  _must_be(config, "add_cross_attention", (False,), False)
  if model_type == "gpt_neo":
    d, heads = _size(config, "hidden_size"), _size(config, "num_heads")
    num_layers = _size(config, "num_layers")
    layers = _layer_kinds(config, num_layers)
    pattern = tuple("dense" if t == "global" else "banded" for t in _period(layers))
    kwargs = dict(num_layers=num_layers, d_model=d, num_heads=heads,
                  d_ff=_size(config, "intermediate_size", 4 * d),
                  max_len=_size(config, "max_position_embeddings"),
                  attention_pattern=pattern, window=_size(config, "window_size", 256),
                  attention_scale=1.0, qkv_bias=False)
  else:
    _must_be(config, "scale_attn_by_inverse_layer_idx", (False,), False)
    _must_be(config, "reorder_and_upcast_attn", (False,), False)
    d, heads = _size(config, "n_embd"), _size(config, "n_head")
    scaled = _must_be(config, "scale_attn_weights", (True, False), True)
    kwargs = dict(num_layers=_size(config, "n_layer"), d_model=d, num_heads=heads,
                  d_ff=_size(config, "n_inner", 4 * d), max_len=_size(config, "n_positions"),
                  attention_pattern=("dense",), attention_scale=None if scaled else 1.0,
                  qkv_bias=True)
  if d % heads:
    raise UsageError(f"config.json: hidden size {d} is not divisible by {heads} heads")
  kwargs.update(vocab_size=_size(config, "vocab_size") + SHIFT, masked_ids=(0,),
                head_dim=d // heads,
                layer_norm_epsilon=_positive_number(config, "layer_norm_epsilon", 1e-5),
                dropout_rate=0.0)
  return model_type, kwargs


def config_to_hf(cfg: gpt.GPTConfig, eos_id=None):
  """(model_type, config.json dict): GPT-2 for an all-dense model, else GPT-Neo.
  eos_id: paxgpt's EOS id (None: the last Hugging Face id)."""
  if cfg.head_dim * cfg.num_heads != cfg.d_model:
    raise UsageError(f"head_dim={cfg.head_dim} x num_heads={cfg.num_heads} != d_model="
                     f"{cfg.d_model}: neither GPT-2 nor GPT-Neo can express it")
  vocab = cfg.vocab_size - SHIFT
  eos = vocab - 1 if eos_id is None else eos_id - SHIFT
  common = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos,
                layer_norm_epsilon=cfg.layer_norm_epsilon, activation_function="gelu_new",
                tie_word_embeddings=True, initializer_range=cfg.init_std, use_cache=True)
  if set(cfg.attention_pattern) == {"dense"}:
    return "gpt2", dict(
        model_type="gpt2", architectures=[ARCHITECTURES["gpt2"]], n_embd=cfg.d_model,
        n_head=cfg.num_heads, n_layer=cfg.num_layers, n_positions=cfg.max_len,
        n_inner=cfg.d_ff, scale_attn_weights=cfg.attention_scale != 1.0,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=0.0, **common)
  if cfg.qkv_bias:
    raise UsageError("qkv_bias=True: a dense/banded model exports as GPT-Neo, whose q/k/v "
                     "projections have no bias (train with GPTConfig.qkv_bias = False to "
                     "export as GPT-Neo)")
  kinds = [["global" if k == "dense" else "local" for k in cfg.attention_pattern],
           cfg.num_periods]
  return "gpt_neo", dict(
      model_type="gpt_neo", architectures=[ARCHITECTURES["gpt_neo"]], hidden_size=cfg.d_model,
      num_heads=cfg.num_heads, num_layers=cfg.num_layers, attention_types=[kinds],
      intermediate_size=cfg.d_ff, window_size=cfg.window,
      max_position_embeddings=cfg.max_len, resid_dropout=cfg.dropout_rate,
      embed_dropout=cfg.dropout_rate, attention_dropout=0.0, **common)


# ---------------------------------------------------------------------------
# Walking the table over a model.


def _blocks(cfg):
  """[(HF layer index, block name in the params tree, period index)]."""
  k = len(cfg.attention_pattern)
  return [(p * k + i, f"{i}_{kind}", p) for p in range(cfg.num_periods)
          for i, kind in enumerate(cfg.attention_pattern)]


def _leaf_path(entry, ours, block=None):
  parts = ours.split("/")
  return tuple(parts) if not entry.per_layer else ("layers", block) + tuple(parts)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _entries(model_type, cfg):
  table = TABLES[model_type]
  if not cfg.qkv_bias:  # GPT-Neo's table has no q/k/v biases; GPT-2 import always has them
    table = [e for e in table if not any(o.endswith(("query_bias", "key_bias", "value_bias"))
                                         for o in e.ours)]
  return table


def _check_hf_shapes(weights, model_type, cfg):
  """Every tensor the table reads is there with the shape the table's export
  direction produces (so a mismatch names the tensor, before anything is written)."""
  for name, shape in hf_tensor_specs(model_type, cfg):
    found = weights.shape(name)
    if tuple(found) != tuple(shape):
      raise UsageError(f"tensor {name!r} has shape {tuple(found)}; config.json implies "
                       f"{tuple(shape)}")


def _layers(entry, cfg):
  return _blocks(cfg) if entry.per_layer else [(None, None, None)]


def hf_tensor_specs(model_type, cfg):
  """[(HF name, shape)] in the table's order, from its export direction applied
  to the model's abstract parameters: the shapes have one source, the table."""
  import flax.linen as nn
  import jax
  abstract = nn.unbox(gpt.abstract_variables(cfg)["params"])
  out = []
  for entry in _entries(model_type, cfg):
    layers = _layers(entry, cfg)
    block = layers[0][1]
    leaves = []
    for ours in entry.ours:
      leaf = _get(abstract, _leaf_path(entry, ours, block))
      leaves.append(jax.ShapeDtypeStruct(leaf.shape[1:] if entry.per_layer else leaf.shape,
                                         leaf.dtype))
    shapes = jax.eval_shape(lambda *a, entry=entry: entry.to_hf(list(a), cfg), *leaves)
    for layer, _, _ in layers:
      out += [(n.format(i=layer), tuple(x.shape)) for n, x in zip(entry.hf, shapes)]
  return out


# ---------------------------------------------------------------------------
# Import.


def _read_hf_config(hf_dir):
  if not os.path.isdir(hf_dir):
    raise UsageError(f"--hf_dir={hf_dir}: no such directory")
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UsageError(f"--hf_dir={hf_dir}: no config.json (not a transformers save_pretrained "
                     f"directory)")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UsageError(f"{path}: not JSON ({e})") from None
  if not isinstance(config, dict):
    raise UsageError(f"{path}: expected a JSON object")
  return config


def _output_dir(out, flag):
  """The absolute directory to write for `out` (a new path or an empty
  directory; a symbolic link stands for its target), checked before any work:
  UsageError naming `flag` when it cannot be written."""
  out = os.path.abspath(out)
  if os.path.islink(out):
    target = os.path.realpath(out)
    if not os.path.exists(target):
      raise UsageError(f"{flag}={out} is a symbolic link to {target}, which does not exist")
    out = target
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UsageError(f"{flag}={out} already exists and is not an empty directory; paxgpt "
                     f"writes a new directory")
  ancestor = os.path.dirname(out)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    what = "a dangling symbolic link" if os.path.islink(ancestor) else "not a directory"
    raise UsageError(f"{flag}={out}: {ancestor} is {what}")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise UsageError(f"{flag}={out}: {ancestor} is not writable")
  return out


@contextlib.contextmanager
def _staged(out, flag, keep_lock):
  """A directory to fill, beside `out` (paxgpt/store/run_lock.py's staging_dir:
  a killed run's leftovers are removed, a live one's refused), renamed to `out`
  when the body completes and removed when it fails. keep_lock: the output is
  a MODEL_DIR, whose lock file it keeps."""
  out = _output_dir(out, flag)
  staging, lock = run_lock.staging_dir(out, flag)
  try:
    yield staging
    if not keep_lock:
      lock.remove()
    try:
      if os.path.isdir(out):
        os.rmdir(out)  # empty (checked before the work)
      os.rename(staging, out)
    except OSError as e:
      raise UsageError(f"{flag}={out}: cannot be written ({e.strerror or e}); another "
                       f"process wrote it meanwhile?") from None
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    lock.release()


def _copy_vocabulary(hf_dir, target):
  from tasks.gpt2_bpe import TOKENIZER_FILES
  files = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  if not files:
    raise UsageError(f"--hf_dir={hf_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:5])})")
  os.makedirs(target)
  for name in files:
    shutil.copyfile(os.path.join(hf_dir, name), os.path.join(target, name))


def _gin_text(cfg, source):
  lines = [f"# paxgpt import of {source}: the model's GPTConfig (also in model.json)."]
  for field in dataclasses.fields(gpt.GPTConfig):
    lines.append(f"GPTConfig.{field.name} = {getattr(cfg, field.name)!r}")
  return "\n".join(lines) + "\n"


def read_hf(hf_dir, dtype="float32"):
  """(config.json dict, model_type, GPTConfig, Weights) of a transformers
  directory, its tensors checked against the config; reads no tensor data."""
  hf_config = _read_hf_config(hf_dir)
  model_type, kwargs = config_from_hf(hf_config)
  try:
    cfg = gpt.GPTConfig(**kwargs, dtype=dtype)
  except (ValueError, TypeError) as e:
    raise UsageError(f"config.json: {e}") from None
  weights = Weights(hf_dir)
  _check_hf_shapes(weights, model_type, cfg)
  return hf_config, model_type, cfg, weights


def import_hf(hf_dir, model_dir, mesh=None, dtype="float32"):
  """Write a paxgpt MODEL_DIR from a transformers GPT-Neo / GPT-2 directory:
  checkpoints/0 (params only), model.json, config.gin and vocabulary/."""
  start = time.time()
  hf_dir = os.path.abspath(hf_dir)
  hf_config, model_type, cfg, weights = read_hf(hf_dir, dtype)
  _check_vocabulary(f"gpt2:{hf_dir}", cfg, hf_config)  # the user's files, named as theirs
  partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
  model_info.check_model_on_mesh(cfg, partitioner.axis_sizes)
  with _staged(model_dir, "--model_dir", keep_lock=True) as staging:
    vocab_dir = os.path.join(staging, VOCABULARY_SUBDIR)
    _copy_vocabulary(hf_dir, vocab_dir)
    params, nbytes = stream_params(weights, model_type, cfg, partitioner)
    _save_params(staging, params)
    del params
    # Prompts start as transformers' generate(tokenizer(prompt)) has them: no EOS first.
    model_dir_lib.write(staging, cfg, f"gpt2:{vocab_dir}", _gin_text(cfg, hf_dir),
                        prompt_start="none")
  return {"model_type": model_type, "model_dir": os.path.abspath(model_dir),
          "parameter_bytes": nbytes, "wall_s": time.time() - start}


def _check_vocabulary(spec, cfg, hf_config):
  import tasks
  vocab = tasks.get_vocabulary(spec)
  if vocab.vocab_size > cfg.vocab_size:
    raise UsageError(f"the tokenizer has {vocab.vocab_size - SHIFT} ids but config.json's "
                     f"vocab_size is {cfg.vocab_size - SHIFT}")
  eos = hf_config.get("eos_token_id")
  if isinstance(eos, int) and eos + SHIFT != vocab.eos_id:
    raise UsageError(f"config.json: eos_token_id={eos} but the tokenizer's <|endoftext|> is "
                     f"{vocab.eos_id - SHIFT}")


def stream_params(weights, model_type, cfg, partitioner):
  """The params tree, each leaf built on the host from its HF tensors and put
  into its target sharding before the next entry is read."""
  import jax
  boxed = gpt.abstract_variables(cfg)["params"]
  abstract = partitioner.abstract(boxed)
  params, nbytes = {}, 0
  for entry in _entries(model_type, cfg):
    if not entry.per_layer:
      hosts = dict(zip(entry.ours, entry.to_ours([weights.read(n) for n in entry.hf], cfg)))
      paths = {o: _leaf_path(entry, o) for o in entry.ours}
    else:  # stacked over periods: one host buffer per leaf of this block kind
      hosts, paths = {}, {}
      for layer, block, period in _blocks(cfg):
        arrays = entry.to_ours([weights.read(n.format(i=layer)) for n in entry.hf], cfg)
        for ours, array in zip(entry.ours, arrays):
          key = (block, ours)
          if key not in hosts:
            hosts[key] = np.empty((cfg.num_periods,) + array.shape, np.float32)
            paths[key] = _leaf_path(entry, ours, block)
          hosts[key][period] = array
        del arrays
    for key, host in hosts.items():
      target = _get(abstract, paths[key])
      if host.shape != target.shape:
        raise UsageError(f"{entry.hf[0]}: gives {host.shape} for {'/'.join(paths[key])}, "
                         f"the model needs {target.shape}")
      host = host.astype(target.dtype, copy=False)
      _set(params, paths[key], jax.make_array_from_callback(
          target.shape, target.sharding, lambda index, h=host: h[index]))
      nbytes += host.nbytes
    del hosts, host  # before the next entry's buffers exist
  return params, nbytes


# Bytes Orbax may hold on the host while writing: its default copies every
# array off the device first, which on a CPU backend (device memory = host
# memory) would put the model in host memory twice. OCDBT is off for the same
# reason: it buffers every array until the checkpoint's commit (measured: +0.9x
# the model's bytes at peak); one zarr array per parameter commits each alone.
SAVE_HOST_GB = 0.1


def _save_params(directory, params):
  """checkpoints/0 with the params item alone (what sample, eval, export and
  init_from restore), in the format checkpoint.py's StandardRestore reads."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  handlers = {"params": ocp.PyTreeCheckpointHandler(
      save_device_host_concurrent_gb=SAVE_HOST_GB, use_ocdbt=False),
              "meta": ocp.JsonCheckpointHandler()}
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(directory), options=options,
                                  item_handlers=handlers)
  try:
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.PyTreeSave(params),
        meta=ocp.args.JsonSave({"step": 0, "validation_loss": None})), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


# ---------------------------------------------------------------------------
# Export.


def restore(model_dir, step=None, mesh=None):
  """(GPTConfig, vocabulary spec or None, params) of a MODEL_DIR checkpoint."""
  cfg, spec = model_dir_lib.resolve(model_dir)
  partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
  model_info.check_model_on_mesh(cfg, partitioner.axis_sizes)
  boxed = gpt.abstract_variables(cfg)["params"]
  params = checkpoint.restore_params(model_dir, partitioner.abstract(boxed), step)
  return cfg, spec, params


def export_hf(model_dir, hf_dir, step=None, mesh=None):
  """Write a transformers directory (config.json, model.safetensors, tokenizer
  files for a GPT-2 BPE vocabulary) from MODEL_DIR's checkpoint `step`."""
  start = time.time()
  with _staged(hf_dir, "--hf_dir", keep_lock=False) as staging:
    cfg, spec, params = restore(model_dir, step, mesh)
    vocab = None
    if spec is not None:
      import tasks
      vocab = tasks.get_vocabulary(spec)
    model_type, hf_config = config_to_hf(cfg, None if vocab is None else vocab.eos_id)
    with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=1)
    _write_weights(os.path.join(staging, WEIGHTS), model_type, cfg, params)
    tokenizer = spec is not None and spec.startswith("gpt2:") and _write_tokenizer(
        spec.partition(":")[2], staging, cfg)
  return {"model_type": model_type, "hf_dir": os.path.abspath(hf_dir),
          "tokenizer": bool(tokenizer), "wall_s": time.time() - start}


def _write_weights(path, model_type, cfg, params):
  """model.safetensors, each HF tensor computed from its leaves' slices when written."""
  tensors = []
  shapes = dict(hf_tensor_specs(model_type, cfg))
  for entry in _entries(model_type, cfg):
    for layer, block, period in _layers(entry, cfg):
      def make_all(entry=entry, block=block, period=period):
        arrays = []
        for ours in entry.ours:
          leaf = _get(params, _leaf_path(entry, ours, block))
          arrays.append(np.asarray(leaf if period is None else leaf[period], np.float32))
        return entry.to_hf(arrays, cfg)
      outputs = {}  # an entry's HF tensors (c_attn's weight and bias) come from one call
      for n, name in enumerate(entry.hf):
        def make(n=n, make_all=make_all, outputs=outputs):
          if not outputs:
            outputs.update(enumerate(make_all()))
          return outputs.pop(n)
        full = name.format(i=layer)
        tensors.append((full, shapes[full], make))
  write_safetensors(path, [(f"transformer.{n}", s, m) for n, s, m in tensors])


def _write_tokenizer(location, staging, cfg):
  """Copy the vocabulary's files so that AutoTokenizer loads them; OpenAI's
  encoder.json + vocab.bpe become vocab.json + merges.txt. False when the
  vocabulary is a .tiktoken file (no transformers layout to write)."""
  from tasks.gpt2_bpe import TOKENIZER_FILES
  if not os.path.isdir(location):
    return False
  names = set(os.listdir(location))
  copies = {n: n for n in TOKENIZER_FILES if n in names}
  if "encoder.json" in copies and "vocab.bpe" in copies and "vocab.json" not in copies:
    copies = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}
  if not copies:
    return False
  for source, target in copies.items():
    shutil.copyfile(os.path.join(location, source), os.path.join(staging, target))
  if "tokenizer_config.json" not in copies.values():
    end = "<|endoftext|>"
    with open(os.path.join(staging, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": end, "eos_token": end,
                 "unk_token": end, "model_max_length": cfg.max_len,
                 "add_prefix_space": False}, f, indent=1)
  return True
