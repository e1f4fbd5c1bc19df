"""TFP bijectors for residual flows.

Direction convention
--------------------
Every bijector here maps **data to latent** in its ``forward`` direction, the
cheap direction of an invertible residual block f(x) = x + g(x) (the paper's
f). A flow is therefore used in a ``tfd.TransformedDistribution`` through
``tfb.Invert``:

```python
flow = tfb.Chain([block3, block2, block1])        # data -> latent
dist = tfd.TransformedDistribution(
    tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(flow))
dist.log_prob(x)   # runs flow.forward + its log-det: cheap, unbiased
dist.sample(8)     # runs flow.inverse: fixed-point iteration per block
```

Randomness and caching
----------------------
The log-determinant of :class:`IResBlock` is a random estimate. Each call
accepts a stateless ``seed`` (and a ``training`` switch) as bijector kwargs;
inside a ``Chain`` route them by name, e.g.
``chain.forward_log_det_jacobian(x, 1, block_0={"seed": s})``, or use
:func:`flow_kwargs` to build the nested dict for every block. The bijectors in
this module replace TFP's result cache: ``forward`` is always recomputed
(weights change during training), log-dets are never cached (a cached random
estimate would be a stale sample, or give ``None`` gradients under a new
tape), and ``inverse(y)`` of a still-alive output ``y`` of ``forward`` returns
its input, so ``TransformedDistribution.log_prob`` never runs a fixed-point
inversion.

Variables
---------
``trainable_variables`` of these bijectors (and of any ``Chain`` or
``TransformedDistribution`` containing them) lists the Keras weights, so
``tfp.math.minimize(loss, ..., trainable_variables=dist.trainable_variables)``
trains the flow.
"""

import itertools
import math
import sys
import warnings
import weakref

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from rflow_tf import estimators as est
from rflow_tf import layers as rlayers

tfb = tfp.bijectors

__all__ = [
    "IResBlock",
    "ActNorm",
    "Squeeze",
    "SQUEEZE_ORDERS",
    "LogitTransform",
    "LOGDET_MODES",
    "flow_kwargs",
    "use_fixed_seed",
]

LOGDET_MODES = ("unbiased", "truncated", "exact")
# tfb.Chain / tfb.Invert are auto-composite subclasses of these base classes.
_INVERT_TYPES = (tfp.bijectors.invert._Invert,)
_BLOCK_IDS = itertools.count()


class _InverseMemo:
    """y -> x for outputs y of ``forward`` that are still alive (weak keys)."""

    def __init__(self):
        self._entries = {}

    def remember(self, y, x):
        key = id(y)
        self._entries[key] = (weakref.ref(y, lambda _, key=key: self._entries.pop(key, None)), x)

    def recall(self, y):
        entry = self._entries.get(id(y))
        return entry[1] if entry is not None and entry[0]() is y else None


def _reproduces(y_now, y):
    """True (a bool tensor) when ``y_now`` equals ``y`` to 64 ulps of max|y|:
    the same forward pass under the same weights (only reordering round-off)."""
    tol = 64 * float(np.finfo(y.dtype.as_numpy_dtype).eps) * (1.0 + tf.reduce_max(tf.abs(y)))
    return tf.reduce_all(tf.abs(y_now - y) <= tol)


class _FreshBijectorCache(cache_util.BijectorCache):
    """Replaces TFP's bijector cache for bijectors whose weights change.

    * ``forward(x)`` is always recomputed (never a stale value computed under
      other weights or outside the current tape);
    * ``inverse(y)`` of a ``y`` that ``forward`` returned and that is still
      alive gives back that ``x`` without running the inverse -- this is what
      ``TransformedDistribution.log_prob`` relies on to avoid a fixed-point
      inversion at the latent point -- but only while ``forward(x)`` still
      reproduces ``y`` (checked by one cheap forward pass, in graphs with a
      ``tf.cond``): after any change of the weights the inverse is computed;
    * log-det "attributes" are never stored, so a random log-det estimate is
      fresh on every call.
    """

    _memos = weakref.WeakKeyDictionary()     # bijector -> _InverseMemo

    def _memo(self):
        return self._memos.setdefault(self.bijector, _InverseMemo())

    def forward(self, x, **kwargs):
        y = self.bijector._forward(x, **kwargs)
        self._memo().remember(y, x)
        return y

    def inverse(self, y, **kwargs):
        x = self._memo().recall(y)
        if x is None:
            return self.bijector._inverse(y, **kwargs)
        still_valid = _reproduces(self.bijector._forward(x, **kwargs), y)
        if tf.executing_eagerly():
            return x if bool(still_valid) else self.bijector._inverse(y, **kwargs)
        return tf.cond(still_valid, lambda: tf.identity(x),
                       lambda: self.bijector._inverse(y, **kwargs))

    def _attributes(self, input, fn_name, **kwargs):  # noqa: A002 (TFP's signature)
        return {}


class _EqualOnlyToItself:
    """Equality and hash by identity, for bijectors that hold weights.

    TFP compares bijectors by their constructor ``parameters``; two
    bijectors built with the same arguments but holding different Keras
    weights must never compare equal (``tf.function`` would reuse one's
    trace for the other, and TFP caches key on bijectors).
    """

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def __hash__(self):
        return id(self)


class _KerasBacked(_EqualOnlyToItself, tfb.Bijector):
    """Base for bijectors whose weights live in Keras 3 layers.

    tf.Module cannot see Keras 3 variables, so the underlying ``tf.Variable``s
    are mirrored in an attribute that tf.Module's traversal finds.
    """

    _cache = _FreshBijectorCache()

    def _track_keras(self, *keras_objects):
        variables = []
        for obj in keras_objects:
            variables.extend(w.value for w in obj.weights)
        self._keras_tf_variables = tuple(variables)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}


def _zeros_for_none(grads, targets):
    """Gradients with each ``None`` (unconnected) replaced by zeros shaped like its target."""
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, targets)]


def _as_float_tensor(x, name):
    x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
    if not x.dtype.is_floating:
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype.name}")
    return x


def _check_stateless_seed(seed, name):
    """``None``, or a stateless seed (two integers) as a tuple of two Python
    ints; a ValueError naming ``name`` for anything else."""
    if seed is None:
        return None
    try:
        arr = np.asarray(tf.get_static_value(seed) if tf.is_tensor(seed) else seed)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (2,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be None or a stateless seed of two ints, e.g. (1, 2); "
                         f"got {seed!r}")
    return tuple(int(v) for v in arr)


class IResBlock(_KerasBacked):
    """Invertible residual block f(x) = x + g(x) with Lip(g) < 1.

    forward (data -> latent):  y = x + net(x)
    inverse (latent -> data):  fixed point x <- y - net(x), starting at x = y;
        converges geometrically (Banach) at rate Lip(g).
    log |det df/dx| = log det(I + J_g) = sum_{k>=1} (-1)^(k+1)/k tr(J_g^k), estimated by

    * ``logdet="unbiased"`` (default): Russian roulette over the power series
      with Hutchinson probes (paper Theorem 1, eq. 6). N ~ ``dist``
      (``"poisson"`` with ``rate``, or ``"geometric"`` with ``p``), n = N + m
      terms with m = ``n_exact_terms`` when ``training=True`` and
      ``n_exact_terms_eval`` otherwise (paper: 2 and 20), averaged over
      ``n_samples`` draws of N. E[estimate] = log det(I + J).
    * ``logdet="truncated"``: the first ``n_terms`` terms, weight 1 (the
      i-ResNet estimator; biased low in magnitude, bias grows with Lip(g)).
    * ``logdet="exact"``: ``slogdet(I + J)`` of the full Jacobian (small D,
      e.g. 2-D toy data).

    ``logdet`` is the estimator of ``training=True`` calls; ``logdet_eval``
    (default: the same) that of evaluation calls, so a block trained with the
    biased truncated series can report its true log-det (the reference always
    evaluates with the unbiased estimator and 20 exact terms).

    Gradients of the estimated log-det:

    * ``neumann_grad=True`` (default): from the Neumann series (Theorem 2,
      eq. 8), u^T (dJ/dtheta) v with u = sum_j (-1)^j c_{j+1} v^T J^j. The
      series itself is not differentiated, so memory does not grow with the
      number of terms. The forward pass keeps only x (and u, v); the
      backward pass recomputes g(x) and differentiates g and the surrogate
      u^T J v together, so one backward pass through g serves both (the
      fastest mode, and activations are not held between blocks).
    * ``grad_in_forward=True``: the log-det gradients w.r.t. x and the net's
      weights are computed during the forward pass (eq. 9, the reference's
      memory-saving mode) and the backward pass multiplies them by the
      per-example upstream gradient (exactly: if the upstream gradient
      differs between examples the weight gradient is recomputed with those
      per-example factors). g's activations are kept for the path gradient,
      as in ordinary backprop: one more backward pass through g per block and
      more memory than the default, which is preferable outside parity runs.
    * ``neumann_grad=False``: plain backpropagation through the power series
      (memory grows with the number of terms; for comparison).

    For the nets of :func:`rflow_tf.layers.lipschitz_dense_net` and
    :func:`rflow_tf.layers.lipschitz_conv_net` the vector-Jacobian products
    of the series and the Jacobian-vector product of the surrogate use the
    explicit Jacobian factors of :class:`rflow_tf.layers.JacobianChain`;
    any other net is differentiated automatically. Every mode compiles with
    XLA (``jit_compile=True``).

    The value returned is always the real log-det estimate, never a
    surrogate, so training logs show true bits/dim.

    Call kwargs (route through ``Chain`` by name): ``seed`` (stateless seed,
    shape [2]) and ``training`` (bool; default False = evaluation settings).
    Without a ``seed`` a call uses ``default_seed`` (constructor argument or
    :attr:`default_seed`; see :func:`use_fixed_seed`): None draws a fresh
    random seed per call, two ints make the estimate deterministic.
    The net must act on each example independently (no batch statistics).

    Example:
    ```python
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import IResBlock
    tfb, tfd = tfp.bijectors, tfp.distributions

    blocks = [IResBlock.dense(2, hidden_units=(64, 64), coeff=0.9) for _ in range(4)]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(blocks)))
    lp = dist.log_prob(tf.random.normal([16, 2]))     # unbiased estimate
    x = dist.sample(5)                                 # fixed-point inverse
    ```
    """

    def __init__(self, net, *, logdet="unbiased", logdet_eval=None, dist="poisson", rate=2.0,
                 p=0.5,
                 n_exact_terms=2, n_exact_terms_eval=20, n_samples=1, n_terms=5,
                 probe="gaussian", neumann_grad=True, grad_in_forward=False,
                 inverse_atol=1e-6, inverse_rtol=1e-6, inverse_max_iterations=200,
                 event_ndims=None, default_seed=None, validate_args=False, name=None):
        name = name or f"iresblock_{next(_BLOCK_IDS)}"
        parameters = dict(locals())
        if not callable(net):
            raise TypeError(f"net must be a callable Keras layer or model, got {type(net)}")
        if logdet not in LOGDET_MODES:
            raise ValueError(f"logdet must be one of {LOGDET_MODES}, got {logdet!r}")
        if logdet_eval is not None and logdet_eval not in LOGDET_MODES:
            raise ValueError(f"logdet_eval must be None or one of {LOGDET_MODES}, "
                             f"got {logdet_eval!r}")
        if probe not in est.PROBES:
            raise ValueError(f"probe must be one of {est.PROBES}, got {probe!r}")
        est._check_dist(dist, rate if dist == "poisson" else p)
        for key, val in (("n_exact_terms", n_exact_terms), ("n_exact_terms_eval", n_exact_terms_eval)):
            if int(val) < 0:
                raise ValueError(f"{key} must be >= 0, got {val}")
        if int(n_samples) < 1 or int(n_terms) < 1:
            raise ValueError("n_samples and n_terms must be >= 1")
        if grad_in_forward and not neumann_grad:
            raise ValueError("grad_in_forward=True requires neumann_grad=True")
        if event_ndims is None:
            in_shape = getattr(net, "input_shape", None) if getattr(net, "built", False) else None
            event_ndims = len(in_shape) - 1 if in_shape is not None else 1
        self._net = net
        self._chain = rlayers.JacobianChain.from_net(net)
        self.logdet_mode = logdet
        self.logdet_eval_mode = logdet if logdet_eval is None else logdet_eval
        self.dist = dist
        self.dist_param = float(rate if dist == "poisson" else p)
        self.n_exact_terms = int(n_exact_terms)
        self.n_exact_terms_eval = int(n_exact_terms_eval)
        self.n_samples = int(n_samples)
        self.n_terms = int(n_terms)
        self.probe = probe
        self.neumann_grad = bool(neumann_grad)
        self.grad_in_forward = bool(grad_in_forward)
        self.inverse_atol = float(inverse_atol)
        self.inverse_rtol = float(inverse_rtol)
        self.inverse_max_iterations = int(inverse_max_iterations)
        self._event_ndims = int(event_ndims)
        self._default_seed = _check_stateless_seed(default_seed, f"{name}: default_seed")
        self._checked_shapes = set()
        if getattr(net, "built", False):
            self._track_keras(net)
        else:
            self._keras_tf_variables = ()
        super().__init__(forward_min_event_ndims=self._event_ndims, validate_args=validate_args,
                         parameters=parameters, name=name)

    # ----------------------------------------------------------- constructors
    @classmethod
    def dense(cls, dim, hidden_units=(128, 128), coeff=0.9, activation="lipswish",
              preactivation=False, dtype="float32", init="reference", **block_kwargs):
        """A block for vectors in R^dim whose g is :func:`rflow_tf.layers.lipschitz_dense_net`
        (``init``: one of :data:`rflow_tf.layers.INITS`).

        Example: ``IResBlock.dense(2, hidden_units=(128,) * 4, coeff=0.9)``.
        """
        net = rlayers.lipschitz_dense_net(dim, hidden_units, coeff, activation, preactivation, dtype,
                                          init=init)
        return cls(net, event_ndims=1, **block_kwargs)

    @classmethod
    def conv(cls, input_shape, hidden_channels=512, kernels="3-1-3", coeff=0.98,
             activation="lipswish", preactivation=True, dtype="float32", init="reference",
             **block_kwargs):
        """A block for images of shape (H, W, C) whose g is
        :func:`rflow_tf.layers.lipschitz_conv_net` (the paper's image block;
        ``init``: one of :data:`rflow_tf.layers.INITS`).

        Example: ``IResBlock.conv((28, 28, 1), hidden_channels=512)``.
        """
        net = rlayers.lipschitz_conv_net(input_shape, hidden_channels, kernels, coeff, activation,
                                         preactivation, dtype, init=init)
        return cls(net, event_ndims=3, **block_kwargs)

    @property
    def net(self):
        """The residual branch g (a Keras layer or model)."""
        return self._net

    @property
    def default_seed(self):
        """The stateless seed (two ints) used when a call passes no ``seed``;
        ``None`` (the default) draws a fresh random seed on every call.

        With a fixed default seed the log-det estimate is a deterministic
        function of (x, weights), as tools that cannot pass a seed need
        (TFP's bijector test helpers, MCMC kernels, AutoBatched
        JointDistributions). Set it before tracing a ``tf.function``. See
        :func:`use_fixed_seed` to set it on every block of a flow.

        Example: ``block.default_seed = (1, 2)``.
        """
        return self._default_seed

    @default_seed.setter
    def default_seed(self, seed):
        self._default_seed = _check_stateless_seed(seed, f"{self.name}.default_seed")

    # ------------------------------------------------------------ utilities
    def _g(self, x, training):
        return self._checked(x, self._net(x, training=training))

    def _checked(self, x, gx):
        """Validates the net's output for input x (dtype, shape) once per shape."""
        if not isinstance(gx, tf.Tensor) or gx.dtype != x.dtype:
            raise TypeError(
                f"{self.name}: net returned dtype {getattr(gx, 'dtype', type(gx))} for a "
                f"{x.dtype.name} input; build the net with dtype='{x.dtype.name}' "
                "(e.g. IResBlock.dense(..., dtype='float64')).")
        key = (tuple(x.shape[1:]), tuple(gx.shape[1:]))
        if key not in self._checked_shapes:
            if gx.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"{self.name}: net must preserve the shape of its input (a residual "
                    f"block needs g(x) shaped like x); got {tuple(x.shape[1:])} -> "
                    f"{tuple(gx.shape[1:])}")
            self._checked_shapes.add(key)
        if not self._keras_tf_variables and getattr(self._net, "weights", None):
            self._track_keras(self._net)
        return gx

    def _linearize(self, x, training):
        """Returns ``(g(x), vjp, surrogate)``: ``vjp(u)`` = u^T J_g(x) and
        ``surrogate(u, v)`` = u^T J_g(x) v per example, both differentiable
        on any enclosing tape. Known Lipschitz nets use their explicit
        Jacobian factors (:class:`rflow_tf.layers.JacobianChain`); any other
        net uses automatic differentiation (then the surrogate is a
        differentiated VJP)."""
        if self._chain is not None and self._net.built:
            gx, lin = self._chain.linearize(x, training)
            gx = self._checked(x, gx)
            return gx, lin.vjp, lambda u, v: est.neumann_surrogate_jvp(lin.jvp, u, v)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            gx = self._g(x, training)

        def vjp(u):
            return tape.gradient(gx, x, output_gradients=u)
        return gx, vjp, lambda u, v: est.neumann_surrogate(vjp, u, v)

    def _flatten_batch(self, x, name):
        """Validates x and reshapes it to [B, *event_shape]; returns (x, batch_shape)."""
        x = _as_float_tensor(x, self.name)
        nd = self._event_ndims
        if x.shape.rank is not None and x.shape.rank < nd:
            raise ValueError(
                f"{self.name}: {name} needs rank >= {nd} (event shape of {nd} dims), "
                f"got shape {x.shape}")
        event_shape = x.shape[x.shape.rank - nd:]
        if not event_shape.is_fully_defined():
            raise ValueError(f"{self.name}: the event shape of {name} must be static, got {x.shape}")
        if self.validate_args:
            x = tf.debugging.assert_all_finite(x, f"{self.name}: {name} contains NaN or Inf")
        batch_shape = tf.shape(x)[:tf.rank(x) - nd]
        return tf.reshape(x, tf.concat([[-1], event_shape], 0)), batch_shape

    @staticmethod
    def _unflatten(t, batch_shape):
        return tf.reshape(t, tf.concat([batch_shape, tf.shape(t)[1:]], 0))

    def _mode(self, training):
        """The log-det estimator of a training (``logdet``) or evaluation
        (``logdet_eval``) call."""
        return self.logdet_mode if training else self.logdet_eval_mode

    def _series(self, seed, training, dtype):
        """Number of terms and the roulette weight function k -> weight_k for this call."""
        if self._mode(training) == "truncated":
            return tf.constant(self.n_terms), lambda k: tf.ones([], dtype)
        m = self.n_exact_terms if training else self.n_exact_terms_eval
        draws = est.sample_roulette(seed, self.dist, self.dist_param, self.n_samples)
        return tf.reduce_max(draws) + m, lambda k: est.series_weight(
            k, draws, m, self.dist, self.dist_param, dtype)

    # ------------------------------------------------------------- the block
    def forward_and_log_det(self, x, seed=None, training=False):
        """Returns ``(x + g(x), log det(I + J_g(x)))`` in a single pass.

        The log-det has the batch shape of ``x``; see the class docstring for
        the estimator settings. ``seed``: optional stateless seed (shape [2]).
        """
        xf, batch_shape = self._flatten_batch(x, "x")
        if self._mode(training) == "exact":
            gx, ld = self._exact(xf, training)
        else:
            seed = tfp.random.sanitize_seed(self._default_seed if seed is None else seed,
                                            salt="IResBlock")
            probe_seed, series_seed = tfp.random.split_seed(seed, 2)
            n_terms, weights = self._series(series_seed, training, xf.dtype)
            v = est.hutchinson_probe(tf.shape(xf), probe_seed, self.probe, xf.dtype)
            if self.neumann_grad:
                gx, ld = self._neumann(xf, v, n_terms, weights, training)
            else:
                gx, ld = self._backprop(xf, v, n_terms, weights, training)
        return self._unflatten(xf + gx, batch_shape), tf.reshape(ld, batch_shape)

    def _exact(self, x, training):
        """Full Jacobian by one batched VJP: example b is repeated D times and
        copy i gets the cotangent e_i, so its input gradient is row i of J_g."""
        d = x.shape[1:].num_elements()
        x_rep = tf.reshape(tf.repeat(x[None], d, axis=0), [-1] + x.shape[1:].as_list())
        cotangent = tf.repeat(tf.eye(d, dtype=x.dtype)[:, None, :], tf.shape(x)[0], axis=1)
        with tf.GradientTape() as tape:
            tape.watch(x_rep)
            g_rep = self._g(x_rep, training)
        rows = tape.gradient(g_rep, x_rep,
                             output_gradients=tf.reshape(cotangent, tf.shape(g_rep)))
        jac = tf.transpose(tf.reshape(rows, [d, -1, d]), [1, 0, 2])      # [B, i, j]
        gx = tf.reshape(g_rep, tf.concat([[d, -1], tf.shape(g_rep)[1:]], 0))[0]
        return gx, est.exact_logdet(jac)

    def _backprop(self, x, v, n_terms, weights, training):
        gx, vjp, _ = self._linearize(x, training)
        return gx, est.power_series_logdet(vjp, v, n_terms, weights)

    def _neumann(self, x, v, n_terms, weights, training):
        """g(x) and the log-det estimate with Neumann-series gradients.

        Default: only x, u and v are kept for the backward pass, which
        recomputes g(x) with the weights of this forward pass (no further power
        iteration) and differentiates g and the surrogate u^T J v together, so
        one backward pass through g serves both. Memory therefore does not grow
        with the number of series terms, nor with the activations of every block.

        ``grad_in_forward``: the surrogate's gradients are computed here, and
        the forward pass's activations are kept (as in ordinary backprop) for
        the path gradient of the backward pass.
        """
        block = self
        if not self._keras_tf_variables:     # build the net before reading its variables
            self._g(x, False)
        net_vars = [w for w in self._keras_tf_variables if w.trainable]

        def recomputed_grads(dgx, dld, variables):
            """d/d(x, variables) of sum(dgx * g(x)) + sum_b dld_b u_b^T J(x_b) v_b."""
            # Recompute only once the upstream gradient exists: otherwise the
            # executor may run every block's recomputation at the start of the
            # backward pass and hold all their activations at once.
            with tf.control_dependencies([t for t in (dgx, dld) if t is not None]):
                x_re = tf.identity(x)
            with tf.GradientTape() as tape:
                tape.watch(x_re)
                gx, _, surrogate = block._linearize(x_re, False)
                total = tf.zeros([], x.dtype) if dgx is None else tf.reduce_sum(dgx * gx)
                if dld is not None:
                    total += tf.reduce_sum(dld * surrogate(u, v))
            grads = tape.gradient(total, [x_re] + list(variables))
            return _zeros_for_none(grads, [x] + variables)

        @tf.custom_gradient
        def residual_and_logdet(x):
            nonlocal u
            gif = block.grad_in_forward
            with tf.GradientTape(persistent=gif, watch_accessed_variables=gif) as tape:
                if gif:
                    tape.watch(x)
                gx, vjp, surrogate = block._linearize(x, training)
                with tape.stop_recording():
                    ld, u = est.power_series_terms(vjp, v, n_terms, weights, with_neumann=True)
                if gif:
                    s = tf.reduce_sum(surrogate(u, v))
            done = [ld]
            if gif:
                pre = tape.gradient(s, [x] + net_vars)
                pre_x = pre[0]
                pre_vars = {var.ref(): g
                            for var, g in zip(net_vars, _zeros_for_none(pre[1:], net_vars))}
                done += [g for g in pre if g is not None]
            # The next block starts once this one is finished, so that the
            # transient tensors of only one block are alive at a time.
            with tf.control_dependencies(done):
                gx_out = tf.identity(gx)

            def grad(dgx, dld, variables=None):
                variables = list(variables or [])
                if not gif:
                    grads = recomputed_grads(dgx, dld, variables)
                    return grads[0], grads[1:]
                if dgx is None:
                    dgx = tf.zeros_like(gx)
                path = tape.gradient(gx, [x] + variables, output_gradients=dgx)
                path = _zeros_for_none(path, [x] + variables)
                if dld is None:
                    return path[0], path[1:]
                dx = path[0] + tf.reshape(dld, [-1] + [1] * (x.shape.rank - 1)) * pre_x
                uniform = tf.reduce_all(tf.equal(dld, dld[0]))

                def scaled():
                    return [tf.cast(dld[0], var.dtype) * pre_vars[var.ref()] if var.ref() in pre_vars
                            else tf.zeros_like(var) for var in variables]

                def per_example():
                    return recomputed_grads(None, dld, variables)[1:]

                dvars = tf.cond(uniform, scaled, per_example) if variables else []
                return dx, [p + d for p, d in zip(path[1:], dvars)]

            return (gx_out, ld), grad

        u = None
        return residual_and_logdet(x)

    # ------------------------------------------------------ TFP bijector API
    def _forward(self, x, seed=None, training=False):
        xf, batch_shape = self._flatten_batch(x, "x")
        return self._unflatten(xf + self._g(xf, training), batch_shape)

    def _forward_log_det_jacobian(self, x, seed=None, training=False):
        return self.forward_and_log_det(x, seed=seed, training=training)[1]

    def _inverse(self, y, seed=None, training=False):
        x, residual, converged = self.inverse_with_diagnostics(y)
        if tf.executing_eagerly():
            if not bool(converged):
                if math.isfinite(float(residual)) and bool(
                        tf.reduce_all(tf.math.is_finite(x))):
                    why = f"in {self.inverse_max_iterations} iterations"
                else:
                    why = "(the result is not finite: is y infinite or NaN?)"
                warnings.warn(
                    f"{self.name}: fixed-point inverse did not converge {why}; final residual "
                    f"max|x + g(x) - y| = {float(residual):.3g}", RuntimeWarning, stacklevel=2)
        else:
            def warn():
                # Under tf.vectorized_map (pfor, also AutoBatched
                # JointDistributions) this branch runs once for the, possibly
                # empty, set of examples that did not converge. StringFormat
                # formats that whole set ("[]" when empty) as one string, so
                # the print is skipped exactly when no example failed.
                text = tf.strings.format("{}", residual)

                def report():
                    tf.print("WARNING:", self.name, "fixed-point inverse did not converge in",
                             self.inverse_max_iterations, "iterations; final residual",
                             residual, output_stream=sys.stderr)
                    return tf.constant(False)
                return tf.cond(tf.strings.regex_full_match(text, r"\[\]"),
                               lambda: tf.constant(True), report)
            ok = tf.cond(converged, lambda: tf.constant(True), warn)
            with tf.control_dependencies([ok]):
                x = tf.identity(x)
        return x

    def _inverse_log_det_jacobian(self, y, seed=None, training=False):
        x = self.inverse(y)      # through the cache: recalls x if y came from forward(x)
        return -self.forward_and_log_det(x, seed=seed, training=training)[1]

    def inverse_with_diagnostics(self, y):
        """Fixed-point inverse with its diagnostics.

        Iterates x <- y - g(x) from x = y until max|x_new - x| <= atol +
        rtol * max|x_new| or ``inverse_max_iterations``, or until the iterate
        stops being finite. Returns ``(x, residual, converged)`` where
        residual = max|x + g(x) - y| and ``converged`` holds only when the
        stopping rule was met with a finite x and a finite residual (an
        inf/NaN result, e.g. from an infinite y, is never "converged").

        Example:
        ```python
        x, residual, ok = block.inverse_with_diagnostics(y)
        ```
        """
        yf, batch_shape = self._flatten_batch(y, "y")
        atol = tf.cast(self.inverse_atol, yf.dtype)
        rtol = tf.cast(self.inverse_rtol, yf.dtype)

        def cond(i, x, change):
            # NaN compares False: a non-finite iterate stops the loop.
            return change > atol + rtol * tf.reduce_max(tf.abs(x))

        def body(i, x, change):
            x_new = yf - self._g(x, False)
            return i + 1, x_new, tf.reduce_max(tf.abs(x_new - x))

        big = tf.constant(float("inf"), yf.dtype)
        _, x, change = tf.while_loop(cond, body, (tf.constant(0), yf, big),
                                     maximum_iterations=self.inverse_max_iterations)
        residual = tf.reduce_max(tf.abs(x + self._g(x, False) - yf))
        finite = tf.math.is_finite(change) & tf.math.is_finite(residual) & \
            tf.reduce_all(tf.math.is_finite(x))
        converged = finite & (change <= atol + rtol * tf.reduce_max(tf.abs(x)))
        return self._unflatten(x, batch_shape), residual, converged


class ActNorm(_KerasBacked):
    """Per-channel affine bijector with explicit data-dependent initialisation.

    forward (data -> latent): y = (x + b) * exp(s), b and s per channel (last
    axis); log |det| = (positions per example) * sum(s). :meth:`initialize`
    sets b = -mean(x), s = -0.5 log max(var(x), 0.2) from a batch (Glow / the
    reference). Initialisation is never implicit: ``forward``, ``inverse``
    and the log-dets of an uninitialised ActNorm raise an error naming
    :meth:`initialize` (an implicit first-call init inside ``log_prob`` would
    fit the layer to whatever single point came first). Inputs must have the
    layer's dtype (``dtype=``, default float32); another dtype raises a
    ``TypeError`` instead of being cast.

    Example:
    ```python
    images = tf.random.uniform([16, 8, 8, 3])
    an = ActNorm(event_shape=(8, 8, 3))
    an.initialize(images)        # explicit, once (no-op when already done)
    z = an.forward(images)       # zero mean, unit variance per channel
    ```
    """

    def __init__(self, event_shape, layer=None, validate_args=False, name="actnorm", *,
                 dtype="float32"):
        parameters = dict(locals())
        self.event_shape_ = tuple(int(d) for d in event_shape)
        self.layer = layer if layer is not None else rlayers.ActNormalization(dtype=dtype)
        if not self.layer.built:
            self.layer.build((None,) + self.event_shape_)
        self._track_keras(self.layer)
        super().__init__(forward_min_event_ndims=len(self.event_shape_),
                         validate_args=validate_args, parameters=parameters, name=name)

    def initialize(self, x):
        """Data-dependent initialisation from the batch ``x`` (no-op if done)."""
        x = self._checked(x)
        self.layer.initialize(tf.reshape(x, (-1,) + self.event_shape_))

    @property
    def is_initialized(self):
        """True once :meth:`initialize` has run (a variable: saved in checkpoints)."""
        return bool(self.layer.initialized.numpy())

    def _checked(self, x):
        """x as a tensor of the layer's dtype; raises unless it has that dtype."""
        dtype = tf.as_dtype(self.layer.compute_dtype)
        x = tf.convert_to_tensor(x, dtype_hint=dtype)
        if x.dtype != dtype:
            raise TypeError(f"{self.name}: expects {dtype.name} input, got {x.dtype.name} "
                            f"(build it with ActNorm(..., dtype='{x.dtype.name}') or cast "
                            "the input)")
        return x

    def _checked_initialized(self, x):
        """x (dtype-checked), once the layer is known to be initialised."""
        x = self._checked(x)
        message = (f"{self.name}: ActNorm is not initialised; call {self.name}.initialize"
                   "(first_batch) once before using it (its data-dependent "
                   "initialisation is explicit)")
        if tf.executing_eagerly():
            if not self.is_initialized:
                raise RuntimeError(message)
            return x
        with tf.control_dependencies([tf.debugging.Assert(self.layer.initialized, [message])]):
            return tf.identity(x)

    def log_det(self, dtype=tf.float32):
        """log |det dy/dx| per example: (positions per example) * sum(log_scale)."""
        positions = 1
        for d in self.event_shape_[:-1]:
            positions *= d
        return positions * tf.reduce_sum(tf.cast(self.layer.log_scale, dtype))

    def _forward(self, x, **kwargs):
        return self.layer(self._checked_initialized(x))

    def _inverse(self, y, **kwargs):
        return self.layer.inverse(self._checked_initialized(y))

    def _forward_log_det_jacobian(self, x, **kwargs):
        x = self._checked_initialized(x)
        ld = self.log_det(x.dtype)
        batch_shape = tf.shape(x)[:tf.rank(x) - len(self.event_shape_)]
        return tf.fill(batch_shape, ld)


SQUEEZE_ORDERS = ("reference", "space_to_depth")


class Squeeze(tfb.Bijector):
    """Squeeze by a factor 2: [..., H, W, C] -> [..., H/2, W/2, 4C].

    Pixel (2i + dy, 2j + dx, c) of the input, dy, dx in {0, 1}, goes to
    position (i, j) and output channel

        order="reference":       c * 4 + 2 * dy + dx      (the authors' code)
        order="space_to_depth":  (2 * dy + dx) * C + c    (tf.nn.space_to_depth)

    Both are permutations of the pixels, so log |det| = 0. They differ as
    models only where channels are split afterwards (:class:`FactorOut`
    keeps the first half): the reference order keeps the first C/2 input
    channels' four sub-pixels, space_to_depth keeps sub-pixels (0, 0) and
    (0, 1) of every channel. forward = data -> latent.

    Args:
      order: "reference" (default) or "space_to_depth".

    Example:
    ```python
    Squeeze().forward(tf.zeros([2, 8, 8, 3])).shape  # (2, 4, 4, 12)
    x = tf.reshape(tf.range(8.0), [1, 2, 2, 2])      # x[0, dy, dx, c] = 4 dy + 2 dx + c
    Squeeze().forward(x)[0, 0, 0]                    # [0, 2, 4, 6, 1, 3, 5, 7]
    Squeeze("space_to_depth").forward(x)[0, 0, 0]    # [0, 1, 2, 3, 4, 5, 6, 7]
    ```
    """

    def __init__(self, order="reference", validate_args=False, name="squeeze"):
        parameters = dict(locals())
        if order not in SQUEEZE_ORDERS:
            raise ValueError(f"Squeeze order must be one of {SQUEEZE_ORDERS}, got {order!r}")
        self.order = order
        super().__init__(forward_min_event_ndims=3, is_constant_jacobian=True,
                         validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    @staticmethod
    def _reshape_apply(x, fn):
        shape = tf.shape(x)
        flat = tf.reshape(x, tf.concat([[-1], shape[-3:]], 0))
        out = fn(flat)
        return tf.reshape(out, tf.concat([shape[:-3], tf.shape(out)[1:]], 0))

    @staticmethod
    def _squeeze_reference(t):
        # [B, H, W, C] -> [B, H/2, 2(dy), W/2, 2(dx), C] -> [B, H/2, W/2, C, dy, dx].
        s = tf.shape(t)
        t = tf.reshape(t, [s[0], s[1] // 2, 2, s[2] // 2, 2, s[3]])
        t = tf.transpose(t, [0, 1, 3, 5, 2, 4])
        return tf.reshape(t, [s[0], s[1] // 2, s[2] // 2, 4 * s[3]])

    @staticmethod
    def _unsqueeze_reference(t):
        s = tf.shape(t)
        t = tf.reshape(t, [s[0], s[1], s[2], s[3] // 4, 2, 2])
        t = tf.transpose(t, [0, 1, 4, 2, 5, 3])
        return tf.reshape(t, [s[0], 2 * s[1], 2 * s[2], s[3] // 4])

    def _forward(self, x):
        if x.shape.rank is not None and (x.shape[-3] or 0) % 2 + (x.shape[-2] or 0) % 2:
            raise ValueError(f"Squeeze needs even height and width, got shape {x.shape}")
        if self.order == "reference":
            return self._reshape_apply(x, self._squeeze_reference)
        return self._reshape_apply(x, lambda t: tf.nn.space_to_depth(t, 2))

    def _inverse(self, y):
        if y.shape.rank is not None and (y.shape[-1] or 0) % 4:
            raise ValueError(f"Squeeze inverse needs a channel count divisible by 4, "
                             f"got shape {y.shape}")
        if self.order == "reference":
            return self._reshape_apply(y, self._unsqueeze_reference)
        return self._reshape_apply(y, lambda t: tf.nn.depth_to_space(t, 2))

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], x.dtype)

    def _forward_event_shape(self, s):
        return tf.TensorShape(s[:-3]).concatenate([s[-3] // 2, s[-2] // 2, s[-1] * 4]) \
            if s.rank is not None and s[-3] is not None else s

    def _inverse_event_shape(self, s):
        return tf.TensorShape(s[:-3]).concatenate([s[-3] * 2, s[-2] * 2, s[-1] // 4]) \
            if s.rank is not None and s[-3] is not None else s

    def _forward_event_shape_tensor(self, s):
        return tf.concat([s[:-3], [s[-3] // 2, s[-2] // 2, s[-1] * 4]], 0)

    def _inverse_event_shape_tensor(self, s):
        return tf.concat([s[:-3], [s[-3] * 2, s[-2] * 2, s[-1] // 4]], 0)


class LogitTransform(tfb.Bijector):
    """Logit of the squeezed unit interval, elementwise (data -> latent):

    s = alpha + (1 - 2 alpha) x,   y = log s - log(1 - s),
    log |dy/dx| = log(1 - 2 alpha) - log s - log(1 - s).

    Inverse: x = (sigmoid(y) - alpha) / (1 - 2 alpha), clipped to [0, 1]. ``alpha`` keeps the
    logit finite at x in {0, 1}; the reference uses 1e-6 (MNIST) or 0.05.
    With ``validate_args=True`` inputs outside [0, 1] are rejected.

    Example:
    ```python
    LogitTransform(0.05).forward(tf.constant([0.0, 0.5, 1.0]))
    ```
    """

    def __init__(self, alpha=1e-6, validate_args=False, name="logit"):
        parameters = dict(locals())
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)
        super().__init__(forward_min_event_ndims=0, validate_args=validate_args,
                         parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _squash(self, x):
        if self.validate_args:
            with tf.control_dependencies([
                    tf.debugging.assert_greater_equal(
                        x, tf.zeros([], x.dtype), f"{self.name}: input below 0"),
                    tf.debugging.assert_less_equal(
                        x, tf.ones([], x.dtype), f"{self.name}: input above 1")]):
                x = tf.identity(x)
        return self.alpha + (1.0 - 2.0 * self.alpha) * x

    def _log_s_and_1ms(self, x):
        """(log s, log(1 - s)), with 1 - s = alpha + (1 - 2 alpha)(1 - x): 1 - x is
        exact in floating point for x in [1/2, 1], so pixels near 1 do not lose
        the digits that 1 - s would lose by cancellation (in float32 about 1e-3
        nats per pixel at x = 1 - 2e-5)."""
        s = self._squash(x)
        one_minus_s = self.alpha + (1.0 - 2.0 * self.alpha) * (1.0 - x)
        return tf.math.log(s), tf.math.log(one_minus_s)

    def _forward(self, x):
        log_s, log_1ms = self._log_s_and_1ms(x)
        return log_s - log_1ms

    def _inverse(self, y):
        # Clipped: in float32 sigmoid saturates to exactly 0 or 1 for |y| > ~17.
        return tf.clip_by_value((tf.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha),
                                0.0, 1.0)

    def _forward_log_det_jacobian(self, x):
        log_s, log_1ms = self._log_s_and_1ms(x)
        return tf.constant(math.log1p(-2.0 * self.alpha), x.dtype) - log_s - log_1ms


def _seeded_parts(obj):
    """The pieces of ``obj`` that take a ``seed`` call kwarg, in application
    order, as (piece, route) pairs: ``route`` is the list of names under which
    ``tfb.Chain`` / ``tfb.Invert`` pass kwargs down to the piece. A piece is an
    :class:`IResBlock` or a multi-block bijector that splits its seed itself
    (``_takes_flow_kwargs``, e.g. :class:`rflow_tf.models.FlowBijector`).
    ``obj`` may also be a distribution or model with a ``bijector``."""
    if isinstance(obj, IResBlock) or getattr(obj, "_takes_flow_kwargs", False):
        return [(obj, [])]
    if isinstance(obj, _INVERT_TYPES):
        return _seeded_parts(obj.bijector)
    if isinstance(obj, tfb.Composition):
        return [(piece, [sub.name] + route) for sub in obj.bijectors
                for piece, route in _seeded_parts(sub)]
    if not isinstance(obj, tfb.Bijector) and getattr(obj, "bijector", None) is not None:
        return _seeded_parts(obj.bijector)
    return []


def flow_kwargs(bijector, **kwargs):
    """Nested per-name kwargs that route ``kwargs`` (e.g. ``seed``,
    ``training``) to every :class:`IResBlock` inside ``bijector`` through
    ``tfb.Chain`` / ``tfb.Invert``, and to multi-block bijectors such as
    :class:`rflow_tf.models.FlowBijector` (``model.bijector``), which split
    their seed over their own blocks. Seeds are split so blocks draw
    independent probes. A ``seed`` that no piece would receive raises a
    ValueError instead of being dropped.

    Example:
    ```python
    flow = tfb.Chain(blocks)
    ld = flow.forward_log_det_jacobian(x, 1, **flow_kwargs(flow, seed=[1, 2], training=True))
    ```
    """
    seed = kwargs.pop("seed", None)
    parts = _seeded_parts(bijector)
    if seed is not None and not parts:
        raise ValueError(f"flow_kwargs: {getattr(bijector, 'name', bijector)!r} contains no "
                         "residual block or flow that takes a seed; the seed would be dropped")
    if not parts:
        return {}
    seeds = tfp.random.split_seed(seed, len(parts) + 1)[1:] if seed is not None else None
    if not parts[0][1]:            # the bijector itself takes the kwargs
        return dict(kwargs, **({"seed": seeds[0]} if seeds is not None else {}))
    nested = {}
    for i, (_, route) in enumerate(parts):
        leaf = dict(kwargs, **({"seed": seeds[i]} if seeds is not None else {}))
        node = nested
        for name in route[:-1]:
            node = node.setdefault(name, {})
        node[route[-1]] = leaf
    return nested


def use_fixed_seed(flow, seed):
    """Makes every residual block's log-det in ``flow`` a deterministic
    function of (x, weights): each :class:`IResBlock` gets its own split of
    ``seed`` as its :attr:`IResBlock.default_seed`, used whenever a call
    passes no seed. ``seed=None`` restores fresh random estimates.

    This is the switch for tools that cannot pass a seed: TFP's bijector
    test helpers, MCMC kernels (``tfp.mcmc``), ``JointDistribution*AutoBatched``.
    ``flow`` is a bijector, a ``TransformedDistribution`` or a
    :class:`rflow_tf.models.ResidualFlow`. Call it before tracing
    ``tf.function``s that use the flow. (``logdet="exact"`` blocks are
    deterministic already.) Returns ``flow``.

    Example:
    ```python
    import tensorflow as tf, tensorflow_probability as tfp
    from rflow_tf.bijectors import IResBlock, use_fixed_seed
    tfb, tfd = tfp.bijectors, tfp.distributions
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)),
                                       tfb.Invert(IResBlock.dense(2)))
    use_fixed_seed(dist, (1, 2))
    x = tf.random.normal([4, 2])
    assert (dist.log_prob(x).numpy() == dist.log_prob(x).numpy()).all()   # one draw
    ```
    """
    seed = _check_stateless_seed(seed, "use_fixed_seed: seed")
    blocks = []
    for piece, _ in _seeded_parts(flow):
        blocks.extend(getattr(piece, "iresblocks", None) or [piece])
    if not blocks:
        raise ValueError(f"use_fixed_seed: {getattr(flow, 'name', flow)!r} contains no "
                         "residual block")
    seeds = tfp.random.split_seed(seed, len(blocks)) if seed is not None else [None] * len(blocks)
    for block, block_seed in zip(blocks, seeds):
        block.default_seed = None if block_seed is None else tuple(block_seed.numpy())
    return flow
