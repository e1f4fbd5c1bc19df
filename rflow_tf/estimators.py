"""Estimators of log det(I + J_g) for a contractive residual map, as pure functions.

Everything here follows Chen et al., "Residual Flows for Invertible Generative
Modeling" (NeurIPS 2019); the equation numbers below are the paper's.

For f(x) = x + g(x) with Lip(g) < 1 and J = dg/dx,

    log det(I + J) = sum_{k>=1} (-1)^(k+1) / k * tr(J^k).                 (3)

*Russian roulette* (eq. 5) turns the infinite sum into an unbiased finite one:
draw N ~ p(N) and evaluate n = N + m terms (m = ``n_exact_terms`` always
evaluated); term k gets the weight 1 for k <= m and 1 / P(N >= k - m) for
k > m. With several independent draws N_1..N_s the weight of term k > m is
(1/s) sum_i 1[N_i >= k - m] / P(N >= k - m) (the average of s unbiased
estimates), and n = max_i N_i + m.

*Hutchinson* replaces tr(A) by v^T A v with E[v v^T] = I (eq. 6).

*Neumann gradient* (Theorem 2, eq. 8): d/dtheta log det(I + J) =
tr((I + J)^-1 dJ/dtheta) = E[(sum_{j>=0} (-1)^j v^T J^j) dJ/dtheta v]. With the
same roulette draw, the coefficient of v^T J^j is (-1)^j times the weight of
log-det term j + 1, so the vectors w_k = v^T J^k needed for the value
(k = 1..n) also give the Neumann vector u = sum_{j=0}^{n-1} (-1)^j c_{j+1} w_j,
and the gradient is that of the scalar u^T J v with u held constant.

All functions take and return tensors; none creates variables.
"""

import math

import numpy as np
import tensorflow as tf

__all__ = [
    "DISTRIBUTIONS",
    "PROBES",
    "roulette_tail_prob",
    "sample_roulette",
    "series_weight",
    "series_weights",
    "hutchinson_probe",
    "power_series_terms",
    "logdet_coefficients",
    "neumann_coefficients",
    "power_series_logdet",
    "neumann_surrogate",
    "neumann_surrogate_jvp",
    "exact_logdet",
]

DISTRIBUTIONS = ("poisson", "geometric")
PROBES = ("gaussian", "rademacher")


def _check_dist(dist, param):
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    if dist == "geometric" and not 0.0 < float(param) < 1.0:
        raise ValueError(f"geometric p must lie in (0, 1), got {param}")
    if dist == "poisson" and not float(param) > 0.0:
        raise ValueError(f"poisson rate must be > 0, got {param}")


def roulette_tail_prob(k, dist="poisson", param=2.0, dtype=tf.float32):
    """P(N >= k) for the roulette distribution, elementwise in integer ``k``.

    * ``"geometric"`` with success probability p, support {1, 2, ...}:
      P(N >= k) = (1 - p)^(k - 1) for k >= 1, and 1 for k <= 1.
    * ``"poisson"`` with rate lambda, support {0, 1, ...}:
      P(N >= k) = 1 - e^-lambda sum_{i<k} lambda^i / i! = P(k, lambda)
      (the regularised lower incomplete gamma function) for k >= 1, and 1 for
      k <= 0.

    Example:
    ```python
    roulette_tail_prob(tf.range(1, 4), "geometric", 0.5)  # [1., .5, .25]
    ```
    """
    _check_dist(dist, param)
    k = tf.cast(k, dtype)
    param = tf.cast(param, dtype)
    if dist == "geometric":
        return tf.where(k <= 1.0, tf.ones_like(k), tf.pow(1.0 - param, tf.maximum(k - 1.0, 0.0)))
    return tf.where(k <= 0.0, tf.ones_like(k), tf.math.igamma(tf.maximum(k, 1.0), param))


def _poisson_support_bound(rate):
    """The first K > 2 rate with P(N = K) < 1e-20, so P(N >= K) < 2e-20: below
    the resolution of a float64 uniform, so inversion over {0..K} is exact."""
    k = 0
    while k <= 2 * rate or k * math.log(rate) - rate - math.lgamma(k + 1) > math.log(1e-20):
        k += 1
    return k


def sample_roulette(seed, dist="poisson", param=2.0, n_samples=1):
    """Draws ``n_samples`` values of N ~ p(N) (int32, shape [n_samples]).

    Both by inversion of one stateless uniform U (float64) per draw, so the
    sampler compiles with XLA: Geometric(p) on {1, 2, ...} as
    N = 1 + floor(log U / log(1 - p)); Poisson(lambda) on {0, 1, ...} as
    N = #{k >= 1 : U < P(N >= k)} (the tail is decreasing, so this is the
    inverse CDF), with k up to a bound whose tail probability is < 2e-20.
    ``seed`` is a stateless seed (shape [2]).

    Example:
    ```python
    sample_roulette(tf.constant([1, 2]), "geometric", 0.5, n_samples=3)
    ```
    """
    _check_dist(dist, param)
    u = tf.random.stateless_uniform(
        [n_samples], seed, minval=np.finfo(np.float64).tiny, maxval=1.0, dtype=tf.float64
    )
    if dist == "geometric":
        n = 1.0 + tf.floor(tf.math.log(u) / tf.math.log1p(-tf.cast(param, tf.float64)))
        return tf.cast(n, tf.int32)
    k = tf.range(1, _poisson_support_bound(float(param)) + 1)
    tail = roulette_tail_prob(k, dist, param, tf.float64)
    return tf.reduce_sum(tf.cast(u[:, None] < tail[None, :], tf.int32), axis=1)


def series_weight(k, draws, n_exact_terms, dist="poisson", param=2.0, dtype=tf.float32):
    """Roulette weight of term(s) ``k`` (int, 1-based; any shape) (eq. 5 with
    m exact terms):

    weight_k = 1                                               for k <= m
    weight_k = mean_i 1[N_i >= k - m] / P(N >= k - m)          for k > m

    ``draws`` are the sampled N_i (shape [s]); with ``draws=None`` every weight
    is 1 (the fixed truncation of i-ResNets, biased).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.estimators import roulette_tail_prob, sample_roulette, series_weight

    n = sample_roulette(tf.constant([0, 1]), "poisson", 2.0)   # one draw N, shape [1]
    w3 = series_weight(3, n, n_exact_terms=2)                  # 1[N >= 1] / P(N >= 1)
    assert abs(float(w3) - float(n[0] >= 1) / float(roulette_tail_prob(1))) < 1e-6
    assert float(series_weight(2, n, n_exact_terms=2)) == 1.0  # the exact terms weigh 1
    ```
    """
    k = tf.convert_to_tensor(k, tf.int32)
    if draws is None:
        return tf.ones(tf.shape(k), dtype)
    j = k - n_exact_terms
    hit = tf.cast(draws >= j[..., None], dtype)
    frac = tf.reduce_mean(hit, axis=-1)
    tail = roulette_tail_prob(j, dist, param, dtype)
    return tf.where(j <= 0, tf.ones_like(frac), frac / tail)


def series_weights(n_terms, draws, n_exact_terms, dist="poisson", param=2.0, dtype=tf.float32):
    """:func:`series_weight` of terms k = 1..``n_terms`` (shape [n_terms]).

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.estimators import sample_roulette, series_weights

    n = sample_roulette(tf.constant([0, 1]), "poisson", 2.0)
    w = series_weights(n[0] + 2, n, n_exact_terms=2)   # the N + 2 weights of one draw
    assert w.shape == [int(n[0]) + 2] and (w[:2].numpy() == 1.0).all()
    # Unbiased: averaged over many draws, every term's weight is 1.
    many = sample_roulette(tf.constant([0, 2]), "poisson", 2.0, n_samples=20000)
    np.testing.assert_allclose(series_weights(6, many, n_exact_terms=2), 1.0, atol=0.1)
    ```
    """
    return series_weight(tf.range(1, n_terms + 1), draws, n_exact_terms, dist, param, dtype)


def hutchinson_probe(shape, seed, kind="gaussian", dtype=tf.float32):
    """A probe v with E[v v^T] = I for Hutchinson's estimator tr(A) = E[v^T A v].

    ``"gaussian"``: v ~ N(0, I). ``"rademacher"``: entries +-1 with prob. 1/2
    (lower variance for the trace of a fixed matrix).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.estimators import hutchinson_probe

    A = tf.constant([[1.0, 2.0], [3.0, 4.0]])                  # tr(A) = 5
    v = hutchinson_probe([20000, 2], seed=[0, 1], kind="rademacher")
    assert set(v.numpy().ravel()) == {-1.0, 1.0}
    trace = tf.reduce_mean(tf.reduce_sum((v @ A) * v, axis=1))   # mean of v^T A v
    assert abs(float(trace) - 5.0) < 0.2
    ```
    """
    if kind == "gaussian":
        return tf.random.stateless_normal(shape, seed, dtype=dtype)
    if kind == "rademacher":
        b = tf.random.stateless_uniform(shape, seed, minval=0, maxval=2, dtype=tf.int32)
        return tf.cast(2 * b - 1, dtype)
    raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")


def logdet_coefficients(weights, k=None):
    """c_k = (-1)^(k+1) / k * weight_k (the terms of eq. 6), for k = 1..n or
    the given 1-based ``k`` (same shape as ``weights``).

    Example:
    ```python
    logdet_coefficients(tf.ones([3]))  # [1, -1/2, 1/3]
    ```
    """
    if k is None:
        k = tf.range(1, tf.shape(weights)[0] + 1)
    k = tf.cast(k, weights.dtype)
    sign = tf.where(tf.math.floormod(k, 2.0) == 1.0, 1.0, -1.0)
    return tf.cast(sign, weights.dtype) * weights / k


def neumann_coefficients(weights, j=None):
    """d_j = (-1)^j * weight_{j+1} for j = 0..n-1 (the terms of eq. 8), or
    for the given 0-based ``j`` (same shape as ``weights``, weights_{j+1}).

    The Neumann series sum_j (-1)^j J^j = (I + J)^-1 weighted so that power
    J^j uses the same roulette weight as log-det term j + 1, whose derivative
    it is (d/dtheta tr(J^k)/k = tr(J^(k-1) dJ/dtheta)).

    Example:
    ```python
    neumann_coefficients(tf.ones([3]))  # [1, -1, 1]
    ```
    """
    if j is None:
        j = tf.range(tf.shape(weights)[0])
    j = tf.cast(j, weights.dtype)
    sign = tf.where(tf.math.floormod(j, 2.0) == 0.0, 1.0, -1.0)
    return tf.cast(sign, weights.dtype) * weights


def _batch_dot(a, b):
    axes = tf.range(1, tf.rank(a))
    return tf.reduce_sum(a * b, axis=axes)


def power_series_terms(vjp_fn, v, n_terms, weights, with_neumann=False):
    """Runs w_k = w_{k-1}^T J (w_0 = v) for k = 1..n_terms and accumulates
    the log-det estimate sum_k c_k (w_k . v) (eq. 6) and, if ``with_neumann``,
    the Neumann vector u = sum_{j<n} d_j w_j (eq. 8).

    ``vjp_fn(w)`` must return w^T J for a batch of row vectors shaped like
    ``v`` (leading axis = batch). ``weights``: the series weights, a tensor
    [n_terms] or a function of the 1-based term index k (a scalar tensor)
    such as ``lambda k: series_weight(k, draws, m)``, which keeps every shape
    static for XLA. Returns ``(logdet [batch], u or None)``. Uses
    ``tf.while_loop`` so ``n_terms`` may be a random tensor.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.estimators import power_series_terms

    A = tf.constant([[0.1, 0.2], [0.0, 0.3]])   # J, with Lip < 1
    v = tf.eye(2)   # the probes e_1, e_2: their estimates sum to the exact trace
    est, u = power_series_terms(lambda w: w @ A, v, 10, tf.ones([10]), with_neumann=True)
    I = np.eye(2)
    np.testing.assert_allclose(tf.reduce_sum(est), np.log(np.linalg.det(I + A)), atol=1e-6)
    np.testing.assert_allclose(u, np.linalg.inv(I + A), atol=1e-5)   # rows e_i^T (I + J)^-1
    ```
    """
    weight_fn = weights if callable(weights) else (lambda k: tf.gather(weights, k - 1))
    batch = tf.shape(v)[0]
    acc0 = tf.zeros([batch], v.dtype)
    u0 = tf.zeros_like(v)

    def body(k, w, acc, u):  # k = 0..n-1: adds log-det term k + 1, Neumann power k
        weight = tf.cast(weight_fn(k + 1), v.dtype)
        if with_neumann:
            u = u + neumann_coefficients(weight, k) * w
        w = vjp_fn(w)
        acc = acc + logdet_coefficients(weight, k + 1) * _batch_dot(w, v)
        return k + 1, w, acc, u

    _, _, acc, u = tf.while_loop(lambda k, *_: k < n_terms, body, (tf.constant(0), v, acc0, u0))
    return acc, (u if with_neumann else None)


def power_series_logdet(vjp_fn, v, n_terms, weights):
    """Unbiased (or truncated) estimate of log det(I + J) per example (eq. 6).

    sum_{k=1}^{n} (-1)^(k+1)/k * weight_k * v^T J^k v, computed with n
    vector-Jacobian products. See :func:`power_series_terms`.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.estimators import (
        hutchinson_probe, power_series_logdet, sample_roulette, series_weights)

    A = tf.constant([[0.1, 0.2], [0.0, 0.3]])   # J, with log det(I + J) = log(1.1 * 1.3)
    v = hutchinson_probe([4096, 2], seed=[0, 1])   # one probe per example
    draws = sample_roulette(tf.constant([2, 3]), "poisson", 2.0, n_samples=64)
    n = tf.reduce_max(draws) + 2                   # 2 exact terms, then the roulette
    est = power_series_logdet(lambda w: w @ A, v, n, series_weights(n, draws, 2))
    print(float(tf.reduce_mean(est)), np.log(1.1 * 1.3))   # unbiased: close on average
    assert abs(float(tf.reduce_mean(est)) - np.log(1.1 * 1.3)) < 0.05
    ```
    """
    return power_series_terms(vjp_fn, v, n_terms, weights)[0]


def neumann_surrogate(vjp_fn, u, v):
    """The scalar-per-example s = u^T J v whose gradient, with u held constant,
    is the Neumann estimate of d log det(I + J) (Theorem 2, eq. 8).

    ``vjp_fn`` must be differentiable (recorded by the caller's tape).

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.estimators import neumann_surrogate, power_series_terms

    A = tf.Variable([[0.1, 0.2], [0.0, 0.3]])   # J
    v = tf.eye(2)
    _, u = power_series_terms(lambda w: w @ A, v, 20, tf.ones([20]), with_neumann=True)
    with tf.GradientTape() as tape:
        s = neumann_surrogate(lambda w: w @ A, tf.stop_gradient(u), v)
        surrogate = tf.reduce_sum(s)
    grad_A = tape.gradient(surrogate, A)
    # d log det(I + A) / dA = (I + A)^-T
    np.testing.assert_allclose(grad_A, np.linalg.inv(np.eye(2) + A.numpy()).T, atol=1e-5)
    ```
    """
    return _batch_dot(vjp_fn(tf.stop_gradient(u)), v)


def neumann_surrogate_jvp(jvp_fn, u, v):
    """The same s = u^T J v as :func:`neumann_surrogate`, from a
    Jacobian-vector product ``jvp_fn(v)`` = J v (a forward-mode pass) instead
    of a vector-Jacobian product; its gradient then needs no second-order
    backward pass through a VJP.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.estimators import neumann_surrogate_jvp, power_series_terms

    A = tf.Variable([[0.1, 0.2], [0.0, 0.3]])   # J
    v = tf.eye(2)
    _, u = power_series_terms(lambda w: w @ A, v, 20, tf.ones([20]), with_neumann=True)
    with tf.GradientTape() as tape:
        s = neumann_surrogate_jvp(lambda t: t @ tf.transpose(A), u, v)   # rows of J v
        surrogate = tf.reduce_sum(s)
    grad_A = tape.gradient(surrogate, A)
    np.testing.assert_allclose(grad_A, np.linalg.inv(np.eye(2) + A.numpy()).T, atol=1e-5)
    ```
    """
    return _batch_dot(tf.stop_gradient(u), jvp_fn(v))


def exact_logdet(jacobian):
    """log |det(I + J)| for a batch of square Jacobians J ([..., D, D]).

    With A = I + J = QR (Q orthogonal, |det Q| = 1, R upper triangular),

        log |det A| = sum_i log |R_ii|,    d log |det A| / dJ = A^{-T} = Q R^{-T}.

    The value comes from a QR factorisation and the gradient from the same
    factors (one triangular solve), because ``tf.linalg.slogdet``, ``det``
    and ``lu`` have no XLA kernel on CPU: this compiles with XLA
    (``jit_compile=True``) in float32 and float64. It equals ``slogdet``'s
    log |det| to rounding (QR by Householder reflections is backward stable),
    is -inf for a singular A, and is differentiable twice (the gradient is
    built from differentiable ops).

    Example:
    ```python
    exact_logdet(tf.zeros([4, 2, 2]))  # zeros([4])
    tf.function(exact_logdet, jit_compile=True)(0.5 * tf.eye(3)[None])  # [3 log 1.5]
    ```
    """
    jacobian = tf.convert_to_tensor(jacobian)
    return _log_abs_det_qr(jacobian + tf.eye(tf.shape(jacobian)[-1], dtype=jacobian.dtype))


@tf.custom_gradient
def _log_abs_det_qr(a):
    """log |det a| over the last two axes by QR, with gradient a^{-T} (see :func:`exact_logdet`)."""
    q, r = tf.linalg.qr(a)
    value = tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(r))), axis=-1)

    def grad(upstream):
        # a^{-1} = R^{-1} Q^T, so a^{-T} = (R^{-1} Q^T)^T.
        inv = tf.linalg.triangular_solve(r, tf.linalg.matrix_transpose(q), lower=False)
        return upstream[..., None, None] * tf.linalg.matrix_transpose(inv)

    return value, grad
