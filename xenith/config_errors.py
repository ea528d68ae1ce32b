"""One-line messages for a `--config` command line that ml_collections cannot apply.

ml_collections reports a mistyped `--config.model.num_head=3` as a KeyError whose text
is `'num_head'` plus a "Did you mean" paragraph, and a `get_config` that rejects its
argument (`:size=huge`) as a traceback inside a flags error. Both become one line here:

  config.model.num_head: no such field; did you mean num_heads?
  --config=experiments/default.py:size=huge: Unknown size 'huge'; choose one of [...]

main.py and launch/sweep.py print them.
"""

import re
from typing import Sequence


def overrides(argv: Sequence[str]) -> list[str]:
  """The dotted fields of `--config.<field>=...` arguments, in order."""
  return [a.split('=', 1)[0][len('--config.'):] for a in argv if a.startswith('--config.')]


def unknown_field(error: BaseException, argv: Sequence[str]) -> str:
  """`config.<path>: no such field[; did you mean <name>?]` for an override that names no
  field (`error`: the KeyError/AttributeError ml_collections raised while applying argv)."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError)
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  names = re.findall(r"'([^']+)'", text)
  missing = names[0] if names else text.strip('"\'').splitlines()[0]
  hint = re.search(r'[Dd]id you mean "([^"]+)"', text)
  path = missing
  for override in overrides(argv):  # The full dotted path of the override that failed.
    parts = override.split('.')
    if missing in parts:
      path = '.'.join(parts[:parts.index(missing) + 1])
      break
  suggestion = f'; did you mean {hint.group(1)}?' if hint else ''
  return f'config.{path}: no such field{suggestion}'


def config_file_error(error: BaseException, spec: str) -> str:
  """`--config=<spec>: <reason>`, the reason being the last line of what the experiment
  file raised (ml_collections embeds the whole traceback in the message)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[-1] if lines else type(error).__name__
  # `ValueError: Unknown size ...` -> the message; the type adds nothing for a user.
  reason = re.sub(r'^\w+(Error|Exception): ', '', reason)
  return f'--config={spec}: {reason}'
