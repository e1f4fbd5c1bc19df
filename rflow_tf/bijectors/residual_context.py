"""The context of a conditional residual block x + g(x; c): the context
network c -> s(c) whose output shifts the pre-activations of g, its size K, and
the checks that turn a ``conditional_input`` into one context row per example.
:class:`rflow_tf.bijectors.IResBlock` uses them."""

import tensorflow as tf

from rflow_tf import layers as rlayers


def context_net_for(net, condition_size, hidden_units, activation, dtype):
    """The context network c -> s(c) of a conditional block whose branch is
    ``net`` (:func:`rflow_tf.layers.context_shift_net` with one output per
    pre-activation the shift enters), or None when ``condition_size`` is None.

    Example:
    ```python
    net = rlayers.lipschitz_dense_net(2, (8,), 0.9, "lipswish", False, "float32")
    context = context_net_for(net, 3, (16,), "elu", "float32")
    assert context.input_shape == (None, 3)
    assert context_net_for(net, None, (16,), "elu", "float32") is None
    ```
    """
    if condition_size is None:
        return None
    shift_size = sum(rlayers.JacobianChain.from_net(net).shift_sizes)
    return rlayers.context_shift_net(condition_size, shift_size, hidden_units, activation, dtype)


def condition_size_of(condition_net, chain):
    """K, the size of the context c that ``condition_net`` takes (a built Keras
    model or layer), checked against the branch: the net must be a
    :class:`rflow_tf.layers.JacobianChain` (where the shift enters).

    Example:
    ```python
    net = rlayers.lipschitz_dense_net(2, (8,), 0.9, "lipswish", False, "float32")
    chain = rlayers.JacobianChain.from_net(net)
    assert condition_size_of(context_net_for(net, 3, (16,), "elu", "float32"), chain) == 3
    ```
    """
    if not callable(condition_net):
        raise TypeError(
            f"condition_net must be a callable Keras layer or model, got {type(condition_net)}"
        )
    if chain is None:
        raise ValueError(
            "condition_net needs a net of Lipschitz layers and supported activations "
            "(rflow_tf.layers.lipschitz_dense_net / lipschitz_conv_net), whose "
            "pre-activations the context shifts"
        )
    in_shape = getattr(condition_net, "input_shape", None) if condition_net.built else None
    out_shape = getattr(condition_net, "output_shape", None) if condition_net.built else None
    if in_shape is None or len(in_shape) != 2 or in_shape[-1] is None:
        raise ValueError(
            "condition_net must be built with an input of shape [batch, K], e.g. "
            "rflow_tf.layers.context_shift_net(K, shift_size)"
        )
    if out_shape is not None and out_shape[-1] != sum(chain.shift_sizes):
        raise ValueError(
            f"condition_net must output sum(shift_sizes) = {sum(chain.shift_sizes)} values "
            f"(one per unit of the net's layers {chain.shift_sizes}), got {out_shape[-1]}"
        )
    return int(in_shape[-1])


def context_rows(name, conditional_input, x, condition_size, event_ndims):
    """The context c as rows [N, K], one per example of ``x`` (c broadcast to
    the batch shape of ``x``), or None for an unconditional block
    (``condition_size`` None); a clear error, naming the block ``name``, for a
    missing, unexpected or misshapen ``conditional_input``.

    Example:
    ```python
    x = tf.zeros([2, 5, 4])                     # batch [2, 5], events of 4
    rows = context_rows("block", tf.ones([2, 1, 3]), x, 3, 1)
    assert rows.shape == [10, 3] and context_rows("block", None, x, None, 1) is None
    ```
    """
    if condition_size is None:
        if conditional_input is not None:
            raise ValueError(
                f"{name}: got conditional_input, but this block is unconditional "
                "(build it with condition_size=K, or pass condition_net=...)"
            )
        return None
    k = condition_size
    if conditional_input is None:
        raise ValueError(
            f"{name}: this conditional block needs conditional_input=c of shape "
            f"[..., {k}]; inside a tfb.Chain or a TransformedDistribution route it with "
            "rflow_tf.bijectors.conditional_kwargs(flow, c)"
        )
    c = tf.convert_to_tensor(conditional_input, dtype_hint=x.dtype)
    if not c.dtype.is_floating:
        raise TypeError(
            f"{name}: conditional_input must be floating-point, got {c.dtype.name} "
            "(embed integer labels first, e.g. tf.one_hot)"
        )
    nd = event_ndims
    x_batch = x.shape[: x.shape.rank - nd]
    if c.shape.rank is not None:
        if c.shape.rank < 1 or c.shape[-1] not in (None, k):
            raise ValueError(
                f"{name}: conditional_input must have shape [..., {k}] "
                f"(condition_size {k}), got {c.shape}"
            )
        c_batch = c.shape[:-1]
        try:
            fits = tf.broadcast_static_shape(c_batch, x_batch).rank == x_batch.rank
        except ValueError:
            fits = False
        if not fits or (x_batch.is_fully_defined() and c_batch.rank > x_batch.rank):
            raise ValueError(
                f"{name}: the batch shape {c_batch} of conditional_input {c.shape} "
                f"must broadcast to the batch shape {x_batch} of the input {x.shape}"
            )
    c = tf.broadcast_to(c, tf.concat([tf.shape(x)[: tf.rank(x) - nd], [k]], 0))
    return tf.reshape(c, [-1, k])
