"""The estimator functions, line by line against the paper's equations (5), (6), (8)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from rflow_tf import estimators as est


def test_geometric_tail():
    k = tf.range(-1, 6)
    got = est.roulette_tail_prob(k, "geometric", 0.3).numpy()
    expect = [1.0, 1.0, 1.0] + [0.7 ** (j - 1) for j in range(2, 6)]
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_poisson_tail():
    lam = 2.0
    k = tf.range(0, 8)
    got = est.roulette_tail_prob(k, "poisson", lam, tf.float64).numpy()
    expect = [
        1.0 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(j)) for j in range(8)
    ]
    np.testing.assert_allclose(got, expect, rtol=1e-10)


@pytest.mark.parametrize("dist,param", [("geometric", 0.5), ("poisson", 2.0), ("poisson", 0.7)])
def test_sampled_tail_matches_tail_prob(dist, param):
    draws = est.sample_roulette(tf.constant([3, 4]), dist, param, n_samples=200000).numpy()
    assert draws.min() >= (1 if dist == "geometric" else 0)
    for k in range(0, 6):
        p = float(est.roulette_tail_prob(k, dist, param, tf.float64))
        se = math.sqrt(p * (1 - p) / draws.size) + 1e-12
        assert abs(np.mean(draws >= k) - p) < 5 * se + 1e-9


def test_series_weights():
    draws = tf.constant([1, 3, 0, 2])
    w = est.series_weights(
        6, draws, n_exact_terms=2, dist="poisson", param=2.0, dtype=tf.float64
    ).numpy()
    tail = lambda j: float(est.roulette_tail_prob(j, "poisson", 2.0, tf.float64))  # noqa: E731
    expect = [1.0, 1.0] + [np.mean(draws.numpy() >= j) / tail(j) for j in range(1, 5)]
    np.testing.assert_allclose(w, expect, rtol=1e-12)
    np.testing.assert_array_equal(est.series_weights(3, None, 0).numpy(), [1, 1, 1])


def test_series_weights_are_unbiased_indicators():
    """E[weight_k * 1(k <= n)] = 1 for every k: eq. (5) term by term."""
    m, s = 1, 2
    draws = est.sample_roulette(tf.constant([0, 9]), "geometric", 0.4, n_samples=s * 50000)
    draws = tf.reshape(draws, [50000, s])
    n = tf.reduce_max(draws, axis=1) + m
    total = np.zeros(8)
    for k in range(1, 9):
        j = k - m
        frac = tf.reduce_mean(tf.cast(draws >= j, tf.float64), axis=1)
        tail = est.roulette_tail_prob(j, "geometric", 0.4, tf.float64)
        wk = frac / tail if j > 0 else tf.ones_like(frac)
        total[k - 1] = float(tf.reduce_mean(wk * tf.cast(n >= k, tf.float64)))
    np.testing.assert_allclose(total, 1.0, atol=0.06)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_probe_moments(kind):
    v = est.hutchinson_probe([100000, 3], tf.constant([1, 2]), kind, tf.float64).numpy()
    cov = v.T @ v / v.shape[0]
    np.testing.assert_allclose(cov, np.eye(3), atol=0.02)
    if kind == "rademacher":
        assert set(np.unique(v)) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="probe"):
        est.hutchinson_probe([2], tf.constant([1, 2]), "uniform")


def test_coefficients():
    w = tf.constant([1.0, 2.0, 3.0, 4.0], tf.float64)
    np.testing.assert_allclose(est.logdet_coefficients(w).numpy(), [1, -1, 1, -1])
    np.testing.assert_allclose(est.neumann_coefficients(w).numpy(), [1, -2, 3, -4])


def _matrix(seed, d, radius):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return tf.constant(radius * a / np.linalg.norm(a, 2), tf.float64)


def test_power_series_matches_logdet_with_exact_trace():
    """With all d basis probes, the truncated series is sum_k (-1)^(k+1)/k tr(A^k)."""
    a = _matrix(0, 4, 0.6)
    v = tf.eye(4, dtype=tf.float64)
    terms = est.power_series_logdet(lambda w: w @ a, v, 60, tf.ones([60], tf.float64))
    np.testing.assert_allclose(
        float(tf.reduce_sum(terms)), np.linalg.slogdet(np.eye(4) + a.numpy())[1], rtol=1e-10
    )


def test_neumann_vector_and_surrogate_gradient():
    """u = sum_j (-1)^j v^T A^j ~ v^T (I + A)^-1; grad of u^T A v wrt A = outer(u, v)."""
    a = _matrix(1, 3, 0.5)
    v = tf.constant([[1.0, -2.0, 0.5]], tf.float64)
    _, u = est.power_series_terms(
        lambda w: w @ a, v, 80, tf.ones([80], tf.float64), with_neumann=True
    )
    np.testing.assert_allclose(
        u.numpy(), v.numpy() @ np.linalg.inv(np.eye(3) + a.numpy()), rtol=1e-10
    )
    # With all basis probes, sum over probes of the surrogate gradient = d logdet / dA.
    eye = tf.eye(3, dtype=tf.float64)
    _, u_all = est.power_series_terms(
        lambda w: w @ a, eye, 80, tf.ones([80], tf.float64), with_neumann=True
    )
    with tf.GradientTape() as tape:
        tape.watch(a)
        s = tf.reduce_sum(est.neumann_surrogate(lambda w: w @ a, u_all, eye))
    # d/dA log det(I + A) = (I + A)^-T
    np.testing.assert_allclose(
        tape.gradient(s, a).numpy(), np.linalg.inv(np.eye(3) + a.numpy()).T, rtol=1e-9
    )


def test_exact_logdet():
    a = _matrix(2, 5, 0.9)
    got = est.exact_logdet(a[None]).numpy()[0]
    np.testing.assert_allclose(got, np.linalg.slogdet(np.eye(5) + a.numpy())[1], rtol=1e-12)


def test_bad_distribution_arguments():
    with pytest.raises(ValueError, match="dist must be one of"):
        est.roulette_tail_prob(1, "binomial", 0.5)
    with pytest.raises(ValueError, match="geometric p"):
        est.sample_roulette(tf.constant([1, 2]), "geometric", 1.5)
    with pytest.raises(ValueError, match="poisson rate"):
        est.sample_roulette(tf.constant([1, 2]), "poisson", -1.0)
