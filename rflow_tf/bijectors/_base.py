"""Shared machinery of the rflow_tf bijectors (private): the result cache that
never serves stale values, identity equality for weight-holding bijectors, the
Keras-backed base class and argument checks."""

import weakref

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from rflow_tf import tracing

tfb = tfp.bijectors


class _InverseMemo:
    """y -> x for outputs y of ``forward`` that are still alive (weak keys),
    with the graph point where ``forward`` returned (None eagerly) and the
    ``conditional_input`` of that call (None for unconditional bijectors)."""

    def __init__(self):
        self._entries = {}

    def remember(self, y, x, condition=None):
        key = id(y)
        ref = weakref.ref(y, lambda _, key=key: self._entries.pop(key, None))
        self._entries[key] = (ref, x, tracing.graph_point(), condition)

    def recall(self, y, condition=None):
        """``(x, current)``: the remembered x (or None) and whether it is known
        at trace time to be current (same graph, no variable written since,
        and the same ``condition`` object; another condition is checked by
        recomputing ``forward``)."""
        entry = self._entries.get(id(y))
        if entry is None or entry[0]() is not y:
            return None, False
        return entry[1], entry[3] is condition and tracing.no_write_since(entry[2])


def _reproduces(y_now, y):
    """True (a bool tensor) when ``y_now`` equals ``y`` to 64 ulps of max|y|:
    the same forward pass under the same weights (only reordering round-off)."""
    tol = 64 * float(np.finfo(y.dtype.as_numpy_dtype).eps) * (1.0 + tf.reduce_max(tf.abs(y)))
    return tf.reduce_all(tf.abs(y_now - y) <= tol)


class FreshBijectorCache(cache_util.BijectorCache):
    """Replaces TFP's bijector cache for bijectors whose weights change.

    * ``forward(x)`` is always recomputed (never a stale value computed under
      other weights or outside the current tape);
    * ``inverse(y)`` of a ``y`` that ``forward`` returned and that is still
      alive gives back that ``x`` without running the inverse -- this is what
      ``TransformedDistribution.log_prob`` relies on to avoid a fixed-point
      inversion at the latent point -- but only while ``forward(x)`` still
      reproduces ``y`` (under the ``conditional_input`` of the call, if
      any): while tracing, when no op since ``forward`` may have
      written a variable (:func:`rflow_tf.tracing.no_write_since`), ``x``
      is given back with no ops at all; otherwise one forward pass checks it
      (in graphs with a ``tf.cond``) and after any change of the weights the
      inverse is computed;
    * log-det "attributes" are never stored, so a random log-det estimate is
      fresh on every call.
    """

    _memos = weakref.WeakKeyDictionary()  # bijector -> _InverseMemo

    def _memo(self):
        return self._memos.setdefault(self.bijector, _InverseMemo())

    def forward(self, x, **kwargs):
        y = self.bijector._forward(x, **kwargs)
        self._memo().remember(y, x, kwargs.get("conditional_input"))
        return y

    def inverse(self, y, **kwargs):
        x, current = self._memo().recall(y, kwargs.get("conditional_input"))
        if current:
            return x
        if x is None:
            return self.bijector._inverse(y, **kwargs)
        still_valid = _reproduces(self.bijector._forward(x, **kwargs), y)
        if tf.executing_eagerly():
            return x if bool(still_valid) else self.bijector._inverse(y, **kwargs)
        return tf.cond(
            still_valid, lambda: tf.identity(x), lambda: self.bijector._inverse(y, **kwargs)
        )

    def _attributes(self, input, fn_name, **kwargs):  # noqa: A002 (TFP's signature)
        return {}


class EqualOnlyToItself:
    """Equality and hash by identity, for bijectors that hold weights.

    TFP compares bijectors by their constructor ``parameters``; two
    bijectors built with the same arguments but holding different Keras
    weights must never compare equal (``tf.function`` would reuse one's
    trace for the other, and TFP caches key on bijectors).
    """

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def __hash__(self):
        return id(self)


class KerasBacked(EqualOnlyToItself, tfb.Bijector):
    """Base for bijectors whose weights live in Keras 3 layers.

    tf.Module cannot see Keras 3 variables, so the underlying ``tf.Variable``s
    are mirrored in an attribute that tf.Module's traversal finds.
    """

    _cache = FreshBijectorCache()

    def _track_keras(self, *keras_objects):
        variables = []
        for obj in keras_objects:
            variables.extend(w.value for w in obj.weights)
        self._keras_tf_variables = tuple(variables)

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}


def zeros_for_none(grads, targets):
    """Gradients with each ``None`` (unconnected) replaced by zeros shaped like its target."""
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, targets)]


def as_float_tensor(x, name):
    """``x`` as a tensor (Python numbers become float32); a TypeError naming the
    bijector ``name`` unless its dtype is floating."""
    x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
    if not x.dtype.is_floating:
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype.name}")
    return x


def check_stateless_seed(seed, name):
    """``None``, or a stateless seed (two integers) as a tuple of two Python
    ints; a ValueError naming ``name`` for anything else."""
    if seed is None:
        return None
    try:
        arr = np.asarray(tf.get_static_value(seed) if tf.is_tensor(seed) else seed)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (2,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be None or a stateless seed of two ints, e.g. (1, 2); got {seed!r}"
        )
    return tuple(int(v) for v in arr)


def positive_int(value, name):
    """``value`` as a positive Python int; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def hidden_sizes(hidden_units, name="hidden_units"):
    """``hidden_units`` (one size or a list) as a tuple of positive ints; a
    ValueError naming ``name`` otherwise."""
    units = tuple(hidden_units) if isinstance(hidden_units, (list, tuple)) else (hidden_units,)
    for u in units:
        if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1:
            raise ValueError(
                f"{name} must be positive integers (a hidden size), got {hidden_units!r}"
            )
    return tuple(int(u) for u in units)


def check_bisection_settings(dtype, inverse_atol, inverse_rtol, inverse_max_iterations):
    """``(dtype, atol, rtol, max_iterations)`` of a bijector inverted by bisection
    (:func:`rflow_tf.bijectors.monotone.bisect_increasing`): a floating dtype,
    tolerances >= 0 and not both 0, a positive number of iterations; a
    TypeError / ValueError naming the argument otherwise."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise TypeError(f"dtype must be a floating dtype, got {dtype.name}")
    if not (inverse_atol >= 0 and inverse_rtol >= 0 and inverse_atol + inverse_rtol > 0):
        raise ValueError(
            "inverse_atol and inverse_rtol must be >= 0 and not both 0, "
            f"got {inverse_atol}, {inverse_rtol}"
        )
    return (
        dtype,
        float(inverse_atol),
        float(inverse_rtol),
        positive_int(inverse_max_iterations, "inverse_max_iterations"),
    )


def checked_event_input(bijector, x, name):
    """``x`` as a float tensor whose shape ends in ``bijector.event_shape_`` (a
    ValueError naming ``name`` otherwise), checked finite under ``validate_args``."""
    x = as_float_tensor(x, bijector.name)
    nd = len(bijector.event_shape_)
    if x.shape.rank is not None and tuple(x.shape[x.shape.rank - nd :]) != bijector.event_shape_:
        raise ValueError(
            f"{bijector.name}: {name} must end in the event shape "
            f"{bijector.event_shape_}, got shape {x.shape}"
        )
    if bijector.validate_args:
        x = tf.debugging.assert_all_finite(x, f"{bijector.name}: {name} contains NaN or Inf")
    return x
