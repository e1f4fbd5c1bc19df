"""SavedModel export of a class-conditional flow p(x | y) and rflow_tf.load of it:
the signatures take the label, the loaded distribution takes ``label=``, and a
missing, unexpected or bad label is refused with an error naming the problem."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import rflow_tf
from rflow_tf import data as rdata
from rflow_tf import export, export_format
from rflow_tf.config import FlowConfig
from rflow_tf.models import ResidualFlow

CLASSES = 3
SHIPPED = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "saved_models", "digits"
)


@pytest.fixture(scope="module")
def conditional_export(tmp_path_factory):
    """A one-block class-conditional flow of 4x4 images (3 classes), ActNorm
    initialised, exported with exact log-dets."""
    keras.utils.set_random_seed(40)
    flow = ResidualFlow(
        FlowConfig(
            input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4, fc_end=False,
            condition_classes=CLASSES, condition_embedding=4, logdet="exact",
        )
    )  # fmt: skip
    x = tf.random.stateless_uniform([6, 4, 4, 1], seed=[0, 1])
    y = tf.constant([0, 1, 2, 0, 1, 2])
    flow.initialize(x, label=y)
    # Embeddings far enough apart that the classes' densities differ clearly.
    flow.label_embedding.set_weights([np.eye(CLASSES, 4, dtype=np.float32) * 2.0])
    path = str(tmp_path_factory.mktemp("export") / "conditional")
    export.save(flow, path)  # converges the flow's norm estimates: references come after
    x_int = tf.cast(tf.floor(x * 256.0), tf.uint8).numpy()
    return dict(flow=flow, path=path, x=x.numpy(), y=y.numpy(), x_int=x_int)


def test_signatures_take_the_label_and_metadata_records_the_classes(conditional_export):
    flow, path = conditional_export["flow"], conditional_export["path"]
    x, y, x_int = conditional_export["x"], conditional_export["y"], conditional_export["x_int"]
    meta = export.load_metadata(path)
    assert meta["format_version"] == export.FORMAT_VERSION == 2
    assert (meta["conditional"], meta["condition_classes"], meta["condition_embedding"]) == (
        True,
        CLASSES,
        4,
    )
    obj = tf.saved_model.load(path)
    assert int(obj.metadata()["condition_classes"]) == CLASSES and int(obj.format_version) == 2
    assert sorted(obj.signatures) == sorted(meta["signatures"])
    # log p(x | y): one label per image, or one for the whole batch.
    np.testing.assert_allclose(
        obj.log_prob(x, y).numpy(), flow.log_prob(x, label=y).numpy(), rtol=1e-5, atol=1e-4
    )
    served = obj.signatures["serving_default"](x=tf.constant(x), label=tf.constant(y))
    np.testing.assert_allclose(served["log_prob"].numpy(), obj.log_prob(x, y).numpy(), rtol=1e-6)
    for label in range(CLASSES):
        np.testing.assert_allclose(
            obj.log_prob(x, label).numpy(),
            flow.log_prob(x, label=label).numpy(),
            rtol=1e-5,
            atol=1e-4,
        )
    # bits/dim of raw pixels given the label: the export's seeded dequantisation.
    dequantized = rdata.dequantize(x_int, 8, seed=meta["dequantization_seed"])
    np.testing.assert_allclose(
        obj.bits_per_dim(x_int, y).numpy(),
        flow.bits_per_dim(dequantized, label=y).numpy(),
        rtol=1e-5,
    )
    # forward and inverse given the label round-trip.
    z, _ = obj.forward(x, y)
    np.testing.assert_allclose(obj.inverse(z, y).numpy(), x, atol=1e-4)
    # sample(n, label, temperature, seed): images in [0, 1], deterministic per seed.
    images = obj.sample(5, 2, 0.8, [1, 2])
    assert images.shape == (5, 4, 4, 1)
    assert 0.0 <= float(tf.reduce_min(images)) <= float(tf.reduce_max(images)) <= 1.0
    np.testing.assert_array_equal(images.numpy(), obj.sample(5, 2, 0.8, [1, 2]).numpy())
    assert np.abs(images.numpy() - obj.sample(5, 0, 0.8, [1, 2]).numpy()).max() > 1e-4
    sig = obj.signatures["sample"]
    assert set(sig.structured_input_signature[1]) == {"n", "label", "temperature", "seed"}
    per_sample = sig(
        n=tf.constant(3), label=tf.constant([0, 1, 2]), temperature=tf.constant(1.0),
        seed=tf.constant([5, 6]),
    )["images"]  # fmt: skip
    assert per_sample.shape == (3, 4, 4, 1)
    # Bad labels in the graphs: out of range, not one per example, not integers.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label must be in \[0, 3\)"):
        obj.log_prob(x, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one per example"):
        obj.log_prob(x, [0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="one per example"):
        obj.sample(2, [[0, 1]], 1.0, [1, 2])
    with pytest.raises((TypeError, ValueError)):
        obj.log_prob(x, 0.5)


def test_load_gives_a_distribution_that_takes_the_label(conditional_export):
    flow, path = conditional_export["flow"], conditional_export["path"]
    x, y, x_int = conditional_export["x"], conditional_export["y"], conditional_export["x_int"]
    dist = rflow_tf.load(path)
    assert dist.condition_classes == CLASSES
    per_class = []
    for label in range(CLASSES):
        lp = dist.log_prob(x, label=label).numpy()
        np.testing.assert_allclose(lp, flow.log_prob(x, label=label).numpy(), rtol=1e-5, atol=1e-4)
        per_class.append(lp)
    for a in range(CLASSES):  # the label changes the density of every image
        for b in range(a):
            assert np.abs(per_class[a] - per_class[b]).min() > 1e-3
    lp = dist.log_prob(x, label=y).numpy()
    np.testing.assert_allclose(lp, [per_class[c][i] for i, c in enumerate(y)], rtol=1e-5)
    # TFP's spelling: the embedded label as the flow's conditional_input.
    context = dist.model.label_context(y)
    np.testing.assert_allclose(
        dist.log_prob(x, bijector_kwargs={"conditional_input": context}).numpy(), lp, rtol=1e-5
    )
    # A batch of shape [2, 3]: labels broadcast over the leading dimension.
    grid = dist.log_prob(x.reshape(2, 3, 4, 4, 1), label=[0, 1, 2]).numpy()
    np.testing.assert_allclose(grid.ravel(), lp, rtol=1e-5)
    np.testing.assert_allclose(dist.prob(x, label=y).numpy(), np.exp(lp), rtol=1e-4)
    obj = tf.saved_model.load(path)
    np.testing.assert_allclose(
        dist.bits_per_dim(x_int, label=y).numpy(), obj.bits_per_dim(x_int, y).numpy(), rtol=1e-5
    )
    # Samples given a label: the exported sample's draws (which clip to [0, 1]).
    draws = dist.sample(4, label=2, temperature=0.8, seed=[3, 4])
    assert draws.shape == (4, 4, 4, 1)
    np.testing.assert_allclose(
        np.clip(draws.numpy(), 0.0, 1.0), obj.sample(4, 2, 0.8, [3, 4]).numpy(), atol=1e-5
    )
    assert dist.sample(3, label=[0, 1, 2], seed=[1, 2]).shape == (3, 4, 4, 1)
    assert dist.sample((2, 3), label=[0, 1, 2], seed=[1, 2]).shape == (2, 3, 4, 4, 1)


def test_label_errors_name_the_problem(conditional_export):
    x = conditional_export["x"]
    dist = rflow_tf.load(conditional_export["path"])
    with pytest.raises(export.LabelError, match=r"class-conditional.*pass label=y"):
        dist.log_prob(x)
    with pytest.raises(export.LabelError, match="one per sample"):
        dist.sample(2, seed=[1, 2])
    with pytest.raises(export.LabelError, match="class-conditional"):
        dist.bits_per_dim(conditional_export["x_int"])
    for label in (3, [0, 1, 2, 0, 1, -1]):
        with pytest.raises(export.LabelError, match=r"label must be in \[0, 3\)"):
            dist.log_prob(x, label=label)
    with pytest.raises(export.LabelError, match=r"\[0, 3\).*\[7\]"):
        dist.sample(2, label=7, seed=[1, 2])
    with pytest.raises(export.InputShapeError, match=r"one per image \(shape \[6\]\).*\[2\]"):
        dist.log_prob(x, label=[0, 1])
    with pytest.raises(export.InputShapeError, match=r"one per sample \(shape \[2\]\).*\[3\]"):
        dist.sample(2, label=[0, 1, 2], seed=[1, 2])
    with pytest.raises(export.InputDtypeError, match="integer class ids.*float32"):
        dist.log_prob(x, label=tf.constant([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]))
    with pytest.raises(export.InputDtypeError, match="bool"):
        dist.log_prob(x, label=True)
    with pytest.raises(export.LabelError, match="not both"):
        dist.log_prob(
            x, label=0, bijector_kwargs={"conditional_input": dist.model.label_context(0)}
        )
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        dist.sample(2, label=0, temperature=-1.0)
    # An unconditional export (here one written before conditional exports) refuses a label.
    plain = rflow_tf.load(SHIPPED)
    assert plain.condition_classes == 0 and plain.metadata["format_version"] == 1
    with pytest.raises(export.LabelError, match="unconditional"):
        plain.log_prob(tf.fill([2, 8, 8, 1], 0.5), label=[0, 1])
    with pytest.raises(export.LabelError, match="unconditional"):
        plain.sample(2, label=0, seed=[1, 2])


def test_a_reader_of_format_1_refuses_a_conditional_export(conditional_export, monkeypatch):
    # What an rflow_tf from before class-conditional exports does with one.
    monkeypatch.setattr(export_format, "FORMAT_VERSION", 1)
    with pytest.raises(export.NotAnExportError, match="export format 2.*Upgrade rflow_tf"):
        export.load_metadata(conditional_export["path"])
