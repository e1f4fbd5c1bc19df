"""Hybrid modelling: classifier heads on a flow, the hybrid loss, and the
CIFAR-10 per-channel normalisation (paper Section 5.4, Tables 4 and 5).

A hybrid model (Nalisnick et al. 2019) trains one flow as a density model
p(x) and a classifier p(y | x) that reads the flow's hidden representations:

* :class:`ClassifierHeads` -- the reference's heads. For each scale s with
  features h_s of shape [B, H_s, W_s, C_s] (with factor-out: the factored
  half; the last head reads the final output):

      a_s = mean_{i,j} ReLU(ActNorm(Conv3x3_{C_s -> 256}(h_s)))[i, j, :]   in R^256
      logits = Dense_{n_classes}(concat(a_1, ..., a_S))

  (The reference's last head reads a stale tensor when factor-out is on;
  callers here pass the final output.) With ``pooling="flatten"`` (not the
  reference) a_s is the whole map ReLU(ActNorm(Conv3x3(h_s))) flattened to
  R^{H_s W_s K}, so the Dense sees where the features are, not only their
  spatial means.
* :func:`hybrid_loss` -- per image, in nats:

      loss = lambda * (-log p(x)) - log p(y | x),

  with lambda a number (the paper: 1, or 0 for a pure classifier) or
  ``"1/D"`` (D = dimensions per image), via :func:`resolve_hybrid_lambda`;
  optionally with label smoothing (not the reference's).
  (The reference trains on the same objective in bits: its
  ``bpd * D + crossent / ln 2`` is lambda = 1 divided by ln 2, and with
  ``--scale-dim`` ``bpd + crossent / ln 2`` is lambda = 1/D divided by
  D ln 2.)
* :class:`ChannelNormalize` -- y = (x - mean) / std per channel, the
  reference's replacement for the logit layer in CIFAR-10 hybrid and
  classification runs (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`), as a
  bijector with exact log-det -(H W) sum_c log std_c.

Example:
```python
import tensorflow as tf
from rflow_tf import classifier

heads = classifier.ClassifierHeads(n_classes=10)
features = [tf.random.normal([8, 4, 4, 8]), tf.random.normal([8, 2, 2, 16])]
logits = heads(features)                                 # [8, 10]
labels = tf.zeros([8], tf.int64)
log_px = tf.random.normal([8]) - 100.0                   # from the flow
loss = classifier.hybrid_loss(log_px, logits, labels, "1/D", num_dims=64)   # [8]
```

References:
  [1] E. Nalisnick, A. Matsukawa, Y. W. Teh, D. Gorur, B. Lakshminarayanan.
      Hybrid Models with Deep and Invertible Features. ICML 2019.
  [2] R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows
      for Invertible Generative Modeling. NeurIPS 2019 (Section 5.4).
"""

import numbers

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rlayers
from rflow_tf.layers.initializers import torch_default_uniform

tfb = tfp.bijectors

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "ChannelNormalize",
    "ClassifierHeads",
    "HEAD_POOLINGS",
    "hybrid_loss",
    "resolve_hybrid_lambda",
]

#: How a classifier head turns its feature map into a vector
#: (:class:`ClassifierHeads` ``pooling``): "average" = global average pooling
#: (the reference), "flatten" = no pooling.
HEAD_POOLINGS = ("average", "flatten")

#: Per-channel (R, G, B) mean and standard deviation of CIFAR-10 pixels in
#: [0, 1], as used by the reference's classification / hybrid runs.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class ClassifierHeads(keras.layers.Layer):
    """Per-scale classifier heads and the final linear layer (a Keras 3 layer).

    Called on a list of per-scale feature maps h_s [B, H_s, W_s, C_s], with
    z_s = ReLU(ActNorm(Conv3x3(h_s))) [B, H_s, W_s, K] (K = hidden_channels):

        a_s    = mean_{i,j} z_s[:, i, j, :]                [B, K]   pooling="average"
        a_s    = reshape(z_s, [B, H_s W_s K])              [B, H_s W_s K]   pooling="flatten"
        logits = Dense(concat_s a_s)                       [B, n_classes]

    "average" (global average pooling) is the reference's head, designed for
    32x32 images; "flatten" keeps where each feature is (the Dense then has
    sum_s H_s W_s K inputs, so use a small K), meant for tiny images such as
    the 8x8 digits, whose identity depends on where the strokes are.

    Conv3x3 has "same" padding; ActNorm is
    :class:`rflow_tf.layers.ActNormalization` (per-channel affine with
    data-dependent initialisation on the first batch seen outside a replica
    context; under a distribution strategy call :meth:`initialize` first).
    Weights start uniform in +-1/sqrt(fan_in) (PyTorch's default, as in
    the reference).

    Args:
      n_classes: Number of classes (>= 2).
      hidden_channels: Output channels of each head's convolution (the
        issue and paper: 256).
      pooling: How each head's map becomes a vector: "average" (the
        reference) or "flatten" (:data:`HEAD_POOLINGS`).
      **kwargs: Keras layer arguments (``name``, ``dtype``).

    Example:
    ```python
    heads = ClassifierHeads(10, hidden_channels=32)
    logits = heads([tf.zeros([2, 8, 8, 4]), tf.zeros([2, 4, 4, 16])])   # [2, 10]
    flat = ClassifierHeads(10, hidden_channels=4, pooling="flatten")
    logits = flat([tf.zeros([2, 8, 8, 4]), tf.zeros([2, 4, 4, 16])])    # Dense on 320 inputs
    ```
    """

    def __init__(self, n_classes, hidden_channels=256, pooling="average", **kwargs):
        super().__init__(**kwargs)
        for key, val, low in (("n_classes", n_classes, 2), ("hidden_channels", hidden_channels, 1)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < low:
                raise ValueError(f"{key} must be an int >= {low}, got {val!r}")
        if pooling not in HEAD_POOLINGS:
            raise ValueError(f"pooling must be one of {HEAD_POOLINGS}, got {pooling!r}")
        self.n_classes = int(n_classes)
        self.hidden_channels = int(hidden_channels)
        self.pooling = pooling

    def _check_shapes(self, shapes):
        if not isinstance(shapes, (list, tuple)) or not shapes:
            raise ValueError(
                "ClassifierHeads takes a non-empty list of feature maps "
                f"[B, H, W, C], one per scale; got {shapes!r}"
            )
        for i, s in enumerate(shapes):
            if len(s) != 4:
                raise ValueError(f"feature map {i} must have shape [B, H, W, C], got {tuple(s)}")
            if self.pooling == "flatten" and any(d is None for d in s[1:]):
                raise ValueError(
                    f'pooling="flatten" needs static H, W, C; feature map {i} has shape {tuple(s)}'
                )

    def build(self, input_shape):
        shapes = [tuple(s) for s in input_shape]
        self._check_shapes(shapes)
        self.convs, self.norms = [], []
        for i, s in enumerate(shapes):
            init = torch_default_uniform(9 * int(s[-1]))
            conv = keras.layers.Conv2D(
                self.hidden_channels,
                3,
                padding="same",
                kernel_initializer=init,
                bias_initializer=init,
                dtype=self.dtype_policy,
                name=f"head_{i}_conv",
            )
            conv.build(s)
            norm = rlayers.ActNormalization(dtype=self.dtype_policy, name=f"head_{i}_actnorm")
            norm.build(s[:-1] + (self.hidden_channels,))
            self.convs.append(conv)
            self.norms.append(norm)
            # Attributes too: Keras 3 lists of layers are not tf.train.Checkpoint
            # dependencies, so without these checkpoints would miss the heads.
            setattr(self, f"head_{i}_conv", conv)
            setattr(self, f"head_{i}_actnorm", norm)
        if self.pooling == "flatten":
            width = self.hidden_channels * sum(int(s[1]) * int(s[2]) for s in shapes)
        else:
            width = self.hidden_channels * len(shapes)
        init = torch_default_uniform(width)
        self.dense = keras.layers.Dense(
            self.n_classes,
            kernel_initializer=init,
            bias_initializer=init,
            dtype=self.dtype_policy,
            name="logits",
        )
        self.dense.build((None, width))
        self._n_scales = len(shapes)

    def _conv_all(self, features):
        if len(features) != self._n_scales:
            raise ValueError(
                f"expected {self._n_scales} feature maps (one per scale), got {len(features)}"
            )
        return [conv(h) for conv, h in zip(self.convs, features)]

    def initialize(self, features):
        """Data-dependent initialisation of every head's ActNorm from the
        batch ``features`` (a no-op for heads already initialised)."""
        features = list(features)
        if not self.built:
            self.build([tuple(h.shape) for h in features])
        for norm, c in zip(self.norms, self._conv_all(features)):
            norm.initialize(c)

    def pooled_features(self, features):
        """concat_s a_s, the input of the final Dense: [B, hidden_channels * n_scales]
        ("average"), [B, hidden_channels * sum_s H_s W_s] ("flatten")."""
        outs = []
        auto_init = not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context()
        for norm, c in zip(self.norms, self._conv_all(list(features))):
            if auto_init:
                norm.initialize(c)
            z = tf.nn.relu(norm(c))
            if self.pooling == "flatten":
                outs.append(tf.reshape(z, [-1, int(np.prod(z.shape[1:]))]))
            else:
                outs.append(tf.reduce_mean(z, axis=[1, 2]))
        return tf.concat(outs, axis=-1)

    def call(self, features):
        return self.dense(self.pooled_features(features))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.n_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "n_classes": self.n_classes,
            "hidden_channels": self.hidden_channels,
            "pooling": self.pooling,
        }


def resolve_hybrid_lambda(hybrid_lambda, num_dims=None):
    """The weight lambda of -log p(x) in :func:`hybrid_loss`, as a float.

    Args:
      hybrid_lambda: A number >= 0, a string holding one (``"0.5"``), or
        ``"1/D"`` (case-insensitive) for 1 / num_dims.
      num_dims: D, the number of dimensions per example (needed for "1/D").

    Returns:
      lambda as a Python float.

    Example:
    ```python
    resolve_hybrid_lambda("1/D", num_dims=64)   # 0.015625
    resolve_hybrid_lambda(1)                    # 1.0
    ```
    """
    if isinstance(hybrid_lambda, str):
        text = hybrid_lambda.strip()
        if text.replace(" ", "").upper() == "1/D":
            if (
                isinstance(num_dims, bool)
                or not isinstance(num_dims, numbers.Integral)
                or num_dims < 1
            ):
                raise ValueError(
                    f'hybrid_lambda="1/D" needs num_dims, a positive int; got {num_dims!r}'
                )
            return 1.0 / int(num_dims)
        try:
            hybrid_lambda = float(text)
        except ValueError:
            raise ValueError(
                f'hybrid_lambda must be a number >= 0 or "1/D", got {hybrid_lambda!r}'
            ) from None
    if (
        isinstance(hybrid_lambda, bool)
        or not isinstance(hybrid_lambda, numbers.Real)
        or not np.isfinite(hybrid_lambda)
        or hybrid_lambda < 0
    ):
        raise ValueError(f'hybrid_lambda must be a number >= 0 or "1/D", got {hybrid_lambda!r}')
    return float(hybrid_lambda)


def hybrid_loss(log_prob_x, logits, labels, hybrid_lambda, num_dims=None, label_smoothing=0.0):
    """Per-example hybrid objective in nats:
    lambda * (-log p(x)) - log softmax(logits)[label].

    With ``label_smoothing`` eps > 0 (not the reference; a regulariser of the
    classifier) the cross-entropy term is taken against the smoothed target
    (1 - eps) onehot(label) + eps / K over the K classes:

        - (1 - eps) log softmax(logits)[label] - (eps / K) sum_k log softmax(logits)[k].

    Args:
      log_prob_x: [B] log-densities log p(x) of the examples (nats; for
        dequantised images the discrete log-likelihood, i.e. after the
        bits/dim offset), or ``None`` when lambda is 0 (classification only:
        no log-determinant needs to be computed).
      logits: [B, n_classes] classifier logits.
      labels: [B] integer class labels in 0..n_classes-1.
      hybrid_lambda: lambda (see :func:`resolve_hybrid_lambda`): a number
        >= 0 or "1/D".
      num_dims: D, needed for "1/D".
      label_smoothing: eps in [0, 1); 0 (default) is the plain cross-entropy.

    Returns:
      [B] losses (average them, or use ``tf.nn.compute_average_loss`` under a
      distribution strategy).

    Example:
    ```python
    logits = tf.constant([[2.0, 0.0], [0.0, 1.0]])
    hybrid_loss(tf.constant([-10.0, -12.0]), logits, [0, 1], 1.0)
    # [10 + log(1 + e^-2), 12 + log(1 + e^-1)]
    hybrid_loss(None, logits, [0, 1], 0.0, label_smoothing=0.1)   # classification only
    ```
    """
    lam = resolve_hybrid_lambda(hybrid_lambda, num_dims)
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, numbers.Real)
        or not 0.0 <= label_smoothing < 1.0
    ):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    logits = tf.convert_to_tensor(logits)
    if not logits.dtype.is_floating or logits.shape.rank != 2:
        raise ValueError(
            f"logits must be a float tensor [B, n_classes], got {logits.dtype.name} "
            f"of shape {logits.shape}"
        )
    labels = tf.convert_to_tensor(labels)
    if labels.dtype.is_floating or labels.shape.rank != 1:
        raise ValueError(
            f"labels must be integer class indices of shape [B], got "
            f"{labels.dtype.name} of shape {labels.shape}"
        )
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int64), logits=logits
    )
    if label_smoothing:
        uniform = -tf.reduce_mean(tf.nn.log_softmax(logits), axis=-1)
        cross_entropy = (1.0 - label_smoothing) * cross_entropy + label_smoothing * uniform
    if lam == 0.0:
        return cross_entropy
    if log_prob_x is None:
        raise ValueError(f"log_prob_x is needed when hybrid_lambda != 0 (got lambda = {lam})")
    log_prob_x = tf.convert_to_tensor(log_prob_x, dtype=logits.dtype)
    if log_prob_x.shape.rank != 1:
        raise ValueError(f"log_prob_x must have shape [B], got {log_prob_x.shape}")
    return lam * -log_prob_x + cross_entropy


class ChannelNormalize(tfb.Bijector):
    """Per-channel standardisation, the reference's CIFAR-10 hybrid init layer.

    forward (data -> latent): y[..., c] = (x[..., c] - mean_c) / std_c on the
    last axis; log |det dy/dx| = -sum_c log std_c per position, so
    -(H W) sum_c log std_c for an image [H, W, C] (TFP sums over the event
    dimensions beyond the channel axis). inverse: x = y std + mean.

    An alternative to :class:`rflow_tf.bijectors.LogitTransform` in front of
    a flow; the reference uses it, with :data:`CIFAR10_MEAN` and
    :data:`CIFAR10_STD` (:meth:`cifar10`), for CIFAR-10 classification and
    hybrid runs.

    Args:
      mean: Per-channel means (length C).
      std: Per-channel standard deviations (length C, all > 0).
      validate_args: Check the channel count of inputs.
      name: Bijector name.

    Example:
    ```python
    norm = ChannelNormalize.cifar10()
    x = tf.random.uniform([2, 32, 32, 3])
    y = norm.forward(x)
    ld = norm.forward_log_det_jacobian(x, event_ndims=3)    # [2], about 4.9e3 each
    ```
    """

    def __init__(self, mean, std, validate_args=False, name="channel_normalize"):
        parameters = dict(locals())
        mean = np.asarray(mean, np.float64).reshape(-1)
        std = np.asarray(std, np.float64).reshape(-1)
        if mean.size == 0 or mean.shape != std.shape:
            raise ValueError(
                f"mean and std must be non-empty with one value per channel; got "
                f"{mean.size} means and {std.size} stds"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError(f"std must be finite and > 0, mean finite; got mean={mean}, std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        super().__init__(
            forward_min_event_ndims=1, validate_args=validate_args, parameters=parameters, name=name
        )

    @classmethod
    def cifar10(cls, **kwargs):
        """The reference's CIFAR-10 normalisation (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`)."""
        return cls(CIFAR10_MEAN, CIFAR10_STD, **kwargs)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _constants(self, x):
        x = tf.convert_to_tensor(x)
        if x.shape.rank is not None and x.shape[-1] is not None and x.shape[-1] != len(self.mean):
            raise ValueError(
                f"{self.name}: expects {len(self.mean)} channels on the last axis, "
                f"got shape {x.shape}"
            )
        return x, tf.constant(self.mean, x.dtype), tf.constant(self.std, x.dtype)

    def _forward(self, x):
        x, mean, std = self._constants(x)
        return (x - mean) / std

    def _inverse(self, y):
        y, mean, std = self._constants(y)
        return y * std + mean

    def _forward_log_det_jacobian(self, x):
        x, _, std = self._constants(x)
        return tf.fill(tf.shape(x)[:-1], -tf.reduce_sum(tf.math.log(std)))
