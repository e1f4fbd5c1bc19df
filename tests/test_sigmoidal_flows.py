"""DeepSigmoidalFlow / DeepDenseSigmoidalFlow: exact log-det, triangular Jacobian, monotonicity,
extreme inputs, bisection inverse, argument errors, and use as ordinary TFP bijectors."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import assert_log_det_matches, jacobian

from rflow_tf.bijectors.sigmoidal_flows import MADE, DeepDenseSigmoidalFlow, DeepSigmoidalFlow

tfb, tfd = tfp.bijectors, tfp.distributions

_D = 4


def _dsf(dtype=tf.float64, **kw):
    return DeepSigmoidalFlow(_D, num_components=3, hidden_units=(16,), dtype=dtype, **kw)


def _ddsf(num_layers=2, dtype=tf.float64, **kw):
    return DeepDenseSigmoidalFlow(
        _D, num_layers=num_layers, hidden_size=5, hidden_units=(16,), dtype=dtype, **kw
    )


_BUILDERS = {
    "dsf": _dsf,
    "ddsf1": lambda **kw: _ddsf(1, **kw),
    "ddsf3": lambda **kw: _ddsf(3, **kw),
}


@pytest.mark.parametrize("kind", sorted(_BUILDERS))
def test_log_det_is_slogdet_of_brute_force_jacobian_which_is_lower_triangular(kind):
    bij = _BUILDERS[kind]()
    x = 3.0 * tf.random.stateless_normal([6, _D], [1, 2], dtype=tf.float64)
    assert_log_det_matches(bij, x, 1, rtol=0, atol=1e-6)
    jac = jacobian(bij.forward, x)
    assert np.all(np.linalg.slogdet(jac).sign > 0)
    assert np.all(np.triu(jac, 1) == 0.0)  # autoregressive mask
    assert np.all(np.diagonal(jac, axis1=1, axis2=2) > 0)  # increasing per dimension
    assert np.any(np.abs(np.tril(jac, -1)) > 1e-6)  # and really conditioned


def test_dense_flow_with_one_layer_is_the_sigmoidal_flow_with_hidden_size_components():
    ddsf = DeepDenseSigmoidalFlow(
        _D, num_layers=1, hidden_size=5, hidden_units=(16,), dtype=tf.float64
    )
    # DDSF(L=1) params per dimension: [u (5 x 1, softmax = 1), log a, b, w (1 x 5)] = DSF's + u.
    dsf = DeepSigmoidalFlow(
        _D, num_components=5, dtype=tf.float64, conditioner=lambda x: ddsf.conditioner(x)[..., 5:]
    )
    x = tf.random.stateless_normal([5, _D], [3, 4], dtype=tf.float64)
    np.testing.assert_allclose(dsf.forward(x).numpy(), ddsf.forward(x).numpy(), atol=1e-12)
    np.testing.assert_allclose(
        dsf.forward_log_det_jacobian(x, 1).numpy(),
        ddsf.forward_log_det_jacobian(x, 1).numpy(),
        atol=1e-12,
    )


@pytest.mark.parametrize(
    "kind,dtype", [("dsf", tf.float64), ("dsf", tf.float32), ("ddsf3", tf.float64)]
)
def test_bisection_inverse_round_trips_to_stated_tolerance(kind, dtype):
    tol = 1e-6
    bij = _BUILDERS[kind](dtype=dtype, inverse_atol=tol, inverse_rtol=tol)
    x = 3.0 * tf.random.stateless_normal([6, _D], [5, 6], dtype=dtype)
    if dtype == tf.float64:  # float32 rounds y to ~1e-7 |y|: x errs by that / slope there
        x = tf.concat([x, tf.constant([[-50.0, 20.0, 0.0, 80.0]], dtype)], 0)
    y = bij.forward(x)
    x_back = bij.inverse(tf.identity(y))  # a fresh tensor: no cached inverse
    if dtype == tf.float64:
        # The stated guarantee, per dimension: x_back[t] is within (tol + tol |x|) / 2 of
        # the root of tau(.; params(x_back[:t])) = y[t]. By the mean value theorem
        # |forward(x_back)[t] - y[t]| = tau'(xi) |x_back[t] - root|, tau' ~ J[t, t].
        slope = np.diagonal(jacobian(bij.forward, x_back), axis1=1, axis2=2)
        gap = np.abs(bij.forward(x_back).numpy() - y.numpy()) / slope
        assert np.all(gap <= 0.51 * (tol + tol * np.abs(x_back.numpy()))), gap.max()
    # End to end, errors in x[:t] propagate through the conditioner into x[t] (and are
    # amplified where the conditioner sees extreme inputs: checked on moderate rows).
    np.testing.assert_allclose(x_back.numpy()[:6], x.numpy()[:6], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dsf", "ddsf3"])
def test_strictly_increasing_with_finite_gradients_at_extreme_inputs(kind):
    bij = _BUILDERS[kind](dtype=tf.float32)
    grid = tf.constant(
        np.concatenate([-np.logspace(4, -2, 40), [0.0], np.logspace(-2, 4, 40)]), tf.float32
    )  # -1e4 .. 1e4
    ctx = tf.random.stateless_normal([1, _D], [7, 8])
    for t in range(_D):  # sweep x_t, others fixed
        x = tf.tensor_scatter_nd_update(
            tf.repeat(ctx, grid.shape[0], 0), [[i, t] for i in range(grid.shape[0])], grid
        )
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = bij.forward(x)
            ld = bij.forward_log_det_jacobian(x, 1)
            total = tf.reduce_sum(y) + tf.reduce_sum(ld)
        assert np.all(np.diff(y[:, t].numpy()) > 0), f"not increasing in x_{t}"
        assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(ld.numpy()))
        for g in [tape.gradient(total, x), *tape.gradient(total, bij.trainable_variables)]:
            assert g is not None and np.all(np.isfinite(g.numpy()))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_components"):
        DeepSigmoidalFlow(2, num_components=0)
    with pytest.raises(ValueError, match="hidden size"):
        DeepSigmoidalFlow(2, hidden_units=(16, 0))
    with pytest.raises(ValueError, match="hidden_size"):
        DeepDenseSigmoidalFlow(2, hidden_size=0)
    with pytest.raises(ValueError, match="num_layers"):
        DeepDenseSigmoidalFlow(2, num_layers=0)
    with pytest.raises(ValueError, match="event_size"):
        DeepSigmoidalFlow(0)
    with pytest.raises(TypeError, match="dtype"):
        DeepSigmoidalFlow(2, dtype=tf.int32)
    made = MADE(3, params_per_dim=6, hidden_units=(8,))
    with pytest.raises(ValueError, match="mask mismatch"):  # params[t] may not see x[t]
        DeepSigmoidalFlow(
            3, num_components=2, conditioner=lambda x: tf.repeat(x[..., None], 6, axis=-1) + made(x)
        )
    with pytest.raises(ValueError, match=r"\[batch, 3, 6\]"):
        DeepSigmoidalFlow(3, num_components=2, conditioner=MADE(3, 5))
    with pytest.raises(ValueError, match="event size 2"):
        DeepSigmoidalFlow(2).forward(tf.zeros([4, 3]))


def test_made_outputs_depend_only_on_earlier_dimensions():
    made = MADE(5, params_per_dim=3, hidden_units=(16, 16))
    x = tf.random.normal([2, 5])
    with tf.GradientTape() as tape:
        tape.watch(x)
        p = made(x)
    dep = np.abs(tape.batch_jacobian(p, x).numpy()).max(axis=(0, 2))  # [t, s]
    assert np.all(np.triu(dep) == 0) and np.all(dep[np.tril_indices(5, -1)] > 0)


def test_usable_in_chain_transformed_distribution_and_minimize():
    flow = tfb.Chain(
        [
            DeepDenseSigmoidalFlow(2, num_layers=2, hidden_size=2, hidden_units=(4,)),
            tfb.Permute([1, 0]),
            DeepSigmoidalFlow(2, num_components=2, hidden_units=(4,)),
        ]
    )
    base = tfd.MultivariateNormalDiag(tf.zeros(2))
    dist = tfd.TransformedDistribution(base, tfb.Invert(flow))
    assert len(dist.trainable_variables) == 2 * 4  # 2 MADEs x (2 kernels + 2 biases)
    x = tf.random.stateless_normal([64, 2], [9, 9]) * [1.0, 0.3] + [2.0, -1.0]
    expected = base.log_prob(flow.forward(x)) + flow.forward_log_det_jacobian(x, 1)
    np.testing.assert_allclose(dist.log_prob(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    before = [v.numpy().copy() for v in dist.trainable_variables]
    losses = tfp.math.minimize(
        lambda: -tf.reduce_mean(dist.log_prob(x)),
        5,
        tf.optimizers.Adam(1e-2),
        trainable_variables=dist.trainable_variables,
    )
    assert losses[-1] < losses[0]
    assert any(np.any(b != v.numpy()) for b, v in zip(before, dist.trainable_variables))
    samples = dist.sample(5, seed=[1, 2])  # bisection through tfb.Invert
    assert samples.shape == (5, 2) and np.all(np.isfinite(samples.numpy()))
