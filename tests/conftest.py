"""Test setup: 8 simulated CPU devices for the sharding tests; must run before jax imports."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


# Skips that are expected, by test node id -> why (none today). Any other skip fails the
# run: a missing test dependency must not make tests vanish without a word.
ALLOWED_SKIPS: dict[str, str] = {}


def _skipped_reports(session):
  reporter = session.config.pluginmanager.get_plugin('terminalreporter')
  return reporter.stats.get('skipped', []) if reporter else []


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  unexpected = [r for r in _skipped_reports(session) if r.nodeid not in ALLOWED_SKIPS]
  if unexpected and session.exitstatus == 0:
    session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
  skipped = terminalreporter.stats.get('skipped', [])
  unexpected = [r for r in skipped if r.nodeid not in ALLOWED_SKIPS]
  terminalreporter.write_line(
      f'Skipped tests: {len(skipped)} ({len(unexpected)} unexpected; allowed skips are '
      'listed in tests/conftest.py).', red=bool(unexpected))
  for report in unexpected:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    terminalreporter.write_line(f'  UNEXPECTED SKIP {report.nodeid}: {reason}', red=True)
