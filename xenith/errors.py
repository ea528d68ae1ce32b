"""Every error Xenith raises for bad input, under one base class.

`main.py` turns a `XenithError` into one line (`<ErrorType>: <message>`) and exit status 1;
each is raised before any long work (compiles, data preparation, training) starts, or, for
`NonFiniteError`, when training stops. Each also derives from the built-in type callers
caught before it had a base of its own (ValueError, RuntimeError).
"""


class XenithError(Exception):
  """Base class: a problem in what the user gave Xenith, reported as one line."""


class ConfigError(XenithError, ValueError):
  """An invalid config; `field` is the dotted path under `config.`."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f'config.{field}: {message}')


class FlagError(XenithError, ValueError):
  """A bad command-line flag (or the environment variable standing in for it)."""


class DataError(XenithError, ValueError):
  """Bad data or data settings: a missing folder, an undecodable file, a bad config.

  Raised before any long work (preparation, tokenizer training) starts, with a
  message that names the offending file, line or config field.
  """


class CheckpointMismatchError(XenithError, ValueError):
  """The workdir's checkpoint does not fit the config (another model, another workdir?)."""


class HfFormatError(XenithError, ValueError):
  """The directory is not a supported Hugging Face checkpoint, or does not fit the model."""


class SweepError(XenithError, ValueError):
  """An invalid sweep; raised before any point runs."""


class NonFiniteError(XenithError, RuntimeError):
  """The loss or gradients became NaN/inf and `config.on_nonfinite` is 'stop'."""


class MemoryBankError(XenithError, ValueError):
  """A memory bank file (`--memory_bank`, `memory.load_bank`) that cannot be used."""


class WorkdirError(XenithError, RuntimeError):
  """The workdir cannot be used: held by another run, not a folder, or from another run."""


class CheckpointSaveError(XenithError, RuntimeError):
  """A checkpoint could not be written (a full disk...); the older ones are intact."""


class StorageError(XenithError, ValueError):
  """A path or URL no installed storage backend can write (`xenith/storage.py`)."""
