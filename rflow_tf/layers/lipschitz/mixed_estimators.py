"""The estimators of induced mixed norms ||W||_{p->q} (p, q not both 2), one
chosen by :func:`mixed_norm_estimator` in a Lipschitz layer's ``build``:

* :class:`ClosedFormNorm` -- ||W||_{p->q} exactly, recomputed at every use:
  domain 1 or codomain inf;
* :class:`GeneralisedPowerMethod` -- a certified lower bound of
  ||W||_{p->q} by the generalised power method: the other mixed norms.

Both follow the :class:`~rflow_tf.layers.lipschitz.estimators.NormEstimator`
interface; the numerics are :mod:`rflow_tf.norms`.
"""

import numpy as np
import tensorflow as tf

from rflow_tf import norms, tracing
from rflow_tf.layers.lipschitz.estimators import NormEstimator
from rflow_tf.layers.lipschitz.upkeep import backing


class _MixedNorm(NormEstimator):
    """An induced norm ||W||_{p->q} of the layer's whole linear map (orders from
    ``layer.orders``), converged when the layer is built."""

    estimate_at_build = True

    def converge(self, tol, max_iterations, careful, state=None):
        if not tf.executing_eagerly():
            return self._converge(tol, max_iterations, careful, state)
        # Eagerly, a graph function (many small ops per step: a graph runs them
        # faster). At the layer's own settings the layer's converge() already
        # runs the one shared by its configuration, where the estimator allows.
        return self._converge_function(tol, max_iterations, careful)()

    def _converge_function(self, tol, max_iterations, careful):
        """:meth:`_converge` as a graph function, traced once per settings."""
        fns = self.__dict__.setdefault("_converge_fns", {})
        key = (tol, max_iterations, careful)
        if key not in fns:
            fns[key] = tracing.in_one_optimizer_round(
                tf.function(lambda: self._converge(tol, max_iterations, careful), autograph=False)
            )
        return fns[key]

    def _converge(self, tol, max_iterations, careful, state=None):
        """The careful estimate on ``state`` (None: the layer's own variables),
        stored; returns sigma."""
        raise NotImplementedError


class ClosedFormNorm(_MixedNorm):
    """The exact ||W||_{p->q} for domain 1 or codomain inf, recomputed at every
    use: no stored state to keep current (:func:`rflow_tf.norms.closed_form_induced_norm`):

        ||A||_{1->q}   = max_j ||A[:, j]||_q      (largest column q-norm),
        ||A||_{p->inf} = max_i ||A[i, :]||_{p*}   (largest row p*-norm, 1/p + 1/p* = 1),

    with A the matrix of the layer's whole linear map x -> W x.

    Args: as :class:`NormEstimator`.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.mixed_estimators import ClosedFormNorm

    layer = LipschitzDense(3, domain=1, codomain=2)   # y = x W: A = W^T
    layer.build((None, 5))
    estimator = ClosedFormNorm(layer, (3,), (5,))
    w = layer.kernel.numpy()
    sigma = float(estimator.sigma(tf.constant(w), None, None))
    assert np.isclose(sigma, np.linalg.norm(w, axis=1).max(), rtol=1e-5)   # rows of W
    ```
    """

    stateful = False

    def sigma(self, kernel, u, v):
        layer = self.layer
        p, q = layer.orders(kernel.dtype)
        return norms.closed_form_induced_norm(
            layer.apply_kernel,
            layer.apply_kernel_transpose,
            kernel,
            layer._operator_input_shape,
            p,
            q,
        )

    def _converge(self, tol, max_iterations, careful, state=None):
        layer = self.layer
        state = state or layer._power_state()
        return layer._store(
            state.u.read_value(),
            state.v.read_value(),
            layer._kernel_value(state),
            careful=careful,
            state=state,
        )

    def power_steps(self, kernel, u, v, n):
        return None

    def upper_bound(self, kernel, n_iterations):
        return self.sigma(kernel, None, self.layer.v)


class GeneralisedPowerMethod(_MixedNorm):
    """||W||_{p->q} by the generalised power method (:mod:`rflow_tf.norms`). Its
    estimate ||W v||_q / ||v||_p is attained by the stored v, so it is a
    certified lower bound and the gradient (kernel and learnable orders) is
    that of the norm at the maximiser. :meth:`converge` keeps the best of a
    warm start and :meth:`num_restarts` random starts; every change of the
    kernel *or of a learnable order* re-converges from the stored v beside
    :meth:`upkeep_restarts` random starts. No certified upper bound is known.

    One step (Higham's method, with p* and q* the dual orders):

        u = dual_q(W v / ||W v||_q),   v = dual_{p*}(W^T u),
        sigma = ||W v||_q / ||v||_p <= ||W||_{p->q},

    where dual_r(x) = sign(x) |x|^(r-1) / ||x||_r^(r-1).

    Args: as :class:`NormEstimator`.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.mixed_estimators import GeneralisedPowerMethod

    layer = LipschitzDense(3, domain=2, codomain=3)
    layer.build((None, 5))                              # converges sigma at build
    estimator = GeneralisedPowerMethod(layer, (3,), (5,))
    kernel = tf.convert_to_tensor(layer.kernel)
    u, v = estimator.iterate(kernel, tf.ones([5]), 1e-8, 500, restarts=16)
    sigma = float(estimator.sigma(kernel, u, v))        # attained by v: a lower bound
    x = np.random.default_rng(0).normal(size=(10000, 5)).astype(np.float32)
    ratios = np.linalg.norm(x @ kernel.numpy(), 3, axis=1) / np.linalg.norm(x, axis=1)
    assert ratios.max() <= sigma * (1 + 1e-5)           # no random x does better
    assert np.isclose(sigma, float(layer.sigma), rtol=1e-4)
    ```
    """

    #: :meth:`converge` takes the state (one graph function per configuration).
    shared_converge = True
    #: Steps the random starts of a re-estimate run (as one batch with the warm
    #: start) before the best of them is converged alone.
    RESTART_STEPS = 10

    def num_restarts(self):
        """Random starts of :meth:`converge`: 128 (see
        :func:`rflow_tf.norms.induced_norm_power_method` for why), fewer for
        large inputs (all starts run as one batch of about 2^22 numbers), at least 8."""
        n_in = int(np.prod(self.layer._operator_input_shape[1:]))
        return int(min(128, max(8, 2**22 // n_in)))

    def upkeep_restarts(self):
        """Random starts run beside the warm start at every re-estimate (for a
        few steps; the best is then converged): the power method climbs to a
        *local* maximum, and after a kernel or order change the stored vector's
        basin need not be the best one any more (measured: inf->1 layers
        under-reported by 2% after three large Adam steps with the warm start
        alone). 16, fewer for large inputs (about 2^20 numbers per batch), at least 1."""
        n_in = int(np.prod(self.layer._operator_input_shape[1:]))
        return int(min(16, max(1, 2**20 // n_in)))

    def _operator(self, kernel):
        layer = self.layer
        return (
            lambda x: layer.apply_kernel(x, kernel),
            lambda u: layer.apply_kernel_transpose(u, kernel),
        )

    @staticmethod
    def _tol(tol):
        # power_iteration stops on the relative increase of the norm per step,
        # which is far smaller than the change of the vectors (the spectral
        # criterion) near convergence.
        return tol * 1e-2

    def sigma(self, kernel, u, v):
        p, q = self.layer.orders(kernel.dtype)
        v = tf.stop_gradient(tf.reshape(v, self.layer._operator_input_shape))
        return norms.induced_norm_lower_bound(self._operator(kernel)[0], v, p, q)[0]

    def iterate(self, kernel, v, tol, max_iterations, restarts=0, sigma=None):
        """The generalised power method from v (variable-shaped); returns (u, v).

        With ``restarts``, v and that many random starts (seeded by the stored
        ``sigma``) first run :attr:`RESTART_STEPS` steps as one batch, and only
        the best of them is then converged (a batch would stop only when its
        slowest start does)."""
        layer = self.layer
        p, q = layer.orders(kernel.dtype)
        apply, apply_t = self._operator(kernel)
        v = tf.reshape(v, layer._operator_input_shape)
        if restarts:
            shape = [restarts] + layer._operator_input_shape[1:]
            sigma = backing(layer.sigma) if sigma is None else sigma
            bits = tf.bitcast(tf.cast(sigma.read_value(), tf.float32), tf.int32)
            seed = tf.stack([tf.constant(3, tf.int32), bits])
            starts = tf.concat([v, tf.random.stateless_normal(shape, seed, dtype=v.dtype)], 0)
            res = norms.power_iteration(apply, apply_t, starts, p, q, self.RESTART_STEPS, 0.0)
            # A gather, not a slice at the computed index (which would make
            # XLA need the kernel's value at compile time).
            v = tf.gather(res.v, tf.argmax(res.norm)[None])
        res = norms.power_iteration(apply, apply_t, v, p, q, max_iterations, tol)
        return tf.reshape(res.u, layer.u.shape), tf.reshape(res.v, layer.v.shape)

    def fresh(self, kernel, tol=None, max_iterations=None, state=None):
        """(u, v) re-converged from the perturbed stored v, beside
        :meth:`upkeep_restarts` random starts."""
        state = state or self.layer._power_state()
        tol, max_iterations = self._settings(tol, max_iterations)
        v = self._warm_start(state)
        return self.iterate(
            kernel, v, self._tol(tol), max_iterations, self.upkeep_restarts(), state.sigma
        )

    def upkeep(self, kernel, state):
        return self.fresh(kernel, state=state)

    def _converge(self, tol, max_iterations, careful, state=None):
        layer = self.layer
        state = state or layer._power_state()
        kernel = layer._kernel_value(state)
        u1, v1 = self.fresh(kernel, tol, max_iterations, state)
        p, q = layer.orders(kernel.dtype)
        apply, apply_t = self._operator(kernel)
        bits = tf.bitcast(tf.cast(state.sigma.read_value(), tf.float32), tf.int32)
        res = norms.induced_norm_power_method(
            apply,
            apply_t,
            layer._operator_input_shape,
            p,
            q,
            num_restarts=self.num_restarts(),
            max_iterations=max_iterations,
            tol=self._tol(tol),
            seed=tf.stack([tf.constant(2, tf.int32), bits]),
            dtype=kernel.dtype,
        )
        u2, v2 = tf.reshape(res.u, layer.u.shape), tf.reshape(res.v, layer.v.shape)
        u, v = self.larger(kernel, (u1, v1), (u2, v2))
        return layer._store(u, v, kernel, careful=careful, state=state)

    def power_steps(self, kernel, u, v, n):
        return self.iterate(kernel, v, 0.0, int(n))


def mixed_norm_estimator(layer, u_shape, v_shape):
    """The estimator of an induced mixed norm: the closed form for domain 1 or
    codomain inf (fixed), else the generalised power method.

    Args:
      layer, u_shape, v_shape: as :class:`NormEstimator`.

    Returns:
      A :class:`ClosedFormNorm` or a :class:`GeneralisedPowerMethod`.

    Example:
    ```python
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.mixed_estimators import (
        ClosedFormNorm,
        GeneralisedPowerMethod,
        mixed_norm_estimator,
    )

    closed = mixed_norm_estimator(LipschitzDense(3, domain=1, codomain=2), (3,), (5,))
    power = mixed_norm_estimator(LipschitzDense(3, domain=2, codomain=3), (3,), (5,))
    assert isinstance(closed, ClosedFormNorm) and isinstance(power, GeneralisedPowerMethod)
    ```
    """
    if layer.domain == 1.0 or layer.codomain == norms.INF:
        return ClosedFormNorm(layer, u_shape, v_shape)
    return GeneralisedPowerMethod(layer, u_shape, v_shape)
