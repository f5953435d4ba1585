"""The data side's input errors that more than one module raises."""


class VocabularyError(ValueError):
  """A vocabulary spec or file that cannot be used."""
