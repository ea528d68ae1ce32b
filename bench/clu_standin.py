"""A stand-in for the part of `clu.metrics` that xenith/train/metrics.py uses.

The accelerator check (`accelerator.py`) must run on GPU images that have jax, flax and
optax but no CLU, and xenith's train step returns its metrics as `clu.metrics`
collections. `install()` registers this module as `clu.metrics` only when CLU cannot be
imported. It has what xenith/train/metrics.py builds on (`Metric` with `from_output` /
`from_fun`, `Average`, `LastValue`, `Collection` with `single_from_model_output`,
`merge`, `compute`) with CLU's semantics for them (masks, merging, the values computed;
tests/test_accelerator_bench.py compares the two); nothing else of CLU. The metrics are
a few scalars per step, so a step costs the same with either.

It is also a pytest plugin (`-p clu_standin`, with this folder on PYTHONPATH) so that the
test files that import the train step collect on such an image. It imports jax when
pytest loads it, before tests/conftest.py sets JAX_PLATFORMS: the caller sets it.
"""

from collections.abc import Mapping
import dataclasses
import sys
import types

import flax
import jax.numpy as jnp


def _mask_for(values, mask):
  """`mask` if its leading dimension matches `values`' (as CLU forwards it), else None."""
  if mask is None or (jnp.shape(values) or (0,))[0] != mask.shape[0]:
    return None
  return mask


@flax.struct.dataclass
class Metric:
  """Base class: `from_model_output`, `merge` and `compute` come from subclasses."""

  @classmethod
  def from_model_output(cls, *args, **kwargs) -> 'Metric':
    raise NotImplementedError(cls.__name__)

  def merge(self, other: 'Metric') -> 'Metric':
    raise NotImplementedError(type(self).__name__)

  def compute(self):
    raise NotImplementedError(type(self).__name__)

  @classmethod
  def from_output(cls, name: str):
    """This metric of the model output `name` (and its `mask`)."""

    @flax.struct.dataclass
    class FromOutput(cls):

      @classmethod
      def from_model_output(klass, **outputs):
        values = jnp.asarray(outputs[name])
        return super().from_model_output(values, mask=_mask_for(values, outputs.get('mask')))

    return FromOutput

  @classmethod
  def from_fun(cls, fun):
    """This metric of `fun(**model_output)`: an array, or a dict of keyword arguments
    (whose 'mask', if any, replaces the model output's)."""

    @flax.struct.dataclass
    class FromFun(cls):

      @classmethod
      def from_model_output(klass, **outputs):
        mask, out = outputs.get('mask'), fun(**outputs)
        if isinstance(out, Mapping):
          out = dict(out)
          mask = out.pop('mask', mask)
          mask = _mask_for(next(iter(out.values())), mask)
          return super().from_model_output(**out, mask=mask)
        return super().from_model_output(out, mask=_mask_for(out, mask))

    return FromFun


@flax.struct.dataclass
class Average(Metric):
  """Mean of all unmasked entries; a mask covers the leading dimensions of the values."""
  total: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def from_model_output(cls, values, mask=None, **_) -> 'Average':
    values = jnp.atleast_1d(jnp.asarray(values))
    if mask is None:
      mask = jnp.ones(values.shape, bool)
    mask = jnp.asarray(mask, bool)
    mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)),
                            values.shape)
    return cls(total=jnp.where(mask, values, jnp.zeros_like(values)).sum(),
               count=mask.sum(dtype=jnp.int32))

  def merge(self, other: 'Average') -> 'Average':
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self):
    return self.total / self.count


@flax.struct.dataclass
class LastValue(Metric):
  """The latest value (averaged over its unmasked leading entries); merging keeps the newer."""
  total: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def from_model_output(cls, value, mask=None, **_) -> 'LastValue':
    value = jnp.asarray(value)
    if mask is None:
      mask = jnp.ones(value.shape[:1], bool)
    mask = jnp.asarray(mask, bool)
    return cls(total=jnp.where(mask, value, jnp.zeros_like(value)).sum(),
               count=mask.sum(dtype=jnp.int32))

  def merge(self, other: 'LastValue') -> 'LastValue':
    return other

  def compute(self):
    return self.total / self.count


@flax.struct.dataclass
class Collection:
  """Metrics named by the subclass's fields, each built from the same model outputs."""

  @classmethod
  def single_from_model_output(cls, **outputs) -> 'Collection':
    return cls(**{f.name: f.type.from_model_output(**outputs) for f in dataclasses.fields(cls)})

  def merge(self, other: 'Collection') -> 'Collection':
    return type(self)(**{f.name: getattr(self, f.name).merge(getattr(other, f.name))
                         for f in dataclasses.fields(self)})

  def compute(self) -> dict:
    return {f.name: getattr(self, f.name).compute() for f in dataclasses.fields(self)}


def install() -> str:
  """Registers this module as `clu.metrics` unless CLU imports; says which is in use."""
  try:
    import clu.metrics  # pylint: disable=g-import-not-at-top,import-outside-toplevel,unused-import
    return 'clu'
  except Exception as e:  # pylint: disable=broad-except  (absent, or broken on this jax)
    reason = f'{type(e).__name__}: {e}'
  package = types.ModuleType('clu')
  package.__path__ = []  # A package, so that `from clu import metrics` resolves.
  package.metrics = sys.modules[__name__]
  sys.modules['clu'] = package
  sys.modules['clu.metrics'] = sys.modules[__name__]
  return f'stand-in (bench/clu_standin.py; clu.metrics: {reason})'


def pytest_configure(config):
  config.clu_metrics = install()


def pytest_report_header(config):
  return f'clu.metrics: {config.clu_metrics}'
