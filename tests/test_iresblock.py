"""IResBlock against exact math: slogdet of the full Jacobian and its autodiff gradient."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import exact_log_det, finite_difference_jacobian, jacobian

from rflow_tf import layers as rl
from rflow_tf.bijectors import IResBlock, flow_kwargs

tfb, tfd = tfp.bijectors, tfp.distributions

N_ESTIMATES = 1000


def dense_net(dim, seed, coeff=0.95, hidden=16, activation="elu", dtype="float64"):
    """A random net g = W2 phi(W1 x + b) with ||W_i|| = coeff and W2 aligned to W1^T,
    so that Lip(g) is close to coeff^2 (about 0.9 with ELU) rather than the small
    value a random product of matrices has."""
    keras.utils.set_random_seed(seed)
    net = rl.lipschitz_dense_net(dim, (hidden,), coeff=coeff, activation=activation, dtype=dtype)
    first, second = rl.lipschitz_layers(net)
    first.kernel.assign(first.kernel * 5.0)
    second.kernel.assign(tf.transpose(first.kernel))
    first.bias.assign(tf.random.normal(first.bias.shape, dtype=first.bias.dtype) + 1.0)
    rl.converge_lipschitz(net, tol=1e-8, max_iterations=1000)
    return net


def exact_logdet_and_grads(net, x):
    block = IResBlock(net, logdet="exact")
    variables = [v for v in block.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(x)
        ld = block.forward_and_log_det(x)[1]
        total = tf.reduce_sum(ld)
    grads = tape.gradient(total, [x] + variables)
    grads = [tf.zeros_like(t) if g is None else g for g, t in zip(grads, [x] + variables)]
    return ld.numpy(), [g.numpy() for g in grads]


def jacobian_norm(net, x):
    jac = jacobian(net, x)
    return max(np.linalg.svd(j, compute_uv=False)[0] for j in jac)


def test_exact_mode_is_slogdet_of_brute_force_jacobian():
    net = dense_net(3, seed=0)
    x = tf.random.stateless_normal([4, 3], [1, 1], dtype=tf.float64)
    ld = IResBlock(net, logdet="exact").forward_and_log_det(x)[1].numpy()
    # Central finite differences of f(x) = x + g(x), independent of autodiff.
    jac = finite_difference_jacobian(lambda t: t + net(t), x.numpy(), eps=1e-6)
    np.testing.assert_allclose(ld, np.linalg.slogdet(jac)[1], rtol=1e-6, atol=1e-9)


ESTIMATOR_CASES = [
    (2, "poisson", 2.0, 2),
    (2, "geometric", 0.5, 0),
    (3, "geometric", 0.5, 2),
    (3, "poisson", 2.0, 0),
    (4, "poisson", 2.0, 1),
    (4, "geometric", 0.6, 3),
    (5, "geometric", 0.5, 1),
    (5, "poisson", 1.0, 2),
    (6, "poisson", 2.0, 2),
    (6, "geometric", 0.5, 2),
]


@pytest.mark.parametrize("dim,dist,param,m", ESTIMATOR_CASES)
def test_unbiased_logdet_mean_matches_exact(dim, dist, param, m):
    net = dense_net(dim, seed=dim * 10 + m)
    x = tf.random.stateless_normal([3, dim], [dim, m], dtype=tf.float64)
    assert 0.75 < jacobian_norm(net, x) < 0.95  # Lipschitz near 0.9
    exact, _ = exact_logdet_and_grads(net, x)
    kw = {"rate": param} if dist == "poisson" else {"p": param}
    block = IResBlock(net, dist=dist, n_exact_terms=m, **kw)

    @tf.function
    def estimate(seed):
        return block.forward_and_log_det(x, seed=seed, training=True)[1]

    samples = np.stack([estimate(tf.constant([i, 17])).numpy() for i in range(N_ESTIMATES)])
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(N_ESTIMATES)
    assert np.all(np.abs(mean - exact) < 4 * se + 1e-12), (mean, exact, se)


def test_truncated_estimator_is_biased():
    """Documented bias of the i-ResNet estimator: with 2 terms it misses sum_{k>2}."""
    net = dense_net(4, seed=3)
    x = tf.random.stateless_normal([3, 4], [3, 3], dtype=tf.float64)
    exact, _ = exact_logdet_and_grads(net, x)
    block = IResBlock(net, logdet="truncated", n_terms=2, probe="rademacher")
    unbiased = IResBlock(net, n_exact_terms=2, probe="rademacher")

    @tf.function
    def both(seed):
        return (
            block.forward_and_log_det(x, seed=seed)[1],
            unbiased.forward_and_log_det(x, seed=seed, training=True)[1],
        )

    t, u = map(
        np.stack, zip(*[[a.numpy() for a in both(tf.constant([i, 5]))] for i in range(N_ESTIMATES)])
    )
    t_se = t.std(0) / np.sqrt(N_ESTIMATES)
    u_se = u.std(0) / np.sqrt(N_ESTIMATES)
    assert np.any(np.abs(t.mean(0) - exact) > 6 * t_se)  # biased
    assert np.all(np.abs(u.mean(0) - exact) < 4 * u_se)  # unbiased


@pytest.mark.parametrize("dist", ["poisson", "geometric"])
def test_neumann_gradient_mean_matches_autodiff_of_exact(dist):
    dim = 3
    net = dense_net(dim, seed=21)
    x = tf.random.stateless_normal([2, dim], [7, 7], dtype=tf.float64)
    _, exact_grads = exact_logdet_and_grads(net, x)
    block = IResBlock(net, dist=dist, n_exact_terms=2, neumann_grad=True, grad_in_forward=True)
    variables = list(block.trainable_variables)
    rng = np.random.default_rng(0)
    projections = [rng.normal(size=g.shape) for g in exact_grads]

    @tf.function
    def grads(seed):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(block.forward_and_log_det(x, seed=seed, training=True)[1])
        gs = tape.gradient(total, [x] + variables)
        return [tf.zeros_like(t) if g is None else g for g, t in zip(gs, [x] + variables)]

    samples = [grads(tf.constant([i, 3])) for i in range(N_ESTIMATES)]
    # Each input-gradient component, and a random projection of each weight gradient.
    gx = np.stack([s[0].numpy() for s in samples])
    mean, se = gx.mean(0), gx.std(0) / np.sqrt(N_ESTIMATES)
    assert np.all(np.abs(mean - exact_grads[0]) < 4 * se), (mean, exact_grads[0], se)
    for k in range(1, len(exact_grads)):
        proj = np.array([np.sum(s[k].numpy() * projections[k]) for s in samples])
        target = np.sum(exact_grads[k] * projections[k])
        if np.all(exact_grads[k] == 0):  # e.g. the last bias does not enter J
            assert np.allclose(proj, 0.0)
            continue
        assert abs(proj.mean() - target) < 4 * proj.std() / np.sqrt(N_ESTIMATES), (
            k,
            proj.mean(),
            target,
        )


@pytest.mark.parametrize("upstream", ["uniform", "per_example"])
def test_grad_in_forward_equals_recomputed_neumann(upstream):
    net = dense_net(4, seed=5)
    x = tf.random.stateless_normal([5, 4], [2, 2], dtype=tf.float64)
    weights = tf.constant(
        [0.2] * 5 if upstream == "uniform" else [0.1, -1.0, 2.0, 0.3, 0.0], tf.float64
    )
    results = []
    for gif in (False, True):
        block = IResBlock(net, neumann_grad=True, grad_in_forward=gif)
        variables = list(block.trainable_variables)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, ld = block.forward_and_log_det(x, seed=[4, 2], training=True)
            loss = tf.reduce_sum(weights * ld) + tf.reduce_sum(y**2)
        results.append((ld.numpy(), tape.gradient(loss, [x] + variables)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_backprop_through_series_gives_same_value_and_mean_gradient():
    net = dense_net(2, seed=8)
    x = tf.random.stateless_normal([2, 2], [9, 9], dtype=tf.float64)
    plain = IResBlock(net, neumann_grad=False, n_exact_terms=2)
    neumann = IResBlock(net, neumann_grad=True, n_exact_terms=2)
    a = plain.forward_and_log_det(x, seed=[1, 1], training=True)[1]
    b = neumann.forward_and_log_det(x, seed=[1, 1], training=True)[1]
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    _, exact_grads = exact_logdet_and_grads(net, x)

    @tf.function
    def grad_x(seed):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(plain.forward_and_log_det(x, seed=seed, training=True)[1])
        return tape.gradient(total, x)

    g = np.stack([grad_x(tf.constant([i, 0])).numpy() for i in range(400)])
    assert np.all(np.abs(g.mean(0) - exact_grads[0]) < 4 * g.std(0) / np.sqrt(400))


def test_value_is_the_real_estimate_not_a_surrogate():
    """Every gradient mode returns the same power-series estimate for the same seed,
    and with many terms its mean is the exact log-det."""
    net = dense_net(3, seed=11)
    x = tf.random.stateless_normal([4, 3], [0, 4], dtype=tf.float64)
    exact, _ = exact_logdet_and_grads(net, x)
    values = []
    for kwargs in (
        dict(neumann_grad=True, grad_in_forward=True),
        dict(neumann_grad=True),
        dict(neumann_grad=False),
    ):
        block = IResBlock(net, logdet="truncated", n_terms=60, **kwargs)
        run = tf.function(lambda seed, block=block: block.forward_and_log_det(x, seed=seed)[1])
        values.append(np.stack([run(tf.constant([s, 0])).numpy() for s in range(300)]))
    np.testing.assert_allclose(values[0], values[1], rtol=1e-12)
    np.testing.assert_allclose(values[0], values[2], rtol=1e-12)
    se = values[0].std(0) / np.sqrt(300)
    assert np.all(np.abs(values[0].mean(0) - exact) < 4 * se)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-5), ("float32", 1e-4)])
def test_inverse_round_trip_dense(dtype, tol):
    net = dense_net(5, seed=2, dtype=dtype)
    block = IResBlock(net)
    x = tf.random.stateless_normal([6, 5], [3, 1], dtype=dtype) * 2.0
    # tf.identity: a new tensor, so the cache cannot recall x and the fixed point runs
    np.testing.assert_allclose(
        block.inverse(tf.identity(block.forward(x))).numpy(), x.numpy(), atol=tol
    )
    y = tf.random.stateless_normal([6, 5], [3, 2], dtype=dtype)
    np.testing.assert_allclose(block.forward(block.inverse(y)).numpy(), y.numpy(), atol=tol)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-5), ("float32", 1e-4)])
def test_inverse_round_trip_conv(dtype, tol):
    keras.utils.set_random_seed(3)
    block = IResBlock.conv((6, 6, 2), hidden_channels=8, coeff=0.98, dtype=dtype)
    for layer in rl.lipschitz_layers(block):
        layer.kernel.assign(layer.kernel * 4.0)
    rl.converge_lipschitz(block)
    x = tf.random.stateless_normal([3, 6, 6, 2], [1, 5], dtype=dtype)
    y = tf.identity(block.forward(x))  # a new tensor: the fixed point really runs
    assert float(tf.reduce_max(tf.abs(y - x))) > 0.03  # g is not negligible
    np.testing.assert_allclose(block.inverse(y).numpy(), x.numpy(), atol=tol)


def test_inverse_non_convergence_is_reported():
    net = dense_net(3, seed=4)
    block = IResBlock(net, inverse_max_iterations=2)
    y = tf.random.normal([4, 3], dtype=tf.float64) * 3.0
    with pytest.warns(RuntimeWarning, match="did not converge.*residual"):
        block.inverse(y)
    x, residual, converged = block.inverse_with_diagnostics(y)
    assert not bool(converged) and float(residual) > 0.0


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_inverse_is_never_converged(bad):
    block = IResBlock(dense_net(3, seed=4))
    y = tf.constant([[0.3, -0.2, 0.1], [bad, 0.0, 0.5]], tf.float64)
    x, residual, converged = block.inverse_with_diagnostics(y)
    assert not bool(converged) and not np.isfinite(float(residual))
    with pytest.warns(RuntimeWarning, match="did not converge.*not finite"):
        block.inverse(y)
    # A finite input still converges to the exact inverse.
    x, residual, converged = block.inverse_with_diagnostics(y[:1])
    assert bool(converged) and float(residual) < 1e-5
    np.testing.assert_allclose(block.forward(x).numpy(), y[:1].numpy(), atol=1e-5)


def test_transformed_distribution_exact_log_prob_is_change_of_variables():
    nets = [dense_net(2, seed=s) for s in (30, 31, 32)]
    blocks = [IResBlock(n, logdet="exact") for n in nets]
    flow = tfb.Chain(blocks[::-1])  # applies blocks[0] first
    base = tfd.MultivariateNormalDiag(tf.zeros(2, tf.float64))
    dist = tfd.TransformedDistribution(base, tfb.Invert(flow))
    x = tf.random.stateless_normal([5, 2], [5, 5], dtype=tf.float64)

    def forward(z):
        for n in nets:
            z = z + n(z)
        return z

    brute = base.log_prob(forward(x)).numpy() + exact_log_det(forward, x)
    np.testing.assert_allclose(dist.log_prob(x).numpy(), brute, rtol=1e-7)
    samples = tfd.TransformedDistribution(
        base, tfb.Invert(tfb.Chain([IResBlock(n) for n in nets[::-1]]))
    ).sample(7, seed=[1, 2])
    assert samples.shape == (7, 2)
    assert np.all(np.isfinite(dist.log_prob(samples).numpy()))


def test_cache_never_returns_stale_estimates_or_none_gradients():
    net = dense_net(3, seed=12)
    block = IResBlock(net)
    chain = tfb.Chain([block])
    x = tf.random.normal([4, 3], dtype=tf.float64)
    a = chain.forward_log_det_jacobian(x, 1)
    b = chain.forward_log_det_jacobian(x, 1)
    assert not np.allclose(a.numpy(), b.numpy())  # a fresh random estimate
    s1 = chain.forward_log_det_jacobian(x, 1, **flow_kwargs(chain, seed=[3, 3]))
    s2 = chain.forward_log_det_jacobian(x, 1, **flow_kwargs(chain, seed=[3, 3]))
    np.testing.assert_array_equal(s1.numpy(), s2.numpy())  # a per-call seed reproduces it
    with tf.GradientTape() as tape:  # same tensor x, new tape
        c = tf.reduce_sum(chain.forward_log_det_jacobian(x, 1))
    grads = tape.gradient(c, chain.trainable_variables)
    assert all(g is not None for g in grads[:-1])
    # Weights change -> log_prob changes, even for the same input tensor object.
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(3, tf.float64)),
        tfb.Invert(tfb.Chain([IResBlock(net, logdet="exact")])),
    )
    before = dist.log_prob(x).numpy()
    np.testing.assert_array_equal(dist.log_prob(x).numpy(), before)
    net.layers[-1].bias.assign_add(tf.ones_like(net.layers[-1].bias))
    assert not np.allclose(dist.log_prob(x).numpy(), before)


def test_trainable_variables_visible_through_chain_and_distribution():
    blocks = [IResBlock.dense(2, hidden_units=(8,)) for _ in range(2)]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(blocks))
    )
    keras_weights = {id(w.value) for b in blocks for w in b.net.trainable_weights}
    assert len(keras_weights) == 2 * (2 + 2 + 1)  # kernels, biases, beta per block
    assert {id(v) for v in dist.trainable_variables} == keras_weights


def test_tfp_math_minimize_fits_2d_target():
    keras.utils.set_random_seed(0)
    target = tfd.MultivariateNormalDiag(loc=[1.5, -1.0], scale_diag=[0.5, 2.0])
    data = target.sample(512, seed=[1, 1])
    blocks = [
        IResBlock.dense(2, hidden_units=(32, 32), coeff=0.97, activation="elu") for _ in range(4)
    ]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(blocks))
    )

    @tf.function
    def loss():
        return -tf.reduce_mean(dist.log_prob(data))

    initial = float(loss())
    before = [v.numpy().copy() for v in dist.trainable_variables]
    losses = tfp.math.minimize(
        loss,
        num_steps=150,
        optimizer=keras.optimizers.Adam(1e-2),
        trainable_variables=dist.trainable_variables,
    )
    rl.converge_lipschitz(dist)
    final = float(tf.reduce_mean(losses[-10:]))
    best = float(-tf.reduce_mean(target.log_prob(data)))
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, dist.trainable_variables))
    assert final < initial - 0.5 * (initial - best)  # most of the gap is closed
    assert np.all(np.isfinite(dist.sample(10, seed=[2, 2]).numpy()))


def test_tf_function_and_leading_batch_dims():
    block = IResBlock.dense(3, hidden_units=(8,), dtype="float64")
    x = tf.random.normal([2, 4, 3], dtype=tf.float64)

    @tf.function
    def run(x):
        return block.forward_and_log_det(x, seed=[1, 2])

    y, ld = run(x)
    assert y.shape == (2, 4, 3) and ld.shape == (2, 4)
    y2, ld2 = block.forward_and_log_det(x, seed=[1, 2])
    np.testing.assert_allclose(ld.numpy(), ld2.numpy(), rtol=1e-12)
    np.testing.assert_allclose(tf.function(block.inverse)(y).numpy(), x.numpy(), atol=1e-6)


def test_bad_inputs_give_clear_errors():
    class Shrink(keras.layers.Layer):
        def call(self, x):
            return x[..., :1]

    with pytest.raises(ValueError, match="preserve the shape"):
        IResBlock(Shrink()).forward(tf.zeros([2, 3]))
    block = IResBlock.dense(3, hidden_units=(4,))
    with pytest.raises(TypeError, match="floating-point"):
        block.forward(tf.zeros([2, 3], tf.int32))
    with pytest.raises(ValueError, match="rank >= 3"):
        IResBlock.conv((4, 4, 1), hidden_channels=4).forward(tf.zeros([4, 4]))
    with pytest.raises(TypeError, match="dtype='float64'"):
        block.forward(tf.zeros([2, 3], tf.float64))
    with pytest.raises(ValueError, match="logdet must be one of"):
        IResBlock(block.net, logdet="approximate")
    with pytest.raises(ValueError, match="grad_in_forward=True requires"):
        IResBlock(block.net, neumann_grad=False, grad_in_forward=True)
    checked = IResBlock(block.net, validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        checked.forward(tf.constant([[0.0, np.nan, 1.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checked.forward(tf.zeros([1, 3]))


def test_log_prob_never_runs_the_fixed_point_inverse():
    """TransformedDistribution.log_prob maps data -> latent and asks for the
    log-det at the latent point; the bijector must recall x, not invert z."""
    blocks = [IResBlock(dense_net(2, seed=s), inverse_max_iterations=1) for s in (40, 41)]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2, tf.float64)), tfb.Invert(tfb.Chain(blocks))
    )
    x = tf.random.stateless_normal([6, 2], [6, 6], dtype=tf.float64) * 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1-iteration inverse would warn
        lp = dist.log_prob(x)
    assert np.all(np.isfinite(lp.numpy()))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        blocks[0].inverse(x)


def test_inverse_recalls_live_forward_output():
    block = IResBlock.dense(3, hidden_units=(8,), inverse_max_iterations=1)
    x = tf.random.normal([4, 3]) * 3.0
    y = block.forward(x)
    assert block.inverse(y) is x  # recalled, no fixed-point iteration
    with pytest.warns(RuntimeWarning, match="did not converge"):
        block.inverse(tf.identity(y))  # a different tensor is really inverted


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("activation", ["lipswish", "elu", "softplus"])
def test_explicit_jacobian_factors_equal_autodiff_fallback(activation, grad_in_forward):
    """The same weights through the JacobianChain path (Sequential of Lipschitz
    layers) and the generic autodiff path (the same layers in a functional
    model): identical estimates and Neumann gradients, per-example upstream."""
    keras.utils.set_random_seed(11)
    seq = rl.lipschitz_dense_net(3, (16, 16), 0.9, activation, preactivation=True, dtype="float64")
    inp = keras.Input((3,), dtype="float64")
    functional = keras.Model(inp, seq(inp))
    assert rl.JacobianChain.from_net(seq) and rl.JacobianChain.from_net(functional) is None
    x = tf.random.stateless_normal([5, 3], [1, 4], dtype=tf.float64)
    upstream = tf.constant([0.3, -1.0, 2.0, 0.5, 1.0], tf.float64)
    variables = [w.value for w in seq.trainable_weights]
    results = []
    for net in (seq, functional):
        block = IResBlock(net, neumann_grad=True, grad_in_forward=grad_in_forward)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, ld = block.forward_and_log_det(x, seed=[2, 7], training=True)
            loss = tf.reduce_sum(upstream * ld) + tf.reduce_sum(y**3)
        results.append([ld, y] + tape.gradient(loss, [x] + variables))
    for a, b in zip(*results):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_unbiased_estimator_and_neumann_gradient_compile_with_xla():
    """The whole unbiased block (roulette draw, random-length series, Neumann
    gradient) compiles with jit_compile; XLA's stateless RNG differs from
    TF's kernels, so its estimates are checked against exact math directly."""
    net = dense_net(3, seed=21)
    x = tf.random.stateless_normal([2, 3], [7, 7], dtype=tf.float64)
    exact, exact_grads = exact_logdet_and_grads(net, x)
    block = IResBlock(net, n_exact_terms=1, neumann_grad=True)

    @tf.function(jit_compile=True)
    def estimate(x, seed):
        with tf.GradientTape() as tape:
            tape.watch(x)
            ld = block.forward_and_log_det(x, seed=seed, training=True)[1]
            total = tf.reduce_sum(ld)
        return ld, tape.gradient(total, x)

    n = 400
    lds, gxs = map(
        np.stack, zip(*[[t.numpy() for t in estimate(x, tf.constant([i, 1]))] for i in range(n)])
    )
    assert np.all(np.abs(lds.mean(0) - exact) < 4 * lds.std(0) / np.sqrt(n))
    assert np.all(np.abs(gxs.mean(0) - exact_grads[0]) < 4 * gxs.std(0) / np.sqrt(n))
    assert len({tuple(row) for row in np.round(lds, 12)}) > n // 2  # really random


def test_logdet_eval_selects_the_evaluation_estimator():
    # Trained with the biased truncated series, evaluated exactly: training=False
    # calls must give slogdet, training=True calls the truncated series.
    net = dense_net(3, seed=5)
    x = tf.random.stateless_normal([6, 3], [5, 1], dtype=tf.float64)
    exact = IResBlock(net, logdet="exact").forward_and_log_det(x)[1].numpy()
    block = IResBlock(net, logdet="truncated", n_terms=2, logdet_eval="exact")
    np.testing.assert_allclose(block.forward_and_log_det(x)[1].numpy(), exact, rtol=1e-10)
    truncated = IResBlock(net, logdet="truncated", n_terms=2)
    for training in (True, False):  # without logdet_eval both calls are truncated
        np.testing.assert_allclose(
            block.forward_and_log_det(x, seed=[3, 4], training=True)[1].numpy(),
            truncated.forward_and_log_det(x, seed=[3, 4], training=training)[1].numpy(),
            rtol=1e-10,
        )
    assert not np.allclose(
        truncated.forward_and_log_det(x, seed=[3, 4])[1].numpy(), exact, atol=1e-3
    )
    with pytest.raises(ValueError, match="logdet_eval"):
        IResBlock(net, logdet_eval="biased")
