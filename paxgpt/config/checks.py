"""Type checks for the config dataclasses (GPTConfig, OptimizerConfig,
DataConfig, TrainConfig, CheckpointConfig, SampleConfig, ...).

  check_types(config)   # first thing in each config's __post_init__

Every field's value is checked against its annotation, so a gin binding of the
wrong type fails before any work instead of running with it:
  int        an int, not a bool and not a float (num_steps=3.5 is refused)
  float      an int or a float, not a bool, and finite
  bool, str  exactly that type
  tuple      a tuple or a list (gin writes both)
  X | None   None or an X (also Optional[X], Union[...])
Other annotations are not checked. A mismatch raises ConfigError naming
`Class.field=value` and the type wanted.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing

from paxgpt.errors import ConfigError

_NAMES = {int: "an integer", float: "a finite number", bool: "true or false (a bool)",
          str: "a string (quote it: 'text')", tuple: "a tuple", type(None): "None"}


@functools.lru_cache(maxsize=None)
def _hints(cls):
  return typing.get_type_hints(cls)


def _alternatives(annotation):
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    return typing.get_args(annotation)
  return (annotation,)


def _matches(value, kind):
  if kind is type(None):
    return value is None
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
  if kind is str:
    return isinstance(value, str)
  if kind is tuple or typing.get_origin(kind) is tuple:
    return isinstance(value, (tuple, list))
  return True  # not a kind this module checks


def check_types(config):
  """Raise ConfigError unless each field of the dataclass instance `config`
  holds a value of its annotated type."""
  cls = type(config)
  hints = _hints(cls)
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    kinds = _alternatives(hints.get(field.name, typing.Any))
    if any(_matches(value, kind) for kind in kinds):
      continue
    wanted = " or ".join(_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)
    raise ConfigError(f"{cls.__name__}.{field.name}={value!r} must be {wanted}")
