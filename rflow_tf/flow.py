"""The multiscale flow as one TFP bijector: FlowBijector (a sequence of stages
run in a single pass), FactorOut, and the checks of its inputs. The stages of a
FlowConfig are built by :func:`rflow_tf.stages.build_stages`."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import bijectors as rbij
from rflow_tf.bijectors import coupling as rcoup
from rflow_tf.bijectors import mixlogcdf as rmix

tfb = tfp.bijectors


def as_seed(seed, salt):
    """A stateless int32 seed of shape [2] from None/int/int32/int64 seeds
    (``tfp.random.sanitize_seed`` with ``salt``).

    Args:
      seed: None (a fresh random seed), a Python int, or an integer tensor of shape [2].
      salt: a string that tells apart the seeds derived from one seed.

    Returns:
      An int32 tensor of shape [2].

    Raises:
      TypeError: a non-integer tensor.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.flow import as_seed

    seed = as_seed(np.array([1, 2], np.int64), "FlowBijector")
    assert seed.dtype == tf.int32 and seed.shape == (2,)
    assert as_seed(7, "a").shape == (2,) and as_seed(None, "a").dtype == tf.int32
    try:
        as_seed(tf.constant([1.0, 2.0]), "a")
    except TypeError as error:
        assert "integer tensor" in str(error)
    else:
        raise AssertionError("a float seed was accepted")
    ```
    """
    if seed is not None and not isinstance(seed, int):
        seed = tf.convert_to_tensor(seed)
        if seed.dtype != tf.int32:
            if not seed.dtype.is_integer:
                raise TypeError(f"seed must be an integer tensor of shape [2], got {seed.dtype}")
            seed = tf.cast(seed, tf.int32)
    return tfp.random.sanitize_seed(seed, salt=salt)


def check_pixels(x, owner, name="x", values=True):
    """Returns the float tensor ``x`` of images after checking that its batch is
    not empty and (``values=True``) that every pixel is finite and in [0, 1]:
    a ValueError naming ``owner`` and ``name`` eagerly, an assertion
    (``InvalidArgumentError`` with the same message) in graphs. The one place
    for these checks (:class:`ResidualFlow` and :func:`rflow_tf.load`'s
    distribution use it).

    Args:
      x: a float tensor of images [batch, H, W, C].
      owner: the name of the model, for the message.
      name: the argument's name, for the message.
      values: check the values too (False: only the batch).

    Returns:
      ``x`` (in graphs, with the assertions attached).

    Raises:
      ValueError: eagerly, an empty batch or a pixel outside [0, 1] or not finite.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.flow import check_pixels

    x = check_pixels(tf.zeros([2, 8, 8, 1]), "my_flow")
    try:
        check_pixels(tf.fill([2, 8, 8, 1], 255.0), "my_flow")  # raw pixels, not dequantised
    except ValueError as error:
        assert str(error).startswith("my_flow: x must lie in [0, 1]")
    else:
        raise AssertionError("raw pixels were accepted")
    ```
    """
    if x.shape.num_elements() == 0:
        raise ValueError(
            f"{owner}: {name} is an empty batch (shape {x.shape}); pass at least one image"
        )
    if not values:
        return x
    if tf.executing_eagerly():
        xv = x.numpy()
        if not np.all(np.isfinite(xv)):
            raise ValueError(f"{owner}: {name} contains NaN or Inf")
        if xv.min() < 0.0 or xv.max() > 1.0:
            raise ValueError(
                f"{owner}: {name} must lie in [0, 1] (dequantised pixels), got "
                f"values in [{xv.min():.4g}, {xv.max():.4g}]"
            )
        return x
    x = tf.debugging.assert_all_finite(x, f"{owner}: {name} contains NaN or Inf")
    in_range = f"{owner}: {name} must lie in [0, 1] (dequantised pixels)"
    with tf.control_dependencies(
        [
            tf.debugging.assert_greater_equal(x, tf.zeros([], x.dtype), message=in_range),
            tf.debugging.assert_less_equal(x, tf.ones([], x.dtype), message=in_range),
        ]
    ):
        return tf.identity(x)


def check_sample_args(sample_shape, seed, owner):
    """Checks ``sample(sample_shape, seed)`` arguments before any work:
    ``sample_shape`` a positive int, a list of them or ``()`` (``2.5``,
    ``-1``, ``0`` and ``True`` raise), ``seed`` None, an int or an integer
    stateless seed of shape [2]. Symbolic tensors (inside a ``tf.function``)
    are checked as far as their static shape and dtype allow. Raises a
    ValueError naming ``owner``.

    Args:
      sample_shape: the ``sample_shape`` argument.
      seed: the ``seed`` argument.
      owner: the name of the model, for the message.

    Raises:
      ValueError: a bad sample shape or seed.

    Example:
    ```python
    from rflow_tf.flow import check_sample_args

    check_sample_args(16, [1, 2], "flow")
    check_sample_args([2, 3], None, "flow")
    for shape, seed in ((0, None), (2.5, None), (4, [1, 2, 3])):
        try:
            check_sample_args(shape, seed, "flow")
        except ValueError as error:
            assert str(error).startswith("flow: ")
        else:
            raise AssertionError(f"accepted {shape!r}, {seed!r}")
    ```
    """
    value = tf.get_static_value(sample_shape) if tf.is_tensor(sample_shape) else sample_shape
    if value is not None:
        try:
            shape = np.asarray(value)
        except (TypeError, ValueError):
            shape = None
        if (
            shape is None
            or shape.ndim > 1
            or shape.dtype == bool
            or not np.issubdtype(shape.dtype, np.integer)
            or np.any(shape < 1)
        ):
            raise ValueError(
                f"{owner}: the sample shape must be a positive int (or a list of "
                f"them), got {sample_shape!r}"
            )
    if seed is None or isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return
    if tf.is_tensor(seed) and tf.get_static_value(seed) is None:
        if not seed.dtype.is_integer or seed.shape.rank != 1 or seed.shape[0] not in (2, None):
            raise ValueError(
                f"{owner}: seed must be a stateless seed of two ints, got a "
                f"{seed.dtype.name} tensor of shape {seed.shape}"
            )
        return
    rbij.check_stateless_seed(seed, f"{owner}: seed")


def iter_stages(stages):
    """All pieces in application order, descending into FactorOut.

    Args:
      stages: a list of bijectors (a flow's stages, :func:`rflow_tf.stages.build_stages`).

    Yields:
      Each bijector, a FactorOut followed by the pieces of its inner flow.

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.flow import iter_stages
    from rflow_tf.stages import build_stages

    cfg = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1, 1), hidden_channels=4,
                     fc_end=False, factor_out=True)
    stages = build_stages(cfg, [], [], [])
    assert type(stages[-1]).__name__ == "FactorOut"  # the second scale is inside it
    names = [type(b).__name__ for b in iter_stages(stages)]
    assert names[-4:] == ["FactorOut", "IResBlock", "ActNorm", "Reshape"]
    ```
    """
    for b in stages:
        yield b
        if isinstance(b, FactorOut):
            yield from iter_stages(b.stages)


class FlowBijector(rbij.EqualOnlyToItself, tfb.Bijector):
    """A sequence of bijectors (``stages``, in data -> latent order) run as one
    TFP bijector, in a single pass.

    forward:  x -> z = s_n(... s_2(s_1(x)))
    log |det dz/dx| = sum_i log |det ds_i/dx_i|     (x_i the input of stage i)
    inverse:  z -> s_1^-1(... s_n^-1(z))

    Unlike ``tfb.Chain``, the log-det pass runs every stage exactly once
    (residual blocks through :meth:`rflow_tf.bijectors.IResBlock.forward_and_log_det`),
    ActNorm pieces use their layers directly, and :class:`FactorOut` stages
    are entered recursively so one seed is split over *all* residual blocks.
    Results are never cached (they depend on changing weights and random
    log-det estimates).

    Call kwargs: ``seed`` (stateless seed, shape [2]; each residual block
    gets its own split) and ``training`` (estimator settings: training or
    evaluation). Any number of leading batch dimensions is accepted. A flow
    of conditional residual blocks (:attr:`condition_size` not None) also
    takes ``conditional_input=c`` ([..., K], broadcast to the batch shape),
    given to every residual block.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.bijectors import ActNorm, IResBlock
    from rflow_tf.flow import FlowBijector

    actnorm = ActNorm((8, 8, 2))
    block = IResBlock.conv((8, 8, 2), 16, kernels="1-1-1")   # 1x1 convolutions: quick to build
    flow = FlowBijector([actnorm, block], event_shape=(8, 8, 2))
    x = tf.random.uniform([3, 8, 8, 2])
    actnorm.initialize(x)   # its data-dependent initialisation, once
    z, ld = flow.forward_and_log_det(x, seed=[1, 2])                     # ld: [3]
    ld2 = flow.forward_log_det_jacobian(x, event_ndims=3, seed=[1, 2])   # same
    np.testing.assert_allclose(ld, ld2, rtol=1e-5)
    x_back = flow.inverse(z + 0.0)   # the block's fixed-point iteration, then ActNorm^-1
    np.testing.assert_allclose(x_back, x, atol=1e-4)
    ```
    """

    _cache = rbij.FreshBijectorCache()
    _takes_flow_kwargs = True  # rflow_tf.bijectors.flow_kwargs routes seed/training here

    def __init__(self, stages, event_shape, validate_args=False, name="flow"):
        parameters = dict(locals())
        self.stages = list(stages)
        self.event_shape_in = tuple(int(d) for d in event_shape)
        s = tf.TensorShape(self.event_shape_in)
        for b in self.stages:
            s = b.forward_event_shape(s)
        if not s.is_fully_defined():
            raise ValueError(
                f"{name}: could not infer the output event shape of the stages "
                f"from input event shape {self.event_shape_in}"
            )
        self.event_shape_out = tuple(int(d) for d in s)
        self._blocks = [b for b in iter_stages(self.stages) if isinstance(b, rbij.IResBlock)]
        sizes = {b.condition_size for b in self._blocks if b.condition_size is not None}
        if len(sizes) > 1:
            raise ValueError(f"{name}: the conditional blocks take contexts of sizes {sizes}")
        #: K, the context size of the conditional blocks (None: unconditional).
        self.condition_size = sizes.pop() if sizes else None
        super().__init__(
            forward_min_event_ndims=len(self.event_shape_in),
            inverse_min_event_ndims=len(self.event_shape_out),
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    @property
    def iresblocks(self):
        """All residual blocks (also inside FactorOut stages), in order."""
        return list(self._blocks)

    # ------------------------------------------------------------- walking
    def _walk(self, stages, x, seeds, counter, mode, training, features=None, condition=None):
        """x: [N, *event]. mode: "logdet" (value and log-det), "forward"
        (value only) or "init" (value only, initialising ActNorm layers).
        ``features``: None, or ``(ids, out)``: the output of every stage whose
        id is in ``ids`` (for a FactorOut: its factored half) is appended to
        the list ``out``, in order. ``condition``: the residual blocks'
        ``conditional_input`` (None, or [N, K])."""
        total = tf.zeros([tf.shape(x)[0]], x.dtype) if mode == "logdet" else None
        cond = {} if condition is None else {"conditional_input": condition}
        for b in stages:
            ld = None
            if isinstance(b, rbij.IResBlock):
                if mode == "logdet":
                    x, ld = b.forward_and_log_det(
                        x, seed=seeds[counter[0]], training=training, **cond
                    )
                else:
                    x = b.forward(x, training=training, **cond)
                counter[0] += 1
            elif isinstance(b, rbij.ActNorm):
                if mode == "init":
                    b.initialize(x)
                if mode == "logdet":
                    ld = b.log_det(x.dtype)
                x = b.layer(x)
            elif isinstance(b, FactorOut):
                keep, out = b.split(x)
                if features is not None and id(b) in features[0]:
                    features[1].append(out)
                z_inner, ld = self._walk(
                    b.stages, keep, seeds, counter, mode, training, features, condition
                )
                x = b.merge(out, z_inner)
            elif isinstance(b, (rcoup.AffineCoupling, rmix.MixLogCDFCoupling)):
                # One net evaluation for the value and the log-det.
                if mode == "logdet":
                    x, ld = b.forward_and_log_det(x)
                else:
                    x = b.forward(x)
            else:
                if mode == "logdet":
                    ld = b.forward_log_det_jacobian(x, event_ndims=x.shape.rank - 1)
                x = b.forward(x)
                if features is not None and id(b) in features[0]:
                    features[1].append(x)
            if ld is not None:
                total += ld
        return x, total

    def _flatten_batch(self, x):
        x = tf.convert_to_tensor(x)
        nd = len(self.event_shape_in)
        if (
            x.shape.rank is None
            or x.shape.rank < nd
            or tuple(x.shape[x.shape.rank - nd :]) != self.event_shape_in
        ):
            raise ValueError(
                f"{self.name}: expected inputs of event shape "
                f"{self.event_shape_in}, got shape {x.shape}"
            )
        batch_shape = tf.shape(x)[: tf.rank(x) - nd]
        return tf.reshape(x, (-1,) + self.event_shape_in), batch_shape

    def _flat_condition(self, conditional_input, batch_shape):
        """The context [N, K] for the N flattened examples of batch ``batch_shape``
        (None when there is none); a ValueError for a context the flow cannot take."""
        if conditional_input is None:
            if self.condition_size is not None:
                raise ValueError(
                    f"{self.name}: this conditional flow needs conditional_input=c of shape "
                    f"[..., {self.condition_size}]"
                )
            return None
        if self.condition_size is None:
            raise ValueError(f"{self.name}: got conditional_input, but the flow is unconditional")
        k = self.condition_size
        c = tf.convert_to_tensor(conditional_input)
        if c.shape.rank is not None and (c.shape.rank < 1 or c.shape[-1] not in (None, k)):
            raise ValueError(
                f"{self.name}: conditional_input must have shape [..., {k}], got {c.shape}"
            )
        c = tf.broadcast_to(c, tf.concat([batch_shape, [k]], 0))
        return tf.reshape(c, [-1, k])

    def _block_seeds(self, seed):
        """One seed per residual block; without a seed each block uses its own
        ``default_seed`` (random when that is None)."""
        if seed is None:
            return [None] * len(self._blocks)
        seed = as_seed(seed, "FlowBijector")
        return tfp.random.split_seed(seed, max(len(self._blocks), 1))

    def forward_and_log_det(self, x, seed=None, training=False, conditional_input=None):
        """``(z, log |det dz/dx|)`` in one pass; the log-det has x's batch shape.
        ``conditional_input``: the context of a conditional flow.

        Example: ``z, ld = flow.forward_and_log_det(x, seed=[0, 1], training=True)``.
        """
        xf, batch_shape = self._flatten_batch(x)
        condition = self._flat_condition(conditional_input, batch_shape)
        z, ld = self._walk(
            self.stages, xf, self._block_seeds(seed), [0], "logdet", training, None, condition
        )
        z = tf.reshape(z, tf.concat([batch_shape, self.event_shape_out], 0))
        return z, tf.reshape(ld, batch_shape)

    def initialize(self, x, feature_stages=(), conditional_input=None):
        """Runs the forward pass once, initialising every ActNorm from its input
        (no-op for those already initialised); returns the feature maps of
        ``feature_stages`` (see :meth:`forward_with_features`).

        Example: ``flow.initialize(first_batch)``.
        """
        return self.forward_with_features(
            x, feature_stages, mode="init", conditional_input=conditional_input
        )[2]

    def forward_with_features(
        self, x, feature_stages, mode="forward", seed=None, training=False, conditional_input=None
    ):
        """``(z, log-det or None, features)`` for x [N, *event] in one pass:
        ``features`` are the outputs of the stages in ``feature_stages`` (for
        a :class:`FactorOut`, its factored half, before flattening), in flow
        order. ``mode``: "forward" (no log-det is computed: ``None``),
        "logdet" (the log-det [N], as :meth:`forward_and_log_det`) or "init"
        (forward, initialising ActNorm layers).

        Example: ``z, _, [h] = flow.forward_with_features(x, [squeeze])``.
        """
        if mode not in ("forward", "logdet", "init"):
            raise ValueError(f"mode must be 'forward', 'logdet' or 'init', got {mode!r}")
        xf, batch_shape = self._flatten_batch(x)
        condition = self._flat_condition(conditional_input, batch_shape)
        out = []
        seeds = self._block_seeds(seed) if mode == "logdet" else None
        features = ({id(b) for b in feature_stages}, out)
        z, ld = self._walk(self.stages, xf, seeds, [0], mode, training, features, condition)
        return z, ld, out

    def _forward(self, x, seed=None, training=False, conditional_input=None):
        xf, batch_shape = self._flatten_batch(x)
        condition = self._flat_condition(conditional_input, batch_shape)
        z, _ = self._walk(self.stages, xf, None, [0], "forward", training, None, condition)
        return tf.reshape(z, tf.concat([batch_shape, self.event_shape_out], 0))

    def _forward_log_det_jacobian(self, x, seed=None, training=False, conditional_input=None):
        return self.forward_and_log_det(
            x, seed=seed, training=training, conditional_input=conditional_input
        )[1]

    def _inverse_walk(self, stages, z, condition=None):
        cond = {} if condition is None else {"conditional_input": condition}
        for b in reversed(stages):
            if isinstance(b, FactorOut):
                d = b.factored_dim
                keep = self._inverse_walk(b.stages, z[..., d:], condition)
                z = b.unmerge(z[..., :d], keep)
            elif isinstance(b, rbij.IResBlock):
                z = b.inverse(z, **cond)
            else:
                z = b.inverse(z)
        return z

    def _inverse(self, z, seed=None, training=False, conditional_input=None):
        nd = len(self.event_shape_out)
        batch_shape = tf.shape(z)[: tf.rank(z) - nd]
        zf = tf.reshape(z, (-1,) + self.event_shape_out)
        condition = self._flat_condition(conditional_input, batch_shape)
        x = self._inverse_walk(self.stages, zf, condition)
        return tf.reshape(x, tf.concat([batch_shape, self.event_shape_in], 0))

    # -------------------------------------------------------------- shapes
    def _forward_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[: s.rank - len(self.event_shape_in)].concatenate(self.event_shape_out)

    def _inverse_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[: s.rank - len(self.event_shape_out)].concatenate(self.event_shape_in)

    def _forward_event_shape_tensor(self, s):
        n = tf.size(s) - len(self.event_shape_in)
        return tf.concat([s[:n], tf.constant(self.event_shape_out, s.dtype)], 0)

    def _inverse_event_shape_tensor(self, s):
        n = tf.size(s) - len(self.event_shape_out)
        return tf.concat([s[:n], tf.constant(self.event_shape_in, s.dtype)], 0)


class FactorOut(rbij.EqualOnlyToItself, tfb.Bijector):
    """Multiscale factor-out (Dinh et al. 2017): half of the channels go
    straight to the latent, the rest go through the remaining flow.

    forward (data -> latent), x of event shape (H, W, C), k = C // 2:

        x_keep = x[..., :k],  x_out = x[..., k:]
        z = concat(flatten(x_out), inner(x_keep))        event shape (H W C,)

    where ``inner`` (a :class:`FlowBijector` over the ``stages`` that follow,
    applied in order) maps (H, W, k) to a flat vector of size H W k. The
    factored part is an identity, so

        log |det df/dx| = log |det d inner / d x_keep|.

    Inverse: split z at H W (C - k), invert ``inner`` on the tail and
    concatenate the channels back. Call kwargs (``seed``, ``training``) are
    passed to ``inner``.

    Example:
    ```python
    inner = [tfb.Reshape([8 * 8 * 2], [8, 8, 2])]
    fo = FactorOut((8, 8, 4), inner)
    z = fo.forward(tf.zeros([3, 8, 8, 4]))     # shape [3, 256]
    x = fo.inverse(z)                          # shape [3, 8, 8, 4]
    ```
    """

    _cache = rbij.FreshBijectorCache()
    _takes_flow_kwargs = True

    def __init__(self, event_shape, stages, validate_args=False, name="factor_out"):
        parameters = dict(locals())
        event_shape = tuple(int(d) for d in event_shape)
        if len(event_shape) != 3 or event_shape[-1] < 2:
            raise ValueError(
                f"FactorOut needs an event shape (H, W, C) with C >= 2, got {event_shape}"
            )
        self.event_shape_ = event_shape
        h, w, c = event_shape
        self.n_keep = c // 2
        self.keep_shape = (h, w, self.n_keep)
        self.factored_dim = h * w * (c - self.n_keep)
        self.stages = list(stages)
        self.inner = FlowBijector(self.stages, self.keep_shape, name=f"{name}_inner")
        if self.inner.event_shape_out != (h * w * self.n_keep,):
            raise ValueError(
                f"{name}: the inner stages must map {self.keep_shape} to a flat "
                f"vector of size {h * w * self.n_keep}, got event shape "
                f"{self.inner.event_shape_out}"
            )
        super().__init__(
            forward_min_event_ndims=3,
            inverse_min_event_ndims=1,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def split(self, x):
        """(x[..., :k], x[..., k:]) for x of event shape (H, W, C)."""
        return x[..., : self.n_keep], x[..., self.n_keep :]

    def merge(self, x_out, z_inner):
        """concat(flatten(x_out), z_inner) along the last axis."""
        batch = tf.shape(x_out)[:-3]
        flat = tf.reshape(x_out, tf.concat([batch, [self.factored_dim]], 0))
        return tf.concat([flat, tf.cast(z_inner, flat.dtype)], axis=-1)

    def unmerge(self, z_out, x_keep):
        """Inverse of :meth:`merge` given the inverted inner part ``x_keep``."""
        h, w, c = self.event_shape_
        out = tf.reshape(z_out, tf.concat([tf.shape(z_out)[:-1], [h, w, c - self.n_keep]], 0))
        return tf.concat([tf.cast(x_keep, out.dtype), out], axis=-1)

    def _forward(self, x, **kwargs):
        keep, out = self.split(x)
        return self.merge(out, self.inner.forward(keep, **kwargs))

    def _inverse(self, z, **kwargs):
        d = self.factored_dim
        return self.unmerge(z[..., :d], self.inner.inverse(z[..., d:], **kwargs))

    def _forward_log_det_jacobian(self, x, **kwargs):
        keep, _ = self.split(x)
        return self.inner.forward_log_det_jacobian(keep, event_ndims=3, **kwargs)

    def _forward_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[:-3].concatenate([int(np.prod(self.event_shape_))])

    def _forward_event_shape_tensor(self, s):
        return tf.concat([s[:-3], tf.constant([int(np.prod(self.event_shape_))], s.dtype)], 0)

    def _inverse_event_shape(self, s):
        if s.rank is None:
            return tf.TensorShape(None)
        return s[:-1].concatenate(self.event_shape_)

    def _inverse_event_shape_tensor(self, s):
        return tf.concat([s[:-1], tf.constant(self.event_shape_, s.dtype)], 0)


def __getattr__(name):
    # ``rflow_tf.flow.build_stages`` keeps working; it lives in rflow_tf.stages,
    # which builds on this module.
    if name == "build_stages":
        from rflow_tf.stages import build_stages

        return build_stages
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
