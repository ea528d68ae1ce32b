"""xenith/host_memory.py: when the process restarts with glibc's huge-page tunable, that
the restart keeps the command line and PID, that the tunable really cuts XLA's page
faults, and that the compile listener really gives freed memory back."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from xenith import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLIES = host_memory.huge_pages_environment(
    {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'XENITH_HUGE_PAGES')}
) is not None


@pytest.mark.parametrize('environ, platform, glibc, thp, want', [
    ({}, 'linux', (2, 36), 'madvise', 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'linux', (2, 35), 'madvise',
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'linux', (2, 36), 'madvise', None),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, 'linux', (2, 36), 'madvise', None),
    ({'XENITH_HUGE_PAGES': '0'}, 'linux', (2, 36), 'madvise', None),
    ({}, 'linux', (2, 34), 'madvise', None),    # No such tunable before 2.35.
    ({}, 'linux', (2, 36), 'always', None),     # Every mapping has them already.
    ({}, 'linux', (2, 36), 'never', None),      # The advice would be ignored.
    ({}, 'darwin', (2, 36), 'madvise', None),
])
def test_huge_pages_environment(environ, platform, glibc, thp, want):
  env = host_memory.huge_pages_environment(environ, platform=platform, glibc=glibc,
                                           thp=thp)
  assert (env and env['GLIBC_TUNABLES']) == want
  if env:
    assert {k: v for k, v in env.items() if k != 'GLIBC_TUNABLES'} == {
        k: v for k, v in environ.items() if k != 'GLIBC_TUNABLES'}


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
  setting = tmp_path / 'enabled'
  setting.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(str(setting)) == 'madvise'
  assert host_memory.thp_mode(str(tmp_path / 'missing')) is None


def _run(code: str, *args: str, env: dict | None = None) -> str:
  env = dict(os.environ if env is None else env)
  env.pop('XLA_FLAGS', None)  # One CPU device: the conftest's 8 are not needed here.
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args], env=env,
                        capture_output=True, text=True, check=True, cwd=REPO).stdout


_REEXEC = """
    import os, sys
    from xenith import host_memory
    print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)
    host_memory.reexec_with_huge_pages()
    print('continued', os.getpid(), host_memory.huge_pages_active())
"""


def test_restart_keeps_pid_and_arguments_and_adds_the_tunable():
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES',
                                                           'XENITH_HUGE_PAGES')}
  lines = _run(_REEXEC, 'a', '--b=1', env=env).splitlines()
  if not APPLIES:  # This machine (kernel, libc) gains nothing: no restart.
    assert [l.split()[0] for l in lines] == ['run', 'continued'], lines
    return
  first, second, last = lines
  pid = first.split()[1]
  assert first == f"run {pid}  ['a', '--b=1']"
  assert second == f"run {pid} glibc.malloc.hugetlb=1 ['a', '--b=1']"
  assert last == f'continued {pid} True'


def test_no_restart_when_opted_out_or_already_chosen():
  for extra in ({'XENITH_HUGE_PAGES': '0'}, {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}):
    env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'} | extra
    lines = _run(_REEXEC, env=env).splitlines()
    assert [l.split()[0] for l in lines] == ['run', 'continued'], (extra, lines)


_FAULTS = """
    import json, resource, jax, jax.numpy as jnp
    @jax.jit
    def f(x):  # 64 MiB intermediates: a temp buffer far above malloc's mmap threshold.
      a = jnp.sin(x); b = jnp.cos(a) * x; c = jnp.exp(-b) + a
      return (a * b + c).sum()
    x = jnp.ones((4096, 4096))
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      f(x).block_until_ready()
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""


def test_huge_pages_cut_the_page_faults_of_xla_temp_buffers():
  base = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  without = json.loads(_run(_FAULTS, env=base))
  with_tunable = json.loads(_run(_FAULTS, env=base | {'GLIBC_TUNABLES':
                                                       'glibc.malloc.hugetlb=1'}))
  if not APPLIES:  # THP 'always' (nothing to gain), 'never', or an older libc.
    assert with_tunable > without / 2, (with_tunable, without)  # Then the tunable is moot.
    return
  # Every run first-touches its temp buffer again (XLA fuses f into 2 x 64 MiB)...
  assert without > 20_000, without
  assert with_tunable < without / 10, (with_tunable, without)  # ...in 2 MiB pages here.


_TRIM = """
    import ctypes, json, os
    from xenith import host_memory
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mib():
      return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGESIZE') / 2**20
    blocks = [libc.malloc(64 << 10) for _ in range(4000)]  # 250 MiB from the heap
    for b in blocks:                                            # (below mmap's threshold),
      ctypes.memset(b, 1, 64 << 10)                             # touched,
    for b in blocks[:-1]:                                       # then freed but for the top
      libc.free(b)                                              # block, so nothing trims.
    before = rss_mib()
    released = host_memory.release_free_memory()
    print(json.dumps([before, rss_mib(), released]))
"""


def test_release_free_memory_gives_freed_heap_back():
  before, after, released = json.loads(_run(_TRIM))
  if host_memory.glibc_version() is None:
    assert not released
    return
  assert released and before - after > 150, (before, after)


def test_trim_runs_after_each_compilation():
  out = _run("""
      import jax, jax.numpy as jnp
      from xenith import host_memory
      calls = []
      host_memory.release_free_memory = lambda: calls.append(1) or True
      host_memory.trim_after_compiles()
      host_memory.trim_after_compiles()  # Once per process, however often it is called.
      x = jnp.ones(5).block_until_ready()  # Compiles too.
      n = len(calls)
      jax.jit(lambda x: x * 2 + 1)(x).block_until_ready()
      jax.jit(lambda x: x * 2 + 1)(x).block_until_ready()  # A new jit: compiled again.
      print(n, len(calls) - n)
  """)
  if host_memory.glibc_version() is None:
    assert out.split() == ['0', '0']
  else:
    assert int(out.split()[1]) == 2, out
