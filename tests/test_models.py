"""Tests for rflow_tf.models: exact change of variables, unbiasedness, sampling,
config round trips, the TFP distribution view and the image bijectors."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import assert_log_det_matches, exact_log_det

from rflow_tf import bijectors as rbij
from rflow_tf import layers as rlayers
from rflow_tf import models
from rflow_tf.flow import iter_stages

tfb = tfp.bijectors
tfd = tfp.distributions

# LogitTransform's constant log(1 - 2 alpha) is built from a float32 tensor,
# which is off by ~2.7e-8 per dimension in float64 for alpha = 1e-6; alpha =
# 0.25 makes 1 - 2 alpha exact so the comparisons below can be tight.
ALPHA = 0.25


def tiny_config(**kw):
    # inverse_tol: the fixed-point iteration stops when a step changes x by less
    # than the tolerance; the error left is up to Lip/(1 - Lip) (~50 at coeff
    # 0.98) times that, so 1e-10 keeps inverses within 1e-8 in float64.
    base = dict(
        input_shape=(4, 4, 1),
        n_blocks=(1, 1),
        hidden_channels=8,
        n_fc_blocks=1,
        fc_hidden=(8,),
        logit_alpha=ALPHA,
        logdet="exact",
        dtype="float64",
        inverse_tol=1e-10,
    )
    base.update(kw)
    return models.FlowConfig(**base)


def uniform(shape, seed=0, dtype=tf.float64, low=0.02, high=0.98):
    return tf.random.stateless_uniform(shape, [seed, 1], minval=low, maxval=high, dtype=dtype)


def make_model(cfg, seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = models.ResidualFlow(cfg)
    model.initialize(
        uniform((16,) + tuple(cfg.input_shape), seed=seed + 100, dtype=tf.as_dtype(cfg.dtype))
    )
    # Make the blocks' maps non-trivial: enlarge the kernels, then renormalise.
    for v in model.trainable_variables:
        if "kernel" in v.path:
            v.assign(v * 3.0)
    model.converge_lipschitz()
    return model


def brute_force_log_prob(model, x):
    """log N(f(x)) + log|det df/dx| with the full Jacobian of the whole map."""
    d = int(np.prod(x.shape[1:]))
    z = model.bijector.forward(x)
    logdet = exact_log_det(model.bijector.forward, x)
    base = -0.5 * tf.reduce_sum(z * z, -1) - 0.5 * d * math.log(2 * math.pi)
    return base + logdet


CONFIGS = {
    "factor_out+fc": dict(factor_out=True, fc_end=True),
    "fc_only": dict(factor_out=False, fc_end=True),
    "factor_out_no_fc": dict(factor_out=True, fc_end=False),
    "squeeze_first": dict(
        input_shape=(4, 4, 1), n_blocks=(1, 1), squeeze_first=True, factor_out=True, fc_end=True
    ),
    "3_scales_no_actnorm": dict(
        input_shape=(8, 4, 1),
        n_blocks=(1, 1, 1),
        actnorm=False,
        factor_out=True,
        fc_end=False,
        activation="elu",
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exact_log_prob_matches_full_jacobian(name):
    cfg = tiny_config(**CONFIGS[name])
    model = make_model(cfg)
    x = uniform((3,) + cfg.input_shape, seed=7)
    lp = model.log_prob(x)
    bf = brute_force_log_prob(model, x)
    np.testing.assert_allclose(lp.numpy(), bf.numpy(), rtol=1e-9, atol=1e-9)
    # bits/dim uses the same log-prob with the dequantisation constant.
    d = cfg.num_dims
    bpd = model.bits_per_dim(x)
    expected = -(bf - d * 8 * math.log(2)) / (d * math.log(2))
    np.testing.assert_allclose(bpd.numpy(), expected.numpy(), rtol=1e-9)
    # The latent is a flat vector of size D and the inverse recovers x.
    z = model.bijector.forward(x)
    assert z.shape == (3, d)
    # tf.identity: a new tensor, so the bijector cache cannot recall x.
    np.testing.assert_allclose(model.bijector.inverse(tf.identity(z)).numpy(), x.numpy(), atol=1e-6)


def test_unbiased_log_prob_agrees_on_average():
    cfg = tiny_config(factor_out=True, fc_end=True)
    exact = make_model(cfg)
    unbiased = models.ResidualFlow(cfg.replace(logdet="unbiased"))
    unbiased.set_weights(exact.get_weights())
    x = uniform((2,) + cfg.input_shape, seed=3)
    target = exact.log_prob(x).numpy()
    reps = 16
    x_rep = tf.repeat(x, reps, axis=0)  # independent probes per copy

    @tf.function
    def estimate(seed):
        return tf.reshape(unbiased.log_prob(x_rep, training=True, seed=seed), [2, reps])

    means = np.stack(
        [tf.reduce_mean(estimate(tf.constant([i, 5])), axis=1).numpy() for i in range(40)]
    )  # independent roulette draws per call
    mean = means.mean(0)
    se = means.std(0, ddof=1) / math.sqrt(len(means))
    assert np.all(se > 0)
    assert np.all(np.abs(mean - target) < 4 * se + 1e-9), (mean, target, se)


def test_distribution_matches_model_in_exact_mode():
    cfg = tiny_config(factor_out=True, fc_end=True)
    model = make_model(cfg)
    dist = model.distribution()
    assert isinstance(dist, tfd.TransformedDistribution)
    assert tuple(dist.event_shape) == cfg.input_shape
    x = uniform((4,) + cfg.input_shape, seed=11)
    np.testing.assert_allclose(dist.log_prob(x).numpy(), model.log_prob(x).numpy(), rtol=1e-10)
    # The same through the generic TFP path of the bijector.
    ld = model.bijector.forward_log_det_jacobian(x, event_ndims=3)
    z = model.bijector.forward(x)
    np.testing.assert_allclose(
        (model.base_log_prob(z) + ld).numpy(), model.log_prob(x).numpy(), rtol=1e-10
    )
    s = dist.sample(2, seed=[1, 2])
    assert s.shape == (2,) + cfg.input_shape
    assert len(dist.trainable_variables) == len(model.trainable_variables) > 0


def test_distribution_log_prob_does_not_invert_and_is_fresh():
    """TFP's default log_prob would run the fixed-point inverse; ours uses one
    data -> latent pass (an inverse capped at 1 iteration would break it)."""
    cfg = tiny_config(factor_out=True, fc_end=True, inverse_max_iterations=1)
    model = make_model(cfg)
    x = uniform((3,) + cfg.input_shape, seed=2)
    np.testing.assert_allclose(
        model.distribution().log_prob(x).numpy(), brute_force_log_prob(model, x).numpy(), rtol=1e-9
    )
    unbiased = models.ResidualFlow(cfg.replace(logdet="unbiased"))
    unbiased.set_weights(model.get_weights())
    dist = unbiased.distribution()
    a, b = dist.log_prob(x).numpy(), dist.log_prob(x).numpy()
    assert not np.allclose(a, b)  # no cached random estimate
    same = [
        dist.log_prob(x, bijector_kwargs={"seed": [4, 2], "training": True}).numpy()
        for _ in range(2)
    ]
    np.testing.assert_array_equal(same[0], same[1])


def test_sample_shapes_range_and_finite_log_prob():
    model = models.ResidualFlow("tiny")
    x = uniform((8, 8, 8, 1), seed=1, dtype=tf.float32)
    model.initialize(x)
    assert model.is_initialized
    imgs = model.sample(5, temperature=0.7, seed=[3, 4])
    assert imgs.shape == (5, 8, 8, 1) and imgs.dtype == tf.float32
    assert float(tf.reduce_min(imgs)) >= 0.0 and float(tf.reduce_max(imgs)) <= 1.0
    again = model.sample(5, temperature=0.7, seed=[3, 4])
    np.testing.assert_array_equal(imgs.numpy(), again.numpy())
    lp = model.log_prob(imgs)
    assert lp.shape == (5,) and np.all(np.isfinite(lp.numpy()))
    bpd = model.bits_per_dim(x, training=True, seed=[1, 1])
    assert bpd.shape == (8,) and np.all(np.isfinite(bpd.numpy()))
    # Unbatched input gives a scalar.
    assert model.log_prob(x[0]).shape == ()
    with pytest.raises(ValueError):
        model.sample(0)


def test_gradients_reach_every_trainable_variable():
    cfg = models.get_preset("tiny", factor_out=True)
    model = models.ResidualFlow(cfg)
    x = uniform((4, 8, 8, 1), dtype=tf.float32)
    model.initialize(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model.bits_per_dim(x, training=True, seed=[0, 1]))
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    for g, v in zip(grads, model.trainable_variables):
        assert g is not None, v.path
        assert np.all(np.isfinite(g.numpy())), v.path
    # Weights live in Keras layers tracked by the model (and in checkpoints).
    n_weights = sum(len(layer.trainable_weights) for layer in model.flow_layers)
    assert n_weights == len(model.trainable_variables)


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config(factor_out=True)
    model = make_model(cfg, seed=1)
    x = uniform((3,) + cfg.input_shape, seed=5)
    lp = model.log_prob(x).numpy()
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ck"))
    other = models.ResidualFlow(cfg)
    assert not other.is_initialized
    tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
    assert other.is_initialized
    # A plain restore re-converges power iteration on first use (the kernel
    # differs from the one the layer last estimated); declaring the restored
    # estimate current gives back exactly the saved model.
    other.mark_lipschitz_current()
    np.testing.assert_allclose(other.log_prob(x).numpy(), lp, rtol=1e-12)


def test_config_json_round_trip_and_presets():
    for name in models.PRESETS:
        cfg = models.get_preset(name)
        assert models.FlowConfig.from_json(cfg.to_json()) == cfg
        assert models.FlowConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert isinstance(models.get_preset_training(name)["batch_size"], int)
    celeb = models.PRESETS["celeb_a_hq"]
    assert celeb.config.input_shape == (256, 256, 3) and celeb.config.n_bits == 5
    assert celeb.config.activation == "elu" and celeb.config.factor_out
    assert not celeb.config.fc_end and celeb.config.n_exact_terms == 8
    assert celeb.batch_size == 8 and celeb.accumulate == 5
    assert models.get_preset("mnist").n_blocks == (16, 16, 16)
    assert models.get_preset("imagenet32").n_blocks == (32, 32, 32)
    assert models.get_preset("mnist").logit_alpha == 1e-6
    assert models.get_preset("cifar10").logit_alpha == 0.05
    assert models.preset_for_dataset("digits") == "digits_small"
    assert models.get_preset("cifar10", n_exact_terms=4).n_exact_terms == 4

    model = models.ResidualFlow(tiny_config(factor_out=True))
    clone = models.ResidualFlow.from_config(model.get_config())
    assert clone.flow_config == model.flow_config
    assert len(clone.trainable_variables) == len(model.trainable_variables)
    assert models.ResidualFlow(model.flow_config.to_json()).flow_config == model.flow_config


def test_paper_architecture_structure_celeba():
    # The CelebA-HQ layout with tiny widths: squeeze first, 6 scales, 5 factor-outs.
    cfg = models.get_preset(
        "celeb_a_hq", input_shape=(64, 64, 3), n_blocks=(1,) * 6, hidden_channels=4
    )
    model = models.ResidualFlow(cfg)
    stages = list(iter_stages(model.stages))
    assert sum(isinstance(b, models.FactorOut) for b in stages) == 5
    assert sum(isinstance(b, rbij.IResBlock) for b in stages) == 6
    assert isinstance(model.stages[1], rbij.Squeeze)  # squeeze_first
    assert model.latent_shape == (64 * 64 * 3,)
    x = uniform((2, 64, 64, 3), dtype=tf.float32)
    model.initialize(x)
    z, ld = model.forward_and_log_det(x, seed=[1, 2])
    assert z.shape == (2, 64 * 64 * 3) and ld.shape == (2,)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(input_shape=(7, 7, 1), n_blocks=(1, 1)), ValueError),
        (dict(input_shape=(8, 8)), ValueError),
        (dict(input_shape=(4, 4, 1), n_blocks=(1, 1, 1), squeeze_first=True), ValueError),
        (dict(coeff=1.0), ValueError),
        (dict(activation="tanh"), ValueError),
        (dict(kernels="3-2-3"), ValueError),
        (dict(n_bits=9), ValueError),
        (dict(dtype="float16"), ValueError),
        (dict(neumann_grad=False, grad_in_forward=True), ValueError),
        (dict(n_blocks=()), ValueError),
        (dict(hidden_channels=2.5), TypeError),
    ],
)
def test_invalid_configs(kwargs, err):
    with pytest.raises(err):
        models.FlowConfig(**kwargs).validate()


def test_unknown_config_keys_and_presets():
    with pytest.raises(ValueError, match="Unknown FlowConfig keys"):
        models.FlowConfig.from_dict({"nblocks": [1]})
    with pytest.raises(ValueError, match="valid presets"):
        models.get_preset("imagenet128")


def test_bad_inputs_give_clear_errors():
    model = models.ResidualFlow("tiny")
    good = uniform((2, 8, 8, 1), dtype=tf.float32)
    with pytest.raises(TypeError, match="dequantize"):
        model.log_prob(tf.zeros([2, 8, 8, 1], tf.uint8))
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(tf.zeros([2, 8, 8, 3]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.log_prob(good + 1.0)
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(tf.where(good > 0.5, np.nan, good))

    @tf.function
    def lp(x):
        return model.log_prob(x)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\]"):
        lp(good - 1.0)


# ----------------------------------------------------------------------------
# Image bijectors against brute force
# ----------------------------------------------------------------------------


def check_bijector(bij, x, event_ndims, atol=1e-8, **kwargs):
    """inverse(forward(x)) == x and fldj == log|det| of the full Jacobian."""
    b = x.shape[0]
    _, bf = assert_log_det_matches(bij, x, event_ndims, rtol=1e-9, atol=atol, **kwargs)
    y = tf.identity(
        bij.forward(x, **kwargs)
    )  # a new tensor: the inverse is computed, not recalled from a cache
    np.testing.assert_allclose(bij.inverse(y, **kwargs).numpy(), x.numpy(), atol=atol)
    ild = bij.inverse_log_det_jacobian(y, event_ndims=len(y.shape) - 1, **kwargs)
    np.testing.assert_allclose(np.broadcast_to(ild.numpy(), [b]), -bf, atol=atol, rtol=1e-9)
    return y


def test_actnorm_bijector_brute_force():
    layer = rlayers.ActNormalization(dtype="float64")
    an = rbij.ActNorm((3, 2, 4), layer=layer)
    x = uniform((5, 3, 2, 4), seed=4) * 3.0 - 1.0
    an.initialize(x * 2.0 + 0.5)
    assert bool(layer.initialized.numpy())
    assert not np.allclose(layer.log_scale.numpy(), 0.0)
    check_bijector(an, x, 3)


def test_squeeze_bijector_brute_force():
    x = uniform((2, 4, 6, 2), seed=5)
    y = check_bijector(rbij.Squeeze(), x, 3)
    assert y.shape == (2, 2, 3, 8)


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_logit_bijector_brute_force(alpha):
    x = uniform((3, 2, 2, 1), seed=6)
    check_bijector(rbij.LogitTransform(alpha), x, 3)


def test_factor_out_bijector_brute_force():
    an = rbij.ActNorm((2, 2, 1), layer=rlayers.ActNormalization(dtype="float64"))
    an.initialize(uniform((8, 2, 2, 1), seed=1) * 4.0)
    inner = [
        an,
        tfb.Reshape([4], [2, 2, 1]),
        tfb.Scale(tf.constant([1.0, 2.0, 3.0, 0.5], tf.float64)),
    ]
    fo = models.FactorOut((2, 2, 3), inner)
    x = uniform((3, 2, 2, 3), seed=8)
    z = check_bijector(fo, x, 3)
    assert z.shape == (3, 12)
    # Factored channels (1..2) come first, unchanged, in (h, w, c) order.
    np.testing.assert_array_equal(z[:, :8].numpy(), tf.reshape(x[..., 1:], [3, 8]).numpy())
    assert fo.forward_event_shape([2, 2, 3]) == [12]
    assert fo.inverse_event_shape([12]) == [2, 2, 3]


def test_factor_out_with_residual_blocks_brute_force():
    blk = rbij.IResBlock.conv((2, 2, 2), hidden_channels=4, dtype="float64", logdet="exact")
    fo = models.FactorOut((2, 2, 4), [blk, tfb.Reshape([8], [2, 2, 2])])
    check_bijector(fo, uniform((2, 2, 2, 4), seed=9), 3, atol=1e-6)


def test_flow_bijector_seed_routing():
    model = models.ResidualFlow(tiny_config(logdet="unbiased", factor_out=True))
    x = uniform((2, 4, 4, 1))
    a = model.bijector.forward_log_det_jacobian(x, event_ndims=3, seed=[1, 2], training=True)
    b = model.bijector.forward_log_det_jacobian(x, event_ndims=3, seed=[1, 2], training=True)
    c = model.bijector.forward_log_det_jacobian(x, event_ndims=3, seed=[1, 3], training=True)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())
    _, ld = model.forward_and_log_det(x, training=True, seed=[1, 2])
    np.testing.assert_allclose(ld.numpy(), a.numpy(), rtol=1e-12)
    # Extra batch dimensions are accepted by the bijector.
    assert model.bijector.forward(tf.reshape(tf.concat([x, x], 0), [2, 2, 4, 4, 1])).shape == (
        2,
        2,
        16,
    )


# ---------------------------------------------------------------- reference parity


@pytest.mark.parametrize("order", rbij.SQUEEZE_ORDERS)
def test_squeeze_channel_order_known_values(order):
    # x[0, y, x, c] = 100 y + 10 x + c: every value names its pixel and channel.
    h, w, c = 4, 6, 3
    vals = np.array(
        [[[100 * i + 10 * j + k for k in range(c)] for j in range(w)] for i in range(h)], np.float64
    )[None]
    out = rbij.Squeeze(order).forward(tf.constant(vals)).numpy()
    assert out.shape == (1, h // 2, w // 2, 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            for k in range(c):
                for dy in range(2):
                    for dx in range(2):
                        ch = k * 4 + 2 * dy + dx if order == "reference" else (2 * dy + dx) * c + k
                        assert out[0, i, j, ch] == 100 * (2 * i + dy) + 10 * (2 * j + dx) + k
    y = check_bijector(rbij.Squeeze(order), uniform((2, 4, 6, 2), seed=5), 3)
    assert y.shape == (2, 2, 3, 8)


def test_squeeze_rejects_bad_order_and_shapes():
    with pytest.raises(ValueError, match="order"):
        rbij.Squeeze("nchw")
    with pytest.raises(ValueError, match="even"):
        rbij.Squeeze().forward(tf.zeros([1, 3, 4, 1]))
    with pytest.raises(ValueError, match="divisible by 4"):
        rbij.Squeeze().inverse(tf.zeros([1, 2, 2, 3]))


def _is_preactivated(block):
    return not isinstance(block.net.layers[0], (rlayers.LipschitzConv2D, rlayers.LipschitzDense))


def _layout(model):
    """(kind, detail) per stage in application order, descending into FactorOut."""
    out = []
    for b in iter_stages(model.stages):
        if isinstance(b, rbij.IResBlock):
            out.append(("block", "preact" if _is_preactivated(b) else "no_preact"))
        elif isinstance(b, rbij.Squeeze):
            out.append(("squeeze", b.order))
        elif isinstance(b, rbij.ActNorm):
            out.append(("actnorm", None))
    return out


PAPER_PRESETS = ("mnist", "cifar10", "imagenet32", "imagenet64", "celeb_a_hq")


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_preset_layout_matches_reference(name):
    # The reference (StackediResBlocks with first_resblock, actnorm, preact):
    # [squeeze] ActNorm, block 0 of scale 0 without pre-activation, every other
    # block pre-activated and followed by an ActNorm, squeezes in c*4+2dy+dx order.
    preset = models.get_preset(name)
    assert preset.first_resblock and preset.squeeze_order == "reference"
    assert preset.config_version == models.CONFIG_VERSION
    n_scales = preset.n_scales
    size = 2 ** (n_scales - 1 + preset.squeeze_first) * 2
    cfg = preset.replace(
        input_shape=(size, size, 3),
        n_blocks=(2,) * n_scales,
        hidden_channels=4,
        fc_hidden=(4,),
        n_fc_blocks=1,
    )
    expected = [("squeeze", "reference")] if cfg.squeeze_first else []
    expected.append(("actnorm", None))
    for s in range(n_scales):
        for i in range(2):
            expected += [("block", "no_preact" if s == i == 0 else "preact"), ("actnorm", None)]
        if s < n_scales - 1:
            expected.append(("squeeze", "reference"))
    if cfg.fc_end:
        expected += [("block", "preact"), ("actnorm", None)]
    assert _layout(models.ResidualFlow(cfg)) == expected


def test_config_version_1_keeps_old_meaning():
    # A dict without config_version is version 1: space_to_depth squeezes, an
    # ActNorm before the first block and every block pre-activated.
    old = tiny_config(n_blocks=(1, 1), fc_end=False).to_dict()
    for key in ("config_version", "first_resblock", "squeeze_order", "init"):
        del old[key]
    v1 = models.FlowConfig.from_dict(old)
    assert (v1.config_version, v1.first_resblock, v1.squeeze_order, v1.init) == (
        1,
        False,
        "space_to_depth",
        "glorot",
    )
    # Version 2 already had first_resblock and squeeze_order, not init.
    assert models.FlowConfig.from_dict(dict(old, config_version=2)).init == "glorot"
    assert _layout(models.ResidualFlow(v1)) == [
        ("actnorm", None),
        ("block", "preact"),
        ("actnorm", None),
        ("squeeze", "space_to_depth"),
        ("block", "preact"),
        ("actnorm", None),
    ]
    assert models.FlowConfig.from_json(v1.to_json()) == v1  # round trip keeps version 1
    # Version 2 with first_resblock=False is the reference's: no leading ActNorm.
    v2 = tiny_config(n_blocks=(1, 1), fc_end=False, first_resblock=False)
    assert _layout(models.ResidualFlow(v2))[0] == ("block", "preact")
    # Explicit keys win over the version's defaults.
    assert models.FlowConfig.from_dict(dict(old, first_resblock=True)).first_resblock
    with pytest.raises(ValueError, match="config_version"):
        models.FlowConfig.from_dict(dict(old, config_version=models.CONFIG_VERSION + 1))
    with pytest.raises(ValueError, match="squeeze_order"):
        tiny_config(squeeze_order="nchw").validate()


def test_non_finite_sample_is_nan_with_a_warning(capfd):
    """An infinite latent (here from temperature=inf) must not come back as a plausible
    clipped image: every block reports the diverged inverse, the sample is NaN."""
    model = make_model(tiny_config(logdet="unbiased"))
    with pytest.warns(RuntimeWarning, match="2 of 2 sample.*not finite"):
        imgs = model.sample(2, temperature=float("inf"), seed=[3, 4])
    assert np.all(np.isnan(imgs.numpy()))
    ok = model.sample(2, temperature=0.5, seed=[3, 4]).numpy()  # finite ones unchanged
    assert np.all((ok >= 0.0) & (ok <= 1.0))
    # Inside tf.function the warning goes to stderr.
    graph = tf.function(lambda: model.sample(2, temperature=float("inf"), seed=[3, 4]))
    assert np.all(np.isnan(graph().numpy()))
    assert "2 of 2 sample(s) not finite" in capfd.readouterr().err


def test_logdet_eval_defaults_and_versions():
    assert models.FlowConfig(logdet="truncated").logdet_eval_mode == "unbiased"
    assert models.FlowConfig(logdet="exact").logdet_eval_mode == "exact"
    assert models.FlowConfig(logdet="truncated", logdet_eval="exact").logdet_eval_mode == "exact"
    # Before version 3 evaluation used the training estimator.
    old = dict(models.FlowConfig(logdet="truncated").to_dict(), config_version=2)
    del old["logdet_eval"]
    assert models.FlowConfig.from_dict(old).logdet_eval_mode == "truncated"
    with pytest.raises(ValueError, match="logdet_eval"):
        models.FlowConfig(logdet_eval="biased").validate()
    # A flow trained truncated evaluates (training=False) with the exact log-det
    # here, so log_prob is the change of variables of the full Jacobian.
    cfg = tiny_config(logdet="truncated", logdet_eval="exact", n_terms=1)
    model = make_model(cfg)
    x = uniform((3,) + cfg.input_shape, seed=8)
    np.testing.assert_allclose(
        model.log_prob(x).numpy(), brute_force_log_prob(model, x).numpy(), rtol=1e-9, atol=1e-9
    )
    lp_train = model.log_prob(x, training=True, seed=[1, 2]).numpy()
    assert not np.allclose(lp_train, model.log_prob(x).numpy(), atol=1e-6)
