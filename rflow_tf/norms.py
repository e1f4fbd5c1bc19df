"""Induced mixed norms ||A||_{p->q} of linear maps (generalised spectral normalisation).

For orders p, q in [1, inf] the induced norm of a linear map A is

    ||A||_{p->q} = max_{x != 0} ||A x||_q / ||x||_p.

Residual Flows (Chen et al. 2019, Section 5.1) constrain each linear map of a
residual branch g in such a norm instead of only the spectral norm (p = q = 2).
If the codomain order of layer i is the domain order of layer i + 1, the last
codomain is the first domain, and the activations are 1-Lipschitz in those
norms, then Lip(g) <= prod_i ||W_i||_{p_i -> p_{i+1}} in the block's one norm
||.||_{p_0}, so x + g(x) is invertible by fixed-point iteration in that norm
(:func:`chain_orders`).

Conventions of this module (pure functions, no state):

* **Orders** are Python numbers in [1, inf] (``math.inf``; the character ``'f'``
  in a ``vnorms`` string), or, for *learnable* orders, float tensors in (1, 5)
  made by :func:`order_from_unconstrained`. The branches for 1, 2 and inf are
  chosen in Python, so a tensor order always takes the general formula.
* **Operators** are given by callables on a *batch* of vectors: ``apply(x)``
  maps ``[R, *input]`` to ``[R, *output]`` and ``apply_transpose(u)`` maps back
  (the adjoint). Vector norms are taken over all axes but the first. For a
  convolution this is the whole padded convolution (``tf.nn.conv2d`` and
  ``tf.nn.conv2d_transpose``), for a dense layer ``x @ kernel``.
* **Closed forms** (exact): ||A||_{1->q} = max_j ||A e_j||_q (largest column
  q-norm), ||A||_{p->inf} = max_i ||A^T e_i||_{p*} (largest row p*-norm, with
  1/p + 1/p* = 1), which cover 1->1, 1->2, 1->inf, 2->inf and inf->inf; and
  ||A||_{2->2} = the largest singular value, computed by SVD for explicit
  matrices (:func:`matrix_induced_norm`). :func:`closed_form_induced_norm`
  evaluates the first two for any operator whose matrix entries are entries
  of a kernel (dense layers, convolutions with any padding), from two
  applications of the operator to |kernel|^r, without forming the matrix.
* **Elsewhere** the generalised power method (Boyd 1974; Higham 1992, "Estimating
  the matrix p-norm"; the QETLAB ``InducedMatrixNorm`` iteration used by the
  Residual Flows authors) alternates dual-norm steps

      u = dual(A v, q),    v = dual(A^T u, p*),

  where dual(y, r) is the unit vector of the dual norm that attains
  <dual(y, r), y> = ||y||_r (:func:`dual_direction`). The value ||A v||_q / ||v||_p
  never decreases along the iteration, and it is *attained* by the vector v, so
  every estimate is a certified **lower** bound of ||A||_{p->q}. It is not a
  certified upper bound: the iteration converges to a local maximum (computing
  ||A||_{p->q} is NP-hard for p > q, e.g. inf->1), which is why the method is
  started from several random vectors at initialisation
  (:func:`induced_norm_power_method`) and warm-started from the stored best
  vector afterwards (:func:`power_iteration`). For 2->2 it is ordinary power
  iteration and converges to the exact norm from almost every start.
* **Gradients.** :func:`induced_norm_lower_bound` is ||A v||_q / ||v||_p for a
  given (stopped) v; differentiated in the kernel and in tensor orders it is,
  at the maximising v, the gradient of the norm itself (envelope theorem).
  :func:`vector_norm` scales by the largest entry before taking powers and
  masks zeros, so gradients in x and in the order stay finite for orders in
  [1, inf) and for zero entries or zero vectors.

References:
  [1] R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows for
      Invertible Generative Modeling. NeurIPS 2019.
  [2] N. J. Higham. Estimating the matrix p-norm. Numer. Math. 62, 1992.
  [3] D. W. Boyd. The power method for l^p norms. Linear Algebra Appl. 9, 1974.
"""

import collections
import math

import numpy as np
import tensorflow as tf

__all__ = [
    "INF",
    "LEARNABLE_ORDER_RANGE",
    "PowerIterationResult",
    "chain_orders",
    "closed_form_induced_norm",
    "dual_direction",
    "dual_order",
    "has_closed_form",
    "induced_norm_lower_bound",
    "induced_norm_power_method",
    "matrix_induced_norm",
    "order_from_unconstrained",
    "parse_order",
    "power_iteration",
    "unconstrained_from_order",
    "vector_norm",
]

INF = math.inf

#: Learnable orders lie in [1.001, 5]: the (1, 5) squashing of the authors'
#: code, with a floor that keeps 1 / (p - 1) finite in float32.
LEARNABLE_ORDER_RANGE = (1.001, 5.0)

# Smallest p - 1 used for a tensor order in 1 / (p - 1) (the dual order).
_MIN_ORDER_GAP = 1e-6


# --------------------------------------------------------------------------- orders


def parse_order(order, name="order"):
    """A norm order as a Python float in [1, inf].

    Accepts numbers and the strings ``'1'`` ... ``'9'``, ``'f'`` or ``'inf'``
    (``'f'`` is infinity, as in the authors' ``vnorms`` strings). Raises
    ``ValueError`` naming ``name`` for anything else (orders below 1 are not
    norms, NaN is not an order).

    Example:
    ```python
    parse_order("f")      # inf
    parse_order(2)        # 2.0
    ```
    """
    if isinstance(order, str):
        text = order.strip().lower()
        if text in ("f", "inf", "infinity"):
            return INF
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"{name} must be a number in [1, inf] or 'f' (infinity), got {order!r}"
            ) from None
    elif isinstance(order, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number in [1, inf], got the bool {order!r}")
    elif isinstance(order, (int, float, np.integer, np.floating)):
        value = float(order)
    else:
        raise TypeError(
            f"{name} must be a Python number in [1, inf] or 'f', got "
            f"{type(order).__name__} {order!r} (tensor orders are made by "
            "order_from_unconstrained)"
        )
    if not value >= 1.0:
        raise ValueError(
            f"{name} must be in [1, inf] (orders below 1 are not norms), got {order!r}"
        )
    return value


def _static_order(order):
    """The order as a Python float, or None for a tensor order."""
    if tf.is_tensor(order) or isinstance(order, tf.Variable):
        return None
    return parse_order(order)


def _order_tensor(order, dtype):
    """The order as a tensor of ``dtype`` (a Python float converted directly, not
    via float32)."""
    if tf.is_tensor(order) or isinstance(order, tf.Variable):
        return tf.cast(order, dtype)
    return tf.constant(order, dtype)


def dual_order(order):
    """The dual (Hoelder conjugate) order p* with 1/p + 1/p* = 1.

    1 and inf are each other's dual; a tensor order p gives p / (p - 1) with
    p - 1 floored at 1e-6 (finite value and gradient at p -> 1).

    Example:
    ```python
    dual_order(3.0)       # 1.5
    dual_order(1)         # inf
    ```
    """
    p = _static_order(order)
    if p is None:
        return order / tf.maximum(order - 1.0, _MIN_ORDER_GAP)
    if p == 1.0:
        return INF
    if p == INF:
        return 1.0
    return p / (p - 1.0)


# --------------------------------------------------------------------------- vectors


def _safe_pow(r, e):
    """r^e for r >= 0 with 0^e = 0 and finite gradients in r and e at r = 0."""
    positive = r > 0
    return tf.where(positive, tf.pow(tf.where(positive, r, tf.ones_like(r)), e), tf.zeros_like(r))


def vector_norm(x, order, axis=None, keepdims=False):
    """||x||_p = (sum_i |x_i|^p)^(1/p) over ``axis`` (all axes by default);
    max_i |x_i| for p = inf.

    Computed as m (sum_i (|x_i| / m)^p)^(1/p) with m = max_i |x_i|, so it does not
    overflow for large p, and zero entries are masked so the gradient in x and
    in a tensor order p is finite (0 for a zero vector; the subgradient 0 at
    zero entries for p = 1).

    Example:
    ```python
    vector_norm([3.0, -4.0], 2)            # 5.0
    vector_norm([[1.0, -2.0]], "f", axis=1)  # [2.0]
    ```
    """
    x = tf.convert_to_tensor(x)
    a = tf.abs(x)
    p = _static_order(order)
    if p == INF:
        return tf.reduce_max(a, axis=axis, keepdims=keepdims)
    if p == 1.0:
        return tf.reduce_sum(a, axis=axis, keepdims=keepdims)
    m = tf.stop_gradient(tf.reduce_max(a, axis=axis, keepdims=True))
    m = tf.where(m > 0, m, tf.ones_like(m))  # the formula holds for any m > 0
    order = _order_tensor(order, x.dtype)
    s = tf.reduce_sum(_safe_pow(a / m, order), axis=axis, keepdims=True)
    norm = m * _safe_pow(s, 1.0 / order)
    if keepdims:
        return norm
    return tf.squeeze(norm, axis=axis) if axis is not None else tf.reshape(norm, [])


def dual_direction(x, order, axis=None):
    """The unit vector y of the dual norm with <y, x> = ||x||_p (over ``axis``).

        y = sign(x) |x|^(p-1) / ||x||_p^(p-1),   ||y||_{p*} = 1,
        p = 1:   y = sign(x);
        p = inf: y = sign(x) 1[|x| = max|x|] / (number of maximal entries).

    This is the gradient of ||x||_p (a subgradient for p = 1 or inf); the zero
    vector maps to zero. It is the normalisation step of the generalised power
    method. Entries are divided by max |x| before the power, so large or small
    exponents (p -> 1 in the v-step) do not overflow.

    Example:
    ```python
    x = tf.constant([3.0, -4.0])
    y = dual_direction(x, 2)       # [0.6, -0.8]; tf.reduce_sum(y * x) == 5
    ```
    """
    x = tf.convert_to_tensor(x)
    a = tf.abs(x)
    p = _static_order(order)
    if p == 1.0:
        return tf.sign(x)
    m = tf.reduce_max(a, axis=axis, keepdims=True)
    if p == INF:
        top = tf.cast(tf.logical_and(a >= m, m > 0), x.dtype)
        return tf.sign(x) * top / tf.maximum(tf.reduce_sum(top, axis=axis, keepdims=True), 1)
    r = a / tf.where(m > 0, m, tf.ones_like(m))
    y = tf.sign(x) * _safe_pow(r, _order_tensor(order, x.dtype) - 1.0)
    scale = vector_norm(y, dual_order(order), axis=axis, keepdims=True)
    return y / tf.where(scale > 0, scale, tf.ones_like(scale))


def _batch_axes(x):
    return list(range(1, len(x.shape)))


# --------------------------------------------------------------------------- closed forms


def has_closed_form(domain, codomain):
    """True where :func:`closed_form_induced_norm` is exact: domain 1 (largest
    column norm) or codomain inf (largest row dual norm). (2 -> 2 has the SVD
    for explicit matrices, see :func:`matrix_induced_norm`.) Tensor orders
    count as neither 1 nor inf.

    Example:
    ```python
    has_closed_form(1, 2), has_closed_form(2, "f"), has_closed_form(2, 3)  # True True False
    ```
    """
    return _static_order(domain) == 1.0 or _static_order(codomain) == INF


def closed_form_induced_norm(
    apply_kernel, apply_kernel_transpose, kernel, input_shape, domain, codomain
):
    """Exact ||A(kernel)||_{p->q} for p = 1 or q = inf, without forming A.

    A(kernel) is a linear operator whose matrix entries are entries of
    ``kernel`` or zero (a dense layer ``x @ kernel``, a convolution with any
    padding or stride), given by ``apply_kernel(x, kernel)`` on a batch
    ``x`` of shape ``input_shape`` (leading batch axis, e.g. ``[1, H, W, C]``)
    and its adjoint ``apply_kernel_transpose(u, kernel)``. Then the entrywise
    power |A(K)|^r equals A(|K|^r), so

        ||A||_{1->q}   = max_j (A(|K|^q)^T 1)_j^(1/q)          (column q-norms)
        ||A||_{p->inf} = max_i (A(|K|^{p*}) 1)_i^(1/p*)        (row p*-norms)
        ||A||_{1->inf} = max |K_e| over the entries e that occur in A

    (the last from the occurrence counts d/dK sum(A(K) 1)). Differentiable in
    ``kernel`` and in a tensor order; the padding's cut-off rows and columns
    are accounted for exactly.

    Example:
    ```python
    conv = lambda x, k: tf.nn.conv2d(x, k, 1, "SAME")
    conv_t = lambda u, k: tf.nn.conv2d_transpose(u, k, [1, 5, 5, 2], 1, "SAME")
    k = tf.random.normal([3, 3, 2, 4])
    closed_form_induced_norm(conv, conv_t, k, [1, 5, 5, 2], 1, 2)   # largest column 2-norm
    ```
    """
    p, q = _static_order(domain), _static_order(codomain)
    if not has_closed_form(domain, codomain):
        raise ValueError(
            f"no closed form for the {domain}->{codomain} norm: only domain 1 or "
            "codomain inf; use induced_norm_power_method"
        )
    kernel = tf.convert_to_tensor(kernel)
    ones_in = tf.ones(input_shape, kernel.dtype)
    a = tf.abs(kernel)
    if p == 1.0 and q == INF:
        with tf.GradientTape() as tape:
            k0 = tf.zeros_like(kernel)
            tape.watch(k0)
            total = tf.reduce_sum(apply_kernel(ones_in, k0))
        occurs = tape.gradient(total, k0) > 0
        return tf.reduce_max(tf.where(occurs, a, tf.zeros_like(a)))
    m = tf.stop_gradient(tf.reduce_max(a))
    m = tf.where(m > 0, m, tf.ones_like(m))
    if p == 1.0:  # largest column q-norm
        r = _order_tensor(codomain, kernel.dtype)
        ones_out = tf.ones_like(apply_kernel(ones_in, kernel))
        sums = apply_kernel_transpose(ones_out, _safe_pow(a / m, r))
    else:  # q = inf: largest row p*-norm
        r = _order_tensor(dual_order(domain), kernel.dtype)
        sums = apply_kernel(ones_in, _safe_pow(a / m, r))
    return m * _safe_pow(tf.maximum(tf.reduce_max(sums), 0.0), 1.0 / r)


def _matrix_apply(x, w):
    return tf.linalg.matvec(w, x)


def _matrix_apply_transpose(u, w):
    return tf.linalg.matvec(w, u, transpose_a=True)


def matrix_induced_norm(w, domain, codomain, num_restarts=128, max_iterations=200, seed=None):
    """||W||_{p->q} of an explicit matrix W of shape [m, n] (maps R^n to R^m).

    Exact for p = 1, q = inf (:func:`closed_form_induced_norm`) and for
    p = q = 2 (largest singular value, by SVD); elsewhere the best of
    ``num_restarts`` runs of the generalised power method, a certified lower
    bound (:func:`induced_norm_power_method`).

    Example:
    ```python
    w = tf.constant([[1.0, -2.0], [3.0, 4.0]])
    matrix_induced_norm(w, 1, 1)      # 6.0: largest column abs sum
    matrix_induced_norm(w, "f", "f")  # 7.0: largest row abs sum
    ```
    """
    w = tf.convert_to_tensor(w)
    if len(w.shape) != 2:
        raise ValueError(f"w must be a matrix [m, n], got shape {w.shape}")
    shape = [1, w.shape[1]]
    if has_closed_form(domain, codomain):
        return closed_form_induced_norm(
            _matrix_apply, _matrix_apply_transpose, w, shape, domain, codomain
        )
    if _static_order(domain) == 2.0 and _static_order(codomain) == 2.0:
        return tf.linalg.svd(w, compute_uv=False)[0]
    return induced_norm_power_method(
        lambda x: _matrix_apply(x, w),
        lambda u: _matrix_apply_transpose(u, w),
        shape,
        domain,
        codomain,
        num_restarts=num_restarts,
        max_iterations=max_iterations,
        seed=seed,
    ).norm


# --------------------------------------------------------------------------- power method

PowerIterationResult = collections.namedtuple(
    "PowerIterationResult", ["norm", "v", "u", "iterations"]
)
PowerIterationResult.__doc__ = """Result of the generalised power method.

norm: ||A v||_q per start (shape [R]) or of the best start (scalar); a lower bound.
v: the domain vectors, ||v||_p = 1, shape [R, *input].
u: dual(A v, q), the codomain dual vectors, shape [R, *output].
iterations: the number of dual-norm steps taken."""


def induced_norm_lower_bound(apply, v, domain, codomain):
    """||A v||_q / ||v||_p for each vector of the batch ``v`` (shape [R, *input]).

    It is <= ||A||_{p->q} for every v, with equality at a maximiser. Holding v
    fixed (``tf.stop_gradient``), its gradient in the operator's weights and in
    tensor orders is the gradient of ||A||_{p->q} at a maximiser (envelope
    theorem), i.e. u v^T for a matrix, with u = dual(A v, q) scaled by the norm.
    This is the differentiable sigma for normalisation W / max(1, sigma / coeff).

    Example:
    ```python
    w = tf.constant([[2.0, 0.0], [0.0, 1.0]])
    induced_norm_lower_bound(lambda x: tf.linalg.matvec(w, x), tf.constant([[1.0, 0.0]]), 2, 2)
    # [2.0]
    ```
    """
    v = tf.convert_to_tensor(v)
    y = apply(v)
    return vector_norm(y, codomain, axis=_batch_axes(y)) / vector_norm(
        v, domain, axis=_batch_axes(v)
    )


def power_iteration(apply, apply_transpose, v, domain, codomain, max_iterations=200, tol=1e-6):
    """The generalised power method for ||A||_{p->q} from the batch of starts ``v``.

    Each step is u = dual(A v, q), v = dual(A^T u, p*) (:func:`dual_direction`);
    the estimate ||A v||_q (with ||v||_p = 1) never decreases. Stops after
    ``max_iterations`` steps or when the largest relative increase over the
    batch is below ``tol``. ``v`` ([R, *input], any scale, not all zero) is a
    warm start, e.g. the stored vector of the previous call. Runs in a
    ``tf.while_loop`` (graph-friendly); no gradient flows through it.

    Returns a :class:`PowerIterationResult` with ``norm`` of shape [R].

    Example:
    ```python
    w = tf.random.normal([5, 4])
    res = power_iteration(lambda x: tf.linalg.matvec(w, x),
                          lambda u: tf.linalg.matvec(w, u, transpose_a=True),
                          tf.random.normal([3, 4]), 2, 4)
    res.norm          # three lower bounds of ||W||_{2->4}
    ```
    """
    v = tf.stop_gradient(tf.convert_to_tensor(v))
    in_axes = _batch_axes(v)
    domain_dual = dual_order(domain)
    v = v / vector_norm(v, domain, axis=in_axes, keepdims=True)
    y = apply(v)
    out_axes = _batch_axes(y)
    norm = vector_norm(y, codomain, axis=out_axes)

    def body(i, v, y, norm, change):
        u = dual_direction(y, codomain, axis=out_axes)
        v = dual_direction(apply_transpose(u), domain_dual, axis=in_axes)
        y = apply(v)
        new = vector_norm(y, codomain, axis=out_axes)
        change = tf.reduce_max(tf.abs(new - norm) / tf.maximum(tf.abs(new), 1e-30))
        return i + 1, v, y, new, change

    def cond(i, v, y, norm, change):
        return change > tol

    i, v, y, norm, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), v, y, norm, tf.constant(np.inf, v.dtype)),
        maximum_iterations=int(max_iterations),
    )
    u = dual_direction(y, codomain, axis=out_axes)
    return PowerIterationResult(tf.stop_gradient(norm), tf.stop_gradient(v), tf.stop_gradient(u), i)


def induced_norm_power_method(
    apply,
    apply_transpose,
    input_shape,
    domain,
    codomain,
    num_restarts=128,
    max_iterations=200,
    tol=1e-6,
    seed=None,
    dtype=tf.float32,
):
    """Best of ``num_restarts`` random starts of :func:`power_iteration` (all run
    as one batch): the initialisation of a stored power vector.

    ``input_shape`` is the shape of one batch-of-one input (e.g. ``[1, n]`` or
    ``[1, H, W, C]``); ``seed`` is a stateless seed pair (or None). Returns a
    :class:`PowerIterationResult` with the scalar ``norm`` of the best start
    and its ``v`` and ``u`` with a batch axis of 1, ready to be stored and
    warm-started. The estimate is a certified lower bound of ||A||_{p->q}.
    For p = q = 2 a single start suffices (one maximum), so one is used.

    Why 128 starts (the authors' code uses 11): on random 3x5 ... 18x9 matrices
    (incl. 3x3 convolutions) against the exact norms of the hard cases p > q
    (2->1, 3->1, inf->1, inf->2, inf->3; exact by enumerating sign vectors), the
    worst ratio estimate / exact over 200 matrices was 0.959 with 32 starts,
    0.974 with 64 and 0.9989 with 128. The starts run as one batch, so memory
    is ``num_restarts`` times one input; pass fewer for very large inputs.

    Example:
    ```python
    w = tf.random.normal([6, 4])
    res = induced_norm_power_method(lambda x: tf.linalg.matvec(w, x),
                                    lambda u: tf.linalg.matvec(w, u, transpose_a=True),
                                    [1, 4], "f", 1, seed=[1, 2])
    res.norm, res.v.shape            # lower bound of ||W||_{inf->1}, (1, 4)
    ```
    """
    shape = [int(d) for d in input_shape]
    if not shape or shape[0] != 1:
        raise ValueError(f"input_shape must be a batch-of-one shape [1, ...], got {input_shape}")
    if int(num_restarts) < 1:
        raise ValueError(f"num_restarts must be >= 1, got {num_restarts}")
    if _static_order(domain) == 2.0 and _static_order(codomain) == 2.0:
        num_restarts = 1
    shape[0] = int(num_restarts)
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    v0 = tf.random.stateless_normal(shape, seed=seed, dtype=dtype)
    res = power_iteration(
        apply, apply_transpose, v0, domain, codomain, max_iterations=max_iterations, tol=tol
    )
    best = tf.argmax(res.norm)
    return PowerIterationResult(
        res.norm[best], res.v[best][None], res.u[best][None], res.iterations
    )


# --------------------------------------------------------------------------- learnable orders

_SQUASH_SHIFT = math.atanh(0.5)  # unconstrained 0 <-> order 2
_LEAKY_SLOPE = 0.3


def _leaky_elu(x):
    return _LEAKY_SLOPE * x + (1.0 - _LEAKY_SLOPE) * tf.nn.elu(x)


def order_from_unconstrained(raw):
    """A learnable norm order p in [1.001, 5] from an unconstrained variable.

        s = -leaky_elu(atanh(1/2) - raw),  leaky_elu(y) = 0.3 y + 0.7 elu(y),
        p = max(3 + 2 tanh(s), 1.001).

    This is the asymmetric squashing of the authors' code (raw = 0 gives p = 2;
    toward p -> 1 the pre-activation s is linear in raw, toward p -> 5 it grows
    with slope 0.3 only), with a floor at 1.001 so that 1 / (p - 1) stays finite
    in float32. The gradient dp/draw is finite everywhere and tends to 0 at both
    ends (0 below the floor).

    Example:
    ```python
    raw = tf.Variable(0.0)
    p = order_from_unconstrained(raw)      # 2.0
    ```
    """
    raw = tf.convert_to_tensor(raw)
    s = -_leaky_elu(tf.constant(_SQUASH_SHIFT, raw.dtype) - raw)
    low, _ = LEARNABLE_ORDER_RANGE
    return tf.maximum(3.0 + 2.0 * tf.tanh(s), tf.constant(low, raw.dtype))


def unconstrained_from_order(order):
    """The unconstrained value raw (a Python float) with
    ``order_from_unconstrained(raw) == order``, for order in (1.001, 5); to
    initialise a learnable order.

    Example:
    ```python
    unconstrained_from_order(2.0)     # 0.0
    ```
    """
    p = parse_order(order)
    low, high = LEARNABLE_ORDER_RANGE
    if not low < p < high:
        raise ValueError(f"a learnable order must lie in ({low}, {high}), got {order!r}")
    s = math.atanh((p - 3.0) / 2.0)
    if s <= 0.0:  # raw <= shift: s = raw - shift
        return _SQUASH_SHIFT + s
    # raw = shift + t with s = 0.3 t + 0.7 (1 - exp(-t)), increasing in t: Newton from t = s.
    t = s
    for _ in range(100):
        f = _LEAKY_SLOPE * t + (1.0 - _LEAKY_SLOPE) * (1.0 - math.exp(-t)) - s
        t_new = t - f / (_LEAKY_SLOPE + (1.0 - _LEAKY_SLOPE) * math.exp(-t))
        if abs(t_new - t) < 1e-15 * max(1.0, abs(t)):
            t = t_new
            break
        t = t_new
    return _SQUASH_SHIFT + t


# --------------------------------------------------------------------------- chaining


def chain_orders(vnorms, num_layers):
    """Per-layer (domain, codomain) orders of a residual branch of ``num_layers``
    linear maps, chained so that the branch is Lipschitz in one norm:
    codomain(i) = domain(i + 1) and codomain(last) = domain(first).

    ``vnorms`` is a string with one character per order (``'1'``-``'9'``,
    ``'f'`` = inf), or a sequence of orders, in one of three forms:

    * ``num_layers`` orders: the domains; codomains are the next layer's domain,
      cyclically (the last layer maps back to the first order);
    * ``num_layers + 1`` orders (the authors' format: domains ``vnorms[:-1]``,
      codomains ``vnorms[1:]``), whose first and last orders must be equal;
    * one order: the same order for every layer (e.g. ``"2"`` or ``"f"``);
      so is any number of equal orders (``"2222"`` fits a branch of any
      length, as one setting serves blocks of different depths).

    Example:
    ```python
    chain_orders("2f1", 3)    # [(2.0, inf), (inf, 1.0), (1.0, 2.0)]
    chain_orders("2332", 3)   # [(2.0, 3.0), (3.0, 3.0), (3.0, 2.0)]
    ```
    """
    n = int(num_layers)
    if n < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    items = list(vnorms)
    orders = [parse_order(o, name=f"vnorms[{i}]") for i, o in enumerate(items)]
    if len(set(orders)) == 1:
        orders = orders[:1] * n
    elif len(orders) == n + 1:
        if orders[0] != orders[-1]:
            raise ValueError(
                f"vnorms {vnorms!r} has num_layers + 1 = {n + 1} orders, so its first and last "
                "orders are the block's input and output norms, which must be equal for the "
                "block to be a contraction in one norm"
            )
        orders = orders[:-1]
    elif len(orders) != n:
        raise ValueError(
            f"vnorms {vnorms!r} has {len(orders)} orders; a branch of {n} linear "
            f"layers needs {n} (domains), {n + 1} (first = last) or 1"
        )
    return [(orders[i], orders[(i + 1) % n]) for i in range(n)]
