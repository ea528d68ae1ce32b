"""A config file that loads a workdir's config: `--config=xenith/eval/workdir_config.py:<workdir>`.

`--mode=eval` and `--mode=lm_eval` put it in front of `--config.*` overrides given
without `--config`, so the workdir's run.json can be overridden field by field (e.g.
`--config.data.path=<other data>`) the way a config file can.
"""

from xenith.train import run_record


def get_config(workdir: str):
  """The config `workdir` was last started with (its run.json)."""
  return run_record.read_config(workdir)
