"""LipschitzDense: a dense layer whose map has norm at most ``coeff``."""

import keras
import tensorflow as tf

from rflow_tf.layers._base import PACKAGE
from rflow_tf.layers.initializers import bias_initializer_for
from rflow_tf.layers.lipschitz.base import LipschitzLayer
from rflow_tf.layers.lipschitz.estimators import MatrixSpectralNorm
from rflow_tf.layers.lipschitz.mixed_estimators import mixed_norm_estimator


@keras.saving.register_keras_serializable(package=PACKAGE)
class LipschitzDense(LipschitzLayer):
    """Dense layer with spectral norm at most ``coeff``: y = x W_eff + b,
    W_eff = W / max(1, sigma / coeff), sigma ~= ||W||_2 by power iteration.

    The estimate stays current by itself: each use of a changed kernel
    re-estimates sigma (see :class:`~rflow_tf.layers.lipschitz.base.LipschitzLayer`
    for the verbs and who calls them). ``power_iterations`` adds plain steps
    inside ``call(training=True)``.

    ``domain``, ``codomain``: orders p, q in [1, inf] (``"f"`` = inf) or
    :class:`LearnableOrder` instances; then sigma ~= ||W||_{p->q} and
    ||x W_eff - y W_eff||_q <= coeff ||x - y||_p. Default 2, 2: the spectral norm.

    Args:
      units: output size.
      coeff: the bound on the norm, > 0.
      use_bias: add a bias.
      kernel_initializer: Keras initializer of the kernel.
      bias_initializer: Keras initializer of the bias.
      **kwargs: the other arguments of
        :class:`~rflow_tf.layers.lipschitz.base.LipschitzLayer` (``power_iterations``,
        ``tol``, ``max_iterations``, ``domain``, ``codomain``) and of ``keras.layers.Layer``.

    Example:
    ```python
    layer = LipschitzDense(64, coeff=0.9)
    y = layer(tf.zeros([8, 2]))
    layer.converge()
    mixed = LipschitzDense(2, coeff=0.9, domain="f", codomain=3)   # ||W||_{inf->3} <= 0.9
    y = mixed(tf.zeros([8, 64]))
    ```
    """

    def __init__(
        self,
        units,
        coeff=0.98,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(coeff=coeff, **kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        d_in = input_shape[-1]
        if d_in is None:
            raise ValueError("LipschitzDense needs a known last input dimension")
        self.kernel = self.add_weight(
            name="kernel", shape=(d_in, self.units), initializer=self.kernel_initializer
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=bias_initializer_for(self.bias_initializer, self.kernel.shape),
            )
            if self.use_bias
            else None
        )
        self._operator_input_shape = [1, int(d_in)]
        shapes = (self.units,), (d_in,)
        if self.is_spectral:
            estimator = MatrixSpectralNorm(self, *shapes, matrix=lambda kernel: kernel)
        else:
            estimator = mixed_norm_estimator(self, *shapes)
        self._build_estimate(estimator)

    def apply_kernel(self, x, kernel):
        """x W for a batch of rows x (no bias)."""
        return tf.matmul(x, kernel)

    def apply_kernel_transpose(self, u, kernel):
        """u W^T: the transposed map, for vector-Jacobian products."""
        return tf.matmul(u, kernel, transpose_b=True)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
