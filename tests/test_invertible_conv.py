"""Invertible 1x1 convolution (rflow_tf.bijectors.invertible_conv) against brute-force Jacobians."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_log_det_matches

from rflow_tf.bijectors.invertible_conv import Invertible1x1Conv, Invertible1x1Weights


def _perturbed(shape, parameterization, init):
    conv = Invertible1x1Conv(shape, parameterization, init, seed=3, dtype="float64")
    for i, v in enumerate(conv.trainable_variables):  # move away from log|det| = 0
        v.assign(v + 0.3 * tf.random.stateless_normal(v.shape, [1, i], dtype=v.dtype))
    return conv


@pytest.mark.parametrize(
    "parameterization,init,shape",
    list(itertools.product(["lu", "matrix"], ["permutation", "orthogonal"], [(2, 3, 4), (5,)])),
)
def test_log_det_is_the_jacobian_and_inverse_round_trips(parameterization, init, shape):
    conv = _perturbed(shape, parameterization, init)
    x = tf.random.stateless_normal((3,) + shape, [4, 2], dtype=tf.float64)
    ld, exact = assert_log_det_matches(conv, x, len(shape), atol=1e-10)
    y = conv.forward(x)
    assert np.abs(exact).min() > 1e-2  # a non-trivial log-det
    # tf.identity: a fresh tensor, so the inverse really runs (no memo of forward).
    np.testing.assert_allclose(conv.inverse(tf.identity(y)), x, atol=1e-12)
    np.testing.assert_allclose(
        conv.inverse_log_det_jacobian(tf.identity(y), len(shape)), -ld, atol=1e-10
    )


@pytest.mark.parametrize("parameterization", ["lu", "matrix"])
def test_initial_weights_and_log_det_gradient(parameterization):
    layer = Invertible1x1Weights(parameterization, "permutation", seed=0, dtype="float64")
    layer.build((None, 6))
    w = layer.kernel().numpy()
    np.testing.assert_array_equal(np.sort(w, axis=None), [0.0] * 30 + [1.0] * 6)
    np.testing.assert_array_equal(w.sum(0), np.ones(6))  # a permutation matrix
    assert float(layer.log_abs_det()) == 0.0
    # d log|det W| / d theta through the parameterisation equals that of slogdet(W).
    conv = _perturbed((6,), parameterization, "orthogonal")
    variables = conv.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        mine = conv.layer.log_abs_det()
        reference = tf.linalg.slogdet(conv.layer.kernel())[1]
    for v, g, h in zip(
        variables, tape.gradient(mine, variables), tape.gradient(reference, variables)
    ):
        # "lu": log|det W| = sum(log_s) does not depend on lower/upper (None = 0).
        np.testing.assert_allclose(np.zeros(v.shape) if g is None else g, h, atol=1e-10)
    np.testing.assert_allclose(mine, reference, atol=1e-12)


@pytest.mark.parametrize("parameterization", ["lu", "matrix"])
def test_compiles_with_xla(parameterization):
    conv = Invertible1x1Conv((2, 2, 4), parameterization, "orthogonal", seed=1)
    x = tf.random.stateless_normal([2, 2, 2, 4], [0, 0])

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(conv.forward(x)) - tf.reduce_sum(
                conv.forward_log_det_jacobian(x, 3)
            )
        return tape.gradient(loss, conv.trainable_variables)

    assert all(np.all(np.isfinite(g)) for g in step(x))


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="parameterization"):
        Invertible1x1Conv((4, 4, 3), parameterization="qr")
    with pytest.raises(ValueError, match="init"):
        Invertible1x1Conv((4, 4, 3), init="identity")
    with pytest.raises(ValueError, match="event_shape"):
        Invertible1x1Conv(())
    with pytest.raises(ValueError, match="event shape"):
        Invertible1x1Conv((4, 4, 3)).forward(tf.zeros([1, 4, 4, 2]))
