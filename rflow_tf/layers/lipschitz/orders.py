"""Norm orders of the Lipschitz layers: a layer's ``domain`` p and ``codomain`` q
are Python floats in [1, inf] or a :class:`LearnableOrder` (one trainable
scalar, shared by the layers whose norms it ties)."""

import keras
import tensorflow as tf

from rflow_tf import norms
from rflow_tf.layers._base import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class LearnableOrder(keras.layers.Layer):
    """A learnable norm order p in [1.001, 5], shared by the layers whose norms it ties.

        p = order_from_unconstrained(raw)   (rflow_tf.norms; raw = 0 <-> p = 2)

    One trainable scalar ``raw``; the squashing keeps p in [1.001, 5] with a
    finite gradient dp/draw everywhere (no NaN as p -> 1 or at the top of the
    range). A residual branch passes the *same* instance as layer i's
    ``codomain`` and layer i + 1's ``domain`` (and the last layer's codomain
    is the first layer's domain), so the chained norms stay equal while they
    are learned (:func:`rflow_tf.layers.lipschitz_dense_net`). Keras and
    checkpoints see its one variable once however many layers share it.

    Example:
    ```python
    from rflow_tf.layers import LearnableOrder, LipschitzDense

    p = LearnableOrder(3.0)
    a = LipschitzDense(8, domain=2, codomain=p)
    b = LipschitzDense(2, domain=p, codomain=2)
    float(p.order())      # 3.0
    ```
    """

    def __init__(self, initial_order=2.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_order = norms.parse_order(initial_order, "initial_order")
        raw = norms.unconstrained_from_order(self.initial_order)
        self.raw = self.add_weight(
            name="raw_order", shape=(), initializer=keras.initializers.Constant(raw)
        )
        self.built = True

    def order(self, dtype=None):
        """The order p (a scalar tensor, of ``dtype`` if given)."""
        p = norms.order_from_unconstrained(tf.convert_to_tensor(self.raw))
        return p if dtype is None else tf.cast(p, dtype)

    def call(self, inputs=None):
        return self.order()

    def get_config(self):
        # The current value: a layer rebuilt from its config starts where this one is.
        return {**super().get_config(), "initial_order": float(self.order())}


def order_argument(order, name):
    """A layer's ``domain`` / ``codomain`` argument: a Python float in [1, inf],
    a :class:`LearnableOrder`, or a serialised LearnableOrder (from get_config).

    Example:
    ```python
    from rflow_tf.layers.lipschitz.orders import LearnableOrder, order_argument, order_config

    assert order_argument("inf", "codomain") == float("inf")
    p = LearnableOrder(3.0)
    assert order_argument(p, "domain") is p
    assert float(order_argument(order_config(p), "domain").order()) == 3.0  # round trip
    ```
    """
    if isinstance(order, LearnableOrder):
        return order
    if isinstance(order, dict):
        return keras.saving.deserialize_keras_object(order)
    return norms.parse_order(order, name)


def order_config(order):
    """A ``domain`` / ``codomain`` as ``get_config`` stores it (inf as "inf").

    Example:
    ```python
    from rflow_tf.layers.lipschitz.orders import order_config

    assert order_config(float("inf")) == "inf" and order_config(2.0) == 2.0
    ```
    """
    if isinstance(order, LearnableOrder):
        return keras.saving.serialize_keras_object(order)
    return "inf" if order == norms.INF else order


def order_value(order, dtype):
    """The order to compute with: a Python float, or a tensor of ``dtype``.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.orders import LearnableOrder, order_value

    assert order_value(2.0, tf.float32) == 2.0
    assert order_value(LearnableOrder(3.0), tf.float64).dtype == tf.float64
    ```
    """
    return order.order(dtype) if isinstance(order, LearnableOrder) else order


def order_label(order):
    """An order for messages: its value, or "learnable".

    Example:
    ```python
    from rflow_tf.layers.lipschitz.orders import LearnableOrder, order_label

    assert order_label(2.0) == 2.0 and order_label(LearnableOrder()) == "learnable"
    ```
    """
    return "learnable" if isinstance(order, LearnableOrder) else order
