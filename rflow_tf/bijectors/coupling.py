"""Affine coupling bijectors: the coupling baseline of the Residual Flows paper.

The paper (Section 5.4, Tables 4 and 5) compares residual blocks against
RealNVP-style affine coupling blocks built exactly like its residual models.
This module builds those coupling blocks the way the authors' reference does:

* :class:`AffineCoupling` -- one affine coupling bijector. Half of the input
  (chosen by a mask) conditions an unconstrained network that outputs a
  log-scale pre-activation ``s`` and a shift ``t`` for the other half:

      y_keep = x_keep
      y_tr   = x_tr * sigmoid(s + 2) + t,        (s, t) = net(x_keep)
      log |det dy/dx| = sum log sigmoid(s + 2)     (over the transformed half)

  The scale sigmoid(s + 2) lies in (0, 1) and starts near 0.88, which keeps
  deep stacks stable (the reference's choice; RealNVP uses exp(s)).
* Masks (:data:`MASK_TYPES`): ``"checkerboard0"`` / ``"checkerboard1"``
  (pixels with (i + j) even / odd condition, the net sees the masked image
  with all channels and outputs 2C channels), used in the first scale;
  ``"channel0"`` / ``"channel1"`` (the first / second half of the last axis
  conditions, the net sees C/2 channels and outputs C), used after the first
  squeeze and in the fully connected end. Consecutive blocks alternate the
  suffix (:func:`alternating_masks`), so every element is transformed.
* Networks: :func:`coupling_conv_net` ([ReLU] conv k1 -> ReLU -> conv k2 ->
  ReLU -> conv k3, "3-1-3", no Lipschitz constraint) and
  :func:`coupling_dense_net` (the FC-end blocks: [ReLU] dense 128 -> ReLU ->
  dense 128 -> ReLU -> dense, on the flattened half). Weights start as in
  PyTorch's defaults, uniform in +-1/sqrt(fan_in), like the reference.

Direction convention: as everywhere in rflow_tf, ``forward`` maps data to
latent (here the reference's forward, the cheap direction is both ways), so
use a flow through ``tfb.Invert`` in a ``TransformedDistribution``.

Why not ``tfb.RealNVP``: it splits only along the last axis (no checkerboard
masks), parameterises the scale as exp(s), and keys TFP's result cache on the
input tensor, which goes stale when Keras weights change; these bijectors use
rflow_tf's fresh cache (:class:`rflow_tf.bijectors.IResBlock` does the same)
and list their Keras weights in ``trainable_variables``.

Example:
```python
import tensorflow as tf
import tensorflow_probability as tfp
from rflow_tf.bijectors import coupling
tfb, tfd = tfp.bijectors, tfp.distributions

blocks = [coupling.AffineCoupling.conv((8, 8, 1), mask, hidden_channels=32)
          for mask in coupling.alternating_masks("checkerboard", 4)]
flow = tfb.Chain(blocks[::-1])                    # data -> latent, blocks[0] first
dist = tfd.TransformedDistribution(
    tfd.Independent(tfd.Normal(tf.zeros([8, 8, 1]), 1.0), 3), tfb.Invert(flow))
x = tf.random.uniform([16, 8, 8, 1])
lp = dist.log_prob(x)                             # exact: the log-det is a sum
len(dist.trainable_variables)                     # 4 blocks x 3 convs x 2 = 24
```

References:
  [1] L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP.
      ICLR 2017.
  [2] R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows
      for Invertible Generative Modeling. NeurIPS 2019 (Section 5.4).
"""

import math

import keras
import tensorflow as tf

from rflow_tf.bijectors._base import KerasBacked, checked_event_input
from rflow_tf.layers.initializers import torch_default_uniform

__all__ = [
    "AffineCoupling",
    "MASK_TYPES",
    "alternating_masks",
    "checkerboard_mask",
    "coupling_conv_net",
    "coupling_dense_net",
]

#: Masks accepted by :class:`AffineCoupling`; the digit says which half conditions.
MASK_TYPES = ("checkerboard0", "checkerboard1", "channel0", "channel1")

#: log sigmoid(s + SCALE_OFFSET) is the log-scale (the reference's +2).
SCALE_OFFSET = 2.0


def checkerboard_mask(height, width, parity=0, dtype=tf.float32):
    """The [height, width, 1] checkerboard: 1 where (i + j) % 2 == parity.

    The 1s mark the pixels that are kept (and condition the net) in an
    :class:`AffineCoupling` with mask ``f"checkerboard{parity}"``; the 0s are
    transformed. Parity 0 is the reference's [[1, 0], [0, 1]] tile.

    Example:
    ```python
    checkerboard_mask(2, 3)[..., 0]   # [[1, 0, 1], [0, 1, 0]]
    ```
    """
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    i = tf.range(height)[:, None]
    j = tf.range(width)[None, :]
    return tf.cast(tf.equal((i + j) % 2, parity), dtype)[..., None]


def alternating_masks(kind, n, first=0):
    """``n`` mask names of ``kind`` ("checkerboard" or "channel") whose
    conditioning half alternates, starting with ``first`` (0 or 1): the
    reference flips its mask before every coupling block of a scale,
    starting with "0".

    Example:
    ```python
    alternating_masks("channel", 3)   # ['channel0', 'channel1', 'channel0']
    ```
    """
    if kind not in ("checkerboard", "channel"):
        raise ValueError(f"kind must be 'checkerboard' or 'channel', got {kind!r}")
    if first not in (0, 1):
        raise ValueError(f"first must be 0 or 1, got {first!r}")
    return [f"{kind}{(first + i) % 2}" for i in range(int(n))]


def _net_shapes(event_shape, mask):
    """(input shape, output shape) of the net of a ``mask`` coupling on ``event_shape``."""
    event_shape = tuple(int(d) for d in event_shape)
    if mask.startswith("checkerboard"):
        return event_shape, event_shape[:-1] + (2 * event_shape[-1],)
    return event_shape[:-1] + (event_shape[-1] // 2,), event_shape


def _kernels(kernels):
    try:
        ks = [int(k) for k in str(kernels).split("-")]
    except ValueError:
        ks = []
    if not ks or any(k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(f"kernels must be odd sizes joined by '-', like '3-1-3'; got {kernels!r}")
    return ks


def coupling_conv_net(
    input_shape,
    out_channels,
    hidden_channels=512,
    kernels="3-1-3",
    preactivation=True,
    dtype="float32",
    name=None,
):
    """The reference's coupling network for images (no Lipschitz constraint):

        [ReLU] -> Conv_k1(C_in -> h) -> ReLU -> Conv_k2(h -> h) -> ReLU -> ... -> Conv_kL(h -> out)

    with "same" padding, so the output has the input's height and width.
    Weights and biases start uniform in +-1/sqrt(fan_in) (PyTorch's default).

    Args:
      input_shape: (H, W, C_in) of the net's input, without batch.
      out_channels: Output channels (2C for a checkerboard coupling on C
        channels, C for a channel coupling).
      hidden_channels: Width h of the hidden convolutions.
      kernels: Kernel sizes joined by "-" (one conv each), e.g. "3-1-3".
      preactivation: Apply ReLU to the input first (the reference does, except
        in the first block of a model).
      dtype: Keras dtype of the weights.
      name: Optional model name.

    Example:
    ```python
    net = coupling_conv_net((8, 8, 2), out_channels=4, hidden_channels=64)
    net(tf.zeros([1, 8, 8, 2])).shape   # (1, 8, 8, 4)
    ```
    """
    ks = _kernels(kernels)
    layers = [keras.layers.ReLU(dtype=dtype)] if preactivation else []
    c_in = int(input_shape[-1])
    for i, k in enumerate(ks):
        out = int(out_channels) if i == len(ks) - 1 else int(hidden_channels)
        init = torch_default_uniform(k * k * c_in)
        layers.append(
            keras.layers.Conv2D(
                out, k, padding="same", kernel_initializer=init, bias_initializer=init, dtype=dtype
            )
        )
        if i < len(ks) - 1:
            layers.append(keras.layers.ReLU(dtype=dtype))
        c_in = out
    inputs = [keras.Input(shape=tuple(int(d) for d in input_shape), dtype=dtype)]
    return keras.Sequential(inputs + layers, name=name)


def coupling_dense_net(
    input_shape,
    output_shape,
    hidden_units=(128, 128),
    preactivation=True,
    dtype="float32",
    name=None,
):
    """The reference's fully connected coupling network (its "FC end"):

        flatten -> [ReLU] -> Dense(h1) -> ReLU -> ... -> Dense(h_L) -> ReLU
                -> Dense(prod(out)) -> reshape

    Weights and biases start uniform in +-1/sqrt(fan_in) (PyTorch's default).

    Args:
      input_shape: Shape of the net's input without batch (e.g. (H, W, C/2)).
      output_shape: Shape of its output without batch (e.g. (H, W, C)).
      hidden_units: Widths of the hidden layers (the reference: (128, 128)).
      preactivation: Apply ReLU to the input first (the reference's default).
      dtype: Keras dtype of the weights.
      name: Optional model name.

    Example:
    ```python
    net = coupling_dense_net((2, 2, 8), (2, 2, 16))
    net(tf.zeros([1, 2, 2, 8])).shape   # (1, 2, 2, 16)
    ```
    """
    input_shape = tuple(int(d) for d in input_shape)
    output_shape = tuple(int(d) for d in output_shape)
    fan_in = math.prod(input_shape)
    layers = [keras.layers.Reshape((fan_in,), dtype=dtype)]
    if preactivation:
        layers.append(keras.layers.ReLU(dtype=dtype))
    for units in list(hidden_units) + [math.prod(output_shape)]:
        init = torch_default_uniform(fan_in)
        layers.append(
            keras.layers.Dense(
                int(units), kernel_initializer=init, bias_initializer=init, dtype=dtype
            )
        )
        layers.append(keras.layers.ReLU(dtype=dtype))
        fan_in = int(units)
    layers[-1] = keras.layers.Reshape(output_shape, dtype=dtype)  # no ReLU at the end
    return keras.Sequential([keras.Input(shape=input_shape, dtype=dtype)] + layers, name=name)


class AffineCoupling(KerasBacked):
    """Affine coupling bijector with the reference's sigmoid scale.

    With a binary mask b (1 = kept, conditions the net) the forward map
    (data -> latent) is

        (s, t)  = split(net(x_keep), 2, axis=-1)
        y       = x_keep  (+)  x_tr * sigmoid(s + 2) + t
        log |det dy/dx| = sum_{transformed i} log sigmoid(s_i + 2)

    and the inverse x_tr = (y_tr - t) / sigmoid(s + 2) uses the same net on
    y_keep = x_keep, so both directions cost one net evaluation and the
    log-det is exact. Masks:

    * ``"checkerboard0"`` / ``"checkerboard1"``: x_keep = b * x with b the
      :func:`checkerboard_mask` of parity 0 / 1 on every channel; the net maps
      [H, W, C] -> [H, W, 2C] and only the (1 - b) positions of s, t are used.
    * ``"channel0"`` / ``"channel1"``: the first / second half of the last
      axis is kept; the net maps [..., C/2] -> [..., C]. Works for images
      [H, W, C] and vectors [D] (C, D even).

    The net must treat examples independently (no batch statistics). Use
    :meth:`conv` / :meth:`dense` for the reference's networks, or pass any
    Keras layer/model with the shapes above.

    Args:
      net: A Keras layer or model (its weights appear in
        ``trainable_variables``).
      event_shape: The event shape (H, W, C) or (D,) of x, without batch.
      mask: One of :data:`MASK_TYPES`.
      validate_args: Check inputs for NaN/Inf.
      name: Bijector name.

    Example:
    ```python
    block = AffineCoupling.conv((8, 8, 4), "channel1", hidden_channels=64)
    x = tf.random.normal([2, 8, 8, 4])
    y, ld = block.forward_and_log_det(x)        # ld: [2]
    x_back = block.inverse(y)                   # equals x up to rounding
    ```
    """

    def __init__(
        self, net, event_shape, mask="channel0", validate_args=False, name="affine_coupling"
    ):
        parameters = dict(locals())
        if not callable(net):
            raise TypeError(f"net must be a callable Keras layer or model, got {type(net)}")
        if mask not in MASK_TYPES:
            raise ValueError(f"mask must be one of {MASK_TYPES}, got {mask!r}")
        self.event_shape_ = tuple(int(d) for d in event_shape)
        self.mask = mask
        self._checkerboard = mask.startswith("checkerboard")
        self._parity = int(mask[-1])  # which half is kept
        if self._checkerboard and len(self.event_shape_) != 3:
            raise ValueError(
                f"checkerboard masks need an image event shape (H, W, C), got {self.event_shape_}"
            )
        if not self._checkerboard and self.event_shape_[-1] % 2:
            raise ValueError(
                f"channel masks need an even last dimension, got event shape {self.event_shape_}"
            )
        self._net = net
        in_shape, want = _net_shapes(self.event_shape_, mask)
        dtype = getattr(net, "compute_dtype", None) or "float32"
        out_shape = tuple(net(tf.zeros((1,) + in_shape, dtype)).shape[1:])
        if out_shape != want:
            raise ValueError(
                f"net maps {in_shape} to {out_shape}; a {mask} coupling on event "
                f"shape {self.event_shape_} needs output shape {want}"
            )
        self._track_keras(net)
        super().__init__(
            forward_min_event_ndims=len(self.event_shape_),
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @classmethod
    def conv(
        cls,
        event_shape,
        mask,
        hidden_channels=512,
        kernels="3-1-3",
        preactivation=True,
        dtype="float32",
        **kwargs,
    ):
        """A coupling on images (H, W, C) with :func:`coupling_conv_net` (the
        reference's image coupling block).

        Example: ``AffineCoupling.conv((28, 28, 1), "checkerboard0", preactivation=False)``.
        """
        if mask not in MASK_TYPES:
            raise ValueError(f"mask must be one of {MASK_TYPES}, got {mask!r}")
        in_shape, out_shape = _net_shapes(event_shape, mask)
        net = coupling_conv_net(
            in_shape, out_shape[-1], hidden_channels, kernels, preactivation, dtype
        )
        return cls(net, event_shape, mask, **kwargs)

    @classmethod
    def dense(
        cls,
        event_shape,
        mask="channel0",
        hidden_units=(128, 128),
        preactivation=True,
        dtype="float32",
        **kwargs,
    ):
        """A channel coupling with :func:`coupling_dense_net` on the flattened
        kept half (the reference's FC-end coupling block).

        Example: ``AffineCoupling.dense((2, 2, 16), "channel1")``.
        """
        if not str(mask).startswith("channel"):
            raise ValueError(
                f"dense couplings split channels: mask must be 'channel0' or "
                f"'channel1', got {mask!r}"
            )
        event_shape = tuple(int(d) for d in event_shape)
        half = event_shape[:-1] + (event_shape[-1] // 2,)
        net = coupling_dense_net(half, event_shape, hidden_units, preactivation, dtype)
        return cls(net, event_shape, mask, **kwargs)

    @property
    def net(self):
        """The Keras network computing (s, t)."""
        return self._net

    def _flatten_batch(self, x, name):
        x = checked_event_input(self, x, name)
        nd = len(self.event_shape_)
        batch_shape = tf.shape(x)[: tf.rank(x) - nd]
        return tf.reshape(x, (-1,) + self.event_shape_), batch_shape

    def _keep_mask(self, dtype):
        return checkerboard_mask(*self.event_shape_[:2], self._parity, dtype)

    def _split(self, x):
        """(kept part, part to transform) of x [B, *event_shape]."""
        if self._checkerboard:
            return self._keep_mask(x.dtype) * x, x
        a, b = tf.split(x, 2, axis=-1)
        return (b, a) if self._parity else (a, b)

    def _merge(self, kept, transformed):
        if self._checkerboard:
            return kept + (1.0 - self._keep_mask(kept.dtype)) * transformed
        parts = [transformed, kept] if self._parity else [kept, transformed]
        return tf.concat(parts, axis=-1)

    def _log_scale_and_shift(self, kept):
        s, t = tf.split(tf.cast(self._net(kept), kept.dtype), 2, axis=-1)
        return tf.math.log_sigmoid(s + SCALE_OFFSET), t

    def _log_det(self, log_scale):
        if self._checkerboard:
            log_scale = (1.0 - self._keep_mask(log_scale.dtype)) * log_scale
        return tf.reduce_sum(tf.reshape(log_scale, [tf.shape(log_scale)[0], -1]), axis=1)

    def forward_and_log_det(self, x, seed=None, training=False):
        """(y, log |det dy/dx|) with one evaluation of the net; the log-det
        has the batch shape of x. ``seed`` and ``training`` are accepted for
        the interface of :meth:`rflow_tf.bijectors.IResBlock.forward_and_log_det`
        and ignored (the coupling is deterministic)."""
        xf, batch_shape = self._flatten_batch(x, "x")
        kept, part = self._split(xf)
        log_scale, shift = self._log_scale_and_shift(kept)
        y = self._merge(kept, part * tf.exp(log_scale) + shift)
        return (tf.reshape(y, tf.shape(x)), tf.reshape(self._log_det(log_scale), batch_shape))

    def _forward(self, x, **kwargs):
        return self.forward_and_log_det(x)[0]

    def _forward_log_det_jacobian(self, x, **kwargs):
        return self.forward_and_log_det(x)[1]

    def _inverse(self, y, **kwargs):
        yf, _ = self._flatten_batch(y, "y")
        kept, part = self._split(yf)
        log_scale, shift = self._log_scale_and_shift(kept)
        x = self._merge(kept, (part - shift) * tf.exp(-log_scale))
        return tf.reshape(x, tf.shape(y))

    def _inverse_log_det_jacobian(self, y, **kwargs):
        yf, batch_shape = self._flatten_batch(y, "y")
        log_scale, _ = self._log_scale_and_shift(self._split(yf)[0])
        return -tf.reshape(self._log_det(log_scale), batch_shape)
