"""Tests for the trainer train/main.py: data pipelines on TFDS mock data,
MirroredStrategy on 2 logical CPUs, exact resume, NaN handling, missing data.

Models are minimal (one residual block) so each run is dominated by tracing.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from helpers import InjectedCrash, run_script_result, with_faults  # noqa: E402
from tiny_runs import tiny_flags, tiny_run_args  # noqa: E402

from rflow_tf import data, models, training  # noqa: E402
from rflow_tf.training.steps import variable_value  # noqa: E402
from train import main as trainer_main  # noqa: E402

TINY = tiny_flags()


def values(variables):
    return [
        np.array(tf.convert_to_tensor(variable_value(v)))  # pylint: disable=protected-access
        for v in variables
    ]


def test_help_lists_the_flags():
    text = trainer_main.build_parser().format_help()
    for flag in (
        "--dataset",
        "--preset",
        "--batch_size",
        "--epochs",
        "--steps",
        "--lr",
        "--warmup_steps",
        "--ema_decay",
        "--grad_clip",
        "--accumulate",
        "--n_exact_terms",
        "--dist",
        "--neumann_grad",
        "--grad_in_forward",
        "--out",
        "--seed",
        "--eval_every",
        "--sample_every",
        "--strategy",
        "--cpu_devices",
        "--data_dir",
        "--jit_compile",
        "--export_dir",
        "--export_only",
        "--logdet",
        "--n_terms",
        "--coeff",
        "--squeeze_first",
        "--kernels",
        "--actnorm",
        "--first_resblock",
        "--n_samples",
        "--rate",
        "--p",
        "--fc_hidden",
        "--logit_alpha",
        "--logdet_eval",
        "--init",
    ):
        assert flag in text, flag
    args = trainer_main.parse_args([])
    spec = trainer_main.resolve_run(args)
    assert spec.dataset == "digits" and spec.preset == "digits_small"
    assert spec.run_dir == os.path.join("runs", "digits_digits_small")
    assert spec.export_dir == os.path.join("saved_models", "digits_digits_small")
    spec = trainer_main.resolve_run(
        trainer_main.parse_args(["--dataset=celeb_a_hq", "--neumann_grad=false", "--epochs=1"])
    )
    assert spec.flow.n_bits == 5 and spec.flow.input_shape == (256, 256, 3)
    assert not spec.flow.neumann_grad and not spec.flow.grad_in_forward
    assert spec.hparams["batch_size"] == 8 and spec.hparams["accumulate"] == 5
    assert spec.hparams["steps"] == 27000 // 40 + (27000 % 40 > 0)
    with pytest.raises(training.UsageError):
        trainer_main.resolve_run(trainer_main.parse_args(["--preset=nope"]))
    spec = trainer_main.resolve_run(
        trainer_main.parse_args(
            [
                "--logdet=truncated",
                "--n_terms=10",
                "--first_resblock=false",
                "--coeff=0.9",
                "--kernels=3-3",
                "--actnorm=false",
                "--fc_hidden=32-32",
                "--squeeze_first",
                "--logit_alpha=0.05",
                "--n_samples=2",
                "--dist=geometric",
                "--p=0.3",
                "--rate=3",
            ]
        )
    )
    f = spec.flow
    assert (
        f.logdet,
        f.n_terms,
        f.first_resblock,
        f.coeff,
        f.kernels,
        f.actnorm,
        f.fc_hidden,
        f.squeeze_first,
        f.logit_alpha,
        f.n_samples,
        f.dist,
        f.p,
        f.rate,
    ) == ("truncated", 10, False, 0.9, "3-3", False, (32, 32), True, 0.05, 2, "geometric", 0.3, 3.0)
    assert f.logdet_eval_mode == "unbiased"
    for bad, name in (
        (["--coeff=1.2"], "coeff"),
        (["--p=0"], "p"),
        (["--kernels=3-2"], "kernels"),
        (["--logit_alpha=0.5"], "logit_alpha"),
        (["--n_terms=0"], "n_terms"),
        (["--rate=-1"], "rate"),
        (["--n_samples=0"], "n_samples"),
    ):
        with pytest.raises(training.UsageError, match=f"FlowConfig.{name} must"):
            trainer_main.resolve_run(trainer_main.parse_args(bad))
    with pytest.raises(training.UsageError, match="squeezed"):
        trainer_main.resolve_run(trainer_main.parse_args(["--dataset=mnist", "--n_blocks=1-1-1-1"]))


@pytest.mark.parametrize(
    "dataset, extra",
    [
        ("mnist", []),
        ("cifar10", ["--accumulate=2"]),
        ("celeb_a_hq", ["--batch_size=2"]),
    ],
)
def test_pipeline_on_mock_data(tmp_path, dataset, extra):
    with tfds.testing.mock_data(num_examples=8):
        args = tiny_run_args(
            tmp_path,
            f"--dataset={dataset}",
            "--steps=2",
            "--batch_size=4",
            "--eval_examples=4",
            "--data_dir",
            str(tmp_path / "tfds"),
            *extra,
        )
        result = trainer_main.train(args)
    assert result["step"] == 2
    assert np.isfinite(result["test_bpd"])
    assert os.path.exists(result["samples"])
    cfg = json.load(open(tmp_path / "config.json"))
    info = data.dataset_info(dataset)
    assert tuple(cfg["flow_config"]["input_shape"]) == info.image_shape
    assert cfg["flow_config"]["n_bits"] == info.n_bits
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-2")
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt_best"))
    assert os.listdir(tmp_path / "tb")


def test_resume_continues_with_same_state(tmp_path):
    common = ["--steps=2", "--batch_size=8", "--eval_examples=8", "--ckpt_every=1"]
    first = trainer_main.make_trainer(tiny_run_args(tmp_path, *common))
    r1 = first.train()
    assert r1["step"] == 2 and int(first.optimizer.iterations.numpy()) == 2
    saved = {
        "opt": values(first.optimizer.variables),
        "ema": values(first.ema_vars),
        "model": values(first.model.variables),
    }

    # Rerun with more steps: restores step, optimizer, EMA and ActNorm state.
    second = trainer_main.make_trainer(tiny_run_args(tmp_path, *common[1:], "--steps=3"))
    assert int(second.step.numpy()) == 0
    assert second.restore_or_initialize() is not None
    assert int(second.step.numpy()) == 2
    assert second.model.is_initialized
    for key, vs in (
        ("opt", second.optimizer.variables),
        ("ema", second.ema_vars),
        ("model", second.model.variables),
    ):
        for a, b in zip(saved[key], values(vs)):
            np.testing.assert_array_equal(a, b)
    # Training is not reinitialised from data: ActNorm keeps its restored values.
    r2 = second.train()
    assert r2["step"] == 3 and int(second.optimizer.iterations.numpy()) == 3
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-3")

    # The export hook gets the model with the EMA weights swapped in.
    seen = {}

    def fake_save(model, path):
        seen["path"] = path
        seen["weights"] = values(model.trainable_variables)

    fake = types.ModuleType("rflow_tf.export")
    fake.save = fake_save
    sys.modules["rflow_tf.export"] = fake
    try:
        assert second.export(str(tmp_path / "export")) == str(tmp_path / "export")
    finally:
        del sys.modules["rflow_tf.export"]
    assert seen["path"] == str(tmp_path / "export")
    for a, b in zip(seen["weights"], values(second.ema_vars)):
        np.testing.assert_array_equal(a, b)
    # ... and the training weights are back afterwards.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(values(second.model.trainable_variables), values(second.ema_vars))
    )


def test_truncated_training_reports_true_and_training_estimate(tmp_path, capsys):
    # An i-ResNet (truncated series) is evaluated with the unbiased estimator, and
    # the log shows the training estimator's figure beside it.
    trainer = trainer_main.make_trainer(
        tiny_run_args(
            tmp_path,
            "--steps=1",
            "--batch_size=8",
            "--eval_examples=8",
            "--logdet=truncated",
            "--n_terms=1",
        )
    )
    trainer.train()
    out = capsys.readouterr().out
    assert "unbiased log-det, 20 exact terms" in out
    # The initial power iteration reports its progress (at the end at least).
    n = len(trainer.model.lipschitz_layers())
    assert f"power iteration: {n}/{n} layers |" in out and "ETA" in out
    true_bpd, _, _ = trainer.evaluate()
    train_bpd, _, _ = trainer.evaluate(training_estimator=True)
    assert f"with the training estimator (truncated): {train_bpd:.4f}" in out
    assert true_bpd != train_bpd


def test_nan_steps_are_skipped_then_training_stops(tmp_path, capsys, monkeypatch):
    args = tiny_run_args(
        tmp_path,
        "--steps=3",
        "--batch_size=8",
        "--eval_examples=8",
        "--ckpt_every=1",
        "--max_nan_steps=2",
    )
    trainer = with_faults(trainer_main.make_trainer(args), nan_steps="2")
    result = trainer.train()
    assert result["step"] == 3
    assert int(trainer.optimizer.iterations.numpy()) == 2  # step 2 was skipped
    assert "step 2: non-finite loss" in capsys.readouterr().err

    # Two NaN steps in a row stop training; the last good checkpoint stays.
    args = tiny_run_args(
        tmp_path,
        "--steps=6",
        "--batch_size=8",
        "--eval_examples=8",
        "--ckpt_every=1",
        "--max_nan_steps=2",
    )
    trainer = with_faults(trainer_main.make_trainer(args), nan_steps="5,6")
    with pytest.raises(training.TrainingDivergedError, match="ckpt-4"):
        trainer.train()
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-4")
    # Through main(): exit status 3 and a one-line message, no traceback.
    capsys.readouterr()
    make_trainer = trainer_main.make_trainer
    monkeypatch.setattr(
        trainer_main,
        "make_trainer",
        lambda *a, **k: with_faults(make_trainer(*a, **k), nan_steps="5,6"),
    )
    code = trainer_main.main(
        TINY + [f"--out={tmp_path}", "--steps=6", "--batch_size=8", "--max_nan_steps=2"]
    )
    err = capsys.readouterr().err
    assert code == 3 and "consecutive non-finite steps" in err and "Traceback" not in err


def test_missing_dataset_message(tmp_path, capsys):
    code = trainer_main.main(
        TINY + ["--dataset=mnist", f"--data_dir={tmp_path / 'none'}", f"--out={tmp_path / 'run'}"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "mnist" in err and "not found" in err and "--data_dir" in err
    assert "Traceback" not in err


def test_model_config_mismatch_is_refused(tmp_path, capsys):
    trainer_main.make_trainer(tiny_run_args(tmp_path))  # writes config.json
    code = trainer_main.main(TINY + [f"--out={tmp_path}", "--hidden_channels=8"])
    assert code == 2 and "different model configuration" in capsys.readouterr().err


def test_version_1_run_dir_resumes_with_its_old_architecture(tmp_path):
    # A run directory written before config_version existed (no config_version,
    # first_resblock, squeeze_order keys) resumes as the model it was built as.
    spec = trainer_main.resolve_run(tiny_run_args(tmp_path))
    old = spec.config_json()
    for key in ("config_version", "first_resblock", "squeeze_order", "init"):
        del old["flow_config"][key]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(old, f)
    trainer = trainer_main.make_trainer(tiny_run_args(tmp_path))
    cfg = trainer.flow_config
    assert (cfg.config_version, cfg.first_resblock, cfg.squeeze_order) == (
        1,
        False,
        "space_to_depth",
    )
    assert isinstance(trainer.model.stages[1], models.rbij.ActNorm)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["flow_config"]["config_version"] == 1
    # Any other difference is still refused.
    old["flow_config"]["hidden_channels"] = 8
    with open(tmp_path / "config.json", "w") as f:
        json.dump(old, f)
    with pytest.raises(training.UsageError, match="hidden_channels"):
        trainer_main.make_trainer(tiny_run_args(tmp_path))


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from rflow_tf import training
    from rflow_tf.training.steps import variable_value
    from train import main as m
    training.configure_cpu_devices(2)
    args = m.parse_args({argv!r})
    trainer = m.make_trainer(args)
    result = trainer.train()
    s = trainer.strategy
    groups = {{"model": trainer.model.variables, "ema": trainer.ema_vars,
               "optimizer": trainer.optimizer.variables}}
    diffs = {{}}
    for name, vs in groups.items():
        worst = 0.0
        for v in vs:
            parts = [np.asarray(p) for p in s.experimental_local_results(variable_value(v))]
            assert len(parts) == 2, (name, len(parts))
            if parts[0].dtype != bool:
                worst = max(worst, float(np.max(np.abs(parts[0] - parts[1]), initial=0.0)))
            elif not np.array_equal(parts[0], parts[1]):
                worst = 1.0
        diffs[name] = worst
    print("RESULT " + json.dumps({{"replicas": s.num_replicas_in_sync, "diffs": diffs,
                                   "iterations": int(trainer.optimizer.iterations.numpy()),
                                   "test_bpd": result["test_bpd"],
                                   "strategy": type(s).__name__}}))
""")


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    argv = TINY + [
        f"--out={tmp_path}",
        "--cpu_devices=2",
        "--steps=3",
        "--batch_size=8",
        "--eval_examples=16",
    ]
    script = _MIRRORED_SCRIPT.format(argv=argv)
    out = run_script_result(script, tmp_path)
    assert out["strategy"] == "MirroredStrategy" and out["replicas"] == 2
    assert out["iterations"] == 3 and np.isfinite(out["test_bpd"])
    assert out["diffs"] == {"model": 0.0, "ema": 0.0, "optimizer": 0.0}, out["diffs"]


# ----------------------------------------------------------------------------
# Faults: bad flags, run-directory lock, lost/corrupt checkpoints, exact resume
# ----------------------------------------------------------------------------


def run_main(argv):
    """main(argv)'s exit status; argparse's own rejections (SystemExit) included."""
    try:
        return trainer_main.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "flag",
    [
        "--lr=inf",
        "--grad_clip=nan",
        "--n_blocks=-1",
        "--ckpt_every=0",
        "--cpu_devices=-1",
        "--keep_best=0",
        "--eval_examples=-5",
        "--temperature=-1",
        "--n_sample_images=0",
    ],
)
def test_bad_flag_is_rejected_before_any_work(tmp_path, capsys, flag):
    out = tmp_path / "run"
    code = run_main(TINY + [f"--out={out}", "--steps=1", flag])
    err = capsys.readouterr().err
    name = flag.split("=")[0]
    assert code == 2 and name in err and "Traceback" not in err, err
    assert not out.exists()  # nothing was started


def test_flag_constraints_name_real_flags():
    parser = trainer_main.build_parser()
    dests = {a.dest for a in parser._actions}  # pylint: disable=protected-access
    for flag, _, _ in training.FLAG_CONSTRAINTS:
        assert flag in dests, flag
    training.check_flags(trainer_main.parse_args([]))  # the defaults pass


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from rflow_tf.training import RunDirLock
    lock = RunDirLock({run_dir!r}).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_run_dir_lock_refuses_a_second_trainer_and_dies_with_its_holder(tmp_path, capsys):
    first = trainer_main.make_trainer(tiny_run_args(tmp_path))
    assert first.lock.held
    config = (tmp_path / "config.json").read_text()
    code = trainer_main.main(TINY + [f"--out={tmp_path}", "--seed=5"])
    err = capsys.readouterr().err
    assert code == 2 and "in use by another trainer" in err and f"pid {os.getpid()}" in err
    assert (tmp_path / "config.json").read_text() == config  # nothing overwritten
    first.close()
    # A holder killed with SIGKILL (no cleanup at all) leaves no stale lock.
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK.format(run_dir=str(tmp_path))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(training.RunDirLockedError, match=f"pid {proc.pid}"):
            training.RunDirLock(str(tmp_path)).acquire()
    finally:
        proc.kill()
        proc.wait(timeout=60)
    training.RunDirLock(str(tmp_path)).acquire().release()


# Exact resume does not depend on the log-det gradient estimator; the plain backward
# traces about 4x faster than the Neumann one.
RESUME = [
    "--steps=4",
    "--batch_size=8",
    "--eval_examples=8",
    "--ckpt_every=2",
    "--eval_every=3",
    "--sample_every=100",
    "--neumann_grad=false",
]


def state_of(trainer):
    return {
        "model": values(trainer.model.variables),
        "ema": values(trainer.ema_vars),
        "optimizer": values(trainer.optimizer.variables),
    }


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """An uninterrupted run of 4 steps, checkpoints ckpt-2 and ckpt-4: (run dir, final state)."""
    out = tmp_path_factory.mktemp("trained")
    trainer = trainer_main.make_trainer(tiny_run_args(out, *RESUME))
    trainer.train()
    assert sorted(f for f in os.listdir(out / "ckpt") if f.endswith(".index")) == [
        "ckpt-2.index",
        "ckpt-4.index",
    ]
    return out, state_of(trainer)


@pytest.mark.parametrize(
    "k",
    [
        2,  # before the first checkpoint: the rerun starts from step 0
        3,  # after ckpt-2: the rerun restores ckpt-2 and trains step 3 again
    ],
)
def test_resume_after_a_kill_at_a_random_step_is_bit_identical(trained_run, tmp_path, capsys, k):
    crashed = with_faults(trainer_main.make_trainer(tiny_run_args(tmp_path, *RESUME)), crash_step=k)
    with pytest.raises(InjectedCrash, match=f"injected crash after step {k}"):
        crashed.train()
    assert not crashed.lock.held  # released on the way out
    resumed = trainer_main.make_trainer(tiny_run_args(tmp_path, *RESUME))
    resumed.train()
    log = capsys.readouterr().out
    if k >= 3:  # steps after ckpt-2 are trained again (a crash after step 2 precedes its save)
        assert f"resumed from {tmp_path / 'ckpt' / 'ckpt-2'} at step 2" in log, (k, log)
    expected = trained_run[1]
    for group, arrays in state_of(resumed).items():
        assert len(arrays) == len(expected[group])
        for i, (a, b) in enumerate(zip(expected[group], arrays)):
            np.testing.assert_array_equal(a, b, err_msg=f"kill after step {k}: {group}[{i}]")


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def restored(run_dir, *extra):
    trainer = trainer_main.make_trainer(tiny_run_args(run_dir, *RESUME, *extra))
    try:
        path = trainer.restore_or_initialize()
        return path, int(trainer.step.numpy())
    finally:
        trainer.close()


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_lost_state_file_recovers_from_the_checkpoint_files(trained_run, tmp_path, capsys, damage):
    run = copy_run(trained_run[0], tmp_path / "run")
    state = run / "ckpt" / "checkpoint"
    if damage == "deleted":
        state.unlink()
    else:
        state.write_bytes(b"\x00garbage {{{ not a CheckpointState")
    ckpt = run / "ckpt"
    (ckpt / "ckpt-1.index").write_bytes((ckpt / "ckpt-2.index").read_bytes())  # an old one
    (ckpt / "ckpt-1.data-00000-of-00001").write_bytes(
        (ckpt / "ckpt-2.data-00000-of-00001").read_bytes()
    )
    trainer = trainer_main.make_trainer(tiny_run_args(run, *RESUME))
    path = trainer.restore_or_initialize()
    assert path == str(ckpt / "ckpt-4") and int(trainer.step.numpy()) == 4
    assert ("missing" if damage == "deleted" else "unreadable") in capsys.readouterr().err
    assert tf.train.latest_checkpoint(str(ckpt)) == path  # state repaired
    # Saving on (max_to_keep=2) rotates only what this run writes: ckpt-5 goes, while the
    # recovered ckpt-4 and the unlisted ckpt-1, ckpt-2 are never deleted nor overwritten.
    for step in (5, 6, 7):
        trainer.checkpointer.save(step)
    trainer.close()
    names = sorted(f for f in os.listdir(ckpt) if f.endswith(".index"))
    assert names == [f"ckpt-{i}.index" for i in (1, 2, 4, 6, 7)]


def truncate(path, keep=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def test_corrupt_newest_checkpoint_falls_back_and_none_restoring_stops(
    trained_run, tmp_path, capsys
):
    run = copy_run(trained_run[0], tmp_path / "run")
    ckpt = run / "ckpt"
    truncate(ckpt / "ckpt-4.data-00000-of-00001")
    path, step = restored(run)
    err = capsys.readouterr().err
    assert path == str(ckpt / "ckpt-2") and step == 2
    assert "ckpt-4 does not restore" in err and "resumed from the older checkpoint" in err
    assert (ckpt / "unrestorable" / "ckpt-4.index").exists()  # kept, moved aside
    assert tf.train.latest_checkpoint(str(ckpt)) == path

    truncate(ckpt / "ckpt-2.index")  # now nothing restores: stop
    code = trainer_main.main(TINY + [f"--out={run}"] + RESUME)
    err = capsys.readouterr().err
    assert code == 2 and "none of the 1 checkpoint(s)" in err and "Traceback" not in err
    assert (ckpt / "ckpt-2.index").exists()  # nothing deleted


def test_leftovers_of_a_kill_mid_save_are_cleaned_and_skipped(trained_run, tmp_path, capsys):
    run = copy_run(trained_run[0], tmp_path / "run")
    ckpt, best = run / "ckpt", run / "ckpt_best"
    # What a kill during the save of step 6 leaves: TensorFlow's temporary directory and a
    # partial ckpt-6 (killed while merging into place); the state file still says ckpt-4.
    for d in (ckpt / "ckpt-6_temp", best / "best-6_temp"):
        d.mkdir()
        (d / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"partial")
    (ckpt / "ckpt-6.index").write_bytes((ckpt / "ckpt-4.index").read_bytes()[:20])
    (ckpt / "ckpt-6.data-00000-of-00001").write_bytes(b"")
    (ckpt / "notes_temp").mkdir()  # not ours: left alone
    path, step = restored(run)
    assert path == str(ckpt / "ckpt-4") and step == 4
    assert not (ckpt / "ckpt-6_temp").exists() and not (best / "best-6_temp").exists()
    assert (ckpt / "notes_temp").exists()
    out = capsys.readouterr()
    assert "ckpt-6_temp, left by a save that was interrupted" in out.out
    assert "ckpt-6 does not restore" in out.err
