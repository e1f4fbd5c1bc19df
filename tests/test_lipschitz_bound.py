"""The Lipschitz bound ||W_eff||_2 <= coeff, measured by SVD of the dense matrix
(for convolutions: of the full zero-padded convolution matrix), never by the
layers' own estimates: adversarial spectra, and every layer of models trained
by tfp.math.minimize, Keras ``fit`` and the trainer of train/main.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rl
from rflow_tf.bijectors import IResBlock
from rflow_tf.layers.lipschitz import plane_wave_start

tfb, tfd = tfp.bijectors, tfp.distributions

#: The guarantee: no layer exceeds its coeff by more than 0.1%.
SLACK = 1e-3


def operator_matrix(layer, kernel=None):
    """The dense matrix of the layer's linear map with ``kernel`` (default:
    the effective kernel the layer uses). Convolutions: columns are the
    images of the basis of the H x W x C_in input."""
    kernel = layer.effective_kernel() if kernel is None else kernel
    kernel = tf.convert_to_tensor(kernel)
    if isinstance(layer, rl.LipschitzDense):
        return kernel.numpy().T
    h, w = layer._input_hw  # pylint: disable=protected-access
    c = kernel.shape[2]
    eye = tf.reshape(tf.eye(h * w * c, dtype=kernel.dtype), [h * w * c, h, w, c])
    out = tf.nn.conv2d(eye, kernel, strides=1, padding="SAME")
    return tf.reshape(out, [h * w * c, -1]).numpy().T


def operator_norm(layer, kernel=None):
    return float(np.linalg.svd(operator_matrix(layer, kernel), compute_uv=False)[0])


def assert_bound_holds(layers):
    assert layers, "no Lipschitz layers to check"
    worst = max(operator_norm(layer) / layer.coeff for layer in layers)
    assert worst <= 1.0 + SLACK, f"an effective operator norm is {worst:.5f} x coeff"


def _dense_with_spectrum(s, d_in, units, seed):
    """A kernel [d_in, units] of W = U diag(s) V^T (W: units x d_in) and U, V."""
    rng = np.random.default_rng(seed)
    k = len(s)
    u, _ = np.linalg.qr(rng.normal(size=(units, k)))
    v, _ = np.linalg.qr(rng.normal(size=(d_in, k)))
    w = (u * np.asarray(s)) @ v.T
    return w.T.astype(np.float32), u.astype(np.float32), v.astype(np.float32)


def _spectrum(kind, n):
    if kind == "near_degenerate":  # top two singular values within 1e-4
        return np.concatenate([[3.0, 3.0 * (1 - 1e-4)], np.linspace(2.9, 0.1, n - 2)])
    if kind == "slow_gap":  # ratio 0.995: sigma moves < 1e-3 per step long before
        return 3.0 * 0.995 ** np.arange(n)  # it is accurate (the old stopping rule's failure)
    return np.concatenate([[3.0], np.full(n - 1, 2.99)])  # a plateau under the top


@pytest.mark.parametrize("kind", ["near_degenerate", "slow_gap", "plateau"])
def test_adversarial_dense_spectra(kind):
    layer = rl.LipschitzDense(24, coeff=0.9)
    layer.build((None, 20))
    kernel, u, v = _dense_with_spectrum(_spectrum(kind, 20), 20, 24, seed=3)
    # Stored vectors: the *last* singular pair, the worst possible warm start.
    layer.u.assign(u[:, -1])
    layer.v.assign(v[:, -1])
    layer.kernel.assign(kernel)
    if kind == "near_degenerate":  # the automatic warm-started re-estimate on use suffices
        assert operator_norm(layer) <= 0.9 * (1 + SLACK)
    layer.converge()  # Gram-iteration restart: any spectrum
    assert operator_norm(layer) <= 0.9 * (1 + SLACK)


def test_stored_vectors_orthogonal_to_the_new_top_direction():
    """The stored (u, v) is an exact singular pair, but not the top one: power
    iteration alone would stay there (2.3-2.6 x coeff)."""
    s = np.concatenate([[2.5], np.linspace(1.0, 0.2, 11)])
    kernel, u, v = _dense_with_spectrum(s, 12, 16, seed=4)
    for fix in ("auto", "converge"):
        layer = rl.LipschitzDense(16, coeff=0.9)
        layer.build((None, 12))
        layer.kernel.assign(kernel)
        layer.u.assign(u[:, 1])
        layer.v.assign(v[:, 1])
        layer.mark_estimate_current()  # as if restored with a bad estimate
        assert operator_norm(layer) > 2.0 * 0.9  # the bad estimate is used as stored
        if fix == "converge":
            layer.converge()
        else:  # any change of the kernel
            layer.kernel.assign(kernel * 1.001)
        assert operator_norm(layer) <= 0.9 * (1 + SLACK), fix


@pytest.mark.parametrize(
    "shape,filters,k,seed", [((4, 4, 4), 16, 3, 0), ((4, 6, 3), 5, 3, 2), ((3, 3, 16), 4, 3, 4)]
)
def test_random_conv_kernels(shape, filters, k, seed):
    layer = rl.LipschitzConv2D(filters, k, coeff=0.98)
    layer.build((None,) + shape)
    rng = np.random.default_rng(seed)
    for scale in (1.0, 5.0, 0.3):
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32) * scale)
        norm = operator_norm(layer)
        raw = operator_norm(layer, layer.kernel)
        assert norm <= 0.98 * (1 + SLACK)
        assert norm >= min(raw, 0.98) * (1 - SLACK)  # and not needlessly small


@pytest.mark.parametrize("c_in,filters", [(1, 3), (3, 1)])
def test_large_maps_are_estimated_accurately(c_in, filters):
    """On a 32 x 32 map the top singular values of a convolution crowd together:
    the estimate (a restart at the plane wave of the kernel's symbol) must still
    agree with the SVD of the whole padded convolution to 1e-4."""
    layer = rl.LipschitzConv2D(filters, 3, coeff=0.98)
    layer.build((None, 32, 32, c_in))
    rng = np.random.default_rng(7)
    for _ in range(3):
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
        sigma = float(layer.converge())
        exact = operator_norm(layer, layer.kernel)
        assert exact * (1 - 1e-4) <= sigma <= exact * (1 + 1e-6)


def test_plane_wave_start():
    """The start vector: unit norm, input-shaped, a function of the kernel only,
    and already close to the top singular vector on a large map (its Rayleigh
    quotient within 0.5% of the exact norm)."""
    layer = rl.LipschitzConv2D(2, 3)
    layer.build((None, 40, 40, 1))
    kernel = tf.constant(np.random.default_rng(3).normal(size=(3, 3, 1, 2)), tf.float32)
    v = plane_wave_start(kernel, (40, 40))
    assert v.shape == (1, 40, 40, 1)
    np.testing.assert_allclose(float(tf.norm(v)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v.numpy(), plane_wave_start(kernel, (40, 40)))
    start = float(tf.norm(layer.apply_kernel(v, kernel)))
    assert start >= 0.995 * operator_norm(layer, kernel)


@pytest.mark.parametrize(
    "make,input_shape",
    [
        (lambda: rl.LipschitzDense(9), (None, 13)),
        (lambda: rl.LipschitzConv2D(6, 1), (None, 4, 4, 5)),
        (lambda: rl.LipschitzConv2D(6, 3), (None, 4, 4, 5)),
        (lambda: rl.LipschitzConv2D(3, 3), (None, 12, 12, 2)),
    ],
)
def test_gram_iteration_bound_is_an_upper_bound(make, input_shape):
    layer = make()
    layer.build(input_shape)
    raw = operator_norm(layer, layer.kernel)
    bound = float(layer.sigma_upper_bound())
    assert bound >= raw * (1 - 1e-5)
    if isinstance(layer, rl.LipschitzDense) or layer.kernel_size == (1, 1):
        assert bound <= raw * (1 + 1e-4)  # tight for a matrix
    # For k x k convolutions it bounds the circular convolution on the
    # (H + k - 1)^2 torus: a few percent above on small inputs.
    assert float(layer.sigma) <= bound * (1 + 1e-5)


def test_converge_lipschitz_on_a_bare_layer_and_a_list():
    layers = []
    for seed in (5, 6):
        layer = rl.LipschitzDense(
            6, coeff=0.9, kernel_initializer=keras.initializers.RandomNormal(stddev=2.0, seed=seed)
        )
        layer.build((None, 6))
        layer.u.assign(tf.ones([6]))
        layer.v.assign(tf.ones([6]))
        layers.append(layer)
    sigmas = rl.converge_lipschitz(layers[0])
    assert len(sigmas) == 1
    np.testing.assert_allclose(
        float(sigmas[0]), operator_norm(layers[0], layers[0].kernel), rtol=SLACK
    )
    assert len(rl.converge_lipschitz(layers)) == 2
    np.testing.assert_allclose(
        float(layers[1].sigma), operator_norm(layers[1], layers[1].kernel), rtol=SLACK
    )
    with pytest.raises(ValueError, match="no Lipschitz layers"):
        rl.converge_lipschitz(keras.layers.Dense(3))


def test_upkeep_in_tf_function_and_unchanged_weights_cost_nothing():
    layer = rl.LipschitzDense(8, coeff=0.5)
    layer.build((None, 8))
    call = tf.function(lambda x: layer(x, training=True))
    x = tf.ones([2, 8])
    call(x)
    u0 = layer.u.numpy().copy()
    call(x)  # unchanged kernel: state untouched
    np.testing.assert_array_equal(layer.u.numpy(), u0)
    assert bool(layer.estimate_is_current())
    layer.kernel.assign(layer.kernel * 4.0 + 0.1)
    call(x)  # changed kernel: re-estimated in the graph
    assert bool(layer.estimate_is_current())
    assert operator_norm(layer) <= 0.5 * (1 + SLACK)


# ---------------------------------------------------------------- trained models


def _two_moons_like(n, seed):
    x = tf.random.stateless_normal([n, 2], [seed, 0]) * [0.5, 2.0] + [1.5, -1.0]
    return tf.concat([x[:, :1], x[:, 1:] + tf.sin(3.0 * x[:, :1])], axis=-1)


def test_readme_recipe_minimize_keeps_the_bound_and_converge_changes_nothing():
    """tfp.math.minimize (no user upkeep): every layer within the bound after
    training, and the README's converge_lipschitz afterwards leaves the
    held-out exact NLL unchanged."""
    keras.utils.set_random_seed(1)
    blocks = [
        IResBlock.dense(2, hidden_units=(32, 32), coeff=0.9, logdet="exact") for _ in range(2)
    ]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(blocks))
    )
    data, held_out = _two_moons_like(256, 1), _two_moons_like(256, 2)
    tfp.math.minimize(
        tf.function(lambda: -tf.reduce_mean(dist.log_prob(data))),
        num_steps=40,
        optimizer=keras.optimizers.Adam(3e-2),
        trainable_variables=dist.trainable_variables,
    )
    layers = rl.lipschitz_layers(dist)
    assert len(layers) == 6
    raw = [operator_norm(layer, layer.kernel) / layer.coeff for layer in layers]
    assert max(raw) > 1.05  # training pushed kernels past the bound: normalisation acts
    nll = float(-tf.reduce_mean(dist.log_prob(held_out)))
    assert_bound_holds(layers)
    rl.converge_lipschitz(dist)
    assert_bound_holds(layers)
    nll_after = float(-tf.reduce_mean(dist.log_prob(held_out)))
    assert abs(nll_after - nll) <= 2e-3 * abs(nll), (nll, nll_after)


def test_trainer_keeps_the_bound(tmp_path):
    from tiny_runs import DEFAULT, tiny_run_args  # pylint: disable=import-outside-toplevel

    from train import main as trainer_main  # pylint: disable=import-outside-toplevel

    args = tiny_run_args(
        tmp_path,
        "--steps=3",
        "--batch_size=8",
        "--eval_examples=8",
        "--lr=0.05",
        "--warmup_steps=1",
        fc_end=DEFAULT,
        log_every=DEFAULT,
    )
    trainer = trainer_main.make_trainer(args)
    trainer.train()
    layers = trainer.model.lipschitz_layers()
    assert all(bool(layer.estimate_is_current()) for layer in layers)
    assert_bound_holds(layers)


def test_keras_fit_without_targets_keeps_the_bound():
    """ResidualFlow.fit on images alone (uint8; loss = bits/dim), no upkeep by the user."""
    from rflow_tf.models import ResidualFlow  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(2)
    flow = ResidualFlow(
        dict(
            input_shape=(4, 4, 1),
            n_blocks=(1,),
            hidden_channels=4,
            n_fc_blocks=1,
            fc_hidden=(8,),
            logit_alpha=1e-6,
        )
    )
    images = tf.cast(tf.random.stateless_uniform([32, 4, 4, 1], [3, 4], 0, 256, tf.int32), tf.uint8)
    with pytest.raises(RuntimeError, match="initialize"):
        flow.fit(tf.data.Dataset.from_tensor_slices(images).batch(8), verbose=0)
    flow.initialize(tf.cast(images, tf.float32) / 256.0 + 1.0 / 512.0)
    flow.compile(optimizer=keras.optimizers.Adam(0.05))
    history = flow.fit(tf.data.Dataset.from_tensor_slices(images).batch(8), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))
    layers = flow.lipschitz_layers()
    assert max(operator_norm(layer, layer.kernel) / layer.coeff for layer in layers) > 1.0
    assert_bound_holds(layers)
    evaluated = flow.evaluate(tf.data.Dataset.from_tensor_slices(images).batch(8), verbose=0)
    assert np.isfinite(evaluated)
    with pytest.raises(NotImplementedError, match="rflow_tf.save"):
        flow.export("unused")


def test_keras_model_holding_a_distribution_sees_its_weights():
    from rflow_tf.models import FlowLayer  # pylint: disable=import-outside-toplevel

    blocks = [IResBlock.dense(2, hidden_units=(8,), coeff=0.9, logdet="exact") for _ in range(2)]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(blocks))
    )

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.flow = FlowLayer(dist)

        def call(self, x):
            return self.flow(x)

    model = Model()
    expected = {id(w.value) for b in blocks for w in b.net.trainable_weights}
    assert {id(w.value) for w in model.trainable_weights} == expected
    x = tf.random.stateless_normal([4, 2], [5, 6])
    np.testing.assert_allclose(model(x).numpy(), dist.log_prob(x).numpy(), rtol=1e-5)
