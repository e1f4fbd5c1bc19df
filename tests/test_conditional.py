"""Conditional IResBlock against exact math: slogdet of the Jacobian in x, its
autodiff gradient (context network included), the inverse, the Lipschitz bound
in x under adversarial contexts, Keras configs and TFP distributions."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import exact_log_det, jacobian

from rflow_tf import layers as rl
from rflow_tf.bijectors import ActNorm, IResBlock, conditional_kwargs

tfb, tfd = tfp.bijectors, tfp.distributions

N_ESTIMATES = 1000
K = 4  # condition size


def conditional_block(dim, seed, coeff=0.95, hidden=16, activation="elu", **kwargs):
    """A conditional dense block g(x; c) = W2 phi(W1 x + b1 + s1(c)) + b2 + s2(c) with
    ||W_i|| = coeff and W2 aligned to W1^T, so that Lip_x(g) can come close to
    coeff^2 (about 0.9) rather than the small value a random product has."""
    keras.utils.set_random_seed(seed)
    block = IResBlock.dense(
        dim,
        hidden_units=(hidden,),
        coeff=coeff,
        activation=activation,
        dtype="float64",
        condition_size=K,
        condition_hidden_units=(32,),
        **kwargs,
    )
    first, second = rl.lipschitz_layers(block.net)
    first.kernel.assign(first.kernel * 5.0)
    second.kernel.assign(tf.transpose(first.kernel))
    rl.converge_lipschitz(block.net, tol=1e-8, max_iterations=1000)
    return block


def contexts(n, seed):
    """n distinct contexts, of clearly different sizes."""
    c = tf.random.stateless_normal([n, K], [seed, 1], dtype=tf.float64)
    return c * tf.constant([0.5, 1.0, 2.0, 3.0][:n] + [1.0] * max(0, n - 4), tf.float64)[:, None]


def like(block, **kwargs):
    """Another block on the same nets (same weights), with other settings."""
    return IResBlock(block.net, condition_net=block.condition_net, **kwargs)


def jacobian_in_x(block, x, c):
    """J_g(x; c) = d(block.forward(x, c) - x)/dx per example, by autodiff (numpy)."""
    return jacobian(lambda t: block.forward(t, conditional_input=c) - t, x)


def test_outputs_depend_on_context_and_exact_logdet_is_slogdet_in_x():
    block = conditional_block(3, seed=1, logdet="exact")
    x = tf.random.stateless_normal([1, 3], [2, 2], dtype=tf.float64)
    x = tf.repeat(x, 4, axis=0)  # one x, four contexts
    c = contexts(4, 3)
    y, ld = block.forward_and_log_det(x, conditional_input=c)
    y = y.numpy()
    assert np.min(np.abs(y[1:] - y[0]).max(axis=1)) > 1e-3  # g depends on c
    exact = exact_log_det(lambda t: block.forward(t, conditional_input=c), x)
    assert np.ptp(exact) > 1e-3  # and so does the Jacobian in x
    np.testing.assert_allclose(ld.numpy(), exact, rtol=1e-9, atol=1e-12)


def test_conv_block_context_broadcast_over_space():
    keras.utils.set_random_seed(4)
    block = IResBlock.conv(
        (3, 3, 2), hidden_channels=4, kernels="3-1-3", dtype="float64", condition_size=K,
        logdet="exact",
    )  # fmt: skip
    x = tf.random.stateless_normal([3, 3, 3, 2], [5, 5], dtype=tf.float64)
    c = contexts(3, 6)
    ld = block.forward_log_det_jacobian(x, 3, conditional_input=c).numpy()
    exact = exact_log_det(lambda t: block.forward(t, conditional_input=c), x)
    np.testing.assert_allclose(ld, exact, rtol=1e-9, atol=1e-12)
    y = block.forward(x, conditional_input=c)
    x_back = block.inverse(tf.identity(y), conditional_input=c)
    np.testing.assert_allclose(x_back.numpy(), x.numpy(), atol=1e-6)
    # One context for the whole batch equals that context repeated.
    one = block.forward(x, conditional_input=c[0]).numpy()
    rep = block.forward(x, conditional_input=tf.repeat(c[:1], 3, axis=0)).numpy()
    np.testing.assert_array_equal(one, rep)


def test_unbiased_logdet_mean_matches_slogdet_for_several_contexts():
    block = conditional_block(3, seed=7, n_exact_terms=2)
    x = tf.random.stateless_normal([4, 3], [8, 8], dtype=tf.float64)
    c = contexts(4, 9)
    norms = [np.linalg.svd(j, compute_uv=False)[0] for j in jacobian_in_x(block, x, c)]
    assert 0.3 < min(norms) and 0.75 < max(norms) < 0.95, norms  # Lip_x up to about 0.9
    exact = exact_log_det(lambda t: block.forward(t, conditional_input=c), x)

    @tf.function
    def estimates(seeds):  # one estimate per seed, in a single graph loop
        return tf.map_fn(
            lambda s: block.forward_and_log_det(x, seed=s, training=True, conditional_input=c)[1],
            seeds,
            fn_output_signature=tf.float64,
        )

    samples = estimates(tf.stack([tf.range(N_ESTIMATES), tf.fill([N_ESTIMATES], 17)], 1)).numpy()
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(N_ESTIMATES)
    assert np.all(np.abs(mean - exact) < 4 * se), (mean, exact, se)
    # The estimate for a context is not the estimate for another context.
    other = exact_log_det(lambda t: block.forward(t, conditional_input=c[::-1]), x)
    assert np.any(np.abs(mean - other) > 8 * se)


def exact_logdet_grads(block, x, c, variables):
    """d/d(x, c, variables) of sum_b log |det(I + J_g(x_b; c_b))| by tf.linalg.slogdet
    of the autodiff Jacobian in x (independent of the block's estimators)."""
    with tf.GradientTape() as outer:
        outer.watch([x, c])
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = block.forward(x, conditional_input=c)
        total = tf.reduce_sum(tf.linalg.slogdet(inner.batch_jacobian(y, x))[1])
    grads = outer.gradient(total, [x, c] + variables)
    return [
        np.zeros(t.shape) if g is None else g.numpy() for g, t in zip(grads, [x, c] + variables)
    ]


def test_neumann_gradient_mean_matches_exact_gradient_including_context_net():
    # (grad_in_forward gives the same gradients: the test after this one.)
    block = conditional_block(3, seed=21, n_exact_terms=2)
    x = tf.random.stateless_normal([3, 3], [7, 7], dtype=tf.float64)
    c = contexts(3, 10)
    variables = list(block.trainable_variables)
    context_vars = {id(w.value) for w in block.condition_net.trainable_weights}
    assert {id(v) for v in variables} >= context_vars and len(context_vars) == 4
    exact = exact_logdet_grads(block, x, c, variables)
    rng = np.random.default_rng(0)
    projections = [rng.normal(size=g.shape) for g in exact]

    def grads(seed):
        with tf.GradientTape() as tape:
            tape.watch([x, c])
            ld = block.forward_and_log_det(x, seed=seed, training=True, conditional_input=c)[1]
            total = tf.reduce_sum(ld)
        gs = tape.gradient(total, [x, c] + variables)
        gs = [tf.zeros_like(t) if g is None else g for g, t in zip(gs, [x, c] + variables)]
        # Each gradient projected on a fixed random direction.
        return tf.stack([tf.reduce_sum(g * p) for g, p in zip(gs, projections)])

    @tf.function
    def projected(seeds):  # one gradient sample per seed, in a single graph loop
        return tf.map_fn(grads, seeds, fn_output_signature=tf.float64)

    samples = projected(tf.stack([tf.range(N_ESTIMATES), tf.fill([N_ESTIMATES], 3)], 1)).numpy()
    checked_context = 0
    for k, (target, proj) in enumerate(zip(exact, projections)):
        est = samples[:, k]
        goal = np.sum(target * proj)
        if np.all(target == 0):  # e.g. the last biases do not enter J
            assert np.allclose(est, 0.0), k
            continue
        se = est.std() / np.sqrt(N_ESTIMATES)
        assert abs(est.mean() - goal) < 4 * se, (k, est.mean(), goal, se)
        checked_context += k >= 2 and id(variables[k - 2]) in context_vars
    assert checked_context == 4  # every context-net weight gets a (correct) gradient


def test_grad_in_forward_equals_recomputed_neumann_gradient():
    block = conditional_block(4, seed=5)
    x = tf.random.stateless_normal([5, 4], [2, 2], dtype=tf.float64)
    c = contexts(5, 11)
    weights = tf.constant([0.1, -1.0, 2.0, 0.3, 0.0], tf.float64)
    results = []
    for gif in (False, True):
        b = like(block, grad_in_forward=gif)
        with tf.GradientTape() as tape:
            tape.watch([x, c])
            y, ld = b.forward_and_log_det(x, seed=[4, 2], training=True, conditional_input=c)
            loss = tf.reduce_sum(weights * ld) + tf.reduce_sum(y**2)
        results.append((ld.numpy(), tape.gradient(loss, [x, c] + list(b.trainable_variables))))
    # The same arithmetic, run by different graphs (the default mode's in a graph
    # function shared by the blocks), may differ in the last bit.
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-14, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_inverse_round_trip_for_several_contexts():
    block = conditional_block(3, seed=12)
    x = tf.random.stateless_normal([4, 2, 3], [3, 3], dtype=tf.float64)  # batch [4, 2]
    c = tf.reshape(contexts(8, 13), [4, 2, K])
    y = block.forward(x, conditional_input=c)
    x_back, residual, ok = block.inverse_with_diagnostics(y, conditional_input=c)
    assert bool(ok) and float(residual) < 1e-5
    np.testing.assert_allclose(x_back.numpy(), x.numpy(), atol=1e-5)
    # Under another context the same y has another preimage, which the inverse finds.
    x_other = block.inverse(y, conditional_input=c[::-1])
    assert np.abs(x_other.numpy() - x.numpy()).max() > 1e-3
    y_again = block.forward(x_other, conditional_input=c[::-1])
    np.testing.assert_allclose(y_again.numpy(), y.numpy(), atol=1e-5)


def adversarial_jacobian_norm(fn, x, c0, steps=60, lr=0.3):
    """max_b ||J_x fn(x_b, c_b)||_2 after gradient ascent on the contexts c (from
    c0), each example's spectral norm of the Jacobian in x being maximised."""
    c = tf.Variable(c0)
    opt = keras.optimizers.Adam(lr)

    def norms():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x, c)
        return tf.linalg.svd(tape.batch_jacobian(y, x), compute_uv=False)[:, 0]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_sum(norms())
        opt.apply_gradients([(tape.gradient(loss, c), c)])

    start = norms().numpy()
    for _ in range(steps):
        step()
    return start, c.value()


def test_lipschitz_in_x_at_most_coeff_for_adversarial_contexts():
    block = conditional_block(3, seed=14, coeff=0.95)
    coeff = 0.95
    x = tf.random.stateless_normal([6, 3], [4, 4], dtype=tf.float64)
    c0 = contexts(6, 15)

    def g(t, c):
        return block.forward(t, conditional_input=c) - t

    start, c_adv = adversarial_jacobian_norm(g, x, c0)
    found = np.array(
        [np.linalg.svd(j, compute_uv=False)[0] for j in jacobian_in_x(block, x, c_adv)]
    )
    assert found.max() > start.max()  # the ascent found harder contexts
    assert found.max() > 0.8 * coeff**2, found  # ... close to the product bound
    assert found.max() <= coeff**2 * (1 + 1e-6), found  # and the bound holds: Lip_x <= coeff

    # The same search exposes a conditioning that scales g by a function of c,
    # which no Lipschitz constraint in x can bound.
    def scaled(t, c):
        return (1.0 + tf.reduce_sum(c**2, axis=1, keepdims=True)) * g(t, c)

    _, c_bad = adversarial_jacobian_norm(scaled, x, c0, steps=30)
    jac = jacobian(lambda t: scaled(t, c_bad), x)
    assert max(np.linalg.svd(j, compute_uv=False)[0] for j in jac) > 1.0


def test_get_config_round_trip_gives_the_same_block():
    block = conditional_block(3, seed=16, logdet="exact")
    x = tf.random.stateless_normal([4, 3], [6, 6], dtype=tf.float64)
    c = contexts(4, 17)
    nets = []
    for model in (block.net, block.condition_net):
        clone = keras.Sequential.from_config(model.get_config())
        clone.set_weights(model.get_weights())
        nets.append(clone)
        assert clone.get_config() == model.get_config()
    rebuilt = IResBlock(nets[0], condition_net=nets[1], logdet="exact")
    assert rebuilt.condition_size == K
    for a, b in zip(
        block.forward_and_log_det(x, conditional_input=c),
        rebuilt.forward_and_log_det(x, conditional_input=c),
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


def test_transformed_distribution_log_prob_and_sample():
    keras.utils.set_random_seed(18)
    dim = 2
    act = ActNorm((dim,), dtype="float64")
    act.initialize(tf.random.stateless_normal([32, dim], [1, 9], dtype=tf.float64) * 3.0)
    blocks = [
        IResBlock.dense(dim, (16,), dtype="float64", condition_size=K, logdet="exact")
        for _ in range(2)
    ]
    flow = tfb.Chain([blocks[1], act, blocks[0]])
    base = tfd.MultivariateNormalDiag(tf.zeros(dim, tf.float64))
    dist = tfd.TransformedDistribution(base, tfb.Invert(flow))
    x = tf.random.stateless_normal([5, dim], [2, 9], dtype=tf.float64)
    c = contexts(5, 19)
    kwargs = conditional_kwargs(dist, c)
    assert sorted(kwargs) == sorted(b.name for b in blocks)  # ActNorm gets nothing
    lp = dist.log_prob(x, bijector_kwargs=kwargs).numpy()

    def forward(t):
        return flow.forward(t, **conditional_kwargs(flow, c))

    expected = base.log_prob(forward(x)).numpy() + exact_log_det(forward, x)
    np.testing.assert_allclose(lp, expected, rtol=1e-9)
    other = dist.log_prob(x, bijector_kwargs=conditional_kwargs(dist, c[::-1])).numpy()
    assert np.abs(other - lp).max() > 1e-3

    # A single block with TFP's own keyword, and samples given one context.
    single = tfd.TransformedDistribution(base, tfb.Invert(blocks[0]))
    lp1 = single.log_prob(x, bijector_kwargs={"conditional_input": c})
    z = blocks[0].forward(x, conditional_input=c)
    np.testing.assert_allclose(
        lp1.numpy(),
        base.log_prob(z).numpy()
        + exact_log_det(lambda t: blocks[0].forward(t, conditional_input=c), x),
        rtol=1e-9,
    )
    xs = dist.sample(7, seed=[3, 4], bijector_kwargs=conditional_kwargs(dist, c[0]))
    assert xs.shape == [7, dim] and np.isfinite(xs.numpy()).all()
    # Samples map back to base draws: their log-prob is finite and matches the formula.
    lp_s = dist.log_prob(xs, bijector_kwargs=conditional_kwargs(dist, c[0])).numpy()
    fwd = lambda t: flow.forward(t, **conditional_kwargs(flow, c[0]))  # noqa: E731
    np.testing.assert_allclose(
        lp_s, base.log_prob(fwd(xs)).numpy() + exact_log_det(fwd, xs), rtol=1e-9
    )


def test_inverse_memo_is_not_reused_under_another_context():
    block = conditional_block(2, seed=20)
    x = tf.random.stateless_normal([3, 2], [1, 1], dtype=tf.float64)
    c = contexts(3, 21)
    y = block.forward(x, conditional_input=c)
    np.testing.assert_array_equal(block.inverse(y, conditional_input=c).numpy(), x.numpy())
    x_other = block.inverse(y, conditional_input=c + 1.0)
    assert np.abs(x_other.numpy() - x.numpy()).max() > 1e-3
    np.testing.assert_allclose(
        block.forward(x_other, conditional_input=c + 1.0).numpy(), y.numpy(), atol=1e-5
    )


def test_bad_inputs_give_clear_errors():
    block = conditional_block(2, seed=22)
    x = tf.zeros([3, 2], tf.float64)
    with pytest.raises(ValueError, match="needs conditional_input"):
        block.forward(x)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
        block.forward(x, conditional_input=tf.zeros([3, 2], tf.float64))
    with pytest.raises(ValueError, match="must broadcast to the batch shape"):
        block.forward_log_det_jacobian(x, 1, conditional_input=tf.zeros([2, K], tf.float64))
    with pytest.raises(TypeError, match="floating-point"):
        block.inverse(x, conditional_input=tf.zeros([3, K], tf.int32))
    plain = IResBlock.dense(2, (8,), dtype="float64")
    assert plain.condition_size is None and plain.condition_net is None
    with pytest.raises(ValueError, match="unconditional"):
        plain.forward(x, conditional_input=tf.zeros([3, K], tf.float64))
    with pytest.raises(ValueError, match="no conditional residual block"):
        conditional_kwargs(tfb.Chain([plain]), tf.zeros([K]))
    with pytest.raises(ValueError, match="sum\\(shift_sizes\\)"):
        IResBlock(block.net, condition_net=rl.context_shift_net(K, 5, dtype="float64"))
    generic = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Lipschitz layers"):
        IResBlock(generic, condition_net=rl.context_shift_net(K, 2))


def test_linear_gaussian_example_reaches_the_analytic_posterior():
    """The example's q(theta | x), at a small budget, is within 0.05 nats per pair
    of the analytic posterior N(x / 2, 0.05 I) on held-out pairs."""
    from examples.conditional_inference import main

    result = main(
        ["linear", "--dim", "5", "--steps", "200", "--train", "4000", "--test", "3000",
         "--blocks", "1", "--hidden", "32"]
    )  # fmt: skip
    assert result["gap"] <= 0.05, result
    assert result["gap"] > -4 * result["gap_se"], result  # KL >= 0 up to noise
    # The analytic NLL is the closed form's: d/2 (log(2 pi 0.05) + 1) on average.
    assert abs(result["nll_posterior"] - 2.5 * (np.log(2 * np.pi * 0.05) + 1)) < 0.1
