"""JacobianChain: a residual branch evaluated with the factors of its Jacobian."""

import keras
import tensorflow as tf

from rflow_tf.layers.activations import LipschitzCube, LipSwish
from rflow_tf.layers.lipschitz import LipschitzConv2D, LipschitzDense, LipschitzLayer


def _activation_with_derivative(layer):
    """The activation layer as ``(fn, params)``: fn(a, *params) -> (y, d, c) with
    phi(a) = c y and phi'(a) = c d (c a Python float), and the layer's weights
    fn reads (LipSwish's beta), for the activations of our nets; else None."""
    if isinstance(layer, LipSwish):
        return layer.value_and_derivative, ("beta",)
    if isinstance(layer, LipschitzCube):
        return layer.value_and_derivative, ()
    if isinstance(layer, keras.layers.Identity):
        return (lambda a: (a, tf.ones_like(a), 1.0)), ()
    if not isinstance(layer, keras.layers.Activation):
        return None
    name = layer.get_config().get("activation")
    if name == "elu":

        def elu(a):
            y = tf.nn.elu(a)
            return y, tf.where(a > 0, tf.ones_like(a), y + 1.0), 1.0

        return elu, ()
    if name == "softplus":
        return (lambda a: (tf.nn.softplus(a), tf.sigmoid(a), 1.0)), ()
    if name == "relu":
        return (lambda a: (tf.nn.relu(a), tf.cast(a > 0, a.dtype), 1.0)), ()
    return None


class JacobianChain:
    """A Lipschitz net g evaluated together with the factors of its Jacobian.

    For g = L_n o phi o L_{n-1} o ... o phi o L_1 (optionally with a leading
    phi), with L_i(h) = K_i h + b_i a :class:`LipschitzDense` or
    :class:`LipschitzConv2D` and phi a pointwise activation,

        J_g(x) = K_n D_{n-1} K_{n-1} ... D_1 K_1,   D_i = diag(phi'(a_i)),

    where a_i are the pre-activations of the forward pass. :meth:`linearize`
    returns g(x) and these factors (the effective kernels and phi'(a_i),
    computed from the same sigmoid as phi), so every vector-Jacobian product
    u^T J of the power series costs one transposed linear map and one
    multiply per layer instead of a generic backward pass that recomputes the
    activation's derivative; Jacobian-vector products J v (for the Neumann
    surrogate u^T J v) use the same factors. All results are differentiable.
    A constant activation scale (LipSwish's 1/1.1) is folded into the next
    kernel, which saves a pass over the activations.

    :meth:`from_net` returns ``None`` for a net of any other structure (then
    :class:`rflow_tf.bijectors.IResBlock` falls back to automatic
    differentiation).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers import JacobianChain, lipschitz_dense_net

    x, u, v = tf.random.normal([3, 8, 2])
    net = lipschitz_dense_net(2, hidden_units=(64, 64))
    chain = JacobianChain.from_net(net)
    gx, lin = chain.linearize(x)
    w = lin.vjp(u)        # u^T J_g(x)
    jv = lin.jvp(v)       # J_g(x) v
    ```
    """

    def __init__(self, layers):
        self._layers = list(layers)

    @classmethod
    def from_net(cls, net):
        """A chain for a Sequential of Lipschitz linear layers and supported
        activations (LipSwish, LipschitzCube, elu, softplus, relu, identity); else None."""
        layers = getattr(net, "layers", None)
        if not isinstance(net, keras.Sequential) or not layers:
            return None
        for layer in layers:
            if (
                not isinstance(layer, (LipschitzDense, LipschitzConv2D))
                and _activation_with_derivative(layer) is None
            ):
                return None
        return cls(layers)

    def parameters(self, training=False):
        """The tensors g depends on, flat, layer by layer: each Lipschitz
        layer's effective kernel (after its upkeep; ``training=True`` runs its
        ``power_iterations`` first, as the layer's own ``call`` does) and bias
        (when it has one), each LipSwish's beta. :meth:`linearize` with
        ``params=`` computes g from them alone, so a graph function that takes
        them as inputs serves every chain of one :attr:`signature`.

        Example: ``params = chain.parameters(); gx, lin = chain.linearize(x, params=params)``.
        """
        params = []
        for layer in self._layers:
            if isinstance(layer, LipschitzLayer):
                layer._maybe_iterate(training)
                params.append(layer.effective_kernel())
                if layer.use_bias:
                    params.append(tf.convert_to_tensor(layer.bias))
            else:
                weights = _activation_with_derivative(layer)[1]
                params += [tf.convert_to_tensor(getattr(layer, w)) for w in weights]
        return params

    @property
    def signature(self):
        """What the arithmetic of :meth:`linearize` with ``params=`` depends on
        besides its inputs: each layer's class, activation and use of a bias
        (the kernels' shapes are those of the inputs). Chains with equal
        signatures compute the same function of (x, params, shift).

        Example: ``JacobianChain.from_net(lipschitz_dense_net(2, (8,))).signature``.
        """
        return tuple(
            (type(layer).__name__, layer.use_bias)
            if isinstance(layer, LipschitzLayer)
            else (type(layer).__name__, layer.get_config().get("activation"))
            for layer in self._layers
        )

    @property
    def shift_sizes(self):
        """The output sizes (units or filters) of the chain's linear layers, in
        order: the pieces of the ``shift`` argument of :meth:`linearize`.

        Example: ``JacobianChain.from_net(lipschitz_dense_net(2, (8,))).shift_sizes  # (8, 2)``.
        """
        return tuple(
            int(getattr(layer, "units", None) or layer.filters)
            for layer in self._layers
            if isinstance(layer, LipschitzLayer)
        )

    def _shift_pieces(self, shift, rank):
        """``shift`` [B, sum(shift_sizes)] split into one piece per linear layer,
        each shaped to broadcast over the layer's spatial axes (rank ``rank``)."""
        if shift is None:
            return None
        pieces = tf.split(shift, list(self.shift_sizes), axis=-1)
        spatial = [1] * (rank - 2)
        return [
            tf.reshape(p, tf.concat([tf.shape(p)[:1], spatial, [n]], 0)) if spatial else p
            for p, n in zip(pieces, self.shift_sizes)
        ]

    def linearize(self, x, training=False, params=None, shift=None):
        """Returns ``(g(x), lin)``: lin.vjp(u) = u^T J_g(x), lin.jvp(v) = J_g(x) v.

        ``training=True`` runs each layer's ``power_iterations`` first, as
        the layer's own ``call`` does. ``params``: the tensors of
        :meth:`parameters` to compute with (default: read now; see
        :meth:`frozen`); then no weight of the layers is read. ``shift``:
        None, or a tensor [B, sum(:attr:`shift_sizes`)] added to the
        pre-activations: linear layer i computes K_i h + b_i + s_i (s_i
        broadcast over space), which moves the points a_i where phi' is
        evaluated but adds no Jacobian factor, so Lip(g) in x keeps its bound
        for every shift.
        """
        params = iter(self.parameters(training) if params is None else params)
        pieces = self._shift_pieces(shift, x.shape.rank)
        factors, h, scale, n_linear = [], x, 1.0, 0
        for layer in self._layers:
            if isinstance(layer, LipschitzLayer):
                kernel = tf.cast(next(params), h.dtype)
                if scale != 1.0:  # phi = c y: fold c into this (small) kernel
                    kernel, scale = kernel * scale, 1.0
                factors.append((layer, kernel))
                h = layer.apply_kernel(h, kernel)
                if layer.use_bias:
                    h = h + tf.cast(next(params), h.dtype)
                if pieces is not None:
                    h, n_linear = h + pieces[n_linear], n_linear + 1
            else:
                if scale != 1.0:
                    h, factors[-1] = h * scale, (None, factors[-1][1] * scale)
                fn, weights = _activation_with_derivative(layer)
                h, d, scale = fn(h, *[next(params) for _ in weights])
                factors.append((None, d))
        if scale != 1.0:
            h, factors[-1] = h * scale, (None, factors[-1][1] * scale)
        return h, _Linearization(factors)


class _Linearization:
    """The factors of J_g(x) from :meth:`JacobianChain.linearize`."""

    def __init__(self, factors):
        self._factors = factors

    def vjp(self, u):
        """u^T J: transposed maps and derivative multiplies, last layer first."""
        for layer, t in reversed(self._factors):
            u = u * t if layer is None else layer.apply_kernel_transpose(u, t)
        return u

    def jvp(self, v):
        """J v: the linear maps (without bias) and derivative multiplies in order."""
        for layer, t in self._factors:
            v = v * t if layer is None else layer.apply_kernel(v, t)
        return v
