"""Invertible 1x1 convolution (Glow), the reference's ``--quadratic`` layer.

A 1x1 convolution with a C x C matrix W mixes the channels of every pixel:

    forward (data -> latent):  y[..., i, j, :] = W x[..., i, j, :]
    log |det dy/dx| = H * W_img * log |det W|        (one factor per pixel)

For vectors (event shape (D,)) it is the invertible linear map y = W x
(the reference's ``InvertibleLinear`` in its fully connected end) with
log |det| = log |det W|. The log-det is exact.

Two parameterisations (:class:`Invertible1x1Weights`):

* ``"matrix"``: W itself is the variable; log |det W| from a QR
  factorisation per call (``slogdet`` has no XLA kernel), gradient W^{-T}
  -- the reference's choice.
* ``"lu"`` (default): W = P L (U + diag(sign * exp(log_s))) with P a fixed
  permutation, L unit lower triangular, U strictly upper triangular (Glow's
  LU-decomposed form); log |det W| = sum(log_s), no factorisation per call.

Measured with ``benchmarks/invertible_1x1.py`` on this 2-core CPU while
about six other processes shared it (load average 9-10, so only the relative
numbers mean anything): one step = forward, log-det and the gradient w.r.t.
x and the weights; the four configurations interleaved over 200 rounds
(20 for C = 512); median / minimum ms per step:

| input | lu | lu, XLA | matrix | matrix, XLA |
|---|---|---|---|---|
| 64 x 16 x 16 x 12 | 3.96 / 1.06 | 3.28 / 0.93 | 4.03 / 1.04 | 2.35 / 0.83 |
| 64 x 4 x 4 x 512 | 144 / 63 | 148 / 92 | 121 / 62 | 198 / 93 |

The two cost the same within the noise: the 1x1 convolution over the pixels
dominates, and a C x C factorisation is negligible beside it. ``"lu"`` is the
default because it needs no factorisation or matrix inverse in its log-det
and gradient, and W can never become singular during training (its
diagonal factor is exp(log_s) != 0); ``"matrix"`` is there for parity with
the reference.

Initialisation: ``"permutation"`` (the reference: W a random permutation
matrix) or ``"orthogonal"`` (Glow: a random rotation). Both have log |det| = 0.

Example:
```python
import tensorflow as tf
from rflow_tf.bijectors.invertible_conv import Invertible1x1Conv

conv = Invertible1x1Conv((8, 8, 12), seed=0)
x = tf.random.normal([4, 8, 8, 12])
y = conv.forward(x)
ld = conv.forward_log_det_jacobian(x, 3)      # [4], 0 at initialisation
x_back = conv.inverse(y)                       # equals x up to rounding
```

References:
  [1] D. P. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1
      Convolutions. NeurIPS 2018.
"""

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

from rflow_tf.bijectors._base import KerasBacked, checked_event_input

__all__ = ["Invertible1x1Conv", "Invertible1x1Weights", "PARAMETERIZATIONS", "INITIALIZATIONS"]

PARAMETERIZATIONS = ("lu", "matrix")
INITIALIZATIONS = ("permutation", "orthogonal")


def _initial_matrix(c, init, seed):
    rng = np.random.default_rng(seed)
    if init == "permutation":
        return np.eye(c)[rng.permutation(c)]
    q, r = np.linalg.qr(rng.standard_normal((c, c)))
    return q * np.sign(np.diag(r))  # Haar-distributed rotation or reflection


@tf.custom_gradient
def _log_abs_det(w):
    """log |det w| = sum log |diag(R)| of w = QR (|det Q| = 1), with gradient w^{-T}.

    ``slogdet``, ``det`` and ``lu`` have no XLA kernel on CPU (TF 2.21) and
    ``lu`` has no gradient; QR and the inverse compile, so this does.
    """
    _, r = tf.linalg.qr(w)
    value = tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(r))))

    def grad(upstream):
        return upstream * tf.linalg.matrix_transpose(tf.linalg.inv(w))

    return value, grad


class Invertible1x1Weights(keras.layers.Layer):
    """The C x C matrix W of an invertible 1x1 convolution, as Keras weights.

    ``parameterization="matrix"``: one trainable [C, C] weight ``w``.
    ``parameterization="lu"``: W = P L (U + diag(sign * exp(log_s))) with
    trainable ``lower`` (used strictly below the diagonal, plus I),
    ``upper`` (strictly above) and ``log_s``, and non-trainable ``permutation``
    and ``sign`` (fixed at initialisation, saved in checkpoints).

    :meth:`call` applies W to the last axis: y = x W^T, i.e. y_c = sum_k W[c, k] x_k.

    Args:
      parameterization: One of :data:`PARAMETERIZATIONS`.
      init: One of :data:`INITIALIZATIONS` (the initial W).
      seed: Optional int seed of the initial W.

    Example:
    ```python
    w = Invertible1x1Weights("lu", seed=0)
    y = w(tf.random.normal([2, 4, 4, 6]))       # builds a 6 x 6 W
    w.log_abs_det()                             # 0.0 at initialisation
    ```
    """

    def __init__(self, parameterization="lu", init="permutation", seed=None, **kwargs):
        super().__init__(**kwargs)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
            )
        if init not in INITIALIZATIONS:
            raise ValueError(f"init must be one of {INITIALIZATIONS}, got {init!r}")
        self.parameterization = parameterization
        self.init = init
        self.seed = seed

    def build(self, input_shape):
        c = int(input_shape[-1])
        w0 = _initial_matrix(c, self.init, self.seed)

        def const(value):
            return keras.initializers.Constant(np.asarray(value, np.float64))

        if self.parameterization == "matrix":
            self.w = self.add_weight(name="w", shape=(c, c), initializer=const(w0))
            return
        p, lower, upper = scipy.linalg.lu(w0)  # w0 = p @ lower @ upper
        diag = np.diag(upper)
        self.permutation = self.add_weight(
            name="permutation", shape=(c, c), initializer=const(p), trainable=False
        )
        self.sign = self.add_weight(
            name="sign", shape=(c,), initializer=const(np.sign(diag)), trainable=False
        )
        self.lower = self.add_weight(
            name="lower", shape=(c, c), initializer=const(np.tril(lower, -1))
        )
        self.upper = self.add_weight(
            name="upper", shape=(c, c), initializer=const(np.triu(upper, 1))
        )
        self.log_s = self.add_weight(
            name="log_s", shape=(c,), initializer=const(np.log(np.abs(diag)))
        )

    def kernel(self):
        """The matrix W [C, C]."""
        if self.parameterization == "matrix":
            return tf.convert_to_tensor(self.w)
        c = self.log_s.shape[0]
        eye = tf.eye(c, dtype=self.log_s.dtype)
        lower = tf.linalg.band_part(self.lower, -1, 0) * (1.0 - eye) + eye
        upper = tf.linalg.band_part(self.upper, 0, -1) * (1.0 - eye) + tf.linalg.diag(
            self.sign * tf.exp(self.log_s)
        )
        return tf.matmul(self.permutation, tf.matmul(lower, upper))

    def log_abs_det(self):
        """log |det W| (a scalar): sum(log_s) for "lu", via QR of W for "matrix"."""
        if self.parameterization == "matrix":
            return _log_abs_det(tf.convert_to_tensor(self.w))  # a read: no variables inside
        return tf.reduce_sum(self.log_s)

    def call(self, x):
        return tf.tensordot(x, self.kernel(), [[-1], [1]])

    def apply_inverse(self, y):
        """x = y W^{-T} along the last axis (the inverse of :meth:`call`)."""
        return tf.tensordot(y, tf.linalg.inv(self.kernel()), [[-1], [1]])

    def get_config(self):
        return {
            **super().get_config(),
            "parameterization": self.parameterization,
            "init": self.init,
            "seed": self.seed,
        }


class Invertible1x1Conv(KerasBacked):
    """Invertible 1x1 convolution y = W x per pixel, with exact log-det.

    forward (data -> latent): y[..., :] = W x[..., :] on the last axis;
    log |det dy/dx| = (number of positions) * log |det W|, positions = H * W
    for an image event shape (H, W, C), 1 for a vector (D,).
    inverse: x = W^{-1} y.

    Args:
      event_shape: (H, W, C) or (D,), without batch.
      parameterization: "lu" (default) or "matrix" (see the module docstring
        for the measurement behind the default).
      init: "permutation" (the reference) or "orthogonal" (Glow).
      seed: Optional int seed of the initial W.
      layer: An existing :class:`Invertible1x1Weights` to share (e.g. when
        restoring); built for C channels if needed.
      dtype: Keras dtype of the weights.
      validate_args: Check inputs for NaN/Inf.
      name: Bijector name.

    Example:
    ```python
    conv = Invertible1x1Conv((4, 4, 8), parameterization="matrix", seed=1)
    y = conv.forward(tf.ones([2, 4, 4, 8]))
    conv.trainable_variables        # (w,)
    ```
    """

    def __init__(
        self,
        event_shape,
        parameterization="lu",
        init="permutation",
        seed=None,
        layer=None,
        dtype="float32",
        validate_args=False,
        name="invertible_1x1",
    ):
        parameters = dict(locals())
        self.event_shape_ = tuple(int(d) for d in event_shape)
        if not self.event_shape_ or any(d < 1 for d in self.event_shape_):
            raise ValueError(
                f"event_shape must be (H, W, C) or (D,) with positive sizes, got {event_shape!r}"
            )
        self.layer = (
            layer
            if layer is not None
            else Invertible1x1Weights(parameterization, init, seed, dtype=dtype)
        )
        if not self.layer.built:
            self.layer.build((None,) + self.event_shape_)
        self._positions = int(np.prod(self.event_shape_[:-1], dtype=np.int64))
        self._track_keras(self.layer)
        super().__init__(
            forward_min_event_ndims=len(self.event_shape_),
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    def _check(self, x, name):
        return checked_event_input(self, x, name)

    def log_det(self, dtype=tf.float32):
        """log |det dy/dx| per example: positions * log |det W|."""
        return self._positions * tf.cast(self.layer.log_abs_det(), dtype)

    def _forward(self, x, **kwargs):
        x = self._check(x, "x")
        return tf.cast(self.layer(x), x.dtype)

    def _inverse(self, y, **kwargs):
        y = self._check(y, "y")
        return tf.cast(self.layer.apply_inverse(y), y.dtype)

    def _forward_log_det_jacobian(self, x, **kwargs):
        x = self._check(x, "x")
        batch_shape = tf.shape(x)[: tf.rank(x) - len(self.event_shape_)]
        return tf.fill(batch_shape, self.log_det(x.dtype))
