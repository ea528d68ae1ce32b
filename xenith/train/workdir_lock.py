"""One training run per workdir: a lock file naming its holder.

`<workdir>/.lock` is created exclusively (O_CREAT | O_EXCL) and holds the holder's host,
pid and start time; it is removed when the run ends, however it ends short of SIGKILL. A
second run finds it and stops at once, naming the holder. A lock left by a killed run
(same host, no such process) is stale: it is taken over, one process winning through
the same exclusive create. A holder on another host cannot be checked from here; the
message says how to remove its lock if that run is gone.

Object-store workdirs (gs://, s3://) have no O_EXCL; there the same protocol needs a
create-only object (a conditional write such as GCS's `ifGenerationMatch=0`), which
Xenith does not implement yet: it refuses such workdirs before taking a lock.
"""

import json
import os
import socket
import time

from xenith.errors import WorkdirError

LOCK_FILE = '.lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by another user.
    return True
  return True


class WorkdirLock:
  """Context manager: holds `<workdir>/.lock` for a training run (see the module doc)."""

  def __init__(self, workdir: str):
    if '://' in workdir:
      raise WorkdirError(f'{workdir}: object-store workdirs are not supported yet (no '
                         'create-only lock there); use a local or mounted folder.')
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._held = False

  def __enter__(self) -> 'WorkdirLock':
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
    for _ in range(3):  # A stale lock is replaced, then taken like a fresh one.
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None or not self._stale(holder):
          raise WorkdirError(self._held_message(holder)) from None
        stale = f'{self.path}.stale-{os.getpid()}'
        try:
          os.rename(self.path, stale)  # Only one of several contenders moves it.
          os.unlink(stale)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self._held = True
      return self
    raise WorkdirError(f'Could not take {self.path}: other runs keep taking it.')

  def __exit__(self, *exc_info) -> None:
    if self._held:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
      self._held = False

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # Being written by its new holder this instant, or unreadable.

  @staticmethod
  def _stale(holder: dict) -> bool:
    return holder.get('host') == socket.gethostname() and not _alive(int(holder['pid']))

  def _held_message(self, holder: dict | None) -> str:
    if holder is None:
      return (f'{self.path} is held by another run (its lock file is unreadable); if no '
              'run holds it, delete it.')
    since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
    where = ('this host' if holder.get('host') == socket.gethostname()
             else f'host {holder.get("host")}')
    return (f'The workdir is in use by another training run (pid {holder.get("pid")} on '
            f'{where}, since {since}); wait for it or use another --workdir. If that run '
            f'is gone, delete {self.path}.')
