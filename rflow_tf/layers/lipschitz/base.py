"""LipschitzLayer: the base class of the Lipschitz-normalised layers. It holds
the settings, the stored estimate (u, v, sigma) and the verbs that keep the
estimate current; how sigma is estimated is the layer's estimator
(:mod:`rflow_tf.layers.lipschitz.estimators`), chosen in ``build``."""

import contextlib

import keras
import tensorflow as tf

# Pauses every gradient tape around the upkeep graph function, so enclosing
# tapes do not build its (unused) backward function at trace time.
from tensorflow.python.eager import record as _tape_record

from rflow_tf import norms, tracing
from rflow_tf.layers.lipschitz.orders import (
    LearnableOrder,
    order_argument,
    order_config,
    order_value,
)
from rflow_tf.layers.lipschitz.upkeep import (
    PowerState,
    backing,
    can_store_in_context,
    inside_vectorized_map,
    traced_converge,
    traced_upkeep,
)


class LipschitzLayer(keras.layers.Layer):
    """A linear layer whose map has norm at most ``coeff``: y = W_eff x + b with

        W_eff = W / max(1, sigma / coeff),   sigma ~= ||W|| (gradient through sigma).

    Subclasses (:class:`~rflow_tf.layers.LipschitzDense`,
    :class:`~rflow_tf.layers.LipschitzConv2D`) give the batched map
    ``apply_kernel(x, kernel)`` and its transpose ``apply_kernel_transpose(u,
    kernel)``, and in ``build`` create ``self.kernel``, ``self.bias`` (None
    with ``use_bias=False``) and ``self._operator_input_shape`` (the map's
    input shape, batch 1), then call :meth:`_build_estimate` with the
    estimator of their map (:mod:`rflow_tf.layers.lipschitz.estimators`).

    **Norms.** With ``domain`` = ``codomain`` = 2 (the default) sigma is the
    spectral norm, by power iteration. Otherwise sigma is the induced norm
    ||W||_{p->q} = max ||W x||_q / ||x||_p of the layer's whole linear map (for
    convolutions the padded convolution on the layer's input size, whatever
    the kernel size), and ||W_eff||_{p->q} <= coeff: exact where a closed form
    exists (domain 1 or codomain inf), else the generalised power method's
    certified lower bound. Each order is a Python float in [1, inf]
    (``"f"`` = inf) or a :class:`LearnableOrder` (shared between layers to tie
    the chained norms).

    **Keeping the estimate current.** A training loop need not call
    anything: every use of the kernel (``call``, :meth:`effective_kernel`,
    :class:`~rflow_tf.layers.JacobianChain`) first runs :meth:`update_estimate`,
    which re-estimates only when the kernel (or a learnable order) changed
    since the last estimate, warm-started from the stored u, v (usually a few
    steps). Any training loop (``tfp.math.minimize``, Keras ``fit``, a
    hand-written tape) therefore sees a converged sigma. A newly built
    spectral layer has no estimate yet, so its first use converges one, as
    :meth:`converge` would: building a model runs no power iteration. The
    verbs, and who calls them:

    * :meth:`update_estimate` -- run by every use; called directly only where
      the stored state must be current before a use: the trainer's
      :func:`~rflow_tf.layers.update_lipschitz` after an optimiser step, in
      cross-replica context (inside ``strategy.run`` replicas use a fresh
      estimate without storing it).
    * :meth:`converge` -- the careful estimate (warm start and restarts),
      optional: before evaluation, sampling or export
      (:func:`~rflow_tf.layers.converge_lipschitz`).
    * :meth:`mark_estimate_current` -- after restoring a checkpoint, so the
      restored u, v are used as saved (:func:`~rflow_tf.layers.mark_lipschitz_current`).

    :meth:`estimate_is_current` tells whether the stored estimate is for the
    current kernel. ``power_iterations`` > 0 adds that many plain steps
    (:meth:`power_iterate`) at every ``call(training=True)``, the reference
    implementation's scheme; the bound does not need them. ``auto_update``
    (True) switches the in-call re-estimate off when False (export graphs,
    whose weights are frozen).

    Args:
      coeff: the bound on the norm, > 0.
      power_iterations: plain power steps per ``call(training=True)``, >= 0.
      tol: convergence tolerance of the power iteration, in (0, 1) (on the
        change of the vector per step; sigma's relative error is about tol / 2).
      max_iterations: step budget of one convergence, >= 1.
      domain: the norm order p of the input: a float in [1, inf], ``"f"`` or
        ``"inf"``, or a :class:`LearnableOrder`.
      codomain: the norm order q of the output, as ``domain``.
      **kwargs: arguments of ``keras.layers.Layer`` (``name``, ``dtype``).

    Example:
    ```python
    import numpy as np
    from rflow_tf.layers import LipschitzDense, LipschitzLayer

    layer = LipschitzDense(4, coeff=0.9)  # a LipschitzLayer
    layer.build((None, 6))
    layer.kernel.assign(3.0 * layer.kernel)  # now ||W||_2 > coeff
    w_eff = layer.effective_kernel()  # the kernel changed: re-estimated first
    assert isinstance(layer, LipschitzLayer) and bool(layer.estimate_is_current())
    assert np.linalg.norm(w_eff.numpy(), 2) <= 0.9 * (1 + 1e-5)
    sigma = float(layer.converge())  # the careful estimate, a lower bound of ||W||_2
    assert float(layer.sigma_upper_bound()) >= sigma * (1 - 1e-6)  # a certified upper bound
    ```
    """

    def __init__(
        self,
        coeff=0.98,
        power_iterations=0,
        tol=5e-4,
        max_iterations=200,
        domain=2,
        codomain=2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.domain = order_argument(domain, "domain")
        self.codomain = order_argument(codomain, "codomain")
        if not 0.0 < coeff:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if not 0.0 < tol < 1.0:
            raise ValueError(f"tol must be in (0, 1), got {tol}")
        if int(max_iterations) < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        self.coeff = float(coeff)
        self.power_iterations = int(power_iterations)
        self.tol = float(tol)
        self.max_iterations = int(max_iterations)
        #: Re-estimate sigma at each use whenever the kernel changed (see the
        #: class docstring). Export graphs switch it off (their weights are frozen).
        self.auto_update = True

    def _build_estimate(self, estimator):
        """Adopts ``estimator`` (a :class:`~rflow_tf.layers.lipschitz.estimators.NormEstimator`)
        and creates the stored estimate: u, v (shaped by the estimator) and sigma."""
        # Untracked (no Keras weight, no checkpoint entry), like the state below.
        object.__setattr__(self, "_estimator", estimator)
        self.u = self.add_weight(
            name="power_u",
            shape=estimator.u_shape,
            trainable=False,
            initializer=keras.initializers.RandomNormal(seed=None),
        )
        self.v = self.add_weight(
            name="power_v",
            shape=estimator.v_shape,
            trainable=False,
            initializer=keras.initializers.RandomNormal(seed=None),
        )
        self.sigma = self.add_weight(name="sigma", shape=(), trainable=False, initializer="zeros")
        # The kernel of the last converged estimate. Deliberately untracked
        # (plain attribute, no Keras weight, no checkpoint entry): checkpoints
        # and SavedModels keep their layout; after a restore the kernel differs
        # from it, so the first use re-estimates (rflow_tf.load and the trainer
        # call mark_estimate_current instead, to keep a restored model exact).
        with tf.init_scope():
            estimated = tf.Variable(
                tf.zeros(self.kernel.shape, self.kernel.dtype),
                trainable=False,
                name="estimated_kernel",
            )
        object.__setattr__(self, "_estimated_kernel", estimated)
        # Whether the estimate for that kernel came from :meth:`converge` at the
        # layer's own tolerance, so that converging again would reproduce it.
        # Untracked too.
        with tf.init_scope():
            careful = tf.Variable(False, trainable=False, name="estimated_carefully")
        object.__setattr__(self, "_estimated_carefully", careful)
        if self._has_learnable_order:
            with tf.init_scope():
                orders = tf.Variable(
                    tf.zeros([2], self.kernel.dtype), trainable=False, name="estimated_orders"
                )
            object.__setattr__(self, "_estimated_orders", orders)
        if estimator.estimate_at_build:
            self.converge()
        # Otherwise the layer is estimated at its first use: eagerly by
        # converge() itself; in a graph, its kernel differs from the (zero)
        # estimated kernel by more than the abrupt-change threshold, so that
        # use runs the warm start and the restart.

    # ------------------------------------------------------------------ orders
    @property
    def is_spectral(self):
        """True for fixed domain = codomain = 2: sigma is the spectral norm."""
        return self.domain == 2.0 and self.codomain == 2.0

    @property
    def _has_learnable_order(self):
        return isinstance(self.domain, LearnableOrder) or isinstance(self.codomain, LearnableOrder)

    def orders(self, dtype=None):
        """``(p, q)``: the domain and codomain orders now (Python floats, or
        tensors of ``dtype`` for learnable ones).

        Example: ``LipschitzDense(4, domain="f", codomain=2).orders()  # (inf, 2.0)``.
        """
        dtype = dtype or self.dtype
        override = self.__dict__.get("_orders_override")
        if override is not None:  # inside a shared function: the orders of its state
            return tuple(o if isinstance(o, float) else tf.cast(o, dtype) for o in override)
        return order_value(self.domain, dtype), order_value(self.codomain, dtype)

    @contextlib.contextmanager
    def _orders_of(self, state):
        """Within the block, :meth:`orders` gives the orders of ``state``: a
        learnable one read from its variable there (a function shared by the
        layers of one configuration reads each layer's orders from its state)."""
        if state.domain_raw is None and state.codomain_raw is None:
            yield
            return
        object.__setattr__(
            self,
            "_orders_override",
            tuple(
                fixed if raw is None else norms.order_from_unconstrained(raw.read_value())
                for fixed, raw in (
                    (self.domain, state.domain_raw),
                    (self.codomain, state.codomain_raw),
                )
            ),
        )
        try:
            yield
        finally:
            object.__setattr__(self, "_orders_override", None)

    def _order_vector(self):
        p, q = self.orders(self.kernel.dtype)
        dtype = self.kernel.dtype
        return tf.stop_gradient(tf.stack([tf.cast(p, dtype), tf.cast(q, dtype)]))

    # ------------------------------------------------------------------ state
    def _power_state(self):
        def raw(order):
            return backing(order.raw) if isinstance(order, LearnableOrder) else None

        return PowerState(
            backing(self.kernel),
            backing(self.u),
            backing(self.v),
            backing(self.sigma),
            self._estimated_kernel,
            self._estimated_carefully,
            raw(self.domain),
            raw(self.codomain),
            self.__dict__.get("_estimated_orders"),
        )

    def _kernel_value(self, state=None):
        state = state or self._power_state()
        return tf.stop_gradient(state.kernel.read_value())

    def _store(self, u, v, kernel, current=True, state=None, careful=False):
        # Assign the backing tf.Variables: a Keras StatelessScope (active while
        # Keras builds a functional model symbolically) would otherwise turn
        # these assignments into no-ops in the cached graph function.
        state = state or self._power_state()
        state.u.assign(u)
        state.v.assign(v)
        sigma = self._estimator.sigma(kernel, u, v)
        state.sigma.assign(sigma)
        state.careful.assign(bool(current and careful))
        if current:
            state.estimated_kernel.assign(kernel)
            if state.estimated_orders is not None:
                state.estimated_orders.assign(self._order_vector())
        return sigma

    def _never_estimated(self):
        """True (eagerly) while no estimate was stored for a nonzero kernel."""
        return not bool(tf.reduce_any(self._estimated_kernel != 0))

    def estimate_is_current(self, state=None):
        """True (a bool tensor) when the stored u, v were converged for the
        current kernel (and learnable orders). A query: nothing needs to call it.

        Example: ``layer.converge(); assert bool(layer.estimate_is_current())``.
        """
        state = state or self._power_state()
        current = tf.reduce_all(
            tf.equal(self._kernel_value(state), state.estimated_kernel.read_value())
        )
        if state.estimated_orders is not None:
            same = tf.reduce_all(
                tf.equal(self._order_vector(), state.estimated_orders.read_value())
            )
            current = tf.logical_and(current, same)
        return current

    # ------------------------------------------------------------------ verbs
    def update_estimate(self):
        """Re-estimates u, v if the kernel (or a learnable order) changed since
        the last estimate; returns the (u, v) to use, as tensors.

        Every use of the kernel runs it, so no one needs to call it for the
        bound. :func:`~rflow_tf.layers.update_lipschitz` calls it after an
        optimiser step in cross-replica context, so the stored state is current
        for every replica: inside ``strategy.run`` of a multi-replica strategy
        the fresh estimate is used but not stored.

        In a graph the check runs once per trace and layer (later uses reuse
        it while no variable may have been written, :mod:`rflow_tf.tracing`),
        in a graph function shared by all layers of the same configuration and
        not inlined (:func:`~rflow_tf.layers.lipschitz.upkeep.traced_upkeep`).

        Example: ``u, v = layer.update_estimate()``.
        """
        stateful = self._estimator.stateful  # (a closed-form sigma needs no estimate)
        if not self.auto_update or inside_vectorized_map() or not stateful:
            # vectorized_map cannot vectorise variable assignments, and the
            # weights cannot change within one map: use the stored estimate,
            # made current first, outside the map, if it is not.
            if self.auto_update and stateful:
                with tf.init_scope():
                    if tf.executing_eagerly() and not bool(self.estimate_is_current()):
                        self.converge()
            return tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)
        store = can_store_in_context()
        if tf.executing_eagerly() and self._estimator.eager_upkeep:
            if store and self._never_estimated():
                self.converge()  # the first estimate, as careful as converge() makes it
            return self._update_estimate(store)
        # Within one trace, the estimate checked at an earlier use serves every
        # later use (forward, log-det, recomputing backward) until a variable
        # may have been written (rflow_tf.tracing).
        memo = self.__dict__.setdefault("_upkeep_memo", tracing.TraceMemo())
        found = memo.get(store)
        if found is not None:
            return found
        with _tape_record.stop_recording():  # no gradient flows through u, v
            return memo.put(store, traced_upkeep(self, store)())

    def _update_estimate(self, store, state=None):
        """The upkeep's body: (u, v), re-estimated (and stored if ``store``)
        unless the stored estimate is current."""
        state = state or self._power_state()
        kernel = self._kernel_value(state)

        def fresh():
            u, v = self._estimator.upkeep(kernel, state)
            if store:
                self._store(u, v, kernel, state=state)
            return u, v

        def stored():
            return state.u.read_value(), state.v.read_value()

        current = self.estimate_is_current(state)
        if tf.executing_eagerly():
            return stored() if bool(current) else fresh()
        return tf.cond(current, stored, fresh)

    def converge(self, tol=None, max_iterations=None):
        """The careful estimate; returns sigma. Optional: training loops need
        not call it (each use of a changed kernel re-estimates). Call it (or
        :func:`~rflow_tf.layers.converge_lipschitz`) before evaluation,
        sampling or export for the most careful estimate.

        Spectral norm: the larger sigma of a run warm-started from the stored v
        (slightly perturbed) and a restart (both are lower bounds of ||W||_2).
        For dense layers and 1x1 convolutions the restart begins at the top
        direction of Gram iteration, so sigma is accurate to float rounding
        whatever the spectrum; for k x k convolutions at a deterministic random
        vector and the plane wave of the kernel's symbol. Convergence is judged
        on the singular vectors (see ``tol``). Mixed norms: the closed form
        where there is one; elsewhere the larger of the warm start and the
        best of many random starts of the generalised power method.

        At the layer's own ``tol`` and ``max_iterations``, a kernel (and
        orders) unchanged since the last ``converge`` keeps that estimate: it
        is what converging again would find, so repeated calls (before
        evaluation, sampling, export) cost one comparison. At the layer's own
        settings the estimate runs in a graph function traced once per layer
        configuration (:func:`~rflow_tf.layers.lipschitz.upkeep.traced_converge`),
        also when called eagerly, except for a spectral norm's first estimate.

        Example: ``sigma = layer.converge()``.
        """
        at_defaults = (tol is None or float(tol) == self.tol) and (
            max_iterations is None or int(max_iterations) == self.max_iterations
        )
        tol = self.tol if tol is None else float(tol)
        max_iterations = self.max_iterations if max_iterations is None else int(max_iterations)

        if not at_defaults:
            return self._estimator.converge(tol, max_iterations, careful=False)
        estimator = self._estimator
        if estimator.shared_converge and not (
            estimator.eager_first_estimate and tf.executing_eagerly() and self._never_estimated()
        ):
            # One graph function per configuration, also when called eagerly
            # (its loops run many small ops per step, which a graph runs faster).
            return traced_converge(self)()
        return self._converge_at_own_settings()

    def _converge_at_own_settings(self, state=None):
        """:meth:`converge` at the layer's own settings on ``state`` (None: the
        layer's own variables): the stored estimate if it is careful and
        current, else a careful one, stored; returns sigma."""
        state = state or self._power_state()

        def run():
            if self._estimator.shared_converge:
                return self._estimator.converge(
                    self.tol, self.max_iterations, careful=True, state=state
                )
            return self._estimator.converge(self.tol, self.max_iterations, careful=True)

        kept = tf.logical_and(state.careful.read_value(), self.estimate_is_current(state))
        if tf.executing_eagerly():
            return tf.convert_to_tensor(state.sigma.read_value()) if bool(kept) else run()
        return tf.cond(kept, lambda: tf.identity(state.sigma.read_value()), run)

    def mark_estimate_current(self):
        """Declares the stored u, v the estimate for the current kernel, so they
        are used as they are until the kernel changes. Call it after restoring
        a checkpoint (:func:`~rflow_tf.layers.mark_lipschitz_current` for a whole
        model; ``rflow_tf.load`` and the trainer do): a restored model then
        computes exactly what it computed when saved.

        Example: ``ckpt.restore(path); [l.mark_estimate_current() for l in layers]``.
        """
        self._estimated_kernel.assign(self._kernel_value())
        self._estimated_carefully.assign(False)
        if self._has_learnable_order:
            self._estimated_orders.assign(self._order_vector())

    def power_iterate(self, n):
        """Runs ``n`` plain power-iteration steps and stores u, v and sigma (a
        partial estimate: the next use of the kernel still re-converges it).
        ``call(training=True)`` runs ``power_iterations`` of them; nothing else
        needs to call it.

        Example: ``layer.power_iterate(3)``.
        """
        kernel = self._kernel_value()
        u, v = tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)
        stepped = self._estimator.power_steps(kernel, u, v, n)
        if stepped is not None:
            self._store(*stepped, kernel, current=False)

    # ------------------------------------------------------------------ use
    def sigma_upper_bound(self, n_iterations=12):
        """A certified upper bound on the norm of the layer's linear map (raw
        kernel, before normalisation).

        Spectral norm: Gram iteration (Delattre et al., ICML 2023): with
        G_0 = W, G_{t+1} = G_t^H G_t,

            ||W||_2 <= ||G_t||_F ^ (1 / 2^t),

        computed with rescaling (no overflow); the bound tightens doubly
        exponentially, to a factor m^(1 / 2^(t+1)) for a top singular value of
        multiplicity m. For a k x k convolution on an H x W input it bounds the
        zero-padded convolution by the circular one on an (H + k - 1) x
        (W + k - 1) torus (the padded map is a restriction of it), whose
        norm is the largest norm of the kernel's per-frequency matrices (FFT);
        that bound may exceed the padded norm by a few percent on small inputs.

        Mixed norms: the exact closed form where there is one; elsewhere no
        certified upper bound is known, and a ValueError says so.

        Example: ``layer.sigma_upper_bound() >= np.linalg.norm(w, 2)``.
        """
        return self._estimator.upper_bound(self._kernel_value(), n_iterations)

    def effective_kernel(self):
        """W / max(1, sigma / coeff) (gradient through sigma), from an estimate
        current for the kernel (see :meth:`update_estimate`).

        Example: ``w_eff = layer.effective_kernel()``.
        """
        u, v = self.update_estimate()
        kernel = tf.convert_to_tensor(self.kernel)
        sigma = self._estimator.sigma(kernel, u, v)
        # sigma * (1 / coeff), not sigma / coeff: the gradient of a product by a
        # constant is one op, that of a quotient a dozen.
        return kernel / tf.maximum(tf.ones_like(sigma), sigma * (1.0 / self.coeff))

    def _maybe_iterate(self, training):
        if training and self.power_iterations > 0:
            self.power_iterate(self.power_iterations)

    def call(self, x, training=False):
        self._maybe_iterate(training)
        y = self.apply_kernel(x, self.effective_kernel())
        return y + self.bias if self.use_bias else y

    def get_config(self):
        return {
            **super().get_config(),
            "coeff": self.coeff,
            "power_iterations": self.power_iterations,
            "tol": self.tol,
            "max_iterations": self.max_iterations,
            "domain": order_config(self.domain),
            "codomain": order_config(self.codomain),
        }
