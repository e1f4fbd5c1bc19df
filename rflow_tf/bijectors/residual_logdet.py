"""The log-determinant of a residual block y = x + g(x), given g: exactly from
the full Jacobian, or as the power-series estimate with Neumann-series
gradients (a custom gradient that keeps only x, u and v for the backward pass).

:class:`rflow_tf.bijectors.IResBlock` calls these with its branch g; they are
functions of g alone, so they can be checked against ``slogdet`` on any map.
"""

from typing import NamedTuple

import tensorflow as tf

from rflow_tf import estimators as est
from rflow_tf.bijectors._base import zeros_for_none
from rflow_tf.bijectors.shared_branch import branch_function


class Series(NamedTuple):
    """The terms of a residual block's power series in one call: ``n_terms``
    (an int32 scalar), the roulette ``draws`` N_i (int32 [s]; None for the
    truncated series, every weight 1), the number of exact terms ``n_exact``
    (an int32 scalar) and the roulette's ``dist`` and ``param``; term k
    weighs :func:`rflow_tf.estimators.series_weight` (k, draws, n_exact).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf import estimators as est
    from rflow_tf.bijectors.residual_logdet import Series

    draws = est.sample_roulette(tf.constant([0, 1]), "geometric", 0.5)
    series = Series(tf.reduce_max(draws) + 2, draws, tf.constant(2), "geometric", 0.5)
    assert float(series.weight_fn(tf.float32)(1)) == 1.0   # an exact term
    ```
    """

    n_terms: tf.Tensor
    draws: tf.Tensor
    n_exact: tf.Tensor
    dist: str
    param: float

    def weight_fn(self, dtype):
        """k -> the weight of term k (k >= 1), in ``dtype``."""
        return lambda k: est.series_weight(
            k, self.draws, self.n_exact, self.dist, self.param, dtype
        )


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


def shared_exact_residual_logdet(chain, x, params, shift=None):
    """:func:`exact_residual_logdet` of the branch ``chain`` (a
    :class:`rflow_tf.layers.JacobianChain` with its weights ``params``, from
    ``chain.parameters()``), in one graph function shared by every chain of
    its signature (:func:`rflow_tf.bijectors.shared_branch.branch_function`):
    ``(g(x), log |det(I + J_g(x))|)`` per example.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.bijectors.residual_logdet import shared_exact_residual_logdet
    from rflow_tf.layers import JacobianChain, lipschitz_dense_net

    chain = JacobianChain.from_net(lipschitz_dense_net(2, (8,), 0.9))
    gx, ld = shared_exact_residual_logdet(chain, tf.random.normal([4, 2]), chain.parameters())
    assert ld.shape == [4]
    ```
    """
    exact = branch_function("residual_exact", chain, (), _exact_body, differentiable=True)
    return exact(x, shift, *params)


def _exact_body(chain, x, shift, *params):
    return exact_residual_logdet(
        lambda x, shift: chain.linearize(x, params=params, shift=shift)[0], x, shift
    )


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


def shared_neumann_residual_logdet(chain, x, v, series, params, shift=None):
    """:func:`neumann_residual_logdet` of the branch ``chain`` (a
    :class:`rflow_tf.layers.JacobianChain`), computed by two graph functions
    shared by every chain of one :attr:`~rflow_tf.layers.JacobianChain.signature`
    (:func:`rflow_tf.bijectors.shared_branch.branch_function`).

    The forward function maps (x, v, the series' terms, shift, params) to
    g(x), the estimate sum_k w_k (-1)^(k+1)/k v^T J^k v (k = 1..n_terms, w_k
    the weights of ``series``) and the Neumann vector
    u = sum_j (-1)^j c_{j+1} v^T J^j; the backward function maps
    (x, u, v, upstream gradients, shift, params) to the gradients of
    sum(dgx * g(x)) + sum_b dld_b u_b^T J(x_b) v_b in x, shift and params,
    recomputing g(x) (paper Theorem 2). Both are traced once per signature
    and shape, so Python builds one copy of each for a flow of many blocks of
    one configuration, and the blocks' weights
    reach them as inputs (``params``, from ``chain.parameters()``): their
    gradients flow on to the variables through the enclosing graph. Only x, u
    and v are kept for the backward pass; a block's g(x) is released once its
    estimate is done, and its backward pass starts once its upstream
    gradients exist (control dependencies, which hold when the calls are
    inlined).

    Args:
        chain: the branch g.
        x: the inputs, [B, *event_shape].
        v: the Hutchinson probe, shaped like x.
        series: the terms of the series (:class:`Series`).
        params: ``chain.parameters(training)``.
        shift: optional pre-activation shift of a conditional block, [B, S].

    Returns:
        ``(g(x), log_det)``, log_det of shape [B].

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.bijectors.residual_logdet import Series, shared_neumann_residual_logdet
    from rflow_tf.layers import JacobianChain, lipschitz_dense_net

    chain = JacobianChain.from_net(lipschitz_dense_net(2, (8,), 0.9))
    x, v = tf.random.normal([4, 2]), tf.random.normal([4, 2])
    series = Series(tf.constant(20), None, tf.constant(0), "poisson", 1.0)   # 20 terms, weight 1
    gx, ld = shared_neumann_residual_logdet(chain, x, v, series, chain.parameters())
    assert ld.shape == [4]
    ```
    """
    static = (series.draws is None, series.dist, series.param)
    forward = branch_function("residual_series", chain, static, _series_forward(static))
    backward = branch_function("residual_series_grad", chain, (), _series_backward)
    draws = tf.zeros([1], tf.int32) if series.draws is None else series.draws
    terms = (series.n_terms, draws, series.n_exact)
    rest = ([] if shift is None else [shift]) + [tf.convert_to_tensor(p) for p in params]

    @tf.custom_gradient
    def residual_and_logdet(x, *rest):
        shift_in, params_in = (None, rest) if shift is None else (rest[0], rest[1:])
        gx, ld, u = forward(x, v, *terms, shift_in, *params_in)

        def grad(dgx, dld):
            dgx = tf.zeros_like(gx) if dgx is None else dgx
            dld = tf.zeros_like(ld) if dld is None else dld
            return backward(x, u, v, dgx, dld, shift_in, *params_in)

        return (gx, ld), grad

    return residual_and_logdet(x, *rest)


def _series_forward(static):
    """The body of the forward function: (g(x), log-det estimate, Neumann vector u)."""
    truncated, dist, param = static

    def residual_series(chain, x, v, n_terms, draws, n_exact, shift, *params):
        gx, lin = chain.linearize(x, params=params, shift=shift)
        series = Series(n_terms, None if truncated else draws, n_exact, dist, param)
        weights = series.weight_fn(x.dtype)
        ld, u = est.power_series_terms(lin.vjp, v, n_terms, weights, with_neumann=True)
        # The next block starts once this one is finished, so that the
        # transient tensors of only one block are alive at a time.
        with tf.control_dependencies([ld, u]):
            return tf.identity(gx), ld, u

    return residual_series


def _series_backward(chain, x, u, v, dgx, dld, shift, *params):
    """The body of the backward function: the gradients of
    sum(dgx * g(x)) + sum(dld * u^T J v) in (x, shift, *params) (without
    shift when it is None), g recomputed."""
    inputs = [x] + ([] if shift is None else [shift]) + list(params)
    # Recompute only once the upstream gradient exists: otherwise the executor
    # may run every block's recomputation at the start of the backward pass
    # and hold all their activations at once.
    with tf.control_dependencies([dgx, dld]):
        inputs = [tf.identity(t) for t in inputs]
    n_front = 1 if shift is None else 2
    x, shift, params = inputs[0], (None if shift is None else inputs[1]), inputs[n_front:]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        gx, lin = chain.linearize(x, params=params, shift=shift)
        total = tf.reduce_sum(dgx * gx)
        total += tf.reduce_sum(dld * est.neumann_surrogate_jvp(lin.jvp, u, v))
    return zeros_for_none(tape.gradient(total, inputs), inputs)
