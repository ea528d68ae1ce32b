"""Xenith entry point.

  python main.py --config=experiments/default.py --workdir=runs/default
  python main.py --config=experiments/default.py:size=tiny --workdir=runs/tiny \
      --config.num_train_steps=100 --config.model.num_layers=3

Running the same command again resumes from the workdir's latest checkpoint.

  python main.py --config=experiments/xenith_mini.py --mode=describe --num_devices=16 --compile

sizes a config for 16 devices without them; --compile adds XLA's per-device memory and
FLOPs of the real train step, compiled for 16 simulated CPU devices (docs/describe.md).

  python main.py --mode=import_hf --hf_dir=<HF Mixtral/Mistral dir> --workdir=runs/imported
  python main.py --mode=export_hf --workdir=runs/imported --hf_dir=<out dir>
  python main.py --config=experiments/default.py --workdir=runs/default --mode=generate \
      --prompt='ROMEO:' --max_new_tokens=100 --temperature=0.8

With a memory model (config.model.memory), --memory_bank=<file.npz> continues the document
saved there by the previous call and saves it again.

import_hf writes the Xenith config (xenith_config.json, config.py) and the params as an
Orbax checkpoint (checkpoints/0); export_hf writes config.json + model.safetensors from
the workdir's newest params (pass --config for a training run's workdir): the Hugging Face
format, or for a model it cannot express Xenith's native one (a warning says why), which
xenith.from_pretrained loads.

A run over several processes (hosts) starts this same line on each; they find each other
through --coordinator_address / --num_processes / --process_id or the cluster's
environment (see xenith/distributed.py and docs/multihost.md).
"""

import json
import math
import os
import pickle
import subprocess
import sys
import tempfile

from xenith import config_errors
from xenith import console
from xenith import host_memory
from xenith import sigterm

if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()  # Before anything runs (see xenith/host_memory.py).

sigterm.install()  # Next: a SIGTERM during start-up is remembered (see xenith/sigterm.py).
_VERBOSE = console.setup_from_argv()  # Before TensorFlow (CLU's writers) is imported.

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from xenith import distributed
from xenith import errors
from xenith import storage
from xenith.config_validation import validate

host_memory.trim_after_compiles()  # Compilers' freed memory back to the OS (see there).

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally with an argument: '
    'experiments/default.py:size=tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, TensorBoard logs and final metrics.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'describe', 'generate', 'classify', 'import_hf', 'export_hf',
                      'eval', 'lm_eval'],
    'train: train and evaluate in --workdir, resuming if it has a checkpoint. describe: '
    'print parameters, FLOPs per token and memory per device, allocating nothing. '
    'import_hf: Hugging Face Mixtral/Mistral checkpoint --hf_dir -> Xenith config and '
    'Orbax checkpoint in --workdir. export_hf: newest params in --workdir -> Hugging Face '
    'checkpoint --hf_dir (config from the import, or --config; Xenith\'s native format '
    'for a model HF cannot express). generate: continue '
    '--prompt with the newest params in --workdir and print the text. classify: label '
    'each text of --input with a classification run\'s newest checkpoint in --workdir. '
    'eval: a checkpoint of --workdir on any data source and split (docs/eval.md). '
    'lm_eval: lm-evaluation-harness --tasks on the newest checkpoint of --workdir.')
_HF_DIR = flags.DEFINE_string(
    'hf_dir', None, 'import_hf / export_hf: the Hugging Face checkpoint directory '
    '(config.json + *.safetensors) to read / write.')
_PROMPT = flags.DEFINE_string('prompt', '', 'generate: the text to continue.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 100, 'generate: tokens to add.',
                                       lower_bound=1)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'generate: 0 = greedy, > 0 samples.',
                                  lower_bound=0.0)
_TOP_K = flags.DEFINE_integer('top_k', 0, 'generate: sample among the k likeliest tokens; '
                              '0 = all.', lower_bound=0)
_INPUT = flags.DEFINE_string(
    'input', None, 'classify: the texts, one per line of a text file, the "text" field '
    'of each line of a .jsonl file, or - for standard input.')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'classify: also write one JSON object per text ({"text", "label", '
    '"probabilities"}) to this .jsonl file.')
_MEMORY_BANK = flags.DEFINE_string(
    'memory_bank', None, 'generate, memory models: continue from the memory state saved '
    'in this .npz (if it exists; the prompt then gets no BOS) and save the state after '
    'the output there, so the next call continues the same document.')
_CHECKPOINT_STEP = flags.DEFINE_integer(
    'checkpoint_step', None, 'eval, lm_eval: the checkpoint step to evaluate (default: '
    'the newest).', lower_bound=0)
_SPLIT = flags.DEFINE_string('split', None, 'eval: the split to evaluate (sets '
                             'config.data.eval_split).')
_EVAL_NAME = flags.DEFINE_string(
    'eval_name', None, 'eval: names the results: eval/<name>_step<N>.json and the '
    'TensorBoard tags eval_<name>/... (default: <source>_<split>).')
_TASKS = flags.DEFINE_list('tasks', [], 'lm_eval: the harness tasks to run.')
_INCLUDE_PATH = flags.DEFINE_string(
    'include_path', None, 'lm_eval: a folder of task YAMLs to add to the harness\'s own.')
_NUM_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'lm_eval: few-shot examples '
                                    '(default: each task\'s).', lower_bound=0)
_LIMIT = flags.DEFINE_integer('limit', None, 'lm_eval: at most this many documents per '
                              'task.', lower_bound=1)
_ALLOW_CHANGES = flags.DEFINE_list(
    'allow_changes', [], 'train: resume although these differ from what the workdir was '
    'trained with: config fields or prefixes (num_train_steps, optimizer), tokenizer, '
    'data. Without it such a resume stops and names what changed.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process runs: host:port of process 0\'s '
    'coordinator (default: $JAX_COORDINATOR_ADDRESS, or what JAX detects on SLURM, Cloud '
    'TPU, Open MPI or Kubernetes).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-process runs: how many processes the run spans '
    '(default: $JAX_NUM_PROCESSES, or detected).', lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-process runs: this process\'s index in [0, '
    'num_processes) (default: $JAX_PROCESS_ID, or detected).', lower_bound=0)
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'describe: size the mesh for this many devices (default: the '
    'devices present).', lower_bound=1)
_COMPILE = flags.DEFINE_bool(
    'compile', False, 'describe: also compile the real train step for the mesh on '
    '--num_devices simulated CPU devices (a child process) and print XLA\'s memory per '
    'device and FLOPs per token beside the estimates (xenith/sizing/compiled.py).')


def _workdir_config(argv):
  """eval / lm_eval with `--config.*` overrides but no --config: the overrides apply to
  the workdir's own config (xenith/eval/workdir_config.py)."""
  modes = ('--mode=eval', '--mode=lm_eval')
  if (not any(a in modes for a in argv) or not config_errors.overrides(argv)
      or any(a.startswith('--config=') for a in argv)):
    return argv
  workdir = [a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')]
  if not workdir:
    return argv
  from xenith.eval import workdir_config  # pylint: disable=g-import-not-at-top
  return [argv[0], f'--config={workdir_config.__file__}:{workdir[-1]}', *argv[1:]]


def parse_flags(argv):
  """absl's flag parsing, with config-file and unknown-field failures as one line."""
  argv = _workdir_config(argv)
  try:
    argv = flags.FLAGS(argv)
    if _CONFIG.value is not None:  # Optional for import_hf / export_hf only.
      _CONFIG.value.keys()  # A config file that failed to load raises only when used.
    return argv
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):  # get_config(arg) raised.
      sys.exit('Invalid config: ' + config_errors.config_file_error(
          e, _config_flag(argv)))
    sys.exit(f'Invalid flags: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field.
    sys.exit('Invalid config: ' + config_errors.unknown_field(e, argv))
  except OSError as e:  # ml_collections: the config file did not load.
    cause = e.__cause__ or e
    reason = [line.strip() for line in str(cause).splitlines() if line.strip()][-1]
    sys.exit(f'Invalid flags: --config={flags.FLAGS["config"].config_filename}: {reason}')


def _config_flag(argv) -> str:
  """The --config value as given (`--config=x` or `--config x`)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return '?'


class _ProcessPrefix(logging.logging.Filter):
  """Starts each log line with the process index when the run spans processes."""

  def __init__(self, index: int, count: int):
    super().__init__()
    self._prefix = f'[process {index}/{count}] '

  def filter(self, record):
    if not str(record.msg).startswith(self._prefix):
      record.msg = self._prefix + str(record.msg)
    return True


_ONE_PROCESS_MODES = ('generate', 'classify', 'import_hf', 'export_hf', 'lm_eval')


def _join_processes() -> None:
  """`jax.distributed` for a run that spans processes (xenith/distributed.py)."""
  settings = distributed.Settings.from_flags(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not distributed.spans_processes(settings):
    return
  if _MODE.value in _ONE_PROCESS_MODES:
    raise errors.FlagError(f'--mode={_MODE.value} runs in one process; start it '
                           'without --num_processes / a multi-process job.')
  distributed.initialize(settings)
  logging.get_absl_handler().addFilter(
      _ProcessPrefix(jax.process_index(), jax.process_count()))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.configure(_VERBOSE)  # Short lines, no library chatter unless --verbosity=1.
  modes = {'train': _train, 'describe': _describe, 'generate': _generate,
           'classify': _classify, 'import_hf': _import_hf, 'export_hf': _export_hf,
           'eval': _eval, 'lm_eval': _lm_eval}
  if _MODE.value != 'train':
    sigterm.restore_default()  # Only training has a safe point to stop at.
  try:
    if _COMPILE.value and _MODE.value != 'describe':
      raise errors.FlagError(f'--compile works with --mode=describe only, not --mode={_MODE.value}.')
    _join_processes()
    modes[_MODE.value]()
  except errors.XenithError as e:  # Bad input: one line, no traceback.
    label = ('Invalid config' if isinstance(e, errors.ConfigError) else
             'Invalid flags' if isinstance(e, errors.FlagError) else type(e).__name__)
    if isinstance(e, errors.ConfigError) and not distributed.is_primary():
      sys.exit(1)  # Every process finds the same config error; process 0 reports it.
    prefix = f'[process {jax.process_index()}] ' if jax.process_count() > 1 else ''
    sys.exit(f'{prefix}{label}: {e}')


def _config(num_devices=None):
  """--config, checked for `num_devices` (default: the devices present)."""
  if _CONFIG.value is None:
    raise app.UsageError(f'--config is required for --mode={_MODE.value}.')
  validate(_CONFIG.value, num_devices or jax.device_count(), jax.process_count())
  return _CONFIG.value


def _workdir():
  if not _WORKDIR.value:
    raise app.UsageError(f'--workdir is required for --mode={_MODE.value}.')
  workdir = storage.make_workdir(_WORKDIR.value)  # A local path or gs:// (storage.py).
  logging.info('JAX devices: %s', jax.devices())
  return workdir


def _train():
  config = _config()
  from xenith.train import loop  # Heavy imports (TensorFlow via CLU) only when training.
  loop.train_and_evaluate(config, _workdir(), allow_changes=tuple(_ALLOW_CHANGES.value))


def _describe():
  from xenith.sizing import describe  # pylint: disable=g-import-not-at-top
  num_devices = _NUM_DEVICES.value or jax.device_count()  # All processes' devices.
  try:
    config = _config(num_devices)
  except errors.ConfigError as e:
    if _NUM_DEVICES.value or not e.field.startswith('mesh'):
      raise
    # Sizing a run for a bigger machine is what describe is for: say how.
    fixed = math.prod(int(v) for v in _CONFIG.value.mesh.values() if int(v) > 0)
    raise errors.ConfigError(e.field, f'{str(e).split(": ", 1)[1]}; describe sizes it for '
                             f'another machine with --num_devices=N (e.g. '
                             f'--num_devices={fixed})') from None
  text = describe.format_description(flags.FLAGS['config'].config_filename,
                                     describe.describe(config, num_devices))
  if distributed.is_primary():  # One copy of the table for the whole job.
    print(text, flush=True)
    if _COMPILE.value:
      print('\n' + _compiled_description(num_devices))


def _compiled_description(num_devices: int) -> str:
  """XLA's figures for the train step on `num_devices` simulated CPU devices, beside
  describe's: in a child process, which sets the device count before importing jax."""
  from xenith.sizing import compiled  # pylint: disable=g-import-not-at-top
  from xenith.sizing import describe  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as tmp:
    config_path, out_path = os.path.join(tmp, 'config.pkl'), os.path.join(tmp, 'out.json')
    with open(config_path, 'wb') as f:
      pickle.dump(config, f)
    child = subprocess.run(
        [sys.executable, '-m', 'xenith.sizing.compiled', config_path, str(num_devices),
         out_path], env=compiled.child_environment(dict(os.environ), num_devices),
        cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    if child.returncode:
      raise errors.XenithError(f'--compile: the child compile failed; its stderr ends:\n'
                               f'{child.stderr[-3000:]}')
    with open(out_path) as f:
      result = json.load(f)
  return compiled.format_comparison(describe.describe(config, num_devices), result)


def _generate():
  config = _config()
  from xenith import generate  # pylint: disable=g-import-not-at-top
  print(generate.generate_text(
      config, _workdir(), _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, memory_bank=_MEMORY_BANK.value))


def _classify():
  from xenith import text_classifier as classify  # pylint: disable=g-import-not-at-top
  if not _WORKDIR.value or not _INPUT.value:
    raise app.UsageError('--mode=classify needs --workdir and --input.')
  texts = classify.read_texts(_INPUT.value)  # Bad input fails before the model loads.
  config = _config() if _CONFIG.value is not None else None  # None: the workdir's run.json.
  predictions = classify.classify(_WORKDIR.value, texts, config)
  for text, p in zip(texts, predictions):
    probabilities = ' '.join(f'{label}={q:.3f}' for label, q in p.probabilities.items())
    snippet = text.replace('\n', ' ')
    print(f'{p.label}\t{probabilities}\t{snippet[:60]}{"..." * (len(snippet) > 60)}')
  if _OUTPUT.value:
    classify.write_jsonl(_OUTPUT.value, texts, predictions)
    print(f'Wrote {len(texts)} predictions to {_OUTPUT.value}.')


def _eval():
  from xenith.eval import standalone  # pylint: disable=g-import-not-at-top
  if not _WORKDIR.value:
    raise app.UsageError('--mode=eval needs --workdir.')
  config = _CONFIG.value  # None: the workdir's run.json.
  result = standalone.evaluate(_WORKDIR.value, config, step=_CHECKPOINT_STEP.value,
                               split=_SPLIT.value, name=_EVAL_NAME.value)
  if distributed.is_primary():
    print(standalone.format_table(result), flush=True)


def _lm_eval():
  from xenith.eval import lm_eval_adapter  # pylint: disable=g-import-not-at-top
  if not _WORKDIR.value or not _TASKS.value:
    raise app.UsageError('--mode=lm_eval needs --workdir and --tasks.')
  table, path = lm_eval_adapter.run_tasks(
      _WORKDIR.value, _TASKS.value, config=_CONFIG.value, step=_CHECKPOINT_STEP.value,
      include_path=_INCLUDE_PATH.value, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value)
  print(table)
  print(f'Written to {path}')


def _hf_dirs():
  if not _HF_DIR.value or not _WORKDIR.value:
    raise app.UsageError(f'--mode={_MODE.value} needs --hf_dir and --workdir.')
  return _HF_DIR.value, _WORKDIR.value


def _import_hf():
  from xenith import hf  # pylint: disable=g-import-not-at-top
  hf_dir, workdir = _hf_dirs()
  config = hf.import_to_workdir(hf_dir, workdir)
  config_py = os.path.join(storage.check_supported(workdir), hf.CONFIG_PY)
  print(f'Imported {hf_dir} into {workdir}: {config.model.num_layers} layers, embed '
        f'{config.model.embed_dim}, {config.model.moe.num_experts or "no"} experts. '
        f'Fine-tune with --config={config_py} --workdir=<new dir>.')


def _export_hf():
  from xenith import hf  # pylint: disable=g-import-not-at-top
  hf_dir, workdir = _hf_dirs()
  # A model HF cannot express is written in Xenith's native format; why is logged.
  if hf.export_from_workdir(workdir, hf_dir, _CONFIG.value):
    print(f"Exported {workdir} to {hf_dir} in Xenith's native format (Hugging Face "
          'cannot express the model; load it with xenith.from_pretrained).')
  else:
    print(f'Exported {workdir} to {hf_dir}.')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
