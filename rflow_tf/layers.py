"""Keras 3 layers for Lipschitz-constrained residual branches.

* :class:`LipSwish` -- phi(x) = x * sigmoid(softplus(beta) x) / 1.1, |phi'| <= 1.
* :class:`LipschitzDense`, :class:`LipschitzConv2D` -- spectral normalisation
  W_eff = W / max(1, sigma / coeff), sigma = ||W||_2 estimated by power
  iteration on persistent non-trainable vectors; the gradient flows through
  sigma. For k x k convolutions sigma is the operator norm of the whole padded
  convolution on the layer's input size.
* :class:`ActNormalization` -- the weights of the ActNorm bijector.
* :func:`lipschitz_dense_net`, :func:`lipschitz_conv_net` -- residual branches g
  with Lip(g) <= coeff, ready for :class:`rflow_tf.bijectors.IResBlock`.
* :class:`JacobianChain` -- such a branch evaluated with the factors of its
  Jacobian, for cheap vector-Jacobian products in the log-det power series.
* :func:`converge_lipschitz` -- runs every power iteration found in a model,
  bijector or distribution to convergence (call it after each optimiser step
  and before evaluation or sampling).
"""

import math

import keras
import numpy as np
import tensorflow as tf
# Pauses every gradient tape around the power-iteration graph function, so
# enclosing tapes do not build its (unused) backward function at trace time.
from tensorflow.python.eager import record as _tape_record

__all__ = [
    "LipSwish",
    "lipswish_value_and_derivative",
    "LipschitzDense",
    "LipschitzConv2D",
    "ActNormalization",
    "FanInUniform",
    "INITS",
    "lipschitz_dense_net",
    "lipschitz_conv_net",
    "JacobianChain",
    "lipschitz_layers",
    "keras_layers",
    "converge_lipschitz",
    "update_lipschitz",
    "mark_lipschitz_current",
    "make_activation",
    "ACTIVATIONS",
]

_PACKAGE = "rflow_tf"


#: Below this many elements the fused XLA LipSwish costs more than it saves
#: (measured on the 2-core CPU of benchmarks/: 4x faster at 6.4M elements,
#: 1.2x at 400k, 10% slower at 64k).
_FUSED_LIPSWISH_MIN_ELEMENTS = 2 ** 18


@tf.function(jit_compile=True)
def _lipswish_forward(x, beta):
    b = tf.nn.softplus(beta)
    bx = b * x
    s = tf.sigmoid(bx)
    return x * s, s + tf.raw_ops.SigmoidGrad(y=s, dy=bx)      # SigmoidGrad(s, w) = w s (1 - s)


@tf.function(jit_compile=True)
def _lipswish_backward(x, beta, gy, gd=None):
    """d/d(x, beta) of sum(gy * y + gd * d); ``gd=None``: of sum(gy * y) only
    (a separate trace, without the second-derivative terms)."""
    b = tf.nn.softplus(beta)
    w = b * x
    s = tf.sigmoid(w)
    ss = s * (1.0 - s)
    gx = gy * (s + w * ss)                          # dy/dx = d
    gb_pointwise = gy * x * x * ss                  # dy/db = x^2 s (1 - s)
    if gd is not None:
        e = ss * (2.0 + w * (1.0 - 2.0 * s))        # dd/dw
        gx += gd * (b * e)                          # dd/dx = b e
        gb_pointwise += gd * x * e                  # dd/db = x e
    return gx, tf.reduce_sum(gb_pointwise) * tf.sigmoid(beta)   # db/dbeta = sigmoid(beta)


@tf.custom_gradient
def lipswish_value_and_derivative(x, beta):
    """(y, d) = (x s, s + b x s (1 - s)), s = sigmoid(b x), b = softplus(beta):
    LipSwish without its 1/1.1 and its derivative, phi = y / 1.1 and
    phi' = d / 1.1 (paper eq. 10).

    Forward and backward are each one fused XLA kernel: a pass over x writes
    y and d, and the backward pass recomputes s from x (so only x is kept)
    and writes dx in one pass, with the closed forms dy/dx = d,
    dd/dx = b e, dy/db = x^2 s (1 - s), dd/db = x e, where
    e = s (1 - s) (2 + b x (1 - 2 s)). Unfused, TensorFlow runs about fifteen
    memory-bound element-wise kernels for the same backward pass.

    Example:
    ```python
    y, d = lipswish_value_and_derivative(tf.linspace(-3., 3., 7), tf.constant(0.5))
    ```
    """
    y, d = _lipswish_forward(x, beta)

    def grad(gy, gd):
        if gy is None:
            gy = tf.zeros_like(x)
        return _lipswish_backward(x, beta, gy, gd)

    return (y, d), grad


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LipSwish(keras.layers.Layer):
    """LipSwish activation (paper eq. 10): phi(x) = x * sigmoid(b x) / 1.1,
    b = softplus(beta) > 0, with one learnable scalar beta per layer.

    max_x |phi'(x)| <= 1 for every b > 0, so it keeps Lip(g) <= 1 while its
    second derivative does not vanish where |phi'| is close to 1.

    Example:
    ```python
    act = LipSwish()          # beta initialised to 0.5
    y = act(tf.linspace(-3., 3., 7))
    ```
    """

    def __init__(self, beta_initializer=0.5, **kwargs):
        super().__init__(**kwargs)
        self.beta_initializer = float(beta_initializer)

    def build(self, input_shape):
        self.beta = self.add_weight(
            name="beta", shape=(), initializer=keras.initializers.Constant(self.beta_initializer))

    def call(self, x):
        b = tf.nn.softplus(tf.cast(self.beta, x.dtype))
        return x * tf.sigmoid(b * x) / 1.1

    def value_and_derivative(self, x):
        """``(y, d, c)`` with phi(x) = c y and phi'(x) = c d, c = 1/1.1:
        y = x s and d = s + b x s (1 - s) with s = sigmoid(b x). (The constant
        c is returned separately so a caller can fold it into the next linear
        map instead of spending a pass over the tensor.) For tensors of at
        least 2^18 elements the forward and backward passes are each one fused
        XLA kernel (:func:`lipswish_value_and_derivative`); for smaller ones the
        kernel launches cost more than they save, and plain ops are used.
        """
        beta = tf.cast(self.beta, x.dtype)
        if (x.shape.num_elements() or 0) >= _FUSED_LIPSWISH_MIN_ELEMENTS:
            return lipswish_value_and_derivative(x, beta) + (1.0 / 1.1,)
        return _lipswish_forward.python_function(x, beta) + (1.0 / 1.1,)

    def get_config(self):
        return {**super().get_config(), "beta_initializer": self.beta_initializer}


ACTIVATIONS = ("lipswish", "elu", "softplus", "relu", "identity")


def make_activation(name, dtype=None):
    """A 1-Lipschitz activation layer by name: one of :data:`ACTIVATIONS`.

    Example:
    ```python
    act = make_activation("elu")
    ```
    """
    if name == "lipswish":
        return LipSwish(dtype=dtype)
    if name in ("elu", "softplus", "relu"):
        return keras.layers.Activation(name, dtype=dtype)
    if name == "identity":
        return keras.layers.Identity(dtype=dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FanInUniform(keras.initializers.Initializer):
    """U(-scale / sqrt(fan_in), scale / sqrt(fan_in)): PyTorch's default
    initialisation of ``nn.Linear`` / ``nn.Conv2d`` weights and biases (the
    authors' reference code), fan_in = the product of all kernel dimensions but
    the last (kh * kw * c_in for a convolution, d_in for a dense kernel).

    For a bias (shape (units,)) pass the kernel's ``fan_in`` explicitly; the
    Lipschitz layers do that themselves when given
    ``bias_initializer=FanInUniform()``. ``scale`` < 1 shrinks the range (the
    reference's toy nets start their last layer at 1/1000 of it).

    Example:
    ```python
    init = FanInUniform()
    w = init((64, 32))              # |w| <= 1/8
    b = FanInUniform(fan_in=64)((32,))
    ```
    """

    def __init__(self, scale=1.0, fan_in=None, seed=None):
        self.scale = float(scale)
        self.fan_in = None if fan_in is None else int(fan_in)
        self.seed = seed
        self._uniform = keras.initializers.RandomUniform(-1.0, 1.0, seed=seed)

    def for_fan_in(self, fan_in):
        """The same initialiser with ``fan_in`` fixed (for a bias)."""
        return FanInUniform(self.scale, fan_in if self.fan_in is None else self.fan_in,
                            self.seed)

    def __call__(self, shape, dtype=None):
        fan_in = self.fan_in
        if fan_in is None:
            if len(shape) < 2:
                raise ValueError(f"FanInUniform needs fan_in= for a shape of rank < 2, got "
                                 f"{tuple(shape)}")
            fan_in = int(np.prod(shape[:-1]))
        bound = self.scale / math.sqrt(fan_in)
        return self._uniform(shape, dtype=dtype) * bound

    def get_config(self):
        return {"scale": self.scale, "fan_in": self.fan_in, "seed": self.seed}


#: Initialisations of the Lipschitz nets built here: "reference" (weights and
#: biases :class:`FanInUniform`, as the authors' PyTorch code) and "glorot"
#: (Glorot-uniform weights and zero biases; rflow_tf before config version 2).
INITS = ("reference", "glorot")


def _initializers(init, scale=1.0):
    """(kernel_initializer, bias_initializer) of an :data:`INITS` name."""
    if init == "reference":
        return FanInUniform(scale), FanInUniform()
    if init == "glorot":
        kernel = "glorot_uniform"
        if scale != 1.0:
            kernel = keras.initializers.VarianceScaling(scale ** 2, "fan_avg", "uniform")
        return kernel, "zeros"
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _bias_initializer(initializer, kernel_shape):
    """A FanInUniform bias initialiser learns its fan_in from the kernel."""
    if isinstance(initializer, FanInUniform):
        return initializer.for_fan_in(int(np.prod(kernel_shape[:-1])))
    return initializer


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
    u and v (usually a few steps). Any training loop (``tfp.math.minimize``,
    Keras ``fit``, a hand-written tape) therefore sees a converged sigma.
    """

    #: Relative size of the deterministic random perturbation added to v
    #: before each re-estimate, so that a stored v exactly orthogonal to the
    #: new top singular vector cannot stall power iteration.
    _PERTURBATION = 1e-3

    def __init__(self, coeff=0.98, power_iterations=0, tol=5e-4, max_iterations=200,
                 **kwargs):
        super().__init__(**kwargs)
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
        self.u = self.add_weight(name="power_u", shape=u_shape, trainable=False,
                                 initializer=keras.initializers.RandomNormal(seed=None))
        self.v = self.add_weight(name="power_v", shape=v_shape, trainable=False,
                                 initializer=keras.initializers.RandomNormal(seed=None))
        self.sigma = self.add_weight(name="sigma", shape=(), trainable=False,
                                     initializer="zeros")
        # The kernel of the last converged estimate. Deliberately untracked
        # (plain attribute, no Keras weight, no checkpoint entry): checkpoints
        # and SavedModels keep their layout; after a restore the kernel differs
        # from it, so the first use re-estimates (rflow_tf.load and the trainer
        # call mark_estimate_current instead, to keep a restored model exact).
        with tf.init_scope():
            estimated = tf.Variable(tf.zeros(self.kernel.shape, self.kernel.dtype),
                                    trainable=False, name="estimated_kernel")
        object.__setattr__(self, "_estimated_kernel", estimated)
        self.converge()

    def _power_step(self, u, v, kernel):
        v = _l2_normalize(self._apply_wt(u, kernel))
        u = _l2_normalize(self._apply_w(v, kernel))
        return u, v

    def _sigma(self, kernel, u, v):
        """u^T W v: differentiable in the kernel with u and v held constant."""
        return tf.reduce_sum(tf.stop_gradient(u) * self._apply_w(tf.stop_gradient(v), kernel))

    def _kernel_value(self):
        return tf.stop_gradient(tf.convert_to_tensor(self.kernel))

    def _iterate_to_convergence(self, kernel, v, tol, max_iterations):
        """Power iteration from v until both singular vectors move by less than
        ``tol`` (2-norm) in one step, or ``max_iterations`` steps.

        The stopping rule is on the vectors, not on sigma: when the top
        singular values are close, sigma changes little per step long before
        it is accurate. Asymptotically the relative error of sigma is at most
        half the last step's change of v, so ``tol`` bounds it by tol / 2.
        Returns ``(u, v)``.
        """
        v = _l2_normalize(v)
        u = _l2_normalize(self._apply_w(v, kernel))

        def cond(u, v, change):
            return change > tol

        def body(u, v, change):
            u2, v2 = self._power_step(u, v, kernel)
            change = tf.maximum(tf.norm(tf.reshape(u2 - u, [-1])),
                                tf.norm(tf.reshape(v2 - v, [-1])))
            return u2, v2, change

        u, v, _ = tf.while_loop(cond, body, (u, v, tf.constant(np.inf, kernel.dtype)),
                                maximum_iterations=max_iterations)
        return u, v

    def _random_like(self, x, salt):
        """A deterministic unit-norm random tensor shaped like x, seeded by
        ``salt`` and the stored sigma: a function of the layer's state, so
        resumed runs and rebuilt models repeat it."""
        bits = tf.bitcast(tf.cast(tf.convert_to_tensor(self.sigma), tf.float32), tf.int32)
        seed = tf.stack([tf.constant(salt, tf.int32), bits])
        return _l2_normalize(tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype))

    def _fresh_estimate(self, kernel, tol=None, max_iterations=None):
        """(u, v) re-converged from the stored v plus a small deterministic perturbation."""
        tol = self.tol if tol is None else float(tol)
        max_iterations = self.max_iterations if max_iterations is None else int(max_iterations)
        v = _l2_normalize(tf.convert_to_tensor(self.v))
        v = v + self._PERTURBATION * self._random_like(v, 0)
        return self._iterate_to_convergence(kernel, v, tol, max_iterations)

    def _store(self, u, v, kernel, current=True):
        # Assign the backing tf.Variables: a Keras StatelessScope (active while
        # Keras builds a functional model symbolically) would otherwise turn
        # these assignments into no-ops in the cached graph function.
        _backing(self.u).assign(u)
        _backing(self.v).assign(v)
        sigma = self._sigma(kernel, u, v)
        _backing(self.sigma).assign(sigma)
        if current:
            self._estimated_kernel.assign(kernel)
        return sigma

    def estimate_is_current(self):
        """True (a bool tensor) when the stored u, v were converged for the
        current kernel."""
        return tf.reduce_all(tf.equal(self._kernel_value(), self._estimated_kernel))

    def mark_estimate_current(self):
        """Declares the stored u, v (e.g. just restored from a checkpoint) the
        estimate for the current kernel, so they are used as they are until the
        kernel changes. Keeps a restored model's outputs exactly as saved.

        Example: ``ckpt.restore(path); [l.mark_estimate_current() for l in layers]``.
        """
        self._estimated_kernel.assign(self._kernel_value())

    def update_estimate(self):
        """Re-converges u, v (warm-started) if the kernel changed since the last
        estimate; returns the (u, v) to use, as tensors. Inside ``strategy.run``
        of a multi-replica strategy the fresh estimate is used but not stored."""
        if not self.auto_update:
            return tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)
        store = _can_store_in_context()
        if tf.executing_eagerly():
            return self._update_estimate(store)
        # One graph function per layer (and context), traced once and reused by
        # every enclosing trace: forward, recomputing backward, every retrace.
        fns = self.__dict__.setdefault("_update_fns", {})
        if store not in fns:
            fns[store] = tf.function(lambda: self._update_estimate(store), autograph=False)
        with _tape_record.stop_recording():     # no gradient flows through u, v
            return fns[store]()

    def _update_estimate(self, store):
        kernel = self._kernel_value()

        def fresh():
            u, v = self._fresh_estimate(kernel)
            if store:
                self._store(u, v, kernel)
            return u, v

        def stored():
            return tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)

        current = self.estimate_is_current()
        if tf.executing_eagerly():
            return stored() if bool(current) else fresh()
        return tf.cond(current, stored, fresh)

    def power_iterate(self, n):
        """Runs ``n`` power-iteration steps and stores u, v and sigma (a partial
        estimate: the next use of the kernel still re-converges it)."""
        kernel = self._kernel_value()
        u, v = tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)
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
        deterministic random vector. Convergence is judged on the singular vectors (see
        ``tol``). Training loops need not call it: the layer re-estimates by
        itself when its kernel changes. Call it before evaluation or export
        for the most careful estimate.
        """
        tol = self.tol if tol is None else float(tol)
        max_iterations = self.max_iterations if max_iterations is None else int(max_iterations)
        kernel = self._kernel_value()
        u1, v1 = self._fresh_estimate(kernel, tol, max_iterations)
        v0 = self._random_like(tf.convert_to_tensor(self.v), 1)
        mats = self._gram_operators(kernel)
        if mats.shape[0] == 1:          # a matrix: start at Gram iteration's top direction
            v0 = _gram_top_vector(mats[0], v0)
        u2, v2 = self._iterate_to_convergence(kernel, v0, tol, max_iterations)
        better = self._sigma(kernel, u2, v2) > self._sigma(kernel, u1, v1)
        u, v = tf.cond(better, lambda: (u2, v2), lambda: (u1, v1))
        return self._store(u, v, kernel)

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

        Example: ``layer.sigma_upper_bound() >= np.linalg.norm(w, 2)``.
        """
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
        return {**super().get_config(), "coeff": self.coeff,
                "power_iterations": self.power_iterations, "tol": self.tol,
                "max_iterations": self.max_iterations}


def _gram_top_vector(mat, v, n_squarings=10):
    """(M M^T)^(2^n) applied to a start vector, for the matrix map
    v -> M^T v of a kernel M [n_in, n_out] (v and the result in R^n_in):
    components along singular values s_i shrink like (s_i / s_1)^(2^(n+1)).
    Uses the smaller Gram matrix; rescaled at every squaring."""
    transpose = mat.shape[0] > mat.shape[1]
    gram = tf.matmul(mat, mat, transpose_a=True) if transpose else \
        tf.matmul(mat, mat, transpose_b=True)
    for _ in range(n_squarings):
        gram = gram / tf.reduce_max(tf.abs(gram))
        gram = tf.matmul(gram, gram)
    if transpose:                       # iterate in R^n_out, then map back: v = M u
        u = tf.linalg.matvec(gram, tf.linalg.matvec(mat, v, transpose_a=True))
        return _l2_normalize(tf.linalg.matvec(mat, u))
    return _l2_normalize(tf.linalg.matvec(gram, v))


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
        log_scale = log_scale + tf.math.log(fro) / (2.0 ** t)
        g = tf.matmul(g, g, adjoint_a=True)
    fro = tf.maximum(_frobenius(g), tf.cast(1e-30, log_scale.dtype))
    log_bound = log_scale + tf.math.log(fro) / (2.0 ** n_iterations)
    return tf.exp(tf.reduce_max(log_bound))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LipschitzDense(_SpectralNormalized):
    """Dense layer with spectral norm at most ``coeff``: y = x W_eff + b,
    W_eff = W / max(1, sigma / coeff), sigma ~= ||W||_2 by power iteration.

    ``power_iterations`` steps run inside ``call(training=True)``; call
    :meth:`converge` (or :func:`converge_lipschitz`) after each optimiser step.

    Example:
    ```python
    layer = LipschitzDense(64, coeff=0.9)
    y = layer(tf.zeros([8, 2]))
    layer.converge()
    ```
    """

    def __init__(self, units, coeff=0.98, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(coeff=coeff, **kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        d_in = input_shape[-1]
        if d_in is None:
            raise ValueError("LipschitzDense needs a known last input dimension")
        self.kernel = self.add_weight(name="kernel", shape=(d_in, self.units),
                                      initializer=self.kernel_initializer)
        self.bias = (self.add_weight(
            name="bias", shape=(self.units,),
            initializer=_bias_initializer(self.bias_initializer, self.kernel.shape))
            if self.use_bias else None)
        self._init_power_vectors((self.units,), (d_in,))

    def _apply_w(self, v, kernel):          # W v with W = kernel^T
        return tf.linalg.matvec(kernel, v, transpose_a=True)

    def _apply_wt(self, u, kernel):         # W^T u
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
        return {**super().get_config(), "units": self.units, "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LipschitzConv2D(_SpectralNormalized):
    """Stride-1 'same' convolution whose operator norm is at most ``coeff``.

    sigma is the largest singular value of the *whole* linear map
    x -> conv(x, W) on the layer's input size (zero padding included),
    estimated by power iteration with conv2d and conv2d_transpose over
    feature maps u (output-shaped) and v (input-shaped). For 1x1 kernels the
    operator norm equals the kernel's matrix norm and vectors of size C are
    used. The layer therefore needs static input height and width.

    Example:
    ```python
    conv = LipschitzConv2D(32, 3, coeff=0.98)
    y = conv(tf.zeros([4, 8, 8, 3]))
    ```
    """

    def __init__(self, filters, kernel_size, coeff=0.98, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
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
                f"the operator norm of the padded convolution; got input shape {input_shape}")
        self.kernel = self.add_weight(name="kernel", shape=self.kernel_size + (c, self.filters),
                                      initializer=self.kernel_initializer)
        self.bias = (self.add_weight(
            name="bias", shape=(self.filters,),
            initializer=_bias_initializer(self.bias_initializer, self.kernel.shape))
            if self.use_bias else None)
        self._input_hw = (h, w)
        if self._is_pointwise:
            self._init_power_vectors((self.filters,), (c,))
        else:
            self._init_power_vectors((1, h, w, self.filters), (1, h, w, c))

    def _apply_w(self, v, kernel):
        if self._is_pointwise:
            return tf.linalg.matvec(kernel[0, 0], v, transpose_a=True)
        return self.apply_kernel(v, kernel)

    def _apply_wt(self, u, kernel):
        if self._is_pointwise:
            return tf.linalg.matvec(kernel[0, 0], u)
        return self.apply_kernel_transpose(u, kernel)

    def _gram_operators(self, kernel):
        """The matrices whose largest norm bounds the operator norm: the 1x1
        kernel itself, or the per-frequency matrices of the circular
        convolution on an (H + kh - 1) x (W + kw - 1) torus."""
        if self._is_pointwise:
            return kernel[0, 0][None]
        kh, kw, c_in, c_out = kernel.shape
        n1, n2 = self._input_hw[0] + kh - 1, self._input_hw[1] + kw - 1
        padded = tf.pad(kernel, [[0, n1 - kh], [0, n2 - kw], [0, 0], [0, 0]])
        spectrum = tf.signal.fft2d(tf.cast(tf.transpose(padded, [2, 3, 0, 1]), tf.complex64
                                           if kernel.dtype == tf.float32 else tf.complex128))
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
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActNormalization(keras.layers.Layer):
    """Per-channel affine y = (x + bias) * exp(log_scale) with data-dependent
    initialisation (Kingma & Dhariwal 2018): on the first batch seen by
    :meth:`initialize`, bias = -mean and log_scale = -0.5 log max(var, 0.2)
    (the reference's floor), so the output has zero mean and unit variance.
    ``variance="unbiased"`` (default, as the reference's ``torch.var``) divides
    the sum of squares by n - 1, ``"biased"`` by n (rflow_tf before config
    version 3).

    Its log-det per example is (number of positions) * sum(log_scale).
    The flag ``initialized`` is a variable, so it is saved in checkpoints.

    Example:
    ```python
    an = ActNormalization()
    an.initialize(x_first_batch)
    y = an(x)
    ```
    """

    def __init__(self, variance="unbiased", **kwargs):
        super().__init__(**kwargs)
        if variance not in ("unbiased", "biased"):
            raise ValueError(f"ActNormalization variance must be 'unbiased' or 'biased', "
                             f"got {variance!r}")
        self.variance = variance

    def get_config(self):
        return {**super().get_config(), "variance": self.variance}

    def build(self, input_shape):
        c = input_shape[-1]
        self.bias = self.add_weight(name="bias", shape=(c,), initializer="zeros")
        self.log_scale = self.add_weight(name="log_scale", shape=(c,), initializer="zeros")
        self.initialized = self.add_weight(name="initialized", shape=(), dtype="bool",
                                           trainable=False, initializer="zeros")

    def initialize(self, x):
        """Sets bias and log_scale from the batch ``x`` unless already initialised."""
        if not self.built:
            self.build(x.shape)
        axes = list(range(len(x.shape) - 1))
        x = tf.cast(x, self.bias.dtype)
        mean, var = tf.nn.moments(x, axes)
        if self.variance == "unbiased":
            n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), var.dtype)
            var = var * n / tf.maximum(n - 1.0, 1.0)

        def init():
            self.bias.assign(-mean)
            self.log_scale.assign(-0.5 * tf.math.log(tf.maximum(var, 0.2)))
            self.initialized.assign(True)
            return tf.constant(True)

        tf.cond(tf.convert_to_tensor(self.initialized), lambda: tf.constant(False), init)

    def call(self, x):
        return (x + self.bias) * tf.exp(self.log_scale)

    def inverse(self, y):
        """x = y * exp(-log_scale) - bias."""
        return y * tf.exp(-self.log_scale) - self.bias


def _sequential(layers, input_shape, dtype, name):
    model = keras.Sequential([keras.Input(shape=input_shape, dtype=dtype)] + layers, name=name)
    return model


def lipschitz_dense_net(dim, hidden_units=(128, 128), coeff=0.9, activation="lipswish",
                        preactivation=False, dtype="float32", name=None, init="reference",
                        last_layer_scale=1.0):
    """A residual branch g: R^dim -> R^dim, Lip(g) <= coeff^L (<= coeff).

    g = W_L phi(... phi(W_1 x)) with every W_i a :class:`LipschitzDense`
    (spectral norm <= coeff) and phi a 1-Lipschitz activation; with
    ``preactivation=True`` an activation is applied to x first.

    ``init``: one of :data:`INITS` ("reference": weights and biases
    U(+-1/sqrt(fan_in)), as PyTorch and the authors' code; "glorot").
    ``last_layer_scale`` multiplies W_L's initial range (the reference's toy
    nets use 1e-3, so every block starts close to the identity).

    Example:
    ```python
    net = lipschitz_dense_net(2, hidden_units=(64, 64), coeff=0.9)
    block = rflow_tf.bijectors.IResBlock(net)
    ```
    """
    units = list(hidden_units) + [dim]
    layers = [make_activation(activation, dtype)] if preactivation else []
    for i, u in enumerate(units):
        if i > 0:
            layers.append(make_activation(activation, dtype))
        scale = last_layer_scale if i == len(units) - 1 else 1.0
        kernel_init, bias_init = _initializers(init, scale)
        layers.append(LipschitzDense(u, coeff=coeff, dtype=dtype, kernel_initializer=kernel_init,
                                     bias_initializer=bias_init))
    return _sequential(layers, (dim,), dtype, name)


def lipschitz_conv_net(input_shape, hidden_channels=512, kernels="3-1-3", coeff=0.98,
                       activation="lipswish", preactivation=True, dtype="float32", name=None,
                       init="reference"):
    """The paper's image residual branch (Appendix E), Lip(g) <= coeff:
    [act] Conv_k1(C -> h) act Conv_k2(h -> h) act ... Conv_kL(h -> C), each a
    :class:`LipschitzConv2D` on the block's spatial size; ``init`` one of
    :data:`INITS` (see :func:`lipschitz_dense_net`).

    ``input_shape`` is (H, W, C) without batch; ``kernels`` like "3-1-3".

    Example:
    ```python
    net = lipschitz_conv_net((8, 8, 3), hidden_channels=64)
    block = rflow_tf.bijectors.IResBlock(net)
    ```
    """
    ks = [int(k) for k in str(kernels).split("-")]
    channels = input_shape[-1]
    layers = [make_activation(activation, dtype)] if preactivation else []
    for i, k in enumerate(ks):
        if i > 0:
            layers.append(make_activation(activation, dtype))
        out = channels if i == len(ks) - 1 else hidden_channels
        kernel_init, bias_init = _initializers(init)
        layers.append(LipschitzConv2D(out, k, coeff=coeff, dtype=dtype,
                                      kernel_initializer=kernel_init, bias_initializer=bias_init))
    return _sequential(layers, tuple(input_shape), dtype, name)


def _activation_with_derivative(layer):
    """The activation layer as a -> (y, d, c) with phi(a) = c y and
    phi'(a) = c d (c a Python float), for the activations of our nets; else None."""
    if isinstance(layer, LipSwish):
        return layer.value_and_derivative
    if isinstance(layer, keras.layers.Identity):
        return lambda a: (a, tf.ones_like(a), 1.0)
    if not isinstance(layer, keras.layers.Activation):
        return None
    name = layer.get_config().get("activation")
    if name == "elu":
        def elu(a):
            y = tf.nn.elu(a)
            return y, tf.where(a > 0, tf.ones_like(a), y + 1.0), 1.0
        return elu
    if name == "softplus":
        return lambda a: (tf.nn.softplus(a), tf.sigmoid(a), 1.0)
    if name == "relu":
        return lambda a: (tf.nn.relu(a), tf.cast(a > 0, a.dtype), 1.0)
    return None


class JacobianChain:
    """A Lipschitz net g evaluated together with the factors of its Jacobian.

    For g = L_n o phi o L_{n-1} o ... o phi o L_1 (optionally with a leading
    phi), with L_i(h) = K_i h + b_i a :class:`LipschitzDense` or
    :class:`LipschitzConv2D` and phi a pointwise activation,

        J_g(x) = K_n D_{n-1} K_{n-1} ... D_1 K_1,   D_i = diag(phi'(a_i)),

    where a_i are the pre-activations of the forward pass. :meth:`linearize`
    returns g(x) and these factors (the effective kernels and phi'(a_i),
    computed from the same sigmoid as phi), so every vector-Jacobian product
    u^T J of the power series costs one transposed linear map and one
    multiply per layer instead of a generic backward pass that recomputes the
    activation's derivative; Jacobian-vector products J v (for the Neumann
    surrogate u^T J v) use the same factors. All results are differentiable.
    A constant activation scale (LipSwish's 1/1.1) is folded into the next
    kernel, which saves a pass over the activations.

    :meth:`from_net` returns ``None`` for a net of any other structure (then
    :class:`rflow_tf.bijectors.IResBlock` falls back to automatic
    differentiation).

    Example:
    ```python
    net = lipschitz_dense_net(2, hidden_units=(64, 64))
    chain = JacobianChain.from_net(net)
    gx, lin = chain.linearize(x)
    w = lin.vjp(u)        # u^T J_g(x)
    jv = lin.jvp(v)       # J_g(x) v
    ```
    """

    def __init__(self, layers):
        self._layers = list(layers)

    @classmethod
    def from_net(cls, net):
        """A chain for a Sequential of Lipschitz linear layers and supported
        activations (LipSwish, elu, softplus, relu, identity); else None."""
        layers = getattr(net, "layers", None)
        if not isinstance(net, keras.Sequential) or not layers:
            return None
        for layer in layers:
            if not isinstance(layer, (LipschitzDense, LipschitzConv2D)) and \
                    _activation_with_derivative(layer) is None:
                return None
        return cls(layers)

    def linearize(self, x, training=False):
        """Returns ``(g(x), lin)``: lin.vjp(u) = u^T J_g(x), lin.jvp(v) = J_g(x) v.

        ``training=True`` runs each layer's ``power_iterations`` first, as
        the layer's own ``call`` does.
        """
        factors, h, scale = [], x, 1.0
        for layer in self._layers:
            if isinstance(layer, _SpectralNormalized):
                layer._maybe_iterate(training)
                kernel = tf.cast(layer.effective_kernel(), h.dtype)
                if scale != 1.0:        # phi = c y: fold c into this (small) kernel
                    kernel, scale = kernel * scale, 1.0
                factors.append((layer, kernel))
                h = layer.apply_kernel(h, kernel)
                if layer.use_bias:
                    h = h + tf.cast(layer.bias, h.dtype)
            else:
                if scale != 1.0:
                    h, factors[-1] = h * scale, (None, factors[-1][1] * scale)
                h, d, scale = _activation_with_derivative(layer)(h)
                factors.append((None, d))
        if scale != 1.0:
            h, factors[-1] = h * scale, (None, factors[-1][1] * scale)
        return h, _Linearization(factors)


class _Linearization:
    """The factors of J_g(x) from :meth:`JacobianChain.linearize`."""

    def __init__(self, factors):
        self._factors = factors

    def vjp(self, u):
        """u^T J: transposed maps and derivative multiplies, last layer first."""
        for layer, t in reversed(self._factors):
            u = u * t if layer is None else layer.apply_kernel_transpose(u, t)
        return u

    def jvp(self, v):
        """J v: the linear maps (without bias) and derivative multiplies in order."""
        for layer, t in self._factors:
            v = v * t if layer is None else layer.apply_kernel(v, t)
        return v


#: Attributes through which bijectors, distributions and flows reach their parts.
_PART_ATTRIBUTES = ("net", "layer", "bijector", "bijectors", "distribution", "stages", "inner",
                    "layers_for_lipschitz")


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
                if isinstance(part, (list, tuple, keras.layers.Layer)) or \
                        isinstance(part, tf.Module):
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


def converge_lipschitz(obj, tol=None, max_iterations=None):
    """Runs power iteration to convergence in every Lipschitz layer of ``obj``
    (see :func:`lipschitz_layers`; a layer, model, bijector, distribution or a
    list of these); returns the list of sigma estimates.

    Not needed for the bound during training: every layer re-estimates by
    itself when its kernel has changed (see :func:`update_lipschitz`). This is
    the careful version for before evaluation or export: a warm-started and a
    randomly restarted power iteration per layer, the larger sigma kept.
    ``tol`` and ``max_iterations`` default to each layer's own settings.

    Example:
    ```python
    converge_lipschitz(flow)
    ```
    """
    layers = lipschitz_layers(obj)
    if not layers:
        raise ValueError(f"converge_lipschitz: no Lipschitz layers found in {type(obj).__name__}"
                         " (expected a Keras layer or model, a bijector, a distribution or a "
                         "list of these)")
    return [layer.converge(tol, max_iterations) for layer in layers]


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
