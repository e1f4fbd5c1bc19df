"""Weight initialisers of the Lipschitz nets: FanInUniform (the reference's) or Glorot."""

import math

import keras
import numpy as np

from rflow_tf.layers._base import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
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


def kernel_and_bias_initializers(init, scale=1.0):
    """The (kernel, bias) initialisers of an :data:`INITS` name, the kernel's
    range scaled by ``scale``: "reference" gives
    ``(FanInUniform(scale), FanInUniform())``, "glorot" a Glorot-uniform kernel
    (variance times ``scale**2``) and zero biases.

    Example:
    ```python
    from rflow_tf.layers.initializers import FanInUniform, kernel_and_bias_initializers

    kernel, bias = kernel_and_bias_initializers("reference", scale=1e-3)
    assert isinstance(kernel, FanInUniform) and kernel.scale == 1e-3 and bias.scale == 1.0
    assert kernel_and_bias_initializers("glorot") == ("glorot_uniform", "zeros")
    ```
    """
    if init == "reference":
        return FanInUniform(scale), FanInUniform()
    if init == "glorot":
        kernel = "glorot_uniform"
        if scale != 1.0:
            kernel = keras.initializers.VarianceScaling(scale**2, "fan_avg", "uniform")
        return kernel, "zeros"
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def bias_initializer_for(initializer, kernel_shape):
    """The bias initialiser of a layer whose kernel has ``kernel_shape``: a
    :class:`FanInUniform` learns its fan_in (all kernel dimensions but the
    last) from the kernel; any other initialiser is returned as it is.

    Example:
    ```python
    from rflow_tf.layers.initializers import FanInUniform, bias_initializer_for

    assert bias_initializer_for(FanInUniform(), (3, 3, 4, 8)).fan_in == 36
    assert bias_initializer_for("zeros", (3, 3, 4, 8)) == "zeros"
    ```
    """
    if isinstance(initializer, FanInUniform):
        return initializer.for_fan_in(int(np.prod(kernel_shape[:-1])))
    return initializer


def torch_default_uniform(fan_in, seed=None):
    """PyTorch's default initialisation of ``nn.Linear`` / ``nn.Conv2d`` weights
    and biases as one Keras initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    with ``fan_in`` given (the coupling and classifier nets, which are not
    Lipschitz-constrained, use it for weights and biases alike).

    Example:
    ```python
    import numpy as np
    from rflow_tf.layers.initializers import torch_default_uniform

    w = np.asarray(torch_default_uniform(64, seed=0)((64, 32)))
    assert np.abs(w).max() <= 1 / 8
    ```
    """
    limit = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-limit, limit, seed=seed)
