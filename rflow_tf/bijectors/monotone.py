"""Monotone scalar maps shared by the sigmoidal and logistic-mixture bijectors.

Both the deep sigmoidal flow (NAF, Huang et al. 2018) and the logistic-mixture
CDF coupling (Flow++, Ho et al. 2019) apply, elementwise, the map

    y = logit( sum_j w_j sigmoid(a_j x + b_j) ),   w on the simplex, a_j > 0,

(Flow++ writes a_j = exp(-s_j), b_j = -mu_j exp(-s_j)). It is strictly
increasing in x and maps R onto R. :func:`sigmoid_mixture_logit` evaluates it
and its log-derivative entirely in log-space, so neither saturates at large
|x| (no sigmoid is ever rounded to 0 or 1). :func:`bisect_increasing` inverts
any elementwise increasing map by bracketing and bisection with a stated
tolerance, and returns NaN (never a wrong value) where it finds no bracket
or does not reach the tolerance; :func:`warn_on_failures` reports such
failures from eager code and graphs (under XLA the NaN is the report).
"""

import sys
import warnings

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

__all__ = [
    "sigmoid_mixture_logit",
    "logit_of_log_mixture",
    "log_softplus",
    "bisect_increasing",
    "bisect_increasing_with_diagnostics",
    "warn_on_failures",
    "report_bisection_failures",
]


def log_softplus(t):
    """log(softplus(t)) = log log(1 + e^t), exact also where softplus(t) underflows.

    For t < -30, softplus(t) = e^t (1 - e^t / 2 + ...) so log softplus(t) = t to within
    e^-30. Positive slopes a = softplus(t) grow linearly (not exponentially) in t.

    Args:
      t: a float tensor.

    Returns:
      log(softplus(t)), of the shape and dtype of ``t``; finite for every finite t.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.bijectors.monotone import log_softplus

    t = tf.constant([-1e3, -20.0, 0.0, 1e3])
    y = log_softplus(t).numpy()
    assert np.allclose(y, [-1e3, np.log(np.log1p(np.exp(-20.0))), np.log(np.log(2.0)),
                           np.log(1e3)], rtol=1e-6)   # softplus(-1e3) underflows to 0
    ```
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


def bisect_increasing_with_diagnostics(fn, y, atol=1e-6, rtol=1e-6, max_iterations=200):
    """Solves fn(x) = y elementwise for an elementwise increasing ``fn``, with per-element flags.

    1. Bracket: from [lo, hi] = [-1, 1], while fn(lo) > y the bracket moves
       down to [2 lo, lo], while fn(hi) < y up to [hi, 2 hi] (at most
       ``max_iterations`` moves, so up to |x| = 2^max_iterations; an element
       stops moving at a non-finite bound, a NaN value of fn, or where
       fn(lo) > y > fn(hi), i.e. fn is not increasing in floating point).
    2. Bisection: [lo, hi] is halved, keeping fn(lo) <= y <= fn(hi), until
       both the root and its image are within the tolerance,
       hi - lo <= atol + rtol * max(|lo|, |hi|) and
       fn(hi) - fn(lo) <= atol + rtol * |y| (so a steep fn also round-trips
       in y), or the midpoint rounds to lo or hi (the bracket is as tight as
       the float format allows), at most ``max_iterations`` halvings.
       Elements that met the rule keep being halved while others still run,
       so most end well inside the tolerance.

    An element is ``converged`` only if its final bracket is finite, the
    values fn(lo) <= y <= fn(hi) computed at its ends really enclose y (this
    is checked, not assumed: a NaN of fn or a map that is not increasing in
    floating point fails it) and the width rule of step 2 holds. Its x is
    the bracket's midpoint, within (atol + rtol |x*|) / 2 (up to rounding)
    of a root x* in the bracket, and |fn(x) - y| <= atol + rtol |y| unless
    the bracket reached adjacent floats. Every other element is NaN, never a wrong
    finite value: a y that is not finite, or outside the range fn reaches
    numerically within |x| <= 2^max_iterations (e.g. a sigmoid mixture whose
    slopes all underflowed to 0 is constant in x), gets no bracket
    (``bracketed`` False); a bracket that did not narrow to the tolerance in
    ``max_iterations`` halvings (e.g. ``atol=0`` at a root 0) is
    ``bracketed`` but not ``converged``. Vectorised over all elements, one
    evaluation of fn per step, compiles with XLA; no gradient flows through
    the search.

    Args:
      fn: callable x -> fn(x), same shape as ``y``, increasing in each element
        and depending on no other element.
      y: target values.
      atol: absolute tolerance on the root.
      rtol: relative tolerance on the root.
      max_iterations: cap on bracket moves and on halvings.

    Returns:
      ``(x, bracketed, converged)``: x shaped like y, NaN where not
      converged; ``bracketed`` and ``converged`` boolean, shaped like y.

    Example:
    ```python
    x, bracketed, ok = bisect_increasing_with_diagnostics(tf.tanh, tf.constant([0.5, 1.5]))
    # x = [atanh(0.5), nan], bracketed = ok = [True, False]: tanh never reaches 1.5
    ```
    """
    y = tf.stop_gradient(tf.convert_to_tensor(y))
    finite_y = tf.math.is_finite(y)

    def encloses(lo, hi, f_lo, f_hi):
        """A finite bracket whose computed values enclose y (False for any NaN)."""
        return finite_y & tf.math.is_finite(lo) & tf.math.is_finite(hi) & (f_lo <= y) & (y <= f_hi)

    def sides(lo, hi, f_lo, f_hi):
        """(move down, move up) per element; neither once enclosed or unusable."""
        usable = finite_y & tf.math.is_finite(lo) & tf.math.is_finite(hi)
        usable &= ~tf.math.is_nan(f_lo) & ~tf.math.is_nan(f_hi)
        down, up = f_lo > y, f_hi < y
        one_side = usable & tf.math.logical_xor(down, up)
        return one_side & down, one_side & up

    def expand_cond(i, lo, hi, f_lo, f_hi):
        down, up = sides(lo, hi, f_lo, f_hi)
        return tf.reduce_any(down | up)

    def expand(i, lo, hi, f_lo, f_hi):
        down, up = sides(lo, hi, f_lo, f_hi)
        p = tf.where(down, 2.0 * lo, 2.0 * hi)
        f_p = fn(p)
        # The bound on the wrong side becomes the bound on the other side.
        new_lo = tf.where(down, p, tf.where(up, hi, lo))
        new_f_lo = tf.where(down, f_p, tf.where(up, f_hi, f_lo))
        new_hi = tf.where(up, p, tf.where(down, lo, hi))
        new_f_hi = tf.where(up, f_p, tf.where(down, f_lo, f_hi))
        return i + 1, new_lo, new_hi, new_f_lo, new_f_hi

    lo, hi = -tf.ones_like(y), tf.ones_like(y)
    _, lo, hi, f_lo, f_hi = tf.while_loop(
        expand_cond, expand, (0, lo, hi, fn(lo), fn(hi)), maximum_iterations=max_iterations
    )
    bracketed = encloses(lo, hi, f_lo, f_hi)

    def midpoint(lo, hi):
        return 0.5 * lo + 0.5 * hi  # no overflow near the largest floats

    y_tol = atol + rtol * tf.abs(y)

    def narrow(lo, hi, f_lo, f_hi):
        mid = midpoint(lo, hi)
        width_ok = hi - lo <= atol + rtol * tf.maximum(tf.abs(lo), tf.abs(hi))
        return (width_ok & (f_hi - f_lo <= y_tol)) | (mid <= lo) | (mid >= hi)

    def active(lo, hi, f_lo, f_hi):
        return encloses(lo, hi, f_lo, f_hi) & ~narrow(lo, hi, f_lo, f_hi)

    def bisect_cond(i, lo, hi, f_lo, f_hi):
        return tf.reduce_any(active(lo, hi, f_lo, f_hi))

    def bisect(i, lo, hi, f_lo, f_hi):
        mid = midpoint(lo, hi)
        f_mid = fn(mid)
        # Elements already within the tolerance keep narrowing while the loop runs
        # for the others (free accuracy), but only with an f_mid in [f_lo, f_hi]
        # (not NaN, no rounding wiggle), so they stay within it; for the rest a
        # NaN f_mid lands in `above` and fails `encloses`.
        go = active(lo, hi, f_lo, f_hi)
        done = encloses(lo, hi, f_lo, f_hi) & ~go & (mid > lo) & (mid < hi)
        go |= done & (f_lo <= f_mid) & (f_mid <= f_hi)
        below = go & (f_mid < y)
        above = go & ~(f_mid < y)
        return (
            i + 1,
            tf.where(below, mid, lo),
            tf.where(above, mid, hi),
            tf.where(below, f_mid, f_lo),
            tf.where(above, f_mid, f_hi),
        )

    _, lo, hi, f_lo, f_hi = tf.while_loop(
        bisect_cond, bisect, (0, lo, hi, f_lo, f_hi), maximum_iterations=max_iterations
    )
    converged = encloses(lo, hi, f_lo, f_hi) & narrow(lo, hi, f_lo, f_hi)
    x = tf.where(converged, midpoint(lo, hi), tf.constant(float("nan"), y.dtype))
    return tf.stop_gradient(x), bracketed, converged


def bisect_increasing(fn, y, atol=1e-6, rtol=1e-6, max_iterations=200):
    """Solves fn(x) = y elementwise for an elementwise strictly increasing ``fn``.

    The x of :func:`bisect_increasing_with_diagnostics` (see there for the
    method): a bracket [lo, hi] with fn(lo) <= y <= fn(hi) is found by moving
    outwards from [-1, 1] in doubling steps, then halved until
    hi - lo <= atol + rtol * max(|lo|, |hi|) and fn(hi) - fn(lo) <=
    atol + rtol * |y| (or to adjacent floats). An element whose bracket was
    not found (y not finite or outside fn's numerical range) or did not
    narrow to the tolerance within ``max_iterations`` steps is NaN, never a
    wrong finite value (use the diagnostics version to tell which, and to
    warn: :func:`warn_on_failures`).

    Args:
      fn: callable x -> fn(x), same shape as ``y``, increasing in each element
        and depending on no other element.
      y: target values.
      atol: absolute tolerance on the root.
      rtol: relative tolerance on the root.
      max_iterations: cap on bracket moves and on halvings.

    Returns:
      x with |x - x*| <= (atol + rtol * |x*|) / 2 (up to float rounding) where
      fn(x*) = y, or NaN.

    Example:
    ```python
    x = bisect_increasing(lambda t: t ** 3 + t, tf.constant([2.0, -10.0]))  # [1, -2]
    bisect_increasing(tf.tanh, tf.constant([1.5]))                          # [nan]
    ```
    """
    return bisect_increasing_with_diagnostics(fn, y, atol, rtol, max_iterations)[0]


def warn_on_failures(value, ok, eager_message, graph_message):
    """Returns ``value``, reporting (never raising) when not every entry of ``ok`` holds.

    The report is made where it can be: eagerly a ``RuntimeWarning`` with
    ``eager_message(ok_numpy)`` (a str; called only when something failed); in
    a graph a ``tf.print`` to stderr of ``graph_message(ok)`` (a list of
    tf.print arguments, built inside the failure branch), with ``value``
    depending on it; under XLA nothing, since a compiled function cannot
    print from the host: there the NaN a failed entry carries is the report.

    Under ``tf.vectorized_map`` (pfor, also AutoBatched JointDistributions)
    the failure branch runs once for the, possibly empty, set of pfor
    iterations that failed. StringFormat formats that whole set ("[]" when
    empty) as one string, so the print is skipped exactly when nothing failed.

    Example:
    ```python
    import warnings
    import tensorflow as tf
    from rflow_tf.bijectors.monotone import bisect_increasing_with_diagnostics, warn_on_failures

    y = tf.constant([0.5, 1.5])                  # tanh never reaches 1.5
    x, _, ok = bisect_increasing_with_diagnostics(tf.tanh, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = warn_on_failures(
            x, ok, lambda ok: f"{(~ok).sum()} inverses failed",
            lambda ok: ["inverses failed:", tf.reduce_sum(tf.cast(~ok, tf.int32))])
    assert str(caught[0].message) == "1 inverses failed"   # eagerly: a RuntimeWarning
    assert tf.math.is_nan(x[1])                            # the failed entry is NaN
    ```
    """
    if tf.executing_eagerly():
        ok_np = np.asarray(ok)
        if not ok_np.all():
            warnings.warn(eager_message(ok_np), RuntimeWarning, stacklevel=3)
        return value
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return value

    def report():
        failed = tf.reduce_sum(tf.cast(~ok, tf.int32))
        text = tf.strings.format("{}", failed)

        def show():
            tf.print("WARNING:", *graph_message(ok), output_stream=sys.stderr)
            return tf.constant(False)

        return tf.cond(tf.strings.regex_full_match(text, r"\[\]"), lambda: tf.constant(True), show)

    done = tf.cond(tf.reduce_all(ok), lambda: tf.constant(True), report)
    with tf.control_dependencies([done]):
        return tf.nest.map_structure(tf.identity, value)


def report_bisection_failures(x, bracketed, converged, name, max_iterations):
    """``warn_on_failures`` for a bijector inverted by :func:`bisect_increasing_with_diagnostics`.

    ``x`` is returned unchanged (its failed entries are already NaN); the
    report counts the failed elements and splits them into those without a
    bracket (y not finite, outside the map's numerical range, or depending
    on an entry that already failed) and those whose bracket did not narrow
    to the tolerance in ``max_iterations`` halvings.

    Example:
    ```python
    import warnings
    import tensorflow as tf
    from rflow_tf.bijectors.monotone import (
        bisect_increasing_with_diagnostics, report_bisection_failures)

    fn, y = tf.tanh, tf.constant([0.5, 2.0, -3.0])   # 2 and -3 are outside tanh's range
    x, bracketed, ok = bisect_increasing_with_diagnostics(fn, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = report_bisection_failures(x, bracketed, ok, "my_flow", 200)
    print(caught[0].message)   # my_flow: bisection inverse failed for 2 of 3 elements, ...
    assert "2 without a bracket" in str(caught[0].message)
    ```
    """

    def eager_message(ok):
        no_bracket = int((~np.asarray(bracketed)).sum())
        return (
            f"{name}: bisection inverse failed for {int((~ok).sum())} of {ok.size} elements, "
            f"returned as NaN: {no_bracket} without a bracket fn(lo) <= y <= fn(hi) (y not "
            "finite or outside the map's numerical range, or an input it depends on failed), "
            f"{int((~ok).sum()) - no_bracket} not within the tolerance after "
            f"{max_iterations} halvings"
        )

    def graph_message(ok):
        return [
            f"{name}: bisection inverse failed (no bracket fn(lo) <= y <= fn(hi), or not "
            f"within the tolerance after {max_iterations} halvings) for",
            tf.reduce_sum(tf.cast(~ok, tf.int32)),
            "elements, returned as NaN",
        ]

    return warn_on_failures(x, converged, eager_message, graph_message)
