"""Hybrid modelling on whole models: coupling / 1x1-conv image flows against
brute-force Jacobians, classifier heads and the hybrid loss against a hand
computation, classification without any log-det, and the trainer's
classification / hybrid tasks (checkpoints, export with a ``classify``
signature, MirroredStrategy)."""

import json
import math
import os
import textwrap

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from helpers import exact_log_det, run_script_result
from tiny_runs import DEFAULT, tiny_flags

from rflow_tf import bijectors as rbij  # noqa: E402
from rflow_tf import classifier, data, export, models, training  # noqa: E402
from rflow_tf.bijectors import coupling  # noqa: E402
from rflow_tf.bijectors.invertible_conv import Invertible1x1Conv  # noqa: E402
from train import main as trainer_main  # noqa: E402

TINY = dict(
    input_shape=(8, 8, 1),
    n_blocks=(1, 1),
    hidden_channels=8,
    n_fc_blocks=1,
    fc_hidden=(16,),
    dtype="float64",
)


def _images(n, seed=0):
    return tf.random.stateless_uniform([n, 8, 8, 1], [seed, 7], 0.02, 0.98, tf.float64)


def test_coupling_and_1x1_image_flow_log_det_equals_brute_force():
    cfg = models.FlowConfig(**TINY, block="coupling", invertible_1x1=True)
    flow = models.ResidualFlow(cfg)
    x = _images(3)
    flow.initialize(x)
    # Move every 1x1 conv away from its permutation start (log|det W| = 0 there).
    rng = np.random.default_rng(0)
    convs = [b for b in flow.stages if isinstance(b, Invertible1x1Conv)]
    assert len(convs) == 2  # one before each conv block; none in the FC end
    for conv in convs:
        for w in (conv.layer.lower, conv.layer.upper, conv.layer.log_s):
            w.assign(w + 0.3 * rng.standard_normal(w.shape))
    kinds = [b.mask for b in flow.stages if isinstance(b, coupling.AffineCoupling)]
    assert kinds == ["checkerboard0", "channel0", "channel1"]  # scale 0, scale 1, FC end
    z, ld = flow.forward_and_log_det(x)
    np.testing.assert_allclose(
        ld.numpy(),
        exact_log_det(lambda t: flow.forward_and_log_det(t)[0], x),
        rtol=1e-9,
        atol=1e-8,
    )
    assert abs(float(tf.reduce_sum(convs[0].layer.log_s))) > 0.1  # the 1x1 log-dets count
    np.testing.assert_allclose(flow.bijector.inverse(z).numpy(), x.numpy(), atol=1e-9)


def _apply_stages(stages, h, features):
    """Applies the flow's pieces one by one with their own TFP forward, collecting
    what the heads should read: each inter-scale squeeze output, or the
    factored half of a FactorOut."""
    for i, b in enumerate(stages):
        if isinstance(b, models.FactorOut):
            features.append(h[..., b.n_keep :])
            h = _apply_stages(b.stages, h[..., : b.n_keep], features)
            continue
        h = b.forward(h)
        factored_next = i + 1 < len(stages) and isinstance(stages[i + 1], models.FactorOut)
        if isinstance(b, rbij.Squeeze) and not factored_next:
            features.append(h)
    return h


def _head_by_hand(heads, i, h):
    """ReLU(ActNorm(conv3x3(h))) averaged over pixels, with numpy loops."""
    kernel = heads.convs[i].kernel.numpy()  # [3, 3, C, F]
    bias = heads.convs[i].bias.numpy()
    hp = np.pad(h, [(0, 0), (1, 1), (1, 1), (0, 0)])
    n, hh, ww, _ = h.shape
    out = np.zeros((n, hh, ww, kernel.shape[-1])) + bias
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwc,cf->nhwf", hp[:, dy : dy + hh, dx : dx + ww], kernel[dy, dx])
    norm = heads.norms[i]
    out = (out + norm.bias.numpy()) * np.exp(norm.log_scale.numpy())
    return np.maximum(out, 0.0).mean(axis=(1, 2))


@pytest.mark.parametrize("factor_out", [True, False])
def test_heads_and_hybrid_loss_match_hand_computation(factor_out):
    cfg = models.FlowConfig(
        **TINY, factor_out=factor_out, n_classes=3, head_channels=5, logdet="exact"
    )
    flow = models.ResidualFlow(cfg)
    x = _images(4, seed=1)
    flow.initialize(x)
    assert flow.is_initialized
    features = []
    z_last = _apply_stages(flow.stages, x, features).numpy()
    # Heads: each scale's output (squeezed, or the factored half), then the final output.
    final = z_last.reshape(4, 4, 4, -1)
    features = [f.numpy() for f in features] + [final]
    assert [f.shape[-1] for f in features] == ([2, 2] if factor_out else [4, 4])
    heads = flow.classifier_heads
    pooled = np.concatenate([_head_by_hand(heads, i, f) for i, f in enumerate(features)], -1)
    logits = pooled @ heads.dense.kernel.numpy() + heads.dense.bias.numpy()
    np.testing.assert_allclose(flow.classify(x).numpy(), logits, rtol=1e-9, atol=1e-10)
    lp, logits2 = flow.log_prob_and_logits(x)
    np.testing.assert_allclose(logits2.numpy(), logits, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(lp.numpy(), flow.log_prob(x).numpy(), rtol=1e-12)
    # Data-dependent init of the heads' ActNorm: zero mean, unit variance per channel.
    h0 = heads.norms[0](heads.convs[0](tf.constant(features[0]))).numpy()
    np.testing.assert_allclose(h0.mean(axis=(0, 1, 2)), 0.0, atol=1e-9)
    # Hybrid loss by hand, lambda = 1/D, in nats per image.
    labels = np.array([0, 2, 1, 2])
    d = 64
    log_px = lp.numpy() - d * 8 * math.log(2)
    xent = np.log(np.exp(logits).sum(-1)) - logits[np.arange(4), labels]
    want = -log_px / d + xent
    got = classifier.hybrid_loss(log_px, logits2, labels, "1/D", num_dims=d)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # With label smoothing eps: the cross-entropy against (1 - eps) onehot + eps / K.
    eps = 0.2
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = (1 - eps) * np.eye(3)[labels] + eps / 3
    want_smooth = -log_px / d - (target * log_softmax).sum(-1)
    got = classifier.hybrid_loss(log_px, logits2, labels, "1/D", num_dims=d, label_smoothing=eps)
    np.testing.assert_allclose(got.numpy(), want_smooth, rtol=1e-10)
    assert np.all(want_smooth != want)
    got = classifier.hybrid_loss(None, logits2, labels, 0.0, label_smoothing=eps)
    np.testing.assert_allclose(got.numpy(), want_smooth + log_px / d, rtol=1e-10)


def test_checkpoint_restores_every_weight_of_a_hybrid_coupling_model(tmp_path):
    cfg = models.FlowConfig(
        **TINY, block="coupling", invertible_1x1=True, n_classes=3, head_channels=4
    )
    tf.keras.utils.set_random_seed(1)
    a = models.ResidualFlow(cfg)
    a.initialize(_images(4))
    path = tf.train.Checkpoint(model=a).save(str(tmp_path / "ckpt"))
    tf.keras.utils.set_random_seed(2)
    b = models.ResidualFlow(cfg)
    tf.train.Checkpoint(model=b).restore(path).assert_consumed()
    assert len(a.variables) == len(b.variables) > 0
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    assert b.is_initialized


def _forbid_log_dets(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a residual block's log-det was computed")

    monkeypatch.setattr(rbij.IResBlock, "forward_and_log_det", boom)
    monkeypatch.setattr(rbij.IResBlock, "_forward_log_det_jacobian", boom)


def test_classify_computes_no_log_det(monkeypatch):
    flow = models.ResidualFlow(models.FlowConfig(**TINY, n_classes=4))
    x = _images(2)
    flow.initialize(x)
    _forbid_log_dets(monkeypatch)
    assert flow.classify(x).shape == (2, 4)
    with pytest.raises(AssertionError, match="log-det was computed"):  # the spy works
        flow.log_prob(x)
    with pytest.raises(ValueError, match="n_classes"):
        models.ResidualFlow(models.FlowConfig(**TINY)).classify(x)


def test_new_fields_keep_old_configs_meaning():
    with open(os.path.join(REPO, "saved_models", "digits", "assets", export.METADATA_FILE)) as f:
        old = json.load(f)["config"]
    assert not {"block", "invertible_1x1", "init_layer", "n_classes"} & set(old)
    cfg = models.FlowConfig.from_dict(old)
    assert (cfg.block, cfg.invertible_1x1, cfg.init_layer, cfg.n_classes) == (
        "residual",
        False,
        "logit",
        0,
    )
    flow = models.ResidualFlow(cfg)
    assert isinstance(flow.stages[0], rbij.LogitTransform) and flow.classifier_heads is None
    assert not any(isinstance(b, (coupling.AffineCoupling, Invertible1x1Conv)) for b in flow.stages)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        models.FlowConfig(**TINY, init_layer="cifar10").validate()
    with pytest.raises(ValueError, match="block"):
        models.FlowConfig(**TINY, block="glow").validate()


def test_head_pooling_config_flag_and_old_meaning(tmp_path):
    # A config without head_pooling (every one written before it existed, and
    # the shipped model's) means the reference's average pooling: no version bump.
    with open(os.path.join(REPO, "saved_models", "digits", "assets", export.METADATA_FILE)) as f:
        old = json.load(f)["config"]
    assert "head_pooling" not in old
    assert models.FlowConfig.from_dict(old).head_pooling == "average"
    assert models.FlowConfig.from_dict({**old, "n_classes": 10}).head_pooling == "average"
    cfg = models.FlowConfig(**TINY, n_classes=3, head_channels=2, head_pooling="flatten")
    assert models.FlowConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="head_pooling must be one of"):
        models.FlowConfig(**TINY, n_classes=3, head_pooling="max").validate()
    # The model's heads flatten: Dense on 2 channels x (4x4 + 4x4) positions
    # (scale 0 after the squeeze, then the final output).
    flow = models.ResidualFlow(cfg)
    assert flow.classifier_heads.pooling == "flatten"
    assert flow.classifier_heads.dense.kernel.shape == (2 * 32, 3)
    x = _images(2)
    flow.initialize(x)
    assert flow.classify(x).shape == (2, 3)
    # The flags reach the config; the default stays the preset's.
    args = [f"--out={tmp_path}", "--task=classification"]
    spec = trainer_main.resolve_run(
        trainer_main.parse_args(args + ["--head_pooling=flatten", "--head_channels=32"])
    )
    assert (spec.flow.head_pooling, spec.flow.head_channels) == ("flatten", 32)
    assert trainer_main.resolve_run(trainer_main.parse_args(args)).flow.head_pooling == "average"
    with pytest.raises(training.UsageError, match="--head_channels must be >= 1"):
        trainer_main.resolve_run(trainer_main.parse_args(args + ["--head_channels=0"]))


TINY_FLAGS = tiny_flags(export_dir=DEFAULT, download=DEFAULT, eval_examples=32, batch_size=8)


def test_task_flags_are_checked(tmp_path):
    def spec(*flags):
        return trainer_main.resolve_run(
            trainer_main.parse_args(TINY_FLAGS + [f"--out={tmp_path}"] + list(flags))
        )

    with pytest.raises(training.UsageError, match="--task=hybrid only"):
        spec("--hybrid_lambda=1")
    with pytest.raises(training.UsageError, match="hybrid_lambda"):
        spec("--task=hybrid", "--hybrid_lambda=-2")
    s = spec("--task=hybrid", "--hybrid_lambda=1/D")
    assert s.hparams["hybrid_lambda_value"] == 1 / 64 and s.flow.n_classes == 10
    assert spec("--task=hybrid").hparams["hybrid_lambda_value"] == 1.0
    assert spec().flow.n_classes == 0 and "hybrid_lambda" not in spec().hparams


def test_crop_padding_and_translate_are_resolved_checked_and_used_by_the_trainer(tmp_path):
    def spec(*flags):
        return trainer_main.resolve_run(
            trainer_main.parse_args([f"--out={tmp_path}", "--steps=1", *flags])
        ).hparams

    # Default: the reference's (none for digits, 4 for cifar10); a flag wins;
    # density runs neither record nor accept it.
    assert spec("--task=classification")["crop_padding"] == 0
    assert spec("--task=hybrid", "--crop_padding=2")["crop_padding"] == 2
    assert spec("--task=classification", "--dataset=cifar10")["crop_padding"] == 4
    assert "crop_padding" not in spec()
    with pytest.raises(training.UsageError, match="classification\\|hybrid only"):
        spec("--crop_padding=1")
    with pytest.raises(training.UsageError, match="smaller than the image"):
        spec("--task=classification", "--crop_padding=8")
    with pytest.raises(training.UsageError, match="--crop_padding must be >= 0"):
        spec("--task=classification", "--crop_padding=-1")
    # --translate: default none for labelled runs, refused for density runs.
    assert spec("--task=classification")["translate"] == 0.0
    assert spec("--task=hybrid", "--translate=1.5")["translate"] == 1.5
    assert "translate" not in spec()
    with pytest.raises(training.UsageError, match="classification\\|hybrid only"):
        spec("--translate=1")
    with pytest.raises(training.UsageError, match="smaller than the image"):
        spec("--task=classification", "--translate=8")
    with pytest.raises(training.UsageError, match="--translate must be"):
        spec("--task=classification", "--translate=-1")
    # --label_smoothing: default none for labelled runs, refused for density runs.
    assert spec("--task=classification")["label_smoothing"] == 0.0
    assert spec("--task=hybrid", "--label_smoothing=0.1")["label_smoothing"] == 0.1
    assert "label_smoothing" not in spec()
    with pytest.raises(training.UsageError, match="classification\\|hybrid only"):
        spec("--label_smoothing=0.1")
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(training.UsageError, match="--label_smoothing must be in"):
            spec("--task=classification", f"--label_smoothing={bad}")
    # The trainer's batches are those of the data pipeline with that crop.
    trainer = trainer_main.make_trainer(
        trainer_main.parse_args(
            TINY_FLAGS
            + [f"--out={tmp_path}", "--task=classification", "--crop_padding=1", "--translate=1"]
        )
    )
    try:
        x, y = next(iter(trainer.run_data.train_dataset()))
    finally:
        trainer.close()
    kw = dict(shuffle=True, repeat=True, seed=0, drop_remainder=True, with_labels=True)
    x1, y1 = next(
        iter(data.load_image_dataset("digits", "train", 8, crop_padding=1, translate=1.0, **kw))
    )
    x0, _ = next(iter(data.load_image_dataset("digits", "train", 8, **kw)))
    np.testing.assert_array_equal(x.numpy(), x1.numpy())
    np.testing.assert_array_equal(y.numpy(), y1.numpy())
    assert not np.array_equal(x.numpy(), x0.numpy())  # 8 images uncropped: p = 9^-8


def test_classification_task_trains_without_log_det(tmp_path, monkeypatch):
    _forbid_log_dets(monkeypatch)
    result = trainer_main.train(
        trainer_main.parse_args(
            TINY_FLAGS
            + [f"--out={tmp_path}", "--task=classification", "--steps=2", "--export_dir="]
        )
    )
    assert result["task"] == "classification" and math.isnan(result["test_bpd"])
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["test_cross_entropy"] > 0
    assert result["samples"] is None


@pytest.mark.parametrize("task", ["classification", "hybrid"])
def test_training_step_uses_the_label_smoothing_flag(tmp_path, monkeypatch, task):
    seen = []
    plain = classifier.hybrid_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return plain(*args, **kwargs)

    monkeypatch.setattr(classifier, "hybrid_loss", spy)
    flags = TINY_FLAGS + [f"--task={task}", "--steps=1", "--export_dir="]
    for out, smoothing in (("a", []), ("b", ["--label_smoothing=0.25"])):
        trainer_main.train(trainer_main.parse_args(flags + [f"--out={tmp_path / out}", *smoothing]))
    assert seen and set(seen) == {0.0, 0.25}


def test_hybrid_loss_rejects_bad_label_smoothing():
    for bad in (1.0, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing must be"):
            classifier.hybrid_loss(None, [[0.0, 1.0]], [0], 0.0, label_smoothing=bad)


def test_hybrid_task_resumes_and_exports_classify(tmp_path, capsys):
    out, exp = tmp_path / "run", tmp_path / "export"
    flags = TINY_FLAGS + [
        f"--out={out}",
        f"--export_dir={exp}",
        "--task=hybrid",
        "--hybrid_lambda=1/D",
        "--block=coupling",
        "--invertible_1x1",
    ]
    first = trainer_main.train(trainer_main.parse_args(flags + ["--steps=2"]))
    assert np.isfinite(first["test_bpd"]) and 0.0 <= first["test_accuracy"] <= 1.0
    trainer = trainer_main.make_trainer(trainer_main.parse_args(flags + ["--steps=3"]))
    result = trainer.train()  # resumes at step 2
    assert result["step"] == 3 and int(trainer.optimizer.iterations.numpy()) == 3
    assert "steps 2->3" in capsys.readouterr().out
    # The SavedModel's classify signature equals the (EMA) model's classifier.
    x = _images(5).numpy().astype(np.float32)
    obj = tf.saved_model.load(str(exp))
    sig = obj.signatures["classify"](x=tf.constant(x))
    with trainer.ema_weights():
        want = trainer.model.classify(x).numpy()
    np.testing.assert_allclose(sig["logits"].numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sig["classes"].numpy(), want.argmax(-1))
    assert "classify" in export.load_metadata(str(exp))["signatures"]


_MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np
    from rflow_tf import training
    from rflow_tf.training.steps import variable_value
    from train import main as m
    training.configure_cpu_devices(2)
    trainer = m.make_trainer(m.parse_args({argv!r}))
    result = trainer.train()
    s = trainer.strategy
    worst = 0.0
    for v in trainer.model.trainable_variables:
        a, b = [np.asarray(p) for p in s.experimental_local_results(variable_value(v))]
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
    print("RESULT " + json.dumps({{"replicas": s.num_replicas_in_sync, "worst": worst,
                                   "acc": result["test_accuracy"], "bpd": result["test_bpd"]}}))
""")


def test_hybrid_task_under_mirrored_strategy(tmp_path):
    argv = TINY_FLAGS + [
        f"--out={tmp_path}",
        "--cpu_devices=2",
        "--steps=2",
        "--export_dir=",
        "--task=hybrid",
        "--hybrid_lambda=1/D",
    ]
    out = run_script_result(_MIRRORED.format(argv=argv), tmp_path)
    assert out["replicas"] == 2 and out["worst"] == 0.0
    assert np.isfinite(out["bpd"]) and 0.0 <= out["acc"] <= 1.0
