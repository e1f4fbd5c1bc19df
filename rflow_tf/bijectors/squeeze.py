"""Squeeze: space-to-channels reshaping [..., H, W, C] -> [..., H/2, W/2, 4C]."""

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors


SQUEEZE_ORDERS = ("reference", "space_to_depth")


class Squeeze(tfb.Bijector):
    """Squeeze by a factor 2: [..., H, W, C] -> [..., H/2, W/2, 4C].

    Pixel (2i + dy, 2j + dx, c) of the input, dy, dx in {0, 1}, goes to
    position (i, j) and output channel

        order="reference":       c * 4 + 2 * dy + dx      (the authors' code)
        order="space_to_depth":  (2 * dy + dx) * C + c    (tf.nn.space_to_depth)

    Both are permutations of the pixels, so log |det| = 0. They differ as
    models only where channels are split afterwards (:class:`FactorOut`
    keeps the first half): the reference order keeps the first C/2 input
    channels' four sub-pixels, space_to_depth keeps sub-pixels (0, 0) and
    (0, 1) of every channel. forward = data -> latent.

    Args:
      order: "reference" (default) or "space_to_depth".

    Example:
    ```python
    Squeeze().forward(tf.zeros([2, 8, 8, 3])).shape  # (2, 4, 4, 12)
    x = tf.reshape(tf.range(8.0), [1, 2, 2, 2])      # x[0, dy, dx, c] = 4 dy + 2 dx + c
    Squeeze().forward(x)[0, 0, 0]                    # [0, 2, 4, 6, 1, 3, 5, 7]
    Squeeze("space_to_depth").forward(x)[0, 0, 0]    # [0, 1, 2, 3, 4, 5, 6, 7]
    ```
    """

    def __init__(self, order="reference", validate_args=False, name="squeeze"):
        parameters = dict(locals())
        if order not in SQUEEZE_ORDERS:
            raise ValueError(f"Squeeze order must be one of {SQUEEZE_ORDERS}, got {order!r}")
        self.order = order
        super().__init__(
            forward_min_event_ndims=3,
            is_constant_jacobian=True,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    @staticmethod
    def _reshape_apply(x, fn):
        shape = tf.shape(x)
        flat = tf.reshape(x, tf.concat([[-1], shape[-3:]], 0))
        out = fn(flat)
        return tf.reshape(out, tf.concat([shape[:-3], tf.shape(out)[1:]], 0))

    @staticmethod
    def _squeeze_reference(t):
        # [B, H, W, C] -> [B, H/2, 2(dy), W/2, 2(dx), C] -> [B, H/2, W/2, C, dy, dx].
        s = tf.shape(t)
        t = tf.reshape(t, [s[0], s[1] // 2, 2, s[2] // 2, 2, s[3]])
        t = tf.transpose(t, [0, 1, 3, 5, 2, 4])
        return tf.reshape(t, [s[0], s[1] // 2, s[2] // 2, 4 * s[3]])

    @staticmethod
    def _unsqueeze_reference(t):
        s = tf.shape(t)
        t = tf.reshape(t, [s[0], s[1], s[2], s[3] // 4, 2, 2])
        t = tf.transpose(t, [0, 1, 4, 2, 5, 3])
        return tf.reshape(t, [s[0], 2 * s[1], 2 * s[2], s[3] // 4])

    def _forward(self, x):
        if x.shape.rank is not None and (x.shape[-3] or 0) % 2 + (x.shape[-2] or 0) % 2:
            raise ValueError(f"Squeeze needs even height and width, got shape {x.shape}")
        if self.order == "reference":
            return self._reshape_apply(x, self._squeeze_reference)
        return self._reshape_apply(x, lambda t: tf.nn.space_to_depth(t, 2))

    def _inverse(self, y):
        if y.shape.rank is not None and (y.shape[-1] or 0) % 4:
            raise ValueError(
                f"Squeeze inverse needs a channel count divisible by 4, got shape {y.shape}"
            )
        if self.order == "reference":
            return self._reshape_apply(y, self._unsqueeze_reference)
        return self._reshape_apply(y, lambda t: tf.nn.depth_to_space(t, 2))

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], x.dtype)

    def _forward_event_shape(self, s):
        return (
            tf.TensorShape(s[:-3]).concatenate([s[-3] // 2, s[-2] // 2, s[-1] * 4])
            if s.rank is not None and s[-3] is not None
            else s
        )

    def _inverse_event_shape(self, s):
        return (
            tf.TensorShape(s[:-3]).concatenate([s[-3] * 2, s[-2] * 2, s[-1] // 4])
            if s.rank is not None and s[-3] is not None
            else s
        )

    def _forward_event_shape_tensor(self, s):
        return tf.concat([s[:-3], [s[-3] // 2, s[-2] // 2, s[-1] * 4]], 0)

    def _inverse_event_shape_tensor(self, s):
        return tf.concat([s[:-3], [s[-3] * 2, s[-2] * 2, s[-1] // 4]], 0)
