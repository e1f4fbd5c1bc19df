"""Loading a flow exported by :func:`rflow_tf.export.save` back as a TFP
distribution (:func:`load`, :class:`LoadedFlow`); re-exported by
:mod:`rflow_tf.export`."""

import os

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
    NotAnExportError,
    eval_config,
    load_metadata,
)

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
      ``logdet_seed``.

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

    def log_prob(self, value, name="log_prob", **kwargs):
        """log p(x) of images x in [0, 1] (shape [..., H, W, C]), after checking
        dtype and shape. ``bijector_kwargs={"seed": s, "training": t}`` select
        the log-det estimate (no effect for exact exports; for ``"unbiased"``
        exports ``seed=dist.logdet_seed`` reproduces the exported values).

        Example: ``dist.log_prob(x)``.
        """
        return super().log_prob(self._check_images(value), name=name, **kwargs)

    def prob(self, value, name="prob", **kwargs):
        """exp(log_prob(value)), with the same input checks.

        Example: ``dist.prob(x)``.
        """
        return super().prob(self._check_images(value), name=name, **kwargs)

    def _log_prob(self, y, **kwargs):
        if not tf.executing_eagerly():
            return super()._log_prob(y, **kwargs)
        fns = self.__dict__.setdefault("_rflow_functions", {})
        if "log_prob" not in fns:
            parent = super()._log_prob
            fns["log_prob"] = tf.function(lambda y, kw: parent(y, **kw), reduce_retracing=True)
        # The traced function always sees [N, H, W, C] (one trace serves every
        # batch shape, including a single unbatched image).
        batch_shape = tf.shape(y)[:-3]
        lp = fns["log_prob"](tf.reshape(y, (-1,) + self.image_shape), kwargs)
        return tf.reshape(lp, batch_shape)

    def bits_per_dim(self, x, name="bits_per_dim"):
        """Bits per dimension of raw integer images ``x`` (uint8/int32/int64,
        shape [..., H, W, C], values in [0, 2**n_bits - 1], already reduced to
        ``n_bits``) with the export's preprocessing and fixed seeds: the same
        values as the SavedModel's ``bits_per_dim``.

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
            lp = self.log_prob(y, bijector_kwargs={"seed": self.logdet_seed})
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
    * ``dist.model`` is the Keras model, ``dist.metadata`` the export metadata.

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
