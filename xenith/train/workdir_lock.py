"""One training run per workdir: a lock file naming its holder.

`<workdir>/.lock` is created exclusively (O_CREAT | O_EXCL) and holds the holder's host,
pid and start time; it is removed when the run ends, however it ends short of SIGKILL. A
second run finds it and stops at once, naming the holder. A lock left by a killed run
(same host, no such process) is stale: it is taken over, one process winning through
the same exclusive create. A holder on another host cannot be checked from here; the
message says how to remove its lock if that run is gone.

A gs:// workdir has no O_EXCL; there the lock is an object written with GCS's generation
preconditions, through TensorStore (which Orbax already uses): created only if absent
(`ifGenerationMatch=0`), a stale one replaced only if it is still the generation read
(compare-and-swap), deleted on exit only if it is still ours. The same protocol, the same
messages. Its limits, as locally: a holder on another host cannot be checked (its lock
stays until deleted by hand: `gcloud storage rm`), and there is no lease, so a holder whose
host lost the bucket for good keeps the lock.
"""

import json
import os
import socket
import time

from xenith import storage
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
    workdir = storage.check_supported(workdir, '--workdir')
    self.path = f'{workdir}/{LOCK_FILE}'
    self._remote = _RemoteLock(workdir) if storage.is_remote(workdir) else None
    self._held = False

  def __enter__(self) -> 'WorkdirLock':
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
    if self._remote is not None:
      self._remote.take(me, self._stale, self._held_message)
      self._held = True
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
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
    if self._held and self._remote is not None:
      self._remote.release()
      self._held = False
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


class _RemoteLock:
  """`<workdir>/.lock` in a bucket, taken and released with conditional writes."""

  _ABSENT = b'\x02'  # TensorStore's generation of a missing key.

  def __init__(self, workdir: str):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    self._store = ts.KvStore.open(workdir + '/').result()
    self._generation = None  # Ours, while held.

  def take(self, me: dict, stale, held_message) -> None:
    """Writes `me` as the lock unless a live holder has it (WorkdirError naming it)."""
    data = json.dumps(me).encode()
    expected = self._ABSENT
    for _ in range(3):
      written = self._store.write(LOCK_FILE, data, if_equal=expected).result()
      if written.generation:  # Empty: the precondition failed.
        self._generation = written.generation
        return
      current = self._store.read(LOCK_FILE).result()
      if current.state == 'missing':  # Released since: take it like a fresh one.
        expected = self._ABSENT
        continue
      try:
        holder = json.loads(current.value)
      except ValueError:
        holder = None
      if holder is None or not stale(holder):
        raise WorkdirError(held_message(holder))
      expected = current.stamp.generation  # Replace exactly the stale lock read.
    raise WorkdirError(f'Could not take {LOCK_FILE} in the workdir: other runs keep '
                       'taking it.')

  def release(self) -> None:
    """Deletes the lock if it is still the one this run wrote."""
    if self._generation is not None:
      self._store.write(LOCK_FILE, None, if_equal=self._generation).result()
      self._generation = None
