"""Lipschitz-normalised layers: :class:`LipschitzDense` and :class:`LipschitzConv2D`
bound the norm of their linear map by ``coeff`` -- the spectral norm, or an induced
mixed norm ||W||_{p->q} with fixed or learnable orders (:class:`LearnableOrder`).

Modules, each re-exported here:

* ``base`` -- :class:`LipschitzLayer`, the layers' base class: settings, the
  stored estimate (u, v, sigma) and the verbs that keep it current;
* ``dense``, ``conv`` -- :class:`LipschitzDense`, :class:`LipschitzConv2D`;
* ``estimators`` -- how sigma is estimated, one strategy chosen in ``build``:
  spectral power iteration (matrix or convolution);
* ``mixed_estimators`` -- the same for mixed norms: closed forms, the
  generalised power method;
* ``power_iteration`` -- their pure numerics (Gram iteration,
  :func:`plane_wave_start`, the certified upper bound);
* ``orders`` -- :class:`LearnableOrder` and the ``domain`` / ``codomain`` arguments;
* ``upkeep`` -- the state one estimate reads and writes, and the graph
  function that re-estimates in a call, shared by the layers of one configuration;
* ``walk`` -- the Lipschitz layers of a model, bijector or distribution
  (:func:`lipschitz_layers`, :func:`keras_layers`, :func:`learned_orders`) and
  the verbs applied to all of them.

**Keeping the estimates current.** A training loop need not call anything:
each use of a changed kernel re-estimates. :func:`converge_lipschitz` is the
careful estimate before evaluation or export; :func:`mark_lipschitz_current`
follows restoring a checkpoint; :func:`update_lipschitz` re-estimates changed
kernels after an optimiser step (for distributed training, in cross-replica
context).
"""

from rflow_tf.layers.lipschitz.base import LipschitzLayer
from rflow_tf.layers.lipschitz.conv import LipschitzConv2D
from rflow_tf.layers.lipschitz.dense import LipschitzDense
from rflow_tf.layers.lipschitz.orders import LearnableOrder
from rflow_tf.layers.lipschitz.power_iteration import plane_wave_start
from rflow_tf.layers.lipschitz.upkeep import can_store_in_context
from rflow_tf.layers.lipschitz.walk import (
    converge_lipschitz,
    keras_layers,
    learned_orders,
    lipschitz_layers,
    mark_lipschitz_current,
    update_lipschitz,
)

__all__ = [
    "LipschitzLayer",
    "LipschitzDense",
    "LipschitzConv2D",
    "LearnableOrder",
    "plane_wave_start",
    "can_store_in_context",
    "keras_layers",
    "lipschitz_layers",
    "converge_lipschitz",
    "update_lipschitz",
    "learned_orders",
    "mark_lipschitz_current",
]
