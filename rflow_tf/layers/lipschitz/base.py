"""Lipschitz-normalised layers (LipschitzDense, LipschitzConv2D: spectral norm, or an
induced mixed norm ||W||_{p->q} with fixed or learnable orders, LearnableOrder) and the
functions that find them in a model and run their power iterations (converge_lipschitz, ...)."""

import weakref
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

# Pauses every gradient tape around the power-iteration graph function, so
# enclosing tapes do not build its (unused) backward function at trace time.
from tensorflow.python.eager import record as _tape_record

from rflow_tf import norms, tracing
from rflow_tf.layers._base import _PACKAGE
from rflow_tf.layers.initializers import _bias_initializer

# The upkeep stores the converged estimate for the kernel it reads: calling it
# again at the same state computes the same, so its writes never make a value
# traced earlier stale.
tracing.mark_idempotent_writer("lipschitz_upkeep")


def _l2_normalize(x):
    return x / (tf.norm(tf.reshape(x, [-1])) + 1e-12)


def _backing(variable):
    """The tf.Variable behind a Keras 3 variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _can_store_in_context():
    """Whether a layer may assign its (mirrored) power-iteration state here:
    not inside ``strategy.run`` of a multi-replica strategy (there every
    replica computes the same fresh estimate and uses it without storing)."""
    ctx = tf.distribute.get_replica_context()
    return ctx is None or ctx.num_replicas_in_sync == 1


def _inside_vectorized_map():
    """Whether the current trace is the body of ``tf.vectorized_map`` / pfor
    (TFP's AutoBatched JointDistributions use it): pfor traces the loop body
    under a ``loop_body`` name scope that holds its ``PlaceholderWithDefault``
    loop variable."""
    if tf.executing_eagerly():
        return False
    parts = tf.get_current_name_scope().split("/")
    names = [
        "/".join(parts[: i + 1]) + "/PlaceholderWithDefault"
        for i, part in enumerate(parts)
        if part.startswith("loop_body")
    ]
    graph = tf.compat.v1.get_default_graph()
    while names and graph is not None:  # the loop variable may live in an outer graph
        for name in names:
            try:
                graph.get_operation_by_name(name)
                return True
            except KeyError:
                pass
        graph = getattr(graph, "outer_graph", None)
    return False


class _PowerState(NamedTuple):
    """The variables a layer's power iteration reads (``read_value``) and
    writes (``assign``): tf.Variables, or :class:`_HandleVariable` inside an
    upkeep function shared by the layers of one configuration."""

    kernel: tf.Variable
    u: tf.Variable
    v: tf.Variable
    sigma: tf.Variable
    estimated_kernel: tf.Variable
    careful: tf.Variable


class _HandleVariable:
    """A resource variable seen through its handle (an argument of a shared
    graph function: variables passed by handle are not tied to the function)."""

    def __init__(self, handle, like):
        self.handle, self.dtype, self.shape = handle, like.dtype, like.shape

    def read_value(self):
        value = tf.raw_ops.ReadVariableOp(resource=self.handle, dtype=self.dtype)
        value.set_shape(self.shape)
        return value

    def assign(self, value):
        return tf.raw_ops.AssignVariableOp(
            resource=self.handle, value=tf.convert_to_tensor(value, self.dtype)
        )


#: Traced upkeep functions shared by the layers of one configuration (see
#: ``_SpectralNormalized._upkeep_signature``), with the layer tracing them now.
_SHARED_UPKEEP = {}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LearnableOrder(keras.layers.Layer):
    """A learnable norm order p in [1.001, 5], shared by the layers whose norms it ties.

        p = order_from_unconstrained(raw)   (rflow_tf.norms; raw = 0 <-> p = 2)

    One trainable scalar ``raw``; the squashing keeps p in [1.001, 5] with a
    finite gradient dp/draw everywhere (no NaN as p -> 1 or at the top of the
    range). A residual branch passes the *same* instance as layer i's
    ``codomain`` and layer i + 1's ``domain`` (and the last layer's codomain
    is the first layer's domain), so the chained norms stay equal while they
    are learned (:func:`rflow_tf.layers.lipschitz_dense_net`). Keras and
    checkpoints see its one variable once however many layers share it.

    Example:
    ```python
    p = LearnableOrder(3.0)
    a = LipschitzDense(8, domain=2, codomain=p)
    b = LipschitzDense(2, domain=p, codomain=2)
    float(p.order())      # 3.0
    ```
    """

    def __init__(self, initial_order=2.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_order = norms.parse_order(initial_order, "initial_order")
        raw = norms.unconstrained_from_order(self.initial_order)
        self.raw = self.add_weight(
            name="raw_order", shape=(), initializer=keras.initializers.Constant(raw)
        )
        self.built = True

    def order(self, dtype=None):
        """The order p (a scalar tensor, of ``dtype`` if given)."""
        p = norms.order_from_unconstrained(tf.convert_to_tensor(self.raw))
        return p if dtype is None else tf.cast(p, dtype)

    def call(self, inputs=None):
        return self.order()

    def get_config(self):
        # The current value: a layer rebuilt from its config starts where this one is.
        return {**super().get_config(), "initial_order": float(self.order())}


def _order_argument(order, name):
    """A layer's ``domain`` / ``codomain`` argument: a Python float in [1, inf],
    a :class:`LearnableOrder`, or a serialised LearnableOrder (from get_config)."""
    if isinstance(order, LearnableOrder):
        return order
    if isinstance(order, dict):
        return keras.saving.deserialize_keras_object(order)
    return norms.parse_order(order, name)


def _order_config(order):
    if isinstance(order, LearnableOrder):
        return keras.saving.serialize_keras_object(order)
    return "inf" if order == norms.INF else order


def _order_value(order, dtype):
    """The order to compute with: a Python float, or a tensor of ``dtype``."""
    return order.order(dtype) if isinstance(order, LearnableOrder) else order


def _order_label(order):
    return "learnable" if isinstance(order, LearnableOrder) else order


class _SpectralNormalized(keras.layers.Layer):
    """Shared power-iteration machinery for the Lipschitz layers.

    Subclasses implement ``_apply_w(v, kernel)`` (W v), ``_apply_wt(u, kernel)``
    (W^T u) for power iteration, the batched ``apply_kernel(x, kernel)`` and
    ``apply_kernel_transpose(u, kernel)``, ``_gram_operators(kernel)`` for the
    certified bound, and create ``self.kernel``, ``self.bias`` (or None with
    ``use_bias=False``) and call ``_init_power_vectors``; ``call`` is
    x -> apply_kernel(x, W_eff) + bias.

    The estimate is kept up to date automatically: every use of the kernel
    (``call``, :meth:`effective_kernel`, :class:`JacobianChain`) first checks
    whether the kernel differs from the kernel of the last converged estimate
    and, if so, re-converges power iteration warm-started from the stored
    u and v (usually a few steps; after an abrupt change of the kernel, with a
    restart beside the warm start). Any training loop (``tfp.math.minimize``,
    Keras ``fit``, a hand-written tape) therefore sees a converged sigma. A
    newly built layer has no estimate yet, so its first use converges one, as
    :meth:`converge` would: building a model runs no power iteration.

    **Mixed norms.** With ``domain`` p and ``codomain`` q other than 2 and 2,
    sigma is the induced norm ||W||_{p->q} = max ||W x||_q / ||x||_p of the
    layer's whole linear map (for convolutions the padded convolution on the
    layer's input size, whatever the kernel size), and W_eff has
    ||W_eff||_{p->q} <= coeff. Each order is a Python float in [1, inf] or a
    :class:`LearnableOrder` (shared between layers to tie the chained norms).

    * Domain 1 or codomain inf (1->1, 1->2, 1->inf, 2->inf, inf->inf, ...):
      the exact closed form (largest column q-norm or row p*-norm,
      :func:`rflow_tf.norms.closed_form_induced_norm`), recomputed at every
      use; no stored state.
    * Elsewhere: the generalised power method (:mod:`rflow_tf.norms`). Its
      estimate ||W v||_q / ||v||_p is attained by the stored v, so it is a
      certified lower bound and the gradient (kernel and learnable orders)
      is that of the norm at the maximiser. :meth:`converge` (run when the
      layer is built) keeps the best of a warm start and
      :meth:`num_restarts` random starts; afterwards every change of the
      kernel *or of a learnable order* re-converges from the stored v (the
      same in-call upkeep as the spectral path).

    domain = codomain = 2 (fixed) is the spectral path above, unchanged.
    """

    #: Relative size of the deterministic random perturbation added to v
    #: before each re-estimate, so that a stored v exactly orthogonal to the
    #: new top singular vector cannot stall power iteration.
    _PERTURBATION = 1e-3

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
        self.domain = _order_argument(domain, "domain")
        self.codomain = _order_argument(codomain, "codomain")
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
        #: Re-estimate sigma whenever the kernel changed (see the class docstring).
        #: Export graphs switch it off (their weights are frozen).
        self.auto_update = True

    def _init_power_vectors(self, u_shape, v_shape):
        self.u = self.add_weight(
            name="power_u",
            shape=u_shape,
            trainable=False,
            initializer=keras.initializers.RandomNormal(seed=None),
        )
        self.v = self.add_weight(
            name="power_v",
            shape=v_shape,
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
        if not self.is_spectral:
            self.converge()
        # A spectral layer is estimated at its first use instead: eagerly by
        # converge() itself; in a graph, its kernel differs from the (zero)
        # estimated kernel by more than the abrupt-change threshold, so that
        # use runs the warm start and the restart. Building a model costs no
        # power iteration.

    # ------------------------------------------------------------ mixed norms
    @property
    def is_spectral(self):
        """True for fixed domain = codomain = 2: sigma is the spectral norm."""
        return self.domain == 2.0 and self.codomain == 2.0

    @property
    def _has_learnable_order(self):
        return isinstance(self.domain, LearnableOrder) or isinstance(self.codomain, LearnableOrder)

    @property
    def _closed_form(self):
        """Domain 1 or codomain inf (fixed): sigma has an exact closed form."""
        return self.domain == 1.0 or self.codomain == norms.INF

    def orders(self, dtype=None):
        """``(p, q)``: the domain and codomain orders now (Python floats, or
        tensors of ``dtype`` for learnable ones).

        Example: ``LipschitzDense(4, domain="f", codomain=2).orders()  # (inf, 2.0)``.
        """
        dtype = dtype or self.dtype
        return _order_value(self.domain, dtype), _order_value(self.codomain, dtype)

    def _order_vector(self):
        p, q = self.orders(self.kernel.dtype)
        dtype = self.kernel.dtype
        return tf.stop_gradient(tf.stack([tf.cast(p, dtype), tf.cast(q, dtype)]))

    def num_restarts(self):
        """Random starts of :meth:`converge` on the mixed-norm path: 128 (see
        :func:`rflow_tf.norms.induced_norm_power_method` for why), fewer for
        large inputs (all starts run as one batch of about 2^22 numbers), at least 8."""
        n_in = int(np.prod(self._operator_input_shape[1:]))
        return int(min(128, max(8, 2**22 // n_in)))

    def _operator(self, kernel):
        return (
            lambda x: self.apply_kernel(x, kernel),
            lambda u: self.apply_kernel_transpose(u, kernel),
        )

    def _mixed_sigma(self, kernel, v):
        p, q = self.orders(kernel.dtype)
        if self._closed_form:
            return norms.closed_form_induced_norm(
                self.apply_kernel,
                self.apply_kernel_transpose,
                kernel,
                self._operator_input_shape,
                p,
                q,
            )
        v = tf.stop_gradient(tf.reshape(v, self._operator_input_shape))
        return norms.induced_norm_lower_bound(self._operator(kernel)[0], v, p, q)[0]

    def upkeep_restarts(self):
        """Random starts run beside the warm start at every re-estimate on the
        mixed-norm path (for a few steps; the best is then converged): the
        power method climbs to a *local* maximum, and
        after a kernel or order change the stored vector's basin need not be
        the best one any more (measured: inf->1 layers under-reported by 2%
        after three large Adam steps with the warm start alone). 16, fewer for
        large inputs (about 2^20 numbers per batch), at least 1."""
        n_in = int(np.prod(self._operator_input_shape[1:]))
        return int(min(16, max(1, 2**20 // n_in)))

    #: Steps the random starts of a re-estimate run (as one batch with the warm
    #: start) before the best of them is converged alone.
    _RESTART_STEPS = 10

    def _mixed_iteration(self, kernel, v, tol, max_iterations, restarts=0, sigma=None):
        """The generalised power method from v (variable-shaped); returns (u, v).

        With ``restarts``, v and that many random starts first run
        :attr:`_RESTART_STEPS` steps as one batch, and only the best of them is
        then converged (a batch would stop only when its slowest start does)."""
        p, q = self.orders(kernel.dtype)
        apply, apply_t = self._operator(kernel)
        v = tf.reshape(v, self._operator_input_shape)
        if restarts:
            shape = [restarts] + self._operator_input_shape[1:]
            sigma = _backing(self.sigma) if sigma is None else sigma
            bits = tf.bitcast(tf.cast(sigma.read_value(), tf.float32), tf.int32)
            seed = tf.stack([tf.constant(3, tf.int32), bits])
            starts = tf.concat([v, tf.random.stateless_normal(shape, seed, dtype=v.dtype)], 0)
            res = norms.power_iteration(apply, apply_t, starts, p, q, self._RESTART_STEPS, 0.0)
            v = res.v[tf.argmax(res.norm)][None]
        res = norms.power_iteration(apply, apply_t, v, p, q, max_iterations, tol)
        return tf.reshape(res.u, self.u.shape), tf.reshape(res.v, self.v.shape)

    def _mixed_tol(self, tol):
        # power_iteration stops on the relative increase of the norm per step,
        # which is far smaller than the change of the vectors (the spectral
        # path's criterion) near convergence.
        return tol * 1e-2

    def _converge_mixed_function(self, tol, max_iterations, careful):
        """:meth:`_converge_mixed` as a graph function, traced once per layer and settings."""
        fns = self.__dict__.setdefault("_converge_mixed_fns", {})
        key = (tol, max_iterations, careful)
        if key not in fns:
            fns[key] = tf.function(
                lambda: self._converge_mixed(tol, max_iterations, careful), autograph=False
            )
        return fns[key]

    def _converge_mixed(self, tol, max_iterations, careful):
        kernel = self._kernel_value()
        if self._closed_form:
            return self._store(self.u, self.v, kernel, careful=careful)
        u1, v1 = self._fresh_estimate(kernel, tol, max_iterations)
        p, q = self.orders(kernel.dtype)
        apply, apply_t = self._operator(kernel)
        bits = tf.bitcast(tf.cast(tf.convert_to_tensor(self.sigma), tf.float32), tf.int32)
        res = norms.induced_norm_power_method(
            apply,
            apply_t,
            self._operator_input_shape,
            p,
            q,
            num_restarts=self.num_restarts(),
            max_iterations=max_iterations,
            tol=self._mixed_tol(tol),
            seed=tf.stack([tf.constant(2, tf.int32), bits]),
            dtype=kernel.dtype,
        )
        u2, v2 = tf.reshape(res.u, self.u.shape), tf.reshape(res.v, self.v.shape)
        better = self._sigma(kernel, u2, v2) > self._sigma(kernel, u1, v1)
        u, v = tf.cond(better, lambda: (u2, v2), lambda: (u1, v1))
        return self._store(u, v, kernel, careful=careful)

    def _power_step(self, u, v, kernel):
        v = _l2_normalize(self._apply_wt(u, kernel))
        u = _l2_normalize(self._apply_w(v, kernel))
        return u, v

    def _sigma(self, kernel, u, v):
        """u^T W v: differentiable in the kernel with u and v held constant.
        (Mixed norms: ||W v||_q / ||v||_p, or the closed form.)"""
        if not self.is_spectral:
            return self._mixed_sigma(kernel, v)
        return tf.reduce_sum(tf.stop_gradient(u) * self._apply_w(tf.stop_gradient(v), kernel))

    def _kernel_value(self, state=None):
        state = state or self._power_state()
        return tf.stop_gradient(state.kernel.read_value())

    def _power_state(self):
        return _PowerState(
            _backing(self.kernel),
            _backing(self.u),
            _backing(self.v),
            _backing(self.sigma),
            self._estimated_kernel,
            self._estimated_carefully,
        )

    def _matrix(self, kernel):
        """M with W = M^T when the layer's map is a matrix (dense, 1x1
        convolution), else None."""
        return None

    def _iterate_to_convergence(self, kernel, v, tol, max_iterations):
        """Power iteration from v until v moves by less than ``tol`` (2-norm) in
        one step, or about ``max_iterations`` steps; returns ``(u, v)`` with
        u = normalize(W v).

        The stopping rule is on the vector, not on sigma: when the top
        singular values are close, sigma changes little per step long before
        it is accurate. Asymptotically the relative error of sigma is at most
        half the last step's change of v, so ``tol`` bounds it by tol / 2.

        Matrix layers iterate on the squared smaller Gram matrix
        (:func:`_gram_power_iteration`); convolutions step
        v <- normalize(W^T W v) with a convolution and its transpose.
        """
        mat = self._matrix(kernel)
        if mat is not None:
            return _gram_power_iteration(mat, v, tol, max_iterations)

        def body(v, change):
            v2 = _l2_normalize(self._apply_wt(self._apply_w(v, kernel), kernel))
            return v2, tf.norm(tf.reshape(v2 - v, [-1]))

        v, _ = tf.while_loop(
            lambda v, change: change > tol,
            body,
            (_l2_normalize(v), tf.constant(np.inf, kernel.dtype)),
            maximum_iterations=int(max_iterations),
        )
        return _l2_normalize(self._apply_w(v, kernel)), v

    def _random_like(self, x, salt, state=None):
        """A deterministic unit-norm random tensor shaped like x, seeded by
        ``salt`` and the stored sigma: a function of the layer's state, so
        resumed runs and rebuilt models repeat it."""
        state = state or self._power_state()
        bits = tf.bitcast(tf.cast(state.sigma.read_value(), tf.float32), tf.int32)
        seed = tf.stack([tf.constant(salt, tf.int32), bits])
        return _l2_normalize(tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype))

    def _fresh_estimate(self, kernel, tol=None, max_iterations=None, state=None):
        """(u, v) re-converged from the stored v plus a small deterministic perturbation."""
        state = state or self._power_state()
        tol = self.tol if tol is None else float(tol)
        max_iterations = self.max_iterations if max_iterations is None else int(max_iterations)
        v = _l2_normalize(state.v.read_value())
        v = v + self._PERTURBATION * self._random_like(v, 0, state)
        if not self.is_spectral:
            return self._mixed_iteration(
                kernel,
                v,
                self._mixed_tol(tol),
                max_iterations,
                self.upkeep_restarts(),
                state.sigma,
            )
        return self._iterate_to_convergence(kernel, v, tol, max_iterations)

    def _store(self, u, v, kernel, current=True, state=None, careful=False):
        # Assign the backing tf.Variables: a Keras StatelessScope (active while
        # Keras builds a functional model symbolically) would otherwise turn
        # these assignments into no-ops in the cached graph function.
        state = state or self._power_state()
        state.u.assign(u)
        state.v.assign(v)
        sigma = self._sigma(kernel, u, v)
        state.sigma.assign(sigma)
        state.careful.assign(bool(current and careful))
        if current:
            state.estimated_kernel.assign(kernel)
            if self._has_learnable_order:
                self._estimated_orders.assign(self._order_vector())
        return sigma

    def estimate_is_current(self, state=None):
        """True (a bool tensor) when the stored u, v were converged for the
        current kernel (and learnable orders)."""
        state = state or self._power_state()
        current = tf.reduce_all(
            tf.equal(self._kernel_value(state), state.estimated_kernel.read_value())
        )
        if self._has_learnable_order:
            same = tf.reduce_all(tf.equal(self._order_vector(), self._estimated_orders))
            current = tf.logical_and(current, same)
        return current

    def _never_estimated(self):
        """True (eagerly) while no estimate was stored for a nonzero kernel."""
        return not bool(tf.reduce_any(self._estimated_kernel != 0))

    def mark_estimate_current(self):
        """Declares the stored u, v (e.g. just restored from a checkpoint) the
        estimate for the current kernel, so they are used as they are until the
        kernel changes. Keeps a restored model's outputs exactly as saved.

        Example: ``ckpt.restore(path); [l.mark_estimate_current() for l in layers]``.
        """
        self._estimated_kernel.assign(self._kernel_value())
        self._estimated_carefully.assign(False)
        if self._has_learnable_order:
            self._estimated_orders.assign(self._order_vector())

    def update_estimate(self):
        """Re-converges u, v if the kernel changed since the last estimate
        (warm-started; with a restart beside it after an abrupt change, see
        :meth:`_spectral_estimate`); returns the (u, v) to use, as tensors.
        Inside ``strategy.run`` of a multi-replica strategy the fresh estimate
        is used but not stored.

        In a graph the check runs once per trace and layer (later uses reuse
        it while no variable may have been written, :mod:`rflow_tf.tracing`),
        in a graph function shared by all layers of the same configuration and
        not inlined, so a flow of many blocks adds few nodes for it.

        Example: ``u, v = layer.update_estimate()``.
        """
        if not self.auto_update or _inside_vectorized_map() or self._closed_form:
            # (A closed-form sigma needs no estimate.)
            # vectorized_map cannot vectorise variable assignments, and the
            # weights cannot change within one map: use the stored estimate,
            # made current first, outside the map, if it is not.
            if self.auto_update and not self._closed_form:
                with tf.init_scope():
                    if tf.executing_eagerly() and not bool(self.estimate_is_current()):
                        self.converge()
            return tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)
        store = _can_store_in_context()
        if tf.executing_eagerly() and self.is_spectral:
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
            return memo.put(store, self._upkeep_function(store)())

    def _upkeep_signature(self, store):
        """Everything the traced upkeep depends on besides the variables in
        :class:`_PowerState`: layers with equal signatures share one function.
        None for learnable orders (their variables are not in the state) and
        distributed variables (a handle is one replica's)."""
        if self._has_learnable_order or any(
            isinstance(v, tf.distribute.DistributedValues) for v in self._power_state()
        ):
            return None
        return (
            type(self),
            store,
            self.kernel.dtype,
            tuple(self.kernel.shape),
            tuple(self.u.shape),
            tuple(self.v.shape),
            tuple(self._operator_input_shape),
            self.tol,
            self.max_iterations,
            self.domain,
            self.codomain,
        )

    def _upkeep_function(self, store):
        """A graph function running :meth:`_update_estimate`, traced once per
        configuration (see :meth:`_upkeep_signature`) and reused by every
        enclosing trace; returns a callable of no arguments."""
        signature = self._upkeep_signature(store)
        if signature is None:
            fns = self.__dict__.setdefault("_update_fns", {})
            if store not in fns:

                def lipschitz_upkeep():
                    return self._update_estimate(store)

                fns[store] = tf.function(lipschitz_upkeep, autograph=False)
            return fns[store]
        if signature not in _SHARED_UPKEEP:
            tracer = []  # a weak reference to the layer whose call is being traced

            def lipschitz_upkeep(*handles):
                layer = tracer[-1]()
                state = [_HandleVariable(h, v) for h, v in zip(handles, layer._power_state())]
                return layer._update_estimate(store, _PowerState(*state))

            # Not inlined: one copy of the body serves every call site (graph
            # optimisation and instantiation pay per inlined copy).
            fn = tf.function(
                lipschitz_upkeep, autograph=False, experimental_attributes={"_noinline": True}
            )
            _SHARED_UPKEEP[signature] = (fn, tracer)
        fn, tracer = _SHARED_UPKEEP[signature]
        handles = [v.handle for v in self._power_state()]

        def call():
            tracer.append(weakref.ref(self))
            try:
                return fn(*handles)
            finally:
                tracer.pop()

        return call

    def _update_estimate(self, store, state=None):
        state = state or self._power_state()
        kernel = self._kernel_value(state)

        def fresh():
            if self.is_spectral:
                u, v = self._spectral_estimate(kernel, state=state)
            else:
                u, v = self._fresh_estimate(kernel, state=state)
            if store:
                self._store(u, v, kernel, state=state)
            return u, v

        def stored():
            return state.u.read_value(), state.v.read_value()

        current = self.estimate_is_current(state)
        if tf.executing_eagerly():
            return stored() if bool(current) else fresh()
        return tf.cond(current, stored, fresh)

    def power_iterate(self, n):
        """Runs ``n`` power-iteration steps and stores u, v and sigma (a partial
        estimate: the next use of the kernel still re-converges it)."""
        kernel = self._kernel_value()
        u, v = tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)
        if not self.is_spectral:
            if not self._closed_form:
                u, v = self._mixed_iteration(kernel, v, 0.0, int(n))
                self._store(u, v, kernel, current=False)
            return
        for _ in range(int(n)):
            u, v = self._power_step(u, v, kernel)
        self._store(u, v, kernel, current=False)

    def converge(self, tol=None, max_iterations=None):
        """Power iteration to convergence; returns sigma.

        Two runs: one warm-started from the stored v (slightly perturbed) and
        a restart; the larger sigma is kept (both are lower bounds of ||W||_2,
        so the larger is the better one; the restart guards against a stored
        v with no component along the top singular vector, or one that power
        iteration would need thousands of steps to find). For dense layers and
        1x1 convolutions the restart begins at the top direction of Gram
        iteration, (W^T W)^1024 r, so sigma is accurate to float rounding
        whatever the spectrum; for k x k convolutions it begins at a
        deterministic random vector. A layer never estimated before has a
        random stored v, so it runs the restart alone. Convergence is judged on
        the singular vectors (see ``tol``). Training loops need not call it:
        the layer re-estimates by itself when its kernel changes. Call it
        before evaluation or export for the most careful estimate.

        Mixed norms: the closed form where there is one; elsewhere the larger
        of the warm start and the best of :meth:`num_restarts` random starts
        of the generalised power method.

        At the layer's own ``tol`` and ``max_iterations``, a kernel (and
        orders) unchanged since the last ``converge`` keeps that estimate: it
        is what converging again would find, so repeated calls (before
        evaluation, sampling, export) cost one comparison.

        Example: ``sigma = layer.converge()``.
        """
        at_defaults = (tol is None or float(tol) == self.tol) and (
            max_iterations is None or int(max_iterations) == self.max_iterations
        )
        tol = self.tol if tol is None else float(tol)
        max_iterations = self.max_iterations if max_iterations is None else int(max_iterations)

        def run():
            if not self.is_spectral:
                if tf.executing_eagerly():  # (many small ops per step: a graph runs them faster)
                    return self._converge_mixed_function(tol, max_iterations, at_defaults)()
                return self._converge_mixed(tol, max_iterations, careful=at_defaults)
            kernel = self._kernel_value()
            if tf.executing_eagerly() and self._never_estimated():
                # The stored v is random, so a warm start would be one more
                # random start; the restart alone suffices.
                u, v = self._restart(kernel, tol, max_iterations)
            else:
                u, v = self._careful_estimate(kernel, tol, max_iterations)
            return self._store(u, v, kernel, careful=at_defaults)

        if not at_defaults:
            return run()
        kept = tf.logical_and(self._estimated_carefully, self.estimate_is_current())
        if tf.executing_eagerly():
            return tf.convert_to_tensor(self.sigma) if bool(kept) else run()
        return tf.cond(kept, lambda: tf.identity(_backing(self.sigma)), run)

    def _careful_estimate(self, kernel, tol=None, max_iterations=None, state=None):
        """(u, v) of the larger sigma of the warm start and a restart (see :meth:`converge`)."""
        state = state or self._power_state()
        u1, v1 = self._fresh_estimate(kernel, tol, max_iterations, state)
        return self._with_restart(kernel, u1, v1, tol, max_iterations, state)

    def _with_restart(self, kernel, u1, v1, tol=None, max_iterations=None, state=None):
        """The larger-sigma pair of (u1, v1) and a restart from Gram iteration's
        top direction (matrices) or a deterministic random vector (convolutions)."""
        u2, v2 = self._restart(kernel, tol, max_iterations, state)
        better = self._sigma(kernel, u2, v2) > self._sigma(kernel, u1, v1)
        return tf.cond(better, lambda: (u2, v2), lambda: (u1, v1))

    def _restart(self, kernel, tol=None, max_iterations=None, state=None):
        """(u, v) of the largest sigma converged from :meth:`_restart_vectors`,
        ignoring the stored v."""
        state = state or self._power_state()
        tol = self.tol if tol is None else float(tol)
        max_iterations = self.max_iterations if max_iterations is None else int(max_iterations)
        starts = self._restart_vectors(kernel, self._random_like(state.v.read_value(), 1, state))
        u, v = self._iterate_to_convergence(kernel, starts[0], tol, max_iterations)
        for v0 in starts[1:]:
            u2, v2 = self._iterate_to_convergence(kernel, v0, tol, max_iterations)
            better = self._sigma(kernel, u2, v2) > self._sigma(kernel, u, v)
            u, v = tf.cond(better, lambda: (u2, v2), lambda: (u, v))
        return u, v

    def _restart_vectors(self, kernel, v):
        """A restart's first v: Gram iteration's top direction (W^T W)^1024 v for
        a matrix, else the deterministic random v itself."""
        mat = self._matrix(kernel)
        return [v if mat is None else _gram_top_vector(mat, v)]

    #: A kernel that moved by more than this fraction (Frobenius norm) since its
    #: last estimate is re-estimated carefully (:meth:`_careful_estimate`).
    _ABRUPT_CHANGE = 0.1

    def _spectral_estimate(self, kernel, state):
        """The in-call re-estimate: warm-started power iteration after the small
        change of an optimiser step; after an abrupt change (a new kernel
        assigned, a restored checkpoint) the warm start may sit on a singular
        vector that is no longer the top one, where power iteration stalls, so
        a restart runs beside it (:meth:`_careful_estimate`). The warm start is
        built once, outside the branch."""
        moved = tf.norm(tf.reshape(kernel - state.estimated_kernel.read_value(), [-1]))
        abrupt = moved > self._ABRUPT_CHANGE * tf.norm(tf.reshape(kernel, [-1]))
        u1, v1 = self._fresh_estimate(kernel, state=state)
        if tf.executing_eagerly():
            return self._with_restart(kernel, u1, v1, state=state) if bool(abrupt) else (u1, v1)
        return tf.cond(
            abrupt,
            lambda: self._with_restart(kernel, u1, v1, state=state),
            lambda: (tf.identity(u1), tf.identity(v1)),
        )

    def sigma_upper_bound(self, n_iterations=12):
        """A certified upper bound on the operator norm ||W||_2 of the layer's
        linear map (raw kernel, before normalisation), by Gram iteration
        (Delattre et al., ICML 2023): with G_0 = W, G_{t+1} = G_t^H G_t,

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
        if not self.is_spectral:
            if self._closed_form:
                return self._mixed_sigma(self._kernel_value(), self.v)
            raise ValueError(
                f"{self.name}: no certified upper bound of the {_order_label(self.domain)}->"
                f"{_order_label(self.codomain)} norm (only for 2->2, domain 1 or codomain inf)"
            )
        mats = self._gram_operators(self._kernel_value())
        return _gram_iteration_bound(mats, int(n_iterations))

    def effective_kernel(self):
        """W / max(1, sigma / coeff) with sigma = u^T W v (gradient through sigma),
        from a converged estimate for the current kernel (see :meth:`update_estimate`)."""
        u, v = self.update_estimate()
        kernel = tf.convert_to_tensor(self.kernel)
        sigma = self._sigma(kernel, u, v)
        return kernel / tf.maximum(tf.ones_like(sigma), sigma / self.coeff)

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
            "domain": _order_config(self.domain),
            "codomain": _order_config(self.codomain),
        }


def _smaller_gram(mat):
    """The smaller Gram matrix of M [n_in, n_out] and whether it is M^T M
    (n_in > n_out, acting on R^n_out) rather than M M^T (acting on R^n_in)."""
    wide = mat.shape[0] > mat.shape[1]
    if wide:
        return tf.matmul(mat, mat, transpose_a=True), True
    return tf.matmul(mat, mat, transpose_b=True), False


#: Steps of the squared Gram matrix (two power steps each) per convergence
#: check in :func:`_gram_power_iteration`: the check and the loop's own
#: bookkeeping cost more graph ops than a step, and the graph pays per op.
_GRAM_STEPS_PER_CHECK = 4


def _gram_power_iteration(mat, v, tol, max_iterations):
    """Power iteration for the matrix W = M^T (M = ``mat`` [n_in, n_out]) on the
    smaller Gram matrix G (W^T W if n_in <= n_out, else W W^T), squared:

        x <- normalize(G^2 x)      (two power steps in one matrix-vector product)

    from x = v (or W v), until x moves by less than ``tol`` in one such step
    (checked every :data:`_GRAM_STEPS_PER_CHECK` steps, so at most 3 extra
    steps, each making the estimate more accurate), or about
    ``max_iterations`` power steps. Returns ``(u, v)`` with v the top right
    singular vector estimate and u = normalize(W v), as the plain iteration.
    G is rescaled by its largest entry (no overflow); a zero matrix gives
    zero vectors (sigma 0), as the plain iteration does.

    Example: ``u, v = _gram_power_iteration(m, tf.ones([m.shape[0]]), 5e-4, 200)``.
    """
    gram, wide = _smaller_gram(mat)  # wide: iterate on u in R^n_out
    x = tf.linalg.matvec(mat, v, transpose_a=True) if wide else v
    gram = gram / (tf.reduce_max(tf.abs(gram)) + 1e-30)
    gram2 = tf.matmul(gram, gram)
    k = _GRAM_STEPS_PER_CHECK

    def body(x, change):
        for _ in range(k - 1):
            x = _l2_normalize(tf.matmul(gram2, x))
        x2 = _l2_normalize(tf.matmul(gram2, x))
        return x2, tf.norm(x2 - x)

    x, _ = tf.while_loop(
        lambda x, change: change > tol,
        body,
        (_l2_normalize(x)[:, None], tf.constant(np.inf, mat.dtype)),
        maximum_iterations=-(-int(max_iterations) // (2 * k)),
    )
    x = x[:, 0]
    v = _l2_normalize(tf.linalg.matvec(mat, x)) if wide else x
    return _l2_normalize(tf.linalg.matvec(mat, v, transpose_a=True)), v


def _gram_top_vector(mat, v, n_squarings=10):
    """(M M^T)^(2^n) applied to a start vector, for the matrix map
    v -> M^T v of a kernel M [n_in, n_out] (v and the result in R^n_in):
    components along singular values s_i shrink like (s_i / s_1)^(2^(n+1)).
    Uses the smaller Gram matrix; rescaled at every squaring."""
    gram, transpose = _smaller_gram(mat)
    for _ in range(n_squarings):
        gram = gram / tf.reduce_max(tf.abs(gram))
        gram = tf.matmul(gram, gram)
    if transpose:  # iterate in R^n_out, then map back: v = M u
        u = tf.linalg.matvec(gram, tf.linalg.matvec(mat, v, transpose_a=True))
        return _l2_normalize(tf.linalg.matvec(mat, u))
    return _l2_normalize(tf.linalg.matvec(gram, v))


def _kernel_symbol(kernel, w1, w2):
    """The symbol S(w) = sum_a K[a]^T exp(-i w . (a - c)) of a 'same' convolution
    with kernel K [kh, kw, c_in, c_out] (c its centre tap) at the frequencies
    (w1[f], w2[f]): [F, c_out, c_in]. The convolution maps the plane wave
    exp(-i w . p) z to exp(-i w . p) S(w) z."""
    kh, kw = kernel.shape[:2]
    real = w1.dtype
    a = tf.cast(tf.range(kh) - (kh - 1) // 2, real)
    b = tf.cast(tf.range(kw) - (kw - 1) // 2, real)
    phase = w1[:, None, None] * a[None, :, None] + w2[:, None, None] * b[None, None, :]
    complex_dtype = tf.complex64 if real == tf.float32 else tf.complex128
    waves = tf.exp(tf.complex(tf.zeros_like(phase), -phase))
    return tf.einsum("fab,abio->foi", waves, tf.cast(kernel, complex_dtype))


def _top_right_singular(symbols):
    """Largest singular values [F] and right singular vectors [F, c_in] of a
    batch of complex matrices [F, c_out, c_in], from the smaller Gram side."""
    c_out, c_in = symbols.shape[-2:]
    if c_in <= c_out:
        values, vectors = tf.linalg.eigh(tf.matmul(symbols, symbols, adjoint_a=True))
        return tf.math.real(values[:, -1]), vectors[:, :, -1]
    values, vectors = tf.linalg.eigh(tf.matmul(symbols, symbols, adjoint_b=True))
    right = tf.linalg.matvec(symbols, vectors[:, :, -1], adjoint_a=True)
    norm = tf.cast(tf.norm(right, axis=-1, keepdims=True) + 1e-30, right.dtype)
    return tf.math.real(values[:, -1]), right / norm


def plane_wave_start(kernel, input_hw, n_candidates=4, coarse=32):
    """A start vector for power iteration on the zero-padded 'same' convolution
    x -> conv(x, K) over H x W maps: the top singular vector of that map is
    close to a plane wave under the lowest Dirichlet mode,

        v[p, q, :] = sin(pi (p + 1) / (H + 1)) sin(pi (q + 1) / (W + 1))
                     * Re(exp(-i (w1 p + w2 q)) z),

    where (w1, w2) maximises the largest singular value of the kernel's symbol
    S(w) = sum_a K[a]^T exp(-i w . (a - c)) and z is the matching right
    singular vector (for large maps the operator norm tends to
    max_w ||S(w)||_2). The maximiser is found on a ``coarse`` x ``coarse``
    frequency grid, then on a grid of pi / (H + 1) x pi / (W + 1) around each of
    the ``n_candidates`` best coarse frequencies. Power iteration from this
    vector converges in tens of steps where a random start needs hundreds on
    large maps (its top singular values are close), and a random start cut
    off at a step budget under-reports the norm. Deterministic: a function of
    the kernel. Returns a unit-norm [1, H, W, c_in] tensor.

    Example:
    ```python
    k = tf.random.normal([3, 3, 4, 16])
    v0 = plane_wave_start(k, (32, 32))   # [1, 32, 32, 4]
    ```
    """
    kernel = tf.convert_to_tensor(kernel)
    real = kernel.dtype
    h, w = (int(n) for n in input_hw)
    grid = tf.range(coarse, dtype=real) * (2 * np.pi / coarse)
    g1, g2 = (tf.reshape(g, [-1]) for g in tf.meshgrid(grid, grid, indexing="ij"))
    values, _ = _top_right_singular(_kernel_symbol(kernel, g1, g2))
    best = tf.math.top_k(values, min(int(n_candidates), coarse * coarse)).indices

    def offsets(n):  # steps of pi / (n + 1), spanning one coarse cell each way
        step = np.pi / (n + 1)
        r = int(np.ceil((2 * np.pi / coarse) / step))
        return tf.range(-r, r + 1, dtype=real) * step

    o1, o2 = (tf.reshape(o, [-1]) for o in tf.meshgrid(offsets(h), offsets(w), indexing="ij"))
    f1 = tf.reshape(tf.gather(g1, best)[:, None] + o1[None], [-1])
    f2 = tf.reshape(tf.gather(g2, best)[:, None] + o2[None], [-1])
    values, vectors = _top_right_singular(_kernel_symbol(kernel, f1, f2))
    i = tf.argmax(values)
    p = tf.range(h, dtype=real)
    q = tf.range(w, dtype=real)
    phase = f1[i] * p[:, None] + f2[i] * q[None, :]
    wave = tf.complex(tf.cos(phase), -tf.sin(phase))
    envelope = tf.sin(np.pi * (p + 1) / (h + 1))[:, None] * tf.sin(np.pi * (q + 1) / (w + 1))
    v = tf.math.real(wave[:, :, None] * vectors[i][None, None, :]) * envelope[:, :, None]
    return _l2_normalize(v[None])


def _frobenius(g):
    """Frobenius norms of a batch of (real or complex) matrices, as reals."""
    return tf.sqrt(tf.reduce_sum(tf.square(tf.abs(g)), axis=[-2, -1]))


def _gram_iteration_bound(mats, n_iterations):
    """max over a batch of matrices [..., m, n] of the Gram-iteration bound
    ||G_t||_F^(1/2^t) >= ||G_0||_2, with rescaling: G_t = c_t H_t, log c_t
    tracked separately. Uses the smaller Gram side."""
    g = tf.convert_to_tensor(mats)
    if g.shape[-2] < g.shape[-1]:
        g = tf.linalg.adjoint(g)
    log_scale = tf.zeros(tf.shape(g)[:-2], g.dtype.real_dtype)
    for t in range(n_iterations):
        fro = tf.maximum(_frobenius(g), tf.cast(1e-30, log_scale.dtype))
        g = g / tf.cast(fro, g.dtype)[..., None, None]
        log_scale = log_scale + tf.math.log(fro) / (2.0**t)
        g = tf.matmul(g, g, adjoint_a=True)
    fro = tf.maximum(_frobenius(g), tf.cast(1e-30, log_scale.dtype))
    log_bound = log_scale + tf.math.log(fro) / (2.0**n_iterations)
    return tf.exp(tf.reduce_max(log_bound))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LipschitzDense(_SpectralNormalized):
    """Dense layer with spectral norm at most ``coeff``: y = x W_eff + b,
    W_eff = W / max(1, sigma / coeff), sigma ~= ||W||_2 by power iteration.

    ``power_iterations`` steps run inside ``call(training=True)``; call
    :meth:`converge` (or :func:`converge_lipschitz`) after each optimiser step.

    ``domain``, ``codomain``: orders p, q in [1, inf] (``"f"`` = inf) or
    :class:`LearnableOrder` instances; then sigma ~= ||W||_{p->q} and
    ||x W_eff - y W_eff||_q <= coeff ||x - y||_p (see the mixed-norm notes
    of the shared machinery above). Default 2, 2: the spectral norm.

    Example:
    ```python
    layer = LipschitzDense(64, coeff=0.9)
    y = layer(tf.zeros([8, 2]))
    layer.converge()
    mixed = LipschitzDense(2, coeff=0.9, domain="f", codomain=3)   # ||W||_{inf->3} <= 0.9
    y = mixed(tf.zeros([8, 64]))
    ```
    """

    def __init__(
        self,
        units,
        coeff=0.98,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(coeff=coeff, **kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        d_in = input_shape[-1]
        if d_in is None:
            raise ValueError("LipschitzDense needs a known last input dimension")
        self.kernel = self.add_weight(
            name="kernel", shape=(d_in, self.units), initializer=self.kernel_initializer
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=_bias_initializer(self.bias_initializer, self.kernel.shape),
            )
            if self.use_bias
            else None
        )
        self._operator_input_shape = [1, int(d_in)]
        self._init_power_vectors((self.units,), (d_in,))

    def _matrix(self, kernel):
        return kernel

    def _apply_w(self, v, kernel):  # W v with W = kernel^T
        return tf.linalg.matvec(kernel, v, transpose_a=True)

    def _apply_wt(self, u, kernel):  # W^T u
        return tf.linalg.matvec(kernel, u)

    def _gram_operators(self, kernel):
        return kernel[None]

    def apply_kernel(self, x, kernel):
        """x W for a batch of rows x (no bias)."""
        return tf.matmul(x, kernel)

    def apply_kernel_transpose(self, u, kernel):
        """u W^T: the transposed map, for vector-Jacobian products."""
        return tf.matmul(u, kernel, transpose_b=True)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LipschitzConv2D(_SpectralNormalized):
    """Stride-1 'same' convolution whose operator norm is at most ``coeff``.

    sigma is the largest singular value of the *whole* linear map
    x -> conv(x, W) on the layer's input size (zero padding included),
    estimated by power iteration with conv2d and conv2d_transpose over
    feature maps u (output-shaped) and v (input-shaped). For 1x1 kernels the
    operator norm equals the kernel's matrix norm and vectors of size C are
    used. The layer therefore needs static input height and width.

    ``domain``, ``codomain``: as for :class:`LipschitzDense`; the induced
    norm ||.||_{p->q} is that of the whole padded convolution (1x1 kernels
    included: for q < p it grows with the number of pixels).

    Example:
    ```python
    conv = LipschitzConv2D(32, 3, coeff=0.98)
    y = conv(tf.zeros([4, 8, 8, 3]))
    mixed = LipschitzConv2D(3, 3, coeff=0.98, domain=3, codomain=2)
    y = mixed(tf.zeros([4, 8, 8, 32]))
    ```
    """

    def __init__(
        self,
        filters,
        kernel_size,
        coeff=0.98,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(coeff=coeff, **kwargs)
        self.filters = int(filters)
        ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 2
        self.kernel_size = tuple(int(k) for k in ks)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    @property
    def _is_pointwise(self):
        return self.kernel_size == (1, 1)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"LipschitzConv2D expects [batch, H, W, C] input, got {input_shape}")
        _, h, w, c = input_shape
        if c is None or (not self._is_pointwise and (h is None or w is None)):
            raise ValueError(
                "LipschitzConv2D needs static input height, width and channels to compute "
                f"the operator norm of the padded convolution; got input shape {input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=self.kernel_size + (c, self.filters),
            initializer=self.kernel_initializer,
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=_bias_initializer(self.bias_initializer, self.kernel.shape),
            )
            if self.use_bias
            else None
        )
        self._input_hw = (h, w)
        if not self.is_spectral and (h is None or w is None):
            raise ValueError(
                f"LipschitzConv2D with the {_order_label(self.domain)}->"
                f"{_order_label(self.codomain)} norm needs static input height and width: "
                f"the induced norm is that of the whole convolution; got input shape "
                f"{input_shape}"
            )
        self._operator_input_shape = [1, h, w, c]
        if self._is_pointwise and self.is_spectral:
            self._init_power_vectors((self.filters,), (c,))
        else:
            self._init_power_vectors((1, h, w, self.filters), (1, h, w, c))

    def _matrix(self, kernel):
        return kernel[0, 0] if self._is_pointwise else None

    def _apply_w(self, v, kernel):  # (spectral path only)
        if self._is_pointwise:
            return tf.linalg.matvec(kernel[0, 0], v, transpose_a=True)
        return self.apply_kernel(v, kernel)

    def _apply_wt(self, u, kernel):
        if self._is_pointwise:
            return tf.linalg.matvec(kernel[0, 0], u)
        return self.apply_kernel_transpose(u, kernel)

    #: Plane-wave restarts (:func:`plane_wave_start`) for k x k kernels whose
    #: smaller channel count is at most this; wider kernels restart at random.
    _PLANE_WAVE_MAX_CHANNELS = 64
    #: Maps of at least this many pixels restart at the plane wave alone;
    #: smaller maps also run the random start and keep the larger sigma.
    _PLANE_WAVE_ALONE_PIXELS = 32 * 32

    def _restart_vectors(self, kernel, v):
        """A k x k convolution restarts at :func:`plane_wave_start` too. On large
        maps the top singular values crowd together: a random start then needs
        hundreds of steps (measured on 32 x 32 maps: cut off at 200, it
        under-reported the norm by up to 0.6%) where the plane wave needs tens
        and is within 1e-4. On small maps the plane wave may sit closer to the
        second singular vector than to the first, so the (cheap) random start
        runs beside it."""
        kh, kw, c_in, c_out = kernel.shape
        if self._is_pointwise or min(c_in, c_out) > self._PLANE_WAVE_MAX_CHANNELS:
            return super()._restart_vectors(kernel, v)
        wave = plane_wave_start(kernel, self._input_hw)
        if self._input_hw[0] * self._input_hw[1] >= self._PLANE_WAVE_ALONE_PIXELS:
            return [wave]
        return [v, wave]

    def _gram_operators(self, kernel):
        """The matrices whose largest norm bounds the operator norm: the 1x1
        kernel itself, or the per-frequency matrices of the circular
        convolution on an (H + kh - 1) x (W + kw - 1) torus."""
        if self._is_pointwise:
            return kernel[0, 0][None]
        kh, kw, c_in, c_out = kernel.shape
        n1, n2 = self._input_hw[0] + kh - 1, self._input_hw[1] + kw - 1
        padded = tf.pad(kernel, [[0, n1 - kh], [0, n2 - kw], [0, 0], [0, 0]])
        spectrum = tf.signal.fft2d(
            tf.cast(
                tf.transpose(padded, [2, 3, 0, 1]),
                tf.complex64 if kernel.dtype == tf.float32 else tf.complex128,
            )
        )
        return tf.reshape(tf.transpose(spectrum, [2, 3, 1, 0]), [n1 * n2, c_out, c_in])

    def apply_kernel(self, x, kernel):
        """conv(x, kernel) for a batch of feature maps (no bias)."""
        return tf.nn.conv2d(x, kernel, strides=1, padding="SAME")

    def apply_kernel_transpose(self, u, kernel):
        """The transposed convolution, for vector-Jacobian products."""
        shape = tf.concat([tf.shape(u)[:-1], [kernel.shape[2]]], 0)
        return tf.nn.conv2d_transpose(u, kernel, output_shape=shape, strides=1, padding="SAME")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


#: Attributes through which bijectors, distributions and flows reach their parts.
_PART_ATTRIBUTES = (
    "net",
    "layer",
    "bijector",
    "bijectors",
    "distribution",
    "stages",
    "inner",
    "layers_for_lipschitz",
)


def keras_layers(obj):
    """The outermost Keras layers (and models) inside ``obj``: a Keras layer,
    a bijector (Chain, Invert, IResBlock, ActNorm, ...), a distribution, or a
    list of these, each once. Their weights are all of ``obj``'s weights.

    Example:
    ```python
    weights = [w for layer in keras_layers(dist) for w in layer.weights]
    ```
    """
    found, seen = [], set()

    def visit(o):
        if o is None or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, (list, tuple)):
            for item in o:
                visit(item)
            return
        if isinstance(o, keras.layers.Layer):
            found.append(o)
            return
        for attr in _PART_ATTRIBUTES:
            if hasattr(o, attr):
                try:
                    part = getattr(o, attr)
                except (AttributeError, NotImplementedError):
                    continue
                if isinstance(part, (list, tuple, keras.layers.Layer)) or isinstance(
                    part, tf.Module
                ):
                    visit(part)

    visit(obj)
    return found


def lipschitz_layers(obj):
    """All spectrally normalised layers inside ``obj``: a Keras layer or model,
    a bijector (Chain, Invert, IResBlock, ...), a TransformedDistribution, or
    a list of these (see :func:`keras_layers`).

    Example:
    ```python
    for layer in lipschitz_layers(flow):
        print(layer.name, float(layer.sigma))
    ```
    """
    found, found_ids = [], set()
    for top in keras_layers(obj):
        for layer in top._flatten_layers(include_self=True, recursive=True):
            if isinstance(layer, _SpectralNormalized) and id(layer) not in found_ids:
                found_ids.add(id(layer))
                found.append(layer)
    return found


def converge_lipschitz(obj, tol=None, max_iterations=None, progress=None):
    """Runs power iteration to convergence in every Lipschitz layer of ``obj``
    (see :func:`lipschitz_layers`; a layer, model, bijector, distribution or a
    list of these); returns the list of sigma estimates.

    Not needed for the bound during training: every layer re-estimates by
    itself when its kernel has changed (see :func:`update_lipschitz`). This is
    the careful version for before evaluation or export: a warm-started and a
    randomly restarted power iteration per layer, the larger sigma kept.
    ``tol`` and ``max_iterations`` default to each layer's own settings.
    ``progress``, if given, is called as ``progress(done, total)`` after each
    layer (eagerly: for progress lines on large models).

    Example:
    ```python
    converge_lipschitz(flow)
    ```
    """
    layers = lipschitz_layers(obj)
    if not layers:
        raise ValueError(
            f"converge_lipschitz: no Lipschitz layers found in {type(obj).__name__}"
            " (expected a Keras layer or model, a bijector, a distribution or a "
            "list of these)"
        )
    sigmas = []
    for layer in layers:
        sigmas.append(layer.converge(tol, max_iterations))
        if progress is not None:
            progress(len(sigmas), len(layers))
    return sigmas


def update_lipschitz(obj):
    """Re-estimates sigma (warm-started power iteration to convergence) in
    every Lipschitz layer of ``obj`` whose kernel changed since its last
    estimate; unchanged layers cost one comparison. This is what each layer
    does by itself on its next use; calling it right after an optimiser step
    (in cross-replica context, as the trainer does) keeps the stored state
    current for every replica.

    Example:
    ```python
    optimizer.apply_gradients(zip(grads, variables))
    update_lipschitz(flow)
    ```
    """
    for layer in lipschitz_layers(obj):
        layer.update_estimate()


def learned_orders(obj):
    """The learnable norm orders (:class:`LearnableOrder`) in the Lipschitz
    layers of ``obj`` (as :func:`lipschitz_layers`), each once, as a dict
    ``{"<layer name>.<domain|codomain>": p}`` of Python floats, named after the
    first layer (in order) that uses it; empty for fixed orders.

    Example:
    ```python
    block = rflow_tf.bijectors.IResBlock.dense(2, (8, 8), vnorms="2332", learn_p=True)
    learned_orders(block)     # {'lipschitz_dense.domain': 2.0, ...: 3.0, ...: 3.0}
    ```
    """
    found, seen = {}, set()
    for layer in lipschitz_layers(obj):
        for which in ("domain", "codomain"):
            order = getattr(layer, which)
            if isinstance(order, LearnableOrder) and id(order) not in seen:
                seen.add(id(order))
                found[f"{layer.name}.{which}"] = float(order.order())
    return found


def mark_lipschitz_current(obj):
    """Declares the stored power-iteration state of every Lipschitz layer in
    ``obj`` current for its kernel (see
    :meth:`LipschitzDense.mark_estimate_current`): used after restoring a
    checkpoint, so a restored model computes exactly what it computed when saved.

    Example:
    ```python
    tf.train.Checkpoint(model=flow).restore(path)
    mark_lipschitz_current(flow)
    ```
    """
    for layer in lipschitz_layers(obj):
        layer.mark_estimate_current()
