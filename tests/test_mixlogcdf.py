"""MixLogCDFCoupling: exact log-det (brute-force Jacobian), identity at init, coupling
structure, bisection inverse, argument errors, TFP composition."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import assert_log_det_matches, jacobian

from rflow_tf.bijectors.mixlogcdf import MixLogCDFCoupling, coupling_mask

tfb, tfd = tfp.bijectors, tfp.distributions


def _layer(shape, seed=0, **kw):
    """A float64 layer with every weight perturbed (a fresh one is the identity)."""
    kw = {"num_components": 3, "hidden_channels": 8, "num_blocks": 1, "num_heads": 2, **kw}
    layer = MixLogCDFCoupling(shape, dtype=tf.float64, **kw)
    rng = np.random.default_rng(seed)
    for v in layer.trainable_variables:
        v.assign(v + 0.3 * rng.standard_normal(v.shape))
    return layer


_CASES = {
    "vector_attention": ((5,), {}),
    "image_checkerboard_attention": ((4, 4, 2), {}),
    "image_channel_no_attention": ((4, 4, 2), {"mask": "channel", "attention": False}),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_log_det_is_slogdet_of_brute_force_jacobian_with_coupling_structure(case):
    shape, kw = _CASES[case]
    layer = _layer(shape, **kw)
    x = 2.0 * tf.random.stateless_normal((3,) + shape, [1, 2], dtype=tf.float64)
    assert_log_det_matches(layer, x, len(shape), rtol=0, atol=1e-6)
    jac = jacobian(layer.forward, x)
    keep = layer._mask_np.reshape(-1) == 1
    # conditioning part passes through: its rows of J are rows of the identity;
    np.testing.assert_array_equal(jac[:, keep], np.eye(keep.size)[keep][None].repeat(3, 0))
    # transformed part: each element depends on itself (diagonal > 0), on the conditioning
    # part, and on no other transformed element.
    block = jac[:, ~keep][:, :, ~keep]
    assert np.all(np.diagonal(block, axis1=1, axis2=2) > 0)
    np.testing.assert_array_equal(block * (1 - np.eye(block.shape[1])), 0.0)
    assert np.any(np.abs(jac[:, ~keep][:, :, keep]) > 1e-6)


def test_fresh_layer_is_the_identity():
    # zero output convolution => pi uniform, mu = s = a = b = 0 => y = logit(sigmoid(x)) = x
    layer = MixLogCDFCoupling((4, 4, 2), hidden_channels=8, num_blocks=1, num_heads=2)
    x = tf.random.stateless_normal([2, 4, 4, 2], [3, 4])
    np.testing.assert_allclose(layer.forward(x).numpy(), x.numpy(), atol=1e-5)
    np.testing.assert_allclose(layer.forward_log_det_jacobian(x, 3).numpy(), 0.0, atol=1e-4)


@pytest.mark.parametrize("case", ["vector_attention", "image_channel_no_attention"])
def test_bisection_inverse_round_trips_to_stated_tolerance(case):
    shape, kw = _CASES[case]
    tol = 1e-7
    layer = _layer(shape, inverse_atol=tol, inverse_rtol=tol, **kw)
    x = 3.0 * tf.random.stateless_normal((4,) + shape, [5, 6], dtype=tf.float64)
    x_back = layer.inverse(tf.identity(layer.forward(x))).numpy()  # fresh tensor: no memo
    # all elements at once, each within (atol + rtol |x|) / 2 of its root, plus the
    # error of recomputing y: slopes here are >= ~1e-2, so 1e-5 covers both.
    np.testing.assert_allclose(x_back, x.numpy(), rtol=1e-5, atol=1e-5)


def test_attention_switch_and_mask_helpers():
    with_attn = MixLogCDFCoupling((4, 4, 1), hidden_channels=8, num_blocks=1, num_heads=2)
    without = MixLogCDFCoupling((4, 4, 1), hidden_channels=8, num_blocks=1, attention=False)
    assert len(with_attn.trainable_variables) > len(without.trainable_variables)
    assert any("multi_head" in v.path for v in with_attn.net.weights)
    assert not any("multi_head" in v.path for v in without.net.weights)
    m = coupling_mask((3, 3, 2), "checkerboard")
    np.testing.assert_array_equal(m[..., 0], [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(coupling_mask((5,), "half", parity=1), [0, 0, 0, 1, 1])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_components"):
        MixLogCDFCoupling((4,), num_components=0)
    with pytest.raises(ValueError, match="hidden_channels"):
        MixLogCDFCoupling((4,), hidden_channels=0)
    with pytest.raises(ValueError, match="mask mismatch"):
        MixLogCDFCoupling((4, 4, 2), mask=np.ones((4, 4, 1)))
    with pytest.raises(ValueError, match="both"):
        MixLogCDFCoupling((4,), mask=np.ones(4))
    with pytest.raises(ValueError, match="event_shape"):
        MixLogCDFCoupling((4, 4))
    with pytest.raises(ValueError, match="condition="):
        MixLogCDFCoupling((4,), condition_channels=2).forward(tf.zeros([1, 4]))
    with pytest.raises(ValueError, match="event shape"):
        MixLogCDFCoupling((4,)).forward(tf.zeros([1, 5]))


def test_usable_in_chain_transformed_distribution_and_minimize():
    small = {"hidden_channels": 4, "num_blocks": 0}  # the trace of the train step is costly
    flow = tfb.Chain(
        [
            MixLogCDFCoupling((4,), parity=1, name="c1", **small),
            MixLogCDFCoupling((4,), name="c0", **small),
        ]
    )
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(4)), tfb.Invert(flow))
    assert len(dist.trainable_variables) > 0
    x = tf.random.stateless_normal([32, 4], [7, 7]) * 0.5 + 1.0
    losses = tfp.math.minimize(
        lambda: -tf.reduce_mean(dist.log_prob(x)),
        5,
        tf.optimizers.Adam(1e-2),
        trainable_variables=dist.trainable_variables,
    )
    assert losses[-1] < losses[0]
    assert dist.sample(3, seed=[1, 2]).shape == (3, 4)
