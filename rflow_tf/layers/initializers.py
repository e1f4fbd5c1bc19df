"""Weight initialisers of the Lipschitz nets: FanInUniform (the reference's) or Glorot."""

import math

import keras
import numpy as np

from rflow_tf.layers._base import _PACKAGE


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FanInUniform(keras.initializers.Initializer):
    """U(-scale / sqrt(fan_in), scale / sqrt(fan_in)): PyTorch's default
    initialisation of ``nn.Linear`` / ``nn.Conv2d`` weights and biases (the
    authors' reference code), fan_in = the product of all kernel dimensions but
    the last (kh * kw * c_in for a convolution, d_in for a dense kernel).

    For a bias (shape (units,)) pass the kernel's ``fan_in`` explicitly; the
    Lipschitz layers do that themselves when given
    ``bias_initializer=FanInUniform()``. ``scale`` < 1 shrinks the range (the
    reference's toy nets start their last layer at 1/1000 of it).

    Example:
    ```python
    init = FanInUniform()
    w = init((64, 32))              # |w| <= 1/8
    b = FanInUniform(fan_in=64)((32,))
    ```
    """

    def __init__(self, scale=1.0, fan_in=None, seed=None):
        self.scale = float(scale)
        self.fan_in = None if fan_in is None else int(fan_in)
        self.seed = seed
        self._uniform = keras.initializers.RandomUniform(-1.0, 1.0, seed=seed)

    def for_fan_in(self, fan_in):
        """The same initialiser with ``fan_in`` fixed (for a bias)."""
        return FanInUniform(self.scale, fan_in if self.fan_in is None else self.fan_in, self.seed)

    def __call__(self, shape, dtype=None):
        fan_in = self.fan_in
        if fan_in is None:
            if len(shape) < 2:
                raise ValueError(
                    f"FanInUniform needs fan_in= for a shape of rank < 2, got {tuple(shape)}"
                )
            fan_in = int(np.prod(shape[:-1]))
        bound = self.scale / math.sqrt(fan_in)
        return self._uniform(shape, dtype=dtype) * bound

    def get_config(self):
        return {"scale": self.scale, "fan_in": self.fan_in, "seed": self.seed}


#: Initialisations of the Lipschitz nets built here: "reference" (weights and
#: biases :class:`FanInUniform`, as the authors' PyTorch code) and "glorot"
#: (Glorot-uniform weights and zero biases; rflow_tf before config version 2).
INITS = ("reference", "glorot")


def _initializers(init, scale=1.0):
    """(kernel_initializer, bias_initializer) of an :data:`INITS` name."""
    if init == "reference":
        return FanInUniform(scale), FanInUniform()
    if init == "glorot":
        kernel = "glorot_uniform"
        if scale != 1.0:
            kernel = keras.initializers.VarianceScaling(scale**2, "fan_avg", "uniform")
        return kernel, "zeros"
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _bias_initializer(initializer, kernel_shape):
    """A FanInUniform bias initialiser learns its fan_in from the kernel."""
    if isinstance(initializer, FanInUniform):
        return initializer.for_fan_in(int(np.prod(kernel_shape[:-1])))
    return initializer
