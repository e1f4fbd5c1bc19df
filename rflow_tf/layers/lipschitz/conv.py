"""LipschitzConv2D: a stride-1 'same' convolution whose operator norm is at most ``coeff``."""

import keras
import tensorflow as tf

from rflow_tf.layers._base import PACKAGE
from rflow_tf.layers.initializers import bias_initializer_for
from rflow_tf.layers.lipschitz.base import LipschitzLayer
from rflow_tf.layers.lipschitz.estimators import (
    ConvSpectralNorm,
    MatrixSpectralNorm,
)
from rflow_tf.layers.lipschitz.mixed_estimators import mixed_norm_estimator
from rflow_tf.layers.lipschitz.orders import order_label


@keras.saving.register_keras_serializable(package=PACKAGE)
class LipschitzConv2D(LipschitzLayer):
    """Stride-1 'same' convolution whose operator norm is at most ``coeff``.

    sigma is the largest singular value of the *whole* linear map
    x -> conv(x, W) on the layer's input size (zero padding included),
    estimated by power iteration with conv2d and conv2d_transpose over
    feature maps u (output-shaped) and v (input-shaped). For 1x1 kernels the
    operator norm equals the kernel's matrix norm and vectors of size C are
    used. The layer therefore needs static input height and width.

    ``domain``, ``codomain``: as for :class:`LipschitzDense`; the induced
    norm ||.||_{p->q} is that of the whole padded convolution (1x1 kernels
    included: for q < p it grows with the number of pixels).

    Args:
      filters: output channels.
      kernel_size: an int or a pair (kh, kw).
      coeff: the bound on the norm, > 0.
      use_bias: add a bias.
      kernel_initializer: Keras initializer of the kernel.
      bias_initializer: Keras initializer of the bias.
      **kwargs: the other arguments of
        :class:`~rflow_tf.layers.lipschitz.base.LipschitzLayer` (``power_iterations``,
        ``tol``, ``max_iterations``, ``domain``, ``codomain``) and of ``keras.layers.Layer``.

    Example:
    ```python
    conv = LipschitzConv2D(8, 3, coeff=0.98)
    y = conv(tf.zeros([2, 4, 4, 3]))          # [2, 4, 4, 8]
    mixed = LipschitzConv2D(3, 3, coeff=0.98, domain=3, codomain=2)
    y = mixed(tf.zeros([2, 4, 4, 8]))         # [2, 4, 4, 3]
    assert y.shape == (2, 4, 4, 3)
    ```
    """

    def __init__(
        self,
        filters,
        kernel_size,
        coeff=0.98,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(coeff=coeff, **kwargs)
        self.filters = int(filters)
        ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 2
        self.kernel_size = tuple(int(k) for k in ks)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    @property
    def _is_pointwise(self):
        return self.kernel_size == (1, 1)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"LipschitzConv2D expects [batch, H, W, C] input, got {input_shape}")
        _, h, w, c = input_shape
        if c is None or (not self._is_pointwise and (h is None or w is None)):
            raise ValueError(
                "LipschitzConv2D needs static input height, width and channels to compute "
                f"the operator norm of the padded convolution; got input shape {input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=self.kernel_size + (c, self.filters),
            initializer=self.kernel_initializer,
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=bias_initializer_for(self.bias_initializer, self.kernel.shape),
            )
            if self.use_bias
            else None
        )
        self._input_hw = (h, w)
        if not self.is_spectral and (h is None or w is None):
            raise ValueError(
                f"LipschitzConv2D with the {order_label(self.domain)}->"
                f"{order_label(self.codomain)} norm needs static input height and width: "
                f"the induced norm is that of the whole convolution; got input shape "
                f"{input_shape}"
            )
        self._operator_input_shape = [1, h, w, c]
        maps = (1, h, w, self.filters), (1, h, w, c)
        if not self.is_spectral:
            estimator = mixed_norm_estimator(self, *maps)
        elif self._is_pointwise:  # the map of the kernel's one matrix at every pixel
            estimator = MatrixSpectralNorm(
                self, (self.filters,), (c,), matrix=lambda kernel: kernel[0, 0]
            )
        else:
            estimator = ConvSpectralNorm(self, *maps, input_hw=self._input_hw)
        self._build_estimate(estimator)

    def apply_kernel(self, x, kernel):
        """conv(x, kernel) for a batch of feature maps (no bias)."""
        return tf.nn.conv2d(x, kernel, strides=1, padding="SAME")

    def apply_kernel_transpose(self, u, kernel):
        """The transposed convolution, for vector-Jacobian products."""
        shape = tf.concat([tf.shape(u)[:-1], [kernel.shape[2]]], 0)
        return tf.nn.conv2d_transpose(u, kernel, output_shape=shape, strides=1, padding="SAME")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
