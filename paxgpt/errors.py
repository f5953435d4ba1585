"""Errors that mean "the user asked for something wrong": the CLI prints them
as one line and exits with code 2."""


class UsageError(ValueError):
  pass
