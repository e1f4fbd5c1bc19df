"""The in-call upkeep of the Lipschitz layers' estimates: the variables one
estimate reads and writes (:class:`PowerState`), where a layer may store it
(:func:`can_store_in_context`, :func:`inside_vectorized_map`), and the graph
function that re-estimates, traced once per layer configuration and shared by
the layers of that configuration (:func:`traced_upkeep`), so a flow of many
blocks adds few graph nodes for it."""

import weakref
from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from rflow_tf import tracing
from rflow_tf.layers.lipschitz.orders import LearnableOrder

# The upkeep stores the converged estimate for the kernel it reads: calling it
# again at the same state computes the same, so its writes never make a value
# traced earlier stale.
tracing.mark_idempotent_writer("lipschitz_upkeep")


def backing(variable):
    """The tf.Variable behind a Keras 3 variable (a tf.Variable as it is).

    Layers assign their estimate through it: a Keras StatelessScope would turn
    an assignment to the Keras variable into a no-op.

    Args:
      variable: a ``keras.Variable`` or a ``tf.Variable``.

    Returns:
      The ``tf.Variable`` that holds the value.

    Example:
    ```python
    import keras
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.upkeep import backing

    weight = keras.Variable([1.0, 2.0])
    backing(weight).assign([3.0, 4.0])  # writes the Keras variable
    assert isinstance(backing(weight), tf.Variable) and weight.numpy().tolist() == [3.0, 4.0]
    plain = tf.Variable(0.0)
    assert backing(plain) is plain
    ```
    """
    return variable.value if isinstance(variable, keras.Variable) else variable


def can_store_in_context():
    """Whether a layer may assign its (mirrored) power-iteration state here:
    not inside ``strategy.run`` of a multi-replica strategy (there every
    replica computes the same fresh estimate and uses it without storing).

    Returns:
      True outside any replica context or with one replica in sync.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.upkeep import can_store_in_context

    assert can_store_in_context()  # cross-replica context: store
    assert tf.distribute.OneDeviceStrategy("/cpu:0").run(can_store_in_context)  # one replica
    ```
    """
    ctx = tf.distribute.get_replica_context()
    return ctx is None or ctx.num_replicas_in_sync == 1


def inside_vectorized_map():
    """Whether the current trace is the body of ``tf.vectorized_map`` / pfor
    (TFP's AutoBatched JointDistributions use it): pfor traces the loop body
    under a ``loop_body`` name scope that holds its ``PlaceholderWithDefault``
    loop variable. A layer there uses its stored estimate: pfor cannot
    vectorise variable assignments.

    Returns:
      A Python bool (False when executing eagerly).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.upkeep import inside_vectorized_map

    seen = []

    def body(x):
        seen.append(inside_vectorized_map())  # at trace time
        return 2.0 * x

    tf.vectorized_map(body, tf.zeros([3]))
    assert seen[-1] and not inside_vectorized_map()
    ```
    """
    if tf.executing_eagerly():
        return False
    parts = tf.get_current_name_scope().split("/")
    names = [
        "/".join(parts[: i + 1]) + "/PlaceholderWithDefault"
        for i, part in enumerate(parts)
        if part.startswith("loop_body")
    ]
    graph = tf.compat.v1.get_default_graph()
    while names and graph is not None:  # the loop variable may live in an outer graph
        for name in names:
            try:
                graph.get_operation_by_name(name)
                return True
            except KeyError:
                pass
        graph = getattr(graph, "outer_graph", None)
    return False


class PowerState(NamedTuple):
    """The variables a layer's estimate reads (``read_value``) and writes
    (``assign``): tf.Variables, or :class:`HandleVariable` inside an upkeep
    function shared by the layers of one configuration.

    Attributes:
      kernel: the layer's kernel W.
      u: the stored left vector (the map's output shape).
      v: the stored right vector (the map's input shape).
      sigma: the stored estimate of ||W||, a scalar.
      estimated_kernel: the kernel u, v and sigma were estimated for.
      careful: a bool: whether that estimate was the careful one (``converge``).
      domain_raw, codomain_raw: the unconstrained variable of a learnable
        domain / codomain order (:class:`~rflow_tf.layers.LearnableOrder`),
        None for a fixed order.
      estimated_orders: the orders [p, q] the estimate was made for, None
        when both are fixed.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.upkeep import PowerState

    state = PowerState(
        kernel=tf.Variable(tf.eye(2)),
        u=tf.Variable([1.0, 0.0]),
        v=tf.Variable([1.0, 0.0]),
        sigma=tf.Variable(1.0),
        estimated_kernel=tf.Variable(tf.eye(2)),
        careful=tf.Variable(False),
    )
    state.sigma.assign(2.0)
    assert float(state[3].read_value()) == 2.0  # a tuple of the variables, in this order
    ```
    """

    kernel: tf.Variable
    u: tf.Variable
    v: tf.Variable
    sigma: tf.Variable
    estimated_kernel: tf.Variable
    careful: tf.Variable
    domain_raw: Optional[tf.Variable] = None
    codomain_raw: Optional[tf.Variable] = None
    estimated_orders: Optional[tf.Variable] = None


class HandleVariable:
    """A resource variable seen through its handle (an argument of a shared
    graph function: variables passed by handle are not tied to the function).

    Args:
      handle: the variable's resource handle (``variable.handle``).
      like: the variable (or anything with its ``dtype`` and ``shape``).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.layers.lipschitz.upkeep import HandleVariable

    x = tf.Variable([1.0, 2.0])

    @tf.function
    def double(handle):  # one function for any float32 [2] variable
        var = HandleVariable(handle, x)
        var.assign(2.0 * var.read_value())

    double(x.handle)
    assert x.numpy().tolist() == [2.0, 4.0]
    ```
    """

    def __init__(self, handle, like):
        self.handle, self.dtype, self.shape = handle, like.dtype, like.shape

    def read_value(self):
        """The variable's value, of its static shape."""
        value = tf.raw_ops.ReadVariableOp(resource=self.handle, dtype=self.dtype)
        value.set_shape(self.shape)
        return value

    def assign(self, value):
        """Writes ``value`` to the variable."""
        return tf.raw_ops.AssignVariableOp(
            resource=self.handle, value=tf.convert_to_tensor(value, self.dtype)
        )


#: Traced upkeep and converge functions shared by the layers of one
#: configuration (see :func:`upkeep_signature`), with the layer tracing them now.
_SHARED_UPKEEP = {}


def upkeep_signature(layer, store):
    """Everything the traced upkeep of ``layer`` depends on besides the
    variables in :class:`PowerState`: layers with equal signatures share one
    function (the type and orders fix the estimator). None for distributed
    variables (a handle is one replica's).

    Args:
      layer: a built :class:`~rflow_tf.layers.lipschitz.base.LipschitzLayer`.
      store: whether the upkeep stores its estimate (see :func:`can_store_in_context`).

    Returns:
      A hashable tuple, or None when the layer needs a function of its own.
      A learnable order enters as the word "learnable" (its variable is in
      the state), a fixed one as its value.

    Example:
    ```python
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.upkeep import upkeep_signature

    a, b, c = LipschitzDense(3), LipschitzDense(3), LipschitzDense(4)
    for layer in (a, b, c):
        layer.build((None, 5))
    assert upkeep_signature(a, True) == upkeep_signature(b, True)  # one shared function
    assert upkeep_signature(a, True) != upkeep_signature(c, True)  # another kernel shape
    ```
    """
    if any(isinstance(v, tf.distribute.DistributedValues) for v in layer._power_state()):
        return None
    return (
        type(layer),
        store,
        layer.kernel.dtype,
        tuple(layer.kernel.shape),
        tuple(layer.u.shape),
        tuple(layer.v.shape),
        layer._estimator.operator_key(),
        layer.tol,
        layer.max_iterations,
        *(
            "learnable" if isinstance(o, LearnableOrder) else o
            for o in (layer.domain, layer.codomain)
        ),
    )


def traced_upkeep(layer, store):
    """A graph function running ``layer._update_estimate(store)``, traced once
    per configuration (see :func:`upkeep_signature`) and reused by every
    enclosing trace; returns a callable of no arguments.

    The upkeep re-estimates (u, v) only if the kernel changed since the last
    estimate, and stores them (and sigma) if ``store``; it returns (u, v)
    (storing: read from the variables after the call).

    Args:
      layer: a built :class:`~rflow_tf.layers.lipschitz.base.LipschitzLayer`.
      store: whether to store the estimate (see :func:`can_store_in_context`).

    Returns:
      A callable of no arguments that returns the tensors (u, v).

    Example:
    ```python
    import numpy as np
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.upkeep import traced_upkeep

    layer = LipschitzDense(3)
    layer.build((None, 5))
    layer.kernel.assign(np.diag([3.0, 2.0, 1.0, 0.0, 0.0])[:, :3])  # ||W||_2 = 3
    u, v = traced_upkeep(layer, True)()
    assert bool(layer.estimate_is_current()) and abs(float(layer.sigma) - 3.0) < 1e-4
    ```
    """
    signature = upkeep_signature(layer, store)
    if not store:
        return _shared_function(
            ("lipschitz_upkeep", False),
            layer,
            signature,
            lambda traced, state: traced._update_estimate(False, state),
        )

    def store_only(traced, state):
        traced._update_estimate(True, state)

    # Storing, the function returns nothing and (u, v) are read from the
    # variables after it (the reads are ordered after the call that writes
    # them). Returning them, the call sites that use neither (the after-step
    # upkeep of every layer) would each be given a copy of the function that
    # graph optimisation specialises to drop its outputs, optimised and
    # instantiated anew at the first call.
    run = _shared_function(("lipschitz_upkeep", True), layer, signature, store_only)

    def call():
        run()
        state = layer._power_state()
        # (read as the variable reads itself: a distributed one in any context)
        return tf.convert_to_tensor(state.u), tf.convert_to_tensor(state.v)

    return call


def traced_converge(layer):
    """A graph function running the careful estimate of ``layer`` at its own
    settings (``layer.converge()``: kept if the stored one is careful and
    current, else warm start and restarts, stored), traced once per
    configuration (see :func:`upkeep_signature`) and reused by every enclosing
    trace: ``converge_lipschitz`` of a flow inside a ``tf.function`` adds one
    function per layer configuration, not per layer. Returns a callable of no
    arguments that returns sigma.

    Args:
      layer: a built :class:`~rflow_tf.layers.lipschitz.base.LipschitzLayer`
        whose estimator takes its state (``shared_converge``).

    Returns:
      A callable of no arguments that returns sigma (a scalar tensor).

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.layers.lipschitz.upkeep import traced_converge

    layers = [LipschitzDense(3), LipschitzDense(3)]
    for layer in layers:
        layer.build((None, 5))
    layers[1].kernel.assign(np.diag([3.0, 2.0, 1.0, 0.0, 0.0])[:, :3])  # ||W||_2 = 3

    @tf.function
    def converge_all():  # both layers call one shared function
        return [traced_converge(layer)() for layer in layers]

    sigmas = converge_all()
    assert abs(float(sigmas[1]) - 3.0) < 1e-5 and bool(layers[0].estimate_is_current())
    ```
    """
    signature = upkeep_signature(layer, True)
    return _shared_function(
        ("lipschitz_converge",),
        layer,
        signature,
        lambda traced, state: traced._converge_at_own_settings(state),
    )


def _shared_function(kind, layer, signature, body):
    """A callable of no arguments running ``body(layer, state)`` in a graph
    function named ``kind[0]``: one per ``kind`` and ``signature`` (the
    layers' variables passed by handle), or the layer's own when
    ``signature`` is None."""
    name = kind[0]
    if signature is None:
        fns = layer.__dict__.setdefault("_own_fns", {})
        if kind not in fns:
            fns[kind] = tracing.in_one_optimizer_round(
                tf.function(
                    _named(name, lambda: body(layer, layer._power_state())), autograph=False
                )
            )
        return fns[kind]
    key = kind + signature
    if key not in _SHARED_UPKEEP:
        tracer = []  # a weak reference to the layer whose call is being traced

        def shared(*handles):
            traced = tracer[-1]()
            handles = iter(handles)
            state = PowerState(
                *(
                    None if v is None else HandleVariable(next(handles), v)
                    for v in traced._power_state()
                )
            )
            with traced._orders_of(state):
                return body(traced, state)

        # Not inlined: one copy of the body serves every call site (graph
        # optimisation and instantiation pay per inlined copy), optimised when
        # first run, in one round wherever it is called.
        fn = tracing.in_one_optimizer_round(
            tf.function(
                _named(name, shared), autograph=False, experimental_attributes={"_noinline": True}
            )
        )
        _SHARED_UPKEEP[key] = (fn, tracer)
    fn, tracer = _SHARED_UPKEEP[key]
    handles = [v.handle for v in layer._power_state() if v is not None]

    def call():
        tracer.append(weakref.ref(layer))
        try:
            return fn(*handles)
        finally:
            tracer.pop()

    return call


def _named(name, fn):
    """``fn`` under the name ``name`` (a traced function is named after its
    Python function; :mod:`rflow_tf.tracing` recognises the upkeep by it)."""
    fn.__name__ = fn.__qualname__ = name
    return fn
