"""TFP bijectors for residual flows.

Direction convention
--------------------
Every bijector here maps **data to latent** in its ``forward`` direction, the
cheap direction of an invertible residual block f(x) = x + g(x) (the paper's
f). A flow is therefore used in a ``tfd.TransformedDistribution`` through
``tfb.Invert``:

```python
import tensorflow as tf
import tensorflow_probability as tfp
from rflow_tf.bijectors import IResBlock
tfb, tfd = tfp.bijectors, tfp.distributions

block1, block2, block3 = (IResBlock.dense(2, hidden_units=(8,)) for _ in range(3))
flow = tfb.Chain([block3, block2, block1])        # data -> latent
dist = tfd.TransformedDistribution(
    tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(flow))
x = tf.random.normal([4, 2])
lp = dist.log_prob(x)   # runs flow.forward + its log-det: cheap, unbiased
xs = dist.sample(8)     # runs flow.inverse: fixed-point iteration per block
assert lp.shape == [4] and xs.shape == [8, 2]
```

Randomness and caching
----------------------
The log-determinant of :class:`IResBlock` is a random estimate. Each call
accepts a stateless ``seed`` (and a ``training`` switch) as bijector kwargs;
inside a ``Chain`` route them by name, e.g.
``chain.forward_log_det_jacobian(x, 1, block_0={"seed": s})``, or use
:func:`flow_kwargs` to build the nested dict for every block. The bijectors in
this module replace TFP's result cache: ``forward`` is always recomputed
(weights change during training), log-dets are never cached (a cached random
estimate would be a stale sample, or give ``None`` gradients under a new
tape), and ``inverse(y)`` of a still-alive output ``y`` of ``forward`` returns
its input, so ``TransformedDistribution.log_prob`` never runs a fixed-point
inversion.

Conditioning
------------
A conditional :class:`IResBlock` (``condition_size=K``) models p(x | c): its
methods take TFP's ``conditional_input=c`` keyword, and
:func:`conditional_kwargs` routes one c to every conditional block of a
``Chain`` or ``TransformedDistribution`` (``bijector_kwargs``).

Variables
---------
``trainable_variables`` of these bijectors (and of any ``Chain`` or
``TransformedDistribution`` containing them) lists the Keras weights, so
``tfp.math.minimize(loss, ..., trainable_variables=dist.trainable_variables)``
trains the flow.

Modules
-------
One module per bijector, each re-exported here (``from rflow_tf.bijectors
import IResBlock``):

* ``iresblock``: :class:`IResBlock` (``LOGDET_MODES``);
* ``residual_logdet``, ``fixed_point``, ``residual_context``: the residual
  block's log-det (exact and with Neumann-series gradients), its fixed-point
  inverse and its context checks, as functions of the branch g;
* ``actnorm``: :class:`ActNorm`;
* ``squeeze``: :class:`Squeeze` (``SQUEEZE_ORDERS``);
* ``logit``: :class:`LogitTransform`;
* ``seeds``: :func:`flow_kwargs`, :func:`use_fixed_seed`, :func:`conditional_kwargs`;
* ``coupling``: :class:`AffineCoupling` (the paper's coupling baseline) and its nets;
* ``invertible_conv``: :class:`Invertible1x1Conv` (Glow's 1x1 convolution);
* ``sigmoidal_flows``: :class:`DeepSigmoidalFlow`, :class:`DeepDenseSigmoidalFlow`
  (NAF) and their :class:`MADE` conditioner;
* ``mixlogcdf``: :class:`MixLogCDFCoupling` (Flow++) and its conditioner;
* ``dequantization``: :class:`UniformDequantizer`, :class:`VariationalDequantizer`;
* ``monotone``: the log-space sigmoid mixtures and bisection NAF and Flow++ share;
* ``_base``: the shared machinery (the cache above, identity equality, the
  Keras-backed base class, argument checks). Bijectors defined outside this
  package (:class:`rflow_tf.flow.FlowBijector`, :class:`rflow_tf.flow.FactorOut`)
  take three of its names from here: :class:`FreshBijectorCache`,
  :class:`EqualOnlyToItself` and :func:`check_stateless_seed`.
"""

from rflow_tf.bijectors._base import (  # noqa: F401  (for bijectors defined elsewhere)
    EqualOnlyToItself,
    FreshBijectorCache,
    check_stateless_seed,
)
from rflow_tf.bijectors.actnorm import ActNorm
from rflow_tf.bijectors.coupling import AffineCoupling
from rflow_tf.bijectors.dequantization import UniformDequantizer, VariationalDequantizer
from rflow_tf.bijectors.invertible_conv import Invertible1x1Conv
from rflow_tf.bijectors.iresblock import LOGDET_MODES, IResBlock
from rflow_tf.bijectors.logit import LogitTransform
from rflow_tf.bijectors.mixlogcdf import GatedAttentionConditioner, MixLogCDFCoupling
from rflow_tf.bijectors.seeds import conditional_kwargs, flow_kwargs, use_fixed_seed
from rflow_tf.bijectors.sigmoidal_flows import MADE, DeepDenseSigmoidalFlow, DeepSigmoidalFlow
from rflow_tf.bijectors.squeeze import SQUEEZE_ORDERS, Squeeze

__all__ = [
    "IResBlock",
    "ActNorm",
    "Squeeze",
    "SQUEEZE_ORDERS",
    "LogitTransform",
    "LOGDET_MODES",
    "flow_kwargs",
    "use_fixed_seed",
    "conditional_kwargs",
    "AffineCoupling",
    "Invertible1x1Conv",
    "MADE",
    "DeepSigmoidalFlow",
    "DeepDenseSigmoidalFlow",
    "MixLogCDFCoupling",
    "GatedAttentionConditioner",
    "UniformDequantizer",
    "VariationalDequantizer",
]
