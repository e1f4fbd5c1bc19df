"""rflow_tf.training from Python: a tiny model trained through Trainer (no script, no
subprocess), TrainingOptions mirroring the command line, options checked before any work."""

import dataclasses
import math
import os

import numpy as np
import pytest
from tiny_runs import tiny_run

import rflow_tf
from rflow_tf import layers as rl
from rflow_tf import models
from rflow_tf.training import Trainer, TrainingOptions, UsageError, flow_config_for, resolve_run


def test_trainer_fits_evaluates_samples_from_python(tmp_path):
    config, options = tiny_run(tmp_path)
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
    from rflow_tf.training import ARCHITECTURE_FLAGS
    from train import main as cli  # only to compare the flags' defaults

    flags = {a.dest: a.default for a in cli.build_parser()._actions if a.dest != "help"}
    fields = {f.name: f.default for f in dataclasses.fields(TrainingOptions)}
    assert set(fields) == set(flags) - set(ARCHITECTURE_FLAGS) - {"export_only"}
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
    config, options = tiny_run(tmp_path)
    with pytest.raises(UsageError, match="not the shape"):
        resolve_run(config.replace(input_shape=(16, 16, 1)), options)
    with pytest.raises(TypeError, match="TrainingOptions"):
        resolve_run(config, {"steps": 3})


def test_trainer_logs_learned_orders_and_exports_them(tmp_path, tb_scalars):
    """A learn_p run (mixed norms, learned orders) through Trainer: the orders
    move, go to TensorBoard (the values of the last logged step are the final
    ones), are in the result, and the SavedModel loads back with the same (EMA)
    orders and weights."""
    export_dir = str(tmp_path / "export")
    config, options = tiny_run(
        tmp_path / "run",
        dict(vnorms="2332", learn_p=True),
        steps=2,
        lr=1e-2,
        eval_every=2,
        eval_examples=16,
        sample_every=1000,
        export_dir=export_dir,
    )
    trainer = Trainer(config, options)
    result = trainer.fit()
    orders = rl.learned_orders(trainer.model.lipschitz_layers())
    assert len(orders) == 3 and result["learned_orders"] == pytest.approx(orders)
    assert not np.allclose(sorted(orders.values()), [2.0, 3.0, 3.0], atol=1e-4)  # learned
    for name, p in orders.items():
        logged = tb_scalars(options.out, f"norm_order/{name}")
        assert sorted(logged) == [1, 2] and logged[2] == pytest.approx(p, rel=1e-6)
    dist = rflow_tf.load(export_dir)

    def layer_orders(model):  # (domain, codomain) of each layer, in order
        return np.array([np.array(layer.orders()) for layer in rl.lipschitz_layers(model)])

    with trainer.ema_weights():
        ema_orders = layer_orders(trainer.model)
        ema_weights = [np.array(w) for w in trainer.model.trainable_weights]
    assert ema_orders.shape == (3, 2) and not np.allclose(ema_orders, layer_orders(trainer.model))
    np.testing.assert_allclose(layer_orders(dist.model), ema_orders, rtol=1e-6)
    assert len(rl.learned_orders(dist.model)) == 3  # still learnable and tied
    # (The power-iteration state is re-converged by the export; the density
    # of exported models is tested in tests/test_export.py.)
    for a, b in zip(dist.model.trainable_weights, ema_weights):
        np.testing.assert_array_equal(np.array(a), b)
