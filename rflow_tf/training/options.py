"""The settings of a training run as declared: TrainingOptions (every
non-architecture setting, each declared once with its flag, help and check),
the checks of flag values (check_flags, FLAG_CONSTRAINTS), the architecture
flags, the tasks, and the errors a run stops with (UsageError,
TrainingDivergedError). :mod:`rflow_tf.training.run_spec` resolves the options
into a run."""

import dataclasses
from typing import Optional

from rflow_tf import models
from rflow_tf.settings import (
    Check,
    at_least,
    finite_above,
    finite_at_least,
    flag_checks,
    flag_names,
    setting,
)

#: Training tasks (``--task``).
TASKS = ("density", "classification", "hybrid", "conditional")

#: The tasks whose models have classifier heads (``FlowConfig.n_classes``).
CLASSIFIER_TASKS = ("classification", "hybrid")

#: The :class:`TrainingOptions` of classification and hybrid runs only; density
#: runs refuse them (:func:`~rflow_tf.training.resolve_run`).
LABELLED_ONLY_OPTIONS = ("crop_padding", "translate", "label_smoothing")


class UsageError(Exception):
    """Bad flags or options, or an incompatible run directory; the command line prints it
    without a traceback. Options are checked on construction, so it comes
    before any work.

    Example:
    ```python
    from rflow_tf.training import TrainingOptions, UsageError

    try:
        TrainingOptions(batch_size=0)
    except UsageError as error:
        assert str(error) == "--batch_size must be >= 1, got 0"
    else:
        raise AssertionError("a batch of 0 was accepted")
    ```
    """


class TrainingDivergedError(Exception):
    """Too many consecutive non-finite steps (``max_nan_steps``); the message
    names the last good checkpoint. :meth:`~rflow_tf.training.Trainer.fit`
    raises it; each non-finite step before it is skipped with a warning.

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.training import Trainer, TrainingDivergedError, TrainingHook, TrainingOptions

    class NaNLoss(TrainingHook):  # makes every step's loss NaN
        adjusts_loss = True

        def adjust_loss(self, loss, step):
            return loss * float("nan")

    # A one-block coupling flow (no power iteration): quick to build.
    config = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1,), block="coupling",
                        hidden_channels=4, fc_end=False)
    options = TrainingOptions(preset="tiny", steps=5, batch_size=4, max_nan_steps=1,
                              export_dir="", out="run")
    try:
        Trainer(config, options, hooks=[NaNLoss()]).fit()
    except TrainingDivergedError as error:
        assert "training stopped at step 1: 1 consecutive non-finite steps" in str(error)
    else:
        raise AssertionError("a NaN loss trained on")
    ```
    """


#: The ``--help`` sections of the training flags (:attr:`rflow_tf.settings.Setting.group`).
DATA = "data and model"
TASK = "task"
OPTIMISATION = "optimisation"
EVALUATION = "evaluation, logging and checkpoints"
DISTRIBUTION = "distribution"
EXPORT = "export"


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Every training setting that is not the architecture: the flags of
    ``train/main.py`` but the :class:`rflow_tf.models.FlowConfig` ones. Each
    field declares its flag (:func:`rflow_tf.settings.setting`: help, default,
    check), and ``train/main.py`` generates its command line from them.

    Fields left ``None`` take the preset's value (``preset`` ``None``: the
    dataset's preset, :func:`rflow_tf.models.preset_for_dataset`). Values
    are checked on construction (:func:`check_flags`, the checks the flags
    get), so a bad value raises :class:`UsageError` naming it before any work.
    ``steps`` wins over ``epochs``; ``out`` is the run directory (default
    ``runs/<run name>``), ``export_dir`` the SavedModel written at the end
    (default ``saved_models/<run name>``, ``""`` disables).
    ``crop_padding`` (classification and hybrid only): random crop of every
    training image with this reflection padding, i.e. a uniform translation
    by up to ``crop_padding`` pixels each way (``None``: the reference's for
    the dataset, :func:`rflow_tf.data.classification_augmentation`);
    ``translate`` (same tasks): random sub-pixel shifts of up to this many
    pixels each way, bilinear with zero fill (``None``: 0, none; see
    :func:`rflow_tf.data.load_image_dataset`). Test images are never augmented.
    ``label_smoothing`` (same tasks): eps of the smoothed cross-entropy of
    :func:`rflow_tf.classifier.hybrid_loss` (``None``: 0, none; the reported
    cross-entropy stays the plain one).

    Example:
    ```python
    options = TrainingOptions(dataset="digits", preset="tiny", steps=20, out="/tmp/run")
    options.replace(lr=5e-4).lr      # 0.0005
    ```
    """

    dataset: str = setting(
        "digits",
        group=DATA,
        help="digits (offline, sklearn 8x8), mnist, cifar10, svhn_cropped (TFDS), "
        "celeb_a_hq (Glow's celeba-tfr TFRecords, the authors' .pth files or TFDS "
        "celeb_a_hq/256), celeba_5bit (the authors' .pth file), imagenet32, imagenet64 "
        "(the authors' .pth or .npz files). Missing data stops the run at once "
        "(docs/datasets.md).",
    )
    preset: Optional[str] = setting(
        None,
        group=DATA,
        help=f"Architecture + training defaults, one of {sorted(models.PRESETS)}. "
        "Default: chosen from the dataset (digits -> digits_small, mnist -> "
        "mnist, ...). The input shape and bits always come from the dataset.",
    )
    data_dir: Optional[str] = setting(
        None,
        group=DATA,
        help="Where the data is: Glow's extracted celeba-tfr folder (holding train/ "
        "and validation/), the authors' data/ folder (celebahq/, celebahq64_5bit/, "
        "imagenet32/, imagenet64/), or a TFDS data directory. "
        "Default: $TFDS_DATA_DIR or ~/tensorflow_datasets.",
    )
    download: bool = setting(
        True, group=DATA, help="Let TFDS download/prepare a missing dataset (needs network)."
    )
    task: str = setting(
        "density",
        group=TASK,
        choices=TASKS,
        help="density: maximum likelihood; classification: classifier heads on the "
        "flow's features, cross-entropy only (no log-det); hybrid: "
        "hybrid_lambda * (-log p(x)) - log p(y|x) (nats per image); conditional: "
        "maximum likelihood of p(x | y), a class-conditional flow whose embedded "
        "label is every residual block's context.",
    )
    hybrid_lambda: Optional[str] = setting(
        None,
        group=TASK,
        help="Weight of -log p(x) in the hybrid loss: a number >= 0 or 1/D "
        "(D = dimensions per image); paper: 1 or 1/D. Default: 1 "
        "(--task=hybrid only).",
    )
    crop_padding: Optional[int] = setting(
        None,
        group=TASK,
        check=at_least(0, " (0 = no crop)"),
        help="Classification/hybrid only: translate every training image by up to "
        "this many pixels each way (random crop, reflection padding). Default: "
        "the reference's for the dataset (4 for svhn_cropped and cifar10, 0 for "
        "mnist and digits).",
    )
    translate: Optional[float] = setting(
        None,
        group=TASK,
        check=finite_at_least(0, " (0 = none)"),
        help="Classification/hybrid only: shift every training image by a random "
        "sub-pixel offset of up to this many pixels each way (bilinear, zero fill; "
        "not a reference option). Default: 0 (none).",
    )
    label_smoothing: Optional[float] = setting(
        None,
        group=TASK,
        check=Check(lambda v: 0 <= v < 1, "in [0, 1) (0 = none)"),
        help="Classification/hybrid only: train the classifier on the smoothed labels "
        "(1 - eps) onehot + eps / n_classes (not a reference option; the reported "
        "cross-entropy stays the plain one). Default: 0 (none).",
    )
    batch_size: Optional[int] = setting(
        None,
        group=OPTIMISATION,
        check=at_least(1),
        help="Global batch size per micro-step (split over replicas).",
    )
    epochs: Optional[float] = setting(
        None,
        group=OPTIMISATION,
        check=finite_above(0),
        help="Training length in epochs of the training split.",
    )
    steps: Optional[int] = setting(
        None,
        group=OPTIMISATION,
        check=at_least(0),
        help="Training length in optimiser steps (wins over --epochs).",
    )
    lr: Optional[float] = setting(
        None, group=OPTIMISATION, check=finite_above(0), help="Adam learning rate (paper: 1e-3)."
    )
    warmup_steps: Optional[int] = setting(
        None,
        group=OPTIMISATION,
        check=at_least(0),
        help="Linear learning-rate warm-up from lr/warmup_steps to lr.",
    )
    ema_decay: Optional[float] = setting(
        None,
        group=OPTIMISATION,
        check=Check(lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        help="Decay of the EMA of the weights used for evaluation/sampling.",
    )
    grad_clip: Optional[float] = setting(
        None,
        group=OPTIMISATION,
        check=finite_at_least(0, " (0 disables)"),
        help="Clip the global gradient norm to this value (0 disables).",
    )
    accumulate: Optional[int] = setting(
        None,
        group=OPTIMISATION,
        check=at_least(1),
        help="Micro-batches of --batch_size accumulated per optimiser step.",
    )
    dequantization: str = setting(
        "uniform",
        group=OPTIMISATION,
        choices=("uniform", "variational"),
        help="Dequantisation noise: uniform, or a learned conditional flow q(u|x) "
        "(Flow++) trained with the model on the negative ELBO; test bits/dim "
        "is then the variational bound. Fixed for the life of a run.",
    )
    seed: int = setting(
        0,
        group=OPTIMISATION,
        help="Seed of the initial weights, data order, dequantisation noise and "
        "log-det estimators (stateless; the replica id is folded in).",
    )
    jit_compile: bool = setting(
        False, group=OPTIMISATION, help="Compile the per-replica forward/backward with XLA."
    )
    max_nan_steps: int = setting(
        10,
        group=OPTIMISATION,
        check=at_least(1),
        help="Stop after this many consecutive non-finite steps (each one is "
        "skipped with a warning).",
    )
    out: Optional[str] = setting(
        None,
        group=EVALUATION,
        help="Run directory. Default: runs/<run name>, run name = "
        "<dataset>_<preset>. Rerunning with the same directory resumes.",
    )
    run_name: Optional[str] = setting(
        None, group=EVALUATION, help="Run name (default <dataset>_<preset>)."
    )
    eval_every: Optional[int] = setting(
        None,
        group=EVALUATION,
        check=at_least(1),
        help="Test bits/dim (EMA weights, 20 exact terms) every N steps and at "
        "the end (default: preset).",
    )
    eval_examples: int = setting(
        0,
        group=EVALUATION,
        check=at_least(0, " (0 = the whole test split)"),
        help="Test images per evaluation (0 = the whole test split).",
    )
    sample_every: Optional[int] = setting(
        None,
        group=EVALUATION,
        check=at_least(1),
        help="Write a PNG grid of samples every N steps and at the end.",
    )
    n_sample_images: int = setting(
        64, group=EVALUATION, check=at_least(1), help="Images per sample grid."
    )
    temperature: float = setting(
        1.0, group=EVALUATION, check=finite_above(0), help="Sampling temperature."
    )
    log_every: int = setting(
        50,
        group=EVALUATION,
        check=at_least(1),
        help="Progress line and TensorBoard scalars every N steps.",
    )
    ckpt_every: Optional[int] = setting(
        None,
        group=EVALUATION,
        check=at_least(1),
        help="Save the latest checkpoint every N steps (default: --eval_every).",
    )
    keep_best: int = setting(
        1,
        group=EVALUATION,
        check=at_least(1),
        help="Number of best-by-test-bits/dim checkpoints kept in ckpt_best/.",
    )
    strategy: str = setting(
        "mirrored",
        group=DISTRIBUTION,
        choices=("mirrored", "one_device", "multi_worker"),
        help="mirrored: MirroredStrategy over all visible GPUs (or over the "
        "--cpu_devices logical CPUs), one device if there is only one; "
        "one_device: first GPU or the CPU; multi_worker: "
        "MultiWorkerMirroredStrategy configured by $TF_CONFIG.",
    )
    worker_timeout: float = setting(
        1800,
        group=DISTRIBUTION,
        check=finite_at_least(0, " (0 disables)"),
        help="multi_worker only: stop with an error (exit status 4) when training "
        "makes no progress (no step, evaluation batch or save finishes) for "
        "this many seconds, e.g. because another worker hangs; 0 disables. A "
        "worker that dies is usually detected within seconds anyway.",
    )
    cpu_devices: int = setting(
        0,
        group=DISTRIBUTION,
        check=at_least(0, " (0 = no split)"),
        help="Split the CPU into N logical devices before TensorFlow starts and "
        "mirror over them (tests the multi-device path without GPUs).",
    )
    export_dir: Optional[str] = setting(
        None,
        group=EXPORT,
        help="SavedModel directory written at the end of training with the EMA "
        "weights if rflow_tf.export is available (default "
        "saved_models/<run name>; '' disables).",
    )

    def __post_init__(self):
        check_flags(self)
        if self.task not in TASKS:
            raise UsageError(f"--task must be one of {TASKS}, got {self.task!r}")

    def replace(self, **changes):
        """A copy with ``changes`` (checked like the constructor's arguments).

        Example: ``TrainingOptions(preset="tiny").replace(steps=5).steps  # 5``.
        """
        return dataclasses.replace(self, **changes)


#: The flags of ``train/main.py`` that are :class:`rflow_tf.models.FlowConfig`
#: fields (the architecture), as FlowConfig declares them.
ARCHITECTURE_FLAGS = flag_names(models.FlowConfig)


#: The checks of flag values, ``(flag, predicate, what the flag must be)``, from the
#: declarations of :class:`TrainingOptions` and :class:`rflow_tf.models.FlowConfig`.
#: Flags left unset (None: "the preset's value") are not checked.
FLAG_CONSTRAINTS = flag_checks(TrainingOptions) + flag_checks(models.FlowConfig)


def check_flags(args):
    """Checks every flag of ``args`` (parsed flags of ``train/main.py``, a
    :class:`TrainingOptions`, or any object with such attributes) against
    :data:`FLAG_CONSTRAINTS`; raises :class:`UsageError` naming the first bad
    flag. Runs before any work (``main``, :class:`TrainingOptions` and
    :func:`~rflow_tf.training.resolve_run` call it), so a bad value never trains to NaN, is never
    replaced by a default and never fails after the run.

    Example:
    ```python
    import types
    from rflow_tf.training import UsageError, check_flags

    check_flags(types.SimpleNamespace(lr=1e-3))  # fine
    try:
        check_flags(types.SimpleNamespace(lr=float("inf")))
    except UsageError as e:
        print(e)  # --lr must be a finite number > 0, got inf
    ```
    """
    for flag, ok, requirement in FLAG_CONSTRAINTS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not ok(value):
            raise UsageError(f"--{flag} must be {requirement}, got {value!r}")
