"""What a training run is: TrainingOptions (every non-architecture setting), the
FlowConfig of a run (flow_config_for) and their resolution into a RunSpec."""

import dataclasses
import math
import os
import types
import warnings
from typing import Optional

import numpy as np

from rflow_tf import classifier as rclf
from rflow_tf import data, models

#: Training tasks (``--task``).
TASKS = ("density", "classification", "hybrid")

#: The :class:`TrainingOptions` of classification and hybrid runs only; density
#: runs refuse them (:func:`resolve_run`).
LABELLED_ONLY_OPTIONS = ("crop_padding", "translate", "label_smoothing")


class UsageError(Exception):
    """Bad flags or options, or an incompatible run directory; the command line prints it
    without a traceback."""


class TrainingDivergedError(Exception):
    """Too many consecutive non-finite steps; the message names the last good checkpoint."""


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
    ("head_channels", lambda v: v >= 1, ">= 1"),
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
    ("crop_padding", lambda v: v >= 0, ">= 0 (0 = no crop)"),
    ("translate", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0 = none)"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1) (0 = none)"),
    ("cpu_devices", lambda v: v >= 0, ">= 0 (0 = no split)"),
    ("worker_timeout", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0 disables)"),
)


def check_flags(args):
    """Checks every flag of ``args`` (parsed flags of ``train/main.py``, a
    :class:`TrainingOptions`, or any object with such attributes) against
    :data:`FLAG_CONSTRAINTS`; raises :class:`UsageError` naming the first bad
    flag. Runs before any work (``main``, :class:`TrainingOptions` and
    :func:`resolve_run` call it), so a bad value never trains to NaN, is never
    replaced by a default and never fails after the run.

    Example:
    ```python
    import types
    check_flags(types.SimpleNamespace(lr=1e-3))      # fine
    check_flags(types.SimpleNamespace(lr=float("inf")))  # UsageError: --lr must be ...
    ```
    """
    for flag, ok, requirement in FLAG_CONSTRAINTS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not ok(value):
            raise UsageError(f"--{flag} must be {requirement}, got {value!r}")


@dataclasses.dataclass
class RunSpec:
    """Everything a run needs, resolved from the flags and the preset.

    ``flow``: the :class:`rflow_tf.models.FlowConfig` (input shape and bits
    from the dataset); ``hparams``: training settings (batch_size,
    accumulate, lr, warmup_steps, ema_decay, grad_clip, eval_every,
    sample_every, ckpt_every, steps; for classification and hybrid runs
    also crop_padding, translate and label_smoothing); ``run_dir``,
    ``export_dir``.
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
        return {
            "dataset": self.dataset,
            "preset": self.preset,
            "run_name": self.run_name,
            "flow_config": self.flow.to_dict(),
            "training": dict(self.hparams),
        }


#: The flags of ``train/main.py`` that are not architecture: every field of
#: :class:`TrainingOptions`, with the flag's default.
@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Every training setting that is not the architecture (the flags of
    ``train/main.py`` but the :class:`rflow_tf.models.FlowConfig` ones).

    Fields left ``None`` take the preset's value (``preset`` ``None``: the
    dataset's preset, :func:`rflow_tf.models.preset_for_dataset`). Values
    are checked against :data:`FLAG_CONSTRAINTS` on construction (the checks
    the flags get), so a bad value raises :class:`UsageError` naming it before
    any work. ``steps`` wins over ``epochs``; ``out`` is the run directory
    (default ``runs/<run name>``), ``export_dir`` the SavedModel written at the
    end (default ``saved_models/<run name>``, ``""`` disables).
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

    dataset: str = "digits"
    preset: Optional[str] = None
    data_dir: Optional[str] = None
    download: bool = True
    task: str = "density"
    hybrid_lambda: Optional[str] = None
    crop_padding: Optional[int] = None
    translate: Optional[float] = None
    label_smoothing: Optional[float] = None
    batch_size: Optional[int] = None
    epochs: Optional[float] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    ema_decay: Optional[float] = None
    grad_clip: Optional[float] = None
    accumulate: Optional[int] = None
    dequantization: str = "uniform"
    seed: int = 0
    jit_compile: bool = False
    max_nan_steps: int = 10
    out: Optional[str] = None
    run_name: Optional[str] = None
    eval_every: Optional[int] = None
    eval_examples: int = 0
    sample_every: Optional[int] = None
    n_sample_images: int = 64
    temperature: float = 1.0
    log_every: int = 50
    ckpt_every: Optional[int] = None
    keep_best: int = 1
    strategy: str = "mirrored"
    cpu_devices: int = 0
    worker_timeout: float = 1800
    export_dir: Optional[str] = None
    # Testing aids: comma-separated steps whose loss is replaced by NaN; a step after
    # which training stops abruptly, saving nothing (a kill).
    inject_nan_steps: str = ""
    inject_crash_step: int = 0

    def __post_init__(self):
        check_flags(self)
        if self.task not in TASKS:
            raise UsageError(f"--task must be one of {TASKS}, got {self.task!r}")

    def replace(self, **changes):
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        return dataclasses.replace(self, **changes)


def _dataset_and_preset(options):
    """(dataset info, preset name, preset) of ``options``; UsageError when unknown."""
    try:
        info = data.dataset_info(options.dataset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    preset_name = options.preset or models.preset_for_dataset(info.name)
    if preset_name not in models.PRESETS:
        raise UsageError(f"unknown --preset {preset_name!r}; valid: {sorted(models.PRESETS)}")
    return info, preset_name, models.PRESETS[preset_name]


def _check_task(options, info):
    """``(hybrid_lambda text, value)`` of the task of ``options`` on dataset ``info``
    (``(None, None)`` unless hybrid); UsageError for a task the data cannot serve."""
    task = options.task
    if task not in TASKS:
        raise UsageError(f"--task must be one of {TASKS}, got {task!r}")
    lam_text = options.hybrid_lambda
    if lam_text is not None and task != "hybrid":
        raise UsageError(f"--hybrid_lambda applies to --task=hybrid only (this is --task={task})")
    hybrid_lambda = None
    if task != "density":
        if not info.n_classes:
            raise UsageError(
                f"--task={task} needs labels; {info.name!r} has none (labelled: "
                f"digits, mnist, svhn_cropped, cifar10)"
            )
        if task == "hybrid":
            lam_text = "1" if lam_text is None else str(lam_text)
            try:
                hybrid_lambda = rclf.resolve_hybrid_lambda(lam_text, int(np.prod(info.image_shape)))
            except ValueError as e:
                raise UsageError(f"--hybrid_lambda: {e}") from None
    return lam_text, hybrid_lambda


def flow_config_for(options, **overrides):
    """The :class:`rflow_tf.models.FlowConfig` a run of ``options`` trains: the
    preset's architecture with the dataset's input shape and bits (``n_bits``
    overrides the bits), the classes of a labelled task (and the reference's
    CIFAR-10 normalisation as first layer unless ``init_layer`` says
    otherwise), then the ``overrides`` that are not ``None`` (FlowConfig
    fields). Raises UsageError for an invalid combination.

    Example:
    ```python
    options = TrainingOptions(dataset="digits", preset="tiny")
    config = flow_config_for(options, n_blocks=(1, 1), hidden_channels=16)
    ```
    """
    check_flags(types.SimpleNamespace(**overrides))
    info, _, preset = _dataset_and_preset(options)
    _check_task(options, info)
    n_bits = overrides.pop("n_bits", None)
    changes = dict(
        input_shape=tuple(info.image_shape), n_bits=n_bits if n_bits is not None else info.n_bits
    )
    changes.update({k: v for k, v in overrides.items() if v is not None})
    if options.task != "density":
        changes["n_classes"] = int(info.n_classes)
        if overrides.get("init_layer") is None and info.name == "cifar10":
            changes["init_layer"] = "cifar10"  # the reference's choice
    if changes.get("neumann_grad") is False and overrides.get("grad_in_forward") is None:
        changes["grad_in_forward"] = False
    try:
        return preset.config.replace(**changes)
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid model configuration: {e}") from None


def resolve_run(config, options):
    """Builds the :class:`RunSpec` of a run of ``config`` (a FlowConfig, or
    None for :func:`flow_config_for` ``(options)``) with ``options``; raises
    UsageError for inconsistent settings.

    Example: ``spec = resolve_run(None, TrainingOptions(dataset="mnist"))``.
    """
    if not isinstance(options, TrainingOptions):
        raise TypeError(f"options must be a TrainingOptions, got {type(options).__name__}")
    check_flags(options)
    info, preset_name, preset = _dataset_and_preset(options)
    if preset.dataset not in (info.name, "digits") and options.preset:
        warnings.warn(
            f"preset {preset_name!r} was designed for {preset.dataset!r}, training on "
            f"{info.name!r} with input shape {info.image_shape}",
            stacklevel=2,
        )
    lam_text, hybrid_lambda = _check_task(options, info)
    task = options.task
    flow = flow_config_for(options) if config is None else config
    if not isinstance(flow, models.FlowConfig):
        raise TypeError(f"config must be a FlowConfig or None, got {type(flow).__name__}")
    if tuple(flow.input_shape) != tuple(info.image_shape):
        raise UsageError(
            f"config.input_shape {tuple(flow.input_shape)} is not the shape "
            f"{tuple(info.image_shape)} of {info.name!r} images"
        )
    if task != "density" and flow.n_classes != info.n_classes:
        raise UsageError(
            f"--task={task} on {info.name!r} needs config.n_classes="
            f"{info.n_classes}, got {flow.n_classes}"
        )

    hp = preset.training_defaults()
    hp.pop("dataset")
    for key in (
        "batch_size",
        "accumulate",
        "lr",
        "warmup_steps",
        "ema_decay",
        "grad_clip",
        "eval_every",
        "sample_every",
    ):
        value = getattr(options, key)
        if value is not None:
            hp[key] = value
    # The options were checked by check_flags(); the presets' values are valid.
    if options.steps is not None:
        steps = int(options.steps)
    elif options.epochs is not None or preset.steps is None:
        epochs = options.epochs if options.epochs is not None else preset.epochs
        steps = int(math.ceil(float(epochs) * info.n_train / (hp["batch_size"] * hp["accumulate"])))
    else:
        steps = int(preset.steps)
    hp.pop("epochs")
    hp["steps"] = steps
    hp["ckpt_every"] = int(hp["eval_every"] if options.ckpt_every is None else options.ckpt_every)
    hp["seed"] = int(options.seed)
    hp["jit_compile"] = bool(options.jit_compile)
    hp["task"] = task
    if task == "density":
        for flag in LABELLED_ONLY_OPTIONS:
            if getattr(options, flag) is not None:
                raise UsageError(f"--{flag} applies to --task=classification|hybrid only")
    else:
        crop = options.crop_padding
        if crop is None:
            crop = data.classification_augmentation(info.name)["crop_padding"]
        if crop >= min(info.image_shape[:2]):
            raise UsageError(
                f"--crop_padding must be smaller than the image height and width "
                f"{tuple(info.image_shape[:2])} of {info.name!r} (reflection padding), "
                f"got {crop}"
            )
        hp["crop_padding"] = int(crop)
        translate = float(options.translate or 0.0)
        if translate >= min(info.image_shape[:2]):
            raise UsageError(
                f"--translate must be smaller than the image height and width "
                f"{tuple(info.image_shape[:2])} of {info.name!r}, got {translate}"
            )
        hp["translate"] = translate
        hp["label_smoothing"] = float(options.label_smoothing or 0.0)
    if task == "hybrid":
        hp["hybrid_lambda"] = lam_text
        hp["hybrid_lambda_value"] = hybrid_lambda
    hp["dequantization"] = options.dequantization
    if options.dequantization != "uniform" and task != "density":
        raise UsageError(
            f"--dequantization={options.dequantization} is for --task=density (got --task={task})"
        )

    default_name = f"{info.name}_{preset_name}" + ("" if task == "density" else f"_{task}")
    run_name = options.run_name or default_name.replace("/", "_")
    run_dir = options.out or os.path.join("runs", run_name)
    export_dir = (
        options.export_dir
        if options.export_dir is not None
        else os.path.join("saved_models", run_name)
    )
    return RunSpec(
        dataset=info.name,
        preset=preset_name,
        run_name=run_name,
        run_dir=run_dir,
        export_dir=export_dir,
        flow=flow,
        hparams=hp,
        info=info,
    )
