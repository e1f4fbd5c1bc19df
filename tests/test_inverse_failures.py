"""Iterative inverses and exact log-dets under XLA, and inverses that never hide a failure:
IResBlock's fixed point and the bisection of the sigmoidal / logistic-mixture flows return
NaN exactly where they did not converge (eager, graph and XLA) and warn outside XLA."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from rflow_tf import estimators as est
from rflow_tf import layers as rl
from rflow_tf.bijectors import IResBlock
from rflow_tf.bijectors.mixlogcdf import MixLogCDFCoupling
from rflow_tf.bijectors.monotone import bisect_increasing, bisect_increasing_with_diagnostics
from rflow_tf.bijectors.sigmoidal_flows import DeepDenseSigmoidalFlow, DeepSigmoidalFlow

MODES = ("eager", "graph", "xla")


def run(fn, mode, *args):
    """fn(*args) eagerly, in a tf.function, or compiled with XLA."""
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=mode == "xla")(*args)


def dense_block(**kw):
    keras.utils.set_random_seed(0)
    block = IResBlock.dense(2, hidden_units=(16,), coeff=0.9, **kw)
    for layer in rl.lipschitz_layers(block):  # g far from 0, so the fixed point really iterates
        layer.kernel.assign(layer.kernel * 4.0)
    rl.converge_lipschitz(block)
    return block


class HalfLinear(keras.layers.Layer):
    """g(x) = x / 2: x <- y - x / 2 halves its step each iteration, from x = y."""

    def call(self, x, training=None):
        return 0.5 * x


# ------------------------------------------------------------------ IResBlock
def test_iresblock_inverse_compiles_with_xla_and_matches_graph_inverse():
    block = dense_block()
    x = 2.0 * tf.random.stateless_normal([6, 2], [1, 2])
    y = block.forward(x)
    assert float(tf.reduce_max(tf.abs(y - x))) > 0.1  # g is not negligible
    # tf.identity: a new tensor, so the inverse really runs instead of the bijector cache.
    x_graph = run(block.inverse, "graph", tf.identity(y)).numpy()
    x_xla = run(block.inverse, "xla", tf.identity(y)).numpy()
    np.testing.assert_allclose(x_xla, x_graph, atol=1e-5)
    np.testing.assert_allclose(x_xla, x.numpy(), atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_iresblock_returns_nan_exactly_for_the_examples_that_did_not_converge(mode, capfd):
    # y = 0 converges in one step; y = 3 needs ~22 halvings of the step, more than 5;
    # an infinite y never has a finite fixed point.
    block = IResBlock(HalfLinear(), inverse_max_iterations=5)
    y = tf.constant([[0.0, 0.0], [3.0, -3.0], [np.inf, 0.0], [0.0, 0.0]])
    expected_ok = np.array([True, False, False, True])

    def inverse_and_diagnostics(y):
        return block.inverse(y), block.inverse_with_diagnostics(y, per_example=True)

    if mode == "eager":
        with pytest.warns(RuntimeWarning, match=r"did not converge .* for 2 of 4 examples"):
            x, (x_raw, residual, ok) = inverse_and_diagnostics(y)
    else:
        x, (x_raw, residual, ok) = run(inverse_and_diagnostics, mode, y)
    x, ok, residual = x.numpy(), ok.numpy(), residual.numpy()
    np.testing.assert_array_equal(ok, expected_ok)
    np.testing.assert_array_equal(np.isnan(x).all(1), ~expected_ok)
    np.testing.assert_array_equal(np.isnan(x).any(1), ~expected_ok)
    np.testing.assert_array_equal(x[expected_ok], 0.0)
    assert 0.0 < residual[1] < np.inf and not np.isfinite(residual[2])
    assert np.all(np.isfinite(x_raw.numpy()[1]))  # the diagnostics keep the last iterate
    err = capfd.readouterr().err
    if mode == "graph":
        assert re.search(r"did not converge in 5 iterations; final residual nan", err), err
    else:
        assert "did not converge" not in err  # eager warns; XLA cannot print
    # The batch-wide summary of the default call.
    x_all, worst, all_ok = block.inverse_with_diagnostics(y)
    assert not bool(all_ok) and np.isnan(float(worst))
    _, worst, all_ok = block.inverse_with_diagnostics(y[::3])
    assert bool(all_ok) and float(worst) == 0.0


def test_iresblock_infinite_latent_is_nan_under_xla_and_the_rest_converges():
    block = dense_block()
    x = tf.random.stateless_normal([3, 2], [3, 4])
    y = tf.concat([block.forward(x), [[np.inf, 0.0]]], 0)
    out = run(block.inverse, "xla", y).numpy()
    assert np.all(np.isnan(out[3]))
    np.testing.assert_allclose(out[:3], x.numpy(), atol=1e-4)


# ------------------------------------------------------------------ exact log-det
@pytest.mark.parametrize("dtype,rtol", [(tf.float32, 1e-4), (tf.float64, 1e-11)])
def test_exact_logdet_compiles_with_xla_and_equals_slogdet_with_its_gradient(dtype, rtol):
    rng = np.random.default_rng(0)
    jac = tf.constant(0.3 * rng.standard_normal((5, 4, 4)), dtype)
    weights = tf.constant(rng.standard_normal(5), dtype)

    def value_and_grad(fn, jac):
        with tf.GradientTape() as tape:
            tape.watch(jac)
            ld = fn(jac)
            total = tf.reduce_sum(weights * ld)
        return ld, tape.gradient(total, jac)

    def slogdet(jac):
        return tf.linalg.slogdet(tf.eye(4, dtype=dtype) + jac)[1]

    ld_ref, grad_ref = value_and_grad(slogdet, jac)
    ld, grad = run(lambda j: value_and_grad(est.exact_logdet, j), "xla", jac)
    np.testing.assert_allclose(ld.numpy(), ld_ref.numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad.numpy(), grad_ref.numpy(), rtol=rtol, atol=rtol)
    ld_eager, grad_eager = value_and_grad(est.exact_logdet, jac)
    np.testing.assert_allclose(ld_eager.numpy(), ld_ref.numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad_eager.numpy(), grad_ref.numpy(), rtol=rtol, atol=rtol)
    # A negative determinant has the same log |det|, a singular matrix gives -inf.
    flip = tf.constant(np.diag([-2.0, 0.0, 0.0, 0.0])[None], dtype)  # I + flip = diag(-1, 1, 1, 1)
    np.testing.assert_allclose(est.exact_logdet(flip).numpy(), [0.0], atol=1e-7)
    assert est.exact_logdet(-tf.eye(4, dtype=dtype)[None]).numpy()[0] == -np.inf


def test_exact_mode_block_compiles_with_xla_with_its_weight_gradients():
    block = dense_block(logdet="exact")
    x = tf.random.stateless_normal([4, 2], [5, 6])

    def value_and_grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            ld = block.forward_and_log_det(x)[1]
            total = tf.reduce_sum(ld)
        return ld, tape.gradient(total, [x, *block.trainable_variables])

    ld, grads = value_and_grads(x)
    ld_xla, grads_xla = run(value_and_grads, "xla", x)
    np.testing.assert_allclose(ld_xla.numpy(), ld.numpy(), rtol=1e-4, atol=1e-5)
    assert sum(g is not None for g in grads) >= 3  # x and the hidden layer's weights
    for g, g_xla in zip(grads, grads_xla):
        if g is None:  # the last bias does not enter the Jacobian
            assert g_xla is None
            continue
        np.testing.assert_allclose(g_xla.numpy(), g.numpy(), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ bisection
@pytest.mark.parametrize("mode", MODES)
def test_bisection_without_a_root_is_nan_and_a_saturating_map_still_inverts(mode):
    y32 = tf.constant([0.5, 0.99999999, 1.5, -1.5, np.nan, np.inf, -0.999])
    x, bracketed, ok = run(lambda y: bisect_increasing_with_diagnostics(tf.tanh, y), mode, y32)
    x, bracketed, ok = x.numpy(), bracketed.numpy(), ok.numpy()
    # float32 0.99999999 is 1.0, which tanh reaches (it rounds to 1 from x ~ 9).
    expect = np.array([True, True, False, False, False, False, True])
    np.testing.assert_array_equal(ok, expect)
    np.testing.assert_array_equal(bracketed, expect)
    np.testing.assert_array_equal(np.isnan(x), ~expect)
    np.testing.assert_allclose(np.tanh(x[expect]), y32.numpy()[expect], atol=2e-6)
    # (float32 tanh rounds y to ~6e-8: at slope 1 - 0.999^2 that is 3e-5 in x)
    np.testing.assert_allclose(x[[0, 6]], np.arctanh([0.5, -0.999]), rtol=1e-4)
    # float64: the root of tanh(x) = 1 - 1e-8 is atanh(1 - 1e-8) ~ 9.55.
    y64 = tf.constant([1.0 - 1e-8, 1.0 + 1e-12], tf.float64)
    x64 = run(lambda y: bisect_increasing(tf.tanh, y, 1e-9, 1e-9), mode, y64).numpy()
    np.testing.assert_allclose(x64[0], np.arctanh(1.0 - 1e-8), rtol=1e-8)
    assert np.isnan(x64[1])


def test_bisection_flags_a_map_that_is_nan_or_decreasing_and_an_unreached_tolerance():
    y = tf.constant([0.5, 5.0], tf.float64)
    nan_above_2 = lambda t: tf.where(t > 2.0, tf.constant(np.nan, tf.float64), t)  # noqa: E731
    x, bracketed, ok = bisect_increasing_with_diagnostics(nan_above_2, y)
    np.testing.assert_array_equal(ok.numpy(), [True, False])
    assert abs(x.numpy()[0] - 0.5) < 1e-6 and np.isnan(x.numpy()[1])
    x = bisect_increasing(lambda t: -t, tf.constant([0.0, 3.0], tf.float64)).numpy()
    assert np.all(np.isnan(x))  # decreasing: fn(-1) > 0 > fn(1), or no bracket up to 2^200
    # atol = 0 asks for a relative error at a root 0: 200 halvings cannot reach it.
    x, bracketed, ok = bisect_increasing_with_diagnostics(
        lambda t: t, tf.constant([0.0, 0.25], tf.float64), atol=0.0, rtol=1e-6
    )
    np.testing.assert_array_equal(bracketed.numpy(), [True, True])
    np.testing.assert_array_equal(ok.numpy(), [False, True])
    assert np.isnan(x.numpy()[0]) and abs(x.numpy()[1] - 0.25) < 1e-6


def test_bisection_of_a_steep_map_round_trips_in_y_too():
    # slope 1e8: a root within 1e-6 in x alone would leave |fn(x) - y| ~ 100.
    y = tf.constant([0.3, -7.0, 123.0], tf.float64)
    x = bisect_increasing(lambda t: 1e8 * t, y).numpy()
    np.testing.assert_allclose(1e8 * x, y.numpy(), atol=1e-6, rtol=1e-6)


def _constant_in_x1_conditioner(k):
    """DSF parameters [a_raw, b, w_logits] x K per dimension: dimension 0 is
    logit(sigmoid(softplus(0) x)) = log(2) x; dimension 1 has slopes
    softplus(-1000) = e^-1000, which underflows to 0: y_1 = logit(sigmoid(0)) = 0 for every x."""
    params = np.zeros((2, 3 * k))
    params[1, :k] = -1000.0

    def conditioner(x):
        # + 0 * x_0 in dimension 1 only: a NaN x_0 makes x_1's parameters NaN.
        dep = 0.0 * x[:, :1]
        return tf.constant(params)[None] + tf.stack([tf.zeros_like(dep), dep], axis=1)

    return conditioner


def test_dsf_inverse_outside_the_numerical_range_is_nan_and_warns(capfd):
    dsf = DeepSigmoidalFlow(
        2,
        num_components=2,
        conditioner=_constant_in_x1_conditioner(2),
        inverse_max_iterations=64,  # an unreachable y costs 64 bracket moves (to 2^64)
        dtype=tf.float64,
    )
    y = tf.constant([[0.3, 0.5], [0.3, 0.0], [np.inf, 0.0], [-2.0, 0.0]], tf.float64)
    with pytest.warns(RuntimeWarning, match=r"bisection inverse failed for 3 of 8 elements"):
        x = dsf.inverse(y).numpy()
    # y_1 = 0.5 is never reached: NaN; y_1 = 0 is reached everywhere: any x_1 is a root.
    # An infinite y_0 makes its whole row NaN (x_1's parameters depend on x_0).
    np.testing.assert_array_equal(np.isnan(x), [[0, 1], [0, 0], [1, 1], [0, 0]])
    np.testing.assert_allclose(x[[0, 1, 3], 0], np.array([0.3, 0.3, -2.0]) / np.log(2.0), atol=2e-6)
    # In a graph the failure is printed; under XLA the NaN is the report.
    x_graph = run(dsf.inverse, "graph", y).numpy()
    assert "bisection inverse failed" in capfd.readouterr().err
    x_xla = run(dsf.inverse, "xla", y).numpy()
    assert "bisection inverse failed" not in capfd.readouterr().err
    for other in (x_graph, x_xla):
        np.testing.assert_array_equal(np.isnan(other), np.isnan(x))
        np.testing.assert_allclose(other, x, atol=1e-6)


def test_ddsf_with_extreme_weights_never_returns_a_wrong_finite_inverse(capfd):
    """The original failure: float64 DDSF with large random weights, y ~ U(-1, 1). Where
    x_0 is large the conditioner's slopes for x_1 underflow and y_1 is out of reach; the
    bisection used to return x = -2^200 or another wrong finite value there."""
    keras.utils.set_random_seed(1)
    ddsf = DeepDenseSigmoidalFlow(
        2, num_layers=2, hidden_size=8, hidden_units=(16,), dtype=tf.float64
    )
    rng = np.random.default_rng(1)
    for w in ddsf.conditioner.weights:
        w.assign(4.0 * rng.standard_normal(w.shape))
    y = tf.constant(rng.uniform(-1.0, 1.0, size=(32, 2)), tf.float64)
    x = run(ddsf.inverse, "graph", y).numpy()
    finite = np.isfinite(x).all(1)
    assert 0 < finite.sum() < len(finite)  # both outcomes occur
    assert not np.isinf(x).any()  # a failure is NaN, never an infinite or capped x
    y_back = ddsf.forward(tf.constant(x[finite])).numpy()
    np.testing.assert_allclose(y_back, y.numpy()[finite], atol=1e-5, rtol=1e-5)
    assert "bisection inverse failed" in capfd.readouterr().err


def test_mixlogcdf_nan_only_in_unreachable_transformed_elements():
    layer = MixLogCDFCoupling(
        (4,),
        mask="half",
        num_components=2,
        hidden_channels=4,
        num_blocks=0,
        inverse_max_iterations=64,
        dtype=tf.float64,
    )
    # Zero output kernel: the parameters are the bias. Log-scales s = 800 give slopes
    # e^-800 = 0 in float64: the transformed elements map every x to logit(1/2) = 0.
    bias = np.zeros(layer.net.conv_out.bias.shape)
    bias[4:6] = 800.0
    layer.net.conv_out.bias.assign(bias)
    y = tf.constant([[1.0, 2.0, 0.0, 0.5], [1.0, 2.0, 0.0, 0.0]], tf.float64)
    with pytest.warns(RuntimeWarning, match=r"failed for 1 of 8 elements"):
        x = layer.inverse(y).numpy()
    np.testing.assert_array_equal(np.isnan(x), [[0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(x[:, :2], y.numpy()[:, :2])  # passed through untouched
    # A layer with moderate weights inverts everything, also compiled with XLA.
    fresh = MixLogCDFCoupling(
        (4,), mask="half", num_components=2, hidden_channels=4, num_blocks=0, dtype=tf.float64
    )
    rng = np.random.default_rng(0)
    for v in fresh.trainable_variables:
        v.assign(v + 0.3 * rng.standard_normal(v.shape))
    x0 = tf.constant(rng.standard_normal((3, 4)), tf.float64)
    x_back = run(fresh.inverse, "xla", tf.identity(fresh.forward(x0))).numpy()
    np.testing.assert_allclose(x_back, x0.numpy(), atol=1e-5)


def test_no_false_bisection_warning_under_vectorized_map(capfd):
    """Under pfor the failure branch runs for the (possibly empty) set of failed
    iterations: no message when none failed, a message when one did."""
    dsf = DeepSigmoidalFlow(
        2,
        num_components=2,
        conditioner=_constant_in_x1_conditioner(2),
        inverse_max_iterations=64,  # an unreachable y costs 64 bracket moves (to 2^64)
        dtype=tf.float64,
    )
    inverse = tf.function(lambda y: tf.vectorized_map(lambda yy: dsf.inverse(yy[None])[0], y))
    x = inverse(tf.constant([[0.3, 0.0], [-1.0, 0.0]], tf.float64))
    assert np.all(np.isfinite(x.numpy()))
    assert "bisection inverse failed" not in capfd.readouterr().err
    x = inverse(tf.constant([[0.3, 0.5], [-1.0, 0.0]], tf.float64))  # the same trace
    np.testing.assert_array_equal(np.isnan(x.numpy()), [[0, 1], [0, 0]])
    assert "bisection inverse failed" in capfd.readouterr().err
