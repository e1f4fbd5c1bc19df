#!/usr/bin/env python
"""Trains a multiscale Residual Flow on images with tf.distribute.

Usage (``python train/main.py --help`` explains every flag)::

    python train/main.py                              # sklearn digits, CPU preset, minutes
    python train/main.py --dataset=mnist              # the paper's MNIST model, all GPUs
    python train/main.py --dataset=celeb_a_hq --data_dir=/data/tfds
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
(:class:`rflow_tf.dequantization.VariationalDequantizer`), and the loss is
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
checkpoint. Library use::

    from train.main import parse_args, train
    result = train(parse_args(["--preset=tiny", "--steps=20", "--out=/tmp/run"]))
    result["test_bpd"]
"""

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings

import rflow_tf  # noqa: E402,F401  (first: sets TensorFlow's runtime defaults)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tensorflow.core.framework import summary_pb2  # noqa: E402

from rflow_tf import classifier as rclf  # noqa: E402
from rflow_tf import data  # noqa: E402
from rflow_tf import dequantization as rdeq  # noqa: E402
from rflow_tf import models  # noqa: E402

_HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None

__all__ = [
    "build_parser",
    "parse_args",
    "configure_cpu_devices",
    "make_strategy",
    "resolve_run",
    "RunSpec",
    "LinearWarmup",
    "PreReducedAdam",
    "make_optimizer",
    "TASKS",
    "make_train_step",
    "make_eval_step",
    "write_scalar",
    "Trainer",
    "train",
    "export_only",
    "main",
    "UsageError",
    "TrainingDivergedError",
    "FLAG_CONSTRAINTS",
    "check_flags",
    "RunDirLock",
    "RunDirLockedError",
    "checkpoint_candidates",
    "remove_stale_temp_checkpoints",
    "restore_newest",
    "WorkerLostError",
    "ProgressWatchdog",
    "distribute_dataset",
]

_LN2 = math.log(2.0)
#: Training tasks (``--task``).
TASKS = ("density", "classification", "hybrid")


class UsageError(Exception):
    """Bad flags or an incompatible run directory; printed without a traceback."""


class TrainingDivergedError(Exception):
    """Too many consecutive non-finite steps; the message names the last good checkpoint."""


class WorkerLostError(Exception):
    """A worker of a multi-worker cluster died or stopped answering; the message
    names the checkpoint a restart of every worker resumes from."""


# The errors a collective op raises when a peer of the cluster is gone: UNAVAILABLE
# (connection closed, or the coordination service's heartbeats stopped), DEADLINE_EXCEEDED,
# ABORTED / CANCELLED (collectives aborted after another failure).
_PEER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                     tf.errors.AbortedError, tf.errors.CancelledError)


class _InjectedCrash(RuntimeError):
    """Testing aid (--inject_crash_step): an abrupt stop with nothing saved, like a kill."""


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
        raise argparse.ArgumentTypeError(
            f"expected positive integers like 16-16-16, got {value!r}")
    return out


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help text already explains the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.help == argparse.SUPPRESS or \
                isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
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
        formatter_class=_HelpFormatter)
    bool_kw = dict(type=_str2bool, nargs="?", const=True, metavar="BOOL")

    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="digits",
                   help="digits (offline, sklearn 8x8), mnist, cifar10, svhn_cropped, "
                        "celeb_a_hq (celeb_a_hq/256, manual download), imagenet32, imagenet64 "
                        "(bring-your-own .npz files).")
    g.add_argument("--preset", default=None,
                   help=f"Architecture + training defaults, one of {sorted(models.PRESETS)}. "
                        "Default: chosen from the dataset (digits -> digits_small, mnist -> "
                        "mnist, ...). The input shape and bits always come from the dataset.")
    g.add_argument("--data_dir", default=None,
                   help="TFDS data directory (and parent of imagenet32/ imagenet64/). "
                        "Default: $TFDS_DATA_DIR or ~/tensorflow_datasets.")
    g.add_argument("--download", default=True, **bool_kw,
                   help="Let TFDS download/prepare a missing dataset (needs network).")
    g.add_argument("--n_bits", type=int, default=None,
                   help="Bits per pixel (default: the dataset's, 5 for celeb_a_hq).")
    g.add_argument("--n_blocks", type=_int_list, default=None,
                   help="Residual blocks per scale, e.g. 16-16-16 (default: preset).")
    g.add_argument("--hidden_channels", type=int, default=None,
                   help="Hidden channels of each block (default: preset).")
    g.add_argument("--activation", default=None, choices=["lipswish", "elu", "softplus", "relu"],
                   help="Block activation (default: preset).")
    g.add_argument("--factor_out", default=None, **bool_kw,
                   help="Factor out half the channels after each scale (default: preset).")
    g.add_argument("--fc_end", default=None, **bool_kw,
                   help="Fully connected blocks on the last scale (default: preset).")
    g.add_argument("--logit_alpha", type=float, default=None,
                   help="alpha of the logit layer y = logit(alpha + (1 - 2 alpha) x) "
                        "(default: preset; the reference: 1e-6 for MNIST, 0.05 otherwise).")
    g.add_argument("--block", default=None, choices=list(models.BLOCK_TYPES),
                   help="Flow blocks: residual (the paper's) or coupling (affine coupling "
                        "baseline of Tables 4/5) (default: preset).")
    g.add_argument("--invertible_1x1", default=None, **bool_kw,
                   help="Invertible 1x1 convolution before every block (the reference's "
                        "--quadratic) (default: preset).")
    g.add_argument("--init_layer", default=None, choices=list(models.INIT_LAYERS),
                   help="First layer: logit, or cifar10 per-channel normalisation. Default: "
                        "cifar10 for classification/hybrid on CIFAR-10 (as the reference), "
                        "else the preset's.")

    g.add_argument("--fc_hidden", type=_int_list, default=None,
                   help="Hidden widths of the FC-end blocks, e.g. 128-128 (default: preset).")
    g.add_argument("--kernels", default=None,
                   help="Kernel sizes of each block's convolutions, e.g. 3-1-3 (default: preset).")
    g.add_argument("--coeff", type=float, default=None,
                   help="Lipschitz bound (< 1) of every linear map in a block (paper: 0.98).")
    g.add_argument("--actnorm", default=None, **bool_kw,
                   help="ActNorm after every block (default: preset).")
    g.add_argument("--first_resblock", default=None, **bool_kw,
                   help="The reference's first block: ActNorm before it and no pre-activation "
                        "(default: preset; the paper's models use it).")
    g.add_argument("--squeeze_first", default=None, **bool_kw,
                   help="Squeeze the input before the first scale (default: preset).")
    g.add_argument("--init", default=None, choices=["reference", "glorot"],
                   help="Initialisation of fresh weights (default: preset; 'reference' as the "
                        "authors' code).")
    g = p.add_argument_group("task")
    g.add_argument("--task", default="density", choices=list(TASKS),
                   help="density: maximum likelihood; classification: classifier heads on the "
                        "flow's features, cross-entropy only (no log-det); hybrid: "
                        "hybrid_lambda * (-log p(x)) - log p(y|x) (nats per image).")
    g.add_argument("--hybrid_lambda", default=None,
                   help="Weight of -log p(x) in the hybrid loss: a number >= 0 or 1/D "
                        "(D = dimensions per image); paper: 1 or 1/D. Default: 1 "
                        "(--task=hybrid only).")

    g = p.add_argument_group("log-det estimator")
    g.add_argument("--n_exact_terms", type=int, default=None,
                   help="Power-series terms always evaluated when training (paper: 2; 8 for "
                        "celeb_a_hq). Evaluation always uses 20.")
    g.add_argument("--logdet", default=None, choices=["unbiased", "truncated", "exact"],
                   help="Log-det estimator of the residual blocks: unbiased (Russian roulette, "
                        "the paper), truncated (first --n_terms terms, i-ResNet; biased) or "
                        "exact (full Jacobian, tiny images only) (default: preset).")
    g.add_argument("--n_terms", type=int, default=None,
                   help="Terms of the truncated estimator (default: preset).")
    g.add_argument("--logdet_eval", default=None, choices=["unbiased", "truncated", "exact"],
                   help="Evaluation log-det estimator (default: unbiased when --logdet is "
                        "truncated, else the same as --logdet); test bits/dim use it.")
    g.add_argument("--dist", default=None, choices=["poisson", "geometric"],
                   help="Russian-roulette distribution of the number of extra terms.")
    g.add_argument("--rate", type=float, default=None,
                   help="Poisson rate of the roulette (--dist=poisson; paper: 2).")
    g.add_argument("--p", type=float, default=None,
                   help="Success probability in (0, 1) of the geometric roulette (--dist=geometric).")
    g.add_argument("--n_samples", type=int, default=None,
                   help="Roulette draws averaged per estimate (default: preset, 1).")
    g.add_argument("--neumann_grad", default=None, **bool_kw,
                   help="Neumann-series gradient of the log-det (memory does not grow "
                        "with the number of terms).")
    g.add_argument("--grad_in_forward", default=None, **bool_kw,
                   help="Compute the log-det gradient during the forward pass (needs "
                        "--neumann_grad).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=None,
                   help="Global batch size per micro-step (split over replicas).")
    g.add_argument("--epochs", type=float, default=None,
                   help="Training length in epochs of the training split.")
    g.add_argument("--steps", type=int, default=None,
                   help="Training length in optimiser steps (wins over --epochs).")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (paper: 1e-3).")
    g.add_argument("--warmup_steps", type=int, default=None,
                   help="Linear learning-rate warm-up from lr/warmup_steps to lr.")
    g.add_argument("--ema_decay", type=float, default=None,
                   help="Decay of the EMA of the weights used for evaluation/sampling.")
    g.add_argument("--grad_clip", type=float, default=None,
                   help="Clip the global gradient norm to this value (0 disables).")
    g.add_argument("--accumulate", type=int, default=None,
                   help="Micro-batches of --batch_size accumulated per optimiser step.")
    g.add_argument("--dequantization", default="uniform", choices=["uniform", "variational"],
                   help="Dequantisation noise: uniform, or a learned conditional flow q(u|x) "
                        "(Flow++) trained with the model on the negative ELBO; test bits/dim "
                        "is then the variational bound. Fixed for the life of a run.")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed of the initial weights, data order, dequantisation noise and "
                        "log-det estimators (stateless; the replica id is folded in).")
    g.add_argument("--jit_compile", default=False, **bool_kw,
                   help="Compile the per-replica forward/backward with XLA.")
    g.add_argument("--max_nan_steps", type=int, default=10,
                   help="Stop after this many consecutive non-finite steps (each one is "
                        "skipped with a warning).")

    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument("--out", default=None,
                   help="Run directory. Default: runs/<run name>, run name = "
                        "<dataset>_<preset>. Rerunning with the same directory resumes.")
    g.add_argument("--run_name", default=None, help="Run name (default <dataset>_<preset>).")
    g.add_argument("--eval_every", type=int, default=None,
                   help="Test bits/dim (EMA weights, 20 exact terms) every N steps and at "
                        "the end (default: preset).")
    g.add_argument("--eval_examples", type=int, default=0,
                   help="Test images per evaluation (0 = the whole test split).")
    g.add_argument("--sample_every", type=int, default=None,
                   help="Write a PNG grid of samples every N steps and at the end.")
    g.add_argument("--n_sample_images", type=int, default=64, help="Images per sample grid.")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    g.add_argument("--log_every", type=int, default=50,
                   help="Progress line and TensorBoard scalars every N steps.")
    g.add_argument("--ckpt_every", type=int, default=None,
                   help="Save the latest checkpoint every N steps (default: --eval_every).")
    g.add_argument("--keep_best", type=int, default=1,
                   help="Number of best-by-test-bits/dim checkpoints kept in ckpt_best/.")

    g = p.add_argument_group("distribution")
    g.add_argument("--strategy", default="mirrored",
                   choices=["mirrored", "one_device", "multi_worker"],
                   help="mirrored: MirroredStrategy over all visible GPUs (or over the "
                        "--cpu_devices logical CPUs), one device if there is only one; "
                        "one_device: first GPU or the CPU; multi_worker: "
                        "MultiWorkerMirroredStrategy configured by $TF_CONFIG.")
    g.add_argument("--worker_timeout", type=float, default=1800,
                   help="multi_worker only: stop with an error (exit status 4) when training "
                        "makes no progress (no step, evaluation batch or save finishes) for "
                        "this many seconds, e.g. because another worker hangs; 0 disables. A "
                        "worker that dies is usually detected within seconds anyway.")
    g.add_argument("--cpu_devices", type=int, default=0,
                   help="Split the CPU into N logical devices before TensorFlow starts and "
                        "mirror over them (tests the multi-device path without GPUs).")

    g = p.add_argument_group("export")
    g.add_argument("--export_dir", default=None,
                   help="SavedModel directory written at the end of training with the EMA "
                        "weights if rflow_tf.export is available (default "
                        "saved_models/<run name>; '' disables).")
    g.add_argument("--export_only", action="store_true",
                   help="Export the latest checkpoint of the run directory and exit.")

    # Testing aids: comma-separated steps whose loss is replaced by NaN; a step after
    # which training stops abruptly, saving nothing (a kill).
    p.add_argument("--inject_nan_steps", default="", help=argparse.SUPPRESS)
    p.add_argument("--inject_crash_step", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _finite(v):
    return math.isfinite(float(v))


# Constraints on flag values, checked by check_flags() before any work. One row per
# flag: (flag, predicate on the parsed value, what the flag must be). Flags left unset
# (None: "the preset's value") are not checked here; add a row for every new numeric flag.
FLAG_CONSTRAINTS = (
    ("lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("grad_clip", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0 disables)"),
    ("ema_decay", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("epochs", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("steps", lambda v: v >= 0, ">= 0"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("accumulate", lambda v: v >= 1, ">= 1"),
    ("n_bits", lambda v: 1 <= v <= 8, "in 1..8"),
    ("hidden_channels", lambda v: v >= 1, ">= 1"),
    ("n_exact_terms", lambda v: v >= 0, ">= 0"),
    ("max_nan_steps", lambda v: v >= 1, ">= 1"),
    ("eval_every", lambda v: v >= 1, ">= 1"),
    ("eval_examples", lambda v: v >= 0, ">= 0 (0 = the whole test split)"),
    ("sample_every", lambda v: v >= 1, ">= 1"),
    ("n_sample_images", lambda v: v >= 1, ">= 1"),
    ("temperature", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("ckpt_every", lambda v: v >= 1, ">= 1"),
    ("keep_best", lambda v: v >= 1, ">= 1"),
    ("cpu_devices", lambda v: v >= 0, ">= 0 (0 = no split)"),
    ("worker_timeout", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0 disables)"),
)


def check_flags(args):
    """Checks every flag of ``args`` against :data:`FLAG_CONSTRAINTS`; raises
    :class:`UsageError` naming the first bad flag. Runs before any work
    (``main`` and :func:`resolve_run` call it), so a bad value never trains
    to NaN, is never replaced by a default and never fails after the run.

    Example:
    ```python
    check_flags(parse_args(["--lr=1e-3"]))           # fine
    check_flags(parse_args(["--lr=inf"]))            # UsageError: --lr must be ...
    ```
    """
    for flag, ok, requirement in FLAG_CONSTRAINTS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not ok(value):
            raise UsageError(f"--{flag} must be {requirement}, got {value!r}")


def parse_args(argv=None):
    """Parses ``argv`` (default ``sys.argv[1:]``) into an argparse Namespace.

    Example: ``args = parse_args(["--preset=tiny", "--steps=10"])``.
    """
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------
# Devices and strategies
# ----------------------------------------------------------------------------


def configure_cpu_devices(n):
    """Splits the first physical CPU into ``n`` logical devices. Must run before
    TensorFlow initialises its runtime (before any op or device listing of
    logical devices); raises UsageError otherwise.

    Example: ``configure_cpu_devices(2); make_strategy("mirrored", 2)``.
    """
    n = int(n)
    if n < 1:
        raise UsageError(f"--cpu_devices must be >= 1, got {n}")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise UsageError(
                f"--cpu_devices={n}: TensorFlow was already initialised with {have} logical "
                f"CPU device(s); configure the devices before running any TensorFlow op "
                f"({e})") from None


def make_strategy(kind="mirrored", cpu_devices=0):
    """A tf.distribute strategy by name.

    * ``"mirrored"``: MirroredStrategy over all GPUs if there are several;
      over the logical CPUs if ``cpu_devices > 1``; otherwise a
      OneDeviceStrategy on the single GPU or the CPU.
    * ``"one_device"``: OneDeviceStrategy on the first GPU or the CPU.
    * ``"multi_worker"``: MultiWorkerMirroredStrategy (cluster from $TF_CONFIG).

    Example: ``strategy = make_strategy("mirrored")``.
    """
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")
    if kind != "mirrored":
        raise UsageError(f"unknown --strategy {kind!r}")
    if cpu_devices and int(cpu_devices) > 1:
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(cpus) < int(cpu_devices):
            raise UsageError(f"--cpu_devices={cpu_devices} but only {len(cpus)} logical CPU "
                             "device(s) exist (call configure_cpu_devices first)")
        return tf.distribute.MirroredStrategy(cpus[:int(cpu_devices)])
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(gpus)
    return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")


def _task(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0, True
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return task_type, task_id, is_chief


def distribute_dataset(strategy, ds):
    """``strategy.experimental_distribute_dataset`` of a dataset of *global*
    batches, sharded by data: each global batch of B examples is split into
    ``num_replicas_in_sync`` consecutive slices of B / num_replicas, and
    replica r (of any worker) gets slice r. So the workers together see every
    example of every global batch exactly once, whatever the number of files
    behind ``ds`` (TFDS) or none (the in-memory digits), and a multi-worker
    run sees the same batches in the same order as a single-process run with
    the same global batch. Every worker must build the same ``ds`` (same seed).

    Example:
    ```python
    ds = data.load_image_dataset("digits", "train", batch_size=64, seed=0)
    for x in distribute_dataset(strategy, ds):   # x: PerReplica slices of 64 / replicas
        ...
    ```
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(ds.with_options(options))


# ----------------------------------------------------------------------------
# Run specification
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunSpec:
    """Everything a run needs, resolved from the flags and the preset.

    ``flow``: the :class:`rflow_tf.models.FlowConfig` (input shape and bits
    from the dataset); ``hparams``: training settings (batch_size,
    accumulate, lr, warmup_steps, ema_decay, grad_clip, eval_every,
    sample_every, ckpt_every, steps); ``run_dir``, ``export_dir``.
    """

    dataset: str
    preset: str
    run_name: str
    run_dir: str
    export_dir: str
    flow: models.FlowConfig
    hparams: dict
    info: data.ImageDatasetInfo

    def config_json(self):
        """The contents of config.json."""
        return {"dataset": self.dataset, "preset": self.preset, "run_name": self.run_name,
                "flow_config": self.flow.to_dict(), "training": dict(self.hparams)}


def resolve_run(args):
    """Builds the :class:`RunSpec` of parsed flags ``args``; raises UsageError
    for inconsistent flags.

    Example: ``spec = resolve_run(parse_args(["--dataset=mnist"]))``.
    """
    check_flags(args)
    try:
        info = data.dataset_info(args.dataset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    preset_name = args.preset or models.preset_for_dataset(info.name)
    if preset_name not in models.PRESETS:
        raise UsageError(f"unknown --preset {preset_name!r}; valid: {sorted(models.PRESETS)}")
    preset = models.PRESETS[preset_name]
    if preset.dataset not in (info.name, "digits") and args.preset:
        warnings.warn(f"preset {preset_name!r} was designed for {preset.dataset!r}, training on "
                      f"{info.name!r} with input shape {info.image_shape}", stacklevel=2)

    n_bits = args.n_bits if args.n_bits is not None else info.n_bits
    overrides = dict(input_shape=tuple(info.image_shape), n_bits=n_bits)
    for flag in ("logdet", "logdet_eval", "n_terms", "n_exact_terms", "dist", "rate", "p",
                 "n_samples", "neumann_grad", "grad_in_forward", "n_blocks", "hidden_channels",
                 "activation", "logit_alpha", "factor_out", "fc_end", "fc_hidden", "kernels",
                 "coeff", "actnorm", "first_resblock", "squeeze_first", "init", "block",
                 "invertible_1x1", "init_layer"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    task = getattr(args, "task", "density")
    if task not in TASKS:
        raise UsageError(f"--task must be one of {TASKS}, got {task!r}")
    lam_text = getattr(args, "hybrid_lambda", None)
    if lam_text is not None and task != "hybrid":
        raise UsageError(f"--hybrid_lambda applies to --task=hybrid only (this is --task={task})")
    hybrid_lambda = None
    if task != "density":
        if not info.n_classes:
            raise UsageError(f"--task={task} needs labels; {info.name!r} has none (labelled: "
                             f"digits, mnist, svhn_cropped, cifar10)")
        overrides["n_classes"] = int(info.n_classes)
        if args.init_layer is None and info.name == "cifar10":
            overrides["init_layer"] = "cifar10"      # the reference's choice
        if task == "hybrid":
            lam_text = "1" if lam_text is None else str(lam_text)
            try:
                hybrid_lambda = rclf.resolve_hybrid_lambda(
                    lam_text, int(np.prod(info.image_shape)))
            except ValueError as e:
                raise UsageError(f"--hybrid_lambda: {e}") from None
    if overrides.get("neumann_grad") is False and args.grad_in_forward is None:
        overrides["grad_in_forward"] = False
    try:
        flow = preset.config.replace(**overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid model configuration: {e}") from None

    hp = preset.training_defaults()
    hp.pop("dataset")
    for key in ("batch_size", "accumulate", "lr", "warmup_steps", "ema_decay", "grad_clip",
                "eval_every", "sample_every"):
        value = getattr(args, key)
        if value is not None:
            hp[key] = value
    # The flags were checked by check_flags(); the presets' values are valid.
    if args.steps is not None:
        steps = int(args.steps)
    elif args.epochs is not None or preset.steps is None:
        epochs = args.epochs if args.epochs is not None else preset.epochs
        steps = int(math.ceil(float(epochs) * info.n_train / (hp["batch_size"] * hp["accumulate"])))
    else:
        steps = int(preset.steps)
    hp.pop("epochs")
    hp["steps"] = steps
    hp["ckpt_every"] = int(hp["eval_every"] if args.ckpt_every is None else args.ckpt_every)
    hp["seed"] = int(args.seed)
    hp["jit_compile"] = bool(args.jit_compile)
    hp["task"] = task
    if task == "hybrid":
        hp["hybrid_lambda"] = lam_text
        hp["hybrid_lambda_value"] = hybrid_lambda
    hp["dequantization"] = args.dequantization
    if args.dequantization != "uniform" and task != "density":
        raise UsageError(f"--dequantization={args.dequantization} is for --task=density "
                         f"(got --task={task})")

    default_name = f"{info.name}_{preset_name}" + ("" if task == "density" else f"_{task}")
    run_name = args.run_name or default_name.replace("/", "_")
    run_dir = args.out or os.path.join("runs", run_name)
    export_dir = args.export_dir if args.export_dir is not None else \
        os.path.join("saved_models", run_name)
    return RunSpec(dataset=info.name, preset=preset_name, run_name=run_name, run_dir=run_dir,
                   export_dir=export_dir, flow=flow, hparams=hp, info=info)


# ----------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="rflow_tf_train")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """lr(t) = lr * min(1, (t + 1) / warmup_steps), t = optimiser iterations.

    Example: ``keras.optimizers.Adam(LinearWarmup(1e-3, 1000))``.
    """

    def __init__(self, lr, warmup_steps):
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        lr = tf.constant(self.lr, tf.float32)
        if self.warmup_steps <= 0:
            return lr
        frac = (tf.cast(step, tf.float32) + 1.0) / float(self.warmup_steps)
        return lr * tf.minimum(1.0, frac)

    def get_config(self):
        return {"lr": self.lr, "warmup_steps": self.warmup_steps}


class PreReducedAdam(keras.optimizers.Adam):
    """Adam that expects gradients already summed over replicas.

    The training step all-reduces the gradients itself so that the global
    gradient norm is clipped (and checked for NaN) identically on every
    replica; Keras' own all-reduce inside ``apply_gradients`` is therefore
    skipped.

    Example: ``PreReducedAdam(1e-3, beta_1=0.9, beta_2=0.99)``.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def make_optimizer(lr, warmup_steps):
    """Adam(beta_1=0.9, beta_2=0.99, epsilon=1e-8) with :class:`LinearWarmup`.
    Call inside ``strategy.scope()`` and ``build`` it there.

    Example:
    ```python
    with strategy.scope():
        opt = make_optimizer(1e-3, 1000)
        opt.build(model.trainable_variables)
    ```
    """
    return PreReducedAdam(learning_rate=LinearWarmup(lr, warmup_steps), beta_1=0.9, beta_2=0.99,
                          epsilon=1e-8)


# ----------------------------------------------------------------------------
# Compiled steps
# ----------------------------------------------------------------------------


def write_scalar(name, value, step):
    """Writes a TensorBoard scalar to the default summary writer.

    Uses ``tf.summary.scalar`` when the ``tensorboard`` package is installed,
    otherwise writes the same event (a float32 tensor with the "scalars"
    plugin metadata) with the core ``tf.summary.write``, so logs are
    readable by TensorBoard either way.

    Example:
    ```python
    with tf.summary.create_file_writer("tb").as_default():
        write_scalar("train/bpd", 1.23, step=10)
    ```
    """
    if _HAVE_TENSORBOARD:
        return tf.summary.scalar(name, value, step=step)
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    return tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                            metadata=metadata.SerializeToString())


def _first(strategy, value):
    return strategy.experimental_local_results(value)[0]


def _var(v):
    return v.value if isinstance(v, keras.Variable) else v


def make_dequantizer(kind, flow_config):
    """None for ``kind="uniform"`` (the trainer adds uniform noise with
    :func:`rflow_tf.data.dequantize`), or a
    :class:`rflow_tf.dequantization.VariationalDequantizer` for the images of
    ``flow_config`` (its default size: 4 MixLogCDF couplings, no attention).

    Example: ``deq = make_dequantizer("variational", models.get_preset("tiny"))``.
    """
    if kind == "uniform":
        return None
    if kind != "variational":
        raise UsageError(f"--dequantization must be 'uniform' or 'variational', got {kind!r}")
    return rdeq.VariationalDequantizer(tuple(flow_config.input_shape), n_bits=flow_config.n_bits,
                                       dtype=flow_config.dtype)


def trained_variables(model, dequantizer=None):
    """Every weight the optimiser trains: the model's, then the dequantiser's.

    Example: ``opt.build(trained_variables(model, deq))``.
    """
    extra = list(dequantizer.trainable_variables) if dequantizer is not None else []
    return list(model.trainable_variables) + extra


def make_train_step(model, optimizer, strategy, ema_vars, *, global_batch_size, accumulate=1,
                    n_bits=8, grad_clip=1.0, ema_decay=0.999, seed=0, jit_compile=False,
                    converge=True, step_var=None, task="density", hybrid_lambda=None,
                    dequantizer=None):
    """The distributed training step, a ``tf.function(x, step, poison)``.

    Per replica (seed = fold_in([seed, step], replica id)), for each of
    ``accumulate`` micro-batches of uint8 images: dequantise, compute
    bits/dim with the training estimator, loss =
    compute_average_loss(bpd, global_batch_size) / accumulate, gradients.
    Then all-reduce (sum) the gradients and the loss, clip to the global norm
    ``grad_clip``; if the loss (+ ``poison``, a testing aid) and the norm are
    finite, apply Adam and update the EMA ``e <- d e + (1 - d) w``, else skip
    the update. Finally run power iteration to convergence (``converge``)
    and increment ``step_var`` if given.

    ``dequantizer``: None (uniform noise) or a
    :class:`rflow_tf.dequantization.VariationalDequantizer`; then the loss
    is its negative ELBO in bits/dim and its weights are trained too (the
    variables, and ``ema_vars``, are the model's followed by the
    dequantiser's: :func:`trained_variables`).

    ``x``: a distributed batch of uint8 images [B, H, W, C], or [B, k, H, W, C]
    with accumulation; for ``task`` "classification" or "hybrid" a pair
    (images, int labels [B] or [B, k]). Returns a dict of scalars: ``loss``
    (the mean training objective: bits/dim for "density", cross-entropy in
    nats for "classification", the hybrid loss of
    :func:`rflow_tf.classifier.hybrid_loss` with ``hybrid_lambda`` (a float)
    for "hybrid"), ``grad_norm`` (before clipping), ``ok`` (update applied),
    ``logdet`` (mean total log-det per example; 0 for "classification",
    which never computes one), and for the labelled tasks ``bpd`` (hybrid),
    ``xent`` and ``acc`` (training batch means).

    Example:
    ```python
    step_fn = make_train_step(model, opt, strategy, ema, global_batch_size=64)
    out = step_fn(next(dist_iter), tf.constant(0, tf.int64), tf.constant(0.0))
    ```
    """
    variables = trained_variables(model, dequantizer)
    dtype = model.flow_dtype
    num_dims = float(model.num_dims)
    offset = num_dims * n_bits * _LN2
    k = int(accumulate)
    base_seed = tf.constant(int(seed), tf.int64)

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "hybrid" and hybrid_lambda is None:
        raise ValueError("task='hybrid' needs hybrid_lambda (a float)")
    labelled = task != "density"

    def batch_mean(v):
        return tf.nn.compute_average_loss(tf.cast(v, tf.float32),
                                          global_batch_size=global_batch_size) / k

    def micro(x_int, seed_pair, labels=None):
        seeds = tf.random.experimental.stateless_split(seed_pair, 2)
        metrics = {}
        with tf.GradientTape() as tape:
            if dequantizer is None:
                x, log_q = data.dequantize(x_int, n_bits, seed=seeds[0], dtype=dtype), 0.0
            else:
                x, log_q = dequantizer.dequantize(x_int, seeds[0])
            if task == "density":
                z, ld = model.forward_and_log_det(x, training=True, seed=seeds[1],
                                                  validate=False)
                lp = model.base_log_prob(z) + ld
                bpd = -(lp - offset - log_q) / (num_dims * _LN2)
                loss = batch_mean(bpd)
            else:
                if task == "classification":     # no log-det anywhere
                    logits = model.classify(x, training=True, validate=False)
                    lp, ld = None, tf.zeros([tf.shape(x)[0]], dtype)
                else:
                    lp, logits = model.log_prob_and_logits(x, training=True, seed=seeds[1],
                                                           validate=False)
                    # the log-det alone, for the logs: log p(x) - log N(f(x))
                    ld = tf.zeros([tf.shape(x)[0]], dtype)
                    metrics["bpd"] = batch_mean(-(lp - offset) / (num_dims * _LN2))
                    lp = lp - offset                  # log P(discrete x), nats
                per_example = rclf.hybrid_loss(
                    lp, logits, labels, 0.0 if task == "classification" else hybrid_lambda)
                loss = batch_mean(per_example)
                metrics["xent"] = batch_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=tf.cast(labels, tf.int64), logits=logits))
                metrics["acc"] = batch_mean(tf.cast(
                    tf.equal(tf.argmax(logits, -1), tf.cast(labels, tf.int64)), tf.float32))
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]
        ld_mean = tf.reduce_sum(tf.cast(ld, tf.float32)) / float(global_batch_size * k)
        if labelled:
            return loss, grads, ld_mean, metrics
        return loss, grads, ld_mean

    if jit_compile:
        micro = tf.function(micro, jit_compile=True)

    metric_names = (("bpd",) if task == "hybrid" else ()) + (("xent", "acc") if labelled else ())

    def micro_all(batch, i, seed_pair):
        """micro() of micro-batch i (None: no accumulation) -> (loss, grads, ld, metrics)."""
        x_int, labels = batch if labelled else (batch, None)
        if i is not None:
            x_int = x_int[:, i]
            labels = None if labels is None else labels[:, i]
            seed_pair = tf.random.experimental.stateless_fold_in(seed_pair, i)
        out = micro(x_int, seed_pair, labels) if labelled else micro(x_int, seed_pair)
        metrics = out[3] if labelled else {}
        return out[0], out[1], out[2], [metrics[m] for m in metric_names]

    def replica_fn(batch, step, poison):
        ctx = tf.distribute.get_replica_context()
        seed_pair = tf.random.experimental.stateless_fold_in(
            tf.stack([base_seed, tf.cast(step, tf.int64)]), ctx.replica_id_in_sync_group)
        if k == 1:
            loss, grads, ld, metrics = micro_all(batch, None, seed_pair)
        else:
            def body(i, loss_acc, grads_acc, ld_acc, m_acc):
                l_i, g_i, ld_i, m_i = micro_all(batch, i, seed_pair)
                return (i + 1, loss_acc + l_i, [a + b for a, b in zip(grads_acc, g_i)],
                        ld_acc + ld_i, [a + b for a, b in zip(m_acc, m_i)])

            init = (tf.constant(0), tf.constant(0.0),
                    [tf.zeros(v.shape, v.dtype) for v in variables], tf.constant(0.0),
                    [tf.constant(0.0) for _ in metric_names])
            _, loss, grads, ld, metrics = tf.while_loop(lambda i, *_: i < k, body, init)
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        loss, ld, *metrics = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [loss, ld, *metrics])
        loss = loss + poison
        gnorm = tf.linalg.global_norm(grads)
        ok = tf.math.is_finite(loss) & tf.math.is_finite(gnorm)
        if grad_clip and grad_clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, grad_clip, use_norm=gnorm)
        return loss, gnorm, ok, ld, grads, metrics

    def apply_fn(grads):
        optimizer.apply_gradients(zip(grads, variables))

    def ema_update(e, w):
        return e.assign(ema_decay * e + (1.0 - ema_decay) * tf.cast(w, e.dtype))

    @tf.function
    def train_step(x, step, poison):
        loss, gnorm, ok, ld, grads, metrics = strategy.run(replica_fn, args=(x, step, poison))
        ok0 = _first(strategy, ok)

        def apply():
            strategy.run(apply_fn, args=(grads,))
            for e, v in zip(ema_vars, variables):
                strategy.extended.update(e, ema_update, args=(_var(v),), group=False)
            return tf.constant(True)

        tf.cond(ok0, apply, lambda: tf.constant(False))
        if converge:
            model.update_lipschitz()
        if step_var is not None:
            step_var.assign_add(1)
        out = {"loss": _first(strategy, loss), "grad_norm": _first(strategy, gnorm),
               "ok": ok0, "logdet": _first(strategy, ld)}
        out.update({m: _first(strategy, v) for m, v in zip(metric_names, metrics)})
        return out

    return train_step


def make_eval_step(model, strategy, *, n_bits=8, seed=0, task="density",
                   training_estimator=False, dequantizer=None):
    """The distributed evaluation step ``(x, mask, batch_index) -> (sum bpd,
    sum bpd^2, count)`` over the masked examples, with the evaluation
    estimator (``logdet_eval``, ``n_exact_terms_eval`` = 20 exact terms; or
    the training estimator if ``training_estimator``) and fixed seeds (the
    same weights give the same result). With a variational ``dequantizer``
    (density task) the bits/dim are its bound, -(log p(y) - D n ln 2 -
    log q(u|x)) / (D ln 2) with one draw of u per image; else the uniform-noise
    bound.

    For ``task`` "classification" / "hybrid", ``x`` is a pair (images,
    labels) and the step returns ``(sum bpd, sum bpd^2, count, number
    correct, sum cross-entropy)``; for "classification" the bits/dim sums are
    0 (no log-det is computed).

    Example: ``s, s2, n = eval_fn(x, mask, tf.constant(0, tf.int64))``.
    """
    dtype = model.flow_dtype
    base_seed = tf.constant(int(seed) + 1_000_003, tf.int64)
    d = float(model.num_dims)

    def replica_fn(batch, mask, index):
        x_int, labels = batch if task != "density" else (batch, None)
        ctx = tf.distribute.get_replica_context()
        seed_pair = tf.random.experimental.stateless_fold_in(
            tf.stack([base_seed, tf.cast(index, tf.int64)]), ctx.replica_id_in_sync_group)
        seeds = tf.random.experimental.stateless_split(seed_pair, 2)
        if dequantizer is None:
            x, log_q = data.dequantize(x_int, n_bits, seed=seeds[0], dtype=dtype), 0.0
        else:
            x, log_q = dequantizer.dequantize(x_int, seeds[0])
        m = tf.cast(mask, tf.float64)
        if task == "density":
            bpd = model.bits_per_dim(x, n_bits=n_bits, training=training_estimator,
                                     seed=seeds[1], validate=False) + log_q / (d * _LN2)
        elif task == "classification":
            logits = model.classify(x, training=False, validate=False)
            bpd = tf.zeros([tf.shape(x)[0]], dtype)
        else:
            lp, logits = model.log_prob_and_logits(x, training=False, seed=seeds[1],
                                                   validate=False)
            bpd = -(lp - d * n_bits * _LN2) / (d * _LN2)
        bpd = tf.cast(bpd, tf.float64)
        sums = [tf.reduce_sum(bpd * m), tf.reduce_sum(tf.square(bpd) * m), tf.reduce_sum(m)]
        if task != "density":
            labels = tf.cast(labels, tf.int64)
            correct = tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float64)
            xent = tf.cast(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits), tf.float64)
            sums += [tf.reduce_sum(correct * m), tf.reduce_sum(xent * m)]
        return sums

    @tf.function
    def eval_step(x, mask, index):
        out = strategy.run(replica_fn, args=(x, mask, index))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None) for t in out]

    return eval_step


# ----------------------------------------------------------------------------
# Run directory: lock and checkpoints that are never lost
# ----------------------------------------------------------------------------


class RunDirLockedError(UsageError):
    """Another live process holds the lock of the run directory."""


class RunDirLock:
    """An exclusive lock on a run directory: ``fcntl.flock`` on ``<dir>/.lock``.

    The operating system releases the lock when the holder exits or is killed
    (even by SIGKILL), so a crashed trainer never leaves a stale lock. The
    lock file is never deleted (deleting it would let two processes lock two
    different files); it holds the pid and host of the current holder, for the
    message the next trainer prints. :meth:`acquire` is idempotent.

    Example:
    ```python
    lock = RunDirLock("runs/x")
    lock.acquire()        # RunDirLockedError if another process holds it
    ...
    lock.release()
    ```
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, ".lock")
        self._fd = None

    @property
    def held(self):
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self):
        """Takes the lock, or raises RunDirLockedError naming the holder."""
        if self._fd is not None:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirLockedError(
                f"{os.path.dirname(self.path)} is in use by another trainer ({holder}); "
                f"wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        """Releases the lock (no-op when not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self):
        self.release()


def _checkpoint_step(path, prefix):
    m = re.fullmatch(re.escape(prefix) + r"-(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else None


def checkpoint_candidates(directory, prefix="ckpt"):
    """Checkpoint prefixes ``<directory>/<prefix>-N`` to try, newest first: the
    union of those listed in the ``checkpoint`` state file and those whose
    ``.index`` file is present, so a deleted or garbage state file loses nothing.

    Example: ``checkpoint_candidates("runs/x/ckpt")  # ['runs/x/ckpt/ckpt-40', ...]``
    """
    found = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".index"):
                step = _checkpoint_step(name[:-len(".index")], prefix)
                if step is not None:
                    found[step] = os.path.join(directory, name[:-len(".index")])
    state = tf.train.get_checkpoint_state(directory)
    if state is not None:
        for path in list(state.all_model_checkpoint_paths) + [state.model_checkpoint_path]:
            path = path if os.path.isabs(path) else os.path.join(directory, path)
            step = _checkpoint_step(path, prefix)
            if step is not None and os.path.exists(path + ".index"):
                found[step] = path
    return [found[k] for k in sorted(found, reverse=True)]


def remove_stale_temp_checkpoints(directory, prefix="ckpt"):
    """Removes ``<prefix>-N_temp/`` directories, which TensorFlow writes a
    checkpoint into before renaming it into place and which a kill mid-save
    leaves behind. Only this exact naming is touched (call it while holding
    the run-directory lock). Returns the removed paths.

    Example: ``remove_stale_temp_checkpoints("runs/x/ckpt")``.
    """
    removed = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if re.fullmatch(re.escape(prefix) + r"-\d+_temp", name) and os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def _move_aside(path, log):
    """Moves the files of checkpoint ``path`` to ``<dir>/unrestorable/`` (kept,
    never deleted, and out of the way of the save that will reuse the name)."""
    directory = os.path.dirname(path)
    dest = os.path.join(directory, "unrestorable")
    os.makedirs(dest, exist_ok=True)
    base = os.path.basename(path)
    for name in os.listdir(directory):
        if name == base + ".index" or name.startswith(base + ".data-"):
            target = os.path.join(dest, name)
            n = 1
            while os.path.exists(target):
                target, n = os.path.join(dest, f"{name}.{n}"), n + 1
            os.replace(os.path.join(directory, name), target)
    log(f"moved the files of the unrestorable checkpoint {path} to {dest}/")


def restore_newest(checkpoint, directory, prefix="ckpt", log=print, warn=print, repair=True):
    """Restores the newest checkpoint of ``directory`` that restores completely.

    Candidates come from :func:`checkpoint_candidates` (state file and files
    present), newest first. A candidate that fails to restore (truncated or
    corrupt files) is reported and the next older one is tried; once one
    restores, the failed ones are moved to ``<directory>/unrestorable/``
    (kept, and out of the way of the saves that will reuse their names).
    The state file is rewritten when it was missing, unreadable or did not
    name the restored checkpoint; it then lists the restored one (and the
    older ones it listed) without timestamps, which ``CheckpointManager``
    never rotates away, and checkpoints it did not list are left in place:
    nothing this run did not write is ever deleted.

    Returns the restored path, or None when there is no checkpoint. Raises
    UsageError when checkpoints exist but none restores; they are then left
    untouched and the caller must not start over and overwrite them.
    ``repair=False`` (readers such as non-chief workers) only restores:
    nothing is moved and no state is written.

    Example: ``restore_newest(tf.train.Checkpoint(model=m), "runs/x/ckpt")``.
    """
    candidates = checkpoint_candidates(directory, prefix)
    state = tf.train.get_checkpoint_state(directory)
    state_file = os.path.join(directory, "checkpoint")
    if candidates and state is None:
        warn(f"{state_file} is {'unreadable' if os.path.exists(state_file) else 'missing'}; "
             f"recovering from the checkpoint files present: "
             f"{', '.join(os.path.basename(c) for c in candidates)}")
    failures = []
    for path in candidates:
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # noqa: BLE001  (any failure: try the older one)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failures.append((path, f"{os.path.basename(path)} ({type(e).__name__}: {reason})"))
            warn(f"checkpoint {path} does not restore ({type(e).__name__}: {reason}); "
                 f"trying the next older checkpoint")
            continue
        for bad, _ in failures:
            if repair:
                _move_aside(bad, log)
        step = _checkpoint_step(path, prefix)
        listed = [] if state is None else [
            q if os.path.isabs(q) else os.path.join(directory, q)
            for q in state.all_model_checkpoint_paths]
        kept = sorted({q for q in listed if os.path.exists(q + ".index")
                       and _checkpoint_step(q, prefix) is not None
                       and _checkpoint_step(q, prefix) <= step} | {path},
                      key=lambda q: _checkpoint_step(q, prefix))
        if repair and (state is None or state.model_checkpoint_path != path or failures):
            tf.compat.v1.train.update_checkpoint_state(
                directory, path, all_model_checkpoint_paths=kept)
        if failures:
            warn(f"resumed from the older checkpoint {path} because newer ones did not "
                 f"restore: {'; '.join(f for _, f in failures)}")
        return path
    if failures:
        raise UsageError(
            f"none of the {len(failures)} checkpoint(s) in {directory} restores: "
            f"{'; '.join(f for _, f in failures)}. Not starting over from step 0 (that would "
            f"overwrite them); move or delete {directory} to start over.")
    return None


# ----------------------------------------------------------------------------
# Multi-worker: a watchdog against hangs
# ----------------------------------------------------------------------------


class ProgressWatchdog:
    """Ends the process when no progress is reported for ``timeout`` seconds.

    A daemon thread checks every ``min(timeout / 4, 5)`` seconds whether
    :meth:`tick` was called within the last ``timeout`` seconds; if not, it
    calls ``on_timeout(seconds_since_last_tick)``, whose default prints
    ``message`` to stderr and ends the process with ``os._exit(4)`` (a thread
    cannot interrupt a collective op that waits for a worker that hangs).
    ``timeout=0`` disables it. Use as a context manager; ticks are cheap (one
    ``time.monotonic()``).

    Example:
    ```python
    with ProgressWatchdog(600, "no training step finished for 600 s") as dog:
        for batch in batches:
            step(batch)
            dog.tick()
    ```
    """

    def __init__(self, timeout, message="no progress", on_timeout=None):
        self.timeout = float(timeout)
        self.message = message
        self.on_timeout = on_timeout or self._exit
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def _exit(self, idle):
        print(f"error: {self.message} (nothing finished for {idle:.0f} s, "
              f"--worker_timeout={self.timeout:g})", file=sys.stderr, flush=True)
        os._exit(4)  # pylint: disable=protected-access

    def tick(self):
        """Reports progress: the timeout starts again."""
        self._last = time.monotonic()

    def _run(self):
        period = min(self.timeout / 4.0, 5.0)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                self.on_timeout(idle)
                return

    def __enter__(self):
        self.tick()
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="ProgressWatchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return False


# ----------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------


def _fmt_time(seconds):
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Trainer:
    """Owns a run: strategy, model, optimizer, EMA, checkpoints, data and logs.

    ``Trainer(args)`` resolves the flags (:func:`resolve_run`), creates the
    strategy (unless given), builds everything inside ``strategy.scope()``
    (optimizer slots created up front) and checks/writes ``config.json``.
    :meth:`train` restores the latest checkpoint or initialises ActNorm from
    the first batch, then runs the loop; :meth:`evaluate`, :meth:`sample`,
    :meth:`export` and :meth:`ema_weights` are usable on their own.

    Example:
    ```python
    trainer = Trainer(parse_args(["--preset=tiny", "--steps=10", "--out=/tmp/r"]))
    result = trainer.train()
    print(result["test_bpd"])
    ```
    """

    def __init__(self, args, strategy=None):
        self.args = args
        self.spec = resolve_run(args)
        self.hp = self.spec.hparams
        self.flow_config = self.spec.flow
        self.run_dir = self.spec.run_dir
        self.strategy = strategy or make_strategy(args.strategy, args.cpu_devices)
        self.task_type, self.task_id, self.is_chief = _task(self.strategy)
        # Multi-worker: only the chief writes into the run directory; the other
        # workers write their (identical) checkpoints and export into a local
        # temporary directory that they delete (TensorFlow's multi-worker guidance).
        self.multi_worker = self.task_type is not None
        self._tmp_root = None if self.is_chief else tempfile.mkdtemp(
            prefix=f"rflow_tf_{self.task_type}_{self.task_id}_")
        self.watchdog = ProgressWatchdog(
            float(args.worker_timeout) if self.multi_worker else 0.0,
            f"{self.task_type} {self.task_id} made no progress: another worker of the cluster "
            f"probably hangs or died. Restart every worker with the same command; training "
            f"resumes from the chief's last checkpoint in {os.path.join(self.run_dir, 'ckpt')}")
        self.n_replicas = self.strategy.num_replicas_in_sync
        if self.hp["batch_size"] % self.n_replicas:
            raise UsageError(f"--batch_size={self.hp['batch_size']} is not divisible by the "
                             f"{self.n_replicas} replicas")
        self.nan_steps = {int(s) for s in str(args.inject_nan_steps).split(",") if s.strip()}
        self.crash_step = int(args.inject_crash_step)
        self.lock = RunDirLock(self.run_dir)
        self._check_run_dir()

        keras.utils.set_random_seed(int(self.hp["seed"]))
        with self.strategy.scope():
            self.model = models.ResidualFlow(self.flow_config)
            self.dequantizer = make_dequantizer(self.hp["dequantization"], self.flow_config)
            self.train_variables = trained_variables(self.model, self.dequantizer)
            self.optimizer = make_optimizer(self.hp["lr"], self.hp["warmup_steps"])
            self.optimizer.build(self.train_variables)
            self.ema_vars = [tf.Variable(_var(v).read_value(), trainable=False,
                                         name="ema_" + getattr(v, "path", v.name).replace(
                                             "/", "_").replace(":", "_"))
                             for v in self.train_variables]
            # Power-iteration state (u, v, sigma): backed up while the EMA weights
            # are swapped in, so evaluation leaves the training state untouched.
            self.power_vars = [w for layer in self.model.lipschitz_layers()
                               for w in (layer.u, layer.v, layer.sigma)]
            self.power_backup = [tf.Variable(_var(w).read_value(), trainable=False)
                                 for w in self.power_vars]
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.best_bpd = tf.Variable(np.inf, dtype=tf.float64, trainable=False,
                                        name="best_test_bpd")
        extra = {} if self.dequantizer is None else {"dequantizer": self.dequantizer}
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              ema=self.ema_vars, step=self.step,
                                              best_bpd=self.best_bpd, **extra)
        self.ckpt_dir = self._write_dir("ckpt")
        self.best_dir = self._write_dir("ckpt_best")
        if self.is_chief:
            for directory, prefix in ((self.ckpt_dir, "ckpt"), (self.best_dir, "best")):
                for path in remove_stale_temp_checkpoints(directory, prefix):
                    self.log(f"removed {path}, left by a save that was interrupted")
        self._make_managers()
        self.writer = (tf.summary.create_file_writer(os.path.join(self.run_dir, "tb"))
                       if self.is_chief else tf.summary.create_noop_writer())
        self._train_step = None
        self._eval_step = None
        self._sample_fn = None
        self._swap_fn = None
        self._restored = False

    # --------------------------------------------------------------- helpers
    def _make_managers(self):
        # Managers read the state file when built: rebuilt after a repair.
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir, max_to_keep=2)
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, self.best_dir, max_to_keep=int(self.args.keep_best),
            checkpoint_name="best")

    def close(self):
        """Releases the run-directory lock (``train`` does so when it returns or raises).

        Non-chief workers also delete their temporary directory.

        Example: ``trainer.close()``.
        """
        self.lock.release()
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)

    def log(self, msg):
        """Prints a timestamped line (chief only)."""
        if self.is_chief:
            print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)

    def warn(self, msg):
        """Prints a warning to stderr (chief only)."""
        if self.is_chief:
            print(f"[{datetime.datetime.now():%H:%M:%S}] WARNING: {msg}", file=sys.stderr,
                  flush=True)

    def _write_dir(self, name):
        if self.is_chief:
            return os.path.join(self.run_dir, name)
        return os.path.join(self._tmp_root, name)

    def _resumable_flow_config(self, old):
        """The run directory's config, read with its own version's meaning, if
        it was written by an older :data:`rflow_tf.models.CONFIG_VERSION` and
        differs from this run's config only in defaults that changed since;
        then the run resumes as the model it was (and ``self.flow_config`` is
        set to it). Else None."""
        try:
            old_cfg = models.FlowConfig.from_dict(dict(old))
        except (TypeError, ValueError):
            return None
        if old_cfg.config_version >= models.CONFIG_VERSION:
            return None
        versioned = {"config_version", *models.legacy_defaults(old_cfg.config_version)}
        new = self.flow_config.to_dict()
        if any(v != new.get(k) for k, v in old_cfg.to_dict().items() if k not in versioned):
            return None
        self.log(f"{self.run_dir} holds a config_version {old_cfg.config_version} run: resuming "
                 f"it with its original architecture")
        self.flow_config = self.spec.flow = old_cfg
        return old_cfg

    def _check_run_dir(self):
        path = os.path.join(self.run_dir, "config.json")
        new = self.spec.config_json()
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            old_flow = self._resumable_flow_config(old.get("flow_config", {}))
            if old_flow is not None:
                new["flow_config"] = old_flow.to_dict()
            elif old.get("flow_config") != new["flow_config"]:
                diff = sorted(k for k in set(old.get("flow_config", {})) | set(new["flow_config"])
                              if old.get("flow_config", {}).get(k) != new["flow_config"].get(k))
                raise UsageError(
                    f"{self.run_dir} holds a run with a different model configuration "
                    f"(differs in: {', '.join(diff)}). Use another --out/--run_name, or delete "
                    f"the directory to start over.")
            old_deq = old.get("training", {}).get("dequantization", "uniform")
            if old_deq != new["training"]["dequantization"]:
                raise UsageError(
                    f"{self.run_dir} holds a run trained with --dequantization={old_deq}; it "
                    f"cannot continue with --dequantization="
                    f"{new['training']['dequantization']}. Use another --out/--run_name.")
            changed = sorted(k for k in new["training"] if k != "dequantization"
                             and old.get("training", {}).get(k) != new["training"][k])
            if changed:
                self.log(f"training settings changed since the last run: {', '.join(changed)}")
        if self.is_chief:
            self.lock.acquire()     # before writing anything into the run directory
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(new, f, indent=2, sort_keys=True)
            os.replace(tmp, path)

    def _save(self, manager, step):
        path = manager.save(checkpoint_number=int(step))
        self.watchdog.tick()
        if not self.is_chief:     # every worker saves (collective); only the chief keeps it
            tf.io.gfile.rmtree(os.path.dirname(path))
        return path

    # ------------------------------------------------------------------ data
    @property
    def task(self):
        """The run's task: "density", "classification" or "hybrid"."""
        return self.hp.get("task", "density")

    def _train_dataset(self, start_step=0):
        """The training batches from optimiser step ``start_step`` on. The stream is a
        function of the seed alone (seeded shuffles, flips keyed by batch number), so
        batch k is the same whether a run started at 0 or resumed at k. Classification
        and hybrid runs get (images, labels) with the reference's augmentation."""
        hp = self.hp
        labelled = self.task != "density"
        aug = data.classification_augmentation(self.spec.dataset) if labelled else {}
        ds = data.load_image_dataset(
            self.spec.dataset, "train", batch_size=hp["batch_size"], data_dir=self.args.data_dir,
            n_bits=self.flow_config.n_bits, shuffle=True, repeat=True, seed=int(hp["seed"]),
            download=self.args.download, drop_remainder=True, with_labels=labelled, **aug)
        if hp["accumulate"] > 1:
            def micro_major(*t):     # [k, B, ...] -> [B, k, ...]
                out = tuple(tf.transpose(v, [1, 0] + list(range(2, v.shape.rank))) for v in t)
                return out if labelled else out[0]

            ds = ds.batch(hp["accumulate"], drop_remainder=True).map(micro_major)
        return ds.skip(int(start_step)) if start_step else ds

    def _test_dataset(self):
        bs = self.hp["batch_size"]
        h, w, c = self.flow_config.input_shape
        labelled = self.task != "density"
        ds = data.load_image_dataset(
            self.spec.dataset, "test", batch_size=bs, data_dir=self.args.data_dir,
            n_bits=self.flow_config.n_bits, shuffle=False, flip=False, repeat=False,
            download=self.args.download, with_labels=labelled)
        if self.args.eval_examples and self.args.eval_examples > 0:
            ds = ds.unbatch().take(int(self.args.eval_examples)).batch(bs)

        def pad(x, y=None):
            n = tf.shape(x)[0]
            x = tf.ensure_shape(tf.pad(x, [[0, bs - n], [0, 0], [0, 0], [0, 0]]), [bs, h, w, c])
            if y is not None:
                x = (x, tf.ensure_shape(tf.pad(y, [[0, bs - n]]), [bs]))
            return x, tf.range(bs) < n

        return ds.map(pad)

    def _distribute(self, ds):
        return distribute_dataset(self.strategy, ds)

    # ------------------------------------------------------------ components
    @property
    def train_step_fn(self):
        """The compiled training step (see :func:`make_train_step`)."""
        if self._train_step is None:
            hp = self.hp
            self._train_step = make_train_step(
                self.model, self.optimizer, self.strategy, self.ema_vars,
                global_batch_size=hp["batch_size"], accumulate=hp["accumulate"],
                n_bits=self.flow_config.n_bits, grad_clip=hp["grad_clip"],
                ema_decay=hp["ema_decay"], seed=hp["seed"], jit_compile=hp["jit_compile"],
                step_var=self.step, task=self.task, hybrid_lambda=hp.get("hybrid_lambda_value"),
                dequantizer=self.dequantizer)
        return self._train_step

    def _swap_ema(self, entering):
        if self._swap_fn is None:
            def swap(a, b):
                tmp = tf.identity(a)
                a.assign(b)
                b.assign(tmp)
                return tf.constant(True)

            def copy(dst, src):
                return dst.assign(src)

            @tf.function
            def swap_all(entering):
                update = self.strategy.extended.update
                if entering:     # keep the power-iteration state of the training weights
                    for b, w in zip(self.power_backup, self.power_vars):
                        update(b, copy, args=(_var(w),), group=False)
                for v, e in zip(self.train_variables, self.ema_vars):
                    update(_var(v), swap, args=(e,), group=False)
                if not entering:
                    for w, b in zip(self.power_vars, self.power_backup):
                        update(_var(w), copy, args=(b,), group=False)

            self._swap_fn = swap_all
        self._swap_fn(entering)
        if not entering:        # the backed-up state is the estimate for the training weights
            self.model.mark_lipschitz_current()

    @contextlib.contextmanager
    def ema_weights(self):
        """Context in which the model holds the EMA weights (power iteration
        converged for them). On exit the training weights and their exact
        power-iteration state come back, so evaluating or sampling never
        changes the course of training.

        Example: ``with trainer.ema_weights(): trainer.model.sample(16)``.
        """
        self._swap_ema(True)
        self.model.converge_lipschitz()
        try:
            yield self.model
        finally:
            self._swap_ema(False)

    def _restore_newest(self):
        """Restores the newest checkpoint that restores (:func:`restore_newest`); None if
        there is none. Non-chief workers read the chief's ``ckpt/`` without repairing it."""
        directory = self.ckpt_dir if self.is_chief else os.path.join(self.run_dir, "ckpt")
        path = restore_newest(self.checkpoint, directory, "ckpt", log=self.log, warn=self.warn,
                              repair=self.is_chief)
        if path:
            self.model.mark_lipschitz_current()     # resume with the saved estimates, exactly
            self._restored = True
            self._make_managers()
            self.log(f"resumed from {path} at step {int(self.step.numpy())}")
        return path

    def _check_workers_agree_on_step(self, step):
        """Multi-worker: every worker must resume at the same step (they all read the
        chief's ``ckpt/``); otherwise they would train different batches and wait for
        each other forever."""
        local = tf.constant([step], tf.int64)
        steps = self.strategy.gather(self.strategy.run(lambda: tf.identity(local)), axis=0)
        lo, hi = int(tf.reduce_min(steps)), int(tf.reduce_max(steps))
        if lo != hi:
            raise UsageError(
                f"the workers start at different steps ({lo} to {hi}; this is "
                f"{self.task_type} {self.task_id} at step {step}): every worker must read the "
                f"chief's checkpoints in {os.path.join(self.run_dir, 'ckpt')}, so --out must be "
                f"on a filesystem shared by all workers")

    def restore_or_initialize(self, first_batch=None):
        """Restores the newest checkpoint of the run directory that restores
        (falling back past corrupt ones, see :func:`restore_newest`); without one,
        initialises ActNorm from ``first_batch`` (uint8 images), converges the
        power iterations and sets the EMA to the initial weights. Returns the
        restored checkpoint path or None.
        """
        if self._restored:
            return None
        latest = self._restore_newest()
        if latest:
            return latest
        if first_batch is None:
            raise UsageError(f"no checkpoint in {self.ckpt_dir}")
        if isinstance(first_batch, (tuple, list)):        # (images, labels)
            first_batch = first_batch[0]
        x = first_batch[:, 0] if first_batch.shape.rank == 5 else first_batch
        x = data.dequantize(x, self.flow_config.n_bits, seed=[int(self.hp["seed"]), 12345],
                            dtype=self.model.flow_dtype)
        self.model.initialize(x)
        self.model.converge_lipschitz()
        for e, v in zip(self.ema_vars, self.train_variables):
            e.assign(_var(v).read_value())
        self._restored = True
        return None

    # ----------------------------------------------------------- evaluation
    def evaluate(self, use_ema=True, training_estimator=False):
        """Test bits/dim over the test split (or ``--eval_examples``) with the
        evaluation estimator (or the training one, ``training_estimator=True``).
        Returns ``(mean, standard error, count)``; the mean is NaN for
        ``--task=classification`` (no log-det is computed).
        :meth:`evaluate_metrics` also gives accuracy and cross-entropy.

        Example: ``bpd, se, n = trainer.evaluate()``.
        """
        m = self.evaluate_metrics(use_ema, training_estimator)
        return m["bpd"], m["bpd_stderr"], m["count"]

    def evaluate_metrics(self, use_ema=True, training_estimator=False):
        """Test metrics over the test split (or ``--eval_examples``), EMA
        weights, evaluation estimator: a dict with ``count``, ``bpd`` and
        ``bpd_stderr`` (NaN for classification), and for classification /
        hybrid runs ``accuracy`` and ``cross_entropy`` (nats per image).

        Example: ``trainer.evaluate_metrics()["accuracy"]``.
        """
        task = self.task
        if self._eval_step is None:
            self._eval_step = {}
        if training_estimator not in self._eval_step:
            self._eval_step[training_estimator] = make_eval_step(
                self.model, self.strategy, n_bits=self.flow_config.n_bits, seed=self.hp["seed"],
                task=task, training_estimator=training_estimator,
                dequantizer=self.dequantizer)
        eval_step = self._eval_step[training_estimator]
        ctx = self.ema_weights() if use_ema else contextlib.nullcontext()
        sums = None
        with ctx:
            for i, (x, mask) in enumerate(self._distribute(self._test_dataset())):
                out = [float(v) for v in eval_step(x, mask, tf.constant(i, tf.int64))]
                sums = out if sums is None else [a + b for a, b in zip(sums, out)]
                self.watchdog.tick()
        if not sums or sums[2] == 0:
            raise UsageError(f"the test split of {self.spec.dataset!r} is empty")
        s, s2, n = sums[:3]
        mean = s / n
        var = max(s2 / n - mean * mean, 0.0)
        result = {"count": int(n), "bpd": mean, "bpd_stderr": math.sqrt(var / n)}
        if task == "classification":
            result["bpd"] = result["bpd_stderr"] = float("nan")
        if task != "density":
            result["accuracy"] = sums[3] / n
            result["cross_entropy"] = sums[4] / n
        return result

    def sample(self, path=None, n=None, temperature=None, use_ema=True):
        """Samples ``n`` images (EMA weights), writes a PNG grid to ``path``
        (default samples/step_XXXXXXX.png) and returns the path.

        Example: ``trainer.sample("/tmp/grid.png", n=16)``.
        """
        n = int(n or self.args.n_sample_images)
        temperature = self.args.temperature if temperature is None else temperature
        if self._sample_fn is None or self._sample_fn[0] != (n, temperature):
            fn = tf.function(lambda seed: self.model.sample(n, temperature=temperature, seed=seed))
            self._sample_fn = ((n, temperature), fn)
        ctx = self.ema_weights() if use_ema else contextlib.nullcontext()
        with ctx:
            imgs = self._sample_fn[1](tf.constant([int(self.hp["seed"]), 777], tf.int64))
        if path is None:
            path = os.path.join(self.run_dir, "samples", f"step_{int(self.step.numpy()):07d}.png")
        if self.is_chief:
            data.save_image_grid(data.to_uint8_images(imgs, self.flow_config.n_bits).numpy(), path)
        return path

    def export(self, export_dir=None):
        """Export hook: if ``rflow_tf.export`` exists, calls
        ``rflow_tf.export.save(model, export_dir)`` with the EMA weights
        swapped in. Returns the directory, or None when skipped.

        Example: ``trainer.export("saved_models/mnist")``.
        """
        export_dir = self.spec.export_dir if export_dir is None else export_dir
        if not export_dir:
            return None
        try:
            export = importlib.import_module("rflow_tf.export")
        except ImportError:
            self.log("rflow_tf.export is not available; skipping the SavedModel export")
            return None
        # Every worker exports (the chief to export_dir, the others into their
        # temporary directory, deleted at once), so that no worker waits for another.
        target = export_dir if self.is_chief else os.path.join(self._tmp_root, "export")
        with self.ema_weights():
            export.save(self.model, target)
        self.watchdog.tick()
        if not self.is_chief:
            shutil.rmtree(target, ignore_errors=True)
            return None
        self.log(f"exported SavedModel (EMA weights) to {export_dir}")
        return export_dir

    # -------------------------------------------------------------- training
    def _summaries(self, step, scalars):
        with self.writer.as_default(step=int(step)):
            for name, value in scalars.items():
                write_scalar(name, float(value), int(step))
        self.writer.flush()

    def _lipschitz_stats(self):
        sigmas = np.array([float(l.sigma.numpy()) for l in self.model.lipschitz_layers()])
        if sigmas.size == 0:
            return {}
        coeff = self.flow_config.coeff
        return {"lipschitz/max_sigma": sigmas.max(), "lipschitz/mean_sigma": sigmas.mean(),
                "lipschitz/max_effective": np.minimum(sigmas, coeff).max()}

    def _eval_and_sample(self, step, do_sample):
        """Evaluates (and samples); returns (metrics of :meth:`evaluate_metrics`, sample path)."""
        m = self.evaluate_metrics()
        bpd, se, n = m["bpd"], m["bpd_stderr"], m["count"]
        parts, scalars = [], {}
        if self.task != "classification":
            parts.append(f"test bits/dim {bpd:.4f} +- {se:.4f}")
            scalars.update({"test/bpd": bpd, "test/bpd_stderr": se})
        if self.task != "density":
            parts.append(f"accuracy {m['accuracy']:.4f}, cross-entropy "
                         f"{m['cross_entropy']:.4f} nats")
            scalars.update({"test/accuracy": m["accuracy"],
                            "test/cross_entropy": m["cross_entropy"]})
        cfg = self.flow_config
        terms = "" if self.task == "classification" else \
            f", {cfg.logdet_eval_mode} log-det, {cfg.n_exact_terms_eval} exact terms, " \
            f"{self.hp['dequantization']} dequantisation bound"
        self.log(f"step {step}: {'; '.join(parts)} ({n} images, EMA weights{terms})")
        if self.task != "classification" and cfg.logdet_eval_mode != cfg.logdet:
            # Trained with another estimator (e.g. the biased truncated series):
            # report what that estimator says too, beside the true value above.
            bpd_t, se_t, _ = self.evaluate(training_estimator=True)
            self.log(f"step {step}: test bits/dim with the training estimator ({cfg.logdet}): "
                     f"{bpd_t:.4f} +- {se_t:.4f} (true: {bpd:.4f})")
            scalars["test/bpd_training_estimator"] = bpd_t
        path = None
        if do_sample and self.task != "classification":     # a classifier is no sampler
            path = self.sample()
            self.log(f"step {step}: samples written to {path}")
        # Best checkpoint by test bits/dim; for classification by test error
        # (kept in the same variable, lower is better).
        criterion = 1.0 - m["accuracy"] if self.task == "classification" else bpd
        name = "test error" if self.task == "classification" else "test bits/dim"
        if math.isfinite(criterion) and criterion < float(self.best_bpd.numpy()):
            self.best_bpd.assign(criterion)
            best = self._save(self.best_manager, step)
            self.log(f"step {step}: new best {name}, saved {best}")
        key = "test/best_error" if self.task == "classification" else "test/best_bpd"
        scalars[key] = float(self.best_bpd.numpy())
        self._summaries(step, scalars)
        return m, path

    def train(self):
        """Runs (or resumes) training to ``steps``, evaluating, sampling and
        checkpointing on schedule, then the final evaluation, samples,
        results.json and the export hook. Returns a dict with ``step``,
        ``test_bpd``, ``test_bpd_stderr``, ``best_bpd``, ``samples``,
        ``run_dir``, ``steps_per_sec``.

        Raises TrainingDivergedError after ``--max_nan_steps`` consecutive
        non-finite steps (nothing is saved after the last good checkpoint).
        Multi-worker: raises WorkerLostError when a collective op fails
        because another worker is gone, and ends the process (exit status 4)
        when nothing progresses for ``--worker_timeout`` seconds.
        Holds the run-directory lock while it runs and releases it on return
        or on any exception.
        """
        if self.is_chief:
            self.lock.acquire()
        try:
            with self.watchdog:
                return self._train()
        except _PEER_LOST_ERRORS as e:
            if not self.multi_worker:
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            # The informative line ("Collective ops is aborted by: Socket closed", "... are
            # unhealthy ..."), not TensorFlow's "Graph execution error:" header.
            reason = next((ln for ln in lines if re.search(
                r"aborted by|unhealthy|socket closed|connection|deadline", ln, re.IGNORECASE)),
                lines[0] if lines else "")
            latest = (checkpoint_candidates(os.path.join(self.run_dir, "ckpt")) or
                      ["none yet: a restart starts over"])[0]
            raise WorkerLostError(
                f"{self.task_type} {self.task_id} lost another worker of the cluster at step "
                f"{int(self.step.numpy())} ({type(e).__name__}: {reason[:300]}). Restart every "
                f"worker with the same command; training resumes from the chief's last "
                f"checkpoint ({latest}).") from None
        finally:
            self.close()

    def _train(self):
        hp, args = self.hp, self.args
        total = int(hp["steps"])
        if not self._restored:
            self._restore_newest()
        start = int(self.step.numpy()) if self._restored else 0
        train_ds = self._train_dataset(start)
        if not self._restored:
            self.restore_or_initialize(next(iter(train_ds)))
        if self.multi_worker:
            self._check_workers_agree_on_step(start)
        self.log(f"run {self.spec.run_name}: dataset {self.spec.dataset} "
                 f"{self.flow_config.input_shape}, preset {self.spec.preset}, "
                 f"{self.model.count_params():,} parameters, {hp['dequantization']} "
                 f"dequantisation, {self.n_replicas} replica(s) "
                 f"({type(self.strategy).__name__}), global batch {hp['batch_size']} x "
                 f"{hp['accumulate']}, steps {start}->{total}, dir {self.run_dir}")
        if self.is_chief:
            tf.io.gfile.makedirs(os.path.join(self.run_dir, "samples"))

        step = start
        nan_streak = 0
        if step < total:
            it = iter(self._distribute(train_ds))
            step_fn = self.train_step_fn
            t_log, n_log, t_start = time.time(), 0, time.time()
            loss_sum = gnorm_sum = ld_sum = 0.0
            metric_sums = dict.fromkeys(
                {"density": (), "classification": ("xent", "acc"),
                 "hybrid": ("bpd", "xent", "acc")}[self.task], 0.0)
            n_ok = 0
            steps_per_sec = float("nan")
            try:
                while step < total:
                    poison = tf.constant(np.nan if step + 1 in self.nan_steps else 0.0,
                                         tf.float32)
                    try:
                        out = step_fn(next(it), tf.constant(step, tf.int64), poison)
                    except tf.errors.InvalidArgumentError as e:
                        if hp["jit_compile"] and ("XLA" in str(e) or "compile" in str(e)):
                            reason = next((ln.strip() for ln in str(e).splitlines()
                                           if "unsupported" in ln or "compile-time" in ln),
                                          str(e).splitlines()[0])
                            raise UsageError(f"--jit_compile: XLA cannot compile the training "
                                             f"step: {reason[:400]}") from None
                        raise
                    step += 1
                    n_log += 1
                    self.watchdog.tick()
                    if step == self.crash_step:
                        raise _InjectedCrash(f"injected crash after step {step}")
                    if not bool(out["ok"]):
                        nan_streak += 1
                        self.warn(f"step {step}: non-finite loss or gradient (loss "
                                  f"{float(out['loss'])}, grad norm {float(out['grad_norm'])}); "
                                  f"update skipped ({nan_streak} in a row)")
                        if nan_streak >= int(args.max_nan_steps):
                            raise TrainingDivergedError(
                                f"training stopped at step {step}: {nan_streak} consecutive "
                                f"non-finite steps (--max_nan_steps={args.max_nan_steps}). The "
                                f"last good checkpoint is "
                                f"{self.manager.latest_checkpoint or '(none yet)'}; try a lower "
                                f"--lr, a smaller --grad_clip or more --warmup_steps.")
                    else:
                        nan_streak = 0
                        n_ok += 1
                        loss_sum += float(out["loss"])
                        gnorm_sum += float(out["grad_norm"])
                        ld_sum += float(out["logdet"])
                        for key in metric_sums:
                            metric_sums[key] += float(out[key])
                    if step % args.log_every == 0 or step == total:
                        now = time.time()
                        steps_per_sec = n_log / max(now - t_log, 1e-9)
                        lr = float(self.optimizer.learning_rate.numpy()) \
                            if hasattr(self.optimizer.learning_rate, "numpy") \
                            else float(self.optimizer.learning_rate)
                        denom = max(n_ok, 1)
                        if self.task == "density":
                            what = f"train bpd {loss_sum / denom:.4f}"
                            scalars = {"train/bpd": loss_sum / denom,
                                       "train/logdet": ld_sum / denom}
                        else:
                            means = {k: v / denom for k, v in metric_sums.items()}
                            what = f"train loss {loss_sum / denom:.4f} | " + " | ".join(
                                f"{k} {v:.4f}" for k, v in means.items())
                            scalars = {"train/loss": loss_sum / denom,
                                       **{f"train/{k}": v for k, v in means.items()}}
                        self.log(f"step {step}/{total} | {what} | "
                                 f"lr {lr:.2e} | grad norm {gnorm_sum / denom:.3f} | "
                                 f"{steps_per_sec:.2f} steps/s | ETA "
                                 f"{_fmt_time((total - step) / max(steps_per_sec, 1e-9))}")
                        scalars.update({"train/lr": lr, "train/grad_norm": gnorm_sum / denom,
                                        "train/skipped_steps": n_log - n_ok,
                                        "perf/steps_per_sec": steps_per_sec})
                        scalars.update(self._lipschitz_stats())
                        self._summaries(step, scalars)
                        t_log, n_log, n_ok = now, 0, 0
                        loss_sum = gnorm_sum = ld_sum = 0.0
                        metric_sums = dict.fromkeys(metric_sums, 0.0)
                    # No periodic checkpoint in the middle of a run of skipped steps:
                    # the latest checkpoint stays the last good step.
                    if (step % hp["ckpt_every"] == 0 and nan_streak == 0) or step == total:
                        self._save(self.manager, step)
                    if step % hp["eval_every"] == 0 and step != total:
                        self._eval_and_sample(step, step % hp["sample_every"] == 0)
                    elif step % hp["sample_every"] == 0 and step != total:
                        self.log(f"step {step}: samples written to {self.sample()}")
            except KeyboardInterrupt:
                if nan_streak == 0:
                    path = self._save(self.manager, int(self.step.numpy()))
                    self.log(f"interrupted; saved {path}. Rerun the same command to resume.")
                raise
            del it          # release the input pipeline before evaluation and export
            self.watchdog.tick()
            elapsed = time.time() - t_start
            steps_per_sec = (step - start) / max(elapsed, 1e-9)
            self.log(f"trained {step - start} steps in {_fmt_time(elapsed)} "
                     f"({steps_per_sec:.2f} steps/s)")
        else:
            steps_per_sec = float("nan")
            self.log(f"already trained to step {step} (--steps={total}); evaluating")

        metrics, samples = self._eval_and_sample(step, True)
        bpd, se = metrics["bpd"], metrics["bpd_stderr"]
        result = {"step": step, "task": self.task, "test_bpd": bpd, "test_bpd_stderr": se,
                  "best_bpd": float(self.best_bpd.numpy()), "samples": samples,
                  "run_dir": self.run_dir, "steps_per_sec": steps_per_sec,
                  "checkpoint": self.manager.latest_checkpoint}
        if self.task != "density":
            result["test_accuracy"] = metrics["accuracy"]
            result["test_cross_entropy"] = metrics["cross_entropy"]
        if self.task == "classification":
            result["best_error"] = result.pop("best_bpd")
            self.log(f"final test accuracy: {metrics['accuracy']:.4f}, cross-entropy "
                     f"{metrics['cross_entropy']:.4f} (EMA weights, step {step}); best error "
                     f"{result['best_error']:.4f}")
        else:
            acc = (f"; test accuracy {metrics['accuracy']:.4f}" if self.task == "hybrid"
                   else "")
            self.log(f"final test bits/dim: {bpd:.4f} +- {se:.4f} (EMA weights, step {step}); "
                     f"best {result['best_bpd']:.4f}{acc}; samples: {samples}")
        if self.is_chief:
            with open(os.path.join(self.run_dir, "results.json"), "w") as f:
                json.dump(result, f, indent=2)
        # Export hook: SavedModel with the EMA weights (rflow_tf.export.save).
        result["export_dir"] = self.export()
        return result


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
    trainer = Trainer(args, strategy=strategy)
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
    flags or missing data, 3 diverged, 4 another worker of a multi-worker
    cluster was lost or hangs, 130 interrupted)."""
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
    except data.DatasetNotFoundError as e:
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
