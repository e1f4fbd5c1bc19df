"""Classifier heads, hybrid loss and ChannelNormalize (rflow_tf.classifier) by hand."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_log_det_matches

from rflow_tf import classifier


def _conv3x3_same(h, kernel, bias):
    """Hand-written 3x3 'same' convolution: h [B, H, W, C], kernel [3, 3, C, K]."""
    b, height, width, _ = h.shape
    padded = np.pad(h, [(0, 0), (1, 1), (1, 1), (0, 0)])
    out = np.zeros((b, height, width, kernel.shape[-1]))
    for i in range(height):
        for j in range(width):
            patch = padded[:, i : i + 3, j : j + 3, :]  # [B, 3, 3, C]
            out[:, i, j] = np.einsum("bxyc,xyck->bk", patch, kernel) + bias
    return out


@pytest.mark.parametrize("pooling", ["average", "flatten"])
def test_heads_match_a_hand_computation(pooling):
    heads = classifier.ClassifierHeads(
        n_classes=4, hidden_channels=3, pooling=pooling, dtype="float64"
    )
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(5, 4, 4, 2)), rng.normal(size=(5, 2, 2, 8))]
    logits = heads([tf.constant(f) for f in feats]).numpy()
    pooled = []
    for f, conv, norm in zip(feats, heads.convs, heads.norms):
        c = _conv3x3_same(f, conv.kernel.numpy(), conv.bias.numpy())
        # ActNorm's data-dependent init on this first batch: zero mean, unit variance
        # (the reference's unbiased variance, floored at 0.2), then ReLU and the
        # global average.
        mean, var = c.mean(axis=(0, 1, 2)), c.var(axis=(0, 1, 2), ddof=1)
        np.testing.assert_allclose(norm.bias.numpy(), -mean, atol=1e-12)
        a = np.maximum((c - mean) / np.sqrt(np.maximum(var, 0.2)), 0.0)
        # "average": the global average; "flatten": every position, row-major
        # (i, j, channel), so the Dense sees where each feature is.
        pooled.append(a.mean(axis=(1, 2)) if pooling == "average" else a.reshape(5, -1))
    expected = np.concatenate(pooled, 1) @ heads.dense.kernel.numpy() + heads.dense.bias.numpy()
    assert logits.shape == (5, 4)
    # Dense inputs: 3 channels per scale, or 3 per position (4x4 + 2x2 positions).
    assert heads.dense.kernel.shape == ((6 if pooling == "average" else 3 * 20), 4)
    np.testing.assert_allclose(logits, expected, atol=1e-10)
    # Initialised once: a second batch does not re-initialise.
    bias = heads.norms[0].bias.numpy().copy()
    heads([tf.constant(2.0 * f) for f in feats])
    np.testing.assert_array_equal(heads.norms[0].bias.numpy(), bias)
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        heads([tf.constant(feats[0])])
    # get_config round trip: the same heads (same Dense width) from the config.
    clone = classifier.ClassifierHeads.from_config(heads.get_config())
    assert (clone.pooling, clone.hidden_channels, clone.n_classes) == (pooling, 3, 4)
    clone.build([f.shape for f in feats])
    assert clone.dense.kernel.shape == heads.dense.kernel.shape


def test_heads_reject_bad_pooling_before_any_work():
    with pytest.raises(ValueError, match="pooling must be one of"):
        classifier.ClassifierHeads(n_classes=4, pooling="max")
    heads = classifier.ClassifierHeads(n_classes=4, pooling="flatten")
    with pytest.raises(ValueError, match="needs static H, W, C"):
        heads.build([(None, None, None, 2)])


def test_hybrid_loss_matches_a_hand_computation():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = np.array([0, 1])
    log_px = np.array([-100.0, -120.0])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -log_softmax[np.arange(2), labels]
    for lam, value in [(1.0, 1.0), ("1/D", 1.0 / 64), ("0.25", 0.25)]:
        got = classifier.hybrid_loss(log_px, logits, labels, lam, num_dims=64)
        np.testing.assert_allclose(got, value * -log_px + ce, rtol=1e-12)
    # Classification only: lambda = 0 needs no log p(x) at all.
    np.testing.assert_allclose(classifier.hybrid_loss(None, logits, labels, 0), ce, rtol=1e-12)
    with pytest.raises(ValueError, match="log_prob_x is needed"):
        classifier.hybrid_loss(None, logits, labels, 1.0)
    with pytest.raises(ValueError, match="labels must be integer"):
        classifier.hybrid_loss(log_px, logits, logits[:, 0], 1.0)


def test_resolve_hybrid_lambda():
    assert classifier.resolve_hybrid_lambda("1/D", num_dims=3072) == 1.0 / 3072
    assert classifier.resolve_hybrid_lambda(" 1/d ", num_dims=4) == 0.25
    assert classifier.resolve_hybrid_lambda(1) == 1.0
    for bad in ["-1", "half", float("nan"), True]:
        with pytest.raises(ValueError, match="hybrid_lambda"):
            classifier.resolve_hybrid_lambda(bad)
    with pytest.raises(ValueError, match="needs num_dims"):
        classifier.resolve_hybrid_lambda("1/D")


def test_channel_normalize_log_det_is_the_jacobian():
    norm = classifier.ChannelNormalize.cifar10()
    x = tf.random.stateless_uniform([2, 2, 2, 3], [0, 5], dtype=tf.float64)
    ld, _ = assert_log_det_matches(norm, x, 3, atol=1e-12)
    y = norm.forward(x)
    np.testing.assert_allclose(ld, -4 * np.log(classifier.CIFAR10_STD).sum(), atol=1e-12)
    np.testing.assert_allclose(
        y[0, 0, 0],
        (x[0, 0, 0] - np.array(classifier.CIFAR10_MEAN)) / np.array(classifier.CIFAR10_STD),
        atol=1e-12,
    )
    np.testing.assert_allclose(norm.inverse(tf.identity(y)), x, atol=1e-12)
    np.testing.assert_allclose(norm.inverse_log_det_jacobian(y, event_ndims=3), -ld, atol=1e-12)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        classifier.ChannelNormalize([0.0], [0.0])
    with pytest.raises(ValueError, match="expects 3 channels"):
        norm.forward(tf.zeros([1, 2, 2, 1]))
