"""The paper's architectures and the reference's training defaults for them
(:data:`PRESETS`, :func:`get_preset`, :func:`preset_for_dataset`), and small
presets for a CPU."""

import dataclasses
from typing import Optional

from rflow_tf.config import FlowConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named architecture plus the reference's training defaults for it.

    Fields: ``config`` (:class:`FlowConfig`), ``dataset`` (the dataset it was
    designed for), ``batch_size`` (global), ``accumulate`` (gradient
    accumulation steps per optimiser step), ``lr``, ``warmup_steps``,
    ``epochs`` or ``steps`` (training length; ``steps`` wins if both set),
    ``ema_decay``, ``grad_clip``, ``eval_every``, ``sample_every``,
    ``description``.

    Example:
    ```python
    p = PRESETS["celeb_a_hq"]
    p.batch_size, p.accumulate, p.config.n_bits    # 8, 5, 5
    ```
    """

    name: str
    config: FlowConfig
    dataset: str
    batch_size: int = 64
    accumulate: int = 1
    lr: float = 1e-3
    warmup_steps: int = 1000
    epochs: Optional[float] = None
    steps: Optional[int] = None
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    eval_every: int = 1000
    sample_every: int = 1000
    description: str = ""

    def training_defaults(self):
        """The training fields as a dict (everything but name/config/description)."""
        d = dataclasses.asdict(self)
        for k in ("name", "config", "description"):
            d.pop(k)
        return d


def _paper(name, dataset, description, **cfg_kwargs):
    train_kwargs = {
        k: cfg_kwargs.pop(k)
        for k in list(cfg_kwargs)
        if k
        in (
            "batch_size",
            "accumulate",
            "lr",
            "warmup_steps",
            "epochs",
            "steps",
            "ema_decay",
            "grad_clip",
            "eval_every",
            "sample_every",
        )
    }
    train_kwargs.setdefault("epochs", 1000)
    return Preset(
        name=name,
        config=FlowConfig(**cfg_kwargs).validate(),
        dataset=dataset,
        description=description,
        **train_kwargs,
    )


PRESETS = {
    # ---- the paper's architectures (reference defaults; Appendix E) ----
    "mnist": _paper(
        "mnist",
        "mnist",
        "Paper MNIST model: 3 scales of 16 blocks, 512 channels, FC end.",
        input_shape=(28, 28, 1),
        n_blocks=(16, 16, 16),
        logit_alpha=1e-6,
    ),
    "cifar10": _paper(
        "cifar10",
        "cifar10",
        "Paper CIFAR-10 model: 3 scales of 16 blocks, 512 channels, FC end.",
        input_shape=(32, 32, 3),
        n_blocks=(16, 16, 16),
        logit_alpha=0.05,
    ),
    "imagenet32": _paper(
        "imagenet32",
        "imagenet32",
        "Paper ImageNet32 model: 3 scales of 32 blocks.",
        input_shape=(32, 32, 3),
        n_blocks=(32, 32, 32),
        logit_alpha=0.05,
        epochs=20,
    ),
    "imagenet64": _paper(
        "imagenet64",
        "imagenet64",
        "Paper ImageNet64 model: squeeze first, 3 scales of 32 blocks, factor-out.",
        input_shape=(64, 64, 3),
        n_blocks=(32, 32, 32),
        logit_alpha=0.05,
        squeeze_first=True,
        factor_out=True,
        epochs=20,
    ),
    "celeb_a_hq": _paper(
        "celeb_a_hq",
        "celeb_a_hq",
        "Paper CelebA-HQ 256 model: 5-bit, ELU, squeeze first, 6 scales of 16 blocks, "
        "factor-out, no FC end, 8 exact terms, batch 8 x 5 accumulation.",
        input_shape=(256, 256, 3),
        n_blocks=(16,) * 6,
        logit_alpha=0.05,
        n_bits=5,
        activation="elu",
        squeeze_first=True,
        factor_out=True,
        fc_end=False,
        n_exact_terms=8,
        batch_size=8,
        accumulate=5,
    ),
    # The reference publishes no command for CelebA 64x64 5-bit: these are the
    # defaults its train_img.py applies to --data celeba_5bit (64x64, 5 bits,
    # logit alpha 0.05, flips; LipSwish, 3 scales of 16 blocks, FC end, batch 64).
    "celeba_5bit": _paper(
        "celeba_5bit",
        "celeba_5bit",
        "The reference's CelebA-HQ 64x64 5-bit model (train_img.py --data celeba_5bit, "
        "its defaults): 3 scales of 16 blocks, 512 channels, LipSwish, FC end, 5-bit.",
        input_shape=(64, 64, 3),
        n_blocks=(16, 16, 16),
        logit_alpha=0.05,
        n_bits=5,
    ),
    # ---- small presets for a CPU ----
    "digits_small": Preset(
        name="digits_small",
        dataset="digits",
        description="CPU model for the 8x8 sklearn digits: 2 scales of 2 blocks, 32 channels, "
        "2 FC blocks. Trains in a few minutes on 2 cores.",
        config=FlowConfig(
            input_shape=(8, 8, 1),
            n_blocks=(2, 2),
            hidden_channels=32,
            n_fc_blocks=2,
            fc_hidden=(64, 64),
            logit_alpha=1e-6,
        ).validate(),
        batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        steps=1200,
        ema_decay=0.99,
        eval_every=400,
        sample_every=400,
    ),
    # ---- Flow++ (block="flowpp") ----
    "flowpp_cifar10": Preset(
        name="flowpp_cifar10",
        dataset="cifar10",
        description="Flow++ CIFAR-10 structure (Ho et al. 2019): 4 checkerboard MixLogCDF "
        "couplings at 32x32x3, squeeze, 2 channel + 3 checkerboard couplings at "
        "16x16x12; 32 logistics, conditioners of 10 gated conv + 4-head attention "
        "blocks with 96 channels; ActNorm after each coupling; no factor-out, no "
        "FC end. Train with --dequantization=variational.",
        config=FlowConfig(
            input_shape=(32, 32, 3),
            n_blocks=(4, 5),
            hidden_channels=96,
            block="flowpp",
            flowpp_components=32,
            flowpp_conditioner_blocks=10,
            flowpp_heads=4,
            flowpp_channel_couplings=2,
            fc_end=False,
            logit_alpha=0.05,
        ).validate(),
        batch_size=64,
        lr=1e-3,
        warmup_steps=2000,
        epochs=400,
        eval_every=1000,
        sample_every=5000,
    ),
    "flowpp_digits": Preset(
        name="flowpp_digits",
        dataset="digits",
        description="Small Flow++ for the 8x8 digits: 4 checkerboard couplings at 8x8x1, "
        "squeeze, 2 channel + 2 checkerboard couplings at 4x4x4; 4 logistics, "
        "conditioners of 1 gated conv + 4-head attention block with 32 channels.",
        config=FlowConfig(
            input_shape=(8, 8, 1),
            n_blocks=(4, 4),
            hidden_channels=32,
            block="flowpp",
            flowpp_components=4,
            flowpp_conditioner_blocks=1,
            flowpp_heads=4,
            flowpp_channel_couplings=2,
            fc_end=False,
            logit_alpha=1e-6,
        ).validate(),
        batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        steps=1200,
        ema_decay=0.99,
        eval_every=400,
        sample_every=400,
    ),
    "tiny": Preset(
        name="tiny",
        dataset="digits",
        description="Smallest useful model (tests, smoke runs): 2 scales of 1 block, 8 channels, "
        "1 FC block.",
        config=FlowConfig(
            input_shape=(8, 8, 1),
            n_blocks=(1, 1),
            hidden_channels=8,
            n_fc_blocks=1,
            fc_hidden=(16,),
            logit_alpha=1e-6,
        ).validate(),
        batch_size=16,
        lr=1e-3,
        warmup_steps=10,
        steps=20,
        ema_decay=0.9,
        eval_every=20,
        sample_every=20,
    ),
}


_DATASET_PRESET = {
    "digits": "digits_small",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "svhn_cropped": "cifar10",
    "celeb_a_hq": "celeb_a_hq",
    "celeb_a_hq/256": "celeb_a_hq",
    "celeba_5bit": "celeba_5bit",
    "imagenet32": "imagenet32",
    "imagenet64": "imagenet64",
}


def _check_preset_name(name):
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; valid presets: {sorted(PRESETS)}")


def get_preset(name, **overrides):
    """A fresh copy of preset ``name``'s :class:`FlowConfig`, with ``overrides``.

    Presets: ``mnist``, ``cifar10``, ``imagenet32``, ``imagenet64``,
    ``celeb_a_hq`` (the paper's), ``celeba_5bit`` (the reference's CelebA
    64x64 5-bit defaults), ``digits_small``, ``tiny`` (CPU).

    Example:
    ```python
    from rflow_tf.models import ResidualFlow
    from rflow_tf.presets import get_preset

    cfg = get_preset("cifar10", n_exact_terms=4)     # the preset's FlowConfig, one field replaced
    assert cfg.input_shape == (32, 32, 3) and cfg.n_exact_terms == 4
    flow = ResidualFlow(get_preset("tiny"))          # weights are created on first use
    assert flow.flow_config == get_preset("tiny")
    ```
    """
    _check_preset_name(name)
    cfg = dataclasses.replace(PRESETS[name].config)
    return cfg.replace(**overrides) if overrides else cfg


def get_preset_training(name):
    """Training defaults of preset ``name`` as a dict (batch_size, accumulate,
    lr, warmup_steps, epochs, steps, ema_decay, grad_clip, eval_every,
    sample_every, dataset).

    Args:
      name: a preset name (a key of :data:`PRESETS`).

    Returns:
      A new dict.

    Raises:
      ValueError: an unknown preset name.

    Example:
    ```python
    from rflow_tf.presets import get_preset_training

    training = get_preset_training("celeb_a_hq")  # the paper's CelebA-HQ 256 run
    assert training["dataset"] == "celeb_a_hq" and training["accumulate"] == 5
    assert training["batch_size"] * training["accumulate"] == 40  # the paper's batch
    ```
    """
    _check_preset_name(name)
    return PRESETS[name].training_defaults()


def preset_for_dataset(dataset):
    """The default preset name for a dataset name (``digits`` -> ``digits_small``,
    ``svhn_cropped`` -> ``cifar10``, ...).

    Args:
      dataset: a dataset name (case and surrounding spaces ignored).

    Returns:
      A preset name.

    Raises:
      ValueError: no preset for the dataset.

    Example:
    ```python
    from rflow_tf.presets import preset_for_dataset

    assert preset_for_dataset("mnist") == "mnist" and preset_for_dataset("digits") == "digits_small"
    assert preset_for_dataset("svhn_cropped") == "cifar10"
    ```
    """
    key = str(dataset).strip().lower()
    if key not in _DATASET_PRESET:
        raise ValueError(
            f"No default preset for dataset {dataset!r}; pass a preset "
            f"explicitly (one of {sorted(PRESETS)})"
        )
    return _DATASET_PRESET[key]
