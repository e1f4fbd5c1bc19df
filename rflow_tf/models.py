"""Multiscale Residual Flow image models (Chen et al. 2019, Section 5 / Appendix E).

Contents
--------
* :class:`FlowConfig` -- every architectural and estimator setting of an image
  flow, as a dataclass that round-trips through JSON.
* :data:`PRESETS` / :func:`get_preset` -- the paper's architectures (``mnist``,
  ``cifar10``, ``imagenet32``, ``imagenet64``, ``celeb_a_hq``) and small
  presets that train in minutes on a CPU (``digits_small``, ``tiny``), each
  with the reference's training defaults (:class:`Preset`).
* :class:`FactorOut` -- a TFP bijector that sends half of the channels
  straight to the latent and runs the rest of the flow on the other half.
* :class:`ResidualFlow` -- a Keras 3 model holding the whole flow, with
  ``log_prob``, ``bits_per_dim``, ``sample``, ``.bijector`` and
  ``.distribution()``.

Architecture (data -> latent; every piece is a bijector whose ``forward`` is
the data -> latent direction, see :mod:`rflow_tf.bijectors`)::

    x in [0, 1]^(H x W x C)           (dequantised pixels)
    LogitTransform(alpha)             y = logit(alpha + (1 - 2 alpha) x)
    [Squeeze]                         only if squeeze_first
    [ActNorm]                         only if first_resblock (and actnorm)
    scale 0:  (IResBlock.conv -> ActNorm) x n_blocks[0]
                                      (with first_resblock, block 0 is not
                                      pre-activated)
              Squeeze                 (H, W, C) -> (H/2, W/2, 4C), channel
                                      c*4 + 2*dy + dx as the reference
              [FactorOut]             half the channels -> latent (if factor_out)
    scale 1:  ...
    last scale: (IResBlock.conv -> ActNorm) x n_blocks[-1]
              flatten to a vector of size d
              [(IResBlock.dense -> ActNorm) x n_fc_blocks]   (the "FC end")
    z in R^D, D = H * W * C, base density N(0, I)

Variants (:class:`FlowConfig`): ``block="coupling"`` replaces every residual
block by an affine coupling (:mod:`rflow_tf.coupling`; exact log-det),
``invertible_1x1`` puts a Glow 1x1 convolution before every block of every
scale, ``init_layer="cifar10"`` replaces the logit by per-channel
normalisation, and ``n_classes`` adds classifier heads
(:class:`rflow_tf.classifier.ClassifierHeads`) on each scale's output (the
squeezed output, or with factor-out the factored half) and on the final
output (:meth:`ResidualFlow.classify`, :meth:`ResidualFlow.log_prob_and_logits`).

Change of variables, with the log-dets of all pieces (including the logit):

    log p(x) = log N(f(x); 0, I) + sum_pieces log |det J_piece|
    bits/dim = -(log p(x) - D n_bits ln 2) / (D ln 2)

where ``x`` is uniformly dequantised (:func:`rflow_tf.data.dequantize`), so
``D n_bits ln 2`` converts the density on [0, 1]^D into a likelihood of the
discrete n-bit pixels.

Latent layout: a flat vector of size D. Without factor-out it is the output of
the last stage. With factor-out it is ``[factored_0, factored_1, ...,
final]``, each factored part flattened in (h, w, c) order. The authors'
PyTorch code flattens (c, h, w) instead, in the latent and before the FC end;
that is a fixed permutation (the same model once weights are permuted), the
one remaining layout difference from the reference (see :class:`FlowConfig`).

Example:
```python
import tensorflow as tf
from rflow_tf import data, models

cfg = models.get_preset("digits_small")
flow = models.ResidualFlow(cfg)
x = data.dequantize(next(iter(data.load_image_dataset("digits", "train", 64))), 8)
flow.initialize(x)                      # data-dependent ActNorm init
bpd = flow.bits_per_dim(x)              # [64]
imgs = flow.sample(16, temperature=0.8, seed=[1, 2])   # [16, 8, 8, 1] in [0, 1]
```
"""

import dataclasses
import json
import math
import sys
import warnings
from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import bijectors as rbij
from rflow_tf import classifier as rclf
from rflow_tf import coupling as rcoup
from rflow_tf import data as rdata
from rflow_tf import invertible_conv as rinv
from rflow_tf import layers as rlayers
from rflow_tf import mixlogcdf as rmix

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "FlowConfig",
    "BLOCK_TYPES",
    "INIT_LAYERS",
    "CONFIG_VERSION",
    "LEGACY_DEFAULTS",
    "legacy_defaults",
    "Preset",
    "PRESETS",
    "get_preset",
    "get_preset_training",
    "preset_for_dataset",
    "FlowBijector",
    "FactorOut",
    "FlowDistribution",
    "ResidualFlow",
    "FlowLayer",
]

_PACKAGE = "rflow_tf"
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

_TUPLE_FIELDS = ("input_shape", "n_blocks", "fc_hidden")
#: Kinds of flow block (:attr:`FlowConfig.block`).
BLOCK_TYPES = ("residual", "coupling", "flowpp")
#: Layers that map [0, 1] pixels to the flow's input (:attr:`FlowConfig.init_layer`).
INIT_LAYERS = ("logit", "cifar10")

#: Version of :class:`FlowConfig`'s meaning. A config (dict/JSON) written
#: without ``config_version`` is version 1; its missing fields take the
#: version-1 values below, so models saved before a default changed load and
#: train exactly as they were built.
CONFIG_VERSION = 3
#: Fields whose default changed, with their value up to each older version:
#: version 2 brought the reference's first block (``first_resblock``) and
#: squeeze order, version 3 the reference's initialisation (``init``) and
#: a separate evaluation estimator (``logdet_eval``; before, evaluation used
#: the training estimator, written here as :data:`SAME_AS_LOGDET`).
SAME_AS_LOGDET = "same_as_logdet"
LEGACY_DEFAULTS = {
    1: {"first_resblock": False, "squeeze_order": "space_to_depth"},
    2: {"init": "glorot", "logdet_eval": SAME_AS_LOGDET},
}


def legacy_defaults(version):
    """The values a config of ``version`` gives the fields it does not name
    (every field whose default changed after ``version``).

    Example: ``legacy_defaults(1)["init"]  # "glorot"``.
    """
    out = {}
    for old, defaults in LEGACY_DEFAULTS.items():
        if version <= old:
            out.update(defaults)
    return out



def _check_config_version(version):
    if (isinstance(version, bool) or not isinstance(version, (int, np.integer))
            or not 1 <= version <= CONFIG_VERSION):
        raise ValueError(f"FlowConfig.config_version must be an int in 1..{CONFIG_VERSION} "
                         f"(the versions this rflow_tf knows), got {version!r}; a newer "
                         f"version was written by a newer rflow_tf")


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
      coeff: Lipschitz bound c < 1 of every linear map (spectral norm).
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
        Table 4/5 baseline, built like the reference's: :class:`rflow_tf.coupling.AffineCoupling` with scale
        sigmoid(s + 2) and an unconstrained ReLU net of ``kernels`` and
        ``hidden_channels``; checkerboard masks in scale 0 (the scale with
        the init layer), channel masks in later scales, the kept half
        alternating from mask "0" in every scale and continuing through the
        FC end, whose blocks are dense couplings with ``fc_hidden``). The
        estimator settings below only matter for residual blocks.
      invertible_1x1: a Glow invertible 1x1 convolution
        (:class:`rflow_tf.invertible_conv.Invertible1x1Conv`, LU weights,
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

      Flow++ (``block="flowpp"``, Ho et al. 2019): each block is a
        :class:`rflow_tf.mixlogcdf.MixLogCDFCoupling` (logistic-mixture CDF,
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

    input_shape: Tuple[int, int, int] = (28, 28, 1)
    n_blocks: Tuple[int, ...] = (16, 16, 16)
    hidden_channels: int = 512
    kernels: str = "3-1-3"
    activation: str = "lipswish"
    coeff: float = 0.98
    preactivation: bool = True
    actnorm: bool = True
    first_resblock: bool = True
    squeeze_first: bool = False
    squeeze_order: str = "reference"
    init: str = "reference"
    factor_out: bool = False
    fc_end: bool = True
    n_fc_blocks: int = 4
    fc_hidden: Tuple[int, ...] = (128, 128)
    logit_alpha: float = 1e-6
    n_bits: int = 8
    block: str = "residual"
    invertible_1x1: bool = False
    init_layer: str = "logit"
    n_classes: int = 0
    head_channels: int = 256
    flowpp_components: int = 4
    flowpp_conditioner_blocks: int = 2
    flowpp_attention: bool = True
    flowpp_heads: int = 4
    flowpp_channel_couplings: int = 2
    logdet: str = "unbiased"
    logdet_eval: Optional[str] = None
    dist: str = "poisson"
    rate: float = 2.0
    p: float = 0.5
    n_exact_terms: int = 2
    n_exact_terms_eval: int = 20
    n_samples: int = 1
    n_terms: int = 5
    probe: str = "gaussian"
    neumann_grad: bool = True
    grad_in_forward: bool = False
    inverse_tol: float = 1e-5
    inverse_max_iterations: int = 1000
    dtype: str = "float32"
    config_version: int = CONFIG_VERSION

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
                raise ValueError(f"FlowConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, "
                                 f"got {v}")

        if not isinstance(self.input_shape, tuple) or len(self.input_shape) != 3:
            raise ValueError(f"FlowConfig.input_shape must be (H, W, C), got {self.input_shape!r}")
        for v in self.input_shape:
            pos_int("input_shape", v)
        if not isinstance(self.n_blocks, tuple) or not self.n_blocks:
            raise ValueError(
                f"FlowConfig.n_blocks must be a non-empty tuple, got {self.n_blocks!r}")
        for v in self.n_blocks:
            pos_int("n_blocks", v)
        _check_config_version(self.config_version)
        h, w, c = self.input_shape
        n_squeeze = self.n_scales - 1 + int(bool(self.squeeze_first))
        if h % (2 ** n_squeeze) or w % (2 ** n_squeeze):
            raise ValueError(
                f"FlowConfig: input {h}x{w} cannot be squeezed {n_squeeze} times "
                f"({self.n_scales} scales, squeeze_first={self.squeeze_first}); H and W must "
                f"be divisible by {2 ** n_squeeze}")
        pos_int("hidden_channels", self.hidden_channels)
        try:
            ks = [int(k) for k in str(self.kernels).split("-")]
        except ValueError:
            ks = []
        if not ks or any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"FlowConfig.kernels must look like '3-1-3' (odd sizes), "
                             f"got {self.kernels!r}")
        if self.init not in rlayers.INITS:
            raise ValueError(f"FlowConfig.init must be one of {rlayers.INITS}, got {self.init!r}")
        if self.squeeze_order not in rbij.SQUEEZE_ORDERS:
            raise ValueError(f"FlowConfig.squeeze_order must be one of {rbij.SQUEEZE_ORDERS}, "
                             f"got {self.squeeze_order!r}")
        for name in ("preactivation", "actnorm", "first_resblock", "squeeze_first",
                     "invertible_1x1", "flowpp_attention"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"FlowConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.activation not in rlayers.ACTIVATIONS:
            raise ValueError(f"FlowConfig.activation must be one of {rlayers.ACTIVATIONS}, "
                             f"got {self.activation!r}")
        if not 0.0 < float(self.coeff) < 1.0:
            raise ValueError(f"FlowConfig.coeff must lie in (0, 1) for invertibility, "
                             f"got {self.coeff}")
        pos_int("n_fc_blocks", self.n_fc_blocks, allow_zero=True)
        if not isinstance(self.fc_hidden, tuple):
            raise ValueError(f"FlowConfig.fc_hidden must be a tuple, got {self.fc_hidden!r}")
        for v in self.fc_hidden:
            pos_int("fc_hidden", v)
        if not 0.0 <= float(self.logit_alpha) < 0.5:
            raise ValueError(f"FlowConfig.logit_alpha must lie in [0, 0.5), got {self.logit_alpha}")
        pos_int("n_bits", self.n_bits)
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"FlowConfig.block must be one of {BLOCK_TYPES}, got {self.block!r}")
        if self.init_layer not in INIT_LAYERS:
            raise ValueError(f"FlowConfig.init_layer must be one of {INIT_LAYERS}, "
                             f"got {self.init_layer!r}")
        if self.init_layer == "cifar10" and c != len(rclf.CIFAR10_MEAN):
            raise ValueError(f"FlowConfig.init_layer='cifar10' normalises 3 (RGB) channels; the "
                             f"input has {c}")
        pos_int("n_classes", self.n_classes, allow_zero=True)
        if self.n_classes == 1:
            raise ValueError("FlowConfig.n_classes must be 0 (no classifier) or >= 2, got 1")
        pos_int("head_channels", self.head_channels)
        if self.block == "coupling":
            last_c = c * (4 ** n_squeeze) // (2 ** (self.n_scales - 1) if self.factor_out else 1)
            d_last = (h // 2 ** n_squeeze) * (w // 2 ** n_squeeze) * last_c
            if self.fc_end and self.n_fc_blocks and d_last % 2:
                raise ValueError(f"FlowConfig: coupling FC blocks split the flattened last "
                                 f"scale in halves; its size {d_last} is odd")
        pos_int("flowpp_components", self.flowpp_components)
        pos_int("flowpp_conditioner_blocks", self.flowpp_conditioner_blocks, allow_zero=True)
        pos_int("flowpp_heads", self.flowpp_heads)
        pos_int("flowpp_channel_couplings", self.flowpp_channel_couplings, allow_zero=True)
        if (self.block == "flowpp" and self.flowpp_attention
                and self.hidden_channels % self.flowpp_heads):
            raise ValueError(f"FlowConfig.flowpp_heads={self.flowpp_heads} must divide "
                             f"hidden_channels={self.hidden_channels}")
        if self.n_bits > 8:
            raise ValueError(f"FlowConfig.n_bits must be in 1..8, got {self.n_bits}")
        if self.logdet not in rbij.LOGDET_MODES:
            raise ValueError(f"FlowConfig.logdet must be one of {rbij.LOGDET_MODES}, "
                             f"got {self.logdet!r}")
        if self.logdet_eval is not None and self.logdet_eval not in rbij.LOGDET_MODES:
            raise ValueError(f"FlowConfig.logdet_eval must be None or one of "
                             f"{rbij.LOGDET_MODES}, got {self.logdet_eval!r}")
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
            raise ValueError(f"FlowConfig.probe must be 'gaussian' or 'rademacher', "
                             f"got {self.probe!r}")
        if self.grad_in_forward and not self.neumann_grad:
            raise ValueError("FlowConfig.grad_in_forward=True requires neumann_grad=True")
        if not float(self.inverse_tol) > 0:
            raise ValueError(f"FlowConfig.inverse_tol must be > 0, got {self.inverse_tol}")
        pos_int("inverse_max_iterations", self.inverse_max_iterations)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"FlowConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        return self

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
        d = dict(d)
        version = d.setdefault("config_version", 1)
        _check_config_version(version)
        for name, value in legacy_defaults(version).items():
            if value == SAME_AS_LOGDET:
                value = d.get("logdet", cls.logdet)
            d.setdefault(name, value)
        return cls(**d)

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
            cfg = cls.from_json(config) if config.lstrip().startswith("{") else get_preset(config)
        else:
            raise TypeError(f"config must be a FlowConfig, dict, JSON string or preset name; "
                            f"got {type(config).__name__}")
        return cfg.validate()


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------


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
    train_kwargs = {k: cfg_kwargs.pop(k) for k in list(cfg_kwargs)
                    if k in ("batch_size", "accumulate", "lr", "warmup_steps", "epochs", "steps",
                             "ema_decay", "grad_clip", "eval_every", "sample_every")}
    train_kwargs.setdefault("epochs", 1000)
    return Preset(name=name, config=FlowConfig(**cfg_kwargs).validate(), dataset=dataset,
                  description=description, **train_kwargs)


PRESETS = {
    # ---- the paper's architectures (reference defaults; Appendix E) ----
    "mnist": _paper(
        "mnist", "mnist", "Paper MNIST model: 3 scales of 16 blocks, 512 channels, FC end.",
        input_shape=(28, 28, 1), n_blocks=(16, 16, 16), logit_alpha=1e-6),
    "cifar10": _paper(
        "cifar10", "cifar10", "Paper CIFAR-10 model: 3 scales of 16 blocks, 512 channels, FC end.",
        input_shape=(32, 32, 3), n_blocks=(16, 16, 16), logit_alpha=0.05),
    "imagenet32": _paper(
        "imagenet32", "imagenet32", "Paper ImageNet32 model: 3 scales of 32 blocks.",
        input_shape=(32, 32, 3), n_blocks=(32, 32, 32), logit_alpha=0.05, epochs=20),
    "imagenet64": _paper(
        "imagenet64", "imagenet64",
        "Paper ImageNet64 model: squeeze first, 3 scales of 32 blocks, factor-out.",
        input_shape=(64, 64, 3), n_blocks=(32, 32, 32), logit_alpha=0.05, squeeze_first=True,
        factor_out=True, epochs=20),
    "celeb_a_hq": _paper(
        "celeb_a_hq", "celeb_a_hq",
        "Paper CelebA-HQ 256 model: 5-bit, ELU, squeeze first, 6 scales of 16 blocks, "
        "factor-out, no FC end, 8 exact terms, batch 8 x 5 accumulation.",
        input_shape=(256, 256, 3), n_blocks=(16,) * 6, logit_alpha=0.05, n_bits=5,
        activation="elu", squeeze_first=True, factor_out=True, fc_end=False, n_exact_terms=8,
        batch_size=8, accumulate=5),
    # ---- small presets for a CPU ----
    "digits_small": Preset(
        name="digits_small", dataset="digits",
        description="CPU model for the 8x8 sklearn digits: 2 scales of 2 blocks, 32 channels, "
                    "2 FC blocks. Trains in a few minutes on 2 cores.",
        config=FlowConfig(input_shape=(8, 8, 1), n_blocks=(2, 2), hidden_channels=32,
                          n_fc_blocks=2, fc_hidden=(64, 64), logit_alpha=1e-6).validate(),
        batch_size=64, lr=2e-3, warmup_steps=100, steps=1200, ema_decay=0.99,
        eval_every=400, sample_every=400),
    # ---- Flow++ (block="flowpp") ----
    "flowpp_cifar10": Preset(
        name="flowpp_cifar10", dataset="cifar10",
        description="Flow++ CIFAR-10 structure (Ho et al. 2019): 4 checkerboard MixLogCDF "
                    "couplings at 32x32x3, squeeze, 2 channel + 3 checkerboard couplings at "
                    "16x16x12; 32 logistics, conditioners of 10 gated conv + 4-head attention "
                    "blocks with 96 channels; ActNorm after each coupling; no factor-out, no "
                    "FC end. Train with --dequantization=variational.",
        config=FlowConfig(input_shape=(32, 32, 3), n_blocks=(4, 5), hidden_channels=96,
                          block="flowpp", flowpp_components=32, flowpp_conditioner_blocks=10,
                          flowpp_heads=4, flowpp_channel_couplings=2, fc_end=False,
                          logit_alpha=0.05).validate(),
        batch_size=64, lr=1e-3, warmup_steps=2000, epochs=400, eval_every=1000,
        sample_every=5000),
    "flowpp_digits": Preset(
        name="flowpp_digits", dataset="digits",
        description="Small Flow++ for the 8x8 digits: 4 checkerboard couplings at 8x8x1, "
                    "squeeze, 2 channel + 2 checkerboard couplings at 4x4x4; 4 logistics, "
                    "conditioners of 1 gated conv + 4-head attention block with 32 channels.",
        config=FlowConfig(input_shape=(8, 8, 1), n_blocks=(4, 4), hidden_channels=32,
                          block="flowpp", flowpp_components=4, flowpp_conditioner_blocks=1,
                          flowpp_heads=4, flowpp_channel_couplings=2, fc_end=False,
                          logit_alpha=1e-6).validate(),
        batch_size=64, lr=2e-3, warmup_steps=100, steps=1200, ema_decay=0.99,
        eval_every=400, sample_every=400),
    "tiny": Preset(
        name="tiny", dataset="digits",
        description="Smallest useful model (tests, smoke runs): 2 scales of 1 block, 8 channels, "
                    "1 FC block.",
        config=FlowConfig(input_shape=(8, 8, 1), n_blocks=(1, 1), hidden_channels=8,
                          n_fc_blocks=1, fc_hidden=(16,), logit_alpha=1e-6).validate(),
        batch_size=16, lr=1e-3, warmup_steps=10, steps=20, ema_decay=0.9,
        eval_every=20, sample_every=20),
}

_DATASET_PRESET = {
    "digits": "digits_small",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "svhn_cropped": "cifar10",
    "celeb_a_hq": "celeb_a_hq",
    "celeb_a_hq/256": "celeb_a_hq",
    "imagenet32": "imagenet32",
    "imagenet64": "imagenet64",
}


def _check_preset_name(name):
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; valid presets: {sorted(PRESETS)}")


def get_preset(name, **overrides):
    """A fresh copy of preset ``name``'s :class:`FlowConfig`, with ``overrides``.

    Presets: ``mnist``, ``cifar10``, ``imagenet32``, ``imagenet64``,
    ``celeb_a_hq`` (the paper's), ``digits_small``, ``tiny`` (CPU).

    Example:
    ```python
    cfg = get_preset("cifar10", n_exact_terms=4)
    flow = ResidualFlow(cfg)
    ```
    """
    _check_preset_name(name)
    cfg = dataclasses.replace(PRESETS[name].config)
    return cfg.replace(**overrides) if overrides else cfg


def get_preset_training(name):
    """Training defaults of preset ``name`` as a dict (batch_size, accumulate,
    lr, warmup_steps, epochs, steps, ema_decay, grad_clip, eval_every,
    sample_every, dataset).

    Example: ``get_preset_training("celeb_a_hq")["accumulate"]  # 5``.
    """
    _check_preset_name(name)
    return PRESETS[name].training_defaults()


def preset_for_dataset(dataset):
    """The default preset name for a dataset name (``digits`` -> ``digits_small``,
    ``svhn_cropped`` -> ``cifar10``, ...).

    Example: ``preset_for_dataset("mnist")  # "mnist"``.
    """
    key = str(dataset).strip().lower()
    if key not in _DATASET_PRESET:
        raise ValueError(f"No default preset for dataset {dataset!r}; pass a preset "
                         f"explicitly (one of {sorted(PRESETS)})")
    return _DATASET_PRESET[key]


# ----------------------------------------------------------------------------
# Bijectors for the multiscale structure
# ----------------------------------------------------------------------------


def _as_seed(seed, salt):
    """A stateless int32 seed of shape [2] from None/int/int32/int64 seeds."""
    if seed is not None and not isinstance(seed, int):
        seed = tf.convert_to_tensor(seed)
        if seed.dtype != tf.int32:
            if not seed.dtype.is_integer:
                raise TypeError(f"seed must be an integer tensor of shape [2], got {seed.dtype}")
            seed = tf.cast(seed, tf.int32)
    return tfp.random.sanitize_seed(seed, salt=salt)


def check_pixels(x, owner, name="x", values=True):
    """Returns the float tensor ``x`` of images after checking that its batch is
    not empty and (``values=True``) that every pixel is finite and in [0, 1]:
    a ValueError naming ``owner`` and ``name`` eagerly, an assertion
    (``InvalidArgumentError`` with the same message) in graphs. The one place
    for these checks (:class:`ResidualFlow` and :func:`rflow_tf.load`'s
    distribution use it).

    Example: ``x = check_pixels(tf.zeros([2, 8, 8, 1]), "my_flow")``.
    """
    if x.shape.num_elements() == 0:
        raise ValueError(f"{owner}: {name} is an empty batch (shape {x.shape}); pass at least "
                         "one image")
    if not values:
        return x
    if tf.executing_eagerly():
        xv = x.numpy()
        if not np.all(np.isfinite(xv)):
            raise ValueError(f"{owner}: {name} contains NaN or Inf")
        if xv.min() < 0.0 or xv.max() > 1.0:
            raise ValueError(f"{owner}: {name} must lie in [0, 1] (dequantised pixels), got "
                             f"values in [{xv.min():.4g}, {xv.max():.4g}]")
        return x
    x = tf.debugging.assert_all_finite(x, f"{owner}: {name} contains NaN or Inf")
    in_range = f"{owner}: {name} must lie in [0, 1] (dequantised pixels)"
    with tf.control_dependencies([
            tf.debugging.assert_greater_equal(x, tf.zeros([], x.dtype), message=in_range),
            tf.debugging.assert_less_equal(x, tf.ones([], x.dtype), message=in_range)]):
        return tf.identity(x)


def check_sample_args(sample_shape, seed, owner):
    """Checks ``sample(sample_shape, seed)`` arguments before any work:
    ``sample_shape`` a positive int, a list of them or ``()`` (``2.5``,
    ``-1``, ``0`` and ``True`` raise), ``seed`` None, an int or an integer
    stateless seed of shape [2]. Symbolic tensors (inside a ``tf.function``)
    are checked as far as their static shape and dtype allow. Raises a
    ValueError naming ``owner``.

    Example: ``check_sample_args(16, [1, 2], "flow")``.
    """
    value = tf.get_static_value(sample_shape) if tf.is_tensor(sample_shape) else sample_shape
    if value is not None:
        try:
            shape = np.asarray(value)
        except (TypeError, ValueError):
            shape = None
        if shape is None or shape.ndim > 1 or shape.dtype == bool or \
                not np.issubdtype(shape.dtype, np.integer) or np.any(shape < 1):
            raise ValueError(f"{owner}: the sample shape must be a positive int (or a list of "
                             f"them), got {sample_shape!r}")
    if seed is None or isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return
    if tf.is_tensor(seed) and tf.get_static_value(seed) is None:
        if not seed.dtype.is_integer or seed.shape.rank != 1 or seed.shape[0] not in (2, None):
            raise ValueError(f"{owner}: seed must be a stateless seed of two ints, got a "
                             f"{seed.dtype.name} tensor of shape {seed.shape}")
        return
    rbij._check_stateless_seed(seed, f"{owner}: seed")  # pylint: disable=protected-access


def _iter_stages(stages):
    """All pieces in application order, descending into FactorOut."""
    for b in stages:
        yield b
        if isinstance(b, FactorOut):
            yield from _iter_stages(b.stages)


class FlowBijector(rbij._EqualOnlyToItself, tfb.Bijector):  # pylint: disable=protected-access
    """A sequence of bijectors (``stages``, in data -> latent order) run as one
    TFP bijector, in a single pass.

    forward:  x -> z = s_n(... s_2(s_1(x)))
    log |det dz/dx| = sum_i log |det ds_i/dx_i|     (x_i the input of stage i)
    inverse:  z -> s_1^-1(... s_n^-1(z))

    Unlike ``tfb.Chain``, the log-det pass runs every stage exactly once
    (residual blocks through :meth:`rflow_tf.bijectors.IResBlock.forward_and_log_det`),
    ActNorm pieces use their layers directly, and :class:`FactorOut` stages
    are entered recursively so one seed is split over *all* residual blocks.
    Results are never cached (they depend on changing weights and random
    log-det estimates).

    Call kwargs: ``seed`` (stateless seed, shape [2]; each residual block
    gets its own split) and ``training`` (estimator settings: training or
    evaluation). Any number of leading batch dimensions is accepted.

    Example:
    ```python
    from rflow_tf.bijectors import IResBlock, ActNorm
    stages = [IResBlock.conv((8, 8, 2), 16), ActNorm((8, 8, 2))]
    flow = FlowBijector(stages, event_shape=(8, 8, 2))
    z, ld = flow.forward_and_log_det(x, seed=[1, 2])
    ld2 = flow.forward_log_det_jacobian(x, event_ndims=3, seed=[1, 2])   # same
    ```
    """

    _cache = rbij._FreshBijectorCache()  # pylint: disable=protected-access
    _takes_flow_kwargs = True       # rflow_tf.bijectors.flow_kwargs routes seed/training here

    def __init__(self, stages, event_shape, validate_args=False, name="flow"):
        parameters = dict(locals())
        self.stages = list(stages)
        self.event_shape_in = tuple(int(d) for d in event_shape)
        s = tf.TensorShape(self.event_shape_in)
        for b in self.stages:
            s = b.forward_event_shape(s)
        if not s.is_fully_defined():
            raise ValueError(f"{name}: could not infer the output event shape of the stages "
                             f"from input event shape {self.event_shape_in}")
        self.event_shape_out = tuple(int(d) for d in s)
        self._blocks = [b for b in _iter_stages(self.stages) if isinstance(b, rbij.IResBlock)]
        super().__init__(forward_min_event_ndims=len(self.event_shape_in),
                         inverse_min_event_ndims=len(self.event_shape_out),
                         validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    @property
    def iresblocks(self):
        """All residual blocks (also inside FactorOut stages), in order."""
        return list(self._blocks)

    # ------------------------------------------------------------- walking
    def _walk(self, stages, x, seeds, counter, mode, training, features=None):
        """x: [N, *event]. mode: "logdet" (value and log-det), "forward"
        (value only) or "init" (value only, initialising ActNorm layers).
        ``features``: None, or ``(ids, out)``: the output of every stage whose
        id is in ``ids`` (for a FactorOut: its factored half) is appended to
        the list ``out``, in order."""
        total = tf.zeros([tf.shape(x)[0]], x.dtype) if mode == "logdet" else None
        for b in stages:
            ld = None
            if isinstance(b, rbij.IResBlock):
                if mode == "logdet":
                    x, ld = b.forward_and_log_det(x, seed=seeds[counter[0]], training=training)
                else:
                    x = b.forward(x, training=training)
                counter[0] += 1
            elif isinstance(b, rbij.ActNorm):
                if mode == "init":
                    b.initialize(x)
                if mode == "logdet":
                    ld = b.log_det(x.dtype)
                x = b.layer(x)
            elif isinstance(b, FactorOut):
                keep, out = b.split(x)
                if features is not None and id(b) in features[0]:
                    features[1].append(out)
                z_inner, ld = self._walk(b.stages, keep, seeds, counter, mode, training,
                                         features)
                x = b.merge(out, z_inner)
            elif isinstance(b, (rcoup.AffineCoupling, rmix.MixLogCDFCoupling)):
                # One net evaluation for the value and the log-det.
                if mode == "logdet":
                    x, ld = b.forward_and_log_det(x)
                else:
                    x = b.forward(x)
            else:
                if mode == "logdet":
                    ld = b.forward_log_det_jacobian(x, event_ndims=x.shape.rank - 1)
                x = b.forward(x)
                if features is not None and id(b) in features[0]:
                    features[1].append(x)
            if ld is not None:
                total += ld
        return x, total

    def _flatten_batch(self, x):
        x = tf.convert_to_tensor(x)
        nd = len(self.event_shape_in)
        if x.shape.rank is None or x.shape.rank < nd or \
                tuple(x.shape[x.shape.rank - nd:]) != self.event_shape_in:
            raise ValueError(f"{self.name}: expected inputs of event shape "
                             f"{self.event_shape_in}, got shape {x.shape}")
        batch_shape = tf.shape(x)[:tf.rank(x) - nd]
        return tf.reshape(x, (-1,) + self.event_shape_in), batch_shape

    def _block_seeds(self, seed):
        """One seed per residual block; without a seed each block uses its own
        ``default_seed`` (random when that is None)."""
        if seed is None:
            return [None] * len(self._blocks)
        seed = _as_seed(seed, "FlowBijector")
        return tfp.random.split_seed(seed, max(len(self._blocks), 1))

    def forward_and_log_det(self, x, seed=None, training=False):
        """``(z, log |det dz/dx|)`` in one pass; the log-det has x's batch shape.

        Example: ``z, ld = flow.forward_and_log_det(x, seed=[0, 1], training=True)``.
        """
        xf, batch_shape = self._flatten_batch(x)
        z, ld = self._walk(self.stages, xf, self._block_seeds(seed), [0], "logdet", training)
        z = tf.reshape(z, tf.concat([batch_shape, self.event_shape_out], 0))
        return z, tf.reshape(ld, batch_shape)

    def initialize(self, x, feature_stages=()):
        """Runs the forward pass once, initialising every ActNorm from its input
        (no-op for those already initialised); returns the feature maps of
        ``feature_stages`` (see :meth:`forward_with_features`).

        Example: ``flow.initialize(first_batch)``.
        """
        return self.forward_with_features(x, feature_stages, mode="init")[2]

    def forward_with_features(self, x, feature_stages, mode="forward", seed=None,
                              training=False):
        """``(z, log-det or None, features)`` for x [N, *event] in one pass:
        ``features`` are the outputs of the stages in ``feature_stages`` (for
        a :class:`FactorOut`, its factored half, before flattening), in flow
        order. ``mode``: "forward" (no log-det is computed: ``None``),
        "logdet" (the log-det [N], as :meth:`forward_and_log_det`) or "init"
        (forward, initialising ActNorm layers).

        Example: ``z, _, [h] = flow.forward_with_features(x, [squeeze])``.
        """
        if mode not in ("forward", "logdet", "init"):
            raise ValueError(f"mode must be 'forward', 'logdet' or 'init', got {mode!r}")
        xf, _ = self._flatten_batch(x)
        out = []
        seeds = self._block_seeds(seed) if mode == "logdet" else None
        z, ld = self._walk(self.stages, xf, seeds, [0], mode, training,
                           ({id(b) for b in feature_stages}, out))
        return z, ld, out

    def _forward(self, x, seed=None, training=False):
        xf, batch_shape = self._flatten_batch(x)
        z, _ = self._walk(self.stages, xf, None, [0], "forward", training)
        return tf.reshape(z, tf.concat([batch_shape, self.event_shape_out], 0))

    def _forward_log_det_jacobian(self, x, seed=None, training=False):
        return self.forward_and_log_det(x, seed=seed, training=training)[1]

    def _inverse_walk(self, stages, z):
        for b in reversed(stages):
            if isinstance(b, FactorOut):
                d = b.factored_dim
                keep = self._inverse_walk(b.stages, z[..., d:])
                z = b.unmerge(z[..., :d], keep)
            else:
                z = b.inverse(z)
        return z

    def _inverse(self, z, seed=None, training=False):
        nd = len(self.event_shape_out)
        batch_shape = tf.shape(z)[:tf.rank(z) - nd]
        zf = tf.reshape(z, (-1,) + self.event_shape_out)
        x = self._inverse_walk(self.stages, zf)
        return tf.reshape(x, tf.concat([batch_shape, self.event_shape_in], 0))

    # -------------------------------------------------------------- shapes
    def _forward_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[:s.rank - len(self.event_shape_in)].concatenate(self.event_shape_out)

    def _inverse_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[:s.rank - len(self.event_shape_out)].concatenate(self.event_shape_in)

    def _forward_event_shape_tensor(self, s):
        n = tf.size(s) - len(self.event_shape_in)
        return tf.concat([s[:n], tf.constant(self.event_shape_out, s.dtype)], 0)

    def _inverse_event_shape_tensor(self, s):
        n = tf.size(s) - len(self.event_shape_out)
        return tf.concat([s[:n], tf.constant(self.event_shape_in, s.dtype)], 0)


class FactorOut(rbij._EqualOnlyToItself, tfb.Bijector):  # pylint: disable=protected-access
    """Multiscale factor-out (Dinh et al. 2017): half of the channels go
    straight to the latent, the rest go through the remaining flow.

    forward (data -> latent), x of event shape (H, W, C), k = C // 2:

        x_keep = x[..., :k],  x_out = x[..., k:]
        z = concat(flatten(x_out), inner(x_keep))        event shape (H W C,)

    where ``inner`` (a :class:`FlowBijector` over the ``stages`` that follow,
    applied in order) maps (H, W, k) to a flat vector of size H W k. The
    factored part is an identity, so

        log |det df/dx| = log |det d inner / d x_keep|.

    Inverse: split z at H W (C - k), invert ``inner`` on the tail and
    concatenate the channels back. Call kwargs (``seed``, ``training``) are
    passed to ``inner``.

    Example:
    ```python
    inner = [tfb.Reshape([8 * 8 * 2], [8, 8, 2])]
    fo = FactorOut((8, 8, 4), inner)
    z = fo.forward(tf.zeros([3, 8, 8, 4]))     # shape [3, 256]
    x = fo.inverse(z)                          # shape [3, 8, 8, 4]
    ```
    """

    _cache = rbij._FreshBijectorCache()  # pylint: disable=protected-access
    _takes_flow_kwargs = True

    def __init__(self, event_shape, stages, validate_args=False, name="factor_out"):
        parameters = dict(locals())
        event_shape = tuple(int(d) for d in event_shape)
        if len(event_shape) != 3 or event_shape[-1] < 2:
            raise ValueError(f"FactorOut needs an event shape (H, W, C) with C >= 2, "
                             f"got {event_shape}")
        self.event_shape_ = event_shape
        h, w, c = event_shape
        self.n_keep = c // 2
        self.keep_shape = (h, w, self.n_keep)
        self.factored_dim = h * w * (c - self.n_keep)
        self.stages = list(stages)
        self.inner = FlowBijector(self.stages, self.keep_shape, name=f"{name}_inner")
        if self.inner.event_shape_out != (h * w * self.n_keep,):
            raise ValueError(f"{name}: the inner stages must map {self.keep_shape} to a flat "
                             f"vector of size {h * w * self.n_keep}, got event shape "
                             f"{self.inner.event_shape_out}")
        super().__init__(forward_min_event_ndims=3, inverse_min_event_ndims=1,
                         validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def split(self, x):
        """(x[..., :k], x[..., k:]) for x of event shape (H, W, C)."""
        return x[..., :self.n_keep], x[..., self.n_keep:]

    def merge(self, x_out, z_inner):
        """concat(flatten(x_out), z_inner) along the last axis."""
        batch = tf.shape(x_out)[:-3]
        flat = tf.reshape(x_out, tf.concat([batch, [self.factored_dim]], 0))
        return tf.concat([flat, tf.cast(z_inner, flat.dtype)], axis=-1)

    def unmerge(self, z_out, x_keep):
        """Inverse of :meth:`merge` given the inverted inner part ``x_keep``."""
        h, w, c = self.event_shape_
        out = tf.reshape(z_out, tf.concat([tf.shape(z_out)[:-1], [h, w, c - self.n_keep]], 0))
        return tf.concat([tf.cast(x_keep, out.dtype), out], axis=-1)

    def _forward(self, x, **kwargs):
        keep, out = self.split(x)
        return self.merge(out, self.inner.forward(keep, **kwargs))

    def _inverse(self, z, **kwargs):
        d = self.factored_dim
        return self.unmerge(z[..., :d], self.inner.inverse(z[..., d:], **kwargs))

    def _forward_log_det_jacobian(self, x, **kwargs):
        keep, _ = self.split(x)
        return self.inner.forward_log_det_jacobian(keep, event_ndims=3, **kwargs)

    def _forward_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[:-3].concatenate([int(np.prod(self.event_shape_))])

    def _forward_event_shape_tensor(self, s):
        return tf.concat([s[:-3], tf.constant([int(np.prod(self.event_shape_))], s.dtype)], 0)

    def _inverse_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[:-1].concatenate(self.event_shape_)

    def _inverse_event_shape_tensor(self, s):
        return tf.concat([s[:-1], tf.constant(self.event_shape_, s.dtype)], 0)


class FlowDistribution(tfd.TransformedDistribution):
    """``tfd.TransformedDistribution(base, tfb.Invert(flow))`` whose
    ``log_prob`` runs the cheap data -> latent direction once:

        log p(x) = base.log_prob(flow(x)) + log |det d flow / dx|

    (TFP's generic ``log_prob`` would evaluate the log-det at
    ``flow.inverse(flow(x))``, i.e. run the fixed-point inverse of every
    residual block.) ``bijector_kwargs`` such as ``{"seed": s, "training":
    True}`` reach the flow. Requires ``bijector`` to be
    ``tfb.Invert(FlowBijector)``.

    Example:
    ```python
    dist = FlowDistribution(tfd.MultivariateNormalDiag(tf.zeros([64])),
                            tfb.Invert(model.bijector))
    dist.log_prob(x, bijector_kwargs={"seed": [1, 2]})
    ```
    """

    def sample(self, sample_shape=(), seed=None, name="sample", **kwargs):
        """Samples (see ``tfd.Distribution.sample``) after checking the arguments:
        ``sample_shape`` positive ints, ``seed`` None, an int or shape [2]
        (:func:`check_sample_args`), so bad values raise a clear ValueError.

        Example: ``dist.sample(4, seed=[1, 2])``.
        """
        check_sample_args(sample_shape, seed, self.name)
        return super().sample(sample_shape, seed=seed, name=name, **kwargs)

    def _log_prob(self, y, **kwargs):
        distribution_kwargs, bijector_kwargs = self._kwargs_split_fn(kwargs)
        flow = self.bijector.bijector
        z, ld = flow.forward_and_log_det(y, **bijector_kwargs)
        return self.distribution.log_prob(z, **distribution_kwargs) + tf.cast(ld, self.dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FlowLayer(keras.layers.Layer):
    """A Keras layer holding a TFP distribution or bijector built from
    rflow_tf pieces, so that a ``keras.Model`` that holds it sees its weights
    (Keras 3 does not look inside ``tf.Module``s such as distributions).

    ``call(x)`` is ``dist.log_prob(x)`` for a distribution, and
    ``bijector.forward(x)`` for a bijector. The Lipschitz bound is kept by the
    layers themselves in any training loop.

    Example:
    ```python
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)),
                                       tfb.Invert(tfb.Chain(blocks)))
    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.flow = FlowLayer(dist)
        def call(self, x):
            return self.flow(x)
    len(Model().trainable_weights)     # every weight of the blocks
    ```
    """

    def __init__(self, flow, **kwargs):
        super().__init__(**kwargs)
        parts = rlayers.keras_layers(flow)
        if not parts:
            raise ValueError(f"FlowLayer: found no Keras layers inside {type(flow).__name__}")
        object.__setattr__(self, "_flow", flow)     # a tf.Module: keep out of Keras tracking
        self.flow_parts = parts                     # tracked: their weights are this layer's
        self.built = True

    @property
    def flow(self):
        """The wrapped distribution or bijector."""
        return self._flow

    def call(self, x):
        if isinstance(self._flow, tfd.Distribution):
            return self._flow.log_prob(x)
        return self._flow.forward(x)

    def get_config(self):
        raise NotImplementedError("FlowLayer wraps a Python object and has no config; save its "
                                  "weights with tf.train.Checkpoint or model.save_weights")


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
def _finite_images_or_nan(x, z, where):
    """clip(x, 0, 1) for samples whose image x and latent z are finite; the
    others become all-NaN and are reported (RuntimeWarning eagerly, stderr in
    graphs)."""
    ok = tf.reduce_all(tf.math.is_finite(x), axis=list(range(1, x.shape.rank))) & \
        tf.reduce_all(tf.math.is_finite(z), axis=list(range(1, z.shape.rank)))
    bad = tf.reduce_sum(tf.cast(~ok, tf.int32))
    msg = ("sample(s) not finite (infinite latent or temperature, or a diverged fixed-point "
           "inverse); returned as NaN")
    if tf.executing_eagerly():
        if int(bad):
            warnings.warn(f"{where}: {int(bad)} of {int(tf.size(ok))} {msg}", RuntimeWarning,
                          stacklevel=3)
    else:
        def report():
            tf.print("WARNING:", where + ":", bad, "of", tf.size(ok), msg,
                     output_stream=sys.stderr)
            return tf.constant(False)

        flag = tf.cond(bad > 0, report, lambda: tf.constant(True))
        with tf.control_dependencies([flag]):
            x = tf.identity(x)
    mask = tf.reshape(ok, [-1] + [1] * (x.shape.rank - 1))
    return tf.where(mask, tf.clip_by_value(x, 0.0, 1.0), tf.constant(np.nan, x.dtype))


class ResidualFlow(keras.Model):
    """A multiscale Residual Flow for images (a Keras 3 model).

    Built from a :class:`FlowConfig` (or a dict, JSON text or preset name);
    see the module docstring for the architecture. For dequantised images
    x in [0, 1]^D (D = H W C), with f the data -> latent map:

        log p(x) = log N(f(x); 0, I) + log |det df/dx|          (per example)
        bits/dim = -(log p(x) - D n_bits ln 2) / (D ln 2)

    log |det df/dx| sums the logit transform, ActNorm and squeeze log-dets
    (exact) and every residual block's estimate (unbiased Russian roulette
    with Hutchinson probes unless ``config.logdet`` says otherwise).
    ``training=True`` uses the training estimator (``n_exact_terms``, Neumann
    gradient); ``training=False`` the evaluation one (``n_exact_terms_eval``).

    Main methods: :meth:`initialize` (data-dependent ActNorm init, once,
    before training), :meth:`log_prob`, :meth:`bits_per_dim`,
    :meth:`forward_and_log_det`, :meth:`sample` (fixed-point inverse),
    :meth:`converge_lipschitz` (after every optimiser step and before
    evaluation/sampling), ``.bijector`` (the whole flow as one TFP bijector,
    data -> latent) and :meth:`distribution`; with ``config.n_classes``:
    :meth:`classify` (logits, no log-det) and :meth:`log_prob_and_logits`.

    All weights are Keras variables of ``model.flow_layers`` (the residual
    nets and ActNorm layers), so ``model.trainable_variables``,
    ``tf.train.Checkpoint(model=model)`` and EMA see every weight.

    Example:
    ```python
    flow = ResidualFlow("tiny")
    x = tf.random.uniform([16, 8, 8, 1])
    flow.initialize(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(flow.bits_per_dim(x, training=True, seed=[0, 1]))
    grads = tape.gradient(loss, flow.trainable_variables)
    ```
    """

    def __init__(self, config=None, name="residual_flow", **kwargs):
        super().__init__(name=name, **kwargs)
        cfg = FlowConfig.coerce(config)
        self.flow_config = cfg
        named_layers, feature_stages, last_shape = [], [], []
        stages = self._build(cfg, named_layers, feature_stages, last_shape)
        # Classifier heads (n_classes > 0) read one feature map per scale.
        object.__setattr__(self, "_feature_stages", [b for b, _ in feature_stages])
        object.__setattr__(self, "_last_shape", tuple(last_shape))
        self.classifier_heads = None
        if cfg.n_classes:
            heads = rclf.ClassifierHeads(cfg.n_classes, cfg.head_channels, dtype=cfg.dtype,
                                         name="classifier_heads")
            heads.build([(None,) + tuple(shape) for _, shape in feature_stages]
                        + [(None,) + tuple(last_shape)])
            self.classifier_heads = heads
        # The Keras layers holding every weight, each set as an attribute so
        # that Keras (trainable_variables) and tf.train.Checkpoint track them
        # (Keras 3 lists of layers are not checkpoint dependencies) with
        # stable names such as "s0_block0_net" and "s0_actnorm1".
        for attr, layer in named_layers:
            setattr(self, attr, layer)
        object.__setattr__(self, "_flow_layers", [layer for _, layer in named_layers])
        # Bijectors are tf.Modules; keep them out of Keras/AutoTrackable
        # tracking so checkpoints do not store each variable twice.
        object.__setattr__(self, "_stages", stages)
        object.__setattr__(self, "_flow", FlowBijector(stages, cfg.input_shape, name=self.name))
        object.__setattr__(self, "_iresblocks", self._flow.iresblocks)
        object.__setattr__(self, "_actnorms",
                           [b for b in _iter_stages(stages) if isinstance(b, rbij.ActNorm)])
        self.built = True

    # ----------------------------------------------------------- building
    @staticmethod
    def _build(cfg, named_layers, feature_stages, last_shape):
        """The stages (data -> latent) of ``cfg``'s flow; appends the Keras
        layers to ``named_layers``, ``(stage, feature shape)`` of the stages
        after which a classifier head reads a feature map to ``feature_stages``
        (inter-scale squeezes: their output; factor-outs: their factored
        half) and the last scale's (H, W, C) to ``last_shape``."""
        dtype = cfg.dtype
        block_kwargs = dict(
            logdet=cfg.logdet, logdet_eval=cfg.logdet_eval_mode, dist=cfg.dist, rate=cfg.rate,
            p=cfg.p,
            n_exact_terms=cfg.n_exact_terms, n_exact_terms_eval=cfg.n_exact_terms_eval,
            n_samples=cfg.n_samples, n_terms=cfg.n_terms, probe=cfg.probe,
            neumann_grad=cfg.neumann_grad, grad_in_forward=cfg.grad_in_forward,
            inverse_atol=cfg.inverse_tol, inverse_rtol=cfg.inverse_tol,
            inverse_max_iterations=cfg.inverse_max_iterations)

        def actnorm(shape, name):
            layer = rlayers.ActNormalization(
                variance="unbiased" if cfg.init == "reference" else "biased", dtype=dtype,
                name=name)
            named_layers.append((name, layer))
            return rbij.ActNorm(shape, layer=layer, name=name)

        def flowpp_coupling(shape, mask, parity, name):
            return rmix.MixLogCDFCoupling(
                shape, mask=mask, parity=parity, num_components=cfg.flowpp_components,
                hidden_channels=cfg.hidden_channels, num_blocks=cfg.flowpp_conditioner_blocks,
                attention=cfg.flowpp_attention, num_heads=cfg.flowpp_heads,
                inverse_atol=cfg.inverse_tol, inverse_rtol=cfg.inverse_tol,
                inverse_max_iterations=cfg.inverse_max_iterations, dtype=dtype, name=name)

        def conv_block(s, i, shape, mask):
            first = cfg.first_resblock and s == 0 and i == 0
            preact = cfg.preactivation and not first
            if cfg.block == "flowpp":
                channel = s > 0 and i < cfg.flowpp_channel_couplings
                return flowpp_coupling(shape, "channel" if channel else "checkerboard", i % 2,
                                       f"s{s}_block{i}")
            if cfg.block == "coupling":
                return rcoup.AffineCoupling.conv(
                    shape, mask, hidden_channels=cfg.hidden_channels, kernels=cfg.kernels,
                    preactivation=preact, dtype=dtype, name=f"s{s}_block{i}")
            return rbij.IResBlock.conv(
                shape, hidden_channels=cfg.hidden_channels, kernels=cfg.kernels,
                coeff=cfg.coeff, activation=cfg.activation, preactivation=preact,
                dtype=dtype, init=cfg.init, name=f"s{s}_block{i}", **block_kwargs)

        def fc_block(i, d, mask):
            if cfg.block == "flowpp":
                return flowpp_coupling((d,), "checkerboard", i % 2, f"fc_block{i}")
            if cfg.block == "coupling":
                return rcoup.AffineCoupling.dense(
                    (d,), mask, hidden_units=cfg.fc_hidden, preactivation=cfg.preactivation,
                    dtype=dtype, name=f"fc_block{i}")
            return rbij.IResBlock.dense(
                d, hidden_units=cfg.fc_hidden, coeff=cfg.coeff, activation=cfg.activation,
                preactivation=cfg.preactivation, dtype=dtype, init=cfg.init,
                name=f"fc_block{i}", **block_kwargs)

        def scale(s, shape):
            h, w, c = shape
            out = []
            # Coupling masks as the reference: the kept half alternates from "0"
            # in every scale (checkerboard in scale 0, channel halves after) and
            # the FC end continues the alternation.
            kind = "checkerboard" if s == 0 else "channel"
            n_fc = cfg.n_fc_blocks if cfg.fc_end and s == cfg.n_scales - 1 else 0
            masks = rcoup.alternating_masks("channel", cfg.n_blocks[s] + n_fc)
            for i in range(cfg.n_blocks[s]):
                if cfg.invertible_1x1:
                    conv = rinv.Invertible1x1Conv(shape, seed=int(np.random.randint(2 ** 31 - 1)),
                                                  dtype=dtype, name=f"s{s}_inv1x1_{i}")
                    named_layers.append((conv.name, conv.layer))
                    out.append(conv)
                blk = conv_block(s, i, shape, kind + masks[i][-1])
                named_layers.append((f"{blk.name}_net", blk.net))
                out.append(blk)
                if cfg.actnorm:
                    out.append(actnorm(shape, f"s{s}_actnorm{i + 1}"))
            if s < cfg.n_scales - 1:
                squeeze = rbij.Squeeze(cfg.squeeze_order, name=f"s{s}_squeeze")
                out.append(squeeze)
                squeezed = (h // 2, w // 2, 4 * c)
                if cfg.factor_out:
                    inner = scale(s + 1, (h // 2, w // 2, 2 * c))
                    fo = FactorOut(squeezed, inner, name=f"s{s}_factor_out")
                    feature_stages.append((fo, (h // 2, w // 2, 2 * c)))    # factored half
                    out.append(fo)
                    return out
                feature_stages.append((squeeze, squeezed))    # the squeezed scale output
                return out + scale(s + 1, squeezed)
            d = h * w * c
            out.append(tfb.Reshape(event_shape_out=[d], event_shape_in=[h, w, c],
                                   name="flatten"))
            for i in range(n_fc):
                blk = fc_block(i, d, masks[cfg.n_blocks[s] + i])
                named_layers.append((f"{blk.name}_net", blk.net))
                out.append(blk)
                if cfg.actnorm:
                    out.append(actnorm((d,), f"fc_actnorm{i}"))
            last_shape.extend([h, w, c])
            return out

        h, w, c = cfg.input_shape
        if cfg.init_layer == "cifar10":
            stages = [rclf.ChannelNormalize.cifar10(name="normalize")]
        else:
            stages = [rbij.LogitTransform(cfg.logit_alpha, name="logit")]
        shape = (h, w, c)
        if cfg.squeeze_first:
            stages.append(rbij.Squeeze(cfg.squeeze_order, name="squeeze_first"))
            shape = (h // 2, w // 2, 4 * c)
        # Version 1 always put an ActNorm before the first block; the reference
        # (and version 2) only with first_resblock.
        if cfg.actnorm and (cfg.first_resblock or cfg.config_version < 2):
            stages.append(actnorm(shape, "s0_actnorm0"))
        return stages + scale(0, shape)

    # ------------------------------------------------------------ properties
    @property
    def bijector(self):
        """The whole flow as one TFP bijector (a :class:`FlowBijector`), data ->
        latent: ``forward`` maps images [..., H, W, C] to latents [..., D];
        call kwargs ``seed`` and ``training`` select the log-det estimate.

        Example:
        ```python
        z = flow.bijector.forward(x)
        ld = flow.bijector.forward_log_det_jacobian(x, event_ndims=3, seed=[1, 2])
        x2 = flow.bijector.inverse(z)          # fixed-point inverse
        ```
        """
        return self._flow

    @property
    def flow_layers(self):
        """The Keras layers holding all weights: each residual net and ActNorm layer."""
        return list(self._flow_layers)

    @property
    def stages(self):
        """The flow's pieces in application (data -> latent) order."""
        return list(self._stages)

    @property
    def input_shape_(self):
        """(H, W, C)."""
        return tuple(self.flow_config.input_shape)

    @property
    def num_dims(self):
        """D = H W C (also the latent size)."""
        return self.flow_config.num_dims

    @property
    def latent_shape(self):
        """(D,): the latent is a flat vector."""
        return (self.num_dims,)

    @property
    def flow_dtype(self):
        """tf.DType of the flow's computations (config.dtype)."""
        return tf.as_dtype(self.flow_config.dtype)

    @property
    def iresblocks(self):
        """All residual blocks, in application order."""
        return list(self._iresblocks)

    @property
    def actnorms(self):
        """All ActNorm bijectors, in application order."""
        return list(self._actnorms)

    @property
    def is_initialized(self):
        """True when every ActNorm layer (also the classifier heads') has had
        its data-dependent init."""
        norms = [a.layer for a in self._actnorms]
        if self.classifier_heads is not None:
            norms += list(self.classifier_heads.norms)
        return all(bool(n.initialized.numpy()) for n in norms)

    @property
    def n_classes(self):
        """Number of classes of the classifier heads (0: a density model only)."""
        return int(self.flow_config.n_classes)

    def lipschitz_layers(self):
        """The spectrally normalised layers (see :func:`rflow_tf.layers.lipschitz_layers`)."""
        return rlayers.lipschitz_layers(self.flow_layers)

    # ------------------------------------------------------------ validation
    def _check_input(self, x, validate, name="x"):
        """Returns (x as a [B, H, W, C] tensor of the flow dtype, was_unbatched)."""
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(
                f"{self.name}: {name} must be dequantised floats in [0, 1], got dtype "
                f"{x.dtype.name}; convert integer pixels with "
                f"rflow_tf.data.dequantize(x, n_bits={self.flow_config.n_bits})")
        if x.dtype != self.flow_dtype:
            x = tf.cast(x, self.flow_dtype)
        shape = tuple(self.flow_config.input_shape)
        unbatched = x.shape.rank == 3 and tuple(x.shape) == shape
        if unbatched:
            x = x[None]
        if x.shape.rank != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{self.name}: {name} must have shape [batch, {shape[0]}, "
                             f"{shape[1]}, {shape[2]}] (or {list(shape)}), got {x.shape}")
        return check_pixels(x, self.name, name, values=validate), unbatched

    # ------------------------------------------------------------ the flow
    def forward_and_log_det(self, x, training=False, seed=None, validate=True):
        """``(z, log |det df/dx|)`` for images x in [0, 1]: z [B, D], log-det [B].

        Every piece runs once (see :class:`FlowBijector`); ``seed`` is an
        optional stateless seed (shape [2]) split over the residual blocks.

        Example: ``z, ld = flow.forward_and_log_det(x, seed=[0, 1])``.
        """
        x, unbatched = self._check_input(x, validate)
        z, ld = self._flow.forward_and_log_det(x, seed=seed, training=training)
        if unbatched:
            z, ld = z[0], ld[0]
        return z, ld

    # ------------------------------------------------------ classification
    def _check_classifier(self, method):
        if self.classifier_heads is None:
            raise ValueError(f"{self.name}.{method} needs a classifier: build the model with "
                             f"FlowConfig.n_classes >= 2 (this one has n_classes=0)")

    def _head_inputs(self, z, features):
        """Per-scale feature maps of the heads: the inter-scale outputs (with
        factor-out: the factored halves) and the final output, i.e. the last
        scale's part of z reshaped to that scale's (H, W, C)."""
        h, w, c = self._last_shape
        final = tf.reshape(z[:, z.shape[-1] - h * w * c:], [-1, h, w, c])
        return list(features) + [final]

    def classify(self, x, training=False, validate=True):
        """Logits [B, n_classes] of p(y | x) for dequantised images x in [0, 1].

        The flow runs forward (data -> latent) once without any log-det
        (a pure classifier never needs one), and the heads
        (:class:`rflow_tf.classifier.ClassifierHeads`) read one feature map
        per scale: the output of each scale but the last (after its squeeze;
        with factor-out, the factored half) and the final output of the flow
        (the last scale's latent, after the FC end, reshaped to (H, W, C)).
        (The reference reads, with factor-out, a stale tensor, the previous
        scale's factored half, for its last head; this reads the final output.)

        Example: ``probs = tf.nn.softmax(flow.classify(x))``.
        """
        self._check_classifier("classify")
        x, unbatched = self._check_input(x, validate)
        z, _, feats = self._flow.forward_with_features(x, self._feature_stages,
                                                       training=training)
        logits = self.classifier_heads(self._head_inputs(z, feats))
        return logits[0] if unbatched else logits

    def log_prob_and_logits(self, x, training=False, seed=None, validate=True):
        """``(log p(x) [B], logits [B, n_classes])`` in one pass of the flow:
        :meth:`log_prob` and :meth:`classify` of the same forward pass (the
        hybrid model's two outputs).

        Example:
        ```python
        lp, logits = flow.log_prob_and_logits(x, training=True, seed=[1, 2])
        loss = classifier.hybrid_loss(lp - flow.num_dims * 8 * math.log(2), logits, y, "1/D",
                                      num_dims=flow.num_dims)
        ```
        """
        self._check_classifier("log_prob_and_logits")
        x, unbatched = self._check_input(x, validate)
        z, ld, feats = self._flow.forward_with_features(x, self._feature_stages, mode="logdet",
                                                        seed=seed, training=training)
        lp = self.base_log_prob(z) + ld
        logits = self.classifier_heads(self._head_inputs(z, feats))
        return (lp[0], logits[0]) if unbatched else (lp, logits)

    def base_log_prob(self, z):
        """log N(z; 0, I) = -|z|^2 / 2 - D/2 log(2 pi), summed over the last axis.

        Example: ``flow.base_log_prob(tf.zeros([2, flow.num_dims]))``.
        """
        d = tf.cast(tf.shape(z)[-1], z.dtype)
        return -0.5 * tf.reduce_sum(tf.square(z), axis=-1) - 0.5 * d * math.log(2 * math.pi)

    def log_prob(self, x, training=False, seed=None, validate=True):
        """log p(x) for dequantised images x in [0, 1] (shape [B, H, W, C] or
        [H, W, C]), one value per example, including the logit log-det:

            log p(x) = log N(f(x); 0, I) + log |det df/dx|

        ``training`` selects the training estimator (``n_exact_terms``) or the
        evaluation one (``n_exact_terms_eval``); ``seed`` an optional
        stateless seed. ``validate`` checks dtype, shape, finiteness and the
        [0, 1] range (a ValueError eagerly, an assertion in graphs).

        Example: ``lp = flow.log_prob(data.dequantize(x_uint8, 8))``.
        """
        z, ld = self.forward_and_log_det(x, training=training, seed=seed, validate=validate)
        return self.base_log_prob(z) + ld

    def bits_per_dim(self, x, n_bits=None, training=False, seed=None, validate=True):
        """Bits per dimension of the n-bit data behind dequantised x:

            bpd = -(log p(x) - D n_bits ln 2) / (D ln 2)

        (``n_bits`` defaults to ``config.n_bits``). One value per example.

        Example: ``tf.reduce_mean(flow.bits_per_dim(x))``.
        """
        n_bits = self.flow_config.n_bits if n_bits is None else int(n_bits)
        if not 1 <= n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
        lp = self.log_prob(x, training=training, seed=seed, validate=validate)
        d = float(self.num_dims)
        return -(lp - d * n_bits * _LN2) / (d * _LN2)

    def call(self, inputs, training=False):
        """Keras entry point: the per-example :meth:`log_prob` of ``inputs``."""
        return self.log_prob(inputs, training=bool(training) if training is not None else False)

    def initialize(self, x):
        """Data-dependent ActNorm initialisation from a batch of dequantised
        images x in [0, 1] (no-op for layers already initialised, e.g. after
        restoring a checkpoint): each ActNorm sets bias = -mean and
        log_scale = -0.5 log max(var, 0.2) of its input, in flow order.

        Call once before training, in eager mode and (under a
        tf.distribute strategy) in cross-replica context.

        Example: ``flow.initialize(data.dequantize(first_batch, 8))``.
        """
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            raise RuntimeError("ResidualFlow.initialize must be called in cross-replica context "
                               "(outside strategy.run)")
        x, _ = self._check_input(x, True)
        self._flow.initialize(x)
        if self.classifier_heads is not None:
            # Forward pass again: the flow's ActNorms were initialised on the way.
            z, _, feats = self._flow.forward_with_features(x, self._feature_stages)
            self.classifier_heads.initialize(self._head_inputs(z, feats))

    def converge_lipschitz(self, tol=None, max_iterations=None):
        """Careful power iteration to convergence in every Lipschitz layer (see
        :func:`rflow_tf.layers.converge_lipschitz`); returns the sigma
        estimates. Not needed for the bound during training (each layer
        re-estimates when its kernel changed); use before evaluation or export.

        Example: ``flow.converge_lipschitz()``.
        """
        if not self.lipschitz_layers():     # coupling / Flow++ blocks: nothing to converge
            return []
        return rlayers.converge_lipschitz(self.flow_layers, tol, max_iterations)

    def update_lipschitz(self):
        """Re-estimates sigma in every Lipschitz layer whose kernel changed since
        its last estimate (see :func:`rflow_tf.layers.update_lipschitz`); call
        in cross-replica context after an optimiser step.

        Example: ``optimizer.apply_gradients(...); flow.update_lipschitz()``.
        """
        rlayers.update_lipschitz(self.flow_layers)

    def mark_lipschitz_current(self):
        """Declares the stored power-iteration state current for the present
        weights (after restoring a checkpoint: see
        :func:`rflow_tf.layers.mark_lipschitz_current`).

        Example: ``ckpt.restore(path); flow.mark_lipschitz_current()``.
        """
        rlayers.mark_lipschitz_current(self.flow_layers)

    # ------------------------------------------------------------ Keras fit
    def _images_from(self, data):
        """Dequantised images from what a Keras dataset yields: x, (x,),
        (x, y[, w]) (y and w ignored) or a dict with key "image". Integer
        pixels are dequantised with uniform noise (``config.n_bits``)."""
        if isinstance(data, dict):
            if "image" not in data:
                raise ValueError(f"{self.name}: a dict batch needs an 'image' key, got keys "
                                 f"{sorted(data)}")
            data = data["image"]
        if isinstance(data, (tuple, list)):
            data = data[0]
        x = tf.convert_to_tensor(data)
        if x.dtype.is_integer:
            x = rdata.dequantize(x, self.flow_config.n_bits, dtype=self.flow_dtype)
        return x

    def train_step(self, data):
        """One Keras ``fit`` step: loss = mean bits/dim of the batch (training
        estimator), no targets needed. The Lipschitz estimates are updated
        after the optimiser step (and by every layer on its next use).

        Example:
        ```python
        flow.initialize(x_first_batch)
        flow.compile(optimizer=keras.optimizers.Adam(1e-3))
        flow.fit(images_dataset, epochs=1)        # uint8 or [0, 1] float images
        ```
        """
        x = self._images_from(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(self.bits_per_dim(x, training=True, validate=False))
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        if rlayers._can_store_in_context():      # pylint: disable=protected-access
            self.update_lipschitz()
        return {"loss": loss}

    def test_step(self, data):
        """Keras ``evaluate``: mean bits/dim with the evaluation estimator."""
        x = self._images_from(data)
        return {"loss": tf.reduce_mean(self.bits_per_dim(x, training=False, validate=False))}

    def fit(self, *args, **kwargs):
        """Keras ``fit`` on images alone (see :meth:`train_step`): the loss is
        bits/dim, so no targets and no ``loss=`` in ``compile`` are needed.
        ActNorm must be initialised first (:meth:`initialize`).

        Example: ``flow.compile(optimizer="adam"); flow.fit(ds, epochs=2)``.
        """
        if not self.is_initialized:
            raise RuntimeError(
                f"{self.name}: ActNorm is not initialised; call flow.initialize(x) with a "
                "batch of dequantised images in [0, 1] before fit (data-dependent init)")
        return super().fit(*args, **kwargs)

    def export(self, filepath, *args, **kwargs):
        """Not supported: use :func:`rflow_tf.export.save` (``rflow_tf.save``),
        which writes a SavedModel with sampling, log-density and bits/dim
        signatures that loads back as a TFP distribution."""
        raise NotImplementedError(
            f"{self.name}: keras.Model.export cannot export a residual flow (its fixed-point "
            f"inverse and log-det estimators need fixed seeds and shapes); use "
            f"rflow_tf.save(flow, {filepath!r}) (rflow_tf.export.save), and rflow_tf.load to "
            "read it back")

    def sample(self, n, temperature=1.0, seed=None):
        """``n`` images in [0, 1] (shape [n, H, W, C]): z ~ N(0, T^2 I) over the
        latent, x = f^-1(z) by the blocks' fixed-point inverses (Banach
        iteration x <- y - g(x)) and the other pieces' exact inverses, then
        clipped to [0, 1] (the logit's alpha margin can overshoot slightly).
        A sample whose inverse is not finite (a diverged fixed-point
        iteration, e.g. from an infinite latent) is returned as NaN, never
        clipped into a plausible image, with a warning (a ``RuntimeWarning``
        eagerly, a line on stderr inside ``tf.function``).

        Example: ``imgs = flow.sample(64, temperature=0.7, seed=[3, 4])``.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        check_sample_args(n, seed, self.name)
        if not float(temperature) >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        shape = [int(n), self.num_dims]
        if seed is None:
            z = tf.random.normal(shape, dtype=self.flow_dtype)
        else:
            z = tf.random.stateless_normal(shape, _as_seed(seed, "ResidualFlow.sample"),
                                           dtype=self.flow_dtype)
        z = z * tf.cast(temperature, self.flow_dtype)
        return _finite_images_or_nan(self._flow.inverse(z), z, "ResidualFlow.sample")

    def distribution(self):
        """The model as a ``tfd.TransformedDistribution`` over images:
        base N(0, I) over the latent (D,), bijector ``tfb.Invert(self.bijector)``
        (latent -> data). ``log_prob`` runs the cheap data -> latent direction,
        ``sample`` the fixed-point inverse (see :class:`FlowDistribution`). Its
        ``trainable_variables`` are the flow's weights. ActNorm is not
        initialised implicitly: call :meth:`initialize` first.

        Example:
        ```python
        dist = flow.distribution()
        lp = dist.log_prob(x)        # same as flow.log_prob(x) (random estimate)
        imgs = dist.sample(4)        # not clipped to [0, 1]
        ```
        """
        base = tfd.MultivariateNormalDiag(loc=tf.zeros([self.num_dims], self.flow_dtype))
        return FlowDistribution(base, tfb.Invert(self._flow), name=self.name)

    # ---------------------------------------------------------- serialisation
    def get_config(self):
        """{"name": ..., "config": FlowConfig.to_dict()}."""
        return {"name": self.name, "config": self.flow_config.to_dict()}

    @classmethod
    def from_config(cls, config):
        """Inverse of :meth:`get_config` (weights are not included).

        Example: ``ResidualFlow.from_config(flow.get_config())``.
        """
        config = dict(config)
        cfg = FlowConfig.from_dict(config.pop("config"))
        config.pop("trainable", None)
        config.pop("dtype", None)
        return cls(cfg, **config)
