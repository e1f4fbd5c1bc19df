"""Tests for rflow_tf.toy and train/toy.py: exact 2-D log-det, short runs of every model,
CLI errors."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from helpers import exact_log_det, finite_difference_jacobian  # noqa: E402

from rflow_tf import layers as rlayers  # noqa: E402
from rflow_tf import toy  # noqa: E402
from rflow_tf.bijectors import IResBlock  # noqa: E402
from rflow_tf.data import TOY_DATASETS  # noqa: E402


def test_exact_logdet_matches_slogdet_of_brute_force_jacobian():
    tf.keras.utils.set_random_seed(1)
    net = rlayers.lipschitz_dense_net(2, (32, 32), coeff=0.9, dtype="float64")
    block = IResBlock(net, logdet="exact")
    x = np.random.default_rng(0).normal(size=(6, 2)) * 2.0
    y, ld = block.forward_and_log_det(tf.constant(x))
    ld = ld.numpy()
    assert ld.shape == (6,)
    assert np.max(np.abs(ld)) > 1e-2  # a non-trivial Jacobian
    forward = block.forward
    np.testing.assert_allclose(ld, exact_log_det(forward, x, per_example=True), atol=1e-10)
    finite_difference = finite_difference_jacobian(forward, x, eps=1e-5)
    np.testing.assert_allclose(ld, np.linalg.slogdet(finite_difference)[1], atol=1e-6)
    np.testing.assert_allclose(y.numpy(), forward(tf.constant(x)).numpy())


def test_flow_log_prob_exact_is_change_of_variables_of_whole_flow():
    """log p(x) = log N(f(x)) + slogdet(df/dx) for the whole flow (blocks + ActNorm)."""
    tf.keras.utils.set_random_seed(2)
    flow = toy.build_flow("resflow", blocks=3, hidden=(16, 16), actnorm=True)
    x = (np.random.default_rng(1).normal(size=(5, 2)) * 2.0).astype(np.float32)
    flow.initialize(np.random.default_rng(2).normal(size=(200, 2)).astype(np.float32) * 3.0)

    def f(t):
        for b in flow.eval_bijectors:
            t = b.forward(t)
        return t

    z = f(tf.constant(x))
    expected = toy.standard_normal_log_prob(z).numpy() + exact_log_det(f, x, per_example=True)
    np.testing.assert_allclose(
        flow.log_prob_exact(tf.constant(x)).numpy(), expected, rtol=1e-4, atol=1e-4
    )
    # The sampler inverts the flow: f(sample) matches the latent it came from.
    s = flow.sample(64, seed=3)
    np.testing.assert_allclose(
        f(s).numpy(), tf.random.stateless_normal([64, 2], [3, 0]).numpy(), atol=1e-3
    )


def test_power_iterate_all_matches_per_layer_power_iteration():
    tf.keras.utils.set_random_seed(3)
    nets = [rlayers.lipschitz_dense_net(2, (8, 8), coeff=0.9, name=f"pi_{i}") for i in range(2)]
    layers = rlayers.lipschitz_layers(nets)
    for layer in layers:  # perturb: state far from converged
        layer.kernel.assign(layer.kernel * 3.0 + 0.1)
    start = [(layer.u.numpy(), layer.v.numpy()) for layer in layers]
    for layer in layers:
        layer.power_iterate(3)
    expected = [(layer.u.numpy(), layer.v.numpy(), layer.sigma.numpy()) for layer in layers]
    for layer, (u, v) in zip(layers, start):
        layer.u.assign(u)
        layer.v.assign(v)
    tf.function(lambda: toy.power_iterate_all(layers, 3))()
    for layer, (u, v, sigma) in zip(layers, expected):
        np.testing.assert_allclose(layer.u.numpy(), u, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.v.numpy(), v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.sigma.numpy(), sigma, rtol=1e-5)


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])  # width, height


_SMALL = [
    "--blocks",
    "2",
    "--hidden",
    "16-16",
    "--iters",
    "30",
    "--batch_size",
    "200",
    "--n_test",
    "1000",
    "--grid",
    "40",
    "--n_plot_samples",
    "500",
    "--log_every",
    "10",
]


@pytest.mark.parametrize(
    "model,data,extra",
    [
        ("resflow", "moons", ["--actnorm", "--eval_every", "10", "--plot_every", "20"]),
        ("iresnet", "8gaussians", ["--n_power_series", "3"]),
        ("coupling", "checkerboard", ["--actnorm"]),
        ("naf", "moons", []),
        ("mixlogcdf", "moons", []),
    ],
)
def test_short_run_writes_png_and_finite_test_nll(tmp_path, capsys, model, data, extra):
    result = toy.run(["--data", data, "--model", model, "--out", str(tmp_path)] + _SMALL + extra)
    assert np.isfinite(result["test_nll"])
    assert 0.5 < result["test_nll"] < 20.0
    assert result["sec_per_iter"] > 0
    assert result["png"] == os.path.join(str(tmp_path), f"{data}_{model}.png")
    width, height = _is_png(result["png"])
    assert width > 2 * height  # three panels side by side
    assert result["density"].shape == (40, 40) and np.all(np.isfinite(result["density"]))
    out = capsys.readouterr().out
    assert "it/s" in out and "ETA" in out and "test NLL" in out
    if "--eval_every" in extra:
        assert [it for it, _ in result["history"]] == [10, 20, 30]


def test_reused_trainer_reproduces_a_fresh_run(tmp_path):
    args = [
        "--data",
        "rings",
        "--model",
        "coupling",
        "--out",
        str(tmp_path),
        "--quiet",
        "--seed",
        "7",
    ] + _SMALL
    first = toy.run(args, reuse_trainer=True)
    second = toy.run(args, reuse_trainer=True)  # weights and Adam reset, no retrace
    assert second["trace_s"] == 0.0
    np.testing.assert_allclose(second["test_nll"], first["test_nll"], rtol=1e-5)


def test_unknown_dataset_in_process_lists_valid_names():
    with pytest.raises(SystemExit) as err:
        toy.parse_args(["--data", "nope"])
    assert err.value.code == 2
    with pytest.raises(ValueError, match="checkerboard"):
        toy.run({"data": "nope"})


def test_unknown_dataset_cli_exits_with_clear_message():
    proc = subprocess.run(
        [sys.executable, "-m", "train.toy", "--data", "not_a_density"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "not_a_density" in proc.stderr
    for name in TOY_DATASETS:
        assert name in proc.stderr


def test_default_toy_nets_are_the_references():
    # The reference's toy nets: activation before every linear layer, weights and
    # biases U(+-1/sqrt(fan_in)), last layer's weights 1/1000 of that range, so each
    # block starts close to the identity: |g(x)| is tiny at initialisation.
    tf.keras.utils.set_random_seed(0)
    flow = toy.build_flow("resflow", blocks=2, hidden=(32, 32))
    net = flow.keras_models[0]
    assert isinstance(net.layers[0], rlayers.LipSwish)
    dense = rlayers.lipschitz_layers(net)
    assert np.abs(dense[0].kernel.numpy()).max() <= 1 / np.sqrt(2)
    assert np.abs(dense[-1].kernel.numpy()).max() <= 1e-3 / np.sqrt(32)
    x = tf.random.normal([64, 2])
    g = net(x) - dense[-1].bias  # the last layer's output without its bias
    assert float(tf.reduce_max(tf.abs(g))) < 1e-2
    old = toy.build_flow(
        "resflow", blocks=1, hidden=(32,), init="glorot", preactivation=False, last_layer_scale=1.0
    )
    assert isinstance(old.keras_models[0].layers[0], rlayers.LipschitzDense)
