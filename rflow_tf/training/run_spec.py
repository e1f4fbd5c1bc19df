"""The resolution of a run: the :class:`rflow_tf.models.FlowConfig` a run of
:class:`~rflow_tf.training.TrainingOptions` trains (:func:`flow_config_for`), and
the :class:`RunSpec` with its typed :class:`RunSettings` that :func:`resolve_run`
builds from the options, the preset and the dataset (model, settings, run and
export directories)."""

import dataclasses
import math
import os
import types
import warnings
from typing import Optional

import numpy as np

from rflow_tf import classifier as rclf
from rflow_tf import data, models
from rflow_tf.training.options import (
    CLASSIFIER_TASKS,
    LABELLED_ONLY_OPTIONS,
    TASKS,
    TrainingOptions,
    UsageError,
    check_flags,
)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The training settings of a run, resolved from its :class:`TrainingOptions`
    and its preset by :func:`resolve_run`: what the trainer reads, and (as
    :meth:`to_dict`) the ``"training"`` part of the run's config.json.

    ``steps`` is the training length (from ``steps``, else ``epochs``, else the
    preset's), ``ckpt_every`` defaults to ``eval_every``. Classification and
    hybrid runs also have ``crop_padding``, ``translate`` and
    ``label_smoothing``; hybrid runs ``hybrid_lambda`` (its text, "1" or
    "1/D" say) and ``hybrid_lambda_value`` (its number). The rest are None.

    Example:
    ```python
    settings = resolve_run(None, TrainingOptions(preset="tiny")).settings
    settings.batch_size, settings.steps      # 16, 20
    ```
    """

    batch_size: int
    accumulate: int
    lr: float
    warmup_steps: int
    steps: int
    ema_decay: float
    grad_clip: float
    eval_every: int
    sample_every: int
    ckpt_every: int
    seed: int
    jit_compile: bool
    task: str
    dequantization: str
    crop_padding: Optional[int] = None
    translate: Optional[float] = None
    label_smoothing: Optional[float] = None
    hybrid_lambda: Optional[str] = None
    hybrid_lambda_value: Optional[float] = None

    def to_dict(self):
        """The settings as config.json's ``"training"`` dict (those a task lacks left out).

        Example: ``"hybrid_lambda" in settings.to_dict()  # only for hybrid runs``.
        """
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class RunSpec:
    """Everything a run needs, resolved from the options and the preset.

    ``flow``: the :class:`rflow_tf.models.FlowConfig` (input shape and bits
    from the dataset); ``settings``: the :class:`RunSettings` (``hparams``:
    them as a dict); ``run_dir``, ``export_dir``.

    Example:
    ```python
    spec = resolve_run(None, TrainingOptions(dataset="mnist"))
    spec.settings.batch_size, spec.flow.n_blocks, spec.run_dir
    ```
    """

    dataset: str
    preset: str
    run_name: str
    run_dir: str
    export_dir: str
    flow: models.FlowConfig
    settings: RunSettings
    info: data.ImageDatasetInfo

    @property
    def hparams(self):
        """The training settings as a dict (:meth:`RunSettings.to_dict`).

        Example: ``spec.hparams["batch_size"] == spec.settings.batch_size``.
        """
        return self.settings.to_dict()

    def config_json(self):
        """The contents of config.json.

        Example: ``json.dumps(spec.config_json(), sort_keys=True)``.
        """
        return {
            "dataset": self.dataset,
            "preset": self.preset,
            "run_name": self.run_name,
            "flow_config": self.flow.to_dict(),
            "training": self.hparams,
        }


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
    if options.task == "conditional":
        changes["condition_classes"] = int(info.n_classes)
    elif options.task != "density":
        changes["n_classes"] = int(info.n_classes)
        if overrides.get("init_layer") is None and info.name == "cifar10":
            changes["init_layer"] = "cifar10"  # the reference's choice
    if changes.get("neumann_grad") is False and overrides.get("grad_in_forward") is None:
        changes["grad_in_forward"] = False
    try:
        return preset.config.replace(**changes)
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid model configuration: {e}") from None


def _augmentation(options, info):
    """The augmentation settings of a classification or hybrid run of ``options`` on
    dataset ``info`` (crop_padding, translate, label_smoothing); {} for density runs,
    which refuse them (UsageError)."""
    if options.task not in CLASSIFIER_TASKS:
        for flag in LABELLED_ONLY_OPTIONS:
            if getattr(options, flag) is not None:
                raise UsageError(f"--{flag} applies to --task=classification|hybrid only")
        return {}
    crop = options.crop_padding
    if crop is None:
        crop = data.classification_augmentation(info.name)["crop_padding"]
    if crop >= min(info.image_shape[:2]):
        raise UsageError(
            f"--crop_padding must be smaller than the image height and width "
            f"{tuple(info.image_shape[:2])} of {info.name!r} (reflection padding), "
            f"got {crop}"
        )
    translate = float(options.translate or 0.0)
    if translate >= min(info.image_shape[:2]):
        raise UsageError(
            f"--translate must be smaller than the image height and width "
            f"{tuple(info.image_shape[:2])} of {info.name!r}, got {translate}"
        )
    return {
        "crop_padding": int(crop),
        "translate": translate,
        "label_smoothing": float(options.label_smoothing or 0.0),
    }


def resolve_run(config, options):
    """Builds the :class:`RunSpec` of a run of ``config`` (a FlowConfig, or
    None for :func:`flow_config_for` ``(options)``) with ``options``: the
    dataset, the preset (the dataset's when none is named), the model, the
    settings, the run and export directories.

    Args:
      config: a :class:`~rflow_tf.config.FlowConfig`, or None.
      options: a :class:`TrainingOptions`.

    Returns:
      A :class:`RunSpec`.

    Raises:
      UsageError: inconsistent settings (e.g. a config of another image shape).
      TypeError: ``options`` or ``config`` of the wrong type.

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.training import TrainingOptions, UsageError, resolve_run

    spec = resolve_run(None, TrainingOptions(dataset="mnist"))  # the mnist preset's run
    assert spec.preset == "mnist" and spec.flow.input_shape == (28, 28, 1)
    assert spec.settings.batch_size == 64 and spec.run_dir == "runs/mnist_mnist"
    try:
        resolve_run(FlowConfig(input_shape=(8, 8, 1)), TrainingOptions(dataset="mnist"))
    except UsageError as error:
        assert "is not the shape (28, 28, 1) of 'mnist' images" in str(error)
    else:
        raise AssertionError("a model of 8x8 images was accepted for mnist")
    ```
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
    if task == "conditional" and flow.condition_classes != info.n_classes:
        raise UsageError(
            f"--task=conditional on {info.name!r} needs config.condition_classes="
            f"{info.n_classes}, got {flow.condition_classes}"
        )
    if task in CLASSIFIER_TASKS and flow.n_classes != info.n_classes:
        raise UsageError(
            f"--task={task} on {info.name!r} needs config.n_classes="
            f"{info.n_classes}, got {flow.n_classes}"
        )

    preset_values = preset.training_defaults()
    hp = {
        key: preset_values[key] if getattr(options, key) is None else getattr(options, key)
        for key in (
            "batch_size",
            "accumulate",
            "lr",
            "warmup_steps",
            "ema_decay",
            "grad_clip",
            "eval_every",
            "sample_every",
        )
    }
    # The options were checked by check_flags(); the presets' values are valid.
    if options.steps is not None:
        steps = int(options.steps)
    elif options.epochs is not None or preset.steps is None:
        epochs = options.epochs if options.epochs is not None else preset.epochs
        steps = int(math.ceil(float(epochs) * info.n_train / (hp["batch_size"] * hp["accumulate"])))
    else:
        steps = int(preset.steps)
    hp["steps"] = steps
    hp["ckpt_every"] = int(hp["eval_every"] if options.ckpt_every is None else options.ckpt_every)
    hp["seed"] = int(options.seed)
    hp["jit_compile"] = bool(options.jit_compile)
    hp["task"] = task
    hp.update(_augmentation(options, info))
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
        settings=RunSettings(**hp),
        info=info,
    )
