"""Helpers shared by the tests: fault injection for the trainer, tiny runs, and
the brute-force log-det / Jacobian checker."""

import os

import numpy as np
import tensorflow as tf

from rflow_tf.training.hooks import TrainingHook

#: The repository's root (train/ is importable from there).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repository_env():
    """The environment of a Python subprocess that imports ``train`` and
    ``rflow_tf`` from this repository, wherever it runs."""
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


class InjectedCrash(RuntimeError):
    """An abrupt stop of training with nothing saved, like a kill."""


class FaultInjection(TrainingHook):
    """A training hook with the faults a test asks for: ``nan_steps`` (text
    "2,5") are steps whose loss is replaced by NaN; after ``crash_step`` (0:
    never) training stops abruptly (:class:`InjectedCrash`), saving nothing,
    like a kill. Install it before the training step is built:
    ``trainer.hooks.append(FaultInjection("2"))``."""

    adjusts_loss = True

    def __init__(self, nan_steps="", crash_step=0):
        self.nan_steps = sorted({int(s) for s in str(nan_steps).split(",") if s.strip()})
        self.crash_step = int(crash_step)

    def adjust_loss(self, loss, step):
        if not self.nan_steps:
            return loss
        poisoned = tf.reduce_any(tf.equal(step, tf.constant(self.nan_steps, tf.int64)))
        return loss + tf.where(poisoned, tf.constant(np.nan, tf.float32), 0.0)

    def after_step(self, trainer, step):
        if step == self.crash_step:
            raise InjectedCrash(f"injected crash after step {step}")


def with_faults(trainer, nan_steps="", crash_step=0):
    """``trainer`` with a :class:`FaultInjection` hook installed."""
    trainer.hooks.append(FaultInjection(nan_steps, crash_step))
    return trainer
