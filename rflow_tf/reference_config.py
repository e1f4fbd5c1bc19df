"""The authors' training arguments as a :class:`rflow_tf.models.FlowConfig`
(:func:`config_from_args`), and the layout permutations between their model
and ours (:func:`flatten_permutation`, :func:`latent_permutation`). Used by
:mod:`rflow_tf.convert`, which re-exports these names."""

import argparse

import numpy as np

from rflow_tf import models as rmodels

#: The reference's activation names (train_img.py ``--act``) -> ours.
ACTIVATIONS = {
    "swish": "lipswish",
    "elu": "elu",
    "softplus": "softplus",
    "relu": "relu",
    "identity": "identity",
}
#: Image channels of each ``--data`` choice of train_img.py.
CHANNELS = {
    "mnist": 1,
    "cifar10": 3,
    "svhn": 3,
    "celebahq": 3,
    "celeba_5bit": 3,
    "imagenet32": 3,
    "imagenet64": 3,
}
#: FlowConfig fields that define the function (not the estimator or dtype).
ARCHITECTURE_FIELDS = (
    "input_shape",
    "n_blocks",
    "hidden_channels",
    "kernels",
    "activation",
    "coeff",
    "preactivation",
    "actnorm",
    "first_resblock",
    "squeeze_first",
    "squeeze_order",
    "factor_out",
    "fc_end",
    "n_fc_blocks",
    "fc_hidden",
    "logit_alpha",
)


class UnsupportedCheckpointError(ValueError):
    """The checkpoint uses a reference option rflow_tf cannot express, or its
    tensors do not match the architecture its ``args`` describe.

    Example:
    ```python
    from rflow_tf.reference_config import UnsupportedCheckpointError, config_from_args

    try:
        config_from_args({"data": "mnist", "block": "coupling"})
    except UnsupportedCheckpointError as error:
        assert "--block 'coupling'" in str(error)
    else:
        raise AssertionError("a coupling model was accepted")
    ```
    """


# ----------------------------------------------------------------------------
# args -> FlowConfig
# ----------------------------------------------------------------------------


def reference_arg(args, name, default=None):
    """The reference's option ``name`` of its training ``args``, or ``default``
    (checkpoints of older reference versions lack newer options).

    Args:
      args: the checkpoint's ``argparse.Namespace`` of ``train_img.py`` flags.
      name: the option's attribute name.
      default: the value when ``args`` has no such option.

    Example:
    ```python
    import argparse
    from rflow_tf.reference_config import reference_arg

    args = argparse.Namespace(idim=64)
    assert reference_arg(args, "idim", 512) == 64
    assert reference_arg(args, "n_dist", "poisson") == "poisson"  # absent: the default
    ```
    """
    return getattr(args, name, default)


def reference_n_scales(h, w):
    """The reference's cap on scales: one per halving while H and W are >= 4,

        n = #{k >= 0 : H / 2^k >= 4 and W / 2^k >= 4}   (integer halvings).

    Args:
      h: image height.
      w: image width.

    Returns:
      The largest number of scales the reference builds for H x W images.

    Example:
    ```python
    from rflow_tf.reference_config import reference_n_scales

    assert reference_n_scales(28, 28) == 3  # 28 -> 14 -> 7 (-> 3 stops)
    assert reference_n_scales(32, 32) == 4 and reference_n_scales(4, 64) == 1
    ```
    """
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return n


def config_from_args(args, **overrides):
    """The :class:`~rflow_tf.models.FlowConfig` of a reference model, from its
    ``train_img.py`` flags (an ``argparse.Namespace`` or a dict).

    Uses ``data``, ``imagesize``, ``nbits``, ``nblocks``, ``idim``, ``act``,
    ``kernels``, ``coeff``, ``factor_out``, ``squeeze_first``, ``fc_end``,
    ``fc_idim``, ``actnorm``, ``preact``, ``first_resblock``,
    ``n_exact_terms``, ``n_dist``, ``n_samples``, ``neumann_grad``; the logit
    alpha follows from the dataset (1e-6 for MNIST, 0.05 otherwise) and the
    number of scales is capped as the reference does (H, W >= 4 at every
    scale). The FC end has ``len(kernels) - 1`` hidden layers of ``fc_idim``
    units, as the reference's. Evaluation uses 20 exact terms (the
    reference's eval estimator). ``overrides`` replace fields afterwards
    (e.g. ``logdet="exact"``, ``dtype="float64"``).

    Raises:
      UnsupportedCheckpointError: naming the option, for what rflow_tf cannot
        express: ``task`` other than density, ``block=coupling``,
        ``quadratic``, ``fc``, ``batchnorm``, ``dropout``, ``vnorms`` other
        than all 2 (2222 for three layers), ``learn_p``, ``padding``, ``fc_actnorm``, no
        ``logit_transform``, ``act=lcube``, an unknown ``data``.

    Example:
    ```python
    import argparse
    from rflow_tf.reference_config import config_from_args

    # The flags of a train_img.py run (the others take train_img.py's defaults).
    ns = argparse.Namespace(data="mnist", imagesize=28, nblocks="16-16-16", idim=512)
    cfg = config_from_args(ns)            # FlowConfig(input_shape=(28, 28, 1), ...)
    assert cfg.input_shape == (28, 28, 1) and cfg.n_blocks == (16, 16, 16)
    assert config_from_args(ns, logdet="exact").logdet == "exact"
    ```
    """
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    if not isinstance(args, argparse.Namespace):
        raise TypeError(f"args must be an argparse.Namespace or dict, got {type(args).__name__}")

    def refuse(option, value, why):
        raise UnsupportedCheckpointError(
            f"the checkpoint was trained with --{option.replace('_', '-')} {value!r}: {why}; "
            "rflow_tf cannot express this model"
        )

    checks = [
        ("task", "density", "only density models convert (no classifier heads)"),
        ("block", "resblock", "coupling blocks are not residual flows"),
        ("quadratic", False, "invertible 1x1 ('quadratic') layers are not implemented"),
        ("fc", False, "fully connected blocks at every scale are not implemented"),
        ("batchnorm", False, "batch normalisation inside the blocks is not implemented"),
        ("dropout", 0, "dropout inside the blocks is not implemented"),
        ("learn_p", False, "learned induced-norm orders are not implemented"),
        ("padding", 0, "channel padding is not implemented"),
        ("fc_actnorm", False, "extra ActNorm layers after every block are not implemented"),
        ("logit_transform", True, "models without the logit layer are not implemented"),
    ]
    for option, supported, why in checks:
        value = reference_arg(args, option, supported)
        if value != supported:
            refuse(option, value, why)
    data = reference_arg(args, "data")
    if data not in CHANNELS:
        refuse("data", data, f"unknown dataset (known: {sorted(CHANNELS)})")
    act = reference_arg(args, "act", "swish")
    if act not in ACTIVATIONS:
        refuse("act", act, f"supported activations: {sorted(ACTIVATIONS)}")
    kernels = str(reference_arg(args, "kernels", "3-1-3"))
    vnorms = str(reference_arg(args, "vnorms", "2222"))
    if set(vnorms) != {"2"}:
        refuse("vnorms", vnorms, "only spectral (2-norm) normalisation is implemented")
    if len(vnorms) != len(kernels.split("-")) + 1:
        refuse("vnorms", vnorms, f"needs one norm per layer of --kernels {kernels} plus one")

    size = int(reference_arg(args, "imagesize"))
    channels = CHANNELS[data]
    squeeze_first = bool(reference_arg(args, "squeeze_first", False))
    h = size // 2 if squeeze_first else size
    n_blocks = tuple(int(b) for b in str(reference_arg(args, "nblocks", "16-16-16")).split("-"))
    n_blocks = n_blocks[: min(len(n_blocks), reference_n_scales(h, h))]
    if not n_blocks:
        refuse("imagesize", size, "the image is too small for one scale (H, W >= 4)")
    first_resblock = bool(reference_arg(args, "first_resblock", True))
    preact = bool(reference_arg(args, "preact", True))
    if len(n_blocks) == 1 and first_resblock and preact:
        # The reference then keeps the first block pre-activated (its
        # first_resblock only acts on a squeezing scale); ours would drop it.
        refuse(
            "first_resblock",
            True,
            "with a single scale the reference's first block keeps "
            "its pre-activation, which rflow_tf's first_resblock removes",
        )
    if data == "celeba_5bit":
        n_bits = 5
    elif data == "celebahq":
        n_bits = int(reference_arg(args, "nbits", 8))
    else:
        n_bits = 8
    cfg = {
        "input_shape": (size, size, channels),
        "n_blocks": n_blocks,
        "hidden_channels": int(reference_arg(args, "idim", 512)),
        "kernels": kernels,
        "activation": ACTIVATIONS[act],
        "coeff": float(reference_arg(args, "coeff", 0.98)),
        "preactivation": preact,
        "actnorm": bool(reference_arg(args, "actnorm", True)),
        "first_resblock": first_resblock,
        "squeeze_first": squeeze_first,
        "squeeze_order": "reference",
        "factor_out": bool(reference_arg(args, "factor_out", False)),
        "fc_end": bool(reference_arg(args, "fc_end", True)),
        "n_fc_blocks": 4,
        "fc_hidden": (int(reference_arg(args, "fc_idim", 128)),) * (len(kernels.split("-")) - 1),
        "logit_alpha": 1e-6 if data == "mnist" else 0.05,
        "n_bits": n_bits,
        "logdet": "unbiased",
        "dist": str(reference_arg(args, "n_dist", "poisson")),
        "n_exact_terms": int(reference_arg(args, "n_exact_terms", 2)),
        "n_exact_terms_eval": 20,
        "n_samples": int(reference_arg(args, "n_samples", 1)),
        "neumann_grad": bool(reference_arg(args, "neumann_grad", True)),
    }
    cfg.update(overrides)
    return rmodels.FlowConfig(**cfg).validate()


# ----------------------------------------------------------------------------
# Permutations between the reference's (C, H, W) and our (H, W, C) flattening
# ----------------------------------------------------------------------------


def flatten_permutation(shape):
    """Index array p with ``flat_ours = flat_ref[p]`` for a feature map of
    ``shape`` = (H, W, C): ours is flattened in (H, W, C) order, the
    reference's in (C, H, W) order, so p[(h W + w) C + c] = (c H + h) W + w.

    Args:
      shape: (H, W, C) of the feature map.

    Returns:
      An int array of H * W * C indices.

    Example:
    ```python
    import numpy as np
    from rflow_tf.reference_config import flatten_permutation

    x = np.random.default_rng(0).normal(size=(2, 3, 4))  # an (H, W, C) map
    flat_ref = x.transpose(2, 0, 1).reshape(-1)  # the reference's (C, H, W) order
    assert np.array_equal(flat_ref[flatten_permutation((2, 3, 4))], x.reshape(-1))
    ```
    """
    h, w, c = (int(d) for d in shape)
    return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)


def latent_parts(cfg):
    """(H, W, C) shapes of the latent's parts, in latent order: the part each
    scale factors out (half its channels after a squeeze, if ``factor_out``),
    then the last scale's whole map.

    Args:
      cfg: a :class:`~rflow_tf.config.FlowConfig`.

    Returns:
      A list of (H, W, C) tuples whose sizes sum to H * W * C of the input.

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.reference_config import latent_parts

    cfg = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1, 1), factor_out=True, fc_end=False)
    assert latent_parts(cfg) == [(4, 4, 2), (4, 4, 2)]  # squeeze 4x4x4: half out, half on
    ```
    """
    h, w, c = cfg.input_shape
    if cfg.squeeze_first:
        h, w, c = h // 2, w // 2, 4 * c
    parts = []
    for _ in range(cfg.n_scales - 1):
        h, w, c = h // 2, w // 2, 4 * c
        if cfg.factor_out:
            parts.append((h, w, c - c // 2))
            c = c // 2
    parts.append((h, w, c))
    return parts


def latent_permutation(cfg):
    """Index array p with ``z_ours = z_ref[..., p]`` for a converted model of
    config ``cfg``. Both latents are the factored-out parts of each scale (if
    ``factor_out``) followed by the last scale, each part flattened: ours in
    (H, W, C) order, the reference's in (C, H, W) order; each part is
    permuted by :func:`flatten_permutation`. (The FC end, which works on the
    flattened last scale, is converted in our order, so its output is
    permuted the same way.)

    Example:
    ```python
    import numpy as np
    from rflow_tf.config import FlowConfig
    from rflow_tf.reference_config import latent_permutation

    cfg = FlowConfig(input_shape=(4, 4, 2), n_blocks=(1,), fc_end=False)
    z_ref = np.arange(32.0)[None]          # a latent in the reference's (C, H, W) order
    p = latent_permutation(cfg)
    z = z_ref[..., p]                      # ours, in (H, W, C) order
    assert z[0, :4].tolist() == [0.0, 16.0, 1.0, 17.0]   # (h, w, c) = (0,0,0) (0,0,1) (0,1,0)...
    z_ref_order = np.empty_like(z); z_ref_order[..., p] = z      # back to the reference's
    assert np.array_equal(z_ref_order, z_ref)
    ```
    """
    cfg = rmodels.FlowConfig.coerce(cfg)
    pieces, offset = [], 0
    for shape in latent_parts(cfg):
        perm = flatten_permutation(shape)
        pieces.append(perm + offset)
        offset += perm.size
    return np.concatenate(pieces)
