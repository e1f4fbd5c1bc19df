"""How a Lipschitz layer estimates sigma, the norm of its linear map W: one
strategy object per layer, chosen once in the layer's ``build``. The spectral
norm's estimators are here; those of mixed norms, chosen by
:func:`~rflow_tf.layers.lipschitz.mixed_estimators.mixed_norm_estimator`, are
in :mod:`rflow_tf.layers.lipschitz.mixed_estimators`.

* :class:`MatrixSpectralNorm` -- ||W||_2 by power iteration on the squared
  Gram matrix: dense layers and 1x1 convolutions;
* :class:`ConvSpectralNorm` -- ||W||_2 by power iteration with the
  convolution and its transpose: k x k convolutions;
* ``ClosedFormNorm`` -- ||W||_{p->q} exactly: domain 1 or codomain inf;
* ``GeneralisedPowerMethod`` -- a certified lower bound of
  ||W||_{p->q}: the other mixed norms.

The layer owns the state (the stored vectors u, v, sigma and the kernel they
were converged for, see :class:`rflow_tf.layers.lipschitz.upkeep.PowerState`)
and decides *when* to estimate; an estimator says *how*:

* :meth:`NormEstimator.sigma` -- sigma from the kernel and the stored u, v,
  differentiable in the kernel (and in learnable orders);
* :meth:`NormEstimator.upkeep` -- the re-estimate after the kernel changed,
  warm-started from the stored v;
* :meth:`NormEstimator.converge` -- the careful estimate (warm start and
  restarts), stored;
* :meth:`NormEstimator.power_steps` -- n plain steps from the stored u, v;
* :meth:`NormEstimator.upper_bound` -- a certified upper bound, where known.

Adding an estimator means a subclass of :class:`NormEstimator` and the branch
that chooses it (``LipschitzDense.build``, ``LipschitzConv2D.build`` or
``mixed_norm_estimator``).
"""

import numpy as np
import tensorflow as tf

from rflow_tf.layers.lipschitz.orders import order_label
from rflow_tf.layers.lipschitz.power_iteration import (
    gram_iteration_bound,
    gram_power_iteration,
    gram_top_vector,
    l2_normalize,
    plane_wave_start,
)


def random_unit_like(x, salt, sigma):
    """A deterministic unit-norm random tensor shaped like x, seeded by ``salt``
    and the stored ``sigma`` (a variable): a function of the layer's state, so
    resumed runs and rebuilt models repeat it.

        r = normalize(N(0, I)),  seed = (salt, bits of float32(sigma))

    Args:
      x: a tensor; the result has its shape and dtype.
      salt: an int that tells apart the draws made from one state.
      sigma: a variable (anything with ``read_value()``), the stored estimate.

    Returns:
      A tensor shaped like ``x`` of 2-norm 1 (over all its entries).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.estimators import random_unit_like

    sigma = tf.Variable(1.5)
    r = random_unit_like(tf.zeros([4]), 0, sigma)
    assert abs(float(tf.norm(r)) - 1) < 1e-6
    assert bool(tf.reduce_all(r == random_unit_like(tf.zeros([4]), 0, sigma)))  # repeatable
    ```
    """
    bits = tf.bitcast(tf.cast(sigma.read_value(), tf.float32), tf.int32)
    seed = tf.stack([tf.constant(salt, tf.int32), bits])
    return l2_normalize(tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype))


class NormEstimator:
    """How one layer estimates sigma ~= ||W||_{p->q}, the norm of its linear map
    (see the module docstring); the layer then uses W / max(1, sigma / coeff).

    ``layer`` is the :class:`rflow_tf.layers.lipschitz.base.LipschitzLayer`
    it serves: its linear map (``apply_kernel``, ``apply_kernel_transpose``),
    orders, settings (``tol``, ``max_iterations``) and state. ``u_shape`` and
    ``v_shape`` are the shapes of the stored vectors: in the map's codomain
    and domain. A subclass gives at least :meth:`sigma`; the base class's
    :meth:`upper_bound` raises (no certified bound).

    Args:
      layer: the layer the estimator serves.
      u_shape: shape of the stored vector u (the map's output).
      v_shape: shape of the stored vector v (the map's input).

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.estimators import NormEstimator

    class FrobeniusNorm(NormEstimator):  # ||W||_F >= ||W||_2, of the kernel alone
        stateful = False

        def sigma(self, kernel, u, v):
            return tf.norm(kernel)

    layer = LipschitzDense(3)
    layer.build((None, 5))
    estimator = FrobeniusNorm(layer, u_shape=(3,), v_shape=(5,))
    w = layer.kernel.numpy()
    assert np.isclose(float(estimator.sigma(tf.constant(w), None, None)), np.linalg.norm(w))
    try:
        estimator.upper_bound(tf.constant(w), 12)
    except ValueError as error:
        assert "no certified upper bound" in str(error)
    ```
    """

    #: Whether sigma depends on stored vectors that the layer must keep
    #: current (False: a function of the kernel alone, recomputed at each use).
    stateful = True
    #: Converge when the layer is built (True), or at the first use of the
    #: kernel (False: building a model then runs no power iteration).
    estimate_at_build = False
    #: Eagerly, re-estimate with eager ops (True) or through the traced upkeep
    #: function (False: many small ops per step, which a graph runs faster).
    eager_upkeep = False
    #: Whether :meth:`converge` takes the state it reads and writes
    #: (``state=``), so that a graph can run it in a function shared by the
    #: layers of one configuration (:func:`~rflow_tf.layers.lipschitz.upkeep.traced_converge`).
    shared_converge = False
    #: Whether a layer's first estimate, called eagerly, runs eagerly (its own
    #: path for a never-estimated layer) rather than in the shared function.
    eager_first_estimate = False
    #: Relative size of the deterministic random perturbation added to the
    #: stored v before each warm start, so that a v exactly orthogonal to the
    #: new top singular vector cannot stall the iteration.
    PERTURBATION = 1e-3

    def __init__(self, layer, u_shape, v_shape):
        self.layer = layer
        self.u_shape = tuple(u_shape)
        self.v_shape = tuple(v_shape)

    def sigma(self, kernel, u, v):
        """sigma for ``kernel`` from the vectors u, v (held constant: the
        gradient is that of the norm at the maximiser)."""
        raise NotImplementedError

    def operator_key(self):
        """What the estimate depends on besides the kernel, the stored
        vectors and the layer's settings: the shape of the map's input (a
        convolution's norm depends on its feature maps' size). Layers whose
        traced upkeep has the same key share it
        (:func:`~rflow_tf.layers.lipschitz.upkeep.upkeep_signature`)."""
        return tuple(self.layer._operator_input_shape)

    def larger(self, kernel, first, second):
        """Of two (u, v) pairs, the one of the larger sigma (``first`` on a tie):
        every estimate is a lower bound of the norm, so the larger is the better."""
        better = self.sigma(kernel, *second) > self.sigma(kernel, *first)
        return tf.cond(better, lambda: second, lambda: first)

    def upkeep(self, kernel, state):
        """(u, v) re-estimated for a changed ``kernel`` from the stored ``state``."""
        raise NotImplementedError

    def converge(self, tol, max_iterations, careful):
        """The careful estimate at ``tol`` / ``max_iterations``, stored by the
        layer (``careful``: at the layer's own settings); returns sigma."""
        raise NotImplementedError

    def power_steps(self, kernel, u, v, n):
        """(u, v) after ``n`` plain steps from u, v; None when there is no
        iteration to run."""
        raise NotImplementedError

    def upper_bound(self, kernel, n_iterations):
        """A certified upper bound of the norm of the map of ``kernel``."""
        raise ValueError(
            f"{self.layer.name}: no certified upper bound of the "
            f"{order_label(self.layer.domain)}->{order_label(self.layer.codomain)} norm "
            "(only for 2->2, domain 1 or codomain inf)"
        )

    def _settings(self, tol, max_iterations):
        """``tol`` and ``max_iterations``, the layer's own where None."""
        tol = self.layer.tol if tol is None else float(tol)
        max_iterations = self.layer.max_iterations if max_iterations is None else max_iterations
        return tol, int(max_iterations)

    def _warm_start(self, state):
        """The stored v, normalised and slightly perturbed (see :attr:`PERTURBATION`)."""
        v = l2_normalize(state.v.read_value())
        return v + self.PERTURBATION * random_unit_like(v, 0, state.sigma)


# ------------------------------------------------------------------ spectral norm
class SpectralNorm(NormEstimator):
    """sigma = u^T W v ~= ||W||_2 by power iteration (the stored u, v are the
    top singular vectors' estimates):

        v <- normalize(W^T u),   u <- normalize(W v),   sigma = u^T W v <= ||W||_2.

    Subclasses give the map W v, W^T u, the iteration to convergence, the
    restart vectors and the matrices whose norms bound ||W||_2.

    The in-call re-estimate (:meth:`upkeep`) is warm-started power iteration
    after the small change of an optimiser step; after an abrupt change (a new
    kernel assigned, a restored checkpoint) the warm start may sit on a
    singular vector that is no longer the top one, where power iteration
    stalls, so a restart runs beside it.

    Args: as :class:`NormEstimator`.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.estimators import SpectralNorm

    class DenseSpectralNorm(SpectralNorm):  # plain steps need W v and W^T u only
        def apply_w(self, v, kernel):  # W v = M^T v for the dense kernel M [5, 3]
            return tf.linalg.matvec(kernel, v, transpose_a=True)

        def apply_wt(self, u, kernel):
            return tf.linalg.matvec(kernel, u)

    layer = LipschitzDense(3)
    layer.build((None, 5))
    estimator = DenseSpectralNorm(layer, (3,), (5,))
    kernel = tf.convert_to_tensor(layer.kernel)
    u, v = estimator.power_steps(kernel, tf.ones([3]), tf.ones([5]), 100)
    sigma = float(estimator.sigma(kernel, u, v))
    assert abs(sigma - np.linalg.norm(kernel.numpy(), 2)) < 1e-5
    ```
    """

    eager_upkeep = True
    shared_converge = True
    eager_first_estimate = True  # the restart alone (the stored v is random)
    #: A kernel that moved by more than this fraction (Frobenius norm) since
    #: its last estimate is re-estimated with a restart beside the warm start.
    ABRUPT_CHANGE = 0.1

    def apply_w(self, v, kernel):
        """W v for one vector v."""
        raise NotImplementedError

    def apply_wt(self, u, kernel):
        """W^T u for one vector u."""
        raise NotImplementedError

    def iterate(self, kernel, v, tol, max_iterations):
        """Power iteration from v until v moves by less than ``tol`` (2-norm) in
        one step, or about ``max_iterations`` steps; returns ``(u, v)`` with
        u = normalize(W v).

        The stopping rule is on the vector, not on sigma: when the top
        singular values are close, sigma changes little per step long before
        it is accurate. Asymptotically the relative error of sigma is at most
        half the last step's change of v, so ``tol`` bounds it by tol / 2."""
        raise NotImplementedError

    def restart_vectors(self, kernel, v):
        """The start vectors of a restart, given a deterministic random v."""
        raise NotImplementedError

    def gram_operators(self, kernel):
        """Matrices [n, m, k] whose largest 2-norm bounds ||W||_2 from above."""
        raise NotImplementedError

    def sigma(self, kernel, u, v):
        return tf.reduce_sum(tf.stop_gradient(u) * self.apply_w(tf.stop_gradient(v), kernel))

    def _restart_starts(self, kernel, state):
        """:meth:`restart_vectors` from the deterministic random vector of ``state``."""
        return self.restart_vectors(kernel, random_unit_like(state.v.read_value(), 1, state.sigma))

    def best_of(self, kernel, starts, tol=None, max_iterations=None):
        """(u, v) of the largest sigma of power iterations from each of
        ``starts`` (a list of start vectors; the first on a tie: every
        estimate is a lower bound of the norm, so the larger is the better).
        Subclasses run them as one batched loop."""
        tol, max_iterations = self._settings(tol, max_iterations)
        best = self.iterate(kernel, starts[0], tol, max_iterations)
        for v0 in starts[1:]:
            best = self.larger(kernel, best, self.iterate(kernel, v0, tol, max_iterations))
        return best

    def restart(self, kernel, tol=None, max_iterations=None, state=None):
        """(u, v) of the largest sigma converged from :meth:`restart_vectors`,
        ignoring the stored v."""
        state = state or self.layer._power_state()
        return self.best_of(kernel, self._restart_starts(kernel, state), tol, max_iterations)

    def careful(self, kernel, tol=None, max_iterations=None, state=None):
        """(u, v) of the largest sigma of the warm start and a restart."""
        state = state or self.layer._power_state()
        starts = [self._warm_start(state)] + self._restart_starts(kernel, state)
        return self.best_of(kernel, starts, tol, max_iterations)

    def moved_abruptly(self, kernel, state):
        """Whether ``kernel`` moved by more than :attr:`ABRUPT_CHANGE` (relative,
        Frobenius norm) since the stored estimate was made (a bool tensor)."""
        moved = tf.norm(tf.reshape(kernel - state.estimated_kernel.read_value(), [-1]))
        return moved > self.ABRUPT_CHANGE * tf.norm(tf.reshape(kernel, [-1]))

    def upkeep(self, kernel, state):
        # The warm start is built once, outside the branch.
        warm = self._warm_start(state)
        abrupt = self.moved_abruptly(kernel, state)
        if tf.executing_eagerly():
            restarts = self._restart_starts(kernel, state) if bool(abrupt) else []
            return self.best_of(kernel, [warm] + restarts)
        return tf.cond(
            abrupt,
            lambda: self.best_of(kernel, [warm] + self._restart_starts(kernel, state)),
            lambda: self.best_of(kernel, [warm]),
        )

    def converge(self, tol, max_iterations, careful, state=None):
        """The larger sigma of a warm start and a restart (both are lower bounds
        of ||W||_2, so the larger is the better one; the restart guards
        against a stored v with no component along the top singular vector,
        or one that power iteration would need thousands of steps to find).
        A layer never estimated before has a random stored v, so eagerly it
        runs the restart alone. ``state``: the
        :class:`~rflow_tf.layers.lipschitz.upkeep.PowerState` to read and
        write (None: the layer's own)."""
        layer = self.layer
        state = state or layer._power_state()
        kernel = layer._kernel_value(state)
        if tf.executing_eagerly() and layer._never_estimated():
            u, v = self.restart(kernel, tol, max_iterations, state)
        else:
            u, v = self.careful(kernel, tol, max_iterations, state)
        return layer._store(u, v, kernel, state=state, careful=careful)

    def power_steps(self, kernel, u, v, n):
        for _ in range(int(n)):
            v = l2_normalize(self.apply_wt(u, kernel))
            u = l2_normalize(self.apply_w(v, kernel))
        return u, v

    def upper_bound(self, kernel, n_iterations):
        """Gram iteration (Delattre et al., ICML 2023) on :meth:`gram_operators`
        (see :func:`rflow_tf.layers.lipschitz.power_iteration.gram_iteration_bound`)."""
        return gram_iteration_bound(self.gram_operators(kernel), int(n_iterations))


class MatrixSpectralNorm(SpectralNorm):
    """||W||_2 of a matrix map W = M^T (``matrix(kernel)`` gives M [n_in, n_out]:
    the dense kernel, or a 1x1 convolution's kernel[0, 0]).

    Iterates on the squared smaller Gram matrix
    (:func:`rflow_tf.layers.lipschitz.power_iteration.gram_power_iteration`);
    a restart begins at Gram iteration's top direction (W^T W)^1024 r
    (:func:`~rflow_tf.layers.lipschitz.power_iteration.gram_top_vector`), so
    :meth:`converge` is accurate to float rounding whatever the spectrum.

    Args:
      layer, u_shape, v_shape: as :class:`NormEstimator` (u [n_out], v [n_in]).
      matrix: a function of the kernel that gives M [n_in, n_out].

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.estimators import MatrixSpectralNorm

    layer = LipschitzDense(3)
    layer.build((None, 5))
    estimator = MatrixSpectralNorm(layer, (3,), (5,), matrix=lambda kernel: kernel)
    kernel = tf.convert_to_tensor(layer.kernel)
    u, v = estimator.iterate(kernel, tf.ones([5]), 1e-6, 1000)
    exact = np.linalg.norm(kernel.numpy(), 2)
    assert abs(float(estimator.sigma(kernel, u, v)) - exact) < 1e-5
    assert float(estimator.upper_bound(kernel, 12)) >= exact * (1 - 1e-6)   # certified
    ```
    """

    def __init__(self, layer, u_shape, v_shape, matrix):
        super().__init__(layer, u_shape, v_shape)
        self.matrix = matrix

    def operator_key(self):
        """Nothing: the norm is the matrix's, whatever the input's size (a 1x1
        convolution's on any feature map), so one traced upkeep serves every
        map size."""
        return ()

    def apply_w(self, v, kernel):
        return tf.linalg.matvec(self.matrix(kernel), v, transpose_a=True)

    def apply_wt(self, u, kernel):
        return tf.linalg.matvec(self.matrix(kernel), u)

    def iterate(self, kernel, v, tol, max_iterations):
        return gram_power_iteration(self.matrix(kernel), v, tol, max_iterations)

    def restart_vectors(self, kernel, v):
        return [gram_top_vector(self.matrix(kernel), v)]

    def gram_operators(self, kernel):
        return self.matrix(kernel)[None]

    def best_of(self, kernel, starts, tol=None, max_iterations=None):
        """As :meth:`SpectralNorm.best_of`, the starts as the columns of one loop."""
        tol, max_iterations = self._settings(tol, max_iterations)
        mat = self.matrix(kernel)
        u, v = gram_power_iteration(mat, tf.stack(starts, 1), tol, max_iterations)
        sigmas = tf.reduce_sum(u * tf.matmul(mat, v, transpose_a=True), 0)
        best = tf.argmax(sigmas)
        return tf.gather(u, best, axis=1), tf.gather(v, best, axis=1)

    def upkeep(self, kernel, state):
        """As :meth:`SpectralNorm.upkeep`, in one loop: after an abrupt change
        the second column starts at Gram iteration's top direction, otherwise
        it repeats the warm start (a second column costs a matrix-matrix
        product where one column costs a matrix-vector product)."""
        warm = self._warm_start(state)
        abrupt = self.moved_abruptly(kernel, state)
        if tf.executing_eagerly():
            restart = self._restart_starts(kernel, state)[0] if bool(abrupt) else warm
        else:
            restart = tf.cond(abrupt, lambda: self._restart_starts(kernel, state)[0], lambda: warm)
        return self.best_of(kernel, [warm, restart])


class ConvSpectralNorm(SpectralNorm):
    """||W||_2 of a k x k 'same' convolution on the layer's whole H x W input
    (zero padding included), by power iteration v <- normalize(W^T W v) with
    the convolution and its transpose over feature maps.

    A restart begins at a deterministic random map and, for kernels of at
    most :attr:`PLANE_WAVE_MAX_CHANNELS` channels on the smaller side, at
    :func:`~rflow_tf.layers.lipschitz.power_iteration.plane_wave_start`. On
    large maps the top singular values crowd together: a random start then
    needs hundreds of steps (measured on 32 x 32 maps: cut off at 200, it
    under-reported the norm by up to 0.6%) where the plane wave needs tens and
    is within 1e-4. On small maps the plane wave may sit closer to the second
    singular vector than to the first, so the (cheap) random start runs beside it.

    Args:
      layer, u_shape, v_shape: as :class:`NormEstimator` (u [1, H, W, c_out],
        v [1, H, W, c_in]).
      input_hw: the layer's input (H, W).

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers import LipschitzConv2D
    from rflow_tf.layers.lipschitz.estimators import ConvSpectralNorm

    conv = LipschitzConv2D(3, 3)
    conv.build((None, 4, 4, 2))
    estimator = ConvSpectralNorm(conv, (1, 4, 4, 3), (1, 4, 4, 2), input_hw=(4, 4))
    kernel = tf.convert_to_tensor(conv.kernel)
    u, v = tf.function(estimator.iterate)(kernel, tf.ones([1, 4, 4, 2]), 1e-5, 500)
    basis = tf.reshape(tf.eye(32), [32, 4, 4, 2])  # the padded convolution as a matrix
    exact = np.linalg.norm(tf.reshape(conv.apply_kernel(basis, kernel), [32, -1]).numpy(), 2)
    assert abs(float(estimator.sigma(kernel, u, v)) - exact) < 1e-5
    assert float(estimator.upper_bound(kernel, 12)) >= exact * (1 - 1e-6)   # the torus bound
    ```
    """

    #: Plane-wave restarts for kernels whose smaller channel count is at most
    #: this; wider kernels restart at random.
    PLANE_WAVE_MAX_CHANNELS = 64
    #: Maps of at least this many pixels restart at the plane wave alone;
    #: smaller maps also run the random start and keep the larger sigma.
    PLANE_WAVE_ALONE_PIXELS = 32 * 32

    def __init__(self, layer, u_shape, v_shape, input_hw):
        super().__init__(layer, u_shape, v_shape)
        self.input_hw = tuple(input_hw)

    def apply_w(self, v, kernel):
        return self.layer.apply_kernel(v, kernel)

    def apply_wt(self, u, kernel):
        return self.layer.apply_kernel_transpose(u, kernel)

    def iterate(self, kernel, v, tol, max_iterations):
        """As :meth:`SpectralNorm.iterate`, for a batch of start maps v
        [k, H, W, c_in] at once (each normalised on its own), until every one
        moves by less than ``tol``."""

        def norms(t):
            return tf.sqrt(tf.reduce_sum(tf.square(t), axis=(1, 2, 3), keepdims=True))

        def normalize(t):
            return t / (norms(t) + 1e-12)

        def body(v, change):
            v2 = normalize(self.apply_wt(self.apply_w(v, kernel), kernel))
            return v2, tf.reduce_max(norms(v2 - v))

        v, _ = tf.while_loop(
            lambda v, change: change > tol,
            body,
            (normalize(v), tf.constant(np.inf, kernel.dtype)),
            maximum_iterations=int(max_iterations),
        )
        return normalize(self.apply_w(v, kernel)), v

    def best_of(self, kernel, starts, tol=None, max_iterations=None):
        """As :meth:`SpectralNorm.best_of`, the starts as the batch of one loop."""
        tol, max_iterations = self._settings(tol, max_iterations)
        return self._best_of_batch(kernel, tf.concat(starts, 0), tol, max_iterations)

    def _best_of_batch(self, kernel, starts, tol, max_iterations):
        """(u, v) [1, H, W, c] of the largest sigma of the loop from the batch ``starts``."""
        u, v = self.iterate(kernel, starts, tol, max_iterations)
        sigmas = tf.reduce_sum(u * self.apply_w(v, kernel), axis=(1, 2, 3))
        best = tf.argmax(sigmas)[None]
        return tf.gather(u, best), tf.gather(v, best)

    def upkeep(self, kernel, state):
        """As :meth:`SpectralNorm.upkeep`, in one loop: after an abrupt change
        its batch holds the warm start and the restarts, otherwise the warm
        start alone (the branch chooses the starts, not the loop)."""
        warm = self._warm_start(state)
        abrupt = self.moved_abruptly(kernel, state)
        if tf.executing_eagerly():
            return self.best_of(
                kernel, [warm] + (self._restart_starts(kernel, state) if bool(abrupt) else [])
            )
        starts = tf.cond(
            abrupt,
            lambda: tf.concat([warm] + self._restart_starts(kernel, state), 0),
            lambda: warm,
        )
        tol, max_iterations = self._settings(None, None)
        return self._best_of_batch(kernel, starts, tol, max_iterations)

    def restart_vectors(self, kernel, v):
        kh, kw, c_in, c_out = kernel.shape
        if min(c_in, c_out) > self.PLANE_WAVE_MAX_CHANNELS:
            return [v]
        wave = plane_wave_start(kernel, self.input_hw)
        if self.input_hw[0] * self.input_hw[1] >= self.PLANE_WAVE_ALONE_PIXELS:
            return [wave]
        return [v, wave]

    def gram_operators(self, kernel):
        """The per-frequency matrices of the circular convolution on an
        (H + kh - 1) x (W + kw - 1) torus (the padded map is a restriction of
        it; the bound may exceed the padded norm by a few percent on small inputs)."""
        kh, kw, c_in, c_out = kernel.shape
        n1, n2 = self.input_hw[0] + kh - 1, self.input_hw[1] + kw - 1
        padded = tf.pad(kernel, [[0, n1 - kh], [0, n2 - kw], [0, 0], [0, 0]])
        spectrum = tf.signal.fft2d(
            tf.cast(
                tf.transpose(padded, [2, 3, 0, 1]),
                tf.complex64 if kernel.dtype == tf.float32 else tf.complex128,
            )
        )
        return tf.reshape(tf.transpose(spectrum, [2, 3, 1, 0]), [n1 * n2, c_out, c_in])
