r"""Submits a multi-host training run to SLURM: renders an sbatch script and pipes it to
`sbatch`.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --time=24:00:00 \
      --config=experiments/default.py:size=base --workdir=/shared/runs/base \
      -- --config.mesh.data=2 --config.mesh.fsdp=8

The script `srun`s the same main.py line once per task: one process per node
(--tasks_per_node=1, each seeing all of its node's GPUs) or one per GPU
(--tasks_per_node=--gpus_per_node). srun gives every task SLURM_JOB_ID,
SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, from which JAX's SLURM
detection derives the coordinator (the first node, port 61440 + job id % 4096), the
process count and index. `--config.<field>=<value>` flags and everything after `--` go to
main.py. --dry_run prints the script and the sbatch command. See docs/launchers.md.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Run as a script.

import main_line  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What JAX's SLURM detection would take over from (xenith/distributed.py reads these
# first): a stray value in the submitting shell must not reach the tasks.
_JAX_PROCESS_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch/slurm.py', description=__doc__.split('\n')[0],
      epilog='Flags after -- (and any --config.<field>=<value>) go to main.py.')
  main_line.add_run_flags(parser)
  parser.add_argument('--nodes', type=int, default=1, help='Nodes (hosts).')
  parser.add_argument('--tasks_per_node', type=int, default=1,
                      help='Processes per node: 1, or --gpus_per_node for one per GPU.')
  parser.add_argument('--gpus_per_node', type=int, default=0,
                      help='GPUs to request per node (0: none, e.g. a CPU run).')
  parser.add_argument('--cpus_per_task', type=int, default=None,
                      help='CPU cores per process (default: the cluster\'s).')
  parser.add_argument('--time', default=None, help='Time limit, e.g. 24:00:00.')
  parser.add_argument('--partition', default=None)
  parser.add_argument('--account', default=None)
  parser.add_argument('--job_name', default='xenith')
  parser.add_argument('--output', default='%x-%j.out',
                      help='The job\'s log file (relative to --code_dir; %%x = job name, '
                      '%%j = job id); each line starts with its task number.')
  parser.add_argument('--code_dir', default=ROOT,
                      help='Xenith checkout on the shared filesystem (default: this one).')
  parser.add_argument('--python', default='.venv/bin/python',
                      help='Python with Xenith installed (relative to --code_dir), e.g. '
                      'the venv of `launch/setup.sh --gpu`.')
  parser.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                      help='Environment variable for every task (repeatable).')
  parser.add_argument('--coordinator_port', type=int, default=None,
                      help='Port of the coordinator on the first node (default: JAX\'s, '
                      '61440 + job id %% 4096).')
  parser.add_argument('--sbatch_arg', action='append', default=[], metavar='ARG',
                      help='Extra #SBATCH line, e.g. --sbatch_arg=--qos=high (repeatable).')
  parser.add_argument('--wait', action='store_true',
                      help='sbatch --wait: return when the job ends, with its exit code.')
  return parser


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  for name in ('nodes', 'tasks_per_node'):
    if getattr(args, name) < 1:
      parser.error(f'--{name}={getattr(args, name)} must be at least 1')
  if args.gpus_per_node < 0:
    parser.error(f'--gpus_per_node={args.gpus_per_node} must be >= 0')
  if args.gpus_per_node and args.tasks_per_node not in (1, args.gpus_per_node):
    parser.error(f'--tasks_per_node={args.tasks_per_node} with --gpus_per_node='
                 f'{args.gpus_per_node}: use 1 (one process per node) or '
                 f'{args.gpus_per_node} (one per GPU)')
  for item in args.env:
    name = item.split('=', 1)[0]
    if '=' not in item or not name.isidentifier():
      parser.error(f'--env={item}: expected NAME=VALUE')


def render(args: argparse.Namespace) -> str:
  """The sbatch script."""
  tasks = args.nodes * args.tasks_per_node
  per = 'per GPU' if args.gpus_per_node and args.tasks_per_node > 1 else 'per node'
  options = [f'--job-name={args.job_name}', f'--nodes={args.nodes}',
             f'--ntasks-per-node={args.tasks_per_node}']
  if args.gpus_per_node:
    options.append(f'--gpus-per-node={args.gpus_per_node}')
  if args.cpus_per_task:
    options.append(f'--cpus-per-task={args.cpus_per_task}')
  for name in ('time', 'partition', 'account'):
    if getattr(args, name):
      options.append(f'--{name}={getattr(args, name)}')
  options += [f'--chdir={args.code_dir}', f'--output={args.output}', *args.sbatch_arg]
  lines = ['#!/bin/bash',
           f'# Rendered by launch/slurm.py: {args.nodes} node(s) x {args.tasks_per_node} '
           f'task(s), one main.py process {per}, {tasks} in all.',
           *(f'#SBATCH {option}' for option in options),
           'set -euo pipefail',
           '# JAX detects the job from the SLURM_* variables srun sets in each task.',
           f'unset {" ".join(_JAX_PROCESS_VARIABLES)}']
  if args.gpus_per_node and args.tasks_per_node == 1:
    # JAX's SLURM detection would otherwise show the node's single process only the GPU
    # numbered SLURM_LOCALID (0).
    devices = ','.join(str(i) for i in range(args.gpus_per_node))
    lines.append(f'export JAX_LOCAL_DEVICE_IDS={devices}')
  if args.coordinator_port:
    lines.append(f'export JAX_COORDINATOR_PORT={args.coordinator_port}')
  for item in args.env:
    name, value = item.split('=', 1)
    lines.append(f'export {name}={shlex.quote(value)}')
  srun = ['srun', '--kill-on-bad-exit=1', '--label']
  if args.cpus_per_task:  # srun does not take it over from sbatch in every Slurm version.
    srun.append(f'--cpus-per-task={args.cpus_per_task}')
  lines.append(shlex.join(srun + main_line.main_command(args.python, args)))
  return '\n'.join(lines) + '\n'


def sbatch_command(args: argparse.Namespace) -> list[str]:
  return ['sbatch', '--parsable'] + (['--wait'] if args.wait else [])


def main(argv: list[str]) -> int:
  parser = _parser()
  args = main_line.parse(parser, argv)
  _check(args, parser)
  return main_line.run_with_input(sbatch_command(args), render(args), args.dry_run)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
