r"""Runs training on every worker (host) of a Cloud TPU VM slice through `gcloud`.

  python launch/tpu_vm.py --name=xenith-v4 --zone=us-central2-b \
      --steps=create,code,install,run,logs \
      --config=experiments/default.py:size=base --workdir=gs://bucket/runs/base \
      -- --config.mesh.fsdp=16

Steps, in this order (--steps picks; default code,install,run,logs):
  create   gcloud compute tpus tpu-vm create (--accelerator_type, --version);
  code     this checkout's files (tracked and untracked, not ignored) packed and copied to
           every worker, or --git_url cloned there at --git_ref;
  install  launch/setup.sh --tpu on every worker (jax with libtpu, requirements-tpu.txt),
           first Python 3.11 from the deadsnakes PPA where the image lacks it;
  run      the same main.py line started on every worker in the background (deaf to the
           hangup: it outlives the ssh session), its log in <remote_dir>/logs/<log_name>.log;
  stop     SIGTERM to main.py on every worker: they save a checkpoint and exit;
  logs     follows every worker's log (lines start with the worker's hostname) until
           main.py ends there; exits non-zero if it failed on a worker. Run
           --steps=logs again to re-attach;
  delete   gcloud compute tpus tpu-vm delete.
On a TPU VM, JAX reads the slice's workers and this worker's index from the VM metadata,
so main.py needs no process flags. The workdir must be one that every worker sees (a
gs:// bucket). --dry_run prints the commands. See docs/launchers.md.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Run as a script.

import main_line  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('create', 'code', 'install', 'run', 'stop', 'logs', 'delete')
# Xenith needs Python 3.11; the Ubuntu 22.04 TPU VM images have 3.10.
_PYTHON_311 = ('if ! command -v python3.11 >/dev/null; then sudo apt-get update -q && '
               'sudo apt-get install -y -q software-properties-common && '
               'sudo add-apt-repository -y ppa:deadsnakes/ppa && '
               'sudo apt-get install -y -q python3.11 python3.11-venv; fi')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch/tpu_vm.py', description=__doc__.split('\n')[0],
      epilog='Flags after -- (and any --config.<field>=<value>) go to main.py.')
  main_line.add_run_flags(parser)
  parser.add_argument('--name', required=True, help='TPU VM (slice) name.')
  parser.add_argument('--zone', required=True, help='e.g. us-central2-b.')
  parser.add_argument('--project', default=None, help='Default: gcloud\'s.')
  parser.add_argument('--steps', default='code,install,run,logs',
                      help=f'Comma-separated, from {",".join(STEPS)}.')
  parser.add_argument('--accelerator_type', default='v4-32', help='create: slice type.')
  parser.add_argument('--version', default='tpu-ubuntu2204-base',
                      help='create: TPU VM software version (runtime image).')
  parser.add_argument('--spot', action='store_true', help='create: a Spot slice.')
  parser.add_argument('--git_url', default=None,
                      help='code: clone this repository instead of copying this checkout.')
  parser.add_argument('--git_ref', default='origin/HEAD',
                      help='code with --git_url: commit, tag or origin/<branch>.')
  parser.add_argument('--remote_dir', default='xenith',
                      help='Where the code goes on each worker (relative to the home).')
  parser.add_argument('--log_name', default='main',
                      help='run/logs: <remote_dir>/logs/<log_name>.log (.pid, .exit).')
  parser.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                      help='run: environment variable for main.py (repeatable).')
  return parser


def _gcloud(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
  words = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *rest, f'--zone={args.zone}']
  return words + ([f'--project={args.project}'] if args.project else [])


def _on_all_workers(args: argparse.Namespace, command: str) -> str:
  return shlex.join(_gcloud('ssh', args, args.name, '--worker=all', f'--command={command}'))


def _tarball(args: argparse.Namespace) -> str:
  return f'/tmp/xenith-code-{args.name}.tar.gz'


def _code(args: argparse.Namespace) -> list[str]:
  remote = shlex.quote(args.remote_dir)
  if args.git_url:
    url, ref = shlex.quote(args.git_url), shlex.quote(args.git_ref)
    return [_on_all_workers(
        args, f'if [ -d {remote}/.git ]; then git -C {remote} fetch --quiet origin; '
        f'else git clone --quiet {url} {remote}; fi && '
        f'git -C {remote} checkout --quiet --detach {ref}')]
  tarball = _tarball(args)
  # git ls-files: tracked and untracked files, without what .gitignore names (.venv,
  # runs); --ignore-failed-read skips tracked files deleted in the working tree.
  pack = (f'git -C {shlex.quote(ROOT)} ls-files -z --cached --others --exclude-standard | '
          f'tar -C {shlex.quote(ROOT)} --null --files-from=- --ignore-failed-read '
          f'-czf {shlex.quote(tarball)}')
  name = os.path.basename(tarball)
  copy = shlex.join(_gcloud('scp', args, tarball, f'{args.name}:{name}', '--worker=all'))
  unpack = _on_all_workers(args, f'mkdir -p {remote} && tar -xzf {name} -C {remote} && '
                           f'rm {name}')
  return [pack, copy, unpack]


def _logs(args: argparse.Namespace) -> tuple[str, str, str]:
  base = f'logs/{args.log_name}'
  return f'{base}.log', f'{base}.pid', f'{base}.exit'


def _run(args: argparse.Namespace) -> str:
  log, pid, code = _logs(args)
  environment = ''.join(f'{shlex.quote(item.split("=", 1)[0])}='
                        f'{shlex.quote(item.split("=", 1)[1])} ' for item in args.env)
  line = shlex.join(main_line.main_command('.venv/bin/python', args))
  # A background subshell, deaf to the hangup that ends the ssh session, starts main.py
  # (its pid for stop and logs) and records its exit status for logs.
  return _on_all_workers(
      args, f'cd {shlex.quote(args.remote_dir)} && mkdir -p logs && '
      f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
      f'echo "$(hostname): main.py of --log_name={args.log_name} is still running" >&2; '
      f'exit 1; fi && rm -f {pid} {code} && '
      f'{{ (trap "" HUP; {environment}{line} > {log} 2>&1 & echo $! > {pid}; wait $!; '
      f'echo $? > {code}) < /dev/null > /dev/null 2>&1 & }}')


def _stop(args: argparse.Namespace) -> str:
  # SIGTERM: main.py saves a checkpoint at a step all processes agree on and exits.
  return _on_all_workers(args, f'cd {shlex.quote(args.remote_dir)} && '
                         f'kill -TERM "$(cat {_logs(args)[1]})"')


def _follow(args: argparse.Namespace) -> str:
  log, pid, code = _logs(args)
  return _on_all_workers(
      args, f'cd {shlex.quote(args.remote_dir)} && '
      f'for i in $(seq 30); do [ -s {pid} ] && break; sleep 1; done; '
      f'tail -n +1 -F --pid="$(cat {pid})" {log} 2>/dev/null | '
      f'sed -u "s/^/[$(hostname)] /"; '
      f'for i in $(seq 30); do [ -s {code} ] && break; sleep 1; done; '
      f'exit "$(cat {code} 2>/dev/null || echo 1)"')


def commands(args: argparse.Namespace) -> list[str]:
  """The shell commands of the chosen steps, in order."""
  steps = args.steps.split(',')
  out = []
  if 'create' in steps:
    out.append(shlex.join(_gcloud(
        'create', args, args.name, f'--accelerator-type={args.accelerator_type}',
        f'--version={args.version}', *(['--spot'] if args.spot else []))))
  if 'code' in steps:
    out += _code(args)
  if 'install' in steps:
    out.append(_on_all_workers(args, f'{_PYTHON_311} && cd {shlex.quote(args.remote_dir)} '
                               '&& ./launch/setup.sh --tpu'))
  if 'run' in steps:
    out.append(_run(args))
  if 'stop' in steps:
    out.append(_stop(args))
  if 'logs' in steps:
    out.append(_follow(args))
  if 'delete' in steps:
    out.append(shlex.join(_gcloud('delete', args, args.name, '--quiet')))
  return out


def main(argv: list[str]) -> int:
  parser = _parser()
  args = main_line.parse(parser, argv)
  unknown = [s for s in args.steps.split(',') if s not in STEPS]
  if unknown:
    parser.error(f'--steps: unknown {",".join(unknown)} (choose from {",".join(STEPS)})')
  for item in args.env:
    if '=' not in item or not item.split('=', 1)[0].isidentifier():
      parser.error(f'--env={item}: expected NAME=VALUE')
  return main_line.run_shell(commands(args), args.dry_run)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
