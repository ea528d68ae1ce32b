"""What a run prints: short lines with a clock, and no library chatter by default.

By default the log shows Xenith's own lines only (`12:03:04 step 100/1000 | loss ...`);
warnings and errors of every library still come through, marked `WARNING` / `ERROR`.
`--verbosity=1` brings back everything: absl's full line prefix, the INFO lines of JAX
(backend probing), TensorFlow (oneDNN notices), TFDS (dataset-info lines), CLU (the
metric writer's own copy of every scalar), Orbax and grain.
"""

import logging as std_logging
import os
import sys

from absl import logging

# Libraries whose INFO lines are chatter; matched against the logging record's file path.
_CHATTY = ('/jax/', '/jaxlib/', '/orbax/', '/grain/', '/tensorflow_datasets/', '/clu/',
           '/tensorflow/', '/etils/', '/flax/', '/absl/')


def verbose(argv: list[str]) -> bool:
  """Whether the command line asks for library chatter: --verbosity / -v >= 1.

  Read from argv rather than absl's parsed flag: it must be known before TensorFlow is
  first imported, which is before flags are parsed.
  """
  level = None
  for i, arg in enumerate(argv):
    if arg.startswith(('--verbosity=', '-v=')):
      level = arg.split('=', 1)[1]
    elif arg in ('--verbosity', '-v') and i + 1 < len(argv):
      level = argv[i + 1]
  try:
    return level is not None and int(level) >= 1
  except ValueError:
    return False  # absl reports the malformed flag itself.


def quiet_native_libraries() -> None:
  """Keeps C++ start-up notices off stderr (call before TensorFlow is imported).

  TensorFlow only writes summaries here, so turning its oneDNN kernels off (which is all
  that silences the notice) changes no Xenith number.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


class _LibraryChatter(std_logging.Filter):
  """Drops the INFO (and DEBUG) lines of the libraries in `_CHATTY`."""

  def filter(self, record):
    if record.levelno >= std_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, '/')
    return not any(part in path for part in _CHATTY)


class _ShortFormatter(std_logging.Formatter):
  """`HH:MM:SS message`; warnings and errors also say their level."""

  def __init__(self):
    super().__init__('%(asctime)s %(message)s', datefmt='%H:%M:%S')

  def format(self, record):
    line = super().format(record)
    if record.levelno >= std_logging.WARNING:
      stamp, _, rest = line.partition(' ')
      line = f'{stamp} {record.levelname} {rest}'
    return line


def configure(is_verbose: bool) -> None:
  """Sets up the absl handler: short lines without chatter, or absl's defaults."""
  if is_verbose:
    return
  handler = logging.get_absl_handler()
  handler.addFilter(_LibraryChatter())
  handler.setFormatter(_ShortFormatter())


def setup_from_argv(argv: list[str] | None = None) -> bool:
  """Both halves in one call from an entry point: returns whether the run is verbose."""
  is_verbose = verbose(sys.argv if argv is None else argv)
  if not is_verbose:
    quiet_native_libraries()
  return is_verbose
