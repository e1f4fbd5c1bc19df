"""1-Lipschitz activations of residual branches: LipSwish and the others by name
(make_activation), and the activations that are 1-Lipschitz in every p-norm.

A residual branch g = W_L o phi o ... o phi o W_1 with ||W_i||_{p_i -> p_{i+1}}
<= c_i has Lip(g) <= prod c_i in the norm ||.||_{p_1} when every activation phi
between W_i and W_{i+1} is 1-Lipschitz in ||.||_{p_{i+1}}. All three activations
here are 1-Lipschitz in *every* p-norm, p in [1, inf]:

* :class:`LipschitzCube` is elementwise with |phi'| <= 1, and an elementwise map
  with |phi(a) - phi(b)| <= |a - b| per coordinate contracts every p-norm.
* :class:`FullSort` and :class:`MaxMin` are continuous and piecewise linear with
  every piece a permutation matrix. A permutation is an isometry of every
  p-norm, so along the segment from x to y (finitely many pieces) the lengths
  add up to at most ||x - y||_p. They are *gradient-norm preserving* (their
  Jacobian is a permutation almost everywhere), not elementwise, so they have
  no ``value_and_derivative``.

What does *not* hold: a 1-Lipschitz bound between *different* orders. From
||.||_p to ||.||_q with q < p the identity itself has norm n^(1/q - 1/p) > 1,
so an activation placed between layers whose orders do not chain
(codomain(i) != domain(i + 1)) breaks the bound; :func:`rflow_tf.norms.chain_orders`
prevents this. Nor are these bounds valid for norms that are not invariant
under permuting coordinates (e.g. weighted norms) in the case of FullSort
and MaxMin.
"""

import keras
import tensorflow as tf

from rflow_tf.layers._base import PACKAGE

#: Below this many elements the fused XLA LipSwish costs more than it saves
#: (measured on the 2-core CPU of benchmarks/: 4x faster at 6.4M elements,
#: 1.2x at 400k, 10% slower at 64k).
_FUSED_LIPSWISH_MIN_ELEMENTS = 2**18


@tf.function(jit_compile=True, autograph=False)
def _lipswish_forward(x, beta):
    b = tf.nn.softplus(beta)
    bx = b * x
    s = tf.sigmoid(bx)
    return x * s, s + tf.raw_ops.SigmoidGrad(y=s, dy=bx)  # SigmoidGrad(s, w) = w s (1 - s)


@tf.function(jit_compile=True, autograph=False)
def _lipswish_backward(x, beta, gy, gd=None):
    """d/d(x, beta) of sum(gy * y + gd * d); ``gd=None``: of sum(gy * y) only
    (a separate trace, without the second-derivative terms)."""
    b = tf.nn.softplus(beta)
    w = b * x
    s = tf.sigmoid(w)
    ss = s * (1.0 - s)
    gx = gy * (s + w * ss)  # dy/dx = d
    gb_pointwise = gy * x * x * ss  # dy/db = x^2 s (1 - s)
    if gd is not None:
        e = ss * (2.0 + w * (1.0 - 2.0 * s))  # dd/dw
        gx += gd * (b * e)  # dd/dx = b e
        gb_pointwise += gd * x * e  # dd/db = x e
    return gx, tf.reduce_sum(gb_pointwise) * tf.sigmoid(beta)  # db/dbeta = sigmoid(beta)


@tf.custom_gradient
def lipswish_value_and_derivative(x, beta):
    """(y, d) = (x s, s + b x s (1 - s)), s = sigmoid(b x), b = softplus(beta):
    LipSwish without its 1/1.1 and its derivative, phi = y / 1.1 and
    phi' = d / 1.1 (paper eq. 10).

    Forward and backward are each one fused XLA kernel: a pass over x writes
    y and d, and the backward pass recomputes s from x (so only x is kept)
    and writes dx in one pass, with the closed forms dy/dx = d,
    dd/dx = b e, dy/db = x^2 s (1 - s), dd/db = x e, where
    e = s (1 - s) (2 + b x (1 - 2 s)). Unfused, TensorFlow runs about fifteen
    memory-bound element-wise kernels for the same backward pass.

    Example:
    ```python
    y, d = lipswish_value_and_derivative(tf.linspace(-3., 3., 7), tf.constant(0.5))
    ```
    """
    y, d = _lipswish_forward(x, beta)

    def grad(gy, gd):
        if gy is None:
            gy = tf.zeros_like(x)
        return _lipswish_backward(x, beta, gy, gd)

    return (y, d), grad


@keras.saving.register_keras_serializable(package=PACKAGE)
class LipSwish(keras.layers.Layer):
    """LipSwish activation (paper eq. 10): phi(x) = x * sigmoid(b x) / 1.1,
    b = softplus(beta) > 0, with one learnable scalar beta per layer.

    max_x |phi'(x)| <= 1 for every b > 0, so it keeps Lip(g) <= 1 while its
    second derivative does not vanish where |phi'| is close to 1.

    Example:
    ```python
    act = LipSwish()          # beta initialised to 0.5
    y = act(tf.linspace(-3., 3., 7))
    ```
    """

    def __init__(self, beta_initializer=0.5, **kwargs):
        super().__init__(**kwargs)
        self.beta_initializer = float(beta_initializer)

    def build(self, input_shape):
        self.beta = self.add_weight(
            name="beta", shape=(), initializer=keras.initializers.Constant(self.beta_initializer)
        )

    def call(self, x):
        b = tf.nn.softplus(tf.cast(self.beta, x.dtype))
        return x * tf.sigmoid(b * x) / 1.1

    def value_and_derivative(self, x, beta=None):
        """``(y, d, c)`` with phi(x) = c y and phi'(x) = c d, c = 1/1.1:
        y = x s and d = s + b x s (1 - s) with s = sigmoid(b x). (The constant
        c is returned separately so a caller can fold it into the next linear
        map instead of spending a pass over the tensor.) For tensors of at
        least 2^18 elements the forward and backward passes are each one fused
        XLA kernel (:func:`lipswish_value_and_derivative`); for smaller ones the
        kernel launches cost more than they save, and plain ops are used.
        ``beta``: the parameter to use (default: the layer's weight), e.g. a
        tensor passed into a graph function shared by several layers.
        """
        beta = tf.cast(self.beta if beta is None else beta, x.dtype)
        if (x.shape.num_elements() or 0) >= _FUSED_LIPSWISH_MIN_ELEMENTS:
            return lipswish_value_and_derivative(x, beta) + (1.0 / 1.1,)
        return _lipswish_forward.python_function(x, beta) + (1.0 / 1.1,)

    def get_config(self):
        return {**super().get_config(), "beta_initializer": self.beta_initializer}


#: Activations by name (:func:`make_activation`). All are 1-Lipschitz in every
#: p-norm, so any of them works with mixed norms (``vnorms``): the elementwise
#: ones have |phi'| <= 1; "fullsort" and "maxmin" permute coordinates piecewise.
ACTIVATIONS = ("lipswish", "elu", "softplus", "relu", "identity", "lcube", "fullsort", "maxmin")

#: The activations of image blocks: elementwise ones. "fullsort" and "maxmin"
#: are for dense (toy) nets only: they are not elementwise, so an image block
#: would lose its explicit Jacobian factors (JacobianChain) and fall back to
#: generic autodiff in every term of the log-det series, and "maxmin" needs an
#: even number of channels, which a 1- or 3-channel image input is not.
IMAGE_ACTIVATIONS = ("lipswish", "elu", "softplus", "relu", "identity", "lcube")


def make_activation(name, dtype=None):
    """A 1-Lipschitz activation layer by name: one of :data:`ACTIVATIONS`
    ("lcube": :class:`LipschitzCube`, "fullsort": :class:`FullSort`,
    "maxmin": :class:`MaxMin`).

    Example:
    ```python
    act = make_activation("elu")
    cube = make_activation("lcube")
    ```
    """
    if name == "lipswish":
        return LipSwish(dtype=dtype)
    if name == "lcube":
        return LipschitzCube(dtype=dtype)
    if name == "fullsort":
        return FullSort(dtype=dtype)
    if name == "maxmin":
        return MaxMin(dtype=dtype)
    if name in ("elu", "softplus", "relu"):
        return keras.layers.Activation(name, dtype=dtype)
    if name == "identity":
        return keras.layers.Identity(dtype=dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def lipschitz_cube_value_and_derivative(x):
    """(phi(x), phi'(x)) of :class:`LipschitzCube`:

        phi(x) = x^3 / 3 for |x| < 1,   x - 2/3 sign(x) for |x| >= 1,
        phi'(x) = min(x^2, 1).

    Example:
    ```python
    y, d = lipschitz_cube_value_and_derivative(tf.constant([-2.0, 0.5, 3.0]))
    # y = [-4/3, 1/24, 7/3], d = [1, 1/4, 1]
    ```
    """
    x = tf.convert_to_tensor(x)
    inside = tf.abs(x) < 1.0
    y = tf.where(inside, x * x * x / 3.0, x - tf.sign(x) * (2.0 / 3.0))
    d = tf.minimum(x * x, 1.0)
    return y, d


@keras.saving.register_keras_serializable(package=PACKAGE)
class LipschitzCube(keras.layers.Layer):
    """The "Lipschitz cube" of the Residual Flows code, elementwise:

        phi(x) = x^3 / 3          for |x| < 1,
        phi(x) = x - 2/3 sign(x)  for |x| >= 1,     phi'(x) = min(x^2, 1).

    Continuously differentiable, with |phi'| <= 1, so 1-Lipschitz in every
    p-norm (p in [1, inf]); phi'' = 2x is non-zero near the origin, unlike ReLU
    or a clipped linear map, which the log-det gradient needs (paper Section 4).
    Its derivative vanishes at 0, so a branch made only of it starts flat.

    Example:
    ```python
    act = LipschitzCube()
    y = act(tf.linspace(-2.0, 2.0, 5))      # [-4/3, -1/3, 0, 1/3, 4/3]
    ```
    """

    def call(self, x):
        return lipschitz_cube_value_and_derivative(x)[0]

    def value_and_derivative(self, x):
        """``(y, d, c)`` with phi(x) = c y and phi'(x) = c d, c = 1.0 (the same
        contract as :meth:`rflow_tf.layers.LipSwish.value_and_derivative`)."""
        y, d = lipschitz_cube_value_and_derivative(x)
        return y, d, 1.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config()


@keras.saving.register_keras_serializable(package=PACKAGE)
class FullSort(keras.layers.Layer):
    """Sorts the features (last axis) in ascending order (Anil et al. 2019):

        phi(x) = (x_(1), ..., x_(n)),  x_(1) <= ... <= x_(n).

    Piecewise a permutation of the coordinates, hence 1-Lipschitz in every
    p-norm and gradient-norm preserving; not elementwise. For images
    ([batch, H, W, C]) it sorts the channels of each pixel.

    Example:
    ```python
    FullSort()(tf.constant([[3.0, -1.0, 2.0]]))     # [[-1, 2, 3]]
    ```
    """

    def call(self, x):
        return tf.sort(x, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config()


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaxMin(keras.layers.Layer):
    """Max-min on pairs of features (Anil et al. 2019), the authors' layout:
    the last axis (even size n) is split into pairs (x_{2i}, x_{2i+1}), and

        phi(x) = (max(x_0, x_1), ..., max(x_{n-2}, x_{n-1}),
                  min(x_0, x_1), ..., min(x_{n-2}, x_{n-1})).

    Piecewise a permutation of the coordinates, hence 1-Lipschitz in every
    p-norm and gradient-norm preserving; not elementwise.

    Example:
    ```python
    MaxMin()(tf.constant([[1.0, 3.0, -2.0, -5.0]]))   # [[3, -2, 1, -5]]
    ```
    """

    def build(self, input_shape):
        n = input_shape[-1]
        if n is None or n % 2:
            raise ValueError(
                f"MaxMin needs an even, static number of features on the last axis "
                f"to pair them, got input shape {tuple(input_shape)}"
            )

    def call(self, x):
        n = x.shape[-1]
        pairs = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [n // 2, 2]], 0))
        return tf.concat([tf.reduce_max(pairs, -1), tf.reduce_min(pairs, -1)], -1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config()
