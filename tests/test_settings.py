"""Settings declared once (rflow_tf.settings): a declared option is a flag with its
help, default and check, in train/main.py and train/toy.py alike."""

import argparse
import dataclasses
from typing import List, Optional

import pytest

from rflow_tf import models, settings, toy
from rflow_tf.training import FLAG_CONSTRAINTS, TrainingOptions, UsageError, check_flags
from train import main as cli


@dataclasses.dataclass(frozen=True)
class _WithNewOption(TrainingOptions):
    """TrainingOptions plus one option, declared as every option is."""

    decay_steps: int = settings.setting(
        100, group="optimisation", check=settings.at_least(1), help="Steps of the decay."
    )


def _flag(parser, name):
    return next(a for a in parser._actions if a.dest == name)  # pylint: disable=protected-access


def test_a_declared_option_is_a_flag_with_its_help_default_and_check():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = settings.add_flags(
        parser, [_WithNewOption, models.FlowConfig], cli.HELP_SECTIONS, unset=[models.FlowConfig]
    )
    action = _flag(parser, "decay_steps")
    assert action.default == 100 and action.type is int and action.help == "Steps of the decay."
    assert action in groups["optimisation"]._group_actions  # pylint: disable=protected-access
    assert "Steps of the decay. (default: 100)" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--decay_steps=7"]).decay_steps == 7
    checks = {name: (ok, what) for name, ok, what in settings.flag_checks(_WithNewOption)}
    ok, what = checks["decay_steps"]
    assert what == ">= 1" and ok(1) and not ok(0)


def test_every_declaration_is_the_command_line():
    parser = cli.build_parser()
    for field in dataclasses.fields(TrainingOptions):
        action = _flag(parser, field.name)
        declared = settings.field_setting(field)
        assert action.default == field.default, field.name
        assert action.help in (declared.help, argparse.SUPPRESS), field.name
    for name in settings.flag_names(models.FlowConfig):
        assert _flag(parser, name).default is None, name  # unset: the preset's value
    declared = {
        n for cls in (TrainingOptions, models.FlowConfig) for n, *_ in settings.flag_checks(cls)
    }
    assert {name for name, _, _ in FLAG_CONSTRAINTS} == declared
    with pytest.raises(UsageError, match=r"^--n_bits must be in 1\.\.8, got 9$"):
        check_flags(cli.parse_args(["--n_bits=9"]))
    toy_parser = toy.build_parser()
    for field in dataclasses.fields(toy.ToyOptions):
        assert _flag(toy_parser, field.name).default == field.default, field.name


@dataclasses.dataclass(frozen=True)
class _ScriptOptions:
    """The options of a script parsed by parse_settings, as a benchmark declares them."""

    seeds: List[int] = settings.setting([0, 1], help="seeds")
    iters: int = settings.setting(10, check=settings.at_least(1), help=None)
    quick: bool = settings.setting(False, help="fewer steps")
    single: Optional[List[str]] = settings.setting(
        None, help=None, flag="hidden", nargs=2, metavar=("MODE", "N")
    )


def test_parse_settings_builds_checks_and_returns_the_dataclass(capsys):
    options = settings.parse_settings(_ScriptOptions, ["--seeds", "3", "4", "--quick"])
    assert options == _ScriptOptions(seeds=[3, 4], iters=10, quick=True, single=None)
    assert _ScriptOptions().seeds is not _ScriptOptions().seeds  # a list default is copied
    assert settings.parse_settings(_ScriptOptions, ["--single", "a", "2"]).single == ["a", "2"]
    options, extra = settings.parse_settings(_ScriptOptions, ["--lr=3"], known=True)
    assert options == _ScriptOptions() and extra == ["--lr=3"]

    def no_seed_zero(o):
        if 0 in o.seeds:
            raise ValueError("--seeds must not contain 0")

    for argv, check, message in (
        (["--iters=0"], None, "error: --iters must be >= 1, got 0"),
        ([], no_seed_zero, "error: --seeds must not contain 0"),
    ):
        with pytest.raises(SystemExit) as stop:
            settings.parse_settings(_ScriptOptions, argv, check=check)
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    with pytest.raises(SystemExit):
        settings.parse_settings(_ScriptOptions, ["--help"])
    text = capsys.readouterr().out
    assert "--seeds SEEDS [SEEDS ...]" in text and "fewer steps" in text and "MODE" not in text
