"""Affine coupling bijectors (rflow_tf.bijectors.coupling) against brute-force Jacobians."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import exact_log_det

from rflow_tf.bijectors import coupling

tfb, tfd = tfp.bijectors, tfp.distributions

CASES = [
    ((4, 4, 2), "checkerboard0", "conv"),
    ((4, 4, 2), "checkerboard1", "conv"),
    ((2, 2, 4), "channel0", "conv"),
    ((2, 2, 4), "channel1", "conv"),
    ((2, 2, 4), "channel1", "dense"),
    ((6,), "channel0", "dense"),
]


def _block(shape, mask, kind):
    if kind == "conv":
        return coupling.AffineCoupling.conv(shape, mask, hidden_channels=8, dtype="float64")
    return coupling.AffineCoupling.dense(shape, mask, hidden_units=(16,), dtype="float64")


def _kept(x, shape, mask):
    """The part of x [B, *shape] a mask keeps, by the reference's definition."""
    if mask.startswith("checkerboard"):
        i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        keep = ((i + j) % 2 == int(mask[-1]))[..., None]  # [[1, 0], [0, 1]] tile for "0"
        return np.where(keep, x, 0.0)
    half = shape[-1] // 2
    return x[..., :half] if mask == "channel0" else x[..., half:]


@pytest.mark.parametrize("shape,mask,kind", CASES)
def test_log_det_is_the_jacobian_and_inverse_round_trips(shape, mask, kind):
    block = _block(shape, mask, kind)
    x = tf.random.stateless_normal((3,) + shape, [1, 2], dtype=tf.float64)
    sign, exact = exact_log_det(lambda t: block.forward_and_log_det(t)[0], x, with_sign=True)
    y, ld = block.forward_and_log_det(x)
    np.testing.assert_allclose(ld, exact, atol=1e-12)
    assert np.all(sign == 1.0)  # scales are positive
    assert np.all(ld.numpy() < 0)  # sigmoid scales are < 1
    np.testing.assert_allclose(block.forward_log_det_jacobian(x, len(shape)), ld, atol=1e-12)
    np.testing.assert_allclose(
        block.inverse_log_det_jacobian(tf.identity(y), len(shape)), -ld, atol=1e-12
    )
    # tf.identity: a fresh tensor, so the inverse really runs (no memo of forward).
    np.testing.assert_allclose(block.inverse(tf.identity(y)), x, atol=1e-12)
    np.testing.assert_array_equal(_kept(y.numpy(), shape, mask), _kept(x.numpy(), shape, mask))
    assert np.abs(y - x).max() > 1e-2  # the other half does change


def test_trains_inside_a_transformed_distribution():
    blocks = [
        coupling.AffineCoupling.conv((4, 4, 1), m, hidden_channels=4)
        for m in coupling.alternating_masks("checkerboard", 2)
    ]
    dist = tfd.TransformedDistribution(
        tfd.Independent(tfd.Normal(tf.zeros([4, 4, 1]), 1.0), 3),
        tfb.Invert(tfb.Chain(blocks[::-1])),
    )
    variables = dist.trainable_variables
    assert len(variables) == 2 * 3 * 2  # 2 blocks x 3 convs x (kernel, bias)
    x = tf.random.stateless_uniform([5, 4, 4, 1], [0, 3])
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(dist.log_prob(x))
    grads = tape.gradient(loss, variables)
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
    z, ld = blocks[0].forward_and_log_det(x)
    z, ld2 = blocks[1].forward_and_log_det(z)
    normal = tfd.Independent(tfd.Normal(tf.zeros([4, 4, 1]), 1.0), 3)
    np.testing.assert_allclose(dist.log_prob(x), normal.log_prob(z) + ld + ld2, rtol=1e-5)


def test_masks_and_nets_follow_the_reference():
    np.testing.assert_array_equal(coupling.checkerboard_mask(2, 3)[..., 0], [[1, 0, 1], [0, 1, 0]])
    assert coupling.alternating_masks("channel", 3) == ["channel0", "channel1", "channel0"]
    assert coupling.alternating_masks("checkerboard", 2, first=1) == [
        "checkerboard1",
        "checkerboard0",
    ]
    net = coupling.coupling_conv_net((8, 8, 2), 4, hidden_channels=6, preactivation=False)
    convs = [
        layer
        for layer in net.layers
        if isinstance(layer, keras.layers.Layer) and "conv" in layer.name
    ]
    assert [c.kernel.shape for c in convs] == [(3, 3, 2, 6), (1, 1, 6, 6), (3, 3, 6, 4)]
    # PyTorch's default init: |w| <= 1/sqrt(fan_in).
    assert np.abs(convs[0].kernel.numpy()).max() <= 1 / np.sqrt(18) + 1e-7
    dense = coupling.coupling_dense_net((2, 2, 2), (2, 2, 4))
    assert dense(tf.zeros([3, 2, 2, 2])).shape == (3, 2, 2, 4)


def test_bad_arguments_fail_early_with_clear_messages():
    with pytest.raises(ValueError, match="mask must be one of"):
        coupling.AffineCoupling.conv((4, 4, 2), "diagonal0")
    with pytest.raises(ValueError, match="even last dimension"):
        coupling.AffineCoupling.conv((4, 4, 3), "channel0")
    with pytest.raises(ValueError, match="image event shape"):
        coupling.AffineCoupling(keras.layers.Dense(8), (4,), "checkerboard0")
    with pytest.raises(ValueError, match="needs output shape"):
        coupling.AffineCoupling(coupling.coupling_conv_net((4, 4, 1), 1, 4), (4, 4, 2), "channel0")
    with pytest.raises(ValueError, match="dense couplings split channels"):
        coupling.AffineCoupling.dense((4, 4, 2), "checkerboard0")
    with pytest.raises(ValueError, match="kernels"):
        coupling.coupling_conv_net((4, 4, 2), 4, kernels="3-2")
    block = coupling.AffineCoupling.conv((4, 4, 2), "channel0", hidden_channels=4)
    with pytest.raises(ValueError, match="event shape"):
        block.forward(tf.zeros([1, 4, 4, 3]))
