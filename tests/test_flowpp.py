"""Flow++ image model (FlowConfig.block="flowpp") and --dequantization in train/main.py.

Exact math: the model's log-det against the log|det| of its full Jacobian
(float64, tf.linalg.slogdet), the inverse round trip, and the trainer's
variational bits/dim against the negative-ELBO formula written out by hand.
One tiny trainer run (Flow++ + variational dequantisation) is shared.
"""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from helpers import exact_log_det  # noqa: E402
from tiny_runs import DEFAULT, tiny_flags  # noqa: E402

import rflow_tf  # noqa: E402
from rflow_tf import export, models, training  # noqa: E402
from rflow_tf.bijectors import mixlogcdf  # noqa: E402
from train import main as trainer_main  # noqa: E402

TINY_FLOWPP = tiny_flags(
    "--batch_size=8",
    "--steps=2",
    "--eval_every=2",
    "--sample_every=2",
    "--eval_examples=16",
    "--dequantization=variational",
    preset="flowpp_digits",
    n_blocks=(1, 1),
    fc_end=DEFAULT,
    export_dir=DEFAULT,
    n_sample_images=2,
)


def _tiny_flowpp(**changes):
    return models.get_preset("flowpp_digits").replace(n_blocks=(2, 3), hidden_channels=8, **changes)


def test_flowpp_logdet_is_the_exact_jacobian_and_inverse_round_trips():
    # Seeded: the round trip's error depends on the weights (3e-9 to 1e-7 over
    # eight seeds; one unseeded draw gave 7e-6 in one example).
    keras.utils.set_random_seed(0)
    flow = models.ResidualFlow(_tiny_flowpp(dtype="float64", inverse_tol=1e-10))
    x = tf.random.stateless_uniform([2, 8, 8, 1], [0, 1], dtype=tf.float64)
    flow.initialize(x)
    rng = np.random.default_rng(0)  # a fresh coupling is the identity: perturb
    for v in flow.trainable_variables:
        v.assign(v + 0.2 * rng.standard_normal(v.shape))
    couplings = [b for b in flow.stages if isinstance(b, mixlogcdf.MixLogCDFCoupling)]
    # Scale 0: checkerboard; scale 1: 2 channel couplings then checkerboard; kept
    # half alternating.
    assert [(b.name, b.mask.shape) for b in couplings] == [
        ("s0_block0", (8, 8, 1)),
        ("s0_block1", (8, 8, 1)),
        ("s1_block0", (4, 4, 4)),
        ("s1_block1", (4, 4, 4)),
        ("s1_block2", (4, 4, 4)),
    ]
    np.testing.assert_array_equal(
        couplings[0].mask.numpy(), mixlogcdf.coupling_mask((8, 8, 1), "checkerboard")
    )
    np.testing.assert_array_equal(
        couplings[1].mask.numpy(), mixlogcdf.coupling_mask((8, 8, 1), "checkerboard", 1)
    )
    np.testing.assert_array_equal(
        couplings[3].mask.numpy(), mixlogcdf.coupling_mask((4, 4, 4), "channel", 1)
    )
    np.testing.assert_array_equal(
        couplings[4].mask.numpy(), mixlogcdf.coupling_mask((4, 4, 4), "checkerboard")
    )
    z, ld = flow.forward_and_log_det(x)
    exact = exact_log_det(lambda t: flow.forward_and_log_det(t)[0], x[:2], per_example=True)
    np.testing.assert_allclose(ld[:2].numpy(), exact, rtol=0, atol=1e-6)
    # The bisection stops within 1e-10 (abs + rel) per coupling, in the latent's
    # coordinates; through the logit and ActNorm inverses that is far below 1e-6.
    # A copy of z: the bijector cache would answer inverse(z) without inverting.
    np.testing.assert_allclose(flow.bijector.inverse(tf.identity(z)).numpy(), x.numpy(), atol=1e-6)


def test_flowpp_config_errors_and_configs_without_block_stay_residual():
    with pytest.raises(ValueError, match="block must be one of"):
        models.FlowConfig(input_shape=(8, 8, 1), n_blocks=(1,), block="glow").validate()
    with pytest.raises(ValueError, match="flowpp_heads=3 must divide hidden_channels=8"):
        _tiny_flowpp(flowpp_heads=3)
    with pytest.raises(ValueError, match="flowpp_components must be > 0"):
        _tiny_flowpp(flowpp_components=0)
    # Configs written before the field existed (the shipped model included) are
    # residual flows: the new fields' defaults are the old meaning.
    with open(os.path.join(REPO, "saved_models", "digits", "assets", export.METADATA_FILE)) as f:
        old = json.load(f)["config"]
    assert "block" not in old
    assert models.FlowConfig.from_dict(old).block == "residual"
    cfg = models.get_preset("flowpp_cifar10")
    assert (cfg.input_shape, cfg.n_blocks, cfg.block, cfg.flowpp_components) == (
        (32, 32, 3),
        (4, 5),
        "flowpp",
        32,
    )
    assert models.FlowConfig.from_json(cfg.to_json()) == cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("flowpp_run")
    args = trainer_main.parse_args(TINY_FLOWPP + [f"--out={out}/run", f"--export_dir={out}/export"])
    trainer = trainer_main.make_trainer(args)
    result = trainer.train()
    return trainer, result, out


def test_flowpp_variational_trains_exports_and_loads(trained):
    trainer, result, _ = trained
    assert result["step"] == 2 and math.isfinite(result["test_bpd"])
    assert isinstance(trainer.dequantizer, rflow_tf.VariationalDequantizer)
    n_deq = len(trainer.dequantizer.trainable_variables)
    assert n_deq > 0 and len(trainer.ema_vars) == len(trainer.model.trainable_variables) + n_deq
    dist = rflow_tf.load(result["export_dir"])
    assert isinstance(dist, tfp.distributions.TransformedDistribution)
    assert dist.model.flow_config.block == "flowpp"
    x = tf.random.stateless_uniform([3, 8, 8, 1], [4, 5])
    with trainer.ema_weights():
        expected = trainer.model.log_prob(x).numpy()
    np.testing.assert_allclose(dist.log_prob(x).numpy(), expected, rtol=1e-5, atol=1e-3)


def test_dequantizer_is_checkpointed_resumed_and_fixed_for_the_run(trained):
    trainer, _, out = trained
    saved = [v.numpy() for v in trainer.dequantizer.trainable_variables]
    args = trainer_main.parse_args(TINY_FLOWPP + [f"--out={out}/run", f"--export_dir={out}/export"])
    fresh = trainer_main.make_trainer(args)  # the flags of the trained run
    assert not any(
        np.array_equal(a, b.numpy())
        for a, b in zip(saved, fresh.dequantizer.trainable_variables)
        if a.ndim > 1
    )
    assert fresh.restore_or_initialize() is not None
    for a, b in zip(saved, fresh.dequantizer.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())
    fresh.close()
    # The same run directory with uniform noise is refused before any model is built.
    args = trainer_main.parse_args(TINY_FLOWPP[:-1] + [f"--out={out}/run", "--export_dir="])
    with pytest.raises(training.UsageError, match="--dequantization=variational"):
        trainer_main.make_trainer(args)


def test_eval_step_reports_the_negative_elbo_bound():
    # bpd = -(log p(y) - D n ln 2 - log q(u|x)) / (D ln 2), y = (x + u) / 2^n, with the
    # seeds make_eval_step documents (fold_in of [seed + 1_000_003, batch index]).
    cfg = models.get_preset("tiny").replace(n_blocks=(1,), fc_end=False, hidden_channels=4)
    flow = models.ResidualFlow(cfg)
    deq = training.make_dequantizer("variational", cfg)
    x_int = tf.random.stateless_uniform([4, 8, 8, 1], [2, 3], 0, 256, tf.int32)
    flow.initialize(tf.cast(x_int, tf.float32) / 256.0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    step = training.make_eval_step(flow, strategy, n_bits=8, seed=7, dequantizer=deq)
    total, _, count = step(x_int, tf.ones([4], tf.bool), tf.constant(0, tf.int64))
    pair = tf.random.experimental.stateless_fold_in(tf.constant([7 + 1_000_003, 0], tf.int64), 0)
    seeds = tf.random.experimental.stateless_split(pair, 2)
    u, log_q = deq.sample_and_log_prob(tf.cast(x_int, tf.float32), seeds[0])
    y = (tf.cast(x_int, tf.float32) + u) / 256.0
    lp = flow.log_prob(y, seed=seeds[1])
    d = 64.0
    by_hand = -(lp - d * 8 * math.log(2.0) - log_q) / (d * math.log(2.0))
    assert float(count) == 4.0
    np.testing.assert_allclose(float(total), float(tf.reduce_sum(by_hand)), rtol=1e-5)
    # log q(u|x) < 0 on average would make the bound worse than uniform's at the
    # same u; here just check it is what enters the bound (not the uniform number).
    uniform = -(lp - d * 8 * math.log(2.0)) / (d * math.log(2.0))
    np.testing.assert_allclose(
        float(total) - float(tf.reduce_sum(uniform)),
        float(tf.reduce_sum(log_q)) / (d * math.log(2.0)),
        rtol=1e-4,
    )
