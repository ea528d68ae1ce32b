r"""Starts a multi-host training run on Kubernetes: renders an Indexed Job with a headless
Service (launch/templates/indexed_job.yaml) and pipes it to `kubectl apply -f -`.

  python launch/kubernetes.py --name=xenith-base --image=REGISTRY/xenith:TAG \
      --num_hosts=4 --tpu_accelerator=tpu-v4-podslice --tpu_topology=2x2x4 \
      --chips_per_host=4 --config=experiments/default.py:size=base \
      --workdir=gs://bucket/runs/base -- --config.mesh.fsdp=16

One pod per host runs the same main.py line. Pod i (the Job's completion index) gets
JAX_PROCESS_ID=i, JAX_NUM_PROCESSES=--num_hosts and JAX_COORDINATOR_ADDRESS=
<name>-0.<name>:<port>, the stable DNS name the headless Service gives pod 0; main.py
reads them (xenith/distributed.py). The image must hold Xenith with its dependencies at
--code_dir; the workdir must be one every pod sees (a gs:// bucket). --dry_run prints the
manifest and the kubectl command. See docs/launchers.md.
"""

import argparse
import json
import os
import re
import string
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Run as a script.

import main_line  # pylint: disable=g-import-not-at-top

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'templates',
                        'indexed_job.yaml')
# Pod hostnames are <name>-<index>, a DNS label of at most 63 characters.
_NAME = re.compile(r'[a-z]([-a-z0-9]{0,50}[a-z0-9])?')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch/kubernetes.py', description=__doc__.split('\n')[0],
      epilog='Flags after -- (and any --config.<field>=<value>) go to main.py.')
  main_line.add_run_flags(parser)
  parser.add_argument('--name', default='xenith',
                      help='Job and Service name (lower case, digits, -).')
  parser.add_argument('--image', required=True, help='Container image with Xenith.')
  parser.add_argument('--num_hosts', type=int, default=1, help='Pods, one process each.')
  parser.add_argument('--namespace', default='default')
  parser.add_argument('--port', type=int, default=55527, help='Coordinator port on pod 0.')
  parser.add_argument('--code_dir', default='/xenith', help='Xenith\'s folder in the image.')
  parser.add_argument('--python', default='python', help='Python in the image.')
  parser.add_argument('--gpus_per_host', type=int, default=0,
                      help='nvidia.com/gpu per pod (one process sees all of them).')
  parser.add_argument('--tpu_accelerator', default=None,
                      help='GKE TPU node selector, e.g. tpu-v4-podslice.')
  parser.add_argument('--tpu_topology', default=None,
                      help='GKE TPU slice topology, e.g. 2x2x4 (a v4-32).')
  parser.add_argument('--chips_per_host', type=int, default=0,
                      help='google.com/tpu per pod, e.g. 4 on v4.')
  parser.add_argument('--cpu', default=None, help='CPU request per pod, e.g. 8.')
  parser.add_argument('--memory', default=None, help='Memory request per pod, e.g. 64Gi.')
  parser.add_argument('--node_selector', action='append', default=[], metavar='KEY=VALUE',
                      help='Extra node selector (repeatable).')
  parser.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                      help='Environment variable for main.py (repeatable).')
  parser.add_argument('--backoff_limit', type=int, default=0,
                      help='Pod failures the Job tolerates before it fails.')
  return parser


def _pairs(items: list[str], flag: str, parser: argparse.ArgumentParser) -> dict[str, str]:
  pairs = {}
  for item in items:
    if '=' not in item or not item.split('=', 1)[0]:
      parser.error(f'--{flag}={item}: expected NAME=VALUE')
    key, value = item.split('=', 1)
    pairs[key] = value
  return pairs


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  if not _NAME.fullmatch(args.name):
    parser.error(f'--name={args.name}: must be a DNS label of at most 52 characters '
                 '(lower case letters, digits and -, starting with a letter)')
  for name in ('num_hosts', 'port'):
    if getattr(args, name) < 1:
      parser.error(f'--{name}={getattr(args, name)} must be positive')
  for name in ('gpus_per_host', 'chips_per_host', 'backoff_limit'):
    if getattr(args, name) < 0:
      parser.error(f'--{name}={getattr(args, name)} must be >= 0')
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    if name in _pairs(args.env, 'env', parser):
      parser.error(f'--env={name}=...: the manifest sets it for each pod')


def values(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
  """The template's placeholders."""
  selector = {}
  if args.tpu_accelerator:
    selector['cloud.google.com/gke-tpu-accelerator'] = args.tpu_accelerator
  if args.tpu_topology:
    selector['cloud.google.com/gke-tpu-topology'] = args.tpu_topology
  selector.update(_pairs(args.node_selector, 'node_selector', parser))
  limits, requests = {}, {}
  if args.chips_per_host:
    limits['google.com/tpu'] = args.chips_per_host
  if args.gpus_per_host:
    limits['nvidia.com/gpu'] = args.gpus_per_host
  if args.cpu:
    requests['cpu'] = args.cpu
  if args.memory:
    requests['memory'] = args.memory
  resources = {k: v for k, v in (('limits', limits), ('requests', requests)) if v}
  return {
      'name': args.name, 'namespace': args.namespace, 'image': args.image,
      'num_hosts': args.num_hosts, 'num_hosts_text': str(args.num_hosts),
      'port': args.port, 'backoff_limit': args.backoff_limit, 'code_dir': args.code_dir,
      'coordinator': f'{args.name}-0.{args.name}:{args.port}',
      'command': main_line.main_command(args.python, args),
      'node_selector': selector, 'resources': resources,
      'extra_env': [{'name': k, 'value': v}
                    for k, v in _pairs(args.env, 'env', parser).items()],
  }


def render(template: str, fields: dict) -> str:
  """Fills `${field}`s with JSON (a subset of YAML, so any value is quoted right); a
  field alone on its line that holds a list becomes one `- item` line per element."""
  lines = []
  for line in template.splitlines():
    alone = re.fullmatch(r'(\s*)\$\{(\w+)\}', line)
    if alone and isinstance(fields[alone[2]], list):
      lines += [f'{alone[1]}- {json.dumps(item)}' for item in fields[alone[2]]]
    else:
      lines.append(line)
  text = '\n'.join(lines) + '\n'
  return string.Template(text).substitute({k: json.dumps(v) for k, v in fields.items()})


def main(argv: list[str]) -> int:
  parser = _parser()
  args = main_line.parse(parser, argv)
  _check(args, parser)
  with open(TEMPLATE, encoding='utf-8') as f:
    manifest = render(f.read(), values(args, parser))
  return main_line.run_with_input(['kubectl', 'apply', '-f', '-'], manifest, args.dry_run)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
