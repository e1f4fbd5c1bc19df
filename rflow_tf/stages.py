"""The stages of a FlowConfig's multiscale flow (data -> latent): per scale its
blocks (residual blocks, affine or Flow++ couplings, 1x1 convolutions,
ActNorms), the squeezes and factor-outs between scales, the logit transform
before and the FC blocks after. :class:`rflow_tf.flow.FlowBijector` runs them.

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

Variants (:class:`~rflow_tf.config.FlowConfig`): ``block="coupling"`` replaces every residual
block by an affine coupling (:mod:`rflow_tf.bijectors.coupling`; exact log-det),
``invertible_1x1`` puts a Glow 1x1 convolution before every block of every
scale, ``init_layer="cifar10"`` replaces the logit by per-channel
normalisation, and ``n_classes`` adds classifier heads
(:class:`rflow_tf.classifier.ClassifierHeads`) on each scale's output (the
squeezed output, or with factor-out the factored half) and on the final
output (:meth:`rflow_tf.models.ResidualFlow.classify`,
:meth:`rflow_tf.models.ResidualFlow.log_prob_and_logits`).

Latent layout: a flat vector of size D. Without factor-out it is the output of
the last stage. With factor-out it is ``[factored_0, factored_1, ...,
final]``, each factored part flattened in (h, w, c) order. The authors'
PyTorch code flattens (c, h, w) instead, in the latent and before the FC end;
that is a fixed permutation (the same model once weights are permuted), the
one remaining layout difference from the reference (see :class:`~rflow_tf.config.FlowConfig`).
"""

import numpy as np
import tensorflow_probability as tfp

from rflow_tf import bijectors as rbij
from rflow_tf import classifier as rclf
from rflow_tf import layers as rlayers
from rflow_tf.bijectors import coupling as rcoup
from rflow_tf.bijectors import invertible_conv as rinv
from rflow_tf.bijectors import mixlogcdf as rmix
from rflow_tf.flow import FactorOut

tfb = tfp.bijectors


def build_stages(cfg, named_layers, feature_stages, last_shape):
    """The stages (data -> latent) of ``cfg``'s flow; appends the Keras
    layers to ``named_layers``, ``(stage, feature shape)`` of the stages
    after which a classifier head reads a feature map to ``feature_stages``
    (inter-scale squeezes: their output; factor-outs: their factored
    half) and the last scale's (H, W, C) to ``last_shape``.

    Per scale s: ``n_blocks[s]`` blocks (residual blocks, affine couplings
    or Flow++ couplings; with ``invertible_1x1`` a 1x1 convolution before each),
    each followed by an ActNorm if ``actnorm``; between scales a squeeze
    (H, W, C) -> (H/2, W/2, 4C) and, with ``factor_out``, a FactorOut that
    sends half of the channels to the latent. The flow begins with the logit
    transform (and an ActNorm); the last scale ends with the flattening and
    the FC blocks (``fc_end``).

    Args:
      cfg: a :class:`~rflow_tf.config.FlowConfig`.
      named_layers: a list that receives ``(name, Keras layer)`` pairs.
      feature_stages: a list that receives ``(stage, feature shape)`` pairs.
      last_shape: a list that receives the last scale's H, W, C.

    Returns:
      The list of stages, TFP bijectors applied in order (data -> latent).

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.stages import build_stages

    cfg = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1, 1), hidden_channels=4, fc_end=False)
    named_layers, feature_stages, last_shape = [], [], []
    stages = build_stages(cfg, named_layers, feature_stages, last_shape)
    assert [type(b).__name__ for b in stages] == [
        "LogitTransform", "ActNorm", "IResBlock", "ActNorm",  # scale 0, 8x8x1
        "Squeeze", "IResBlock", "ActNorm", "Reshape"]  # scale 1, 4x4x4, flattened
    assert last_shape == [4, 4, 4] and feature_stages[0][1] == (4, 4, 4)
    assert [name for name, _ in named_layers][:2] == ["s0_actnorm0", "s0_block0_net"]
    ```
    """
    dtype = cfg.dtype
    block_kwargs = dict(
        logdet=cfg.logdet,
        logdet_eval=cfg.logdet_eval_mode,
        dist=cfg.dist,
        rate=cfg.rate,
        p=cfg.p,
        n_exact_terms=cfg.n_exact_terms,
        n_exact_terms_eval=cfg.n_exact_terms_eval,
        n_samples=cfg.n_samples,
        n_terms=cfg.n_terms,
        probe=cfg.probe,
        neumann_grad=cfg.neumann_grad,
        grad_in_forward=cfg.grad_in_forward,
        inverse_atol=cfg.inverse_tol,
        inverse_rtol=cfg.inverse_tol,
        inverse_max_iterations=cfg.inverse_max_iterations,
    )
    if cfg.condition_classes:
        block_kwargs["condition_size"] = cfg.condition_embedding

    def actnorm(shape, name):
        layer = rlayers.ActNormalization(
            variance="unbiased" if cfg.init == "reference" else "biased", dtype=dtype, name=name
        )
        named_layers.append((name, layer))
        return rbij.ActNorm(shape, layer=layer, name=name)

    def flowpp_coupling(shape, mask, parity, name):
        return rmix.MixLogCDFCoupling(
            shape,
            mask=mask,
            parity=parity,
            num_components=cfg.flowpp_components,
            hidden_channels=cfg.hidden_channels,
            num_blocks=cfg.flowpp_conditioner_blocks,
            attention=cfg.flowpp_attention,
            num_heads=cfg.flowpp_heads,
            inverse_atol=cfg.inverse_tol,
            inverse_rtol=cfg.inverse_tol,
            inverse_max_iterations=cfg.inverse_max_iterations,
            dtype=dtype,
            name=name,
        )

    def conv_block(s, i, shape, mask):
        first = cfg.first_resblock and s == 0 and i == 0
        preact = cfg.preactivation and not first
        if cfg.block == "flowpp":
            channel = s > 0 and i < cfg.flowpp_channel_couplings
            return flowpp_coupling(
                shape, "channel" if channel else "checkerboard", i % 2, f"s{s}_block{i}"
            )
        if cfg.block == "coupling":
            return rcoup.AffineCoupling.conv(
                shape,
                mask,
                hidden_channels=cfg.hidden_channels,
                kernels=cfg.kernels,
                preactivation=preact,
                dtype=dtype,
                name=f"s{s}_block{i}",
            )
        return rbij.IResBlock.conv(
            shape,
            hidden_channels=cfg.hidden_channels,
            kernels=cfg.kernels,
            coeff=cfg.coeff,
            activation=cfg.activation,
            preactivation=preact,
            dtype=dtype,
            init=cfg.init,
            vnorms=cfg.vnorms,
            learn_p=cfg.learn_p,
            name=f"s{s}_block{i}",
            **block_kwargs,
        )

    def fc_block(i, d, mask):
        if cfg.block == "flowpp":
            return flowpp_coupling((d,), "checkerboard", i % 2, f"fc_block{i}")
        if cfg.block == "coupling":
            return rcoup.AffineCoupling.dense(
                (d,),
                mask,
                hidden_units=cfg.fc_hidden,
                preactivation=cfg.preactivation,
                dtype=dtype,
                name=f"fc_block{i}",
            )
        return rbij.IResBlock.dense(
            d,
            hidden_units=cfg.fc_hidden,
            coeff=cfg.coeff,
            activation=cfg.activation,
            preactivation=cfg.preactivation,
            dtype=dtype,
            init=cfg.init,
            vnorms=cfg.vnorms,
            learn_p=cfg.learn_p,
            name=f"fc_block{i}",
            **block_kwargs,
        )

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
                conv = rinv.Invertible1x1Conv(
                    shape,
                    seed=int(np.random.randint(2**31 - 1)),
                    dtype=dtype,
                    name=f"s{s}_inv1x1_{i}",
                )
                named_layers.append((conv.name, conv.layer))
                out.append(conv)
            blk = conv_block(s, i, shape, kind + masks[i][-1])
            named_layers.append((f"{blk.name}_net", blk.net))
            if getattr(blk, "condition_net", None) is not None:
                named_layers.append((f"{blk.name}_context_net", blk.condition_net))
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
                feature_stages.append((fo, (h // 2, w // 2, 2 * c)))  # factored half
                out.append(fo)
                return out
            feature_stages.append((squeeze, squeezed))  # the squeezed scale output
            return out + scale(s + 1, squeezed)
        d = h * w * c
        out.append(tfb.Reshape(event_shape_out=[d], event_shape_in=[h, w, c], name="flatten"))
        for i in range(n_fc):
            blk = fc_block(i, d, masks[cfg.n_blocks[s] + i])
            named_layers.append((f"{blk.name}_net", blk.net))
            if getattr(blk, "condition_net", None) is not None:
                named_layers.append((f"{blk.name}_context_net", blk.condition_net))
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
