"""SavedModel export and rflow_tf.load: signatures without rflow_tf, TFP interop,
fine-tuning, errors, and the shipped model in saved_models/digits."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import rflow_tf
from rflow_tf import data as rdata
from rflow_tf import export, models
from rflow_tf import layers as rlayers

tfb, tfd = tfp.bijectors, tfp.distributions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "saved_models", "digits")


def _digits(n, seed):
    x = next(iter(rdata.load_image_dataset("digits", "test", n, seed=seed)))
    return x.numpy()


def _train_steps(flow, x, steps):
    opt = keras.optimizers.Adam(1e-3)
    for i in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(flow.bits_per_dim(x, training=True, seed=[i, 7]))
        grads = tape.gradient(loss, flow.trainable_variables)
        opt.apply_gradients(zip(grads, flow.trainable_variables))
        flow.converge_lipschitz()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny flow (ActNorm initialised, 2 training steps) exported with default settings."""
    keras.utils.set_random_seed(0)
    flow = models.ResidualFlow(models.get_preset("tiny"))
    x_int = _digits(16, seed=0)
    x = rdata.dequantize(x_int, 8, seed=[3, 4])
    flow.initialize(x)
    _train_steps(flow, x, 2)
    path = str(tmp_path_factory.mktemp("export") / "tiny")
    assert export.save(flow, path, extra_metadata={"note": "test"}) == path
    # Reference computed without the export code: the same weights in a model
    # with exact log-dets (what "auto" picks for 64 dimensions).
    ref = models.ResidualFlow(flow.flow_config.replace(logdet="exact"))
    ref.set_weights(flow.get_weights())
    return dict(
        flow=flow, path=path, x=x.numpy(), x_int=x_int, ref_log_prob=ref.log_prob(x).numpy()
    )


def _run_without_rflow_tf(code):
    """Runs ``code`` in a fresh interpreter that must not import rflow_tf; returns
    the JSON it prints last."""
    prelude = "import sys, json\nimport numpy as np\nimport tensorflow as tf\n"
    epilogue = (
        "\nassert 'rflow_tf' not in sys.modules, sorted(m for m in sys.modules if 'rflow' in m)\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(REPO),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_signatures_in_fresh_process_without_rflow_tf(exported, tmp_path):
    np.save(tmp_path / "x.npy", exported["x"])
    np.save(tmp_path / "x_int.npy", exported["x_int"])
    out = _run_without_rflow_tf(f"""
        obj = tf.saved_model.load({exported['path']!r})
        x = np.load({str(tmp_path / 'x.npy')!r}); x_int = np.load({str(tmp_path / 'x_int.npy')!r})
        res = {{}}
        res["log_prob"] = obj.log_prob(x).numpy().tolist()
        serve = obj.signatures["serving_default"]
        res["sig_log_prob"] = serve(x=tf.constant(x))["log_prob"].numpy().tolist()
        res["bpd_uint8"] = obj.bits_per_dim(x_int).numpy().tolist()
        res["bpd_int32"] = obj.signatures["bits_per_dim_int32"](
            x=tf.constant(x_int.astype(np.int32)))["bits_per_dim"].numpy().tolist()
        s = obj.sample(5, 0.8, [1, 2])
        res["sample_shape"] = list(s.shape)
        res["sample_range"] = [float(tf.reduce_min(s)), float(tf.reduce_max(s))]
        res["sample_again_equal"] = bool(tf.reduce_all(s == obj.sample(5, 0.8, [1, 2])))
        images = obj.signatures["sample"](
            n=tf.constant(3), temperature=tf.constant(1.0), seed=tf.constant([5, 6]))["images"]
        res["sig_sample_shape"] = list(images.shape)
        z, ld = obj.forward(x)
        res["latent_shape"] = list(z.shape)
        base = -0.5 * tf.reduce_sum(z ** 2, -1) - 32.0 * np.log(2 * np.pi)
        res["fwd_log_prob"] = (base + ld).numpy().tolist()
        res["recon_err"] = float(tf.reduce_max(tf.abs(obj.inverse(z) - x)))
        md = obj.metadata()
        res["meta"] = json.loads(md["metadata_json"].numpy())
        res["config"] = json.loads(obj.config_json.numpy())
        res["image_shape"] = md["image_shape"].numpy().tolist()
        res["n_bits"] = int(md["n_bits"])
        try:
            obj.log_prob(np.zeros([2, 8, 8, 3], np.float32))
            res["wrong_shape"] = "no error"
        except (TypeError, ValueError) as e:
            res["wrong_shape"] = str(e)
        try:
            obj.log_prob(tf.zeros([2, 8, 8, 1], tf.uint8))
            res["wrong_dtype"] = "no error"
        except (TypeError, ValueError) as e:
            res["wrong_dtype"] = str(e)
        try:   # numpy integers are converted to float32, then fail the [0, 1] check
            obj.log_prob(x_int)
            res["raw_pixels"] = "no error"
        except tf.errors.InvalidArgumentError as e:
            res["raw_pixels"] = e.message
        try:
            obj.bits_per_dim(np.full([1, 8, 8, 1], 256, np.int32))
            res["out_of_range"] = "no error"
        except tf.errors.InvalidArgumentError as e:
            res["out_of_range"] = e.message
        print(json.dumps(res))
    """)
    ref = exported["ref_log_prob"]
    np.testing.assert_allclose(out["log_prob"], ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["sig_log_prob"], ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["fwd_log_prob"], ref, rtol=1e-5, atol=1e-3)
    # bits/dim of the raw pixels: the export's fixed-seed uniform dequantisation.
    seed = out["meta"]["dequantization_seed"]
    y = rdata.dequantize(exported["x_int"], 8, seed=seed)
    expected_bpd = exported["flow"].flow_config.replace(logdet="exact")
    ref_model = models.ResidualFlow(expected_bpd)
    ref_model.set_weights(exported["flow"].get_weights())
    np.testing.assert_allclose(
        out["bpd_uint8"], ref_model.bits_per_dim(y).numpy(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(out["bpd_int32"], out["bpd_uint8"], rtol=1e-6)
    assert out["sample_shape"] == [5, 8, 8, 1] and out["sig_sample_shape"] == [3, 8, 8, 1]
    assert 0.0 <= out["sample_range"][0] <= out["sample_range"][1] <= 1.0
    assert out["sample_again_equal"]
    assert out["latent_shape"] == [16, 64]
    assert out["recon_err"] < 1e-4
    assert out["image_shape"] == [8, 8, 1] and out["n_bits"] == 8
    meta = out["meta"]
    assert meta["format"] == export.FORMAT and meta["logdet"] == "exact"
    assert meta["rflow_tf_version"] == rflow_tf.__version__
    assert meta["logit_alpha"] == 1e-6 and meta["latent_shape"] == [64]
    assert meta["extra"] == {"note": "test"}
    assert models.FlowConfig.from_dict(out["config"]) == exported["flow"].flow_config
    assert "(None, 8, 8, 1)" in out["wrong_shape"]
    assert "float32" in out["wrong_dtype"]
    assert "must lie in [0, 1]" in out["raw_pixels"]
    assert "[0, 255]" in out["out_of_range"]


def test_load_gives_transformed_distribution(exported):
    dist = rflow_tf.load(exported["path"])
    assert isinstance(dist, tfd.TransformedDistribution)
    assert isinstance(dist.model, models.ResidualFlow)
    assert dist.event_shape == [8, 8, 1] and dist.n_bits == 8
    np.testing.assert_allclose(
        dist.log_prob(exported["x"]).numpy(), exported["ref_log_prob"], rtol=1e-5, atol=1e-4
    )
    # The weights were restored, not re-initialised.
    for a, b in zip(exported["flow"].get_weights(), dist.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = dist.sample(4, seed=[1, 2])
    assert x.shape == (4, 8, 8, 1)
    lp = dist.log_prob(x)
    assert lp.shape == (4,) and np.all(np.isfinite(lp.numpy()))
    # Same draws as the exported sample at temperature 1 (which clips to [0, 1]),
    # same bits/dim of raw pixels as the exported bits_per_dim.
    obj = tf.saved_model.load(exported["path"])
    np.testing.assert_allclose(
        obj.sample(4, 1.0, [1, 2]).numpy(), np.clip(x.numpy(), 0.0, 1.0), atol=1e-5
    )
    np.testing.assert_allclose(
        dist.bits_per_dim(exported["x_int"]).numpy(),
        obj.bits_per_dim(exported["x_int"]).numpy(),
        rtol=1e-5,
    )


def test_bijector_in_chain_and_joint_distribution(exported):
    dist = rflow_tf.load(exported["path"])
    x = exported["x"][:4]
    # Chain: latent -> image in [0, 255]; log-density shifts by -D log 255.
    chained = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros([64])), tfb.Chain([tfb.Scale(255.0), dist.bijector])
    )
    np.testing.assert_allclose(
        chained.log_prob(255.0 * x).numpy(),
        dist.log_prob(x).numpy() - 64 * np.log(255.0),
        rtol=1e-4,
        atol=1e-2,
    )
    # JointDistribution: a latent temperature, then an image through the bijector.
    jd = tfd.JointDistributionNamed(
        dict(
            temperature=tfd.Uniform(0.5, 1.5),
            image=lambda temperature: tfd.TransformedDistribution(
                tfd.MultivariateNormalDiag(
                    tf.zeros([64]), scale_diag=temperature[..., None] * tf.ones([64])
                ),
                dist.bijector,
            ),
        )
    )
    draw = jd.sample(3, seed=[4, 5])
    assert draw["image"].shape == (3, 8, 8, 1)
    lp = jd.log_prob(draw)
    assert lp.shape == (3,) and np.all(np.isfinite(lp.numpy()))
    # At temperature 1 the joint log-prob of data is the loaded log_prob (log U(1) = 0).
    lp_data = jd.log_prob(dict(temperature=tf.ones([4]), image=x))
    np.testing.assert_allclose(lp_data.numpy(), dist.log_prob(x).numpy(), rtol=1e-5, atol=1e-3)


def test_fine_tune_with_tfp_math_minimize_then_reexport(exported, tmp_path):
    dist = rflow_tf.load(exported["path"])
    assert len(dist.trainable_variables) == len(dist.model.trainable_variables) > 0
    before = [v.numpy().copy() for v in dist.trainable_variables]
    x = tf.constant(exported["x"])

    def loss():
        return -tf.reduce_mean(dist.log_prob(x))

    initial = float(loss())
    losses = tfp.math.minimize(
        loss,
        num_steps=4,
        optimizer=keras.optimizers.Adam(1e-2),
        trainable_variables=dist.trainable_variables,
    )
    dist.model.converge_lipschitz()
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, dist.trainable_variables))
    assert float(loss()) < initial and float(losses[-1]) < float(losses[0])

    # Re-export the fine-tuned flow with the unbiased estimator (fixed seed) and
    # midpoint dequantisation: deterministic, and load() reproduces it.
    path = str(tmp_path / "tuned")
    export.save(dist.model, path, logdet="unbiased", dequantization="midpoint")
    obj = tf.saved_model.load(path)
    x4 = exported["x"][:4]
    a = obj.log_prob(x4).numpy()
    np.testing.assert_array_equal(a, obj.log_prob(x4).numpy())
    tuned = rflow_tf.load(path)
    assert tuned.metadata["logdet"] == "unbiased"
    assert tuned.metadata["dequantization"] == "midpoint"
    for w0, w1 in zip(dist.model.get_weights(), tuned.model.get_weights()):
        np.testing.assert_array_equal(w0, w1)
    np.testing.assert_allclose(
        tuned.log_prob(x4, bijector_kwargs={"seed": tuned.logdet_seed}).numpy(),
        a,
        rtol=1e-5,
        atol=1e-3,
    )
    # Unbiased: close to the exact value of the same weights.
    np.testing.assert_allclose(a, dist.log_prob(x4).numpy(), rtol=0.05, atol=2.0)
    # Midpoint dequantisation: bits/dim of x_int is that of (x_int + 0.5) / 256.
    x_int = exported["x_int"][:4]
    lp_mid = obj.log_prob((x_int.astype(np.float32) + 0.5) / 256.0).numpy()
    np.testing.assert_allclose(
        obj.bits_per_dim(x_int).numpy(),
        -(lp_mid - 64 * 8 * np.log(2)) / (64 * np.log(2)),
        rtol=1e-5,
    )


def test_errors(exported, tmp_path):
    with pytest.raises(export.ExportNotFoundError, match="does not exist"):
        rflow_tf.load(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        rflow_tf.load(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(export.NotAnExportError, match="empty"):
        rflow_tf.load(str(empty))
    other = tf.Module()
    other.f = tf.function(lambda x: 2.0 * x, input_signature=[tf.TensorSpec([None])])
    tf.saved_model.save(other, str(tmp_path / "other"))
    with pytest.raises(export.NotAnExportError, match="not saved by rflow_tf.export.save"):
        rflow_tf.load(str(tmp_path / "other"))
    with pytest.raises(export.ExportError, match="not an rflow_tf export"):
        export.save(exported["flow"], str(tmp_path / "other"))
    assert os.path.isfile(tmp_path / "other" / "saved_model.pb")  # untouched

    dist = rflow_tf.load(exported["path"])
    with pytest.raises(export.InputDtypeError, match="float32.*got dtype uint8"):
        dist.log_prob(exported["x_int"])
    with pytest.raises(TypeError):
        dist.log_prob(tf.constant(exported["x_int"]))
    with pytest.raises(export.InputShapeError, match=r"\[\.\.\., 8, 8, 1\].*\[2, 8, 8, 3\]"):
        dist.log_prob(tf.zeros([2, 8, 8, 3]))
    with pytest.raises(ValueError, match="8, 8, 1"):
        dist.log_prob(tf.zeros([64]))
    with pytest.raises(TypeError, match="ResidualFlow"):
        export.save(keras.Sequential(), str(tmp_path / "x"))


def test_shipped_model_loads_and_is_finite():
    assert export.is_export(SHIPPED), f"no shipped model at {SHIPPED}"
    dist = rflow_tf.load(SHIPPED)
    assert isinstance(dist, tfd.TransformedDistribution)
    x = dist.sample(8, seed=[0, 1])
    assert x.shape == (8, 8, 8, 1) and np.all(np.isfinite(x.numpy()))
    assert np.all(np.isfinite(dist.log_prob(tf.clip_by_value(x, 0.0, 1.0)).numpy()))
    test = rdata.dequantize(_digits(32, seed=1), 8, seed=[1, 1])
    lp = dist.log_prob(test).numpy()
    assert np.all(np.isfinite(lp))
    bpd = dist.model.bits_per_dim(test).numpy()
    assert np.all(np.isfinite(bpd)) and float(np.mean(bpd)) < 5.0


def test_shipped_model_keeps_its_version_1_meaning():
    # saved_models/digits was exported before config_version existed: its config
    # reads as version 1 and rebuilds the model it was trained as. The
    # reference values come from the SavedModel's own graphs, traced by the
    # code that trained it (no rflow_tf code runs in them).
    with open(os.path.join(SHIPPED, "assets", export.METADATA_FILE)) as f:
        meta = json.load(f)
    assert "config_version" not in meta["config"]
    dist = rflow_tf.load(SHIPPED)
    cfg = dist.model.flow_config
    assert (cfg.config_version, cfg.first_resblock, cfg.squeeze_order, cfg.init) == (
        1,
        False,
        "space_to_depth",
        "glorot",
    )
    # ... and, from before mixed norms existed (version <= 3), the spectral norm everywhere
    assert (cfg.vnorms, cfg.learn_p) == ("2222", False)
    assert all(layer.is_spectral for layer in dist.model.lipschitz_layers())
    assert not rlayers.learned_orders(dist.model.lipschitz_layers())
    obj = tf.saved_model.load(SHIPPED)
    # The first 64 test digits, unshuffled: a seeded shuffle also depends on
    # TensorFlow's global seed, which earlier tests set.
    ds = rdata.load_image_dataset("digits", "test", 64, shuffle=False, repeat=False)
    x_int = next(iter(ds)).numpy()
    traced = obj.bits_per_dim(tf.constant(x_int, tf.uint8)).numpy()
    rebuilt = dist.bits_per_dim(x_int).numpy()
    # The traced graphs compute the logit's 1 - s as 1 - s; LogitTransform now
    # computes it from 1 - x (no cancellation). For a dequantised pixel within
    # ~1e-5 of 1, float32 keeps only ~3 digits of 1 - s in the old formula, so
    # single images move by up to ~6e-5 bits/dim (measured over the whole test
    # split); reading the config as version 2 would change the model itself.
    np.testing.assert_allclose(rebuilt, traced, atol=1e-4)
    # Away from the logit's edges both formulas round alike, and the rebuilt
    # model reproduces the traced latents and log-dets to float32 rounding
    # (measured: z 5e-6, log-det 1.2e-4 nats of ~280).
    x = 0.005 + 0.99 * tf.cast(rdata.dequantize(x_int, 8, seed=[1, 1]), tf.float32)
    z_traced, ld_traced = obj.forward(x)
    z, ld = dist.model.forward_and_log_det(x, seed=dist.logdet_seed)
    np.testing.assert_allclose(z.numpy(), z_traced.numpy(), atol=1e-4)
    np.testing.assert_allclose(ld.numpy(), ld_traced.numpy(), rtol=2e-6, atol=0)
    # Read as a version-2 config it would be another model (no pre-activation in
    # the first block: one LipSwish weight fewer), so the version matters.
    v2 = models.ResidualFlow(dict(meta["config"], config_version=models.CONFIG_VERSION))
    assert len(v2.weights) != len(dist.model.weights)


def test_bad_input_is_rejected_like_the_fresh_model(exported):
    """NaN, Inf, pixels outside [0, 1] and empty batches: the loaded
    distribution raises the fresh model's ValueError (the SavedModel signature
    the same message as InvalidArgumentError); bad sample shapes and seeds
    raise ValueError before any work."""
    dist, flow = rflow_tf.load(exported["path"]), exported["flow"]
    obj = tf.saved_model.load(exported["path"])
    x = exported["x"][:2]
    bad = {
        "NaN or Inf": np.where(np.arange(64).reshape(8, 8, 1) == 3, np.nan, x),
        "must lie in \\[0, 1\\]": x + 2.0,
    }
    bad["NaN or Inf "] = np.where(np.arange(64).reshape(8, 8, 1) == 3, np.inf, x)
    for match, value in bad.items():
        value = tf.constant(value, tf.float32)
        for log_prob in (dist.log_prob, flow.log_prob):
            with pytest.raises(ValueError, match=match.strip()):
                log_prob(value)
        with pytest.raises(tf.errors.InvalidArgumentError, match=match.strip()):
            obj.log_prob(value)
    for log_prob in (dist.log_prob, flow.log_prob):
        with pytest.raises(ValueError, match="empty batch"):
            log_prob(tf.zeros([0, 8, 8, 1]))
    # An unbatched image after batched calls of several sizes (one trace serves all).
    lp = dist.log_prob(x).numpy()
    dist.log_prob(exported["x"][:3])
    np.testing.assert_allclose(dist.log_prob(x[1]).numpy(), lp[1], rtol=1e-5)
    np.testing.assert_allclose(dist.log_prob(x[None]).numpy(), lp[None], rtol=1e-5)
    for n in (2.5, -1, 0, True, [2, -1]):
        with pytest.raises(ValueError, match="sample shape must be a positive int"):
            dist.sample(n, seed=[1, 2])
    for sample in (lambda s: dist.sample(2, seed=s), lambda s: flow.sample(2, seed=s)):
        for seed in ([1, 2, 3], [[1, 2]], [1.5, 2.0]):
            with pytest.raises(ValueError, match="seed must be None or a stateless seed"):
                sample(seed)
    with pytest.raises(ValueError, match="n must be a positive int"):
        flow.sample(2.5)


@pytest.mark.parametrize("name", ["saved_model.pb", "variables/variables.data-00000-of-00001"])
def test_load_refuses_truncated_files(exported, tmp_path, name):
    path = str(tmp_path / "copy")
    shutil.copytree(exported["path"], path)
    target = os.path.join(path, name)
    with open(target, "rb") as f:
        data = f.read()
    with open(target, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(export.NotAnExportError, match="truncated or corrupt|incomplete or corrupt"):
        rflow_tf.load(path)
