"""The import structure of `xenith/`, read from the source with `ast` (function-level
imports included): the plain decoder knows no memory, the data pipeline knows no model,
and no module imports itself back through others.

An import edge goes from a module to the module it names: `from xenith.model import
memory` to `xenith.model.memory`, `from xenith.errors import DataError` to
`xenith.errors`. The parent packages' `__init__` that Python runs on the way are not
edges of their own (each is a module with its own edges).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'xenith'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _is_module(name: str) -> bool:
  path = ROOT.joinpath(*name.split('.'))
  return path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def _imports(path: pathlib.Path) -> set[str]:
  """The xenith modules `path` imports anywhere in its body."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: from the package `level` - 1 up.
        package = _module_name(path if path.name == '__init__.py' else path.parent)
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        out.add(sub if _is_module(sub) else base)
  return {m for m in out if m == 'xenith' or m.startswith('xenith.')}


def _graph() -> dict[str, set[str]]:
  return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob('*.py'))}


def _reach(graph, start: str) -> dict[str, list[str]]:
  """{module: one import chain from `start` to it} for every module `start` reaches."""
  paths = {start: [start]}
  todo = [start]
  while todo:
    module = todo.pop()
    for dep in sorted(graph.get(module, ())):
      if dep not in paths:
        paths[dep] = paths[module] + [dep]
        todo.append(dep)
  return paths


def test_the_graph_sees_function_level_and_from_imports():
  graph = _graph()
  # main's modes import lazily; so does xenith/__init__ (from_pretrained on first use).
  assert 'xenith.hf' in graph['xenith']
  assert {'xenith.model.memory', 'xenith.model.transformer'} <= graph['xenith.model.build']
  assert 'xenith.errors' in graph['xenith.data.pipeline']
  assert len(graph) > 50


def test_the_plain_decoder_does_not_reach_memory():
  reach = _reach(_graph(), 'xenith.model.transformer')
  memory = [m for m in reach if m.startswith('xenith.model.memory')]
  assert not memory, ' -> '.join(reach[memory[0]])


def test_the_data_pipeline_reaches_no_model():
  graph = _graph()
  for module in (m for m in graph if m.startswith('xenith.data')):
    reach = _reach(graph, module)
    model = [m for m in reach if m.startswith('xenith.model')]
    assert not model, ' -> '.join(reach[model[0]])


def test_no_import_cycles():
  graph = _graph()
  for module in graph:
    for dep in graph[module]:
      back = _reach(graph, dep)
      assert module not in back, ' -> '.join([module] + back[module])


@pytest.mark.parametrize('bad, message', [
    ('from xenith.model import memory\n', 'xenith.model.memory'),
    ('def f():\n  from xenith.model import moe\n', 'xenith.model.moe'),
])
def test_a_planted_import_is_seen(tmp_path, bad, message):
  """The walker finds imports at module level and inside functions."""
  path = tmp_path / 'planted.py'
  path.write_text(bad)
  assert message in _imports(path)
