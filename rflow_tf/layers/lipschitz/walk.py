"""The Lipschitz layers of a model, bijector or distribution, and the verbs of
:class:`~rflow_tf.layers.lipschitz.base.LipschitzLayer` applied to all of them:
:func:`converge_lipschitz` (the careful estimate, before evaluation or export),
:func:`update_lipschitz` (re-estimate changed kernels after an optimiser step)
and :func:`mark_lipschitz_current` (after restoring a checkpoint). A training
loop needs none of them for the bound: each use of a changed kernel re-estimates."""

import keras
import tensorflow as tf

from rflow_tf.layers.lipschitz.base import LipschitzLayer
from rflow_tf.layers.lipschitz.orders import LearnableOrder

#: Attributes through which bijectors, distributions and flows reach their parts.
_PART_ATTRIBUTES = (
    "net",
    "layer",
    "bijector",
    "bijectors",
    "distribution",
    "stages",
    "inner",
    "layers_for_lipschitz",
)


def keras_layers(obj):
    """The outermost Keras layers (and models) inside ``obj``: a Keras layer,
    a bijector (Chain, Invert, IResBlock, ActNorm, ...), a distribution, or a
    list of these, each once. Their weights are all of ``obj``'s weights.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.bijectors import IResBlock
    from rflow_tf.layers import keras_layers

    block = IResBlock.dense(2, hidden_units=(8, 8))
    block.forward(tf.zeros([1, 2]))
    weights = [w for layer in keras_layers(block) for w in layer.weights]
    ```
    """
    found, seen = [], set()

    def visit(o):
        if o is None or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, (list, tuple)):
            for item in o:
                visit(item)
            return
        if isinstance(o, keras.layers.Layer):
            found.append(o)
            return
        for attr in _PART_ATTRIBUTES:
            if hasattr(o, attr):
                try:
                    part = getattr(o, attr)
                except (AttributeError, NotImplementedError):
                    continue
                if isinstance(part, (list, tuple, keras.layers.Layer)) or isinstance(
                    part, tf.Module
                ):
                    visit(part)

    visit(obj)
    return found


def lipschitz_layers(obj):
    """All Lipschitz layers (:class:`LipschitzLayer`) inside ``obj``: a Keras layer or model,
    a bijector (Chain, Invert, IResBlock, ...), a TransformedDistribution, or
    a list of these (see :func:`keras_layers`).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.bijectors import IResBlock
    from rflow_tf.layers import lipschitz_layers

    block = IResBlock.dense(2, hidden_units=(8, 8))
    block.forward(tf.zeros([1, 2]))
    for layer in lipschitz_layers(block):
        print(layer.name, float(layer.sigma))
    ```
    """
    found, found_ids = [], set()
    for top in keras_layers(obj):
        for layer in top._flatten_layers(include_self=True, recursive=True):
            if isinstance(layer, LipschitzLayer) and id(layer) not in found_ids:
                found_ids.add(id(layer))
                found.append(layer)
    return found


def converge_lipschitz(obj, tol=None, max_iterations=None, progress=None):
    """Runs power iteration to convergence in every Lipschitz layer of ``obj``
    (see :func:`lipschitz_layers`; a layer, model, bijector, distribution or a
    list of these); returns the list of sigma estimates.

    Not needed for the bound during training: every layer re-estimates by
    itself when its kernel has changed (see :func:`update_lipschitz`). This is
    the careful version for before evaluation or export: a warm-started and a
    randomly restarted power iteration per layer, the larger sigma kept.
    ``tol`` and ``max_iterations`` default to each layer's own settings.
    ``progress``, if given, is called as ``progress(done, total)`` after each
    layer (eagerly: for progress lines on large models).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.bijectors import IResBlock
    from rflow_tf.layers import converge_lipschitz

    block = IResBlock.dense(2, hidden_units=(8, 8))
    block.forward(tf.zeros([1, 2]))
    sigmas = converge_lipschitz(block)   # before evaluation or export
    ```
    """
    layers = lipschitz_layers(obj)
    if not layers:
        raise ValueError(
            f"converge_lipschitz: no Lipschitz layers found in {type(obj).__name__}"
            " (expected a Keras layer or model, a bijector, a distribution or a "
            "list of these)"
        )
    sigmas = []
    for layer in layers:
        sigmas.append(layer.converge(tol, max_iterations))
        if progress is not None:
            progress(len(sigmas), len(layers))
    return sigmas


def update_lipschitz(obj):
    """Re-estimates sigma (warm-started power iteration to convergence) in
    every Lipschitz layer of ``obj`` whose kernel changed since its last
    estimate; unchanged layers cost one comparison. This is what each layer
    does by itself on its next use, so a training loop need not call it. A
    distributed trainer calls it right after the optimiser step, in
    cross-replica context: inside ``strategy.run`` the replicas use a fresh
    estimate without storing it, so the stored state stays current for all
    replicas only this way.

    Example:
    ```python
    import keras
    import tensorflow as tf
    from rflow_tf.layers import lipschitz_dense_net, update_lipschitz

    net = lipschitz_dense_net(2, (8, 8), coeff=0.9)
    optimizer = keras.optimizers.Adam(1e-2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(net(tf.ones([4, 2]))))
    grads = tape.gradient(loss, net.trainable_variables)
    optimizer.apply_gradients(zip(grads, net.trainable_variables))
    update_lipschitz(net)
    ```
    """
    for layer in lipschitz_layers(obj):
        layer.update_estimate()


def learned_orders(obj):
    """The learnable norm orders (:class:`LearnableOrder`) in the Lipschitz
    layers of ``obj`` (as :func:`lipschitz_layers`), each once, as a dict
    ``{"<layer name>.<domain|codomain>": p}`` of Python floats, named after the
    first layer (in order) that uses it; empty for fixed orders.

    Example:
    ```python
    from rflow_tf.bijectors import IResBlock
    from rflow_tf.layers import learned_orders

    block = IResBlock.dense(2, (8, 8), vnorms="2332", learn_p=True)
    learned_orders(block)     # {'lipschitz_dense.domain': 2.0, ...: 3.0, ...: 3.0}
    ```
    """
    found, seen = {}, set()
    for layer in lipschitz_layers(obj):
        for which in ("domain", "codomain"):
            order = getattr(layer, which)
            if isinstance(order, LearnableOrder) and id(order) not in seen:
                seen.add(id(order))
                found[f"{layer.name}.{which}"] = float(order.order())
    return found


def mark_lipschitz_current(obj):
    """Declares the stored power-iteration state of every Lipschitz layer in
    ``obj`` current for its kernel (see
    :meth:`LipschitzLayer.mark_estimate_current`): used after restoring a
    checkpoint, so a restored model computes exactly what it computed when saved.

    Example:
    ```python
    import tempfile
    import tensorflow as tf
    from rflow_tf.layers import lipschitz_dense_net, mark_lipschitz_current

    net = lipschitz_dense_net(2, (8, 8), coeff=0.9)
    path = tf.train.Checkpoint(model=net).save(tempfile.mkdtemp() + "/ckpt")
    tf.train.Checkpoint(model=net).restore(path)
    mark_lipschitz_current(net)
    ```
    """
    for layer in lipschitz_layers(obj):
        layer.mark_estimate_current()
