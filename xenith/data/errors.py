"""The one exception type the data package raises for bad input or settings."""


class DataError(ValueError):
  """Bad data or data settings: a missing folder, an undecodable file, a bad config.

  Raised before any long work (preparation, tokenizer training) starts, with a
  message that names the offending file, line or config field.
  """
