"""Imports rflow_tf before TensorFlow so the tests run under the same
TensorFlow runtime defaults (see ``rflow_tf/__init__.py``) as its users."""

import rflow_tf  # noqa: F401, I001  (first: it sets TensorFlow's runtime defaults)

import os

import pytest
import tensorflow as tf


def _tb_scalars(run_dir, tag):
    """{step: value} of a scalar written by the trainer to <run_dir>/tb."""
    out = {}
    tb = os.path.join(run_dir, "tb")
    for name in sorted(os.listdir(tb)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(tb, name)):
            for v in event.summary.value:
                if v.tag == tag:
                    out[event.step] = (
                        float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                    )
    return out


@pytest.fixture
def tb_scalars():
    """The reader of the trainer's TensorBoard scalars: ``tb_scalars(run_dir, tag)``
    gives {step: value}."""
    return _tb_scalars
