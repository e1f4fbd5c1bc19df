"""Flow++ logistic-mixture CDF coupling and its gated-convolution / self-attention conditioner.

Ho, Chen, Srinivas, Duan, Abbeel, "Flow++: Improving Flow-Based Generative
Models with Variational Dequantization and Architecture Design", ICML 2019.

Direction: ``forward`` is data -> latent (the closed-form direction), as in
:mod:`rflow_tf.bijectors`; the inverse is a vectorised bisection with a stated
tolerance. In a ``tfd.TransformedDistribution`` use ``tfb.Invert(coupling)``.
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf.bijectors._base import (
    KerasBacked,
    check_bisection_settings,
    hidden_sizes,
    positive_int,
)
from rflow_tf.bijectors.coupling import checkerboard_mask
from rflow_tf.bijectors.monotone import (
    bisect_increasing_with_diagnostics,
    report_bisection_failures,
    sigmoid_mixture_logit,
)

tfb = tfp.bijectors

__all__ = ["GatedAttentionConditioner", "MixLogCDFCoupling", "coupling_mask"]

#: Lower clamp of the mixture log-scales s (slopes exp(-s) <= e^7), as in Flow++.
MIN_LOG_SCALE = -7.0


def coupling_mask(event_shape, kind="checkerboard", parity=0):
    """A 0/1 coupling mask of ``event_shape``: 1 = passed through and conditioned on.

    * vectors ``(D,)``: ``kind="checkerboard"`` alternates 1, 0, 1, ... and
      ``kind="half"`` is 1 on the first ceil(D/2) entries;
    * images ``(H, W, C)``: ``"checkerboard"`` is 1 where (h + w) is even,
      ``"channel"`` is 1 on the first ceil(C/2) channels.

    ``parity=1`` swaps 0 and 1 (the next layer transforms the other half).

    Example:
    ```python
    coupling_mask((4, 4, 2), "channel", parity=1)[..., 0]   # zeros: channel 0 transformed
    ```
    """
    shape = tuple(int(s) for s in event_shape)
    if len(shape) == 1:
        idx = np.arange(shape[0])
        if kind == "checkerboard":
            mask = idx % 2 == 0
        elif kind == "half":
            mask = idx < (shape[0] + 1) // 2
        else:
            raise ValueError(f"vector masks are 'checkerboard' or 'half', got {kind!r}")
    elif len(shape) == 3:
        if kind == "checkerboard":  # the same tiles as AffineCoupling's "checkerboard0"
            mask = np.broadcast_to(checkerboard_mask(shape[0], shape[1]).numpy(), shape) > 0
        elif kind == "channel":
            mask = np.broadcast_to(np.arange(shape[2]) < (shape[2] + 1) // 2, shape)
        else:
            raise ValueError(f"image masks are 'checkerboard' or 'channel', got {kind!r}")
    else:
        raise ValueError(f"event_shape must be (D,) or (H, W, C), got {event_shape!r}")
    mask = mask.astype(np.float32)
    return 1.0 - mask if parity else mask


class GatedAttentionConditioner(keras.layers.Layer):
    """Flow++ conditioner: gated residual convolutions with multi-head self-attention.

    Input: ``[N, *positions, channels_in]`` (images: positions = (H, W), 2-D
    convolutions; vectors: positions = (D,), 1-D convolutions). Then, with
    Gate(h) = A sigmoid(B) for [A, B] = Conv1x1(h) (a gated linear unit):

        h = Conv3(x)
        repeat ``num_blocks`` times:
          h = LayerNorm(h + Gate(elu(Conv3(elu(h)))))                 (conv block)
          h = LayerNorm(h + Gate(MHSA(Conv1x1(h))))                   (attention block)
        out = Conv3(h) -> [N, *positions, out_channels, params_per_channel]

    The attention runs over all positions (``keras.layers.MultiHeadAttention``,
    ``num_heads`` heads); ``attention=False`` drops the attention blocks (the
    Flow++ ablation). The output convolution starts at zero, so a fresh
    :class:`MixLogCDFCoupling` is the identity.

    Example:
    ```python
    net = GatedAttentionConditioner(positions_rank=2, out_channels=3, params_per_channel=14,
                                    hidden_channels=32, num_blocks=1)
    net(tf.zeros([2, 8, 8, 4])).shape     # (2, 8, 8, 3, 14)
    ```
    """

    def __init__(
        self,
        positions_rank,
        out_channels,
        params_per_channel,
        hidden_channels=32,
        num_blocks=2,
        attention=True,
        num_heads=4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if positions_rank not in (1, 2):
            raise ValueError(
                f"positions_rank must be 1 (vectors) or 2 (images), got {positions_rank!r}"
            )
        self.positions_rank = positions_rank
        self.out_channels = positive_int(out_channels, "out_channels")
        self.params_per_channel = positive_int(params_per_channel, "params_per_channel")
        self.hidden_channels = hidden_sizes(hidden_channels, "hidden_channels")[0]
        self.num_blocks = int(num_blocks)
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks!r}")
        self.attention = bool(attention)
        self.num_heads = positive_int(num_heads, "num_heads")
        conv = keras.layers.Conv1D if positions_rank == 1 else keras.layers.Conv2D
        ch, dt = self.hidden_channels, self.dtype_policy
        self.conv_in = conv(ch, 3, padding="same", dtype=dt)
        conv_blocks, attn_blocks = [], []
        for k in range(self.num_blocks):
            conv_blocks.append(
                (
                    conv(ch, 3, padding="same", dtype=dt),
                    conv(2 * ch, 1, dtype=dt),
                    keras.layers.LayerNormalization(dtype=dt),
                )
            )
            if self.attention:
                attn_blocks.append(
                    (
                        conv(ch, 1, dtype=dt),
                        keras.layers.MultiHeadAttention(
                            self.num_heads, max(ch // self.num_heads, 1), dtype=dt
                        ),
                        conv(2 * ch, 1, dtype=dt),
                        keras.layers.LayerNormalization(dtype=dt),
                    )
                )
            # Every sub-layer an attribute: Keras 3 lists (of tuples) are not checkpoint
            # dependencies, so tf.train.Checkpoint / SavedModel would miss their weights.
            for part, layer in zip(("conv", "gate", "norm"), conv_blocks[k]):
                setattr(self, f"block{k}_{part}", layer)
            for part, layer in zip(
                ("proj", "attention", "attn_gate", "attn_norm"),
                attn_blocks[k] if self.attention else (),
            ):
                setattr(self, f"block{k}_{part}", layer)
        object.__setattr__(self, "conv_blocks", conv_blocks)
        object.__setattr__(self, "attn_blocks", attn_blocks)
        self.conv_out = conv(
            self.out_channels * self.params_per_channel,
            3,
            padding="same",
            kernel_initializer="zeros",
            dtype=dt,
        )

    @staticmethod
    def _gate(h):
        a, b = tf.split(h, 2, axis=-1)
        return a * tf.sigmoid(b)

    def call(self, x):
        h = self.conv_in(x)
        for k in range(self.num_blocks):
            conv3, gate, norm = self.conv_blocks[k]
            h = norm(h + self._gate(gate(tf.nn.elu(conv3(tf.nn.elu(h))))))
            if self.attention:
                proj, mhsa, gate, norm = self.attn_blocks[k]
                a = proj(h)
                shape = tf.shape(a)
                seq = tf.reshape(a, [shape[0], -1, self.hidden_channels])
                a = tf.reshape(mhsa(seq, seq), shape)
                h = norm(h + self._gate(gate(a)))
        out = self.conv_out(h)
        return tf.reshape(
            out, tf.concat([tf.shape(out)[:-1], [self.out_channels, self.params_per_channel]], 0)
        )


class MixLogCDFCoupling(KerasBacked):
    """Flow++ coupling layer with a logistic-mixture CDF elementwise map.

    With a fixed 0/1 ``mask`` (1 = conditioning part x_1, 0 = transformed
    part x_2) and per-element parameters (pi, mu, s, a, b) = NN(x_1 [, condition]):

        y_1 = x_1,
        y_2 = logit( MixLogCDF(x_2; pi, mu, s) ) * exp(a) + b,
        MixLogCDF(x; pi, mu, s) = sum_{j=1}^K pi_j sigmoid((x - mu_j) exp(-s_j)),

    pi = softmax(logits) on the simplex, s clamped below at ``MIN_LOG_SCALE``,
    a = 2 tanh(a_raw / 2) (bounded log-scale). The log-det is exact:

        log|det dy/dx| = sum_{x_2} [ a + log d logit(MixLogCDF)/dx ],

    computed in log-space from the logistic-mixture density
    (:func:`rflow_tf.bijectors.monotone.sigmoid_mixture_logit`). The inverse solves the
    increasing scalar equation for every transformed element at once by
    bisection, to within ``inverse_atol + inverse_rtol * |x|``; an element
    for which it finds no bracket or misses the tolerance is NaN and
    reported (a ``RuntimeWarning`` eagerly, stderr in a graph, the NaN only
    under XLA), never a wrong value.

    Works on vectors (``event_shape=(D,)``; the conditioner's convolutions and
    attention run over the D positions) and images (``event_shape=(H, W, C)``).
    The conditioner sees ``concat(x * mask, mask[, condition])`` on the
    channel axis; ``condition`` (a bijector kwarg, shape
    ``[..., *positions, condition_channels]``) lets another network's features
    drive the coupling (as in variational dequantisation). A freshly built
    layer is the identity (zero output convolution).

    ``forward`` is data -> latent.

    Args:
      event_shape: ``(D,)`` or ``(H, W, C)``.
      mask: ``None`` (checkerboard), a kind for :func:`coupling_mask`, or a 0/1 array of
        exactly ``event_shape`` with both values present.
      parity: with a string/``None`` mask, 1 swaps its halves.
      num_components: K >= 1 logistics per element.
      hidden_channels: the conditioner's width (:class:`GatedAttentionConditioner`).
      num_blocks: its gated conv (+ attention) blocks.
      attention: whether those blocks have attention.
      num_heads: attention heads.
      condition_channels: channels of the ``condition`` kwarg (0: none).
      inverse_atol: the bisection's absolute tolerance.
      inverse_rtol: its relative tolerance.
      inverse_max_iterations: its cap on iterations.
      dtype: float32 (default) or float64.

    Example:
    ```python
    tfd = tfp.distributions
    layer = MixLogCDFCoupling((8, 8, 2), mask="checkerboard", num_components=4,
                              hidden_channels=16, num_blocks=1)
    dist = tfd.TransformedDistribution(
        tfd.Independent(tfd.Normal(tf.zeros([8, 8, 2]), 1.0), 3), tfb.Invert(layer))
    dist.log_prob(tf.random.normal([4, 8, 8, 2]))         # [4]
    ```

    #### References
    [1] Ho et al., Flow++, ICML 2019, Sections 3.2-3.3.
    """

    def __init__(
        self,
        event_shape,
        mask=None,
        parity=0,
        num_components=4,
        hidden_channels=32,
        num_blocks=2,
        attention=True,
        num_heads=4,
        condition_channels=0,
        inverse_atol=1e-6,
        inverse_rtol=1e-6,
        inverse_max_iterations=200,
        dtype=tf.float32,
        validate_args=False,
        name="mixlogcdf_coupling",
    ):
        parameters = dict(locals())
        self.event_shape_ = tuple(int(s) for s in event_shape)
        if len(self.event_shape_) not in (1, 3) or min(self.event_shape_) < 1:
            raise ValueError(
                f"event_shape must be (D,) or (H, W, C) with positive sizes, got {event_shape!r}"
            )
        self.num_components = positive_int(num_components, "num_components")
        self.condition_channels = int(condition_channels)
        if self.condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {condition_channels!r}")
        dtype, self.inverse_atol, self.inverse_rtol, self.inverse_max_iterations = (
            check_bisection_settings(dtype, inverse_atol, inverse_rtol, inverse_max_iterations)
        )
        if mask is None or isinstance(mask, str):
            kind = mask or "checkerboard"
            mask = coupling_mask(self.event_shape_, kind, parity)
        mask = np.asarray(mask, dtype=np.float64)
        if mask.shape != self.event_shape_:
            raise ValueError(
                f"mask mismatch: mask has shape {mask.shape}, but event_shape is "
                f"{self.event_shape_}"
            )
        if not np.all((mask == 0) | (mask == 1)) or mask.min() == mask.max():
            raise ValueError(
                "mask must hold only 0 and 1, and both (something to condition "
                "on and something to transform)"
            )
        self._mask_np = mask
        self.mask = tf.constant(mask, dtype)
        channels = 1 if len(self.event_shape_) == 1 else self.event_shape_[-1]
        self.net = GatedAttentionConditioner(
            positions_rank=len(self.event_shape_) - 1 or 1,
            out_channels=channels,
            params_per_channel=3 * self.num_components + 2,
            hidden_channels=hidden_channels,
            num_blocks=num_blocks,
            attention=attention,
            num_heads=num_heads,
            dtype=dtype.name,
            name=f"{name}_net",
        )
        self.net(
            self._net_input(
                tf.zeros((1,) + self.event_shape_, dtype),
                tf.zeros((1,) + self._positions() + (self.condition_channels,), dtype)
                if self.condition_channels
                else None,
            )
        )
        self._track_keras(self.net)
        super().__init__(
            forward_min_event_ndims=len(self.event_shape_),
            dtype=dtype,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    def _positions(self):
        return self.event_shape_ if len(self.event_shape_) == 1 else self.event_shape_[:2]

    def _as_channels(self, t):
        """[N, *event] -> [N, *positions, C] (vectors get one channel)."""
        return t[..., None] if len(self.event_shape_) == 1 else t

    def _net_input(self, x_flat, condition):
        mask = tf.broadcast_to(self.mask, tf.shape(x_flat))
        parts = [self._as_channels(x_flat * mask), self._as_channels(mask)]
        if self.condition_channels:
            parts.append(condition)
        return tf.concat(parts, axis=-1)

    def _flat(self, x, condition):
        rank = len(self.event_shape_)
        if x.shape.rank is not None and tuple(x.shape[-rank:]) != self.event_shape_:
            raise ValueError(
                f"{self.name}: expected event shape {self.event_shape_}, "
                f"got input of shape {x.shape}"
            )
        flat = tf.reshape(x, (-1,) + self.event_shape_)
        if self.condition_channels:
            if condition is None:
                raise ValueError(
                    f"{self.name} was built with condition_channels="
                    f"{self.condition_channels}: pass condition=... (shape "
                    f"[..., *{self._positions()}, {self.condition_channels}])"
                )
            condition = tf.reshape(
                tf.convert_to_tensor(condition, self.dtype),
                (-1,) + self._positions() + (self.condition_channels,),
            )
        elif condition is not None:
            raise ValueError(f"{self.name} takes no condition (condition_channels=0)")
        return flat, condition

    def _elementwise(self, x_flat, condition):
        """Per-element (log_w, log_a, b) of the mixture and (a, b) of the affine part."""
        params = self.net(self._net_input(x_flat, condition))
        params = tf.reshape(params, tf.concat([tf.shape(x_flat), [-1]], 0))
        k = self.num_components
        logits, mu, log_s = params[..., :k], params[..., k : 2 * k], params[..., 2 * k : 3 * k]
        log_s = tf.maximum(log_s, MIN_LOG_SCALE)
        scale = 2.0 * tf.tanh(0.5 * params[..., 3 * k])
        shift = params[..., 3 * k + 1]
        return (tf.nn.log_softmax(logits, axis=-1), -log_s, -mu * tf.exp(-log_s)), scale, shift

    def forward_and_log_det(self, x, condition=None):
        """(y, log|det dy/dx|) from one conditioner pass (``forward`` and
        ``forward_log_det_jacobian`` each run it once).

        Example: ``y, ld = layer.forward_and_log_det(x)``.
        """
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        flat, condition = self._flat(x, condition)
        mixture, scale, shift = self._elementwise(flat, condition)
        z, log_dz = sigmoid_mixture_logit(flat, *mixture)
        y = self.mask * flat + (1.0 - self.mask) * (z * tf.exp(scale) + shift)
        axes = list(range(1, 1 + len(self.event_shape_)))
        ld = tf.reduce_sum((1.0 - self.mask) * (log_dz + scale), axis=axes)
        return tf.reshape(y, tf.shape(x)), tf.reshape(ld, tf.shape(x)[: -len(self.event_shape_)])

    def _forward(self, x, condition=None):
        return self.forward_and_log_det(x, condition)[0]

    def _forward_log_det_jacobian(self, x, condition=None):
        return self.forward_and_log_det(x, condition)[1]

    def _inverse(self, y, condition=None):
        flat, condition = self._flat(y, condition)
        mixture, scale, shift = self._elementwise(flat, condition)  # y_1 = x_1
        keep = self.mask > 0.5
        # Only the transformed elements are solved for (the others get the easy y = 0).
        target = tf.where(keep, tf.zeros_like(flat), (flat - shift) * tf.exp(-scale))
        x2, bracketed, ok = bisect_increasing_with_diagnostics(
            lambda t: sigmoid_mixture_logit(t, *mixture)[0],
            target,
            self.inverse_atol,
            self.inverse_rtol,
            self.inverse_max_iterations,
        )
        x2 = report_bisection_failures(
            x2, bracketed | keep, ok | keep, self.name, self.inverse_max_iterations
        )
        x = tf.where(keep, flat, x2)  # a NaN x2 stays NaN; a kept x_1 is never touched
        return tf.reshape(x, tf.shape(y))
