"""The log-determinant of a residual block y = x + g(x), given g: exactly from
the full Jacobian, or as the power-series estimate with Neumann-series
gradients (a custom gradient that keeps only x, u and v for the backward pass).

:class:`rflow_tf.bijectors.IResBlock` calls these with its branch g; they are
functions of g alone, so they can be checked against ``slogdet`` on any map.
"""

import tensorflow as tf

from rflow_tf import estimators as est
from rflow_tf.bijectors._base import zeros_for_none


def exact_residual_logdet(g, x, shift=None):
    """``(g(x), log |det(I + J_g(x))|)`` per example, from the full Jacobian.

    The Jacobian comes from one batched VJP: example b is repeated D times and
    copy i gets the cotangent e_i, so its input gradient is row i of J_g; the
    log-det is :func:`rflow_tf.estimators.exact_logdet` of it (small D only).

    Args:
        g: callable ``(x, shift) -> g(x)`` on a batch [B, *event_shape].
        x: the inputs, [B, *event_shape] with a static event shape.
        shift: optional per-example second input of g, [B, S] (a conditional
            block's context shift), repeated with x.

    Returns:
        ``(g(x), log_det)``, log_det of shape [B].

    Example:
    ```python
    a = tf.constant([[0.1, 0.2], [0.0, 0.3]])
    x = tf.random.normal([4, 2])
    gx, ld = exact_residual_logdet(lambda x, shift: x @ a, x)
    want = tf.math.log(tf.abs(tf.linalg.det(tf.eye(2) + a)))
    assert abs(float(ld[0]) - float(want)) < 1e-5
    ```
    """
    d = x.shape[1:].num_elements()
    x_rep = tf.reshape(tf.repeat(x[None], d, axis=0), [-1] + x.shape[1:].as_list())
    if shift is not None:
        shift = tf.reshape(tf.repeat(shift[None], d, axis=0), [-1, shift.shape[-1]])
    cotangent = tf.repeat(tf.eye(d, dtype=x.dtype)[:, None, :], tf.shape(x)[0], axis=1)
    with tf.GradientTape() as tape:
        tape.watch(x_rep)
        g_rep = g(x_rep, shift)
    rows = tape.gradient(g_rep, x_rep, output_gradients=tf.reshape(cotangent, tf.shape(g_rep)))
    jac = tf.transpose(tf.reshape(rows, [d, -1, d]), [1, 0, 2])  # [B, i, j]
    gx = tf.reshape(g_rep, tf.concat([[d, -1], tf.shape(g_rep)[1:]], 0))[0]
    return gx, est.exact_logdet(jac)


def neumann_residual_logdet(
    linearize, x, v, n_terms, weights, training, net_vars, grad_in_forward, shift=None
):
    """``(g(x), log-det estimate)`` with Neumann-series gradients (paper Theorem 2).

    The estimate is :func:`rflow_tf.estimators.power_series_terms` with probe
    ``v``; its gradient is u^T (dJ/dtheta) v with the Neumann vector u, not the
    derivative of the series.

    Default: only x, u and v are kept for the backward pass, which recomputes
    g(x) with the weights of this forward pass (no further power iteration) and
    differentiates g and the surrogate u^T J v together, so one backward pass
    through g serves both. Memory therefore does not grow with the number of
    series terms, nor with the activations of every block.

    ``grad_in_forward``: the surrogate's gradients are computed here, and the
    forward pass's activations are kept (as in ordinary backprop) for the path
    gradient of the backward pass.

    ``shift`` (a conditional block's context shift s(c), [B, S]) is a second
    input of the custom gradient: its gradient (the path's and the surrogate's,
    since J_g depends on c) flows on to the context net and c.

    Args:
        linearize: callable ``(x, training, *shift) -> (g(x), vjp, surrogate)``
            with ``vjp(u)`` = u^T J_g(x) and ``surrogate(u, v)`` = u^T J_g(x) v
            per example, both differentiable.
        x: the inputs, [B, *event_shape].
        v: the Hutchinson probe, shaped like x.
        n_terms: the number of series terms (an int32 scalar).
        weights: callable k -> the weight of term k.
        training: passed to ``linearize`` in the forward pass.
        net_vars: the trainable variables of g, whose gradients
            ``grad_in_forward`` computes in the forward pass.
        grad_in_forward: see above.
        shift: optional second input of g, [B, S].

    Returns:
        ``(g(x), log_det)``, log_det of shape [B].

    Example:
    ```python
    a = tf.constant([[0.1, 0.2], [0.0, 0.3]])

    def linearize(x, training):
        vjp = lambda u: tf.matmul(u, a, transpose_b=True)
        return x @ a, vjp, lambda u, v: tf.reduce_sum(vjp(u) * v, -1)

    x, v = tf.random.normal([4, 2]), tf.random.normal([4, 2])
    ones = lambda k: tf.ones([])
    gx, ld = neumann_residual_logdet(linearize, x, v, tf.constant(20), ones, True, [], False)
    assert ld.shape == [4]
    ```
    """
    inputs = [x] if shift is None else [x, shift]
    n_in = len(inputs)

    def as_input_grads(grads):
        return grads[0] if n_in == 1 else list(grads)

    def recomputed_grads(dgx, dld, variables):
        """d/d(inputs, variables) of sum(dgx * g(x)) + sum_b dld_b u_b^T J(x_b) v_b."""
        # Recompute only once the upstream gradient exists: otherwise the
        # executor may run every block's recomputation at the start of the
        # backward pass and hold all their activations at once.
        with tf.control_dependencies([t for t in (dgx, dld) if t is not None]):
            re = [tf.identity(t) for t in inputs]
        with tf.GradientTape() as tape:
            for t in re:
                tape.watch(t)
            gx, _, surrogate = linearize(re[0], False, *re[1:])
            total = tf.zeros([], x.dtype) if dgx is None else tf.reduce_sum(dgx * gx)
            if dld is not None:
                total += tf.reduce_sum(dld * surrogate(u, v))
        grads = tape.gradient(total, re + list(variables))
        return zeros_for_none(grads, inputs + variables)

    @tf.custom_gradient
    def residual_and_logdet(*args):
        nonlocal u
        x = args[0]
        gif = grad_in_forward
        with tf.GradientTape(persistent=gif, watch_accessed_variables=gif) as tape:
            if gif:
                for t in args:
                    tape.watch(t)
            gx, vjp, surrogate = linearize(x, training, *args[1:])
            with tape.stop_recording():
                ld, u = est.power_series_terms(vjp, v, n_terms, weights, with_neumann=True)
            if gif:
                s = tf.reduce_sum(surrogate(u, v))
        done = [ld]
        if gif:
            pre = tape.gradient(s, list(args) + net_vars)
            pre_in = zeros_for_none(pre[:n_in], args)
            pre_vars = {
                var.ref(): g for var, g in zip(net_vars, zeros_for_none(pre[n_in:], net_vars))
            }
            done += [g for g in pre if g is not None]
        # The next block starts once this one is finished, so that the
        # transient tensors of only one block are alive at a time.
        with tf.control_dependencies(done):
            gx_out = tf.identity(gx)

        def grad(dgx, dld, variables=None):
            variables = list(variables or [])
            if not gif:
                grads = recomputed_grads(dgx, dld, variables)
                return as_input_grads(grads[:n_in]), grads[n_in:]
            if dgx is None:
                dgx = tf.zeros_like(gx)
            path = tape.gradient(gx, list(args) + variables, output_gradients=dgx)
            path = zeros_for_none(path, list(args) + variables)
            if dld is None:
                return as_input_grads(path[:n_in]), path[n_in:]
            d_in = [
                p + tf.reshape(dld, [-1] + [1] * (t.shape.rank - 1)) * q
                for p, q, t in zip(path[:n_in], pre_in, args)
            ]
            uniform = tf.reduce_all(tf.equal(dld, dld[0]))

            def scaled():
                return [
                    tf.cast(dld[0], var.dtype) * pre_vars[var.ref()]
                    if var.ref() in pre_vars
                    else tf.zeros_like(var)
                    for var in variables
                ]

            def per_example():
                return recomputed_grads(None, dld, variables)[n_in:]

            dvars = tf.cond(uniform, scaled, per_example) if variables else []
            return as_input_grads(d_in), [p + d for p, d in zip(path[n_in:], dvars)]

        return (gx_out, ld), grad

    u = None
    return residual_and_logdet(*inputs)
