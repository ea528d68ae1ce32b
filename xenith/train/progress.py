"""The train loop's terminal lines: one per log step, one per evaluation.

  step  200/1000 | loss 4.2134 | lr 3.00e-03 | 45.2k tok/s | MFU 16.8% | ETA 2m05s
  eval  200/1000 | loss 4.3010 | ppl 73.8 | accuracy 0.2410

Every scalar also goes to TensorBoard (and the other loggers); these lines are for
reading a run at a glance.
"""

import time

# The scalars an evaluation line shows, in this order, when the evaluation has them.
_EVAL_KEYS = ('loss', 'perplexity', 'accuracy', 'macro_f1', 'mean_accuracy',
              'mean_digit_accuracy')
_EVAL_LABELS = {'perplexity': 'ppl'}


def _count(x: float) -> str:
  """45213 -> '45.2k'."""
  for limit, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if x >= limit:
      return f'{x / limit:.1f}{suffix}'
  return f'{x:.0f}'


def duration(seconds: float) -> str:
  """125 -> '2m05s', 7322 -> '2h02m', 9 -> '9s'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


class Progress:
  """Formats the lines, and estimates the time left from the run's own pace.

  The estimate is the wall time per step since the first step of this process finished
  (its compile excluded; evaluations and checkpoints included), times the steps left.
  """

  def __init__(self, num_train_steps: int):
    self._total = num_train_steps
    self._width = len(str(num_train_steps))
    self._start = None  # (time, step) once the first step has finished.

  def first_step_done(self, step: int) -> None:
    self._start = (time.perf_counter(), step)

  def _position(self, kind: str, step: int) -> str:
    return f'{kind:<4} {step:>{self._width}}/{self._total}'

  def _eta(self, step: int) -> str | None:
    if self._start is None or step <= self._start[1]:
      return None
    per_step = (time.perf_counter() - self._start[0]) / (step - self._start[1])
    return duration(per_step * (self._total - step))

  def train_line(self, step: int, scalars: dict[str, float]) -> str:
    """From the loop's `train/...` scalars of this log step."""
    parts = [self._position('step', step), f'loss {scalars["train/loss"]:.4f}',
             f'lr {scalars["train/learning_rate"]:.2e}']
    if 'train/tokens_per_sec' in scalars:  # Absent until a step past the compile is timed.
      parts.append(f'{_count(scalars["train/tokens_per_sec"])} tok/s')
      parts.append(f'MFU {100 * scalars["train/mfu"]:.1f}%')
    if scalars.get('train/nonfinite_steps'):
      parts.append(f'skipped {scalars["train/nonfinite_steps"]:.0f} non-finite')
    eta = self._eta(step)
    if eta is not None and step < self._total:
      parts.append(f'ETA {eta}')
    return ' | '.join(parts)

  def eval_line(self, step: int, scalars: dict[str, float], kind: str = 'eval') -> str:
    """From `<prefix>/<name>` scalars (eval/..., passkey/...): the headline ones."""
    values = {tag.split('/', 1)[1]: v for tag, v in scalars.items() if '/' in tag}
    parts = [self._position(kind, step)]
    for key in _EVAL_KEYS:
      if key in values:
        value = values[key]
        parts.append(f'{_EVAL_LABELS.get(key, key)} '
                     + (f'{value:.1f}' if key == 'perplexity' else f'{value:.4f}'))
    return ' | '.join(parts)
