"""Tasks and mixtures registered per vocabulary.

A task is registered here as a *factory* `register(name, vocabulary)`; the base
name (e.g. 'pydoc_topics') is registered at import with the byte vocabulary, and
`task_name_for(name, spec)` registers on first use the variant for another
vocabulary spec as 'pydoc_topics.spm_<hash>' (mixtures likewise, their tasks
swapped for the same variant). So gin only ever says a task name and a spec.
"""
from __future__ import annotations

from typing import Callable, Sequence

import gin
import seqio

from tasks import vocabularies

DEFAULT_SPEC = "byte"

TaskFactory = Callable[[str, seqio.Vocabulary], None]
_TASK_FACTORIES: dict[str, TaskFactory] = {}
_MIXTURES: dict[str, tuple[tuple[str, float], ...]] = {}


class UnknownTaskError(ValueError):
  """A task or mixture name that is not registered."""


def _replace_task(name: str, register: Callable[[], None]):
  # Re-registering (a module imported twice, gin parsed again) replaces the old one.
  seqio.TaskRegistry.remove(name)
  register()


def register_task_factory(name: str, factory: TaskFactory) -> str:
  """Keeps `factory` for `name` and registers `name` with the byte vocabulary;
  forgets variants of an earlier factory under the same name."""
  _TASK_FACTORIES[name] = factory
  for registered in list(seqio.TaskRegistry.names()):
    if registered.startswith(name + "."):
      seqio.TaskRegistry.remove(registered)
  _replace_task(name, lambda: factory(name, vocabularies.get_vocabulary(DEFAULT_SPEC)))
  return name


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> str:
  """A mixture of registered tasks (names from `register_task_factory`) with rates."""
  tasks_and_rates = tuple((t, float(r)) for t, r in tasks_and_rates)
  for task, rate in tasks_and_rates:
    if task not in _TASK_FACTORIES:
      raise UnknownTaskError(f"mixture {name!r}: task {task!r} is not registered")
    if rate <= 0:
      raise ValueError(f"mixture {name!r}: rate {rate} for {task!r} must be positive")
  _MIXTURES[name] = tasks_and_rates
  for registered in list(seqio.MixtureRegistry.names()):
    if registered == name or registered.startswith(name + "."):
      seqio.MixtureRegistry.remove(registered)
  seqio.MixtureRegistry.add(name, list(tasks_and_rates))
  return name


@gin.configurable(module="tasks")
def mixture(name: str = gin.REQUIRED, tasks_and_rates=gin.REQUIRED) -> str:
  """`register_mixture` for gin; returns `name`:

    DataConfig.mixture_or_task = @tasks.mixture()
    tasks.mixture.name = 'books_and_code'
    tasks.mixture.tasks_and_rates = [(@books/tasks.text_files_task(), 3.0),
                                     (@code/tasks.text_files_task(), 1.0)]
  """
  return register_mixture(name, [tuple(pair) for pair in tasks_and_rates])


def known_names() -> list[str]:
  return sorted(set(_TASK_FACTORIES) | set(_MIXTURES)
                | set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def _variant(name: str, spec: str) -> str:
  return name if spec == DEFAULT_SPEC else f"{name}.{vocabularies.spec_tag(spec)}"


def task_name_for(name: str, spec: str = DEFAULT_SPEC) -> str:
  """The registered task or mixture that is `name` tokenized with vocabulary `spec`,
  registering it if needed. Raises UnknownTaskError for an unknown name."""
  vocabularies.parse_spec(spec)  # a bad spec fails here, before any registration
  if name in _TASK_FACTORIES:
    variant = _variant(name, spec)
    if variant not in seqio.TaskRegistry.names():
      _TASK_FACTORIES[name](variant, vocabularies.get_vocabulary(spec))
    return variant
  if name in _MIXTURES:
    variant = _variant(name, spec)
    if variant not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(
          variant, [(task_name_for(t, spec), r) for t, r in _MIXTURES[name]])
    return variant
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    # Registered directly with seqio (not through a factory): its own vocabulary.
    provider = seqio.get_mixture_or_task(name)
    vocab = provider.output_features["targets"].vocabulary
    if vocab != vocabularies.get_vocabulary(spec):
      raise ValueError(f"task {name!r} was registered with its own vocabulary "
                       f"{type(vocab).__name__}, not {spec!r}")
    return name
  raise UnknownTaskError(f"no task or mixture named {name!r}; registered: "
                         f"{', '.join(n for n in known_names() if '.' not in n)}")


def get_task(name: str) -> seqio.Task:
  """A registered task (not a mixture), with its default vocabulary."""
  registered = task_name_for(name)
  if registered in seqio.MixtureRegistry.names():
    raise ValueError(f"{name!r} is a mixture; name one of its tasks: "
                     f"{[t.name for t in seqio.get_mixture_or_task(registered).tasks]}")
  return seqio.TaskRegistry.get(registered)
