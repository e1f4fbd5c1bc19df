"""Keras 3 layers for Lipschitz-constrained residual branches.

* :class:`LipSwish` -- phi(x) = x * sigmoid(softplus(beta) x) / 1.1, |phi'| <= 1.
* :class:`LipschitzDense`, :class:`LipschitzConv2D` -- spectral normalisation
  W_eff = W / max(1, sigma / coeff), sigma = ||W||_2 estimated by power
  iteration on persistent non-trainable vectors; the gradient flows through
  sigma. For k x k convolutions sigma is the operator norm of the whole padded
  convolution on the layer's input size. With ``domain``/``codomain`` orders
  (fixed, or :class:`LearnableOrder`) the bound is on the induced mixed norm
  ||W||_{p->q} instead (see :mod:`rflow_tf.norms`).
* :class:`ActNormalization` -- the weights of the ActNorm bijector.
* :func:`lipschitz_dense_net`, :func:`lipschitz_conv_net` -- residual branches g
  with Lip(g) <= coeff, ready for :class:`rflow_tf.bijectors.IResBlock`;
  :func:`context_shift_net` -- the unconstrained context network of a
  conditional branch (its output shifts the branch's pre-activations).
* :class:`JacobianChain` -- such a branch evaluated with the factors of its
  Jacobian, for cheap vector-Jacobian products in the log-det power series.
* :func:`converge_lipschitz` -- the careful estimate of every Lipschitz layer's
  norm in a model, bijector or distribution, before evaluation, sampling or
  export (training needs no call: each use of a changed kernel re-estimates).

Modules (each re-exported here, so ``from rflow_tf.layers import LipschitzDense``
works): ``activations`` (LipSwish, make_activation, LipschitzCube, FullSort, MaxMin),
``initializers`` (FanInUniform), ``lipschitz`` (a package: the Lipschitz layers, their
norm estimators and converge_lipschitz & co.), ``actnorm``, ``nets``, ``jacobian_chain``.
"""

from rflow_tf.layers.activations import (
    ACTIVATIONS,
    IMAGE_ACTIVATIONS,
    FullSort,
    LipschitzCube,
    LipSwish,
    MaxMin,
    lipschitz_cube_value_and_derivative,
    lipswish_value_and_derivative,
    make_activation,
)
from rflow_tf.layers.actnorm import ActNormalization
from rflow_tf.layers.initializers import INITS, FanInUniform
from rflow_tf.layers.jacobian_chain import JacobianChain
from rflow_tf.layers.lipschitz import (
    LearnableOrder,
    LipschitzConv2D,
    LipschitzDense,
    LipschitzLayer,
    can_store_in_context,
    converge_lipschitz,
    keras_layers,
    learned_orders,
    lipschitz_layers,
    mark_lipschitz_current,
    plane_wave_start,
    update_lipschitz,
)
from rflow_tf.layers.nets import (
    chained_layer_orders,
    context_shift_net,
    lipschitz_conv_net,
    lipschitz_dense_net,
)

__all__ = [
    "LipSwish",
    "lipswish_value_and_derivative",
    "LipschitzDense",
    "LipschitzConv2D",
    "LipschitzLayer",
    "LearnableOrder",
    "ActNormalization",
    "FanInUniform",
    "INITS",
    "lipschitz_dense_net",
    "lipschitz_conv_net",
    "context_shift_net",
    "JacobianChain",
    "lipschitz_layers",
    "keras_layers",
    "converge_lipschitz",
    "update_lipschitz",
    "learned_orders",
    "mark_lipschitz_current",
    "can_store_in_context",
    "plane_wave_start",
    "make_activation",
    "ACTIVATIONS",
    "IMAGE_ACTIVATIONS",
    "chained_layer_orders",
    "LipschitzCube",
    "FullSort",
    "MaxMin",
    "lipschitz_cube_value_and_derivative",
]
