"""What the cluster launchers share: the one `main.py` line every host runs, and running
(or, with --dry_run, printing) their commands.

A multi-host run starts the identical line `python main.py --config=... --workdir=...`
in every process; the processes find each other through the cluster's environment
(SLURM, Cloud TPU VM metadata) or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (Kubernetes), see xenith/distributed.py. Standard library only, so the
launchers run on a login node or laptop without Xenith's virtual environment.
"""

import argparse
import shlex
import subprocess
import sys


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
  """(launcher args, main.py flags): `--config.<field>=<value>` and all after `--` go
  to main.py."""
  extra = []
  if '--' in argv:
    argv, extra = argv[:argv.index('--')], argv[argv.index('--') + 1:]
  ours = [a for a in argv if not a.startswith('--config.')]
  return ours, [a for a in argv if a.startswith('--config.')] + extra


def add_run_flags(parser: argparse.ArgumentParser) -> None:
  """The flags every launcher has: what to run, and --dry_run."""
  parser.add_argument('--config', required=True,
                      help='Experiment config for main.py, e.g. experiments/default.py:size=tiny.')
  parser.add_argument('--workdir', required=True,
                      help='main.py --workdir; all hosts must see the same one (a shared '
                      'filesystem or a gs:// bucket).')
  parser.add_argument('--dry_run', action='store_true',
                      help='Print what would run; run nothing.')


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """Parses the launcher's flags; `args.main_flags` holds the ones for main.py."""
  ours, main_flags = split_argv(argv)
  args = parser.parse_args(ours)
  for flag in main_flags:
    name = flag.split('=', 1)[0]
    if name in ('--config', '--workdir'):
      parser.error(f'{flag}: give --config/--workdir to the launcher, before --')
  args.main_flags = main_flags
  return args


def main_command(python: str, args: argparse.Namespace) -> list[str]:
  """The main.py line, as argv words."""
  return [python, 'main.py', f'--config={args.config}', f'--workdir={args.workdir}',
          *args.main_flags]


def run_shell(commands: list[str], dry_run: bool) -> int:
  """Runs shell commands in order (stopping at the first failure), or prints them."""
  for command in commands:
    if dry_run:
      print(command)
      continue
    print(f'+ {command}', file=sys.stderr, flush=True)
    code = subprocess.run(command, shell=True, check=False).returncode
    if code:
      print(f'Failed (exit {code}): {command}', file=sys.stderr)
      return code
  return 0


def run_with_input(command: list[str], text: str, dry_run: bool) -> int:
  """Runs `command` with `text` on its stdin, or prints the text and then the command
  (as a comment, so the printed text stays a valid script or manifest)."""
  if dry_run:
    print(text, end='' if text.endswith('\n') else '\n')
    print(f'# command: {shlex.join(command)}  (the text above on its stdin)')
    return 0
  print(f'+ {shlex.join(command)}', file=sys.stderr, flush=True)
  return subprocess.run(command, input=text, text=True, check=False).returncode
