"""ActNormalization: the Keras layer holding the ActNorm bijector's weights."""

import keras
import tensorflow as tf

from rflow_tf.layers._base import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class ActNormalization(keras.layers.Layer):
    """Per-channel affine y = (x + bias) * exp(log_scale) with data-dependent
    initialisation (Kingma & Dhariwal 2018): on the first batch seen by
    :meth:`initialize`, bias = -mean and log_scale = -0.5 log max(var, 0.2)
    (the reference's floor), so the output has zero mean and unit variance.
    ``variance="unbiased"`` (default, as the reference's ``torch.var``) divides
    the sum of squares by n - 1, ``"biased"`` by n (rflow_tf before config
    version 3).

    Its log-det per example is (number of positions) * sum(log_scale).
    The flag ``initialized`` is a variable, so it is saved in checkpoints.

    Example:
    ```python
    x = tf.random.normal([16, 4])
    an = ActNormalization()
    an.initialize(x)
    y = an(x)
    ```
    """

    def __init__(self, variance="unbiased", **kwargs):
        super().__init__(**kwargs)
        if variance not in ("unbiased", "biased"):
            raise ValueError(
                f"ActNormalization variance must be 'unbiased' or 'biased', got {variance!r}"
            )
        self.variance = variance

    def get_config(self):
        return {**super().get_config(), "variance": self.variance}

    def build(self, input_shape):
        c = input_shape[-1]
        self.bias = self.add_weight(name="bias", shape=(c,), initializer="zeros")
        self.log_scale = self.add_weight(name="log_scale", shape=(c,), initializer="zeros")
        self.initialized = self.add_weight(
            name="initialized", shape=(), dtype="bool", trainable=False, initializer="zeros"
        )

    def initialize(self, x):
        """Sets bias and log_scale from the batch ``x`` unless already initialised."""
        if not self.built:
            self.build(x.shape)
        axes = list(range(len(x.shape) - 1))
        x = tf.cast(x, self.bias.dtype)
        mean, var = tf.nn.moments(x, axes)
        if self.variance == "unbiased":
            n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), var.dtype)
            var = var * n / tf.maximum(n - 1.0, 1.0)

        def init():
            self.bias.assign(-mean)
            self.log_scale.assign(-0.5 * tf.math.log(tf.maximum(var, 0.2)))
            self.initialized.assign(True)
            return tf.constant(True)

        tf.cond(tf.convert_to_tensor(self.initialized), lambda: tf.constant(False), init)

    def call(self, x):
        return (x + self.bias) * tf.exp(self.log_scale)

    def inverse(self, y):
        """x = y * exp(-log_scale) - bias."""
        return y * tf.exp(-self.log_scale) - self.bias
