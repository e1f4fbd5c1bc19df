"""FlowConfig: every architectural and estimator setting of an image flow,
versioned (:mod:`rflow_tf.config_versions`). The paper's presets live in
:mod:`rflow_tf.presets`; their names are also reachable here
(``from rflow_tf.config import PRESETS, get_preset``)."""

import dataclasses
import json
from typing import Optional, Tuple

import numpy as np

from rflow_tf import bijectors as rbij
from rflow_tf import classifier as rclf
from rflow_tf import layers as rlayers
from rflow_tf import norms as rnorms
from rflow_tf.config_versions import (  # noqa: F401  (names of the config's versions)
    CONFIG_VERSION,
    LEGACY_DEFAULTS,
    SAME_AS_LOGDET,
    check_config_version,
    legacy_defaults,
    with_version_defaults,
)
from rflow_tf.settings import Check, at_least, setting

_TUPLE_FIELDS = ("input_shape", "n_blocks", "fc_hidden")

#: The ``--help`` sections of train/main.py that hold the FlowConfig flags.
MODEL_FLAGS = "data and model"
LOGDET_FLAGS = "log-det estimator"

#: Kinds of flow block (:attr:`FlowConfig.block`).
BLOCK_TYPES = ("residual", "coupling", "flowpp")

#: Layers that map [0, 1] pixels to the flow's input (:attr:`FlowConfig.init_layer`).
INIT_LAYERS = ("logit", "cifar10")


@dataclasses.dataclass
class FlowConfig:
    """All settings of a :class:`ResidualFlow`; JSON round-trips exactly.

    Architecture:
      input_shape: (H, W, C) of one image.
      n_blocks: residual blocks per scale, e.g. (16, 16, 16); scales are
        separated by a 2x2 Squeeze, so H and W must be divisible by
        2**(len(n_blocks) - 1 + squeeze_first).
      hidden_channels: width h of each block g = [act] Conv_k1(C->h) act
        Conv_k2(h->h) act ... Conv_kL(h->C).
      kernels: kernel sizes of g's convolutions, "3-1-3" in the paper.
      activation: "lipswish" (paper), "elu", "softplus", "relu", "identity".
      coeff: Lipschitz bound c < 1 of every linear map (spectral norm, or
        the induced norm of ``vnorms``).
      vnorms: norm orders of every residual block's linear maps, one
        character per linear layer + 1 as the authors' ``--vnorms`` ('1'-'9',
        'f' = inf; "2222" for kernels "3-1-3"), first = last: layer i is
        normalised in ||W_i||_{p_i -> p_{i+1}} <= coeff, so each block is a
        contraction in ||.||_{p_0} (see :func:`rflow_tf.norms.chain_orders`;
        one order per layer or a string of equal orders also work). The same
        string serves the FC end's blocks, so a mixed string needs as many
        FC linear layers (len(fc_hidden) + 1) as convolutions. "2222" is the
        spectral norm (versions <= 3).
      learn_p: the orders are trainable (each block its own, tied along its
        chain, initialised at ``vnorms``, kept in [1.001, 5]).
      preactivation: apply the activation to the block's input first.
      actnorm: ActNorm after every block (and before the first block, see
        ``first_resblock``).
      first_resblock: the reference's ``--first-resblock`` (True in all its
        published models): an ActNorm before the first block of scale 0 (if
        ``actnorm``), and that block has no pre-activation (it sees the
        logit, or ActNorm, output directly). False: no ActNorm before the
        first block and every block pre-activated. (Version-1 configs:
        False, and the ActNorm before the first block was always there.)
      squeeze_first: squeeze the input once before the first scale (the
        reference uses it for ImageNet64 and CelebA-HQ).
      init: initialisation of fresh weights, "reference" (the authors' code:
        weights and biases of every Lipschitz layer U(+-1/sqrt(fan_in)),
        ActNorm's data init with the unbiased variance) or "glorot"
        (Glorot-uniform weights, zero biases, biased variance; version <= 2).
        Irrelevant once weights are trained or restored.
      squeeze_order: channel order of every squeeze, "reference" (out
        channel c*4 + 2*dy + dx, the authors' code) or "space_to_depth"
        ((2*dy + dx)*C + c); see :class:`rflow_tf.bijectors.Squeeze`. They
        differ as models only with ``factor_out``.
      factor_out: after each scale but the last, half of the channels go
        straight to the latent (standard normal); the rest continue.
      fc_end: fully connected residual blocks on the flattened last scale.
      n_fc_blocks, fc_hidden: number of FC blocks and their hidden widths
        (reference: 4 blocks, d -> 128 -> 128 -> d).
      logit_alpha: alpha of the logit transform (1e-6 MNIST, 0.05 otherwise).
      n_bits: bits per pixel of the data (8; 5 for CelebA-HQ).
      block: "residual" (invertible residual blocks, the paper's model),
        "flowpp" (Flow++ couplings, see below) or "coupling" (the paper's
        Table 4/5 baseline, built like the reference's:
        :class:`rflow_tf.bijectors.coupling.AffineCoupling` with scale
        sigmoid(s + 2) and an unconstrained ReLU net of ``kernels`` and
        ``hidden_channels``; checkerboard masks in scale 0 (the scale with
        the init layer), channel masks in later scales, the kept half
        alternating from mask "0" in every scale and continuing through the
        FC end, whose blocks are dense couplings with ``fc_hidden``). The
        estimator settings below only matter for residual blocks.
      invertible_1x1: a Glow invertible 1x1 convolution
        (:class:`rflow_tf.bijectors.invertible_conv.Invertible1x1Conv`, LU weights,
        exact log-det) before every block of every scale (not the FC end),
        the reference's ``--quadratic``.
      init_layer: the first layer, mapping pixels in [0, 1] to the flow:
        "logit" (:class:`rflow_tf.bijectors.LogitTransform` with
        ``logit_alpha``) or "cifar10" (per-channel normalisation
        :meth:`rflow_tf.classifier.ChannelNormalize.cifar10`, the
        reference's layer for CIFAR-10 classification and hybrid runs).
      n_classes: 0 (a density model) or the number of classes of the
        classifier heads (:class:`rflow_tf.classifier.ClassifierHeads`) read
        by :meth:`ResidualFlow.classify` / :meth:`ResidualFlow.log_prob_and_logits`.
      head_channels: output channels of each head's 3x3 convolution (paper: 256).
      head_pooling: how each head's map becomes a vector before the final
        Dense (:data:`rflow_tf.classifier.HEAD_POOLINGS`): "average" (global
        average pooling, the reference) or "flatten" (no pooling: the Dense
        sees every position; for tiny images, with a small ``head_channels``).
        A new field whose default is the old behaviour: configs written
        without it mean "average", so it needs no ``config_version`` bump.
      condition_classes: 0 (a density model p(x)) or the number of classes
        of a class-conditional flow p(x | y): the label y, embedded in
        ``condition_embedding`` dimensions (a Keras ``Embedding``), is the
        context of every residual block (``IResBlock.conv`` / ``dense`` with
        ``condition_size``; :meth:`ResidualFlow.log_prob` and
        :meth:`ResidualFlow.sample` then take ``label``). Residual blocks
        only. Configs written without it mean 0 (no config_version bump).
      condition_embedding: the size of the label embedding (with
        ``condition_classes``).

      Flow++ (``block="flowpp"``, Ho et al. 2019): each block is a
        :class:`rflow_tf.bijectors.mixlogcdf.MixLogCDFCoupling` (logistic-mixture CDF,
        exact log-det, bisection inverse) whose conditioner has
        ``hidden_channels`` channels and ``flowpp_conditioner_blocks`` gated
        conv (+ attention) blocks. Masks: checkerboard in scale 0; in later
        scales the first ``flowpp_channel_couplings`` blocks use channel
        masks, the rest checkerboard; the kept half alternates from block to
        block; FC-end blocks are vector couplings (alternating halves).
      flowpp_components: logistics K per element of every Flow++ coupling.
      flowpp_conditioner_blocks: gated residual (conv, attention) blocks of
        each Flow++ conditioner.
      flowpp_attention: self-attention in the Flow++ conditioners (False: the
        Flow++ "no self-attention" ablation).
      flowpp_heads: attention heads (must divide ``hidden_channels``).
      flowpp_channel_couplings: channel-mask couplings at the start of every
        scale after the first.

    Log-det estimator (see :class:`rflow_tf.bijectors.IResBlock`):
      logdet: "unbiased" (Russian roulette + Hutchinson), "truncated" or
        "exact" (full Jacobian; small inputs only).
      dist, rate, p: roulette distribution, "poisson" with ``rate`` (lambda)
        or "geometric" with ``p``.
      logdet_eval: the estimator of evaluation calls (``training=False``:
        test bits/dim, export, ``log_prob``); None (default) means "unbiased"
        when ``logdet`` is "truncated" (so an i-ResNet trained with the biased
        series reports its true bits/dim, as the reference does) and
        ``logdet`` otherwise. See :attr:`logdet_eval_mode`.
      n_exact_terms: terms always evaluated when training (paper: 2).
      n_exact_terms_eval: exact terms when evaluating (paper: 20).
      n_samples: roulette draws averaged per estimate; n_terms: terms of the
        "truncated" mode; probe: "gaussian" or "rademacher".
      neumann_grad: Neumann-series gradient of the log-det (Theorem 2).
      grad_in_forward: compute the log-det gradient in the forward pass (the
        reference's mode, eq. 9); the default False recomputes g in the
        backward pass and shares one backward pass with the path gradient,
        which is faster and keeps fewer activations (README, training step).
      inverse_tol, inverse_max_iterations: fixed-point inverse tolerance
        (absolute and relative) and iteration cap (used for sampling).
      dtype: "float32" or "float64".

    Versioning:
      config_version: the meaning of the config (:data:`CONFIG_VERSION` for
        a config made in code). A dict or JSON without this key is version 1,
        written before ``first_resblock`` and ``squeeze_order`` existed; its
        missing fields take the values of its version (:func:`legacy_defaults`),
        so an old config, run directory or SavedModel still builds the model
        it was trained as.

    Differences from the reference that remain (permutations, not models):
    the FC end flattens the last scale in (H, W, C) order (the reference:
    (C, H, W)), and the latent's factored parts are flattened the same way.
    A weight converter must permute the first FC kernel's input rows, the FC
    blocks' ActNorm vectors and the latent accordingly.

    Example:
    ```python
    cfg = FlowConfig(input_shape=(8, 8, 1), n_blocks=(2, 2), hidden_channels=32)
    assert FlowConfig.from_json(cfg.to_json()) == cfg
    cfg2 = cfg.replace(activation="elu")
    ```
    """

    # Every field is declared once, with its help and, for the fields that are flags
    # of train/main.py, its --help section and the check of flag values (flags
    # default to None there: the preset's value). The flags appear in field order.
    input_shape: Tuple[int, int, int] = setting(
        (28, 28, 1), flag=False, help="(H, W, C) of one image."
    )
    n_bits: int = setting(
        8,
        group=MODEL_FLAGS,
        check=Check(lambda v: 1 <= v <= 8, "in 1..8"),
        help="Bits per pixel (default: the dataset's, 5 for celeb_a_hq).",
    )
    n_blocks: Tuple[int, ...] = setting(
        (16, 16, 16),
        group=MODEL_FLAGS,
        help="Residual blocks per scale, e.g. 16-16-16 (default: preset).",
    )
    hidden_channels: int = setting(
        512,
        group=MODEL_FLAGS,
        check=at_least(1),
        help="Hidden channels of each block (default: preset).",
    )
    activation: str = setting(
        "lipswish",
        group=MODEL_FLAGS,
        choices=("lipswish", "elu", "softplus", "relu", "lcube"),
        help="Block activation (default: preset; lcube: the Lipschitz cube, "
        "1-Lipschitz in every p-norm like the others).",
    )
    factor_out: bool = setting(
        False,
        group=MODEL_FLAGS,
        help="Factor out half the channels after each scale (default: preset).",
    )
    fc_end: bool = setting(
        True, group=MODEL_FLAGS, help="Fully connected blocks on the last scale (default: preset)."
    )
    n_fc_blocks: int = setting(4, flag=False, help="Number of FC-end blocks.")
    logit_alpha: float = setting(
        1e-6,
        group=MODEL_FLAGS,
        help="alpha of the logit layer y = logit(alpha + (1 - 2 alpha) x) "
        "(default: preset; the reference: 1e-6 for MNIST, 0.05 otherwise).",
    )
    block: str = setting(
        "residual",
        group=MODEL_FLAGS,
        choices=BLOCK_TYPES,
        help="Flow blocks: residual (the paper's) or coupling (affine coupling "
        "baseline of Tables 4/5) (default: preset).",
    )
    invertible_1x1: bool = setting(
        False,
        group=MODEL_FLAGS,
        help="Invertible 1x1 convolution before every block (the reference's "
        "--quadratic) (default: preset).",
    )
    init_layer: str = setting(
        "logit",
        group=MODEL_FLAGS,
        choices=INIT_LAYERS,
        help="First layer: logit, or cifar10 per-channel normalisation. Default: "
        "cifar10 for classification/hybrid on CIFAR-10 (as the reference), "
        "else the preset's.",
    )
    fc_hidden: Tuple[int, ...] = setting(
        (128, 128),
        group=MODEL_FLAGS,
        help="Hidden widths of the FC-end blocks, e.g. 128-128 (default: preset).",
    )
    kernels: str = setting(
        "3-1-3",
        group=MODEL_FLAGS,
        help="Kernel sizes of each block's convolutions, e.g. 3-1-3 (default: preset).",
    )
    coeff: float = setting(
        0.98,
        group=MODEL_FLAGS,
        help="Lipschitz bound (< 1) of every linear map in a block (paper: 0.98).",
    )
    vnorms: str = setting(
        "2222",
        group=MODEL_FLAGS,
        help="Norm orders of each block's linear maps, one per linear layer + 1 "
        "('f' = inf), first = last, e.g. 2222 or 2f12 for kernels 3-1-3: layer i is "
        "normalised in ||W||_{p_i->p_{i+1}} (default: preset, 2222 = spectral norm).",
    )
    learn_p: bool = setting(
        False,
        group=MODEL_FLAGS,
        help="Learn the norm orders (initialised at --vnorms, kept in [1.001, 5]; "
        "logged to TensorBoard as norm_order/*) (default: preset, false).",
    )
    preactivation: bool = setting(
        True, flag=False, help="Apply the activation to each block's input first."
    )
    actnorm: bool = setting(
        True, group=MODEL_FLAGS, help="ActNorm after every block (default: preset)."
    )
    first_resblock: bool = setting(
        True,
        group=MODEL_FLAGS,
        help="The reference's first block: ActNorm before it and no pre-activation "
        "(default: preset; the paper's models use it).",
    )
    squeeze_first: bool = setting(
        False,
        group=MODEL_FLAGS,
        help="Squeeze the input before the first scale (default: preset).",
    )
    squeeze_order: str = setting(
        "reference", flag=False, help="Channel order of every squeeze: reference or space_to_depth."
    )
    init: str = setting(
        "reference",
        group=MODEL_FLAGS,
        choices=("reference", "glorot"),
        help="Initialisation of fresh weights (default: preset; 'reference' as the authors' code).",
    )
    n_classes: int = setting(
        0, flag=False, help="0 (a density model) or the number of classes of the classifier heads."
    )
    condition_classes: int = setting(
        0,
        flag=False,
        help="0 (a density model) or the number of classes of a class-conditional flow.",
    )
    condition_embedding: int = setting(
        32, flag=False, help="Size of the label embedding of a class-conditional flow."
    )
    head_channels: int = setting(
        256,
        group=MODEL_FLAGS,
        check=at_least(1),
        help="Classification/hybrid: output channels of each classifier head's 3x3 "
        "convolution (default: preset, 256 as the paper).",
    )
    head_pooling: str = setting(
        "average",
        group=MODEL_FLAGS,
        choices=rclf.HEAD_POOLINGS,
        help="Classification/hybrid: average (global average pooling of each head, the "
        "reference) or flatten (no pooling; for tiny images, with a small "
        "--head_channels) (default: preset, average).",
    )
    flowpp_components: int = setting(
        4, flag=False, help="Logistics per element of every Flow++ coupling."
    )
    flowpp_conditioner_blocks: int = setting(
        2, flag=False, help="Gated residual blocks of each Flow++ conditioner."
    )
    flowpp_attention: bool = setting(
        True, flag=False, help="Self-attention in the Flow++ conditioners."
    )
    flowpp_heads: int = setting(4, flag=False, help="Attention heads of the Flow++ conditioners.")
    flowpp_channel_couplings: int = setting(
        2, flag=False, help="Channel-mask couplings at the start of every scale after the first."
    )
    n_exact_terms: int = setting(
        2,
        group=LOGDET_FLAGS,
        check=at_least(0),
        help="Power-series terms always evaluated when training (paper: 2; 8 for "
        "celeb_a_hq). Evaluation always uses 20.",
    )
    logdet: str = setting(
        "unbiased",
        group=LOGDET_FLAGS,
        choices=("unbiased", "truncated", "exact"),
        help="Log-det estimator of the residual blocks: unbiased (Russian roulette, "
        "the paper), truncated (first --n_terms terms, i-ResNet; biased) or "
        "exact (full Jacobian, tiny images only) (default: preset).",
    )
    n_terms: int = setting(
        5, group=LOGDET_FLAGS, help="Terms of the truncated estimator (default: preset)."
    )
    logdet_eval: Optional[str] = setting(
        None,
        group=LOGDET_FLAGS,
        choices=("unbiased", "truncated", "exact"),
        help="Evaluation log-det estimator (default: unbiased when --logdet is "
        "truncated, else the same as --logdet); test bits/dim use it.",
    )
    dist: str = setting(
        "poisson",
        group=LOGDET_FLAGS,
        choices=("poisson", "geometric"),
        help="Russian-roulette distribution of the number of extra terms.",
    )
    rate: float = setting(
        2.0, group=LOGDET_FLAGS, help="Poisson rate of the roulette (--dist=poisson; paper: 2)."
    )
    p: float = setting(
        0.5,
        group=LOGDET_FLAGS,
        help="Success probability in (0, 1) of the geometric roulette (--dist=geometric).",
    )
    n_samples: int = setting(
        1,
        group=LOGDET_FLAGS,
        help="Roulette draws averaged per estimate (default: preset, 1).",
    )
    n_exact_terms_eval: int = setting(
        20, flag=False, help="Power-series terms always evaluated when evaluating."
    )
    probe: str = setting("gaussian", flag=False, help="Hutchinson probe: gaussian or rademacher.")
    neumann_grad: bool = setting(
        True,
        group=LOGDET_FLAGS,
        help="Neumann-series gradient of the log-det (memory does not grow "
        "with the number of terms).",
    )
    grad_in_forward: bool = setting(
        False,
        group=LOGDET_FLAGS,
        help="Compute the log-det gradient during the forward pass (needs --neumann_grad).",
    )
    inverse_tol: float = setting(
        1e-5, flag=False, help="Tolerance (absolute and relative) of the fixed-point inverse."
    )
    inverse_max_iterations: int = setting(
        1000, flag=False, help="Iteration cap of the fixed-point inverse."
    )
    dtype: str = setting("float32", flag=False, help="float32 or float64.")
    config_version: int = setting(
        CONFIG_VERSION, flag=False, help="The meaning of the config (see legacy_defaults)."
    )

    def __post_init__(self):
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))

    # ------------------------------------------------------------ validation
    @property
    def n_scales(self):
        """Number of scales, len(n_blocks)."""
        return len(self.n_blocks)

    @property
    def logdet_eval_mode(self):
        """The evaluation estimator: ``logdet_eval``, or if None "unbiased" for a
        "truncated" ``logdet`` and ``logdet`` itself otherwise.

        Example: ``FlowConfig(logdet="truncated").logdet_eval_mode  # "unbiased"``.
        """
        if self.logdet_eval is not None:
            return self.logdet_eval
        return "unbiased" if self.logdet == "truncated" else self.logdet

    @property
    def num_dims(self):
        """D = H * W * C."""
        h, w, c = self.input_shape
        return int(h * w * c)

    def validate(self):
        """Raises ValueError/TypeError with a clear message if a setting is invalid;
        returns ``self``.

        Example: ``FlowConfig(input_shape=(7, 7, 1), n_blocks=(1, 1)).validate()``
        raises because 7 is not divisible by 2.
        """

        def pos_int(name, v, allow_zero=False):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"FlowConfig.{name} must be an int, got {v!r}")
            if v < 0 or (v == 0 and not allow_zero):
                raise ValueError(
                    f"FlowConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}"
                )

        def one_of(name, choices):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"FlowConfig.{name} must be one of {choices}, got {getattr(self, name)!r}"
                )

        if not isinstance(self.input_shape, tuple) or len(self.input_shape) != 3:
            raise ValueError(f"FlowConfig.input_shape must be (H, W, C), got {self.input_shape!r}")
        for v in self.input_shape:
            pos_int("input_shape", v)
        if not isinstance(self.n_blocks, tuple) or not self.n_blocks:
            raise ValueError(
                f"FlowConfig.n_blocks must be a non-empty tuple, got {self.n_blocks!r}"
            )
        for v in self.n_blocks:
            pos_int("n_blocks", v)
        check_config_version(self.config_version)
        h, w, c = self.input_shape
        n_squeeze = self.n_scales - 1 + int(bool(self.squeeze_first))
        if h % (2**n_squeeze) or w % (2**n_squeeze):
            raise ValueError(
                f"FlowConfig: input {h}x{w} cannot be squeezed {n_squeeze} times "
                f"({self.n_scales} scales, squeeze_first={self.squeeze_first}); H and W must "
                f"be divisible by {2**n_squeeze}"
            )
        pos_int("hidden_channels", self.hidden_channels)
        try:
            ks = [int(k) for k in str(self.kernels).split("-")]
        except ValueError:
            ks = []
        if not ks or any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(
                f"FlowConfig.kernels must look like '3-1-3' (odd sizes), got {self.kernels!r}"
            )
        one_of("init", rlayers.INITS)
        one_of("squeeze_order", rbij.SQUEEZE_ORDERS)
        for name in (
            "preactivation",
            "actnorm",
            "first_resblock",
            "squeeze_first",
            "invertible_1x1",
            "flowpp_attention",
            "learn_p",
        ):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"FlowConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.activation not in rlayers.IMAGE_ACTIVATIONS:
            why = (
                " ('fullsort' and 'maxmin' are for dense toy nets: they are not "
                "elementwise, so image blocks would lose their explicit Jacobian factors)"
                if self.activation in rlayers.ACTIVATIONS
                else ""
            )
            raise ValueError(
                f"FlowConfig.activation must be one of {rlayers.IMAGE_ACTIVATIONS}, "
                f"got {self.activation!r}{why}"
            )
        self._check_vnorms(len(ks))
        if not 0.0 < float(self.coeff) < 1.0:
            raise ValueError(
                f"FlowConfig.coeff must lie in (0, 1) for invertibility, got {self.coeff}"
            )
        pos_int("n_fc_blocks", self.n_fc_blocks, allow_zero=True)
        if not isinstance(self.fc_hidden, tuple):
            raise ValueError(f"FlowConfig.fc_hidden must be a tuple, got {self.fc_hidden!r}")
        for v in self.fc_hidden:
            pos_int("fc_hidden", v)
        if not 0.0 <= float(self.logit_alpha) < 0.5:
            raise ValueError(f"FlowConfig.logit_alpha must lie in [0, 0.5), got {self.logit_alpha}")
        pos_int("n_bits", self.n_bits)
        one_of("block", BLOCK_TYPES)
        one_of("init_layer", INIT_LAYERS)
        if self.init_layer == "cifar10" and c != len(rclf.CIFAR10_MEAN):
            raise ValueError(
                f"FlowConfig.init_layer='cifar10' normalises 3 (RGB) channels; the input has {c}"
            )
        pos_int("n_classes", self.n_classes, allow_zero=True)
        if self.n_classes == 1:
            raise ValueError("FlowConfig.n_classes must be 0 (no classifier) or >= 2, got 1")
        pos_int("condition_classes", self.condition_classes, allow_zero=True)
        pos_int("condition_embedding", self.condition_embedding)
        if self.condition_classes == 1:
            raise ValueError(
                "FlowConfig.condition_classes must be 0 (unconditional) or >= 2, got 1"
            )
        if self.condition_classes and self.n_classes:
            raise ValueError(
                "FlowConfig.condition_classes (a class-conditional flow) and n_classes "
                "(classifier heads) cannot both be set"
            )
        if self.condition_classes and self.block != "residual":
            raise ValueError(
                "FlowConfig.condition_classes needs block='residual' (conditional residual "
                f"blocks), got block={self.block!r}"
            )
        pos_int("head_channels", self.head_channels)
        one_of("head_pooling", rclf.HEAD_POOLINGS)
        if self.block == "coupling":
            last_c = c * (4**n_squeeze) // (2 ** (self.n_scales - 1) if self.factor_out else 1)
            d_last = (h // 2**n_squeeze) * (w // 2**n_squeeze) * last_c
            if self.fc_end and self.n_fc_blocks and d_last % 2:
                raise ValueError(
                    f"FlowConfig: coupling FC blocks split the flattened last "
                    f"scale in halves; its size {d_last} is odd"
                )
        pos_int("flowpp_components", self.flowpp_components)
        pos_int("flowpp_conditioner_blocks", self.flowpp_conditioner_blocks, allow_zero=True)
        pos_int("flowpp_heads", self.flowpp_heads)
        pos_int("flowpp_channel_couplings", self.flowpp_channel_couplings, allow_zero=True)
        if (
            self.block == "flowpp"
            and self.flowpp_attention
            and self.hidden_channels % self.flowpp_heads
        ):
            raise ValueError(
                f"FlowConfig.flowpp_heads={self.flowpp_heads} must divide "
                f"hidden_channels={self.hidden_channels}"
            )
        if self.n_bits > 8:
            raise ValueError(f"FlowConfig.n_bits must be in 1..8, got {self.n_bits}")
        one_of("logdet", rbij.LOGDET_MODES)
        if self.logdet_eval is not None and self.logdet_eval not in rbij.LOGDET_MODES:
            raise ValueError(
                f"FlowConfig.logdet_eval must be None or one of "
                f"{rbij.LOGDET_MODES}, got {self.logdet_eval!r}"
            )
        if self.dist not in ("poisson", "geometric"):
            raise ValueError(f"FlowConfig.dist must be 'poisson' or 'geometric', got {self.dist!r}")
        if not float(self.rate) > 0:
            raise ValueError(f"FlowConfig.rate must be > 0, got {self.rate}")
        if not 0.0 < float(self.p) < 1.0:
            raise ValueError(f"FlowConfig.p must lie in (0, 1), got {self.p}")
        pos_int("n_exact_terms", self.n_exact_terms, allow_zero=True)
        pos_int("n_exact_terms_eval", self.n_exact_terms_eval, allow_zero=True)
        pos_int("n_samples", self.n_samples)
        pos_int("n_terms", self.n_terms)
        if self.probe not in ("gaussian", "rademacher"):
            raise ValueError(
                f"FlowConfig.probe must be 'gaussian' or 'rademacher', got {self.probe!r}"
            )
        if self.grad_in_forward and not self.neumann_grad:
            raise ValueError("FlowConfig.grad_in_forward=True requires neumann_grad=True")
        if not float(self.inverse_tol) > 0:
            raise ValueError(f"FlowConfig.inverse_tol must be > 0, got {self.inverse_tol}")
        pos_int("inverse_max_iterations", self.inverse_max_iterations)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"FlowConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        return self

    def _check_vnorms(self, n_conv_layers):
        if not isinstance(self.vnorms, str) or not self.vnorms:
            raise TypeError(
                f"FlowConfig.vnorms must be a non-empty string like '2222', got {self.vnorms!r}"
            )
        if self.block != "residual":
            if self.learn_p or set(self.vnorms) != {"2"}:
                raise ValueError(
                    f"FlowConfig.vnorms={self.vnorms!r} / learn_p={self.learn_p} apply to "
                    f"residual blocks only; block={self.block!r} has no Lipschitz layers"
                )
            return
        branches = [("kernels", self.kernels, n_conv_layers)]
        if self.fc_end and self.n_fc_blocks:
            branches.append(("fc_hidden", self.fc_hidden, len(self.fc_hidden) + 1))
        low, high = rnorms.LEARNABLE_ORDER_RANGE
        for name, value, n in branches:
            try:
                pairs = rnorms.chain_orders(self.vnorms, n)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"FlowConfig.vnorms={self.vnorms!r} does not fit the {n} linear layers of "
                    f"{name}={value!r}: {e}"
                ) from None
            if self.learn_p and not all(low < p < high for p, _ in pairs):
                raise ValueError(
                    f"FlowConfig.learn_p: the orders of vnorms={self.vnorms!r} are the initial "
                    f"values of learnable orders and must lie in ({low}, {high}); "
                    "'1' and 'f' cannot be learned"
                )

    # --------------------------------------------------------- serialisation
    def to_dict(self):
        """Plain dict of JSON types (tuples become lists).

        Example: ``FlowConfig.from_dict(cfg.to_dict()) == cfg``.
        """
        d = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d):
        """Builds a config from a dict (as written by :meth:`to_dict`); unknown
        keys raise a ValueError listing the valid ones. Missing keys take
        their defaults *of the dict's* ``config_version`` (missing: version
        1, whose defaults are the values before they changed).

        Example: ``FlowConfig.from_dict({"input_shape": [8, 8, 1], "n_blocks": [2, 2]})``
        is a version-1 config (``first_resblock=False``, space_to_depth squeeze).
        """
        if not isinstance(d, dict):
            raise TypeError(f"FlowConfig.from_dict expects a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"Unknown FlowConfig keys {unknown}; valid keys: {names}")
        return cls(**with_version_defaults(d, cls.logdet))

    def to_json(self, indent=2):
        """JSON text of :meth:`to_dict`.

        Example: ``open("config.json", "w").write(cfg.to_json())``.
        """
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Inverse of :meth:`to_json`.

        Example: ``cfg = FlowConfig.from_json(open("config.json").read())``.
        """
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated).

        Example: ``get_preset("mnist").replace(n_exact_terms=4)``.
        """
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def coerce(cls, config):
        """Accepts a FlowConfig, a dict, JSON text, a preset name or None
        (default config) and returns a validated FlowConfig (a copy).

        Example: ``FlowConfig.coerce("tiny")``.
        """
        if config is None:
            cfg = cls()
        elif isinstance(config, cls):
            cfg = dataclasses.replace(config)
        elif isinstance(config, dict):
            cfg = cls.from_dict(config)
        elif isinstance(config, str):
            if config.lstrip().startswith("{"):
                cfg = cls.from_json(config)
            else:
                from rflow_tf.presets import get_preset  # the presets are built from FlowConfig

                cfg = get_preset(config)
        else:
            raise TypeError(
                f"config must be a FlowConfig, dict, JSON string or preset name; "
                f"got {type(config).__name__}"
            )
        return cfg.validate()


def __getattr__(name):  # the presets (rflow_tf.presets), built from FlowConfig, on first use
    if name in ("Preset", "PRESETS", "get_preset", "get_preset_training", "preset_for_dataset"):
        from rflow_tf import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
