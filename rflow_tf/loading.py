"""Loading a flow exported by :func:`rflow_tf.export.save` back as a TFP
distribution (:func:`load`, :class:`LoadedFlow`); re-exported by
:mod:`rflow_tf.export`."""

import os

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from google.protobuf import message
from tensorflow.core.protobuf import saved_model_pb2

from rflow_tf import data as rdata
from rflow_tf import models as rmodels
from rflow_tf.export_format import (
    DEFAULT_SEED,
    LN2,
    InputDtypeError,
    InputShapeError,
    LabelError,
    NotAnExportError,
    eval_config,
    load_metadata,
)
from rflow_tf.flow import check_sample_args

tfb = tfp.bijectors
tfd = tfp.distributions


class LoadedFlow(rmodels.FlowDistribution):
    """The distribution returned by :func:`load`: a
    ``tfd.TransformedDistribution`` (base N(0, I) over the latent of size D,
    bijector ``tfb.Invert(model.bijector)``, i.e. latent -> data) with

    * input checks in :meth:`log_prob` / :meth:`prob`: images must be
      floating point in [0, 1] with trailing shape (H, W, C) (any leading
      batch shape); otherwise :class:`InputDtypeError` or
      :class:`InputShapeError` naming what is expected;
    * :meth:`bits_per_dim` for raw integer pixels, with the exported
      preprocessing (same values as the SavedModel's ``bits_per_dim``);
    * ``model`` -- the rebuilt Keras :class:`~rflow_tf.models.ResidualFlow`
      (``dist.model.sample(n, temperature)``, ``dist.model.converge_lipschitz()``
      after fine-tuning);
    * ``metadata`` (the export metadata dict), ``n_bits``, ``image_shape``,
      ``logdet_seed``, ``condition_classes``;
    * for a class-conditional export (``condition_classes`` = K > 0), the
      distribution p(x | y): ``log_prob``, ``prob``, ``bits_per_dim`` and
      ``sample`` take ``label=y`` (class ids in [0, K): one int, or one per
      image or sample) and refuse to run without it (:class:`LabelError`);
      an unconditional export refuses a label. ``bijector_kwargs=
      {"conditional_input": dist.model.label_context(y)}`` is the TFP
      spelling of ``label=y`` (the embedded label is the context of every
      residual block).

    Called eagerly, ``log_prob`` runs inside a ``tf.function`` (traced on the
    first call, fast afterwards; gradients flow as usual). ``sample`` is not
    clipped (values can exceed [0, 1] by about ``logit_alpha``); the
    exported ``sample`` and ``dist.model.sample`` clip.

    Example:
    ```python
    import pathlib
    import rflow_tf

    # The repository's export of a model trained on the 8x8 digits.
    path = pathlib.Path(rflow_tf.__file__).parents[1] / "saved_models/digits"
    dist = rflow_tf.load(str(path))
    x = dist.sample(2, seed=[1, 2])
    print(dist.image_shape, dist.n_bits, dist.metadata["logdet"])
    assert x.shape == (2, *dist.image_shape) and dist.model.flow_config.input_shape == (8, 8, 1)
    ```
    """

    def _check_images(self, value):
        h, w, c = self.image_shape
        expected = f"dequantised {self.dtype.name} images in [0, 1] of shape [..., {h}, {w}, {c}]"
        vdtype = getattr(value, "dtype", None)
        if vdtype is not None:
            try:
                vdtype = tf.as_dtype(vdtype)
            except TypeError:
                raise InputDtypeError(
                    f"{self.name}: expected {expected}; got dtype {vdtype}"
                ) from None
            if not vdtype.is_floating:
                raise InputDtypeError(
                    f"{self.name}: expected {expected}; got dtype {vdtype.name}. Integer "
                    f"pixels must be dequantised first: rflow_tf.data.dequantize(x, "
                    f"n_bits={self.n_bits}), or use dist.bits_per_dim(x) / the "
                    "SavedModel's bits_per_dim for raw pixels."
                )
            if tf.is_tensor(value) and vdtype != self.dtype:
                raise InputDtypeError(
                    f"{self.name}: expected {expected}; got a "
                    f"{vdtype.name} tensor (cast it with "
                    f"tf.cast(x, tf.{self.dtype.name}))"
                )
        try:
            value = tf.convert_to_tensor(value, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise InputDtypeError(
                f"{self.name}: expected {expected}; could not convert the input: {e}"
            ) from None
        shape = value.shape
        if shape.rank is None or shape.rank < 3 or tuple(shape[shape.rank - 3 :]) != (h, w, c):
            got = list(shape) if shape.rank is not None else "unknown"
            raise InputShapeError(
                f"{self.name}: expected {expected} (e.g. [batch, {h}, {w}, {c}]); got shape {got}"
            )
        # Empty batch, NaN/Inf, pixels outside [0, 1]: the fresh model's checks.
        return rmodels.check_pixels(value, self.name)

    def _label_kwargs(self, kwargs, label, batch_shape, per):
        """``kwargs`` with the context of ``label`` added to ``bijector_kwargs``
        (as ``conditional_input``), after checking the label against the
        export: required by a class-conditional one, refused by an
        unconditional one, integer class ids in [0, condition_classes), one
        or one per example of ``batch_shape`` (``per`` names the examples)."""
        k = self.condition_classes
        bijector_kwargs = dict(kwargs.get("bijector_kwargs") or {})
        if label is None:
            if k and "conditional_input" not in bijector_kwargs:
                raise LabelError(
                    f"{self.name}: this export is class-conditional (a model of p(x | y) with "
                    f"{k} classes): pass label=y, class ids in [0, {k}) (one, or one per {per})"
                )
            return kwargs
        if not k:
            raise LabelError(
                f"{self.name}: got label=, but this export is unconditional (a model of "
                "p(x)); label= is for exports of class-conditional flows "
                "(FlowConfig.condition_classes)"
            )
        if "conditional_input" in bijector_kwargs:
            raise LabelError(
                f"{self.name}: give the class as label=y or its context as bijector_kwargs="
                '{"conditional_input": dist.model.label_context(y)}, not both'
            )
        expected = f"class ids in [0, {k}): one int, or one per {per} (shape {list(batch_shape)})"
        dtype = getattr(label, "dtype", None)
        try:
            label = tf.convert_to_tensor(label)
        except (TypeError, ValueError) as e:
            raise InputDtypeError(
                f"{self.name}: label must be integer {expected}; could not convert it: {e}"
            ) from None
        if not label.dtype.is_integer or (dtype is not None and not tf.as_dtype(dtype).is_integer):
            raise InputDtypeError(
                f"{self.name}: label must be integer {expected}; got dtype {label.dtype.name}"
            )
        shape = label.shape
        try:
            fits = shape.rank is not None and shape.rank <= batch_shape.rank
            fits = fits and tf.broadcast_static_shape(shape, batch_shape).is_compatible_with(
                batch_shape
            )
        except ValueError:
            fits = False
        if not fits:
            got = list(shape) if shape.rank is not None else "unknown"
            raise InputShapeError(f"{self.name}: label must be {expected}; got shape {got}")
        if tf.executing_eagerly():
            values = label.numpy()
            if values.size and (values.min() < 0 or values.max() >= k):
                outside = sorted({int(v) for v in values.ravel() if not 0 <= v < k})
                raise LabelError(
                    f"{self.name}: label must be in [0, {k}) (this export's "
                    f"condition_classes), got {outside[:5]}"
                )
        # In graphs the label embedding asserts the range itself.
        bijector_kwargs["conditional_input"] = self.model.label_context(label)
        return dict(kwargs, bijector_kwargs=bijector_kwargs)

    def log_prob(self, value, name="log_prob", label=None, **kwargs):
        """log p(x) of images x in [0, 1] (shape [..., H, W, C]), after checking
        dtype and shape; log p(x | y) for a class-conditional export, which
        needs ``label=y`` (class ids: one int, or one per image). Errors:
        :class:`LabelError` for a missing, unexpected or out-of-range label,
        :class:`InputDtypeError` / :class:`InputShapeError` for a label that is
        not integers or has the wrong shape. ``bijector_kwargs={"seed": s,
        "training": t}`` select the log-det estimate (no effect for exact
        exports; for ``"unbiased"`` exports ``seed=dist.logdet_seed``
        reproduces the exported values); ``bijector_kwargs={"conditional_input":
        dist.model.label_context(y)}`` is the TFP spelling of ``label=y``.

        Example: ``dist.log_prob(x)``, ``dist.log_prob(x, label=[3, 7])``.
        """
        value = self._check_images(value)
        kwargs = self._label_kwargs(kwargs, label, value.shape[:-3], "image")
        return super().log_prob(value, name=name, **kwargs)

    def prob(self, value, name="prob", label=None, **kwargs):
        """exp(log_prob(value)), with the same input and label checks.

        Example: ``dist.prob(x)``, ``dist.prob(x, label=3)``.
        """
        value = self._check_images(value)
        kwargs = self._label_kwargs(kwargs, label, value.shape[:-3], "image")
        return super().prob(value, name=name, **kwargs)

    def sample(
        self, sample_shape=(), seed=None, name="sample", label=None, temperature=1.0, **kwargs
    ):
        """Images of shape ``sample_shape + (H, W, C)``: z ~ N(0, T^2 I) with
        ``T = temperature`` (default 1: TFP's sample), x = f^-1(z; y) (not
        clipped). A class-conditional export needs ``label=y``: one class for
        every sample, or one per sample (shape ``sample_shape``); the label
        errors are those of :meth:`log_prob`.

        Example: ``dist.sample(4, seed=[1, 2])``,
        ``dist.sample(4, label=3, temperature=0.8, seed=[1, 2])``.
        """
        check_sample_args(sample_shape, seed, self.name)
        shape = tf.TensorShape(
            [sample_shape] if np.ndim(sample_shape) == 0 else list(np.asarray(sample_shape))
        )
        kwargs = self._label_kwargs(kwargs, label, shape, "sample")
        if isinstance(temperature, (bool, str)) or (
            not tf.is_tensor(temperature) and not float(temperature) >= 0.0
        ):
            raise ValueError(f"{self.name}: temperature must be a number >= 0, got {temperature!r}")
        if tf.is_tensor(temperature) or float(temperature) != 1.0:
            kwargs["temperature"] = tf.cast(temperature, self.dtype)
        return super().sample(sample_shape, seed=seed, name=name, **kwargs)

    def _call_sample_n(self, sample_shape, seed, temperature=None, **kwargs):
        if temperature is None:
            return super()._call_sample_n(sample_shape, seed, **kwargs)
        # TFP's sample with the latent scaled before the bijector.
        distribution_kwargs, bijector_kwargs = self._kwargs_split_fn(kwargs)
        z = self.distribution.sample(sample_shape, seed=seed, **distribution_kwargs)
        return self.bijector.forward(z * temperature, **bijector_kwargs)

    def _log_prob(self, y, **kwargs):
        if not tf.executing_eagerly():
            return super()._log_prob(y, **kwargs)
        fns = self.__dict__.setdefault("_rflow_functions", {})
        if "log_prob" not in fns:
            parent = super()._log_prob
            fns["log_prob"] = tf.function(lambda y, kw: parent(y, **kw), reduce_retracing=True)
        # The traced function always sees [N, H, W, C] (one trace serves every
        # batch shape, including a single unbatched image), and a conditional
        # flow's context one per image, [N, K].
        batch_shape = tf.shape(y)[:-3]
        context = (kwargs.get("bijector_kwargs") or {}).get("conditional_input")
        if context is not None:
            context = tf.convert_to_tensor(context)
            k = tf.shape(context)[-1:]
            context = tf.reshape(
                tf.broadcast_to(context, tf.concat([batch_shape, k], 0)), tf.concat([[-1], k], 0)
            )
            kwargs = dict(kwargs, bijector_kwargs=dict(kwargs["bijector_kwargs"]))
            kwargs["bijector_kwargs"]["conditional_input"] = context
        lp = fns["log_prob"](tf.reshape(y, (-1,) + self.image_shape), kwargs)
        return tf.reshape(lp, batch_shape)

    def bits_per_dim(self, x, name="bits_per_dim", label=None):
        """Bits per dimension of raw integer images ``x`` (uint8/int32/int64,
        shape [..., H, W, C], values in [0, 2**n_bits - 1], already reduced to
        ``n_bits``) with the export's preprocessing and fixed seeds: the same
        values as the SavedModel's ``bits_per_dim``. ``label``: the classes of a
        class-conditional export, as for :meth:`log_prob`.

        Example: ``dist.bits_per_dim(next(iter(load_image_dataset("digits", "test", 64))))``.
        """
        with tf.name_scope(name):
            meta = self.metadata
            n_bits = self.n_bits
            h, w, c = self.image_shape
            vdtype = getattr(x, "dtype", None)
            if vdtype is not None and not tf.as_dtype(vdtype).is_integer:
                raise InputDtypeError(
                    f"{self.name}: bits_per_dim expects raw integer pixels "
                    f"(uint8/int32) in [0, {2**n_bits - 1}], got dtype "
                    f"{tf.as_dtype(vdtype).name}; use log_prob for "
                    "dequantised floats"
                )
            xi = tf.convert_to_tensor(x, dtype_hint=tf.int32)
            if not xi.dtype.is_integer:
                raise InputDtypeError(
                    f"{self.name}: bits_per_dim expects integer pixels, got {xi.dtype.name}"
                )
            if (
                xi.shape.rank is None
                or xi.shape.rank < 3
                or tuple(xi.shape[xi.shape.rank - 3 :]) != (h, w, c)
            ):
                raise InputShapeError(
                    f"{self.name}: bits_per_dim expects integer images of "
                    f"shape [..., {h}, {w}, {c}], got shape {list(xi.shape)}"
                )
            xi = tf.cast(xi, tf.int32)
            with tf.control_dependencies(
                [
                    tf.debugging.assert_greater_equal(
                        xi, 0, message=f"bits_per_dim: pixels must lie in [0, {2**n_bits - 1}]"
                    ),
                    tf.debugging.assert_less_equal(
                        xi,
                        2**n_bits - 1,
                        message=f"bits_per_dim: pixels must lie in [0, {2**n_bits - 1}]",
                    ),
                ]
            ):
                if meta.get("dequantization") == "midpoint":
                    y = (tf.cast(xi, self.dtype) + 0.5) / (2.0**n_bits)
                else:
                    y = rdata.dequantize(
                        xi, n_bits, seed=meta["dequantization_seed"], dtype=self.dtype
                    )
            lp = self.log_prob(y, bijector_kwargs={"seed": self.logdet_seed}, label=label)
            d = float(h * w * c)
            return -(lp - d * n_bits * LN2) / (d * LN2)

    @property
    def image_shape(self):
        """(H, W, C) of one image."""
        return tuple(self.bijector.bijector.event_shape_in)

    @property
    def metadata(self):
        """The export metadata dict (see :func:`load_metadata`); empty for copies
        made by TFP (``dist.copy()``)."""
        return dict(self.__dict__.get("_rflow_meta") or {})

    @property
    def n_bits(self):
        """Bits per pixel of the training data."""
        meta = self.metadata
        return int(meta.get("n_bits") or meta.get("config", {}).get("n_bits", 8))

    @property
    def condition_classes(self):
        """The number of classes of a class-conditional export (its methods
        take ``label=``), 0 for a model of p(x)."""
        model = self.model
        if model is not None:
            return int(model.flow_config.condition_classes)
        return int(self.metadata.get("condition_classes") or 0)

    @property
    def logdet_seed(self):
        """The stateless seed the exported functions use for log-det estimates."""
        return list(self.metadata.get("logdet_seed") or DEFAULT_SEED)

    @property
    def model(self):
        """The rebuilt Keras :class:`~rflow_tf.models.ResidualFlow` (None for
        copies made by TFP)."""
        return self.__dict__.get("_rflow_model")


def _check_saved_model_proto(path):
    """Parses ``saved_model.pb`` (a truncated or corrupt file fails to parse, or
    lacks its single meta graph) so that :func:`load` never accepts an export
    whose serving graph is broken; raises :class:`NotAnExportError`."""
    pb_path = os.path.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    try:
        with open(pb_path, "rb") as f:
            proto.ParseFromString(f.read())
        ok = len(proto.meta_graphs) == 1 and proto.meta_graphs[0].HasField("object_graph_def")
        problem = "it has no complete meta graph"
    except (OSError, message.DecodeError) as e:
        ok, problem = False, f"{type(e).__name__}: {e}"
    if not ok:
        raise NotAnExportError(
            f"{path!r}: saved_model.pb is truncated or corrupt ({problem}); export the model again"
        )


def load(path, *, logdet=None):
    """Loads a flow written by :func:`save` as a TFP distribution over images.

    Rebuilds the :class:`~rflow_tf.models.ResidualFlow` from the config stored
    in the export (with the export's log-det evaluation settings, so
    ``log_prob`` agrees with the exported ``log_prob``), restores every
    weight from the SavedModel's ``variables/`` checkpoint (checking that all
    of them are present) and returns a :class:`LoadedFlow`, a
    ``tfd.TransformedDistribution``:

    * ``dist.log_prob(x)`` for float images in [0, 1] of shape `[..., H, W, C]`;
      ``dist.sample(n, seed=...)`` images [n, H, W, C] (not clipped);
    * ``dist.bijector`` (latent -> data) composes in ``tfb.Chain``, works as
      a component of ``tfd.JointDistribution*``;
    * ``dist.trainable_variables`` are the flow's weights, so
      ``tfp.math.minimize`` fine-tunes it (call
      ``dist.model.converge_lipschitz()`` afterwards);
    * ``dist.model`` is the Keras model, ``dist.metadata`` the export metadata;
    * a class-conditional export's distribution is p(x | y):
      ``dist.log_prob(x, label=y)``, ``dist.sample(n, label=y, temperature=t,
      seed=...)`` (see :class:`LoadedFlow`).

    Args:
      path: directory written by :func:`save`.
      logdet: override the log-det mode (``"unbiased"``, ``"truncated"``,
        ``"exact"``); default: the export's (``dist.metadata["logdet"]``).
        E.g. ``"unbiased"`` makes fine-tuning of a large model cheaper.

    Raises:
      ExportNotFoundError: ``path`` does not exist.
      NotAnExportError: ``path`` is not an export (or its weights do not
        match its config).

    Example:
    ```python
    import rflow_tf, tensorflow_probability as tfp
    import tensorflow as tf

    # Export a tiny (untrained) flow of 4x4 images, then load it.
    model = rflow_tf.ResidualFlow(rflow_tf.FlowConfig(
        input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4, fc_end=False, logdet="exact"))
    x = tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1])
    model.initialize(x)
    rflow_tf.export.save(model, "saved_models/tiny")
    dist = rflow_tf.load("saved_models/tiny")
    print(dist.log_prob(x))                     # the exported model's log p(x)
    tf.debugging.assert_near(dist.log_prob(x), model.log_prob(x), atol=1e-3)
    shifted = tfp.bijectors.Chain([tfp.bijectors.Shift(0.1), dist.bijector])
    assert shifted.forward(tf.zeros([1, 16])).shape == (1, 4, 4, 1)
    ```
    """
    path = os.fspath(path)
    meta = load_metadata(path)
    _check_saved_model_proto(path)
    if logdet is not None and logdet not in ("exact", "unbiased", "truncated"):
        raise ValueError(f"logdet must be 'exact', 'unbiased' or 'truncated', got {logdet!r}")
    try:
        cfg = eval_config(meta, logdet)
    except (KeyError, TypeError, ValueError) as e:
        raise NotAnExportError(
            f"{path!r}: invalid model config in the export metadata: {e}"
        ) from None
    model = rmodels.ResidualFlow(cfg, name=meta.get("name") or "residual_flow")
    ckpt = tf.train.Checkpoint(model=model)
    prefix = os.path.join(path, "variables", "variables")
    try:
        status = ckpt.read(prefix)
        status.assert_existing_objects_matched()
        status.expect_partial()
    except (AssertionError, tf.errors.OpError, ValueError, IndexError) as e:
        # A truncated variables.data file surfaces as IndexError ("Read less
        # bytes than requested"); a corrupt one as DataLossError (an OpError).
        raise NotAnExportError(
            f"{path!r}: could not restore the model's weights from "
            f"{prefix} (the files are incomplete or corrupt?): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"
        ) from None
    model.mark_lipschitz_current()  # the saved power-iteration state, exactly as exported
    base = tfd.MultivariateNormalDiag(loc=tf.zeros([cfg.num_dims], model.flow_dtype))
    dist = LoadedFlow(base, tfb.Invert(model.bijector), name=model.name)
    # Plain attributes set without tf.Module tracking (the weights are already
    # reachable through the bijector).
    object.__setattr__(dist, "_rflow_model", model)
    object.__setattr__(dist, "_rflow_meta", meta)
    return dist
