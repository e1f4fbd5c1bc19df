"""Conversion of the authors' PyTorch checkpoints (rflow_tf.convert, rflow_tf.torch_format).

The fixtures in tests/data/reference/ were made with the authors' own code
(see its README.md): each NAME.pth is a train_img.py checkpoint with perturbed
weights and an EMA that differs from them, and NAME.npz holds an input batch
with the reference's latent z, the exact float64 log-determinant of x -> z
and log_density = sum log N(z; 0, 1) + logdet_exact, for the live weights and
for the EMA weights after the reference's validate() procedure.
"""

import argparse
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest
from torch_files import zip_to_legacy

import rflow_tf
from rflow_tf import convert, torch_format

DATA = os.path.join(os.path.dirname(__file__), "data", "reference")
NAMES = ("mnist16", "cifar16", "celebahq16")


def _pth(name):
    return os.path.join(DATA, f"{name}.pth")


def _npz(name):
    return np.load(os.path.join(DATA, f"{name}.npz"))


def _nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------
# The reader
# ----------------------------------------------------------------------------


def test_reader_rebuilds_checkpoint_without_torch_or_reference_code():
    ckpt = torch_format.read_checkpoint(_pth("mnist16"))
    assert sorted(ckpt) == ["args", "ema", "optimizer_state_dict", "state_dict", "test_bpd"]
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert ckpt["args"].nblocks == "2-2-2" and ckpt["args"].data == "mnist"
    sd = ckpt["state_dict"]
    w = sd["transforms.0.chain.2.nnet.0.weight"]
    assert isinstance(w, np.ndarray) and w.shape == (32, 1, 3, 3) and w.dtype == np.float64
    assert sd["transforms.0.chain.2.nnet.0.u"].shape == (32 * 16 * 16,)
    ema = ckpt["ema"]
    assert isinstance(ema, torch_format.PickledObject)
    assert ema.pickled_class == "resflows.utils.ExponentialMovingAverage"
    assert ema.module.pickled_class == "resflows.resflow.ResidualFlow"
    shadow = ema.shadow_params["transforms.0.chain.2.nnet.0.weight"]
    assert shadow.shape == w.shape and not np.allclose(shadow, w)  # the EMA differs
    # Nothing was imported to do this.
    assert "torch" not in sys.modules and "resflows" not in sys.modules


def test_reader_legacy_format_gives_the_same_tensors(tmp_path):
    legacy = str(tmp_path / "legacy.pth")
    zip_to_legacy(_pth("celebahq16"), legacy)
    assert not zipfile.is_zipfile(legacy)
    a = torch_format.read_checkpoint(_pth("celebahq16"))
    b = torch_format.read_checkpoint(legacy)
    assert sorted(a["state_dict"]) == sorted(b["state_dict"])
    for k, v in a["state_dict"].items():
        np.testing.assert_array_equal(b["state_dict"][k], v)
    for k, v in a["ema"].shadow_params.items():
        np.testing.assert_array_equal(b["ema"].shadow_params[k], v)
    assert vars(a["args"]) == vars(b["args"])


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _zip_checkpoint(path, pkl_bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl_bytes)
        zf.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": _RunsCommand(f"touch {marker}")}, protocol=2)
    path = str(tmp_path / "evil.pth")
    if container == "zip":
        _zip_checkpoint(path, payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    with pytest.raises(torch_format.UnsafeCheckpointError, match=r"system"):
        torch_format.read_checkpoint(path)
    with pytest.raises(torch_format.UnsafeCheckpointError):
        convert.from_reference(path)
    assert not marker.exists()
    # The same payload unpickled normally would have run the command.
    pickle.loads(payload)
    assert marker.exists()


def test_reader_refuses_other_globals_and_bad_tensors(tmp_path):
    # builtins.eval through a stubbed-looking name is refused; stubs are inert.
    evil = b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R."
    path = str(tmp_path / "eval.pth")
    _zip_checkpoint(path, evil)
    with pytest.raises(torch_format.UnsafeCheckpointError, match="builtins.eval"):
        torch_format.read_checkpoint(path)
    stub_call = b"\x80\x02cresflows.utils\nsystem\nX\x04\x00\x00\x00true\x85R."
    _zip_checkpoint(path, stub_call)
    obj = torch_format.read_checkpoint(path)
    assert isinstance(obj, torch_format.PickledObject) and obj.args == ("true",)
    # A tensor reaching outside its storage (5 elements of a 2-element one) is
    # a format error, not a crash or a read past the buffer.
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "archive/data.pkl",
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
            b"(X\x07\x00\x00\x00storagectorch\nDoubleStorage\nX\x01\x00\x00\x000"
            b"X\x03\x00\x00\x00cpuK\x02tQ"
            b"K\x00K\x05\x85K\x01\x85\x89NtR.",
        )
        zf.writestr("archive/data/0", b"\x00" * 16)
    with pytest.raises(torch_format.CheckpointFormatError, match="does not fit"):
        torch_format.read_checkpoint(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(torch_format.CheckpointFormatError):
        torch_format.read_checkpoint(str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError):
        torch_format.read_checkpoint(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------
# args -> FlowConfig
# ----------------------------------------------------------------------------


def _args(name):
    return torch_format.read_checkpoint(_pth(name))["args"]


def test_config_inferred_from_args():
    mnist = convert.config_from_args(_args("mnist16"))
    assert mnist.input_shape == (16, 16, 1) and mnist.n_blocks == (2, 2, 2)
    assert mnist.hidden_channels == 32 and mnist.fc_hidden == (32, 32) and mnist.fc_end
    assert mnist.logit_alpha == 1e-6 and mnist.n_bits == 8 and mnist.activation == "lipswish"
    assert mnist.first_resblock and mnist.squeeze_order == "reference"
    assert mnist.n_exact_terms_eval == 20 and mnist.dist == "poisson"
    celeba = convert.config_from_args(_args("celebahq16"))
    assert celeba.input_shape == (16, 16, 3) and celeba.activation == "elu"
    assert celeba.squeeze_first and celeba.factor_out and not celeba.fc_end
    assert celeba.n_bits == 5 and celeba.n_exact_terms == 8 and celeba.logit_alpha == 0.05
    # Held-back style: other sizes and flags, and the reference's cap on scales.
    ns = argparse.Namespace(
        **{
            **vars(_args("cifar16")),
            "imagesize": 8,
            "nblocks": "3-1-1-1",
            "kernels": "3-3",
            "vnorms": "222",
            "fc_idim": 64,
            "act": "softplus",
            "preact": False,
            "n_dist": "geometric",
        }
    )
    cfg = convert.config_from_args(ns)
    assert cfg.n_blocks == (3, 1) and cfg.fc_hidden == (64,) and cfg.activation == "softplus"
    assert not cfg.preactivation and cfg.dist == "geometric"


@pytest.mark.parametrize(
    "option,value",
    [
        ("quadratic", True),
        ("block", "coupling"),
        ("fc", True),
        ("batchnorm", True),
        ("dropout", 0.5),
        ("vnorms", "2122"),
        ("learn_p", True),
        ("padding", 1),
        ("task", "hybrid"),
        ("act", "lcube"),
        ("fc_actnorm", True),
        ("logit_transform", False),
    ],
)
def test_refuses_what_cannot_be_expressed(option, value):
    ns = argparse.Namespace(**{**vars(_args("mnist16")), option: value})
    with pytest.raises(convert.UnsupportedCheckpointError, match="--" + option.replace("_", "-")):
        convert.config_from_args(ns)


def test_permutations():
    np.testing.assert_array_equal(convert.flatten_permutation((1, 2, 2)), [0, 2, 1, 3])
    x = np.random.default_rng(0).normal(size=(3, 4, 5))  # (C, H, W)
    np.testing.assert_array_equal(
        x.reshape(-1)[convert.flatten_permutation((4, 5, 3))], x.transpose(1, 2, 0).reshape(-1)
    )
    cfg = convert.config_from_args(_args("celebahq16"))
    perm = convert.latent_permutation(cfg)
    # 16x16x3, squeeze-first -> 8x8x12: two scales (the reference stops at 4x4);
    # the squeeze gives 4x4x48, half factored out: parts (4, 4, 24) and (4, 4, 24).
    assert cfg.n_blocks == (2, 2)
    part = convert.flatten_permutation((4, 4, 24))
    np.testing.assert_array_equal(perm, np.concatenate([part, part + part.size]))


# ----------------------------------------------------------------------------
# Same weights, same density (exact log-determinants)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_exact_log_density_matches_reference(name):
    d = _npz(name)
    x = _nhwc(d["x"]).astype(np.float32)
    flow = convert.from_reference(_pth(name), weights="live", logdet="exact")
    perm = convert.latent_permutation(flow.flow_config)
    for weights, tol in (("live", 1e-3), ("ema", 1e-2)):
        if weights == "ema":
            convert.load_reference_weights(flow, _pth(name), "ema")
        z, ld = flow.forward_and_log_det(x)
        lp = (flow.base_log_prob(z) + ld).numpy()
        np.testing.assert_allclose(lp, d[f"{weights}/log_density"], rtol=0, atol=tol)
        np.testing.assert_allclose(z.numpy(), d[f"{weights}/z"][:, perm], rtol=0, atol=2e-3)
        assert flow.reference_metadata["weights"] == weights
        # The latent really is permuted (so the check above is not vacuous).
        if weights == "live":
            assert np.abs(z.numpy() - d["live/z"]).max() > 0.1


def test_unbiased_estimate_agrees_with_exact():
    """Roulette + Hutchinson with 20 exact terms: the mean over seeds is within
    4 standard errors of the exact log-density (plus the float32 error of the
    exact value itself, <= 1e-3, measured in the test above)."""
    d = _npz("mnist16")
    x = _nhwc(d["x"]).astype(np.float32)
    flow = convert.from_reference(_pth("mnist16"), logdet="unbiased")  # EMA weights
    est = np.stack([flow.log_prob(x, seed=[7, s]).numpy() for s in range(6)])
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(len(est))
    assert np.all(se > 0)
    assert np.all(np.abs(mean - d["ema/log_density"]) < 4 * se + 1e-3), (mean, se)


# ----------------------------------------------------------------------------
# Command line, export and use
# ----------------------------------------------------------------------------


def test_cli_exports_a_model_that_loads_samples_and_scores(tmp_path, capsys):
    out = str(tmp_path / "celebahq16")
    assert convert.main([_pth("celebahq16"), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "inferred configuration" in printed and '"squeeze_first": true' in printed
    dist = rflow_tf.load(out)
    assert dist.metadata["logdet"] == "unbiased"  # 768 dims: too many for "auto" exact
    assert dist.metadata["extra"]["converted_from"]["source"] == "celebahq16.pth"
    d = _npz("celebahq16")
    x = _nhwc(d["x"]).astype(np.float32)
    # The exported weights give the reference's latent (deterministic; the
    # log-det estimators are tested above).
    z, _ = dist.model.forward_and_log_det(x)
    perm = convert.latent_permutation(dist.model.flow_config)
    np.testing.assert_allclose(z.numpy(), d["ema/z"][:, perm], rtol=0, atol=2e-3)
    samples = dist.sample(2, seed=[1, 2])
    assert samples.shape == (2, 16, 16, 3) and np.all(np.isfinite(samples.numpy()))
    pixels = np.floor(x * 32).astype(np.uint8)  # 5-bit CelebA-HQ pixels
    bpd = dist.bits_per_dim(pixels).numpy()  # the density path of the export
    assert bpd.shape == (4,) and np.all(np.isfinite(bpd))
    # A missing file exits with a message, not a traceback.
    assert convert.main([str(tmp_path / "missing.pth"), "--out", out]) == 2
    assert "no checkpoint file" in capsys.readouterr().err


def test_model_of_another_architecture_is_refused():
    flow = rflow_tf.ResidualFlow(convert.config_from_args(_args("celebahq16"), hidden_channels=8))
    with pytest.raises(convert.UnsupportedCheckpointError, match="hidden_channels"):
        convert.load_reference_weights(flow, _pth("celebahq16"), "live")
    with pytest.raises(ValueError, match="weights"):
        convert.from_reference(_pth("celebahq16"), weights="best")
