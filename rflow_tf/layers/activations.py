"""LipSwish and the 1-Lipschitz activations of the residual branches, by name."""

import keras
import tensorflow as tf

from rflow_tf.layers._base import _PACKAGE

#: Below this many elements the fused XLA LipSwish costs more than it saves
#: (measured on the 2-core CPU of benchmarks/: 4x faster at 6.4M elements,
#: 1.2x at 400k, 10% slower at 64k).
_FUSED_LIPSWISH_MIN_ELEMENTS = 2 ** 18


@tf.function(jit_compile=True)
def _lipswish_forward(x, beta):
    b = tf.nn.softplus(beta)
    bx = b * x
    s = tf.sigmoid(bx)
    return x * s, s + tf.raw_ops.SigmoidGrad(y=s, dy=bx)      # SigmoidGrad(s, w) = w s (1 - s)


@tf.function(jit_compile=True)
def _lipswish_backward(x, beta, gy, gd=None):
    """d/d(x, beta) of sum(gy * y + gd * d); ``gd=None``: of sum(gy * y) only
    (a separate trace, without the second-derivative terms)."""
    b = tf.nn.softplus(beta)
    w = b * x
    s = tf.sigmoid(w)
    ss = s * (1.0 - s)
    gx = gy * (s + w * ss)                          # dy/dx = d
    gb_pointwise = gy * x * x * ss                  # dy/db = x^2 s (1 - s)
    if gd is not None:
        e = ss * (2.0 + w * (1.0 - 2.0 * s))        # dd/dw
        gx += gd * (b * e)                          # dd/dx = b e
        gb_pointwise += gd * x * e                  # dd/db = x e
    return gx, tf.reduce_sum(gb_pointwise) * tf.sigmoid(beta)   # db/dbeta = sigmoid(beta)


@tf.custom_gradient
def lipswish_value_and_derivative(x, beta):
    """(y, d) = (x s, s + b x s (1 - s)), s = sigmoid(b x), b = softplus(beta):
    LipSwish without its 1/1.1 and its derivative, phi = y / 1.1 and
    phi' = d / 1.1 (paper eq. 10).

    Forward and backward are each one fused XLA kernel: a pass over x writes
    y and d, and the backward pass recomputes s from x (so only x is kept)
    and writes dx in one pass, with the closed forms dy/dx = d,
    dd/dx = b e, dy/db = x^2 s (1 - s), dd/db = x e, where
    e = s (1 - s) (2 + b x (1 - 2 s)). Unfused, TensorFlow runs about fifteen
    memory-bound element-wise kernels for the same backward pass.

    Example:
    ```python
    y, d = lipswish_value_and_derivative(tf.linspace(-3., 3., 7), tf.constant(0.5))
    ```
    """
    y, d = _lipswish_forward(x, beta)

    def grad(gy, gd):
        if gy is None:
            gy = tf.zeros_like(x)
        return _lipswish_backward(x, beta, gy, gd)

    return (y, d), grad


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LipSwish(keras.layers.Layer):
    """LipSwish activation (paper eq. 10): phi(x) = x * sigmoid(b x) / 1.1,
    b = softplus(beta) > 0, with one learnable scalar beta per layer.

    max_x |phi'(x)| <= 1 for every b > 0, so it keeps Lip(g) <= 1 while its
    second derivative does not vanish where |phi'| is close to 1.

    Example:
    ```python
    act = LipSwish()          # beta initialised to 0.5
    y = act(tf.linspace(-3., 3., 7))
    ```
    """

    def __init__(self, beta_initializer=0.5, **kwargs):
        super().__init__(**kwargs)
        self.beta_initializer = float(beta_initializer)

    def build(self, input_shape):
        self.beta = self.add_weight(
            name="beta", shape=(), initializer=keras.initializers.Constant(self.beta_initializer))

    def call(self, x):
        b = tf.nn.softplus(tf.cast(self.beta, x.dtype))
        return x * tf.sigmoid(b * x) / 1.1

    def value_and_derivative(self, x):
        """``(y, d, c)`` with phi(x) = c y and phi'(x) = c d, c = 1/1.1:
        y = x s and d = s + b x s (1 - s) with s = sigmoid(b x). (The constant
        c is returned separately so a caller can fold it into the next linear
        map instead of spending a pass over the tensor.) For tensors of at
        least 2^18 elements the forward and backward passes are each one fused
        XLA kernel (:func:`lipswish_value_and_derivative`); for smaller ones the
        kernel launches cost more than they save, and plain ops are used.
        """
        beta = tf.cast(self.beta, x.dtype)
        if (x.shape.num_elements() or 0) >= _FUSED_LIPSWISH_MIN_ELEMENTS:
            return lipswish_value_and_derivative(x, beta) + (1.0 / 1.1,)
        return _lipswish_forward.python_function(x, beta) + (1.0 / 1.1,)

    def get_config(self):
        return {**super().get_config(), "beta_initializer": self.beta_initializer}


ACTIVATIONS = ("lipswish", "elu", "softplus", "relu", "identity")


def make_activation(name, dtype=None):
    """A 1-Lipschitz activation layer by name: one of :data:`ACTIVATIONS`.

    Example:
    ```python
    act = make_activation("elu")
    ```
    """
    if name == "lipswish":
        return LipSwish(dtype=dtype)
    if name in ("elu", "softplus", "relu"):
        return keras.layers.Activation(name, dtype=dtype)
    if name == "identity":
        return keras.layers.Identity(dtype=dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
