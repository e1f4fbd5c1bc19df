"""Variational / uniform dequantisation: exact log q(u|x), bits/dim bookkeeping, the bound
against an exactly known log P(x), and that training q tightens it."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import exact_log_det

from rflow_tf.bijectors.dequantization import UniformDequantizer, VariationalDequantizer

tfd = tfp.distributions

_SMALL = {
    "num_couplings": 2,
    "feature_channels": 4,
    "num_components": 3,
    "hidden_channels": 8,
    "num_blocks": 1,
    "dtype": tf.float64,
}


def _perturbed(deq, seed=0):
    rng = np.random.default_rng(seed)
    for v in deq.trainable_variables:
        v.assign(v + 0.2 * rng.standard_normal(v.shape))
    return deq


@pytest.mark.parametrize("shape", [(3,), (2, 2, 2)])
def test_log_q_is_change_of_variables_with_brute_force_jacobian(shape):
    deq = _perturbed(VariationalDequantizer(shape, n_bits=3, **_SMALL))
    d = int(np.prod(shape))
    x = tf.cast(tf.random.stateless_uniform((4,) + shape, [1, 2], 0, 8, tf.int32), tf.float64)
    eps = tf.random.stateless_normal((4,) + shape, [3, 4], dtype=tf.float64)
    _, log_q = deq.noise_and_log_prob(eps, x)
    log_det = exact_log_det(lambda e: deq.noise_and_log_prob(e, x)[0], eps)
    log_normal = -0.5 * np.sum(eps.numpy().reshape(4, d) ** 2, -1) - 0.5 * d * math.log(2 * math.pi)
    np.testing.assert_allclose(log_q.numpy(), log_normal - log_det, rtol=0, atol=1e-6)
    y, _ = deq.dequantize(x, seed=[5, 6])
    assert np.all(np.floor(y.numpy() * 8) == x.numpy())  # u in [0, 1): y stays in x's bin


def test_bits_per_dim_bookkeeping_on_the_uniform_density():
    # p(y) = 1 on [0, 1)^D: every n-bit x has P(x) = 2^(-nD), i.e. exactly n bits/dim, and the
    # uniform dequantisation bound is tight; the variational one exceeds it by E[log q]/(D ln 2).
    x = tf.constant([[0, 5, 7], [3, 3, 1]])
    zero = lambda y: tf.zeros(tf.shape(y)[:-1], y.dtype)  # noqa: E731
    bpd = UniformDequantizer((3,), n_bits=3, dtype=tf.float64).bits_per_dim(x, zero, [1, 2])
    np.testing.assert_allclose(bpd.numpy(), 3.0, atol=1e-12)
    deq = VariationalDequantizer((3,), n_bits=3, **_SMALL)
    _, log_q = deq.dequantize(x, seed=[1, 2])
    np.testing.assert_allclose(
        deq.bits_per_dim(x, zero, [1, 2]).numpy(),
        3.0 + log_q.numpy() / (3 * math.log(2.0)),
        atol=1e-12,
    )


def test_negative_elbo_bounds_exact_log_likelihood_and_training_q_tightens_it():
    # Model: y ~ Beta(2, 3) per coordinate, so log P(x) = sum_d log(F((x_d+1)/4) - F(x_d/4)).
    beta = tfd.Beta(tf.constant(2.0, tf.float64), tf.constant(3.0, tf.float64))
    model = tfd.Independent(
        tfd.Beta(tf.fill([2], tf.constant(2.0, tf.float64)), tf.constant(3.0, tf.float64)), 1
    )
    x = tf.constant([[1.0, 3.0], [0.0, 2.0]], tf.float64)
    log_p = np.sum(np.log(beta.cdf((x + 1) / 4).numpy() - beta.cdf(x / 4).numpy()), -1)
    n = 1000
    xs = tf.repeat(x, n, 0)

    def bound(deq):
        ne = deq.negative_elbo(xs, model.log_prob, [3, 4]).numpy().reshape(2, n)
        return -ne.mean(1), ne.std(1) / math.sqrt(n)

    deq = VariationalDequantizer((2,), n_bits=2, **_SMALL)
    assert len(deq.trainable_variables) == len(deq.features_net.weights) + sum(
        len(c.trainable_variables) for c in deq.couplings
    )
    uniform_elbo, se = bound(UniformDequantizer((2,), n_bits=2, dtype=tf.float64))
    assert np.all(uniform_elbo <= log_p + 4 * se)  # a lower bound (Jensen)
    opt = tf.optimizers.Adam(5e-2)

    @tf.function
    def step(seed):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(deq.negative_elbo(tf.repeat(x, 32, 0), model.log_prob, seed))
        opt.apply_gradients(
            zip(tape.gradient(loss, deq.trainable_variables), deq.trainable_variables)
        )

    for i in range(60):
        step(tf.constant([i, 7]))
    elbo, se = bound(deq)
    assert np.all(elbo <= log_p + 4 * se)
    # the learned q is much closer to the posterior than uniform noise
    assert np.all(log_p - elbo < 0.5 * (log_p - uniform_elbo)), (log_p, elbo, uniform_elbo)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="n_bits"):
        VariationalDequantizer((3,), n_bits=9)
    with pytest.raises(ValueError, match="num_couplings"):
        VariationalDequantizer((3,), num_couplings=0)
    with pytest.raises(ValueError, match="feature_channels"):
        VariationalDequantizer((3,), feature_channels=0)
    with pytest.raises(ValueError, match="event shape"):
        UniformDequantizer((3,)).dequantize(tf.zeros([2, 4]), seed=[0, 0])
