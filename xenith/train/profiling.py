"""A `jax.profiler` trace of a few train steps, for TensorBoard's profile tab.

`config.profile_steps = (start, count)` traces steps start .. start + count - 1. The
trace goes to <workdir>/plugins/profile/<run>/<host>.xplane.pb: with TensorBoard's
logdir at the workdir (where the CLU writer puts its event files), the profile plugin
(`tensorboard-plugin-profile` / xprof) lists <run> in its Profile tab.
"""

import jax
from absl import logging


class StepProfiler:
  """Starts the trace before the first profiled step, stops it after the last one.

  Only process 0 traces (several processes on one host would write the same file name).
  """

  def __init__(self, config, workdir: str):
    steps = tuple(config.get('profile_steps', ()) or ())
    self._workdir = workdir
    self._first, self._last = (steps[0], steps[0] + steps[1] - 1) if steps else (0, -1)
    self._active = bool(steps) and jax.process_index() == 0
    self._tracing = False

  def before(self, step: int) -> None:
    """Call before running train step `step`."""
    # A resume past `first` but inside the range traces the rest of it.
    if self._active and not self._tracing and self._first <= step <= self._last:
      jax.profiler.start_trace(self._workdir)
      self._tracing = True

  def after(self, step: int, state) -> None:
    """Call after train step `step`; `state` is waited for so the trace holds the work."""
    if self._tracing and step >= self._last:
      self.stop(state)

  def stop(self, state=None) -> None:
    """Ends the trace if one is running (also when the loop ends early)."""
    if not self._tracing:
      return
    if state is not None:
      jax.block_until_ready(state)  # Dispatch is asynchronous: wait for the traced steps.
    jax.profiler.stop_trace()
    self._tracing = False
    logging.info('Profile of steps %d-%d written under %s/plugins/profile; open '
                 "TensorBoard's Profile tab.", self._first, self._last, self._workdir)
