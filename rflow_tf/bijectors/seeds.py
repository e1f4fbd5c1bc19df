"""Call-kwarg routing for flows of residual blocks: flow_kwargs, use_fixed_seed,
conditional_kwargs."""

import tensorflow_probability as tfp

from rflow_tf.bijectors._base import check_stateless_seed
from rflow_tf.bijectors.iresblock import IResBlock

tfb = tfp.bijectors


# tfb.Chain / tfb.Invert are auto-composite subclasses of these base classes.
_INVERT_TYPES = (tfp.bijectors.invert._Invert,)


def _seeded_parts(obj):
    """The pieces of ``obj`` that take a ``seed`` call kwarg, in application
    order, as (piece, route) pairs: ``route`` is the list of names under which
    ``tfb.Chain`` / ``tfb.Invert`` pass kwargs down to the piece. A piece is an
    :class:`IResBlock` or a multi-block bijector that splits its seed itself
    (``_takes_flow_kwargs``, e.g. :class:`rflow_tf.models.FlowBijector`).
    ``obj`` may also be a distribution or model with a ``bijector``."""
    if isinstance(obj, IResBlock) or getattr(obj, "_takes_flow_kwargs", False):
        return [(obj, [])]
    if isinstance(obj, _INVERT_TYPES):
        return _seeded_parts(obj.bijector)
    if isinstance(obj, tfb.Composition):
        return [
            (piece, [sub.name] + route)
            for sub in obj.bijectors
            for piece, route in _seeded_parts(sub)
        ]
    if not isinstance(obj, tfb.Bijector) and getattr(obj, "bijector", None) is not None:
        return _seeded_parts(obj.bijector)
    return []


def flow_kwargs(bijector, **kwargs):
    """Nested per-name kwargs that route ``kwargs`` (e.g. ``seed``,
    ``training``) to every :class:`IResBlock` inside ``bijector`` through
    ``tfb.Chain`` / ``tfb.Invert``, and to multi-block bijectors such as
    :class:`rflow_tf.models.FlowBijector` (``model.bijector``), which split
    their seed over their own blocks. Seeds are split so blocks draw
    independent probes. A ``seed`` that no piece would receive raises a
    ValueError instead of being dropped.

    Example:
    ```python
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import IResBlock, flow_kwargs
    tfb = tfp.bijectors

    blocks = [IResBlock.dense(2, hidden_units=(8,), name=f"block_{i}") for i in range(2)]
    flow = tfb.Chain(blocks)
    kwargs = flow_kwargs(flow, seed=[1, 2], training=True)
    print(sorted(kwargs))   # ['block_0', 'block_1'], each {"seed": <its split>, "training": True}
    x = tf.random.normal([4, 2])
    ld = flow.forward_log_det_jacobian(x, 1, **kwargs)
    assert (ld.numpy() == flow.forward_log_det_jacobian(x, 1, **kwargs).numpy()).all()
    ```
    """
    seed = kwargs.pop("seed", None)
    parts = _seeded_parts(bijector)
    if seed is not None and not parts:
        raise ValueError(
            f"flow_kwargs: {getattr(bijector, 'name', bijector)!r} contains no "
            "residual block or flow that takes a seed; the seed would be dropped"
        )
    if not parts:
        return {}
    seeds = tfp.random.split_seed(seed, len(parts) + 1)[1:] if seed is not None else None
    if not parts[0][1]:  # the bijector itself takes the kwargs
        return dict(kwargs, **({"seed": seeds[0]} if seeds is not None else {}))
    nested = {}
    for i, (_, route) in enumerate(parts):
        leaf = dict(kwargs, **({"seed": seeds[i]} if seeds is not None else {}))
        node = nested
        for name in route[:-1]:
            node = node.setdefault(name, {})
        node[route[-1]] = leaf
    return nested


def use_fixed_seed(flow, seed):
    """Makes every residual block's log-det in ``flow`` a deterministic
    function of (x, weights): each :class:`IResBlock` gets its own split of
    ``seed`` as its :attr:`IResBlock.default_seed`, used whenever a call
    passes no seed. ``seed=None`` restores fresh random estimates.

    This is the switch for tools that cannot pass a seed: TFP's bijector
    test helpers, MCMC kernels (``tfp.mcmc``), ``JointDistribution*AutoBatched``.
    ``flow`` is a bijector, a ``TransformedDistribution`` or a
    :class:`rflow_tf.models.ResidualFlow`. Call it before tracing
    ``tf.function``s that use the flow. (``logdet="exact"`` blocks are
    deterministic already.) Returns ``flow``.

    Example:
    ```python
    import tensorflow as tf, tensorflow_probability as tfp
    from rflow_tf.bijectors import IResBlock, use_fixed_seed
    tfb, tfd = tfp.bijectors, tfp.distributions
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)),
                                       tfb.Invert(IResBlock.dense(2, hidden_units=(16,))))
    use_fixed_seed(dist, (1, 2))
    x = tf.random.normal([4, 2])
    assert (dist.log_prob(x).numpy() == dist.log_prob(x).numpy()).all()   # one draw
    ```
    """
    seed = check_stateless_seed(seed, "use_fixed_seed: seed")
    blocks = []
    for piece, _ in _seeded_parts(flow):
        blocks.extend(getattr(piece, "iresblocks", None) or [piece])
    if not blocks:
        raise ValueError(
            f"use_fixed_seed: {getattr(flow, 'name', flow)!r} contains no residual block"
        )
    seeds = tfp.random.split_seed(seed, len(blocks)) if seed is not None else [None] * len(blocks)
    for block, block_seed in zip(blocks, seeds):
        block.default_seed = None if block_seed is None else tuple(block_seed.numpy())
    return flow


def conditional_kwargs(bijector, conditional_input, **kwargs):
    """Nested per-name kwargs that give one context ``conditional_input`` to
    every conditional :class:`IResBlock` (``condition_size`` not None) inside
    ``bijector``, through ``tfb.Chain`` / ``tfb.Invert``, as TFP routes call
    kwargs by bijector name. ``kwargs`` (``seed``, ``training``) are routed
    as by :func:`flow_kwargs` (seeds split per block). Unconditional pieces
    (ActNorm, unconditional blocks) get no context. Pass the result as
    ``bijector_kwargs`` of a ``TransformedDistribution``, or as ``**kwargs``
    of the bijector's own methods.

    For a flow f = f_L o ... o f_1 of blocks x -> x + g_i(x; c), the same c
    reaches every block, so log p(x | c) = log p_Z(f(x; c)) + sum_i log |det
    (I + J_{g_i})| with each Jacobian taken in x.

    Raises:
      ValueError: ``bijector`` contains no conditional block.

    Example:
    ```python
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import ActNorm, IResBlock, conditional_kwargs
    tfb, tfd = tfp.bijectors, tfp.distributions

    act = ActNorm((2,))
    act.initialize(tf.random.normal([16, 2]))      # unconditional: gets no context
    flow = tfb.Chain([IResBlock.dense(2, hidden_units=(8,), condition_size=3),
                      act,
                      IResBlock.dense(2, hidden_units=(8,), condition_size=3)])
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)),
                                       tfb.Invert(flow))
    c = tf.random.normal([4, 3])
    lp = dist.log_prob(tf.random.normal([4, 2]), bijector_kwargs=conditional_kwargs(dist, c))
    xs = dist.sample(6, bijector_kwargs=conditional_kwargs(dist, c[0]))   # given c[0]
    assert lp.shape == [4] and xs.shape == [6, 2]
    ```
    """
    if conditional_input is None:
        raise ValueError("conditional_kwargs: conditional_input is None")
    parts = [
        route
        for piece, route in _seeded_parts(bijector)
        if getattr(piece, "condition_size", None) is not None
    ]
    if not parts:
        raise ValueError(
            f"conditional_kwargs: {getattr(bijector, 'name', bijector)!r} contains no "
            "conditional residual block (build blocks with condition_size=K)"
        )
    nested = flow_kwargs(bijector, **kwargs)
    for route in parts:
        node = nested
        for name in route:
            node = node.setdefault(name, {})
        node["conditional_input"] = conditional_input
    return nested
