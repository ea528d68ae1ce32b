"""The host's memory under glibc malloc, kept fast and small for XLA on Linux.

`main.py` (and the benchmarks that time its train step) do two things here:

1. **Huge pages for XLA's per-run buffer** (`reexec_with_huge_pages`). XLA:CPU
   allocates one temporary buffer per run of a compiled function (441 MiB for the
   default experiment's train step) and frees it after the run. glibc serves an
   allocation that large from a fresh `mmap` every time, so each train step touches
   100,000+ new 4 KiB pages; the kernel faults in and zeroes each one, 0.25-0.3 s of
   kernel time per 0.8 s step on a 2-core AMD EPYC (`docs/host_memory.md`). With
   glibc's `glibc.malloc.hugetlb=1` tunable, malloc advises transparent huge pages
   (`MADV_HUGEPAGE`) on the memory it maps, and the same buffer takes a few hundred
   2 MiB faults. The tunable is read once, when a process starts, so the process
   re-executes itself (same PID, arguments and environment, plus the tunable) before
   anything else has run. It does not when:
   - the OS is not Linux with glibc >= 2.35 (the first glibc with the tunable);
   - transparent huge pages are `always` (every mapping gets them already) or `never`
     (the advice is ignored), per /sys/kernel/mm/transparent_hugepage/enabled;
   - GLIBC_TUNABLES already sets `glibc.malloc.hugetlb` (the user chose, or this is
     the restarted process);
   - XENITH_HUGE_PAGES=0 (or false / no / off: opt out).

2. **Freed memory back to the OS after each compilation** (`trim_after_compiles`).
   Compiling a train step leaves a few hundred MiB freed but still resident in
   malloc's heaps (180 MiB at the default shape); the run's temporary buffer is
   mapped on top of that, so it counts toward the peak twice over. `malloc_trim(0)`
   after every XLA compilation hands it back (the default run's peak resident memory:
   1.14 GiB without, 0.92 with).
"""

import ctypes
import os
import re
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'XENITH_HUGE_PAGES'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)
# jax.monitoring's event after each XLA compilation (jax._src.dispatch).
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):  # Not glibc (musl, macOS, Windows).
    return None
  match = re.match(r'(\d+)\.(\d+)', version)
  return (int(match[1]), int(match[2])) if name == 'glibc' and match else None


def thp_mode(path: str = THP_SETTING) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match[1] if match else None


def huge_pages_environment(environ: dict[str, str], platform: str = sys.platform,
                           glibc: tuple[int, int] | None = None,
                           thp: str | None = None) -> dict[str, str] | None:
  """`environ` with the tunable added, or None when it is set, useless or unwanted.

  `glibc` and `thp` default to this machine's (see the module docstring).
  """
  if environ.get(OPT_OUT, '1').strip().lower() in ('0', 'false', 'no', 'off') or (
      not platform.startswith('linux')):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if any(item.split('=', 1)[0] == TUNABLE for item in tunables.split(':')):
    return None
  glibc = glibc if glibc is not None else glibc_version()
  thp = thp if thp is not None else thp_mode()
  if glibc is None or glibc < _MIN_GLIBC or thp != 'madvise':
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(filter(None, (tunables, f'{TUNABLE}=1'))))


def huge_pages_active(environ: dict[str, str] | None = None) -> bool:
  """Whether this process started with glibc's huge-page tunable on."""
  environ = os.environ if environ is None else environ
  return f'{TUNABLE}=1' in environ.get('GLIBC_TUNABLES', '').split(':')


def reexec_with_huge_pages() -> None:
  """Restarts this process with the tunable when `huge_pages_environment` asks for it.

  Call it first thing in a script's entry point: the process image is replaced, so
  nothing done before (threads, signal handlers, open files) survives.
  """
  env = huge_pages_environment(dict(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the interpreter's own command line (options such as -u or -m kept).
  os.execve(sys.executable, list(sys.orig_argv), env)


def release_free_memory() -> bool:
  """Returns malloc's free memory to the OS (glibc `malloc_trim(0)`); False if not glibc."""
  if glibc_version() is None:
    return False
  return bool(ctypes.CDLL(None).malloc_trim(0))


_installed = False


def trim_after_compiles() -> None:
  """From now on, `release_free_memory()` after every XLA compilation (once per process)."""
  global _installed
  if _installed or glibc_version() is None:
    return
  import jax  # pylint: disable=g-import-not-at-top

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs, kwargs
    if event == COMPILE_EVENT:
      release_free_memory()

  jax.monitoring.register_event_duration_secs_listener(listener)
  _installed = True
