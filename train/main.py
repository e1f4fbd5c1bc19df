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

With ``--dequantization=variational`` the pixels are x = (x_int + u) / 2^n
with u ~ q(u | x_int), a conditional flow trained jointly with the model
(:class:`rflow_tf.bijectors.dequantization.VariationalDequantizer`), and the loss is
the negative ELBO in bits/dim, -(log p(x) - D n_bits ln 2 - log q(u|x_int)) /
(D ln 2); the reported test bits/dim is then that dequantisation bound (with
uniform noise log q = 0, the formula above).

Losses are averaged over the global batch with ``tf.nn.compute_average_loss``; Adam
(beta 0.9, 0.99) with linear warm-up, gradient-norm clipping, optional
gradient accumulation, an exponential moving average (EMA) of the weights
used for evaluation and sampling, and power iteration to convergence after
every optimiser step and before every evaluation or sampling.

Run directory (``--out``, default ``runs/<dataset>_<preset>``)::

    config.json          model config + training settings of the run
    .lock                exclusive lock of the running trainer (pid inside)
    ckpt/                latest checkpoints (model, optimizer, EMA, step, ActNorm state)
    ckpt_best/           best checkpoint(s) by test bits/dim
    samples/step_*.png   sample grids (EMA weights)
    tb/                  TensorBoard scalars
    results.json         final and best test bits/dim

Rerunning the same command resumes from ``ckpt/`` (step, optimizer, EMA,
ActNorm initialisation) with no extra flags, exactly: the data order, the
dequantisation noise and the estimators are functions of (seed, step), so a
killed and resumed run ends bit-identical to an uninterrupted one. A lost or
garbage ``ckpt/checkpoint`` file is rebuilt from the files present, a corrupt
newest checkpoint falls back to the newest one that restores (moved to
``ckpt/unrestorable/``, never deleted), leftovers of a kill mid-save
(``ckpt-N_temp/``) are removed, and ``<run dir>/.lock`` (flock) keeps a second
trainer off the directory.

Several machines (``--strategy=multi_worker``, cluster from ``$TF_CONFIG``;
README "Training on several machines"): every worker runs the same command
with the same ``--out`` on a shared filesystem; each takes its slices of every
global batch (:func:`distribute_dataset`), and only the chief writes the run
directory and the export (the others write checkpoints and the export into a
temporary directory they delete). A lost worker stops the others with exit
status 4 and a message; rerunning every worker resumes from the chief's last
checkpoint.

This script is a thin command line over :mod:`rflow_tf.training`: the flags
become a :class:`rflow_tf.training.TrainingOptions` and a
:class:`rflow_tf.models.FlowConfig` (:func:`options_from_args`,
:func:`config_from_args`) for :class:`rflow_tf.training.Trainer`. Library use
without flags::

    from rflow_tf.training import Trainer, TrainingOptions
    result = Trainer(None, TrainingOptions(preset="tiny", steps=20, out="/tmp/run")).fit()
    result["test_bpd"]
"""

import argparse
import dataclasses
import importlib.util
import sys

import rflow_tf  # noqa: F401  (first: sets TensorFlow's runtime defaults)
from rflow_tf import classifier, data, models, training
from rflow_tf.torch_format import UnsafeCheckpointError

# The library names this script has always offered (train.main.X keeps working).
from rflow_tf.training import (  # noqa: F401
    FLAG_CONSTRAINTS,
    TASKS,
    LinearWarmup,
    PreReducedAdam,
    ProgressWatchdog,
    RunDirLock,
    RunDirLockedError,
    RunSpec,
    TrainingDivergedError,
    TrainingOptions,
    UsageError,
    WorkerLostError,
    check_flags,
    checkpoint_candidates,
    configure_cpu_devices,
    distribute_dataset,
    make_dequantizer,
    make_eval_step,
    make_optimizer,
    make_strategy,
    make_train_step,
    remove_stale_temp_checkpoints,
    restore_newest,
    trained_variables,
    write_scalar,
)
from rflow_tf.training.steps import _var  # noqa: F401

__all__ = [
    "build_parser",
    "parse_args",
    "ARCHITECTURE_FLAGS",
    "options_from_args",
    "config_from_args",
    "resolve_run",
    "Trainer",
    "train",
    "export_only",
    "main",
]

#: The flags that are FlowConfig fields (the architecture); every other flag but
#: --export_only is a TrainingOptions field of the same name.
ARCHITECTURE_FLAGS = (
    "n_bits",
    "logdet",
    "logdet_eval",
    "n_terms",
    "n_exact_terms",
    "dist",
    "rate",
    "p",
    "n_samples",
    "neumann_grad",
    "grad_in_forward",
    "n_blocks",
    "hidden_channels",
    "activation",
    "logit_alpha",
    "factor_out",
    "fc_end",
    "fc_hidden",
    "kernels",
    "coeff",
    "vnorms",
    "learn_p",
    "actnorm",
    "first_resblock",
    "squeeze_first",
    "init",
    "block",
    "invertible_1x1",
    "init_layer",
    "head_channels",
    "head_pooling",
)


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------


def _str2bool(value):
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _int_list(value):
    parts = str(value).replace(",", "-").split("-")
    try:
        out = tuple(int(v) for v in parts)
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 16-16-16, got {value!r}")
    return out


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
    """The argparse parser of ``train/main.py`` (see ``--help``).

    Example: ``build_parser().parse_args(["--dataset=mnist"])``.
    """
    p = argparse.ArgumentParser(
        prog="train/main.py",
        description="Train a multiscale Residual Flow (Chen et al. 2019) on images. "
        "Flags left unset take the preset's value (see rflow_tf.models.PRESETS).",
        formatter_class=_HelpFormatter,
    )
    bool_kw = dict(type=_str2bool, nargs="?", const=True, metavar="BOOL")

    g = p.add_argument_group("data and model")
    g.add_argument(
        "--dataset",
        default="digits",
        help="digits (offline, sklearn 8x8), mnist, cifar10, svhn_cropped (TFDS), "
        "celeb_a_hq (Glow's celeba-tfr TFRecords, the authors' .pth files or TFDS "
        "celeb_a_hq/256), celeba_5bit (the authors' .pth file), imagenet32, imagenet64 "
        "(the authors' .pth or .npz files). Missing data stops the run at once "
        "(docs/datasets.md).",
    )
    g.add_argument(
        "--preset",
        default=None,
        help=f"Architecture + training defaults, one of {sorted(models.PRESETS)}. "
        "Default: chosen from the dataset (digits -> digits_small, mnist -> "
        "mnist, ...). The input shape and bits always come from the dataset.",
    )
    g.add_argument(
        "--data_dir",
        default=None,
        help="Where the data is: Glow's extracted celeba-tfr folder (holding train/ "
        "and validation/), the authors' data/ folder (celebahq/, celebahq64_5bit/, "
        "imagenet32/, imagenet64/), or a TFDS data directory. "
        "Default: $TFDS_DATA_DIR or ~/tensorflow_datasets.",
    )
    g.add_argument(
        "--download",
        default=True,
        **bool_kw,
        help="Let TFDS download/prepare a missing dataset (needs network).",
    )
    g.add_argument(
        "--n_bits",
        type=int,
        default=None,
        help="Bits per pixel (default: the dataset's, 5 for celeb_a_hq).",
    )
    g.add_argument(
        "--n_blocks",
        type=_int_list,
        default=None,
        help="Residual blocks per scale, e.g. 16-16-16 (default: preset).",
    )
    g.add_argument(
        "--hidden_channels",
        type=int,
        default=None,
        help="Hidden channels of each block (default: preset).",
    )
    g.add_argument(
        "--activation",
        default=None,
        choices=["lipswish", "elu", "softplus", "relu", "lcube"],
        help="Block activation (default: preset; lcube: the Lipschitz cube, "
        "1-Lipschitz in every p-norm like the others).",
    )
    g.add_argument(
        "--factor_out",
        default=None,
        **bool_kw,
        help="Factor out half the channels after each scale (default: preset).",
    )
    g.add_argument(
        "--fc_end",
        default=None,
        **bool_kw,
        help="Fully connected blocks on the last scale (default: preset).",
    )
    g.add_argument(
        "--logit_alpha",
        type=float,
        default=None,
        help="alpha of the logit layer y = logit(alpha + (1 - 2 alpha) x) "
        "(default: preset; the reference: 1e-6 for MNIST, 0.05 otherwise).",
    )
    g.add_argument(
        "--block",
        default=None,
        choices=list(models.BLOCK_TYPES),
        help="Flow blocks: residual (the paper's) or coupling (affine coupling "
        "baseline of Tables 4/5) (default: preset).",
    )
    g.add_argument(
        "--invertible_1x1",
        default=None,
        **bool_kw,
        help="Invertible 1x1 convolution before every block (the reference's "
        "--quadratic) (default: preset).",
    )
    g.add_argument(
        "--init_layer",
        default=None,
        choices=list(models.INIT_LAYERS),
        help="First layer: logit, or cifar10 per-channel normalisation. Default: "
        "cifar10 for classification/hybrid on CIFAR-10 (as the reference), "
        "else the preset's.",
    )

    g.add_argument(
        "--fc_hidden",
        type=_int_list,
        default=None,
        help="Hidden widths of the FC-end blocks, e.g. 128-128 (default: preset).",
    )
    g.add_argument(
        "--kernels",
        default=None,
        help="Kernel sizes of each block's convolutions, e.g. 3-1-3 (default: preset).",
    )
    g.add_argument(
        "--coeff",
        type=float,
        default=None,
        help="Lipschitz bound (< 1) of every linear map in a block (paper: 0.98).",
    )
    g.add_argument(
        "--vnorms",
        default=None,
        help="Norm orders of each block's linear maps, one per linear layer + 1 "
        "('f' = inf), first = last, e.g. 2222 or 2f12 for kernels 3-1-3: layer i is "
        "normalised in ||W||_{p_i->p_{i+1}} (default: preset, 2222 = spectral norm).",
    )
    g.add_argument(
        "--learn_p",
        default=None,
        **bool_kw,
        help="Learn the norm orders (initialised at --vnorms, kept in [1.001, 5]; "
        "logged to TensorBoard as norm_order/*) (default: preset, false).",
    )
    g.add_argument(
        "--actnorm", default=None, **bool_kw, help="ActNorm after every block (default: preset)."
    )
    g.add_argument(
        "--first_resblock",
        default=None,
        **bool_kw,
        help="The reference's first block: ActNorm before it and no pre-activation "
        "(default: preset; the paper's models use it).",
    )
    g.add_argument(
        "--squeeze_first",
        default=None,
        **bool_kw,
        help="Squeeze the input before the first scale (default: preset).",
    )
    g.add_argument(
        "--init",
        default=None,
        choices=["reference", "glorot"],
        help="Initialisation of fresh weights (default: preset; 'reference' as the authors' code).",
    )
    g.add_argument(
        "--head_channels",
        type=int,
        default=None,
        help="Classification/hybrid: output channels of each classifier head's 3x3 "
        "convolution (default: preset, 256 as the paper).",
    )
    g.add_argument(
        "--head_pooling",
        default=None,
        choices=list(classifier.HEAD_POOLINGS),
        help="Classification/hybrid: average (global average pooling of each head, the "
        "reference) or flatten (no pooling; for tiny images, with a small "
        "--head_channels) (default: preset, average).",
    )
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        default="density",
        choices=list(TASKS),
        help="density: maximum likelihood; classification: classifier heads on the "
        "flow's features, cross-entropy only (no log-det); hybrid: "
        "hybrid_lambda * (-log p(x)) - log p(y|x) (nats per image).",
    )
    g.add_argument(
        "--hybrid_lambda",
        default=None,
        help="Weight of -log p(x) in the hybrid loss: a number >= 0 or 1/D "
        "(D = dimensions per image); paper: 1 or 1/D. Default: 1 "
        "(--task=hybrid only).",
    )
    g.add_argument(
        "--crop_padding",
        type=int,
        default=None,
        help="Classification/hybrid only: translate every training image by up to "
        "this many pixels each way (random crop, reflection padding). Default: "
        "the reference's for the dataset (4 for svhn_cropped and cifar10, 0 for "
        "mnist and digits).",
    )
    g.add_argument(
        "--translate",
        type=float,
        default=None,
        help="Classification/hybrid only: shift every training image by a random "
        "sub-pixel offset of up to this many pixels each way (bilinear, zero fill; "
        "not a reference option). Default: 0 (none).",
    )
    g.add_argument(
        "--label_smoothing",
        type=float,
        default=None,
        help="Classification/hybrid only: train the classifier on the smoothed labels "
        "(1 - eps) onehot + eps / n_classes (not a reference option; the reported "
        "cross-entropy stays the plain one). Default: 0 (none).",
    )

    g = p.add_argument_group("log-det estimator")
    g.add_argument(
        "--n_exact_terms",
        type=int,
        default=None,
        help="Power-series terms always evaluated when training (paper: 2; 8 for "
        "celeb_a_hq). Evaluation always uses 20.",
    )
    g.add_argument(
        "--logdet",
        default=None,
        choices=["unbiased", "truncated", "exact"],
        help="Log-det estimator of the residual blocks: unbiased (Russian roulette, "
        "the paper), truncated (first --n_terms terms, i-ResNet; biased) or "
        "exact (full Jacobian, tiny images only) (default: preset).",
    )
    g.add_argument(
        "--n_terms",
        type=int,
        default=None,
        help="Terms of the truncated estimator (default: preset).",
    )
    g.add_argument(
        "--logdet_eval",
        default=None,
        choices=["unbiased", "truncated", "exact"],
        help="Evaluation log-det estimator (default: unbiased when --logdet is "
        "truncated, else the same as --logdet); test bits/dim use it.",
    )
    g.add_argument(
        "--dist",
        default=None,
        choices=["poisson", "geometric"],
        help="Russian-roulette distribution of the number of extra terms.",
    )
    g.add_argument(
        "--rate",
        type=float,
        default=None,
        help="Poisson rate of the roulette (--dist=poisson; paper: 2).",
    )
    g.add_argument(
        "--p",
        type=float,
        default=None,
        help="Success probability in (0, 1) of the geometric roulette (--dist=geometric).",
    )
    g.add_argument(
        "--n_samples",
        type=int,
        default=None,
        help="Roulette draws averaged per estimate (default: preset, 1).",
    )
    g.add_argument(
        "--neumann_grad",
        default=None,
        **bool_kw,
        help="Neumann-series gradient of the log-det (memory does not grow "
        "with the number of terms).",
    )
    g.add_argument(
        "--grad_in_forward",
        default=None,
        **bool_kw,
        help="Compute the log-det gradient during the forward pass (needs --neumann_grad).",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="Global batch size per micro-step (split over replicas).",
    )
    g.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="Training length in epochs of the training split.",
    )
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Training length in optimiser steps (wins over --epochs).",
    )
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (paper: 1e-3).")
    g.add_argument(
        "--warmup_steps",
        type=int,
        default=None,
        help="Linear learning-rate warm-up from lr/warmup_steps to lr.",
    )
    g.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help="Decay of the EMA of the weights used for evaluation/sampling.",
    )
    g.add_argument(
        "--grad_clip",
        type=float,
        default=None,
        help="Clip the global gradient norm to this value (0 disables).",
    )
    g.add_argument(
        "--accumulate",
        type=int,
        default=None,
        help="Micro-batches of --batch_size accumulated per optimiser step.",
    )
    g.add_argument(
        "--dequantization",
        default="uniform",
        choices=["uniform", "variational"],
        help="Dequantisation noise: uniform, or a learned conditional flow q(u|x) "
        "(Flow++) trained with the model on the negative ELBO; test bits/dim "
        "is then the variational bound. Fixed for the life of a run.",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the initial weights, data order, dequantisation noise and "
        "log-det estimators (stateless; the replica id is folded in).",
    )
    g.add_argument(
        "--jit_compile",
        default=False,
        **bool_kw,
        help="Compile the per-replica forward/backward with XLA.",
    )
    g.add_argument(
        "--max_nan_steps",
        type=int,
        default=10,
        help="Stop after this many consecutive non-finite steps (each one is "
        "skipped with a warning).",
    )

    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument(
        "--out",
        default=None,
        help="Run directory. Default: runs/<run name>, run name = "
        "<dataset>_<preset>. Rerunning with the same directory resumes.",
    )
    g.add_argument("--run_name", default=None, help="Run name (default <dataset>_<preset>).")
    g.add_argument(
        "--eval_every",
        type=int,
        default=None,
        help="Test bits/dim (EMA weights, 20 exact terms) every N steps and at "
        "the end (default: preset).",
    )
    g.add_argument(
        "--eval_examples",
        type=int,
        default=0,
        help="Test images per evaluation (0 = the whole test split).",
    )
    g.add_argument(
        "--sample_every",
        type=int,
        default=None,
        help="Write a PNG grid of samples every N steps and at the end.",
    )
    g.add_argument("--n_sample_images", type=int, default=64, help="Images per sample grid.")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    g.add_argument(
        "--log_every",
        type=int,
        default=50,
        help="Progress line and TensorBoard scalars every N steps.",
    )
    g.add_argument(
        "--ckpt_every",
        type=int,
        default=None,
        help="Save the latest checkpoint every N steps (default: --eval_every).",
    )
    g.add_argument(
        "--keep_best",
        type=int,
        default=1,
        help="Number of best-by-test-bits/dim checkpoints kept in ckpt_best/.",
    )

    g = p.add_argument_group("distribution")
    g.add_argument(
        "--strategy",
        default="mirrored",
        choices=["mirrored", "one_device", "multi_worker"],
        help="mirrored: MirroredStrategy over all visible GPUs (or over the "
        "--cpu_devices logical CPUs), one device if there is only one; "
        "one_device: first GPU or the CPU; multi_worker: "
        "MultiWorkerMirroredStrategy configured by $TF_CONFIG.",
    )
    g.add_argument(
        "--worker_timeout",
        type=float,
        default=1800,
        help="multi_worker only: stop with an error (exit status 4) when training "
        "makes no progress (no step, evaluation batch or save finishes) for "
        "this many seconds, e.g. because another worker hangs; 0 disables. A "
        "worker that dies is usually detected within seconds anyway.",
    )
    g.add_argument(
        "--cpu_devices",
        type=int,
        default=0,
        help="Split the CPU into N logical devices before TensorFlow starts and "
        "mirror over them (tests the multi-device path without GPUs).",
    )

    g = p.add_argument_group("export")
    g.add_argument(
        "--export_dir",
        default=None,
        help="SavedModel directory written at the end of training with the EMA "
        "weights if rflow_tf.export is available (default "
        "saved_models/<run name>; '' disables).",
    )
    g.add_argument(
        "--export_only",
        action="store_true",
        help="Export the latest checkpoint of the run directory and exit.",
    )

    # Testing aids: comma-separated steps whose loss is replaced by NaN; a step after
    # which training stops abruptly, saving nothing (a kill).
    p.add_argument("--inject_nan_steps", default="", help=argparse.SUPPRESS)
    p.add_argument("--inject_crash_step", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    """Parses ``argv`` (default ``sys.argv[1:]``) into an argparse Namespace.

    Example: ``args = parse_args(["--preset=tiny", "--steps=10"])``.
    """
    return build_parser().parse_args(argv)


def options_from_args(args):
    """The :class:`rflow_tf.training.TrainingOptions` of parsed flags ``args``
    (every flag that is not in :data:`ARCHITECTURE_FLAGS`).

    Example: ``options_from_args(parse_args(["--steps=10"])).steps  # 10``.
    """
    return TrainingOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingOptions)}
    )


def config_from_args(args, options=None):
    """The FlowConfig of parsed flags ``args``: the preset's architecture for the
    dataset, with the :data:`ARCHITECTURE_FLAGS` that were set
    (:func:`rflow_tf.training.flow_config_for`).

    Example: ``config_from_args(parse_args(["--n_blocks=2-2"])).n_blocks  # (2, 2)``.
    """
    options = options_from_args(args) if options is None else options
    return training.flow_config_for(
        options, **{flag: getattr(args, flag, None) for flag in ARCHITECTURE_FLAGS}
    )


def resolve_run(args):
    """Builds the :class:`rflow_tf.training.RunSpec` of parsed flags ``args``;
    raises UsageError for inconsistent flags.

    Example: ``spec = resolve_run(parse_args(["--dataset=mnist"]))``.
    """
    check_flags(args)
    options = options_from_args(args)
    return training.resolve_run(config_from_args(args, options), options)


class Trainer(training.Trainer):
    """:class:`rflow_tf.training.Trainer` built from parsed flags ``args``.

    Example:
    ```python
    trainer = Trainer(parse_args(["--preset=tiny", "--steps=10", "--out=/tmp/r"]))
    result = trainer.train()
    ```
    """

    def __init__(self, args, strategy=None, check_data=True):
        check_flags(args)
        options = options_from_args(args)
        super().__init__(
            config_from_args(args, options), options, strategy=strategy, check_data=check_data
        )
        self.args = args


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def train(args, strategy=None):
    """Trains (or resumes) the run described by parsed flags ``args``; returns
    the result dict of :meth:`Trainer.train`.

    Example: ``train(parse_args(["--preset=tiny", "--steps=5", "--out=/tmp/r"]))``.
    """
    return Trainer(args, strategy=strategy).train()


def export_only(args, strategy=None):
    """Restores the latest checkpoint of the run and runs the export hook.

    Example: ``export_only(parse_args(["--out=runs/x", "--export_only"]))``.
    """
    trainer = Trainer(args, strategy=strategy, check_data=False)  # no data needed
    try:
        if not trainer._restore_newest():  # pylint: disable=protected-access
            raise UsageError(f"--export_only: no checkpoint in {trainer.ckpt_dir}")
        if importlib.util.find_spec("rflow_tf.export") is None:
            raise UsageError("--export_only: rflow_tf.export is not available in this version")
        if not trainer.spec.export_dir:
            raise UsageError("--export_only needs a non-empty --export_dir")
        return trainer.export()
    finally:
        trainer.close()


def main(argv=None):
    """Command-line entry point; returns the process exit status (0 ok, 2 bad
    flags, missing or damaged data (found before any model is built), 3
    diverged, 4 another worker of a multi-worker cluster was lost or hangs,
    130 interrupted).

    Example: ``sys.exit(main(["--dataset=celeb_a_hq", "--data_dir=/data/celeba-tfr"]))``.
    """
    args = parse_args(argv)
    try:
        check_flags(args)
        if args.cpu_devices > 1:
            configure_cpu_devices(args.cpu_devices)
        if args.export_only:
            export_only(args)
        else:
            train(args)
        return 0
    except (data.DatasetNotFoundError, data.DatasetFormatError, UnsafeCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except WorkerLostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
