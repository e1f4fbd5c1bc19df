"""rflow_tf.training from Python: a tiny model trained through Trainer (no script, no
subprocess), TrainingOptions mirroring the command line, options checked before any work."""

import dataclasses
import math
import os

import numpy as np
import pytest

from rflow_tf import models
from rflow_tf.training import Trainer, TrainingOptions, UsageError, flow_config_for, resolve_run


def _tiny(tmp_path, **changes):
    options = TrainingOptions(
        dataset="digits",
        preset="tiny",
        steps=3,
        batch_size=16,
        eval_every=3,
        eval_examples=32,
        n_sample_images=4,
        export_dir="",
        log_every=1,
        download=False,
        out=str(tmp_path),
        **changes,
    )
    config = flow_config_for(options, n_blocks=(1,), fc_end=False, hidden_channels=4)
    return config, options


def test_trainer_fits_evaluates_samples_from_python(tmp_path):
    config, options = _tiny(tmp_path)
    assert isinstance(config, models.FlowConfig) and config.input_shape == (8, 8, 1)
    trainer = Trainer(config, options)
    before = [np.array(v) for v in trainer.model.trainable_variables]
    result = trainer.fit()
    assert result["step"] == 3 and int(trainer.step.numpy()) == 3
    assert math.isfinite(result["test_bpd"]) and 0 < result["test_bpd"] < 20
    after = [np.array(v) for v in trainer.model.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # it trained
    bpd, se, n = trainer.evaluate()
    assert n == 32 and math.isfinite(bpd) and se > 0
    path = trainer.sample(os.path.join(tmp_path, "grid.png"), n=4)
    assert os.path.getsize(path) > 0
    assert os.path.exists(os.path.join(tmp_path, "config.json"))


def test_options_mirror_the_command_line():
    from train import main as cli  # only to compare the flags' defaults

    flags = {a.dest: a.default for a in cli.build_parser()._actions if a.dest != "help"}
    fields = {f.name: f.default for f in dataclasses.fields(TrainingOptions)}
    assert set(fields) == set(flags) - set(cli.ARCHITECTURE_FLAGS) - {"export_only"}
    assert {k: flags[k] for k in fields} == fields
    args = cli.parse_args(["--preset=tiny", "--lr=5e-4", "--n_blocks=2"])
    spec = cli.resolve_run(args)
    same = resolve_run(
        flow_config_for(TrainingOptions(preset="tiny", lr=5e-4), n_blocks=(2,)),
        TrainingOptions(preset="tiny", lr=5e-4),
    )
    assert spec.config_json() == same.config_json()


def test_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="--lr must be a finite number > 0"):
        TrainingOptions(lr=float("inf"))
    with pytest.raises(UsageError, match="--task must be one of"):
        TrainingOptions(task="nope")
    with pytest.raises(UsageError, match="unknown --preset"):
        resolve_run(None, TrainingOptions(preset="nope"))
    config, options = _tiny(tmp_path)
    with pytest.raises(UsageError, match="not the shape"):
        resolve_run(config.replace(input_shape=(16, 16, 1)), options)
    with pytest.raises(TypeError, match="TrainingOptions"):
        resolve_run(config, {"steps": 3})
