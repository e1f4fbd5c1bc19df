"""Residual branches g with Lip(g) <= coeff: lipschitz_dense_net, lipschitz_conv_net."""

import keras

from rflow_tf import norms
from rflow_tf.layers.activations import make_activation
from rflow_tf.layers.initializers import kernel_and_bias_initializers
from rflow_tf.layers.lipschitz import LearnableOrder, LipschitzConv2D, LipschitzDense


def chained_layer_orders(vnorms, learn_p, num_layers, dtype="float32", name=None):
    """The (domain, codomain) arguments of a branch's ``num_layers`` linear maps,
    chained (:func:`rflow_tf.norms.chain_orders`): codomain(i) = domain(i + 1)
    and codomain(last) = domain(first), so Lip(g) <= prod coeff_i in ||.||_{p_0}.

    With ``learn_p`` every order of the chain is a :class:`LearnableOrder`
    initialised at the ``vnorms`` value (which must then lie in (1.001, 5)), and
    the *same* instance is layer i's codomain and layer i + 1's domain, so the
    tie holds while the orders are learned (one variable per order, as the
    authors' mixed mode). Keras ``get_config``/``from_config`` serialises
    layers one by one, so a net rebuilt from its Keras config has one order
    variable per layer side (untied); rebuild learnable nets with this
    function or a :class:`rflow_tf.FlowConfig` (checkpoints and SavedModels
    of such models keep the tie).

    Example:
    ```python
    chained_layer_orders("2f2", False, 2)       # [(2.0, inf), (inf, 2.0)]
    orders = chained_layer_orders("2332", True, 3)
    orders[0][1] is orders[1][0]                 # True: one shared variable
    ```
    """
    pairs = norms.chain_orders(vnorms, num_layers)
    if not learn_p:
        return pairs
    low, high = norms.LEARNABLE_ORDER_RANGE
    domains = []
    for i, (p, _) in enumerate(pairs):
        if not low < p < high:
            raise ValueError(
                f"learn_p: every order of vnorms {vnorms!r} is the initial value of a learnable "
                f"order and must lie in ({low}, {high}); order {i} is {p} (use e.g. '2' instead "
                "of '1' or 'f')"
            )
        prefix = f"{name}_" if name else ""
        domains.append(LearnableOrder(p, dtype=dtype, name=f"{prefix}order_{i}"))
    return [(domains[i], domains[(i + 1) % num_layers]) for i in range(num_layers)]


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
    vnorms="2",
    learn_p=False,
):
    """A residual branch g: R^dim -> R^dim, Lip(g) <= coeff^L (<= coeff).

    g = W_L phi(... phi(W_1 x)) with every W_i a :class:`LipschitzDense`
    (spectral norm <= coeff) and phi a 1-Lipschitz activation; with
    ``preactivation=True`` an activation is applied to x first.

    ``vnorms`` (e.g. "2222", "f" = inf; see :func:`chained_layer_orders`):
    W_i is normalised in the induced norm ||W_i||_{p_i -> p_{i+1}} instead,
    with the orders chained so that ||g(x) - g(y)||_{p_0} <= coeff^L
    ||x - y||_{p_0}; ``learn_p`` makes the orders trainable. The default
    "2" (any string of 2s) is the spectral norm.

    ``init``: one of :data:`INITS` ("reference": weights and biases
    U(+-1/sqrt(fan_in)), as PyTorch and the authors' code; "glorot").
    ``last_layer_scale`` multiplies W_L's initial range (the reference's toy
    nets use 1e-3, so every block starts close to the identity).

    Example:
    ```python
    from rflow_tf.bijectors import IResBlock
    from rflow_tf.layers import lipschitz_dense_net

    net = lipschitz_dense_net(2, hidden_units=(64, 64), coeff=0.9)
    block = IResBlock(net)
    ```
    """
    units = list(hidden_units) + [dim]
    orders = chained_layer_orders(vnorms, learn_p, len(units), dtype, name)
    layers = [make_activation(activation, dtype)] if preactivation else []
    for i, u in enumerate(units):
        if i > 0:
            layers.append(make_activation(activation, dtype))
        scale = last_layer_scale if i == len(units) - 1 else 1.0
        kernel_init, bias_init = kernel_and_bias_initializers(init, scale)
        layers.append(
            LipschitzDense(
                u,
                coeff=coeff,
                dtype=dtype,
                kernel_initializer=kernel_init,
                bias_initializer=bias_init,
                domain=orders[i][0],
                codomain=orders[i][1],
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
    vnorms="2",
    learn_p=False,
):
    """The paper's image residual branch (Appendix E), Lip(g) <= coeff:
    [act] Conv_k1(C -> h) act Conv_k2(h -> h) act ... Conv_kL(h -> C), each a
    :class:`LipschitzConv2D` on the block's spatial size; ``init`` one of
    :data:`INITS`, ``vnorms`` and ``learn_p`` as in :func:`lipschitz_dense_net`
    (the induced norms of the whole padded convolutions).

    ``input_shape`` is (H, W, C) without batch; ``kernels`` like "3-1-3".

    Example:
    ```python
    from rflow_tf.bijectors import IResBlock
    from rflow_tf.layers import lipschitz_conv_net

    net = lipschitz_conv_net((8, 8, 3), hidden_channels=64)
    block = IResBlock(net)
    ```
    """
    ks = [int(k) for k in str(kernels).split("-")]
    channels = input_shape[-1]
    orders = chained_layer_orders(vnorms, learn_p, len(ks), dtype, name)
    layers = [make_activation(activation, dtype)] if preactivation else []
    for i, k in enumerate(ks):
        if i > 0:
            layers.append(make_activation(activation, dtype))
        out = channels if i == len(ks) - 1 else hidden_channels
        kernel_init, bias_init = kernel_and_bias_initializers(init)
        layers.append(
            LipschitzConv2D(
                out,
                k,
                coeff=coeff,
                dtype=dtype,
                kernel_initializer=kernel_init,
                bias_initializer=bias_init,
                domain=orders[i][0],
                codomain=orders[i][1],
            )
        )
    return _sequential(layers, tuple(input_shape), dtype, name)


def context_shift_net(
    condition_size,
    shift_size,
    hidden_units=(64,),
    activation="elu",
    dtype="float32",
    name=None,
):
    """The context network of a conditional residual branch: c in R^K -> s(c) in R^S.

    s(c) = W_out phi(... phi(W_1 c + b_1)) + b_out, with plain Keras ``Dense``
    layers and no Lipschitz constraint: s does not depend on x, so it may be
    any function of c. A conditional :class:`rflow_tf.bijectors.IResBlock`
    adds the pieces of s(c) to the pre-activations of its branch
    (:meth:`rflow_tf.layers.JacobianChain.linearize`), so g(., c) keeps
    Lip <= coeff in x for every c. ``shift_size`` is S, the sum of the
    branch's layer widths (:attr:`JacobianChain.shift_sizes`);
    ``hidden_units=()`` gives an affine map of c.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers import context_shift_net

    net = context_shift_net(3, shift_size=16 + 2, hidden_units=(32,))
    s = net(tf.zeros([5, 3]))          # [5, 18]
    ```
    """
    if isinstance(condition_size, bool) or int(condition_size) != condition_size:
        raise ValueError(f"condition_size must be a positive integer, got {condition_size!r}")
    if int(condition_size) < 1 or int(shift_size) < 1:
        raise ValueError(
            f"condition_size and shift_size must be >= 1, got {condition_size}, {shift_size}"
        )
    hidden = tuple(int(u) for u in hidden_units)
    layers = [keras.layers.Dense(u, activation=activation, dtype=dtype) for u in hidden]
    layers.append(keras.layers.Dense(int(shift_size), dtype=dtype))
    return _sequential(layers, (int(condition_size),), dtype, name)
