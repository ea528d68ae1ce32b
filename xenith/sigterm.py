"""A SIGTERM remembered, not acted on at once: a preempted training run stops at its next
safe point (after the current step, with a checkpoint; before the first step, at once),
never in the middle of an import or a save.

`main.py` installs the handler first thing, so a SIGTERM during start-up is not lost;
modes other than train give the default action back (`restore_default`).
"""

import signal
import sys
import threading

_received = False


def _handle(signum, frame):
  del signum, frame
  global _received
  _received = True


def install() -> None:
  """Remembers SIGTERMs from now on (only the main thread may install handlers)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _handle)


def received() -> bool:
  """Whether a SIGTERM came since `install`."""
  return _received


def restore_default() -> None:
  """The default action again (terminate); exits now if a SIGTERM already came."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  if _received:
    sys.exit('SIGTERM during start-up: stopped.')
