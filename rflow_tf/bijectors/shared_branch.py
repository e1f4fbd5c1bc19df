"""Graph functions shared by the residual branches of one signature: a flow of
many residual blocks of one configuration traces one copy of each computation
on a branch g (its log-det series and their gradient, the exact log-det, the
fixed-point inverse), not one per block.
:class:`rflow_tf.bijectors.IResBlock` calls its branch through them."""

import tensorflow as tf

from rflow_tf.bijectors._base import zeros_for_none

# (name, chain signature, static settings) -> (tf.function, stack of the chains being traced)
_SHARED = {}


def branch_function(name, chain, static, body, differentiable=False):
    """``body(chain, *args)`` as a graph function shared by every chain of
    ``chain``'s :attr:`~rflow_tf.layers.JacobianChain.signature`.

    The function is traced once per (``name``, signature, ``static``) and
    input signature, then reused by every enclosing trace: Python builds one
    copy of its ops, however many blocks call it. (Graph optimisation then
    inlines the calls: a call of a function that is not inlined runs as a
    unit, and the small ops of a toy flow's step measured 10-20% slower that
    way.) ``body`` must read no weight of the chain's layers
    (its arithmetic is the signature's): the weights come in as tensors,
    ``chain.parameters()`` passed to ``chain.linearize(x, params=...)``, and
    gradients with respect to them flow on through the enclosing graph.

    ``differentiable=True``: the gradient of the call with respect to its
    floating-point arguments comes from a second shared function,
    ``name + "_grad"``, which recomputes ``body`` under a tape (the same
    gradient as differentiating ``body`` inline). Without it, the caller
    defines the gradient (``tf.custom_gradient``), or TensorFlow
    differentiates the call itself.

    Args:
        name: the function's name (and part of its key).
        chain: the :class:`rflow_tf.layers.JacobianChain` calling it.
        static: a tuple of the Python settings ``body`` depends on.
        body: callable ``(chain, *args) -> tensors``; an argument may be None
            (then the function is traced for it).
        differentiable: see above.

    Returns:
        A callable ``(*args) -> body(chain, *args)``.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.bijectors.shared_branch import branch_function
    from rflow_tf.layers import JacobianChain, lipschitz_dense_net

    chains = [JacobianChain.from_net(lipschitz_dense_net(2, (8,), 0.9)) for _ in range(3)]
    x = tf.random.normal([4, 2])

    def g(chain, x, *params):
        return chain.linearize(x, params=params)[0]

    @tf.function
    def residuals(x):  # three calls of one graph function
        return [branch_function("g", c, (), g)(x, *c.parameters()) for c in chains]

    assert all(r.shape == [4, 2] for r in residuals(x))
    ```
    """
    key = (name, chain.signature) + tuple(static)
    if key not in _SHARED:
        tracer = []

        def shared(*args):
            return body(tracer[-1], *args)

        shared.__name__ = shared.__qualname__ = name
        fn = tf.function(shared, autograph=False)
        _SHARED[key] = (fn, tracer)
    fn, tracer = _SHARED[key]

    def call(*args):
        tracer.append(chain)
        try:
            return fn(*args)
        finally:
            tracer.pop()

    if not differentiable:
        return call
    backward = branch_function(name + "_grad", chain, static, _recomputed_gradient(body))

    def differentiable_call(*args):
        holes = [a is None for a in args]
        inputs = [tf.convert_to_tensor(a) for a in args if a is not None]

        @tf.custom_gradient
        def with_gradient(*inputs):
            full = _refill(inputs, holes)
            outputs = call(*full)

            def grad(*upstream):
                outs = tf.nest.flatten(outputs)
                pairs = [(o, d) for o, d in zip(outs, upstream) if o.dtype.is_floating]
                dys = [tf.zeros_like(o) if d is None else d for o, d in pairs]
                return backward(full, dys)

            return outputs, grad

        return with_gradient(*inputs)

    return differentiable_call


def _refill(tensors, holes):
    """The argument list with None where ``holes`` is True, else the next tensor."""
    tensors = iter(tensors)
    return [None if hole else next(tensors) for hole in holes]


def _recomputed_gradient(body):
    """The body of a backward function: ``(chain, args, upstream)`` -> the
    gradients of sum(upstream * body(chain, *args)) over the floating-point
    outputs, with respect to the arguments that are not None."""

    def gradient(chain, args, upstream):
        inputs = [a for a in args if a is not None]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = [o for o in tf.nest.flatten(body(chain, *args)) if o.dtype.is_floating]
        grads = tape.gradient(outputs, inputs, output_gradients=list(upstream))
        return zeros_for_none(grads, inputs)

    return gradient
