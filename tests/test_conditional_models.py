"""Class-conditional multiscale flows p(x | y): the label, embedded, is the context
of every residual block (FlowConfig.condition_classes)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import exact_log_det

from rflow_tf.bijectors import conditional_kwargs


def tiny_conditional_flow(**overrides):
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow

    settings = dict(
        input_shape=(4, 4, 1), n_blocks=(1, 1), hidden_channels=4, kernels="3-1-3",
        fc_end=False, factor_out=True, condition_classes=3, condition_embedding=5,
        logdet="exact", dtype="float64",
    )  # fmt: skip
    settings.update(overrides)
    return ResidualFlow(FlowConfig(**settings))


def test_class_conditional_multiscale_flow():
    keras.utils.set_random_seed(30)
    flow = tiny_conditional_flow()
    x = tf.random.stateless_uniform([6, 4, 4, 1], seed=[0, 1], dtype=tf.float64)
    y = tf.constant([0, 1, 2, 0, 1, 2])
    flow.initialize(x, label=y)
    lp = flow.log_prob(x, label=y).numpy()
    assert np.abs(lp - flow.log_prob(x, label=(y + 1) % 3).numpy()).max() > 1e-4
    # The change of variables with slogdet of the whole flow's Jacobian in x.
    context = flow.label_context(y)

    def forward(t):
        return flow.bijector.forward(tf.reshape(t, [-1, 4, 4, 1]), conditional_input=context)

    flat = tf.reshape(x, [6, 16])
    expected = flow.base_log_prob(forward(flat)).numpy() + exact_log_det(forward, flat)
    np.testing.assert_allclose(lp, expected, rtol=1e-8)
    # Inverse round trip and samples per class.
    z = flow.bijector.forward(x, conditional_input=context)
    x_back = flow.bijector.inverse(z + 0.0, conditional_input=context)
    np.testing.assert_allclose(x_back.numpy(), x.numpy(), atol=1e-6)
    for label in (0, 2):
        imgs = flow.sample(3, seed=[1, label], label=label)
        assert imgs.shape == (3, 4, 4, 1) and np.isfinite(imgs.numpy()).all()
    # The TFP distribution takes the embedded label through conditional_kwargs.
    dist = flow.distribution()
    lp_dist = dist.log_prob(x, bijector_kwargs=conditional_kwargs(dist, context)).numpy()
    np.testing.assert_allclose(lp_dist, lp, rtol=1e-8)
    # A Keras training step on an (image, label) batch trains the label embedding too.
    before = flow.label_embedding.get_weights()[0].copy()
    flow.compile(optimizer=keras.optimizers.Adam(1e-2))
    images = tf.constant((x.numpy() * 255).astype(np.uint8))
    logs = flow.train_step((images, y))  # eagerly: one step, no tracing
    assert np.isfinite(float(logs["loss"]))
    assert np.abs(flow.label_embedding.get_weights()[0] - before).max() > 0


def test_class_conditional_config_errors_and_old_configs():
    from rflow_tf.config import FlowConfig

    flow = tiny_conditional_flow()
    x = tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1], dtype=tf.float64)
    with pytest.raises(ValueError, match="needs label"):
        flow.log_prob(x)
    with pytest.raises(TypeError, match="integer class ids"):
        flow.log_prob(x, label=tf.constant([0.0, 1.0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="label must be in"):
        flow.log_prob(x, label=[0, 3])
    with pytest.raises(ValueError, match="block='residual'"):
        FlowConfig(input_shape=(4, 4, 1), condition_classes=3, block="coupling").validate()
    # A config written without the fields is an unconditional model.
    old = tiny_conditional_flow(condition_classes=0).flow_config.to_dict()
    old.pop("condition_classes"), old.pop("condition_embedding")
    assert FlowConfig.from_dict(old).condition_classes == 0
    cfg = FlowConfig.from_dict(flow.flow_config.to_dict())
    assert (cfg.condition_classes, cfg.condition_embedding) == (3, 5)
    plain = tiny_conditional_flow(condition_classes=0)
    assert plain.label_embedding is None
    with pytest.raises(ValueError, match="unconditional"):
        plain.log_prob(x, label=[0, 1])


def test_class_sample_grid_png_has_one_row_per_class(tmp_path):
    keras.utils.set_random_seed(31)
    flow = tiny_conditional_flow(n_blocks=(1,), factor_out=False, dtype="float32")
    flow.initialize(
        tf.random.stateless_uniform([6, 4, 4, 1], seed=[2, 2]), label=[0, 1, 2, 0, 1, 2]
    )
    from rflow_tf.training import class_sample_grid

    path = class_sample_grid(flow, str(tmp_path / "classes.png"), per_class=2, seed=3)
    header = (tmp_path / "classes.png").read_bytes()[:24]
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (2 * (4 + 1) + 1, 3 * (4 + 1) + 1)  # 2 per row, 3 classes
    assert path == str(tmp_path / "classes.png")
    with pytest.raises(ValueError, match="class-conditional"):
        class_sample_grid(tiny_conditional_flow(condition_classes=0), str(tmp_path / "x.png"))


def test_trainer_task_conditional_trains_evaluates_and_samples_per_class(tmp_path):
    """--task=conditional on the labelled digits: a class-conditional flow (one
    class per label), trained on (image, label) batches, evaluated in bits/dim of
    p(x | y) and sampled one row per class."""
    import math

    from tiny_runs import tiny_run

    from rflow_tf.training import Trainer, UsageError, resolve_run

    export_dir = str(tmp_path / "export")
    config, options = tiny_run(
        tmp_path, task="conditional", n_sample_images=20, export_dir=export_dir
    )
    assert (config.condition_classes, config.n_classes) == (10, 0)
    trainer = Trainer(config, options)
    embedding = trainer.model.label_embedding.get_weights()[0].copy()
    result = trainer.fit()
    assert result["task"] == "conditional" and result["step"] == 3
    assert math.isfinite(result["test_bpd"]) and 0 < result["test_bpd"] < 20
    assert "test_accuracy" not in result and result["export_dir"] == export_dir
    assert np.abs(trainer.model.label_embedding.get_weights()[0] - embedding).max() > 0
    header = open(result["samples"], "rb").read()[:24]
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (2 * (8 + 1) + 1, 10 * (8 + 1) + 1)  # 2 per class, 10 classes
    # The export loads as a distribution of p(x | y) holding the EMA weights, and
    # its bits/dim signature takes the labels.
    import rflow_tf

    dist = rflow_tf.load(export_dir)
    assert dist.condition_classes == 10 and dist.metadata["condition_classes"] == 10
    with trainer.ema.weights():
        for a, b in zip(trainer.model.get_weights(), dist.model.get_weights()):
            np.testing.assert_array_equal(a, b)
    x_int = np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8, 1) % 17
    obj = tf.saved_model.load(export_dir)
    bpd = obj.bits_per_dim(x_int, [0, 3, 7, 9]).numpy()
    assert np.all(np.isfinite(bpd)) and np.all(bpd > 0)
    with pytest.raises(UsageError, match="condition_classes=10"):
        resolve_run(config.replace(condition_classes=3), options)
