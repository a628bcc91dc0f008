"""Errors that name a data problem and its fix, instead of a TF traceback."""


class DataError(RuntimeError):
  """A dataset is missing, malformed or holds a record that cannot be read."""
