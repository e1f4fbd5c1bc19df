"""The pure numerics of the Lipschitz layers' norm estimates: power iteration on
a matrix's squared Gram matrix, the Gram-iteration start and upper bound, and the
plane-wave start for a padded convolution. Functions of tensors only, no layer
state; :mod:`rflow_tf.layers.lipschitz.estimators` composes them."""

import numpy as np
import tensorflow as tf


def l2_normalize(x):
    """x / ||x||_2 over all its entries (a zero x stays zero):
    x / (||x||_2 + 1e-12).

    Args:
      x: a float tensor of any shape.

    Returns:
      A tensor shaped like ``x``.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.power_iteration import l2_normalize

    assert np.allclose(l2_normalize(tf.constant([3.0, 4.0])), [0.6, 0.8])
    assert np.allclose(l2_normalize(tf.ones([2, 2])), 0.5)  # over all entries
    assert not np.any(l2_normalize(tf.zeros([3])))
    ```
    """
    return x / (tf.norm(tf.reshape(x, [-1])) + 1e-12)


def _smaller_gram(mat):
    """The smaller Gram matrix of M [n_in, n_out] and whether it is M^T M
    (n_in > n_out, acting on R^n_out) rather than M M^T (acting on R^n_in)."""
    wide = mat.shape[0] > mat.shape[1]
    if wide:
        return tf.matmul(mat, mat, transpose_a=True), True
    return tf.matmul(mat, mat, transpose_b=True), False


#: Steps of the squared Gram matrix (two power steps each) per convergence
#: check in :func:`gram_power_iteration`: the check and the loop's own
#: bookkeeping cost more graph ops than a step, and the graph pays per op.
_GRAM_STEPS_PER_CHECK = 4


def _normalize_columns(x):
    """Each column of x [n, k] divided by its 2-norm (a zero column stays zero)."""
    return x / (tf.norm(x, axis=0, keepdims=True) + 1e-12)


def gram_power_iteration(mat, v, tol, max_iterations):
    """Power iteration for the matrix W = M^T (M = ``mat`` [n_in, n_out]) on the
    smaller Gram matrix G (W^T W if n_in <= n_out, else W W^T), squared:

        x <- normalize(G^2 x)      (two power steps in one matrix-vector product)

    from x = v (or W v), until x moves by less than ``tol`` in one such step
    (checked every :data:`_GRAM_STEPS_PER_CHECK` steps, so at most 3 extra
    steps, each making the estimate more accurate), or about
    ``max_iterations`` power steps. Returns ``(u, v)`` with v the top right
    singular vector estimate and u = normalize(W v), as the plain iteration.
    G is rescaled by its largest entry (no overflow); a zero matrix gives
    zero vectors (sigma 0), as the plain iteration does.

    ``v`` may also be a matrix [n_in, k] of k start vectors (columns): the k
    iterations run in one loop, until every one has converged, and ``(u, v)``
    are then [n_out, k] and [n_in, k].

    Args:
      mat: the matrix M [n_in, n_out] of the map W = M^T.
      v: a start vector [n_in], or k start vectors [n_in, k].
      tol: the convergence tolerance on the change of x per squared step.
      max_iterations: the budget of power steps.

    Returns:
      ``(u, v)``: [n_out] and [n_in] (or [n_out, k] and [n_in, k]), unit norm;
      sigma = u^T W v estimates ||W||_2 from below.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.power_iteration import gram_power_iteration

    m = tf.constant(np.random.default_rng(0).normal(size=(5, 3)))  # W = M^T: R^5 -> R^3
    u, v = gram_power_iteration(m, tf.ones([5], tf.float64), 1e-10, 500)
    sigma = float(tf.tensordot(u, tf.linalg.matvec(m, v, transpose_a=True), 1))
    _, s, right = np.linalg.svd(m.numpy().T)
    assert abs(sigma - s[0]) < 1e-10 and abs(abs(float(tf.tensordot(v, right[0], 1))) - 1) < 1e-10
    ```
    """
    columns = v.shape.rank == 2
    starts = v if columns else v[:, None]
    gram, wide = _smaller_gram(mat)  # wide: iterate on u in R^n_out
    x = tf.matmul(mat, starts, transpose_a=True) if wide else starts
    gram = gram / (tf.reduce_max(tf.abs(gram)) + 1e-30)
    gram2 = tf.matmul(gram, gram)
    k = _GRAM_STEPS_PER_CHECK

    def body(x, change):
        for _ in range(k - 1):
            x = _normalize_columns(tf.matmul(gram2, x))
        x2 = _normalize_columns(tf.matmul(gram2, x))
        return x2, tf.reduce_max(tf.norm(x2 - x, axis=0))

    x, _ = tf.while_loop(
        lambda x, change: change > tol,
        body,
        (_normalize_columns(x), tf.constant(np.inf, mat.dtype)),
        maximum_iterations=-(-int(max_iterations) // (2 * k)),
    )
    v = _normalize_columns(tf.matmul(mat, x)) if wide else x
    u = _normalize_columns(tf.matmul(mat, v, transpose_a=True))
    return (u, v) if columns else (u[:, 0], v[:, 0])


def gram_top_vector(mat, v, n_squarings=10):
    """(M M^T)^(2^n) applied to a start vector, for the matrix map
    v -> M^T v of a kernel M [n_in, n_out] (v and the result in R^n_in):
    components along singular values s_i shrink like (s_i / s_1)^(2^(n+1)).
    Uses the smaller Gram matrix; rescaled at every squaring.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.power_iteration import gram_top_vector

    m = tf.constant(np.random.default_rng(0).normal(size=(5, 3)), tf.float64)
    v = gram_top_vector(m, tf.ones([5], tf.float64))
    top = np.linalg.svd(m.numpy())[0][:, 0]   # top left singular vector of M
    assert abs(abs(float(tf.tensordot(v, top, 1))) - 1) < 1e-8
    ```
    """
    gram, transpose = _smaller_gram(mat)

    def square(i, gram):
        gram = gram / tf.reduce_max(tf.abs(gram))
        return i + 1, tf.matmul(gram, gram)

    # A loop, not unrolled: the graph pays per op, the loop's body is 5 of them.
    _, gram = tf.while_loop(lambda i, _: i < n_squarings, square, (0, gram))
    if transpose:  # iterate in R^n_out, then map back: v = M u
        u = tf.linalg.matvec(gram, tf.linalg.matvec(mat, v, transpose_a=True))
        return l2_normalize(tf.linalg.matvec(mat, u))
    return l2_normalize(tf.linalg.matvec(gram, v))


def _kernel_symbol(kernel, w1, w2):
    """The symbol S(w) = sum_a K[a]^T exp(-i w . (a - c)) of a 'same' convolution
    with kernel K [kh, kw, c_in, c_out] (c its centre tap) at the frequencies
    (w1[f], w2[f]): [F, c_out, c_in]. The convolution maps the plane wave
    exp(-i w . p) z to exp(-i w . p) S(w) z."""
    kh, kw = kernel.shape[:2]
    real = w1.dtype
    # Tap offsets from the centre, as constants (the graph pays per op).
    a = tf.constant((np.arange(kh) - (kh - 1) // 2)[None, :, None], real)
    b = tf.constant((np.arange(kw) - (kw - 1) // 2)[None, None, :], real)
    phase = w1[:, None, None] * a + w2[:, None, None] * b
    complex_dtype = tf.complex64 if real == tf.float32 else tf.complex128
    waves = tf.exp(tf.complex(tf.zeros_like(phase), -phase))
    return tf.einsum("fab,abio->foi", waves, tf.cast(kernel, complex_dtype))


def _top_right_singular(symbols):
    """Largest singular values [F] and right singular vectors [F, c_in] of a
    batch of complex matrices [F, c_out, c_in], from the smaller Gram side."""
    c_out, c_in = symbols.shape[-2:]
    if c_in <= c_out:
        values, vectors = tf.linalg.eigh(tf.matmul(symbols, symbols, adjoint_a=True))
        return tf.math.real(values[:, -1]), vectors[:, :, -1]
    values, vectors = tf.linalg.eigh(tf.matmul(symbols, symbols, adjoint_b=True))
    right = tf.linalg.matvec(symbols, vectors[:, :, -1], adjoint_a=True)
    norm = tf.cast(tf.norm(right, axis=-1, keepdims=True) + 1e-30, right.dtype)
    return tf.math.real(values[:, -1]), right / norm


def plane_wave_start(kernel, input_hw, n_candidates=4, coarse=32):
    """A start vector for power iteration on the zero-padded 'same' convolution
    x -> conv(x, K) over H x W maps: the top singular vector of that map is
    close to a plane wave under the lowest Dirichlet mode,

        v[p, q, :] = sin(pi (p + 1) / (H + 1)) sin(pi (q + 1) / (W + 1))
                     * Re(exp(-i (w1 p + w2 q)) z),

    where (w1, w2) maximises the largest singular value of the kernel's symbol
    S(w) = sum_a K[a]^T exp(-i w . (a - c)) and z is the matching right
    singular vector (for large maps the operator norm tends to
    max_w ||S(w)||_2). The maximiser is found on a ``coarse`` x ``coarse``
    frequency grid, then on a grid of pi / (H + 1) x pi / (W + 1) around each of
    the ``n_candidates`` best coarse frequencies. Power iteration from this
    vector converges in tens of steps where a random start needs hundreds on
    large maps (its top singular values are close), and a random start cut
    off at a step budget under-reports the norm. Deterministic: a function of
    the kernel. Returns a unit-norm [1, H, W, c_in] tensor.

    Example:
    ```python
    k = tf.random.normal([3, 3, 4, 16])
    v0 = plane_wave_start(k, (32, 32))   # [1, 32, 32, 4]
    ```
    """
    kernel = tf.convert_to_tensor(kernel)
    real = kernel.dtype
    np_real = real.as_numpy_dtype
    h, w = (int(n) for n in input_hw)
    # The frequency grids, positions and envelope do not depend on the kernel:
    # computed here in the kernel's precision and put in the graph as constants.
    grid = np.arange(coarse, dtype=np_real) * np_real(2 * np.pi / coarse)
    g1, g2 = (g.reshape(-1) for g in np.meshgrid(grid, grid, indexing="ij"))
    values, _ = _top_right_singular(_kernel_symbol(kernel, tf.constant(g1), tf.constant(g2)))
    best = tf.math.top_k(values, min(int(n_candidates), coarse * coarse)).indices

    def offsets(n):  # steps of pi / (n + 1), spanning one coarse cell each way
        step = np.pi / (n + 1)
        r = int(np.ceil((2 * np.pi / coarse) / step))
        return np.arange(-r, r + 1, dtype=np_real) * np_real(step)

    o1, o2 = (o.reshape(1, -1) for o in np.meshgrid(offsets(h), offsets(w), indexing="ij"))
    f1 = tf.reshape(tf.gather(tf.constant(g1[:, None]), best) + o1, [-1])
    f2 = tf.reshape(tf.gather(tf.constant(g2[:, None]), best) + o2, [-1])
    values, vectors = _top_right_singular(_kernel_symbol(kernel, f1, f2))
    # Gathers, not slices: a slice at a computed index would make XLA need
    # the kernel's value at compile time (one compilation per kernel).
    i = tf.argmax(values)
    p = np.arange(h, dtype=np_real)
    q = np.arange(w, dtype=np_real)
    phase = tf.gather(f1, i) * p[:, None] + tf.gather(f2, i) * q[None, :]
    wave = tf.complex(tf.cos(phase), -tf.sin(phase))
    envelope = np.sin(np.pi * (p + 1) / (h + 1))[:, None] * np.sin(np.pi * (q + 1) / (w + 1))
    v = tf.math.real(wave[:, :, None] * tf.gather(vectors, i)[None, None, :]) * envelope[:, :, None]
    return l2_normalize(v[None])


def _frobenius(g):
    """Frobenius norms of a batch of (real or complex) matrices, as reals."""
    return tf.sqrt(tf.reduce_sum(tf.square(tf.abs(g)), axis=[-2, -1]))


def gram_iteration_bound(mats, n_iterations):
    """max over a batch of matrices [..., m, n] of the Gram-iteration bound
    ||G_t||_F^(1/2^t) >= ||G_0||_2, with rescaling: G_t = c_t H_t, log c_t
    tracked separately. Uses the smaller Gram side.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.power_iteration import gram_iteration_bound

    m = np.random.default_rng(0).normal(size=(2, 6, 4))
    bound = float(gram_iteration_bound(tf.constant(m), 8))
    exact = max(np.linalg.norm(a, 2) for a in m)
    # exact <= bound <= exact * rank^(1 / 2^(t+1)), up to float64 rounding
    assert exact * (1 - 1e-12) <= bound <= exact * 4 ** (1 / 2**9)
    ```
    """
    g = tf.convert_to_tensor(mats)
    if g.shape[-2] < g.shape[-1]:
        g = tf.linalg.adjoint(g)
    log_scale = tf.zeros(tf.shape(g)[:-2], g.dtype.real_dtype)
    for t in range(n_iterations):
        fro = tf.maximum(_frobenius(g), tf.cast(1e-30, log_scale.dtype))
        g = g / tf.cast(fro, g.dtype)[..., None, None]
        log_scale = log_scale + tf.math.log(fro) / (2.0**t)
        g = tf.matmul(g, g, adjoint_a=True)
    fro = tf.maximum(_frobenius(g), tf.cast(1e-30, log_scale.dtype))
    log_bound = log_scale + tf.math.log(fro) / (2.0**n_iterations)
    return tf.exp(tf.reduce_max(log_bound))
