"""IResBlock: the invertible residual block y = x + g(x), Lip(g) < 1, with
stochastic (Russian roulette) or exact log-determinants."""

import itertools

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import estimators as est
from rflow_tf import layers as rlayers
from rflow_tf.bijectors._base import (
    KerasBacked,
    as_float_tensor,
    check_stateless_seed,
)
from rflow_tf.bijectors.fixed_point import (
    fixed_point_inverse,
    nan_max,
    shared_fixed_point_inverse,
)
from rflow_tf.bijectors.monotone import warn_on_failures
from rflow_tf.bijectors.residual_context import condition_size_of, context_net_for, context_rows
from rflow_tf.bijectors.residual_logdet import (
    Series,
    exact_residual_logdet,
    neumann_residual_logdet,
    shared_exact_residual_logdet,
    shared_neumann_residual_logdet,
)

tfb = tfp.bijectors


LOGDET_MODES = ("unbiased", "truncated", "exact")
_BLOCK_IDS = itertools.count()


class IResBlock(KerasBacked):
    """Invertible residual block f(x) = x + g(x) with Lip(g) < 1.

    forward (data -> latent):  y = x + net(x)
    inverse (latent -> data):  fixed point x <- y - net(x), starting at x = y;
        converges geometrically (Banach) at rate Lip(g). An example that does
        not converge (within ``inverse_max_iterations``, or whose iterate is
        not finite) is returned as NaN, never as a wrong x, and reported: a
        ``RuntimeWarning`` in eager mode, a message on stderr in a graph; under
        XLA the NaN is the report (see :meth:`inverse_with_diagnostics`).
    log |det df/dx| = log det(I + J_g) = sum_{k>=1} (-1)^(k+1)/k tr(J_g^k), estimated by

    * ``logdet="unbiased"`` (default): Russian roulette over the power series
      with Hutchinson probes (paper Theorem 1, eq. 6). N ~ ``dist``
      (``"poisson"`` with ``rate``, or ``"geometric"`` with ``p``), n = N + m
      terms with m = ``n_exact_terms`` when ``training=True`` and
      ``n_exact_terms_eval`` otherwise (paper: 2 and 20), averaged over
      ``n_samples`` draws of N. E[estimate] = log det(I + J).
    * ``logdet="truncated"``: the first ``n_terms`` terms, weight 1 (the
      i-ResNet estimator; biased low in magnitude, bias grows with Lip(g)).
    * ``logdet="exact"``: log |det(I + J)| of the full Jacobian, from its QR
      factorisation (:func:`rflow_tf.estimators.exact_logdet`; small D, e.g.
      2-D toy data).

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
    any other net is differentiated automatically. Every log-det mode and
    the inverse compile with XLA (``jit_compile=True``).

    The value returned is always the real log-det estimate, never a
    surrogate, so training logs show true bits/dim.

    Call kwargs (route through ``Chain`` by name): ``seed`` (stateless seed,
    shape [2]) and ``training`` (bool; default False = evaluation settings).
    Without a ``seed`` a call uses ``default_seed`` (constructor argument or
    :attr:`default_seed`; see :func:`use_fixed_seed`): None draws a fresh
    random seed per call, two ints make the estimate deterministic.
    The net must act on each example independently (no batch statistics).

    **Conditional blocks** (``condition_net``, or ``condition_size=K`` in
    :meth:`dense` / :meth:`conv`) model p(x | c): the branch is

        g(x; c) = K_L phi(... phi(K_1 x + b_1 + s_1(c)) ...) + b_L + s_L(c),

    where s(c) = (s_1, ..., s_L) comes from an unconstrained context network
    (:func:`rflow_tf.layers.context_shift_net`) and s_i is broadcast over
    space in convolutional branches. The shifts move where phi' is evaluated
    but add no factor to J_g = K_L D_{L-1} ... D_1 K_1, so Lip_x(g(., c)) <=
    coeff for every c: the fixed-point inverse and the log-det estimators
    (of the Jacobian in x) hold unchanged, and the Neumann gradient reaches
    the context network through s(c). Every method takes
    ``conditional_input=c`` (shape [..., K], broadcast to the batch shape of
    x), TFP's keyword as in ``MaskedAutoregressiveFlow``; route it through a
    ``tfb.Chain`` or a ``TransformedDistribution`` with
    :func:`rflow_tf.bijectors.conditional_kwargs`. ``condition_size`` is K
    (None for an unconditional block).

    Example:
    ```python
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import IResBlock
    tfb, tfd = tfp.bijectors, tfp.distributions

    blocks = [IResBlock.dense(2, hidden_units=(16,), coeff=0.9) for _ in range(4)]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(blocks)))
    lp = dist.log_prob(tf.random.normal([16, 2]))     # unbiased estimate
    x = dist.sample(5)                                 # fixed-point inverse

    # p(x | c) with a context c in R^3
    block = IResBlock.dense(2, hidden_units=(16,), condition_size=3)
    cond = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(block))
    c = tf.random.normal([16, 3])
    lp = cond.log_prob(tf.random.normal([16, 2]), bijector_kwargs={"conditional_input": c})
    xs = cond.sample(5, bijector_kwargs={"conditional_input": c[0]})   # 5 draws given c[0]
    ```
    """

    def __init__(
        self,
        net,
        *,
        condition_net=None,
        logdet="unbiased",
        logdet_eval=None,
        dist="poisson",
        rate=2.0,
        p=0.5,
        n_exact_terms=2,
        n_exact_terms_eval=20,
        n_samples=1,
        n_terms=5,
        probe="gaussian",
        neumann_grad=True,
        grad_in_forward=False,
        inverse_atol=1e-6,
        inverse_rtol=1e-6,
        inverse_max_iterations=200,
        event_ndims=None,
        default_seed=None,
        validate_args=False,
        name=None,
    ):
        name = name or f"iresblock_{next(_BLOCK_IDS)}"
        parameters = dict(locals())
        if not callable(net):
            raise TypeError(f"net must be a callable Keras layer or model, got {type(net)}")
        if logdet not in LOGDET_MODES:
            raise ValueError(f"logdet must be one of {LOGDET_MODES}, got {logdet!r}")
        if logdet_eval is not None and logdet_eval not in LOGDET_MODES:
            raise ValueError(
                f"logdet_eval must be None or one of {LOGDET_MODES}, got {logdet_eval!r}"
            )
        if probe not in est.PROBES:
            raise ValueError(f"probe must be one of {est.PROBES}, got {probe!r}")
        est._check_dist(dist, rate if dist == "poisson" else p)
        for key, val in (
            ("n_exact_terms", n_exact_terms),
            ("n_exact_terms_eval", n_exact_terms_eval),
        ):
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
        self._condition_net = condition_net
        self.condition_size = None
        if condition_net is not None:
            self.condition_size = condition_size_of(condition_net, self._chain)
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
        self._default_seed = check_stateless_seed(default_seed, f"{name}: default_seed")
        self._checked_shapes = set()
        if getattr(net, "built", False):
            self._track_keras(*self._keras_parts())
        else:
            self._keras_tf_variables = ()
        super().__init__(
            forward_min_event_ndims=self._event_ndims,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    # ----------------------------------------------------------- constructors
    @classmethod
    def dense(
        cls,
        dim,
        hidden_units=(128, 128),
        coeff=0.9,
        activation="lipswish",
        preactivation=False,
        dtype="float32",
        init="reference",
        vnorms="2",
        learn_p=False,
        condition_size=None,
        condition_hidden_units=(64,),
        condition_activation="elu",
        **block_kwargs,
    ):
        """A block for vectors in R^dim whose g is :func:`rflow_tf.layers.lipschitz_dense_net`
        (``init``: one of :data:`rflow_tf.layers.INITS`).

        ``condition_size=K`` makes the block conditional: g(x; c) adds
        s(c) = :func:`rflow_tf.layers.context_shift_net` (K inputs,
        ``condition_hidden_units``, ``condition_activation``) to the
        pre-activations of every layer of g, and every call takes
        ``conditional_input=c`` of shape [..., K]. Default None: unconditional.

        ``vnorms``: the norm orders of g's linear maps, one character per
        linear layer + 1 as the authors' ``--vnorms`` ("2222" for two hidden
        layers; 'f' = inf), first = last; or one per layer, or a single order
        (see :func:`rflow_tf.norms.chain_orders`). Layer i is normalised in
        ||W_i||_{p_i -> p_{i+1}} <= coeff, so the block is a contraction in
        ||.||_{p_0} and the fixed-point inverse and the log-det series
        converge. ``learn_p``: the orders are trainable (tied along the chain).

        Example: ``IResBlock.dense(2, hidden_units=(128,) * 4, coeff=0.9)``;
        ``IResBlock.dense(2, (64, 64), vnorms="2f22", learn_p=False)``;
        ``IResBlock.dense(2, (64,), condition_size=3)`` (then
        ``block.forward(x, conditional_input=c)``).
        """
        net = rlayers.lipschitz_dense_net(
            dim,
            hidden_units,
            coeff,
            activation,
            preactivation,
            dtype,
            init=init,
            vnorms=vnorms,
            learn_p=learn_p,
        )
        condition_net = context_net_for(
            net, condition_size, condition_hidden_units, condition_activation, dtype
        )
        return cls(net, condition_net=condition_net, event_ndims=1, **block_kwargs)

    @classmethod
    def conv(
        cls,
        input_shape,
        hidden_channels=512,
        kernels="3-1-3",
        coeff=0.98,
        activation="lipswish",
        preactivation=True,
        dtype="float32",
        init="reference",
        vnorms="2",
        learn_p=False,
        condition_size=None,
        condition_hidden_units=(64,),
        condition_activation="elu",
        **block_kwargs,
    ):
        """A block for images of shape (H, W, C) whose g is
        :func:`rflow_tf.layers.lipschitz_conv_net` (the paper's image block;
        ``init``: one of :data:`rflow_tf.layers.INITS`; ``vnorms``,
        ``learn_p`` as in :meth:`dense`: "2222" for kernels "3-1-3").

        ``condition_size=K``: conditional as in :meth:`dense`; the context is
        a vector c in R^K per image, and s(c) shifts every channel of every
        layer's pre-activations, the same shift at every pixel.

        Example: ``IResBlock.conv((28, 28, 1), hidden_channels=512)``;
        ``IResBlock.conv((8, 8, 2), 16, condition_size=10)``.
        """
        net = rlayers.lipschitz_conv_net(
            input_shape,
            hidden_channels,
            kernels,
            coeff,
            activation,
            preactivation,
            dtype,
            init=init,
            vnorms=vnorms,
            learn_p=learn_p,
        )
        condition_net = context_net_for(
            net, condition_size, condition_hidden_units, condition_activation, dtype
        )
        return cls(net, condition_net=condition_net, event_ndims=3, **block_kwargs)

    @property
    def net(self):
        """The residual branch g (a Keras layer or model)."""
        return self._net

    @property
    def condition_net(self):
        """The context network c -> s(c) of a conditional block (a Keras model),
        or None for an unconditional block; see :attr:`condition_size`."""
        return self._condition_net

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
        self._default_seed = check_stateless_seed(seed, f"{self.name}.default_seed")

    # ------------------------------------------------------------ utilities
    def _g(self, x, training, shift=None):
        if shift is None:
            return self._checked(x, self._net(x, training=training))
        if not self._net.built:
            self._net(x)
        return self._checked(x, self._chain.linearize(x, training, shift=shift)[0])

    def _checked(self, x, gx):
        """Validates the net's output for input x (dtype, shape) once per shape."""
        if not isinstance(gx, tf.Tensor) or gx.dtype != x.dtype:
            raise TypeError(
                f"{self.name}: net returned dtype {getattr(gx, 'dtype', type(gx))} for a "
                f"{x.dtype.name} input; build the net with dtype='{x.dtype.name}' "
                "(e.g. IResBlock.dense(..., dtype='float64'))."
            )
        self._check_shape(x.shape, gx.shape)
        return gx

    def _check_shape(self, x_shape, gx_shape):
        """A clear error, once per shape, unless g maps x_shape to x_shape."""
        key = (tuple(x_shape[1:]), tuple(gx_shape[1:]))
        if key not in self._checked_shapes:
            if gx_shape[1:] != x_shape[1:]:
                raise ValueError(
                    f"{self.name}: net must preserve the shape of its input (a residual "
                    f"block needs g(x) shaped like x); got {tuple(x_shape[1:])} -> "
                    f"{tuple(gx_shape[1:])}"
                )
            self._checked_shapes.add(key)
        self._track_new_weights()

    def _shared_chain(self, x, shift=None):
        """Whether g runs in the graph functions shared by the blocks of its
        signature (:mod:`rflow_tf.bijectors.shared_branch`): for a
        :class:`rflow_tf.layers.JacobianChain` net, built here if it is not
        yet; g's output shape is checked without computing it (its linear
        maps keep the spatial shape, the last one sets the channels)."""
        if self._chain is None:
            return False
        if not self._net.built or not self._keras_tf_variables:
            self._g(x, False, shift)
        out = x.shape[:-1].concatenate([self._chain.shift_sizes[-1]])
        self._check_shape(x.shape, out)
        return True

    def _track_new_weights(self):
        """Mirrors the Keras weights once they exist (nets may build at first call)."""
        if self._condition_net is None:
            if not self._keras_tf_variables and getattr(self._net, "weights", None):
                self._track_keras(self._net)
        elif len(self._keras_tf_variables) != sum(len(o.weights) for o in self._keras_parts()):
            self._track_keras(*self._keras_parts())

    def _keras_parts(self):
        """The Keras objects holding the block's weights: the net, then the context net."""
        return (self._net,) + (() if self._condition_net is None else (self._condition_net,))

    def _net_variables(self):
        """The trainable variables of the net g (not of the context net)."""
        return [w for w in self._keras_tf_variables[: len(self._net.weights)] if w.trainable]

    def _context_shift(self, conditional_input, x, training):
        """The pre-activation shift s(c) [B, S] for the examples of ``x`` (its
        original batch shape), or None for an unconditional block; a clear
        error for a missing, unexpected or misshapen ``conditional_input``."""
        c = context_rows(self.name, conditional_input, x, self.condition_size, self._event_ndims)
        if c is None:
            return None
        shift = self._condition_net(c, training=training)
        if not isinstance(shift, tf.Tensor) or shift.dtype != x.dtype:
            raise TypeError(
                f"{self.name}: the context net returned dtype "
                f"{getattr(shift, 'dtype', type(shift))} for a {x.dtype.name} input; build "
                f"it with dtype='{x.dtype.name}'"
            )
        self._track_new_weights()
        return shift

    def _linearize(self, x, training, shift=None):
        """Returns ``(g(x), vjp, surrogate)``: ``vjp(u)`` = u^T J_g(x) and
        ``surrogate(u, v)`` = u^T J_g(x) v per example, both differentiable
        on any enclosing tape. Known Lipschitz nets use their explicit
        Jacobian factors (:class:`rflow_tf.layers.JacobianChain`); any other
        net uses automatic differentiation (then the surrogate is a
        differentiated VJP)."""
        if self._chain is not None and self._net.built:
            gx, lin = self._chain.linearize(x, training, shift=shift)
            gx = self._checked(x, gx)
            return gx, lin.vjp, lambda u, v: est.neumann_surrogate_jvp(lin.jvp, u, v)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            gx = self._g(x, training, shift)

        def vjp(u):
            return tape.gradient(gx, x, output_gradients=u)

        return gx, vjp, lambda u, v: est.neumann_surrogate(vjp, u, v)

    def _flatten_batch(self, x, name):
        """Validates x and reshapes it to [B, *event_shape]; returns (x, batch_shape),
        batch_shape None when x has one batch axis (nothing to reshape)."""
        x = as_float_tensor(x, self.name)
        nd = self._event_ndims
        if x.shape.rank is not None and x.shape.rank < nd:
            raise ValueError(
                f"{self.name}: {name} needs rank >= {nd} (event shape of {nd} dims), "
                f"got shape {x.shape}"
            )
        event_shape = x.shape[x.shape.rank - nd :]
        if not event_shape.is_fully_defined():
            raise ValueError(
                f"{self.name}: the event shape of {name} must be static, got {x.shape}"
            )
        if self.validate_args:
            x = tf.debugging.assert_all_finite(x, f"{self.name}: {name} contains NaN or Inf")
        if x.shape.rank == nd + 1:  # already [B, *event_shape]
            return x, None
        batch_shape = tf.shape(x)[: tf.rank(x) - nd]
        return tf.reshape(x, tf.concat([[-1], event_shape], 0)), batch_shape

    @staticmethod
    def _unflatten(t, batch_shape):
        """``t`` [B, ...] with its batch axis back to ``batch_shape`` (None: as it is)."""
        if batch_shape is None:
            return t
        return tf.reshape(t, tf.concat([batch_shape, tf.shape(t)[1:]], 0))

    def _mode(self, training):
        """The log-det estimator of a training (``logdet``) or evaluation
        (``logdet_eval``) call."""
        return self.logdet_mode if training else self.logdet_eval_mode

    def _series(self, seed, training):
        """The terms of this call's power series (:class:`Series`)."""
        if self._mode(training) == "truncated":
            return Series(
                tf.constant(self.n_terms), None, tf.constant(0), self.dist, self.dist_param
            )
        m = self.n_exact_terms if training else self.n_exact_terms_eval
        draws = est.sample_roulette(seed, self.dist, self.dist_param, self.n_samples)
        return Series(tf.reduce_max(draws) + m, draws, tf.constant(m), self.dist, self.dist_param)

    # ------------------------------------------------------------- the block
    def forward_and_log_det(self, x, seed=None, training=False, conditional_input=None):
        """Returns ``(x + g(x), log det(I + J_g(x)))`` in a single pass.

        The log-det has the batch shape of ``x``; see the class docstring for
        the estimator settings. ``seed``: optional stateless seed (shape [2]).
        ``conditional_input``: the context c of a conditional block (shape
        [..., condition_size], broadcast to the batch shape of ``x``); then
        the map is x + g(x; c) and J_g is its Jacobian in x.
        """
        xf, batch_shape = self._flatten_batch(x, "x")
        shift = self._context_shift(conditional_input, x, training)
        extra = () if shift is None else (shift,)
        if self._mode(training) == "exact":
            gx, ld = self._exact(xf, training, *extra)
        else:
            seed = tfp.random.sanitize_seed(
                self._default_seed if seed is None else seed, salt="IResBlock"
            )
            probe_seed, series_seed = tfp.random.split_seed(seed, 2)
            series = self._series(series_seed, training)
            v = est.hutchinson_probe(tf.shape(xf), probe_seed, self.probe, xf.dtype)
            if self.neumann_grad:
                gx, ld = self._neumann(xf, v, series, training, *extra)
            else:
                gx, ld = self._backprop(xf, v, series, training, *extra)
        return self._unflatten(xf + gx, batch_shape), self._unflatten(ld, batch_shape)

    def _exact(self, x, training, shift=None):
        """g(x) and log |det(I + J_g(x))| from the full Jacobian."""
        if self._shared_chain(x, shift):
            params = self._chain.parameters(training)
            return shared_exact_residual_logdet(self._chain, x, params, shift)
        return exact_residual_logdet(lambda x, shift: self._g(x, training, shift), x, shift)

    def _backprop(self, x, v, series, training, shift=None):
        gx, vjp, _ = self._linearize(x, training, shift)
        return gx, est.power_series_logdet(vjp, v, series.n_terms, series.weight_fn(x.dtype))

    def _neumann(self, x, v, series, training, shift=None):
        """g(x) and the log-det estimate with Neumann-series gradients
        (:func:`rflow_tf.bijectors.residual_logdet.neumann_residual_logdet`)."""
        if not self.grad_in_forward and self._shared_chain(x, shift):
            params = self._chain.parameters(training)
            return shared_neumann_residual_logdet(self._chain, x, v, series, params, shift)
        # Build the net before reading its variables.
        if not self._keras_tf_variables or (shift is not None and not self._net.built):
            self._g(x, False, shift)
        net_vars = (
            self._net_variables()
            if shift is not None
            else [w for w in self._keras_tf_variables if w.trainable]
        )
        weights = series.weight_fn(x.dtype)
        return neumann_residual_logdet(
            self._linearize,
            x,
            v,
            series.n_terms,
            weights,
            training,
            net_vars,
            self.grad_in_forward,
            shift,
        )

    # ------------------------------------------------------ TFP bijector API
    def _forward(self, x, seed=None, training=False, conditional_input=None):
        xf, batch_shape = self._flatten_batch(x, "x")
        shift = self._context_shift(conditional_input, x, training)
        return self._unflatten(xf + self._g(xf, training, shift), batch_shape)

    def _forward_log_det_jacobian(self, x, seed=None, training=False, conditional_input=None):
        return self.forward_and_log_det(
            x, seed=seed, training=training, **_condition(conditional_input)
        )[1]

    def _inverse(self, y, seed=None, training=False, conditional_input=None):
        x, residual, converged = self.inverse_with_diagnostics(
            y, per_example=True, **_condition(conditional_input)
        )
        # The examples that did not converge are NaN, never a plausible wrong x.
        mask = tf.reshape(converged, tf.concat([tf.shape(converged), [1] * self._event_ndims], 0))
        x = tf.where(mask, x, tf.constant(float("nan"), x.dtype))

        def eager_message(ok):
            bad = np.asarray(residual)[~ok]
            if np.isfinite(bad).all():
                why = f"in {self.inverse_max_iterations} iterations"
            else:
                why = "(the result is not finite: is y infinite or NaN?)"
            worst = float(np.max(bad)) if not np.isnan(bad).any() else float("nan")
            return (
                f"{self.name}: fixed-point inverse did not converge {why} for "
                f"{int((~ok).sum())} of {ok.size} examples, returned as NaN; final "
                f"residual max|x + g(x) - y| = {worst:.3g}"
            )

        def graph_message(ok):
            return [
                self.name,
                "fixed-point inverse did not converge in",
                self.inverse_max_iterations,
                "iterations; final residual",
                nan_max(tf.where(ok, tf.zeros_like(residual), residual)),
                "(inf/nan: y or an iterate is not finite);",
                "those examples are returned as NaN",
            ]

        return warn_on_failures(x, converged, eager_message, graph_message)

    def _inverse_log_det_jacobian(self, y, seed=None, training=False, conditional_input=None):
        condition = _condition(conditional_input)
        x = self.inverse(y, **condition)  # through the cache: recalls x if y came from forward(x)
        return -self.forward_and_log_det(x, seed=seed, training=training, **condition)[1]

    def inverse_with_diagnostics(self, y, per_example=False, conditional_input=None):
        """Fixed-point inverse with its diagnostics.

        Iterates x <- y - g(x) from x = y until every example b has taken a
        small step, max|x_new - x|_b <= atol + rtol * max|x_new|_b (max over
        the example's elements; examples already there keep iterating, and so
        get more accurate, while others still run), or until
        ``inverse_max_iterations`` steps have run. An example whose iterate is
        not finite stops iterating (and never holds up the others). Compiles
        with XLA.

        Returns ``(x, residual, converged)``: x is the last iterate (also
        where it did not converge; :meth:`inverse` returns NaN there),
        residual = max|x + g(x) - y| and ``converged`` holds only when the
        stopping rule was met with a finite x and a finite residual (an
        inf/NaN result, e.g. from an infinite y, is never "converged").
        With ``per_example=False`` (default) residual and converged are
        scalars over the whole batch (the max residual, NaN if any is NaN;
        converged = every example converged); with ``per_example=True`` they
        have y's batch shape, one value per example. ``conditional_input``:
        the context c of a conditional block (then g = g(., c) throughout).

        Example:
        ```python
        block = IResBlock.dense(2, hidden_units=(8,), coeff=0.9)
        y = tf.random.normal([4, 2])
        x, residual, ok = block.inverse_with_diagnostics(y)  # scalars
        x, residual, ok = block.inverse_with_diagnostics(y, per_example=True)
        bad = tf.where(~ok)   # the indices of the examples that failed
        ```
        """
        yf, batch_shape = self._flatten_batch(y, "y")
        shift = self._context_shift(conditional_input, y, False)
        settings = (
            self._event_ndims,
            self.inverse_atol,
            self.inverse_rtol,
            self.inverse_max_iterations,
        )
        if self._shared_chain(yf, shift):
            # the kernels are read once, outside the loop
            params = self._chain.parameters(False)
            x, residual, converged = shared_fixed_point_inverse(
                self._chain, yf, params, shift, *settings
            )
        else:
            g = lambda x: self._g(x, False)  # noqa: E731
            x, residual, converged = fixed_point_inverse(g, yf, *settings)
        if not per_example:
            return self._unflatten(x, batch_shape), nan_max(residual), tf.reduce_all(converged)
        return (
            self._unflatten(x, batch_shape),
            self._unflatten(residual, batch_shape),
            self._unflatten(converged, batch_shape),
        )


def _condition(conditional_input):
    """The ``conditional_input`` kwarg to pass on: none at all for an
    unconditional call, so that path's calls stay exactly as they were."""
    return {} if conditional_input is None else {"conditional_input": conditional_input}
