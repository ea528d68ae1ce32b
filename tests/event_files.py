"""Reads scalars back from the TensorBoard event files that the CLU writers wrote."""

import collections
import glob
import os

import numpy as np


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} in file order; a resumed run repeats steps it redid."""
  # TensorFlow is imported lazily: only reading event files needs it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  scalars = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        # CLU writes scalars as tensors (TF2 summaries), not simple_value.
        if value.HasField('tensor') and value.metadata.plugin_data.plugin_name == 'scalars':
          scalars[value.tag].append((event.step, float(np.asarray(
              tf.make_ndarray(value.tensor)))))
  return dict(scalars)


def last_per_step(points: list[tuple[int, float]]) -> dict[int, float]:
  """The last value written for each step (after a resume, the redone step's value)."""
  return {step: value for step, value in points}
