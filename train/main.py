#!/usr/bin/env python
"""Trains a multiscale Residual Flow on images with tf.distribute.

Usage (``python train/main.py --help`` explains every flag)::

    python train/main.py                              # sklearn digits, CPU preset, minutes
    python train/main.py --dataset=mnist              # the paper's MNIST model, all GPUs
    python train/main.py --dataset=celeb_a_hq --data_dir=/data/celeba-tfr  # Glow's TFRecords
    python train/main.py --cpu_devices=2 --steps=100  # MirroredStrategy over 2 logical CPUs
    python train/main.py --task=hybrid --hybrid_lambda=1/D --block=coupling --invertible_1x1

Training objective, per example, for dequantised pixels x in [0, 1]^D:

    bits/dim = -(log p(x) - D n_bits ln 2) / (D ln 2),
    log p(x) = log N(f(x); 0, I) + log |det df/dx|         (unbiased estimate)

(``--task=density``). ``--task=classification`` minimises the cross-entropy
-log p(y | x) of classifier heads on the flow's per-scale features (no
log-determinant is computed); ``--task=hybrid`` the paper's hybrid objective
lambda * (-log P(x)) - log p(y | x) in nats per image, with
-log P(x) = bits/dim * D ln 2 and ``--hybrid_lambda`` lambda (a number, or 1/D),
see :func:`rflow_tf.classifier.hybrid_loss`. Classification and hybrid runs
read labelled data with the reference's augmentation
(:func:`rflow_tf.data.classification_augmentation`), report test accuracy
and cross-entropy (and bits/dim for hybrid) and keep the best checkpoint by
test bits/dim (hybrid) or test error (classification).

With ``--dequantization=variational`` the noise u of x = (x_int + u) / 2^n comes
from a conditional flow q(u | x_int) trained with the model
(:class:`rflow_tf.bijectors.dequantization.VariationalDequantizer`); the loss and
the test bits/dim are then the negative ELBO, with - log q(u|x_int) in the numerator.

Run directory (``--out``, default ``runs/<dataset>_<preset>``)::

    config.json          model config + training settings of the run
    .lock                exclusive lock of the running trainer (pid inside)
    ckpt/                latest checkpoints (model, optimizer, EMA, step, ActNorm state)
    ckpt_best/           best checkpoint(s) by test bits/dim
    samples/step_*.png   sample grids (EMA weights)
    tb/                  TensorBoard scalars
    results.json         final and best test bits/dim

Rerunning the same command resumes from ``ckpt/`` exactly (the data order, the
noise and the estimators are functions of (seed, step)), past a lost checkpoint
index, a corrupt newest checkpoint or a kill mid-save; ``<run dir>/.lock`` keeps
a second trainer off the directory. Several machines (``--strategy=multi_worker``,
cluster from ``$TF_CONFIG``; README "Training on several machines") run the same
command with the same ``--out`` on a shared filesystem; only the chief writes the
run directory, and a lost worker stops the others with exit status 4. The loss,
optimiser, EMA and power iteration: :class:`rflow_tf.training.Trainer`.

This script is a thin command line over :mod:`rflow_tf.training`: its flags
are generated from the declarations of :class:`rflow_tf.training.TrainingOptions`
and :class:`rflow_tf.models.FlowConfig` (:mod:`rflow_tf.settings`), and become
one of each (:func:`options_from_args`, :func:`config_from_args`) for
:class:`rflow_tf.training.Trainer` (:func:`make_trainer`). Library use
without flags::

    from rflow_tf.training import Trainer, TrainingOptions
    result = Trainer(None, TrainingOptions(preset="tiny", steps=20, out="/tmp/run")).fit()
    result["test_bpd"]
"""

import argparse
import importlib.util
import sys

import rflow_tf  # noqa: F401  (first: sets TensorFlow's runtime defaults)
from rflow_tf import data, models, settings, training
from rflow_tf.torch_format import UnsafeCheckpointError

#: The sections of ``--help``, in order; each flag's section is declared with it
#: (:func:`rflow_tf.settings.setting`), and a section not listed here comes last.
HELP_SECTIONS = (
    "data and model",
    "task",
    "log-det estimator",
    "optimisation",
    "evaluation, logging and checkpoints",
    "distribution",
    "export",
)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help text already explains the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.help == argparse.SUPPRESS
            or isinstance(action, argparse._HelpAction)
        ):  # pylint: disable=protected-access
            return text
        if action.default is None:
            return text + " (default: the preset's value)"
        return text + " (default: %(default)s)"


def build_parser():
    """The argparse parser of ``train/main.py`` (see ``--help``): a flag for every
    :class:`rflow_tf.training.TrainingOptions` field, then one for every
    :class:`rflow_tf.models.FlowConfig` flag field (default None: the preset's
    value), generated from their declarations, and ``--export_only``.

    Example: ``build_parser().parse_args(["--dataset=mnist"])``.
    """
    p = argparse.ArgumentParser(
        prog="train/main.py",
        description="Train a multiscale Residual Flow (Chen et al. 2019) on images. "
        "Flags left unset take the preset's value (see rflow_tf.models.PRESETS).",
        formatter_class=_HelpFormatter,
    )
    groups = settings.add_flags(
        p, [training.TrainingOptions, models.FlowConfig], HELP_SECTIONS, unset=[models.FlowConfig]
    )
    groups["export"].add_argument(
        "--export_only",
        action="store_true",
        help="Export the latest checkpoint of the run directory and exit.",
    )
    return p


def parse_args(argv=None):
    """Parses ``argv`` (default ``sys.argv[1:]``) into an argparse Namespace.

    Example: ``args = parse_args(["--preset=tiny", "--steps=10"])``.
    """
    return build_parser().parse_args(argv)


def options_from_args(args):
    """The :class:`rflow_tf.training.TrainingOptions` of parsed flags ``args``.

    Example: ``options_from_args(parse_args(["--steps=10"])).steps  # 10``.
    """
    names = settings.flag_names(training.TrainingOptions)
    return training.TrainingOptions(**{name: getattr(args, name) for name in names})


def config_from_args(args, options=None):
    """The FlowConfig of parsed flags ``args``: the preset's architecture for the
    dataset, with the FlowConfig flags that were set
    (:func:`rflow_tf.training.flow_config_for`).

    Example: ``config_from_args(parse_args(["--n_blocks=2-2"])).n_blocks  # (2, 2)``.
    """
    options = options_from_args(args) if options is None else options
    names = settings.flag_names(models.FlowConfig)
    return training.flow_config_for(options, **{name: getattr(args, name) for name in names})


def resolve_run(args):
    """Builds the :class:`rflow_tf.training.RunSpec` of parsed flags ``args``;
    raises UsageError for inconsistent flags.

    Example: ``spec = resolve_run(parse_args(["--dataset=mnist"]))``.
    """
    training.check_flags(args)
    options = options_from_args(args)
    return training.resolve_run(config_from_args(args, options), options)


def make_trainer(args, strategy=None, check_data=True):
    """The :class:`rflow_tf.training.Trainer` of parsed flags ``args``.

    Example:
    ```python
    trainer = make_trainer(parse_args(["--preset=tiny", "--steps=10", "--out=/tmp/r"]))
    result = trainer.train()
    ```
    """
    training.check_flags(args)
    options = options_from_args(args)
    config = config_from_args(args, options)
    return training.Trainer(config, options, strategy=strategy, check_data=check_data)


def train(args, strategy=None):
    """Trains (or resumes) the run described by parsed flags ``args``; returns
    the result dict of :meth:`rflow_tf.training.Trainer.train`.

    Example: ``train(parse_args(["--preset=tiny", "--steps=5", "--out=/tmp/r"]))``.
    """
    return make_trainer(args, strategy=strategy).train()


def export_only(args, strategy=None):
    """Restores the latest checkpoint of the run and runs the export hook.

    Example: ``export_only(parse_args(["--out=runs/x", "--export_only"]))``.
    """
    trainer = make_trainer(args, strategy=strategy, check_data=False)  # no data needed
    try:
        if not trainer.restore_latest():
            raise training.UsageError(f"--export_only: no checkpoint in {trainer.ckpt_dir}")
        if importlib.util.find_spec("rflow_tf.export") is None:
            raise training.UsageError(
                "--export_only: rflow_tf.export is not available in this version"
            )
        if not trainer.spec.export_dir:
            raise training.UsageError("--export_only needs a non-empty --export_dir")
        return trainer.export()
    finally:
        trainer.close()


#: Exit status of each error main() reports in one line (the first match wins).
_EXIT_STATUS = (
    (data.DatasetNotFoundError, 2),
    (data.DatasetFormatError, 2),
    (UnsafeCheckpointError, 2),
    (training.UsageError, 2),
    (training.TrainingDivergedError, 3),
    (training.WorkerLostError, 4),
)


def main(argv=None):
    """Command-line entry point; returns the process exit status (0 ok, 2 bad
    flags, missing or damaged data (found before any model is built), 3
    diverged, 4 another worker of a multi-worker cluster was lost or hangs,
    130 interrupted).

    Example: ``sys.exit(main(["--dataset=celeb_a_hq", "--data_dir=/data/celeba-tfr"]))``.
    """
    args = parse_args(argv)
    errors = tuple(kind for kind, _ in _EXIT_STATUS)
    try:
        training.check_flags(args)
        if args.cpu_devices > 1:
            training.configure_cpu_devices(args.cpu_devices)
        if args.export_only:
            export_only(args)
        else:
            train(args)
        return 0
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return next(code for kind, code in _EXIT_STATUS if isinstance(e, kind))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
