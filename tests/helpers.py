"""Helpers shared by the tests: fault injection for the trainer, tiny runs, and
the brute-force log-det / Jacobian checker."""

import json
import os
import subprocess
import sys

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


def jacobian(fn, x, per_example=False, use_pfor=True):
    """The full Jacobian of ``fn`` at each example of ``x``, each event
    flattened: numpy ``[batch, d_out, d_in]``, in ``x``'s dtype.

    ``per_example``: one call of ``fn`` on a batch of one per example (for maps
    that do not treat a batch's examples apart), in a graph function traced
    once for all examples (``fn`` must be traceable); ``use_pfor=False``: the
    tape's while-loop Jacobian, for ops pfor cannot vectorise."""
    x = tf.convert_to_tensor(x)
    if per_example:
        one = tf.function(lambda xi: _batch_jacobian(fn, xi, use_pfor))
        return np.concatenate([one(x[i : i + 1]).numpy() for i in range(x.shape[0])])
    return _batch_jacobian(fn, x, use_pfor).numpy()


def _batch_jacobian(fn, x, use_pfor):
    """The Jacobians of ``fn`` at the examples of ``x``, events flattened: [batch, d_out, d_in]."""
    with tf.GradientTape(persistent=not use_pfor) as tape:
        tape.watch(x)
        y = tf.reshape(fn(x), [x.shape[0], -1])
    jac = tape.batch_jacobian(y, x, experimental_use_pfor=use_pfor)
    return tf.reshape(jac, [x.shape[0], y.shape[1], -1])


def finite_difference_jacobian(fn, x, eps):
    """Central finite-difference Jacobians of ``fn`` (one row of ``x`` per
    example, numpy, float64): ``[batch, d, d]``, independent of autodiff."""
    x = np.asarray(x, np.float64)
    out = []
    for xi in x:
        cols = []
        for j in range(xi.size):
            e = np.zeros(xi.size)
            e[j] = eps
            plus = fn(tf.constant((xi + e)[None])).numpy()[0]
            minus = fn(tf.constant((xi - e)[None])).numpy()[0]
            cols.append((plus - minus) / (2 * eps))
        out.append(np.stack(cols, axis=1))
    return np.array(out)


def exact_log_det(fn, x, with_sign=False, **jacobian_options):
    """log |det J| per example (numpy ``[batch]``) with ``J`` the full Jacobian
    of ``fn`` (:func:`jacobian`, same options) by ``tf.linalg.slogdet``, in
    ``x``'s dtype; ``with_sign``: ``(sign, log |det J|)``."""
    jac = jacobian(fn, x, **jacobian_options)
    assert jac.shape[1] == jac.shape[2], f"a non-square Jacobian {jac.shape[1:]}"
    sign, log_abs_det = tf.linalg.slogdet(jac)
    return (sign.numpy(), log_abs_det.numpy()) if with_sign else log_abs_det.numpy()


def assert_log_det_matches(bijector, x, event_ndims, rtol=1e-7, atol=0.0, **kwargs):
    """``bijector.forward_log_det_jacobian(x, event_ndims)`` equals log |det J|
    of the full Jacobian of its forward map (``kwargs`` go to both) within
    ``rtol`` / ``atol``; returns both, numpy ``[batch]``."""
    x = tf.convert_to_tensor(x)
    exact = exact_log_det(lambda t: bijector.forward(t, **kwargs), x)
    ld = bijector.forward_log_det_jacobian(x, event_ndims, **kwargs).numpy()
    ld = np.broadcast_to(ld, exact.shape)
    np.testing.assert_allclose(ld, exact, rtol=rtol, atol=atol)
    return ld, exact


def run_script_result(script, cwd, timeout=600):
    """Runs ``script`` in a fresh Python (:func:`repository_env`) in ``cwd``;
    it must exit cleanly after printing a ``RESULT <json>`` line, whose JSON
    (the last one) is returned."""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=repository_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(cwd),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])
