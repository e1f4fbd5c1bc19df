"""Residual branches g with Lip(g) <= coeff: lipschitz_dense_net, lipschitz_conv_net."""

import keras

from rflow_tf.layers.activations import make_activation
from rflow_tf.layers.initializers import _initializers
from rflow_tf.layers.lipschitz import LipschitzConv2D, LipschitzDense


def _sequential(layers, input_shape, dtype, name):
    model = keras.Sequential([keras.Input(shape=input_shape, dtype=dtype)] + layers, name=name)
    return model


def lipschitz_dense_net(
    dim,
    hidden_units=(128, 128),
    coeff=0.9,
    activation="lipswish",
    preactivation=False,
    dtype="float32",
    name=None,
    init="reference",
    last_layer_scale=1.0,
):
    """A residual branch g: R^dim -> R^dim, Lip(g) <= coeff^L (<= coeff).

    g = W_L phi(... phi(W_1 x)) with every W_i a :class:`LipschitzDense`
    (spectral norm <= coeff) and phi a 1-Lipschitz activation; with
    ``preactivation=True`` an activation is applied to x first.

    ``init``: one of :data:`INITS` ("reference": weights and biases
    U(+-1/sqrt(fan_in)), as PyTorch and the authors' code; "glorot").
    ``last_layer_scale`` multiplies W_L's initial range (the reference's toy
    nets use 1e-3, so every block starts close to the identity).

    Example:
    ```python
    net = lipschitz_dense_net(2, hidden_units=(64, 64), coeff=0.9)
    block = rflow_tf.bijectors.IResBlock(net)
    ```
    """
    units = list(hidden_units) + [dim]
    layers = [make_activation(activation, dtype)] if preactivation else []
    for i, u in enumerate(units):
        if i > 0:
            layers.append(make_activation(activation, dtype))
        scale = last_layer_scale if i == len(units) - 1 else 1.0
        kernel_init, bias_init = _initializers(init, scale)
        layers.append(
            LipschitzDense(
                u,
                coeff=coeff,
                dtype=dtype,
                kernel_initializer=kernel_init,
                bias_initializer=bias_init,
            )
        )
    return _sequential(layers, (dim,), dtype, name)


def lipschitz_conv_net(
    input_shape,
    hidden_channels=512,
    kernels="3-1-3",
    coeff=0.98,
    activation="lipswish",
    preactivation=True,
    dtype="float32",
    name=None,
    init="reference",
):
    """The paper's image residual branch (Appendix E), Lip(g) <= coeff:
    [act] Conv_k1(C -> h) act Conv_k2(h -> h) act ... Conv_kL(h -> C), each a
    :class:`LipschitzConv2D` on the block's spatial size; ``init`` one of
    :data:`INITS` (see :func:`lipschitz_dense_net`).

    ``input_shape`` is (H, W, C) without batch; ``kernels`` like "3-1-3".

    Example:
    ```python
    net = lipschitz_conv_net((8, 8, 3), hidden_channels=64)
    block = rflow_tf.bijectors.IResBlock(net)
    ```
    """
    ks = [int(k) for k in str(kernels).split("-")]
    channels = input_shape[-1]
    layers = [make_activation(activation, dtype)] if preactivation else []
    for i, k in enumerate(ks):
        if i > 0:
            layers.append(make_activation(activation, dtype))
        out = channels if i == len(ks) - 1 else hidden_channels
        kernel_init, bias_init = _initializers(init)
        layers.append(
            LipschitzConv2D(
                out,
                k,
                coeff=coeff,
                dtype=dtype,
                kernel_initializer=kernel_init,
                bias_initializer=bias_init,
            )
        )
    return _sequential(layers, tuple(input_shape), dtype, name)
