"""A model's size, FLOPs and per-device bytes from abstract shapes (no weights):
the figures `paxgpt info` prints."""
from __future__ import annotations

import math

from paxgpt.model import accounting
from paxgpt.model import gpt
from paxgpt.model import pipeline
from paxgpt.model import sharding


def describe(config, axis_sizes, seq_len=None):
  """The figures `paxgpt info` prints, as a dict (all from abstract shapes)."""
  variables = gpt.abstract_variables(config)
  total, non_embedding = accounting.param_counts(variables)
  if axis_sizes.get("stage", 1) > 1:  # pipelined: each stage holds its share of the periods
    variables = pipeline.to_stages(variables, pipeline.Pipeline(
        axis_sizes["stage"], pipeline.PipelineConfig().repeats, 1))
  per_device, replicated = accounting.bytes_per_device(
      variables, axis_sizes, sharding.LOGICAL_AXIS_RULES + sharding.STAGE_AXIS_RULES)
  seq_len = seq_len or config.max_len
  return {
      "params": total,
      "params_non_embedding": non_embedding,
      "flops_per_token": accounting.flops_per_token(config, non_embedding, seq_len),
      "seq_len": seq_len,
      "mesh": dict(axis_sizes),
      "param_bytes_per_device": per_device,
      "unsharded_param_fraction": replicated,
      "num_layers": config.num_layers,
      "d_model": config.d_model,
      "num_heads": config.num_heads,
      "head_dim": config.head_dim,
      "d_ff": config.d_ff,
      "vocab_size": config.vocab_size,
      "padded_vocab_size": config.padded_vocab_size,
      "attention_pattern": list(config.attention_pattern),
      "window": config.window,
  }


def check_model_on_mesh(config, axis_sizes):
  """The model's sharded dimensions must divide their mesh axes."""
  for what, size, logical_axis in (("d_model", config.d_model, "embed"),
                                   ("num_heads", config.num_heads, "heads"),
                                   ("d_ff", config.d_ff, "mlp"),
                                   ("padded vocab size", config.padded_vocab_size, "vocab")):
    sharding.check_divisible(what, size, logical_axis, axis_sizes)


def mesh_axis_sizes(mesh_flag, num_devices=None):
  """Axis sizes from --mesh (with `stage` when it asks for stages); a -1 is
  resolved against the visible devices."""
  import jax
  requested = sharding.parse_mesh_flag(mesh_flag or "")
  sizes = {"data": 1, "fsdp": -1, "tensor": 1, **requested}
  if -1 in sizes.values():
    num_devices = num_devices or jax.device_count()
  else:
    num_devices = num_devices or math.prod(sizes.values())
  return sharding.resolve_hybrid(num_devices, requested, {}, 1)[0]


def format_report(config, report):
  """The figures of `describe` as the lines `paxgpt info` prints."""
  mesh = ",".join(f"{k}:{v}" for k, v in report["mesh"].items())
  return "\n".join([
      f"GPT: {config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads "
      f"x {config.head_dim}, d_ff {config.d_ff}, vocab {config.vocab_size} "
      f"(padded {config.padded_vocab_size}), attention {'/'.join(config.attention_pattern)} "
      f"(W={config.window})",
      f"parameters:            {report['params']:,} "
      f"({report['params_non_embedding']:,} non-embedding)",
      f"training FLOPs/token:  {report['flops_per_token']:.4g} at length {report['seq_len']}",
      f"param bytes/device:    {report['param_bytes_per_device'] / 2**30:.3f} GiB on mesh {mesh}",
      f"replicated fraction:   {report['unsharded_param_fraction']:.4f}",
  ])
