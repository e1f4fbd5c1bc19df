"""Trace-time reuse of values inside one TensorFlow graph (the lowest layer: TensorFlow only).

While a ``tf.function`` is traced, the same quantity is often asked for several
times: a Lipschitz layer's power-iteration state by the forward pass, the
log-determinant and the recomputing backward pass; a bijector's input ``x`` by
TFP's walk of ``inverse(forward(x))``. Each request that builds its own ops
makes the graph larger, and graph size is what costs at the first call
(optimisation and instantiation scale with it).

A value computed at one point of a graph may be reused at a later point of the
*same* graph exactly when no variable can have been written in between: a
later read would return what the earlier read returned (ops that touch
variables run in program order in a ``tf.function``). :class:`TraceMemo`
stores such values; :func:`no_write_since` is the test. It is conservative:
any op created since the point that writes *any* resource variable (assign
ops, optimiser ``ResourceApply*`` ops, and calls or control flow whose
functions contain them) makes the stored value unusable, except the calls of
functions registered with :func:`mark_idempotent_writer`: functions whose
writes never change what later reads of the same state compute with (the
Lipschitz layers' upkeep stores the converged estimate for the kernel it
reads).

Eagerly nothing is reused: every eager call reads the variables anew.

The first call of a graph function then optimises its graph (Grappler).
:func:`one_optimizer_round` runs the optimiser's passes once instead of
TensorFlow's default twice for the graph functions called inside it; the
trainer's and the toy's steps run in it (:func:`in_one_optimizer_round`), and
so do the Lipschitz layers' shared upkeep functions wherever they are called.
"""

import contextlib
import functools
import re
import weakref

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as _context

__all__ = [
    "GraphPoint",
    "graph_point",
    "no_write_since",
    "mark_idempotent_writer",
    "TraceMemo",
    "one_optimizer_round",
    "in_one_optimizer_round",
]

#: Op types that write resource variables (TensorFlow's raw ops).
_WRITE_OP = re.compile(
    r"^(Assign\w*VariableOp|ResourceApply\w+|ResourceSparseApply\w+|ResourceScatter\w+|"
    r"ResourceStridedSliceAssign|ResourceGather\w*Assign\w*|DestroyResourceOp)$"
)

#: Names of the functions whose calls are known not to change later reads.
_IDEMPOTENT_PREFIXES = []


def mark_idempotent_writer(python_name):
    """Declares the traced functions whose Python function is named
    ``python_name`` idempotent writers: they may assign variables, but only
    values that a later read at the same state would compute again (so a call
    of one never invalidates a :class:`TraceMemo` entry). The Lipschitz
    layers' upkeep (``lipschitz_upkeep``) is one.

    Args:
      python_name: the ``__name__`` of the Python function a ``tf.function`` traces.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.tracing import graph_point, mark_idempotent_writer, no_write_since

    v = tf.Variable(2.0)

    @tf.function(autograph=False)
    def store_square():  # writes what a read at the same state computes again
        return v.assign(tf.square(tf.sqrt(v)))

    mark_idempotent_writer("store_square")
    seen = []

    @tf.function
    def f():
        point = graph_point()
        store_square()
        seen.append(no_write_since(point))  # the call does not count as a write
        return v * 1.0

    f()
    assert seen == [True]
    ```
    """
    if python_name not in _IDEMPOTENT_PREFIXES:
        _IDEMPOTENT_PREFIXES.append(python_name)


class GraphPoint:
    """A point in a graph under construction: the graph and how many ops it held.

    Args:
      graph: the ``tf.Graph`` being built.
      n_ops: the number of its ops at that point.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.tracing import GraphPoint, graph_point

    points = []

    @tf.function
    def f(x):
        points.append(graph_point())
        y = x + 1.0
        points.append(graph_point())
        return y

    f(tf.constant(1.0))
    first, second = points
    assert isinstance(first, GraphPoint) and first.graph is second.graph
    assert second.n_ops > first.n_ops  # the ops built in between
    ```
    """

    __slots__ = ("graph", "n_ops", "__weakref__")

    def __init__(self, graph, n_ops):
        self.graph = graph
        self.n_ops = n_ops


def graph_point():
    """The current point of the graph being built, or None when executing eagerly.

    Returns:
      A :class:`GraphPoint` of the default graph and its number of ops, or None.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.tracing import graph_point

    assert graph_point() is None  # eagerly
    seen = []
    tf.function(lambda: seen.append(graph_point()) or tf.constant(0.0))()
    assert seen[0].n_ops >= 0 and seen[0].graph is not None
    ```
    """
    if tf.executing_eagerly():
        return None
    graph = tf.compat.v1.get_default_graph()
    return GraphPoint(graph, len(graph.get_operations()))


def _function_def(graph, name):
    """The FunctionDef called ``name`` as seen from ``graph`` (or an outer graph)."""
    while graph is not None:
        try:
            found = graph._get_function(name)  # noqa: SLF001 (TensorFlow's lookup)
        except (AttributeError, KeyError):
            found = None
        if found is not None:
            return getattr(found, "definition", found)
        graph = getattr(graph, "outer_graph", None)
    return None


class _WriteScan:
    """Per graph: how far its ops were scanned and the index of the last op
    that may write a variable (-1: none); per function name: whether it may."""

    def __init__(self):
        self.scanned = 0
        self.last_write = -1


_SCANS = weakref.WeakKeyDictionary()  # graph -> _WriteScan
_FUNCTION_WRITES = {}  # function name -> bool


def _function_attr_names(attr_map):
    for value in attr_map.values():
        if value.HasField("func"):
            yield value.func.name
        elif value.HasField("list"):
            for f in value.list.func:
                yield f.name


def _is_idempotent(name):
    return any(p in name for p in _IDEMPOTENT_PREFIXES)


def _function_may_write(graph, name, depth=0):
    if _is_idempotent(name):
        return False
    if name in _FUNCTION_WRITES:
        return _FUNCTION_WRITES[name]
    fdef = _function_def(graph, name)
    if fdef is None or depth > 32:
        return True  # unknown: assume it writes
    _FUNCTION_WRITES[name] = False  # recursion guard
    writes = any(
        _WRITE_OP.match(node.op)
        or any(_function_may_write(graph, f, depth + 1) for f in _function_attr_names(node.attr))
        for node in fdef.node_def
    )
    _FUNCTION_WRITES[name] = writes
    return writes


def _op_may_write(graph, op):
    if _WRITE_OP.match(op.type):
        return True
    return any(_function_may_write(graph, f, 0) for f in _function_attr_names(op.node_def.attr))


def no_write_since(point):
    """True when ``point`` lies in the graph being built now and no op created
    in it since may have written a variable (see the module docstring); False
    eagerly, in another graph, or after a possible write.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.tracing import graph_point, no_write_since

    v = tf.Variable(1.0)
    seen = []

    @tf.function
    def f():
        point = graph_point()
        x = v * 2.0                         # build more ops (reads only)
        seen.append(no_write_since(point))  # True: values read at `point` are current
        v.assign(x)
        seen.append(no_write_since(point))  # False: a variable may have changed
        return x

    f()
    assert seen == [True, False]
    assert graph_point() is None and not no_write_since(None)   # eagerly: nothing is reused
    ```
    """
    if point is None or tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    if graph is not point.graph:
        return False
    scan = _SCANS.get(graph)
    if scan is None:
        scan = _SCANS[graph] = _WriteScan()
    ops = graph.get_operations()
    for i in range(scan.scanned, len(ops)):
        if _op_may_write(graph, ops[i]):
            scan.last_write = i
    scan.scanned = len(ops)
    return scan.last_write < point.n_ops


class TraceMemo:
    """Values remembered while tracing, given back later in the same graph
    while no variable may have been written since (:func:`no_write_since`).

    Keys are any hashable; entries die with their graph.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.tracing import TraceMemo

    memo = TraceMemo()
    v = tf.Variable(4.0)
    built = []   # one entry per time the ops of sigma are built

    def sigma():
        value = memo.get("sigma")
        if value is None:   # not stored in this graph, or a variable may have changed
            built.append("sigma")
            value = memo.put("sigma", tf.sqrt(v.read_value()))
        return value

    @tf.function
    def f():
        a = sigma() + sigma()   # the second request reuses the first one's ops
        v.assign(9.0)
        return a + sigma()      # after a write: built anew, reads the new value

    assert float(f()) == 2.0 + 2.0 + 3.0 and len(built) == 2
    ```
    """

    def __init__(self):
        self._graphs = weakref.WeakKeyDictionary()  # graph -> {key: (point, value)}

    def get(self, key):
        """The value stored under ``key`` if it may still be used here, else None."""
        if tf.executing_eagerly():
            return None
        entries = self._graphs.get(tf.compat.v1.get_default_graph())
        entry = entries.get(key) if entries else None
        if entry is None or not no_write_since(entry[0]):
            return None
        return entry[1]

    def put(self, key, value):
        """Stores ``value`` under ``key`` at the current point of the graph (a
        no-op eagerly); returns ``value``."""
        point = graph_point()
        if point is not None:
            self._graphs.setdefault(point.graph, {})[key] = (point, value)
        return value


@contextlib.contextmanager
def one_optimizer_round():
    """Graph functions called or traced inside run one round of TensorFlow's
    graph optimisation (Grappler's meta-optimizer) at their first call,
    instead of the default two.

    The first call of a ``tf.function`` optimises its graph: every Grappler
    pass (pruning, constant folding, arithmetic and layout optimisation,
    remapping, ...) runs over it, and by default the whole sequence runs a
    second time. On a flow's graphs the second round finds almost nothing
    (the canonical image training step: 6,047 nodes after the first round,
    6,032 after the second) and costs about as long as the first, so one round
    shortens the first call by a fifth to a third, and the steps after it run the
    same arithmetic. Every pass still runs; only the number of rounds
    changes, and a configuration that sets the rounds itself (or switches the
    meta-optimizer off) is left as it is.

    The setting is TensorFlow's per-thread function-call configuration: it
    applies to the calls made inside the ``with`` block (eager calls of a
    ``tf.function`` and, while tracing, the call ops of the nested functions
    it calls, which are optimised when first run) and is restored after it.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.tracing import one_optimizer_round

    v = tf.Variable(3.0)

    @tf.function
    def step(x):
        v.assign_add(x)
        return v * 2.0

    with one_optimizer_round():
        y = step(tf.constant(1.0))  # traced, optimised in one round, run
    assert float(y) == 8.0
    assert float(step(tf.constant(1.0))) == 10.0  # the same function outside
    ```
    """
    # TensorFlow's own per-thread options of function calls (what its
    # ``function_executor_type`` context changes), not a public API.
    ctx = _context.context()
    saved = ctx.function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(saved.config_proto_serialized)
    rewrite = config.graph_options.rewrite_options
    if (
        rewrite.disable_meta_optimizer
        or rewrite.meta_optimizer_iterations != rewriter_config_pb2.RewriterConfig.DEFAULT_NUM_ITERS
    ):
        yield  # already one round, or the rounds are the user's own setting
        return
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
    ctx.function_call_options = _context.FunctionCallOptions(
        executor_type=saved.executor_type, config_proto=config
    )
    try:
        yield
    finally:
        ctx.function_call_options = saved


class _InOneOptimizerRound:
    """A graph function whose calls and traces run in :func:`one_optimizer_round`;
    everything else is the wrapped function's."""

    def __init__(self, fn):
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args, **kwargs):
        with one_optimizer_round():
            return self.__wrapped__(*args, **kwargs)

    def get_concrete_function(self, *args, **kwargs):
        with one_optimizer_round():
            return self.__wrapped__.get_concrete_function(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__wrapped__, name)


def in_one_optimizer_round(fn):
    """``fn`` (a ``tf.function``) with each call, and each trace through
    ``get_concrete_function``, inside :func:`one_optimizer_round`; its other
    attributes (``experimental_get_tracing_count``, ...) are ``fn``'s.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.tracing import in_one_optimizer_round

    step = in_one_optimizer_round(tf.function(lambda x: tf.square(x) + 1.0))
    assert float(step(tf.constant(2.0))) == 5.0
    assert step.experimental_get_tracing_count() == 1
    ```
    """
    return _InOneOptimizerRound(fn)
