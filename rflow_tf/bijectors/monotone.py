"""Monotone scalar maps shared by the sigmoidal and logistic-mixture bijectors.

Both the deep sigmoidal flow (NAF, Huang et al. 2018) and the logistic-mixture
CDF coupling (Flow++, Ho et al. 2019) apply, elementwise, the map

    y = logit( sum_j w_j sigmoid(a_j x + b_j) ),   w on the simplex, a_j > 0,

(Flow++ writes a_j = exp(-s_j), b_j = -mu_j exp(-s_j)). It is strictly
increasing in x and maps R onto R. :func:`sigmoid_mixture_logit` evaluates it
and its log-derivative entirely in log-space, so neither saturates at large
|x| (no sigmoid is ever rounded to 0 or 1). :func:`bisect_increasing` inverts
any elementwise increasing map by bracketing and bisection with a stated
tolerance.
"""

import tensorflow as tf

__all__ = ["sigmoid_mixture_logit", "logit_of_log_mixture", "log_softplus", "bisect_increasing"]


def log_softplus(t):
    """log(softplus(t)) = log log(1 + e^t), exact also where softplus(t) underflows.

    For t < -30, softplus(t) = e^t (1 - e^t / 2 + ...) so log softplus(t) = t to within
    e^-30. Positive slopes a = softplus(t) grow linearly (not exponentially) in t.

    Example: ``log_softplus(tf.constant([-1e3, 0.0, 1e3]))  # [-1e3, log log 2, log 1e3]``.
    """
    safe = tf.where(t < -30.0, tf.zeros_like(t), t)
    return tf.where(t < -30.0, t, tf.math.log(tf.nn.softplus(safe)))


def logit_of_log_mixture(log_w, z):
    """log S, log(1 - S) and logit(S) for S = sum_j w_j sigmoid(z_j), from log w.

    log S = logsumexp_j(log w_j + log sigmoid(z_j)) and
    log(1 - S) = logsumexp_j(log w_j + log sigmoid(-z_j)) (the w_j sum to 1),
    so logit(S) = log S - log(1 - S) never divides by a rounded 0. ``log_w``
    and ``z`` broadcast; the mixture runs over the last axis.

    Example:
    ```python
    log_s, log_1ms, y = logit_of_log_mixture(tf.math.log([[0.5, 0.5]]), [[-1e3, 2.0]])
    ```
    """
    z = tf.convert_to_tensor(z, dtype_hint=tf.float32)
    log_w = tf.convert_to_tensor(log_w, dtype=z.dtype)
    log_s = tf.reduce_logsumexp(log_w + tf.math.log_sigmoid(z), axis=-1)
    log_1ms = tf.reduce_logsumexp(log_w + tf.math.log_sigmoid(-z), axis=-1)
    return log_s, log_1ms, log_s - log_1ms


def sigmoid_mixture_logit(x, log_w, log_a, b):
    """y = logit(sum_j w_j sigmoid(a_j x + b_j)) and log dy/dx, in log-space.

    With z_j = a_j x + b_j and S = sum_j w_j sigmoid(z_j):

        log dS/dx = logsumexp_j(log w_j + log a_j + log sigmoid(z_j) + log sigmoid(-z_j)),
        log dy/dx = log dS/dx - log S - log(1 - S).

    Args:
      x: input, shape ``[...]``.
      log_w: log mixture weights (``log_softmax`` of logits), ``[..., K]``.
      log_a: log slopes, ``[..., K]`` (a = exp(log_a) > 0).
      b: offsets, ``[..., K]``.

    Returns:
      ``(y, log_dy_dx)``, both shaped like ``x``.

    Example:
    ```python
    log_w = tf.math.log_softmax(tf.zeros([3, 4]))
    y, ld = sigmoid_mixture_logit(tf.constant([-1e3, 0.0, 1e3]), log_w,
                                  tf.zeros([3, 4]), tf.zeros([3, 4]))
    ```
    """
    z = tf.exp(log_a) * x[..., None] + b
    log_s, log_1ms, y = logit_of_log_mixture(log_w, z)
    log_ds = tf.reduce_logsumexp(
        log_w + log_a + tf.math.log_sigmoid(z) + tf.math.log_sigmoid(-z), axis=-1
    )
    return y, log_ds - log_s - log_1ms


def bisect_increasing(fn, y, atol=1e-6, rtol=1e-6, max_iterations=200):
    """Solves fn(x) = y elementwise for an elementwise strictly increasing ``fn``.

    First a bracket [lo, hi] with fn(lo) <= y <= fn(hi) is found by doubling
    from [-1, 1]; then it is halved until, for every element,
    hi - lo <= atol + rtol * max(|lo|, |hi|) (the stated tolerance: the exact
    root lies within that distance of the returned midpoint's bracket), or
    ``max_iterations`` halvings/doublings each have run. Vectorised over all
    elements; no gradient flows through the search.

    Args:
      fn: callable x -> fn(x), same shape as ``y``, increasing in each element
        and depending on no other element.
      y: target values.
      atol, rtol: absolute and relative tolerance on the root.
      max_iterations: cap on doublings and on halvings.

    Returns:
      x with |x - x*| <= (atol + rtol * |x*|) / 2 (up to float rounding) where
      fn(x*) = y.

    Example:
    ```python
    x = bisect_increasing(lambda t: t ** 3 + t, tf.constant([2.0, -10.0]))  # [1, -2]
    ```
    """
    y = tf.stop_gradient(tf.convert_to_tensor(y))
    one = tf.ones_like(y)

    def expand_cond(i, lo, hi):
        return tf.logical_and(
            i < max_iterations, tf.reduce_any(tf.logical_or(fn(lo) > y, fn(hi) < y))
        )

    def expand(i, lo, hi):
        return (i + 1, tf.where(fn(lo) > y, 2.0 * lo, lo), tf.where(fn(hi) < y, 2.0 * hi, hi))

    _, lo, hi = tf.while_loop(expand_cond, expand, (0, -one, one))

    def width_ok(lo, hi):
        return hi - lo <= atol + rtol * tf.maximum(tf.abs(lo), tf.abs(hi))

    def bisect_cond(i, lo, hi):
        return tf.logical_and(i < max_iterations, tf.logical_not(tf.reduce_all(width_ok(lo, hi))))

    def bisect(i, lo, hi):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < y
        return i + 1, tf.where(below, mid, lo), tf.where(below, hi, mid)

    _, lo, hi = tf.while_loop(bisect_cond, bisect, (0, lo, hi))
    return tf.stop_gradient(0.5 * (lo + hi))
