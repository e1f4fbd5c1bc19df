"""The fixed-point inverse of a residual map y = x + g(x) with Lip(g) < 1:
iterate x <- y - g(x) (Banach), each example until its own step is small, and
report which examples converged. :class:`rflow_tf.bijectors.IResBlock` inverts
with it."""

import tensorflow as tf

from rflow_tf.bijectors.shared_branch import branch_function


def fixed_point_inverse(g, yf, event_ndims, atol, rtol, max_iterations):
    """Solves x + g(x) = y per example by x <- y - g(x), from x = y.

    Iterates until every example b has taken a small step,
    max|x_new - x|_b <= atol + rtol * max|x_new|_b (max over the example's
    elements; examples already there keep iterating, and so get more accurate,
    while others still run), or until ``max_iterations`` steps have run. An
    example whose iterate is not finite stops iterating (and never holds up the
    others). Compiles with XLA.

    Args:
        g: the residual branch, a callable on [B, *event_shape].
        yf: the targets y, [B, *event_shape] (one batch axis).
        event_ndims: the number of event dimensions.
        atol, rtol: the absolute and relative step tolerances.
        max_iterations: the largest number of steps.

    Returns:
        ``(x, residual, converged)``: the last iterate [B, *event_shape], the
        residual max|x + g(x) - y| per example [B] (NaN where any element is
        NaN), and [B] booleans that hold only where the stopping rule was met
        with a finite x and a finite residual.

    Example:
    ```python
    a = tf.constant([[0.5, 0.0], [0.2, 0.3]])
    y = tf.random.normal([4, 2])
    x, residual, ok = fixed_point_inverse(lambda x: x @ a, y, 1, 1e-6, 1e-6, 200)
    assert bool(tf.reduce_all(ok)) and float(tf.reduce_max(residual)) < 1e-5
    ```
    """
    atol = tf.cast(atol, yf.dtype)
    rtol = tf.cast(rtol, yf.dtype)
    axes = list(range(1, 1 + event_ndims))

    def max_abs(t):
        return tf.reduce_max(tf.abs(t), axis=axes)

    def active(x, change):
        # Not yet within the tolerance: finite and the last step too large (NaN: False).
        finite = tf.reduce_all(tf.math.is_finite(x), axis=axes)
        return finite & (change > atol + rtol * max_abs(x))

    def cond(i, x, change):
        return tf.reduce_any(active(x, change))

    def body(i, x, change):
        # Every finite example iterates while any is still active: those
        # already within the tolerance get more accurate for free.
        go = tf.reduce_all(tf.math.is_finite(x), axis=axes)
        x_new = yf - g(x)
        step = max_abs(x_new - x)
        go_x = tf.reshape(go, tf.concat([tf.shape(go), [1] * event_ndims], 0))
        return i + 1, tf.where(go_x, x_new, x), tf.where(go, step, change)

    change0 = tf.fill(tf.shape(yf)[:1], tf.constant(float("inf"), yf.dtype))
    _, x, change = tf.while_loop(
        cond,
        body,
        (tf.constant(0), yf, change0),
        maximum_iterations=max_iterations,
    )
    r = tf.abs(x + g(x) - yf)
    residual = nan_max(r, axis=axes)
    finite = (
        tf.math.is_finite(change)
        & tf.math.is_finite(residual)
        & tf.reduce_all(tf.math.is_finite(x), axis=axes)
    )
    converged = finite & (change <= atol + rtol * max_abs(x))
    return x, residual, converged


def shared_fixed_point_inverse(chain, yf, params, shift, event_ndims, atol, rtol, max_iterations):
    """:func:`fixed_point_inverse` of the branch ``chain`` (a
    :class:`rflow_tf.layers.JacobianChain` with its weights ``params``, from
    ``chain.parameters()``, and its pre-activation ``shift`` or None), in one
    graph function shared by every chain of its signature and these settings
    (:func:`rflow_tf.bijectors.shared_branch.branch_function`).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.bijectors.fixed_point import shared_fixed_point_inverse
    from rflow_tf.layers import JacobianChain, lipschitz_dense_net

    chain = JacobianChain.from_net(lipschitz_dense_net(2, (8,), 0.9))
    y = tf.random.normal([4, 2])
    x, residual, ok = shared_fixed_point_inverse(
        chain, y, chain.parameters(), None, 1, 1e-6, 1e-6, 200)
    assert bool(tf.reduce_all(ok))
    ```
    """
    settings = (event_ndims, atol, rtol, max_iterations)

    def body(chain, yf, shift, *params):
        g = lambda x: chain.linearize(x, params=params, shift=shift)[0]  # noqa: E731
        return fixed_point_inverse(g, yf, *settings)

    inverse = branch_function("residual_inverse", chain, settings, body, differentiable=True)
    return inverse(yf, shift, *params)


def nan_max(t, axis=None):
    """max of t over ``axis``, NaN wherever a reduced element is NaN (TF and XLA's
    reduce_max need not propagate NaN).

    Example:
    ```python
    t = tf.constant([[1.0, float("nan")], [2.0, 3.0]])
    assert nan_max(t, axis=1).numpy()[1] == 3.0
    assert tf.math.is_nan(nan_max(t)).numpy()
    ```
    """
    has_nan = tf.reduce_any(tf.math.is_nan(t), axis=axis)
    top = tf.reduce_max(tf.where(tf.math.is_nan(t), tf.zeros_like(t), t), axis=axis)
    return tf.where(has_nan, tf.constant(float("nan"), t.dtype), top)
