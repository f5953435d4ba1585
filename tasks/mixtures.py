"""Mixtures: the example mixture (mostly C4, a little of the bundled corpus; rates
are relative), and `tasks.mixture(...)` for gin:

  DataConfig.mixture_or_task = @tasks.mixture()
  tasks.mixture.name = 'books_and_code'
  tasks.mixture.tasks_and_rates = [(@books/tasks.text_files_task(), 3.0),
                                   (@code/tasks.text_files_task(), 1.0)]
  books/tasks.text_files_task.name = 'books'
  ...
"""
import gin

from tasks import c4, pydoc_topics, registry

C4_PYDOC_MIX = registry.register_mixture(
    "c4_pydoc_mix", [(c4.NAME, 0.95), (pydoc_topics.NAME, 0.05)])


@gin.configurable(module="tasks")
def mixture(name: str = gin.REQUIRED, tasks_and_rates=gin.REQUIRED) -> str:
  """Registers a mixture of registered tasks, [(task name, rate), ...]; returns `name`."""
  return registry.register_mixture(name, [tuple(pair) for pair in tasks_and_rates])
