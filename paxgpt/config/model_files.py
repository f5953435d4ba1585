"""gin/models/NAME.gin read without gin: the GPTConfig of a model file on a
box that has no gin-config (the GPU check), from its `GPTConfig.field =
literal` lines and those of the files it `include`s, so the model files stay
the one source of truth for every shape.

  config = model_config("gpt3_xl", attention_backend="gpu")
"""
from __future__ import annotations

import ast
import os
import re

from paxgpt.model import gpt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_GIN_BINDING = re.compile(r"^GPTConfig\.(\w+)\s*=\s*(.+?)\s*(#.*)?$")
_GIN_INCLUDE = re.compile(r"""^include\s+(['"])(.+)\1\s*(#.*)?$""")


def _gin_fields(path, fields):
  """Add the `GPTConfig.field = literal` bindings of a gin file to `fields`, in
  order, following its `include 'file'` lines (relative to the repository) at
  their place, so that later bindings win as in gin."""
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      included = _GIN_INCLUDE.match(line)
      if included:
        _gin_fields(os.path.join(REPO_ROOT, included.group(2)), fields)
      elif line.startswith("GPTConfig."):
        found = _GIN_BINDING.match(line)
        try:
          fields[found.group(1)] = ast.literal_eval(found.group(2))
        except (AttributeError, ValueError, SyntaxError) as err:
          raise ValueError(f"{path}:{number}: not a `GPTConfig.field = literal` line: "
                           f"{line!r}") from err
  return fields


def model_config(name, **overrides):
  """GPTConfig of gin/models/NAME.gin from its `GPTConfig.field = literal` lines
  and those of the files it includes (no gin needed; a GPTConfig line that is
  not a Python literal is an error)."""
  fields = _gin_fields(os.path.join(REPO_ROOT, "gin", "models", f"{name}.gin"), {})
  return gpt.GPTConfig(**{**fields, **overrides})
