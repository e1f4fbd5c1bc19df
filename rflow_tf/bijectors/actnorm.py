"""ActNorm: per-channel affine bijector with data-dependent initialisation."""

import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rlayers
from rflow_tf.bijectors._base import KerasBacked

tfb = tfp.bijectors


class ActNorm(KerasBacked):
    """Per-channel affine bijector with explicit data-dependent initialisation.

    forward (data -> latent): y = (x + b) * exp(s), b and s per channel (last
    axis); log |det| = (positions per example) * sum(s). :meth:`initialize`
    sets b = -mean(x), s = -0.5 log max(var(x), 0.2) from a batch (Glow / the
    reference). Initialisation is never implicit: ``forward``, ``inverse``
    and the log-dets of an uninitialised ActNorm raise an error naming
    :meth:`initialize` (an implicit first-call init inside ``log_prob`` would
    fit the layer to whatever single point came first). Inputs must have the
    layer's dtype (``dtype=``, default float32); another dtype raises a
    ``TypeError`` instead of being cast.

    Example:
    ```python
    images = tf.random.uniform([16, 8, 8, 3])
    an = ActNorm(event_shape=(8, 8, 3))
    an.initialize(images)        # explicit, once (no-op when already done)
    z = an.forward(images)       # zero mean, unit variance per channel
    ```
    """

    def __init__(
        self, event_shape, layer=None, validate_args=False, name="actnorm", *, dtype="float32"
    ):
        parameters = dict(locals())
        self.event_shape_ = tuple(int(d) for d in event_shape)
        self.layer = layer if layer is not None else rlayers.ActNormalization(dtype=dtype)
        if not self.layer.built:
            self.layer.build((None,) + self.event_shape_)
        self._track_keras(self.layer)
        super().__init__(
            forward_min_event_ndims=len(self.event_shape_),
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    def initialize(self, x):
        """Data-dependent initialisation from the batch ``x`` (no-op if done)."""
        x = self._checked(x)
        self.layer.initialize(tf.reshape(x, (-1,) + self.event_shape_))

    @property
    def is_initialized(self):
        """True once :meth:`initialize` has run (a variable: saved in checkpoints)."""
        return bool(self.layer.initialized.numpy())

    def _checked(self, x):
        """x as a tensor of the layer's dtype; raises unless it has that dtype."""
        dtype = tf.as_dtype(self.layer.compute_dtype)
        x = tf.convert_to_tensor(x, dtype_hint=dtype)
        if x.dtype != dtype:
            raise TypeError(
                f"{self.name}: expects {dtype.name} input, got {x.dtype.name} "
                f"(build it with ActNorm(..., dtype='{x.dtype.name}') or cast "
                "the input)"
            )
        return x

    def _checked_initialized(self, x):
        """x (dtype-checked), once the layer is known to be initialised."""
        x = self._checked(x)
        message = (
            f"{self.name}: ActNorm is not initialised; call {self.name}.initialize"
            "(first_batch) once before using it (its data-dependent "
            "initialisation is explicit)"
        )
        if tf.executing_eagerly():
            if not self.is_initialized:
                raise RuntimeError(message)
            return x
        with tf.control_dependencies([tf.debugging.Assert(self.layer.initialized, [message])]):
            return tf.identity(x)

    def log_det(self, dtype=tf.float32):
        """log |det dy/dx| per example: (positions per example) * sum(log_scale)."""
        positions = 1
        for d in self.event_shape_[:-1]:
            positions *= d
        return positions * tf.reduce_sum(tf.cast(self.layer.log_scale, dtype))

    def _forward(self, x, **kwargs):
        return self.layer(self._checked_initialized(x))

    def _inverse(self, y, **kwargs):
        return self.layer.inverse(self._checked_initialized(y))

    def _forward_log_det_jacobian(self, x, **kwargs):
        x = self._checked_initialized(x)
        ld = self.log_det(x.dtype)
        batch_shape = tf.shape(x)[: tf.rank(x) - len(self.event_shape_)]
        return tf.fill(batch_shape, ld)
