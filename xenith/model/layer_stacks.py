"""How `scan_layers` groups a decoder's layers into scanned stacks, and their params.

A scan repeats one module, so a deep model whose layers differ (a full-attention prefix,
windows that take turns by layer, dense layers before or between MoE layers) is cut into
consecutive stacks, each the repetition of a unit of one or more consecutive layers:

  64 layers: 8 dense full-attention, then MoE layers whose windows take turns 512/1024/2048
  -> layers 0-7 (unit 1 x 8), 8 and 9 (1 x 1 each), 10-63 (unit 3 x 18: a layer per window)

Compile time then grows with the layers in the units, not with depth. `plan` picks the
cut that compiles the fewest layers (each stack's unit once; ties: fewer stacks), units
of up to `MAX_UNIT` layers, a unit of several layers only where it repeats. Layers may share a stack position when they have the same
`layer_kind`.

Param names: a unit-1 stack is the scanned block itself, `<stack>/<block params>`; a
longer unit is a `LayerGroup` of blocks `<stack>/block_<j>/...` (j-th layer of the unit),
every param with a leading axis of length `repeats`. The stacks are named `layers` (one
stack of every layer), `dense_layers` + `moe_layers` (a MoE model's dense prefix and its
MoE layers: the layouts that existed before general stacks), else `layers_<first>_<last>`.
Unscanned models name their blocks `block_<i>`. `split_layers` / `join_layers` convert
between the layouts (import, export, `scan_layers` on or off for the same weights).

Sizing (`xenith/sizing/compiled.py`): under `sizing_repeats({stack name: n})` `plan` gives
each stack n repeats (1 for stacks not named) and marks it `unrolled`, so that the
decoder builds a shallower model whose scans XLA's cost analysis counts layer by layer
(it counts a loop's body once, whatever its trip count).
"""

import contextlib
import dataclasses

import ml_collections
import numpy as np

from xenith.model import attention_pattern
from xenith.model import moe

MAX_UNIT = 16  # Longest repeating unit searched for (e.g. lcm of windows and moe_every).
_SIZING_REPEATS: dict[str, int] | None = None  # Set by `sizing_repeats`.


@dataclasses.dataclass(frozen=True)
class Stack:
  """`repeats` repetitions of the `unit` layers from `first` on, scanned as `name`."""
  name: str
  first: int
  unit: int
  repeats: int
  unrolled: bool = False  # Scan without a loop (`sizing_repeats`), so XLA counts every layer.

  def layer(self, repeat: int, j: int) -> int:
    """The model layer at repetition `repeat`, position `j` of the unit."""
    return self.first + repeat * self.unit + j

  @property
  def end(self) -> int:
    return self.first + self.unit * self.repeats


def _reads_bank(config: ml_collections.FrozenConfigDict, layer: int) -> bool:
  """`memory.config.is_memory_layer`, restated: the plain decoder does not import the
  memory package (tests/test_architecture.py), yet its stacks must tell these apart."""
  mem = config.get('memory') if hasattr(config, 'get') else None
  return mem is not None and mem.chunk_size > 0 and layer in tuple(mem.layers)


def layer_kind(config: ml_collections.FrozenConfigDict, layer: int) -> tuple:
  """What makes `layer` different from others: MLP or MoE, attention pattern, memory."""
  return (moe.is_moe_layer(config, layer), attention_pattern.layer_key(config, layer),
          _reads_bank(config, layer))


def _repeats(kinds: list, start: int, unit: int) -> int:
  """How many times kinds[start:start + unit] repeats from `start` on."""
  pattern = kinds[start:start + unit]
  count = 0
  while (start + (count + 1) * unit <= len(kinds)
         and kinds[start + count * unit:start + (count + 1) * unit] == pattern):
    count += 1
  return count


def _legacy_names(config, spans: list[tuple[int, int, int]]) -> list[str] | None:
  """The names of the stack layouts that predate general stacks, when `spans` is one."""
  if any(unit != 1 for _, unit, _ in spans):
    return None
  if len(spans) == 1 and not moe.enabled(config):
    return ['layers']
  num_dense = config.moe.first_dense_layers if moe.enabled(config) else 0
  moe_span = (num_dense, 1, config.num_layers - num_dense)
  if moe.enabled(config) and spans == ([(0, 1, num_dense)] if num_dense else []) + [moe_span]:
    return (['dense_layers'] if num_dense else []) + ['moe_layers']
  return None


def plan(config: ml_collections.FrozenConfigDict) -> tuple[Stack, ...]:
  """The scanned stacks that make up the model's layers, in order (module docstring)."""
  kinds = [layer_kind(config, i) for i in range(config.num_layers)]
  num = len(kinds)
  # best[i]: (layers compiled, stacks, first span) for layers i.. (dynamic programming
  # from the end): a stack compiles its unit once, so the cost is the units' lengths.
  best = [None] * num + [(0, 0, None)]
  for start in range(num - 1, -1, -1):
    for unit in range(1, min(MAX_UNIT, num - start) + 1):
      # A unit of several layers only when it repeats: once, it is single-layer stacks.
      for repeats in range(1 if unit == 1 else 2, _repeats(kinds, start, unit) + 1):
        rest = best[start + unit * repeats]
        cost = (unit + rest[0], 1 + rest[1], (start, unit, repeats))
        if best[start] is None or cost[:2] < best[start][:2]:
          best[start] = cost
  spans = []  # (first, unit, repeats)
  start = 0
  while start < num:
    spans.append(best[start][2])
    start += spans[-1][1] * spans[-1][2]
  names = _legacy_names(config, spans) or [
      f'layers_{first}' if unit * repeats == 1 else f'layers_{first}_{first + unit * repeats - 1}'
      for first, unit, repeats in spans]
  stacks = tuple(Stack(name, *span) for name, span in zip(names, spans))
  if _SIZING_REPEATS is not None:
    stacks = tuple(dataclasses.replace(s, repeats=_SIZING_REPEATS.get(s.name, 1), unrolled=True)
                   for s in stacks)
  return stacks


@contextlib.contextmanager
def sizing_repeats(repeats: dict[str, int]):
  """Within it, `plan` gives stack `name` repeats[name] repeats (default 1), unrolled.

  For sizing only (the model is shallower than its config says; `split_layers` and
  `join_layers` would be wrong): models built and traced inside see these stacks.
  """
  global _SIZING_REPEATS
  previous, _SIZING_REPEATS = _SIZING_REPEATS, dict(repeats)
  try:
    yield
  finally:
    _SIZING_REPEATS = previous


def layer_prefixes(config: ml_collections.ConfigDict) -> list[tuple[str, ...]]:
  """The param-path prefixes under which blocks live, as `config.scan_layers` says:
  ('block_<i>',) unscanned; a stack's name, or (name, 'block_<j>') in a longer unit."""
  config = ml_collections.FrozenConfigDict(config)
  if not config.scan_layers:
    return [(f'block_{i}',) for i in range(config.num_layers)]
  return list(_stack_prefixes(config))


def _stack_prefixes(config) -> dict[tuple, tuple[Stack, int]]:
  """{param-path prefix of unit position j: (stack, j)} of the scanned layout."""
  out = {}
  for stack in plan(config):
    for j in range(stack.unit):
      out[(stack.name,) if stack.unit == 1 else (stack.name, f'block_{j}')] = (stack, j)
  return out


def split_layers(flat: dict, config: ml_collections.ConfigDict) -> tuple[list[dict], dict]:
  """(one {path: array} per layer, the other params) from flat params (path tuples ->
  arrays) laid out as `config.scan_layers` says."""
  config = ml_collections.FrozenConfigDict(config)
  blocks = [{} for _ in range(config.num_layers)]
  rest = {}
  if not config.scan_layers:
    names = {f'block_{i}': i for i in range(config.num_layers)}
    for path, value in flat.items():
      if path[0] in names:
        blocks[names[path[0]]][path[1:]] = value
      else:
        rest[path] = value
    return blocks, rest
  prefixes = _stack_prefixes(config)
  for path, value in flat.items():
    found = next(((p, s) for p, s in prefixes.items() if path[:len(p)] == p), None)
    if found is None:
      rest[path] = value
      continue
    prefix, (stack, j) = found
    for r in range(stack.repeats):
      blocks[stack.layer(r, j)][path[len(prefix):]] = value[r]
  return blocks, rest


def join_layers(blocks: list[dict], rest: dict, config: ml_collections.ConfigDict,
                scan_layers: bool) -> dict:
  """Flat params from per-layer params (`split_layers`), laid out as `scan_layers` says
  (stacked with NumPy, so this is for host arrays: checkpoints, import, export)."""
  flat = dict(rest)
  if not scan_layers:
    for i, block in enumerate(blocks):
      flat.update({(f'block_{i}',) + k: v for k, v in block.items()})
    return flat
  config = ml_collections.FrozenConfigDict(config)
  for prefix, (stack, j) in _stack_prefixes(config).items():
    for key in blocks[stack.first + j]:
      flat[prefix + key] = np.stack([blocks[stack.layer(r, j)][key]
                                     for r in range(stack.repeats)])
  return flat
