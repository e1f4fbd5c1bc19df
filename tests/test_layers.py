"""Lipschitz layers: the bound is checked independently of the layers' own estimates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from rflow_tf import layers as rl


@pytest.mark.parametrize("beta", [-20.0, -3.0, 0.0, 0.5, 3.0, 20.0])
def test_lipswish_derivative_bounded(beta):
    act = rl.LipSwish(beta_initializer=beta)
    x = tf.linspace(-50.0, 50.0, 20001)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = act(x)
    d = tape.gradient(y, x).numpy()
    assert np.all(np.abs(d) <= 1.0 + 1e-6)
    # and the bound is nearly tight for large beta: it is not a trivially small function
    if beta >= 3.0:
        assert np.max(np.abs(d)) > 0.95


def test_lipswish_matches_formula():
    act = rl.LipSwish()
    x = tf.constant([-2.0, 0.1, 3.0])
    b = np.log1p(np.exp(0.5))
    expect = x.numpy() / (1 + np.exp(-b * x.numpy())) / 1.1
    np.testing.assert_allclose(act(x).numpy(), expect, rtol=1e-6)


def _big_init(seed):
    return keras.initializers.RandomNormal(stddev=2.0, seed=seed)


@pytest.mark.parametrize("shape", [(5, 7), (16, 3), (4, 4)])
def test_dense_spectral_norm_bound(shape):
    layer = rl.LipschitzDense(shape[1], coeff=0.9, kernel_initializer=_big_init(1))
    layer.build((None, shape[0]))
    layer.converge(tol=1e-6, max_iterations=500)
    w_eff = layer.effective_kernel().numpy()
    sigma_true = np.linalg.svd(w_eff, compute_uv=False)[0]
    assert sigma_true <= 0.9 * (1 + 1e-3)
    # the kernel is far above the bound, so normalisation must bring it to the bound
    assert sigma_true >= 0.9 * (1 - 1e-2)
    np.testing.assert_allclose(
        float(layer.sigma), np.linalg.svd(layer.kernel.numpy(), compute_uv=False)[0], rtol=1e-3
    )


def _conv_matrix(layer, h, w, c):
    """Full matrix of x -> conv(x, W_eff) on an h x w x c input (columns = basis images)."""
    kernel = layer.effective_kernel()
    eye = tf.reshape(tf.eye(h * w * c), [h * w * c, h, w, c])
    out = tf.nn.conv2d(eye, kernel, strides=1, padding="SAME")
    return tf.reshape(out, [h * w * c, -1]).numpy().T


@pytest.mark.parametrize("kernel_size,hw", [(3, (5, 5)), (1, (4, 4)), (3, (4, 6))])
def test_conv_operator_norm_bound(kernel_size, hw):
    h, w = hw
    c_in, c_out = 2, 3
    layer = rl.LipschitzConv2D(c_out, kernel_size, coeff=0.98, kernel_initializer=_big_init(2))
    layer.build((None, h, w, c_in))
    layer.converge(tol=1e-7, max_iterations=1000)
    mat = _conv_matrix(layer, h, w, c_in)
    sigma_true = np.linalg.svd(mat, compute_uv=False)[0]
    assert sigma_true <= 0.98 * (1 + 1e-3)
    assert sigma_true >= 0.98 * (1 - 2e-2)


@pytest.mark.parametrize("where", ["eager", "function", "vectorized_map"])
def test_built_layer_is_estimated_at_its_first_use(where):
    # Building runs no power iteration; the first use, wherever it happens,
    # normalises by a converged sigma (the bound holds from the first output).
    h, w, c_in = 4, 5, 2
    layer = rl.LipschitzConv2D(3, 3, coeff=0.9, kernel_initializer=_big_init(4))
    layer.build((None, h, w, c_in))
    assert float(layer.sigma) == 0.0 and not bool(layer.estimate_is_current())
    x = tf.random.stateless_normal([2, h, w, c_in], seed=[1, 2])
    if where == "eager":
        layer(x)
    elif where == "function":
        tf.function(lambda t: layer(t))(x)
    else:
        tf.vectorized_map(lambda t: layer(t[None])[0], x)
    assert bool(layer.estimate_is_current())
    mat = _conv_matrix(layer, h, w, c_in)
    sigma_true = np.linalg.svd(mat, compute_uv=False)[0]
    assert 0.9 * (1 - 1e-2) <= sigma_true <= 0.9 * (1 + 1e-3)
    if where == "eager":  # that first estimate was converge()'s: converging again keeps it
        v = layer.v.numpy()
        layer.v.assign(v * 0.5)
        layer.converge()
        np.testing.assert_array_equal(layer.v.numpy(), v * 0.5)


def test_converge_again_keeps_the_estimate_until_the_kernel_changes():
    layer = rl.LipschitzDense(4, coeff=0.9, kernel_initializer=_big_init(5))
    layer.build((None, 6))
    sigma = float(layer.converge())
    np.testing.assert_allclose(sigma, np.linalg.norm(layer.kernel.numpy(), 2), rtol=1e-4)
    u = layer.u.numpy()
    layer.u.assign(u * 0.5)  # a repeated converge() would overwrite this: it must not run
    assert float(layer.converge()) == sigma
    np.testing.assert_array_equal(layer.u.numpy(), u * 0.5)
    # ... in a graph too
    assert float(tf.function(layer.converge)()) == sigma
    np.testing.assert_array_equal(layer.u.numpy(), u * 0.5)
    # A tighter tolerance than the layer's runs again.
    layer.converge(tol=1e-7)
    np.testing.assert_allclose(np.abs(layer.u.numpy()), np.abs(u), atol=1e-4)
    # A new kernel is converged again; after an in-call (warm-start) estimate,
    # converge() runs its restart again too.
    layer.u.assign(u * 0.5)
    layer.kernel.assign(layer.kernel * 2.0)
    np.testing.assert_allclose(float(layer.converge()), 2 * sigma, rtol=1e-4)
    layer.kernel.assign(layer.kernel * 1.01)
    layer(tf.ones([1, 6]))
    assert bool(layer.estimate_is_current())
    layer.u.assign(u * 0.5)
    layer.converge()
    np.testing.assert_allclose(np.abs(layer.u.numpy()), np.abs(u), atol=1e-4)


def test_conv_norm_is_not_reshaped_kernel_norm():
    """The padded-convolution operator norm differs from the reshaped kernel's norm."""
    layer = rl.LipschitzConv2D(2, 3, coeff=100.0, kernel_initializer=_big_init(3))
    layer.build((None, 4, 4, 2))
    layer.converge(tol=1e-7, max_iterations=1000)
    mat = _conv_matrix(layer, 4, 4, 2)  # coeff is large, so W_eff = W
    sigma_true = np.linalg.svd(mat, compute_uv=False)[0]
    np.testing.assert_allclose(float(layer.sigma), sigma_true, rtol=1e-3)
    kernel_matrix_norm = np.linalg.svd(layer.kernel.numpy().reshape(-1, 2), compute_uv=False)[0]
    assert abs(kernel_matrix_norm - sigma_true) / sigma_true > 1e-2


def test_gradient_flows_through_sigma():
    # float64: a central difference of a float32 sum of squares is mostly rounding.
    layer = rl.LipschitzDense(3, coeff=0.5, kernel_initializer=_big_init(4), dtype="float64")
    layer.build((None, 3))
    x = tf.random.stateless_normal([4, 3], [7, 8], dtype=tf.float64)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(layer(x) ** 2)
    grad = tape.gradient(y, layer.kernel.value)
    # Finite difference through the normalised weight (u, v fixed as in the layer).
    eps, k0 = 1e-3, layer.kernel.numpy()
    d = np.zeros_like(k0)
    d[0, 0] = eps
    layer.kernel.assign(k0 + d)
    y_plus = float(tf.reduce_sum(layer(x) ** 2))
    layer.kernel.assign(k0 - d)
    y_minus = float(tf.reduce_sum(layer(x) ** 2))
    np.testing.assert_allclose(grad.numpy()[0, 0], (y_plus - y_minus) / (2 * eps), rtol=1e-4)


def test_power_iterations_in_training_call():
    layer = rl.LipschitzDense(4, coeff=0.9, power_iterations=3, kernel_initializer=_big_init(5))
    layer.build((None, 4))
    layer.kernel.assign(layer.kernel * 3.0)  # u, v and sigma are now stale
    stale = float(layer.sigma)
    layer(tf.zeros([1, 4]), training=True)
    assert float(layer.sigma) > 2.5 * stale


@pytest.mark.parametrize(
    "make",
    [
        lambda: rl.LipSwish(beta_initializer=0.3),
        lambda: rl.LipschitzDense(5, coeff=0.7, use_bias=False, power_iterations=2, tol=1e-4),
        lambda: rl.LipschitzConv2D(4, 3, coeff=0.95, max_iterations=50),
        lambda: rl.ActNormalization(),
        lambda: rl.ActNormalization(variance="biased"),
        lambda: rl.LipschitzDense(
            5, kernel_initializer=rl.FanInUniform(0.1), bias_initializer=rl.FanInUniform()
        ),
    ],
)
def test_get_config_round_trip(make):
    layer = make()
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_nets_round_trip_and_bound():
    net = rl.lipschitz_conv_net((6, 6, 2), hidden_channels=8, kernels="3-1-3", coeff=0.9)
    clone = keras.Sequential.from_config(net.get_config())
    assert [type(lay).__name__ for lay in clone.layers] == [
        type(lay).__name__ for lay in net.layers
    ]
    assert len(rl.lipschitz_layers(net)) == 3
    sigmas = rl.converge_lipschitz(net)
    assert len(sigmas) == 3
    dense = rl.lipschitz_dense_net(3, (8, 8), coeff=0.9, activation="elu")
    assert dense(tf.zeros([2, 3])).shape == (2, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        rl.lipschitz_dense_net(3, (8,), activation="tanh-ish")


def test_conv_needs_static_spatial_size():
    layer = rl.LipschitzConv2D(2, 3)
    with pytest.raises(ValueError, match="static input height"):
        layer.build((None, None, None, 3))


@pytest.mark.parametrize("variance, ddof", [("unbiased", 1), ("biased", 0)])
def test_actnorm_data_dependent_init(variance, ddof):
    an = rl.ActNormalization(variance=variance)
    x = tf.random.normal([4, 2, 2, 3], seed=1) * 3.0 + 2.0  # n = 16: ddof matters (3%)
    an.initialize(x)
    y = an(x).numpy().reshape(-1, 3)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=0, ddof=ddof), 1.0, rtol=1e-5)
    assert not np.allclose(y.std(axis=0, ddof=1 - ddof), 1.0, rtol=1e-2)
    with pytest.raises(ValueError, match="variance"):
        rl.ActNormalization(variance="population")
    before = an.bias.numpy().copy()
    an.initialize(x * 10.0)  # second call is a no-op
    np.testing.assert_array_equal(an.bias.numpy(), before)
    np.testing.assert_allclose(an.inverse(an(x)).numpy(), x.numpy(), atol=1e-5)


def _autodiff_vjp_jvp(net, x, u, v):
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = net(x)
    return y, tape.gradient(y, x, output_gradients=u), acc.jvp(y)


@pytest.mark.parametrize("activation", ["lipswish", "elu", "softplus", "relu", "identity"])
@pytest.mark.parametrize("kind", ["dense", "dense_preact", "conv"])
def test_jacobian_chain_matches_autodiff(activation, kind):
    keras.utils.set_random_seed(3)
    if kind == "conv":
        net = rl.lipschitz_conv_net((5, 5, 2), 6, "3-1-3", activation=activation, dtype="float64")
        shape = (3, 5, 5, 2)
    else:
        net = rl.lipschitz_dense_net(
            3, (8, 8), activation=activation, preactivation=kind == "dense_preact", dtype="float64"
        )
        shape = (4, 3)
    for layer in net.layers:  # a LipSwish beta away from its initial value
        if isinstance(layer, rl.LipSwish):
            layer.beta.assign(1.7)
    x, u, v = (tf.random.stateless_normal(shape, [i, 1], dtype=tf.float64) for i in range(3))
    chain = rl.JacobianChain.from_net(net)
    assert chain is not None
    y, vjp, jvp = _autodiff_vjp_jvp(net, x, u, v)
    gx, lin = chain.linearize(x)
    np.testing.assert_allclose(gx.numpy(), y.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lin.vjp(u).numpy(), vjp.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lin.jvp(v).numpy(), jvp.numpy(), rtol=1e-10, atol=1e-12)


def test_jacobian_chain_only_for_known_structure():
    inp = keras.Input((3,))
    functional = keras.Model(inp, rl.LipschitzDense(3)(inp))
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    assert rl.JacobianChain.from_net(functional) is None
    assert rl.JacobianChain.from_net(plain) is None
    assert rl.JacobianChain.from_net(rl.lipschitz_dense_net(3, (4,))) is not None


@pytest.mark.parametrize("with_derivative_grad", [True, False])
def test_fused_lipswish_gradients_match_autodiff(with_derivative_grad):
    """The closed-form backward pass of lipswish_value_and_derivative (x and beta)
    against autodiff of the plain formulas y = x s, d = s + b x s (1 - s)."""
    x = tf.random.stateless_normal([4, 5, 3], [1, 2], dtype=tf.float64) * 3.0
    beta = tf.constant(0.8, tf.float64)
    gy, gd = (tf.random.stateless_normal(x.shape, [i, 3], dtype=tf.float64) for i in range(2))

    def plain(x, beta):
        b = tf.nn.softplus(beta)
        s = tf.sigmoid(b * x)
        return x * s, s + b * x * s * (1.0 - s)

    results = []
    for fn in (rl.lipswish_value_and_derivative, plain):
        with tf.GradientTape() as tape:
            tape.watch([x, beta])
            y, d = fn(x, beta)
            total = tf.reduce_sum(gy * y) + (tf.reduce_sum(gd * d) if with_derivative_grad else 0.0)
        results.append([y, d] + tape.gradient(total, [x, beta]))
    for a, b in zip(*results):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    act = rl.LipSwish(beta_initializer=0.8, dtype="float64")
    phi = act(x)
    y, d, c = act.value_and_derivative(x)
    np.testing.assert_allclose((c * y).numpy(), phi.numpy(), rtol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_reference_init_is_uniform_in_one_over_sqrt_fan_in(kind):
    # PyTorch's default (the reference's): kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    # fan_in = d_in (dense) or kh * kw * c_in (conv). Checked by the range (the max
    # of >= 300 uniform draws lies within 2% of the bound with probability
    # > 1 - 1e-2) and the standard deviation bound/sqrt(3) (within 4 standard errors).
    keras.utils.set_random_seed(3)
    init = {"kernel_initializer": rl.FanInUniform(), "bias_initializer": rl.FanInUniform()}
    if kind == "dense":
        layer, fan_in = rl.LipschitzDense(400, **init), 24
        layer.build((None, 24))
    else:
        layer, fan_in = rl.LipschitzConv2D(300, 3, **init), 3 * 3 * 8
        layer.build((None, 4, 4, 8))
    bound = 1.0 / np.sqrt(fan_in)
    for w in (layer.kernel.numpy().ravel(), layer.bias.numpy()):
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.98 * bound
        se = bound / np.sqrt(3) * np.sqrt(0.8 / w.size)  # sd of the sample sd of U
        assert abs(w.std() - bound / np.sqrt(3)) < 4 * se + 1e-12
    with pytest.raises(ValueError, match="fan_in"):
        rl.FanInUniform()((5,))


def test_dense_net_init_options():
    keras.utils.set_random_seed(4)
    net = rl.lipschitz_dense_net(2, (64, 64), preactivation=True, last_layer_scale=1e-3)
    assert isinstance(net.layers[0], rl.LipSwish)  # pre-activated input
    dense = rl.lipschitz_layers(net)
    last = dense[-1]
    assert np.abs(last.kernel.numpy()).max() <= 1e-3 / np.sqrt(64)
    assert np.abs(last.bias.numpy()).max() > 1e-2  # bias range is not scaled
    assert np.abs(dense[0].kernel.numpy()).max() > 0.5  # U(+-1/sqrt(2)) otherwise
    glorot = rl.lipschitz_dense_net(2, (64, 64), init="glorot")
    assert all(np.all(lay.bias.numpy() == 0) for lay in rl.lipschitz_layers(glorot))
    with pytest.raises(ValueError, match="init must be one of"):
        rl.lipschitz_dense_net(2, (8,), init="he")
