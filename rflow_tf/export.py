"""SavedModel export of Residual Flow image models, and loading them back as
TFP distributions.

Two halves:

* :func:`save` writes a TensorFlow SavedModel of a trained
  :class:`rflow_tf.models.ResidualFlow`. Its functions and serving
  signatures need nothing but TensorFlow to run (``tf.saved_model.load`` in a
  process that never imports ``rflow_tf``, TF Serving, the C++/Java APIs).
* :func:`load` rebuilds the Keras model from the configuration stored in the
  SavedModel, restores its weights from the SavedModel's own ``variables/``
  checkpoint and returns a real ``tfp.distributions.TransformedDistribution``
  (a :class:`LoadedFlow`), usable in any TFP program.

What an export contains
-----------------------
``<path>/saved_model.pb`` + ``<path>/variables/`` (a standard SavedModel) and
``<path>/assets/rflow_tf_export.json`` (the metadata below, as a file). The
root object has:

=====================  =====================================================
``log_prob(x)``        x: float images in [0, 1], shape [B, H, W, C] (the
                       model's dtype, normally float32) -> [B] log p(x),
                       the continuous density of dequantised pixels
                       (logit log-det included). NaN/Inf or values outside
                       [0, 1] raise ``InvalidArgumentError``.
``bits_per_dim(x)``    x: raw integer images, uint8 or int32, shape
                       [B, H, W, C], values in [0, 2**n_bits - 1] -> [B]
                       bits per dimension, computed like training/eval
                       (see "Preprocessing" below).
``sample(n, temperature, seed)``
                       n: int32 scalar, temperature: float scalar, seed:
                       int32 [2] (stateless) -> [n, H, W, C] images in
                       [0, 1] (clipped), z ~ N(0, temperature^2 I).
``forward(x)``         data -> latent: x [B, H, W, C] -> (z [B, D],
                       log |det dz/dx| [B]).
``inverse(z)``         latent -> data: z [B, D] -> x [B, H, W, C]
                       (fixed-point inverse of every residual block; not
                       clipped).
``classify(x)``        only for models with classifier heads
                       (``FlowConfig.n_classes`` > 0): x as for ``log_prob``
                       -> [B, n_classes] logits of p(y | x) (no log-det is
                       computed).
``metadata()``         dict of string/int tensors: ``metadata_json``,
                       ``config_json``, ``n_bits``, ``logit_alpha``,
                       ``image_shape``, ``latent_shape``, ``rflow_tf_version``.
``config_json``,       tf.Variable strings holding the model's
``metadata_json``      :class:`~rflow_tf.models.FlowConfig` JSON and the
                       export metadata JSON.
``model``              the Keras model's variables (object graph used by
                       :func:`load`).
=====================  =====================================================

Serving signatures (``obj.signatures[...]``, dict outputs):
``serving_default`` and ``log_prob`` -> ``{"log_prob"}``; ``bits_per_dim``
(uint8 input) and ``bits_per_dim_int32`` -> ``{"bits_per_dim"}``; ``sample``
-> ``{"images"}``; ``forward`` -> ``{"latent", "log_det"}``; ``inverse`` ->
``{"images"}``; ``metadata``; with classifier heads also ``classify`` ->
``{"logits", "probabilities", "classes"}``. Inputs are named ``x``, ``z``, ``n``,
``temperature``, ``seed``. Every input has a fixed signature: a wrong image
shape or dtype is rejected by TensorFlow with a message showing the expected
``TensorSpec``.

The graphs are for inference: the residual blocks are traced without their
custom (Neumann-series) gradients. To fine-tune, use :func:`load`.

Determinism of the log-densities
--------------------------------
Residual blocks estimate log-determinants. The export evaluates them with
high-accuracy *evaluation* settings fixed at save time (``logdet`` argument
of :func:`save`):

* ``"exact"`` (the default when the image has at most
  :data:`EXACT_MAX_DIMS` = 256 dimensions, e.g. 8x8 digits): the full
  Jacobian's log-determinant; deterministic, independent of the batch.
* ``"unbiased"`` (default for larger images): the Russian-roulette power
  series with ``n_exact_terms_eval`` (paper: 20) exact terms and a fixed
  stateless seed (:data:`DEFAULT_SEED`); deterministic for a given input
  batch.

:func:`load` rebuilds the model with the same settings, so
``load(path).log_prob(x)`` equals the exported ``log_prob(x)`` (for
``"unbiased"`` exports pass ``bijector_kwargs={"seed": dist.logdet_seed}``).

Preprocessing in ``bits_per_dim``
---------------------------------
Inputs must already be reduced to ``n_bits`` bits (as
``rflow_tf.data.load_image_dataset(..., n_bits=n_bits)`` yields them; e.g.
for a 5-bit model pass ``x_uint8 >> 3``): that reduction is the caller's.
The export then applies the training preprocessing: uniform dequantisation
``y = (x + u) / 2**n_bits`` (:func:`rflow_tf.data.dequantize`) with ``u``
drawn from a fixed stateless seed (default; an unbiased single-sample
estimate of the same bits/dim that training reports), or, with
``save(..., dequantization="midpoint")``, ``u = 1/2``. Then
``bpd = -(log p(y) - D n_bits ln 2) / (D ln 2)``. Values outside
[0, 2**n_bits - 1] raise ``InvalidArgumentError``. With uniform noise an
image's value depends on its position in the batch (the noise is drawn for
the whole batch from one seed); midpoint dequantisation does not.
:meth:`LoadedFlow.bits_per_dim` reproduces the exported values.

Example:
```python
import rflow_tf
from rflow_tf import export

export.save(model, "saved_models/digits")        # EMA weights swapped in
dist = rflow_tf.load("saved_models/digits")      # a TransformedDistribution
x = dist.sample(16, seed=[1, 2])                 # [16, 8, 8, 1]
lp = dist.log_prob(x)

# Without rflow_tf:
import tensorflow as tf
obj = tf.saved_model.load("saved_models/digits")
imgs = obj.sample(16, 0.8, [1, 2])
bpd = obj.bits_per_dim(tf.zeros([2, 8, 8, 1], tf.uint8))
```
"""

import datetime
import json
import math
import os
import shutil
import tempfile
import warnings

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from google.protobuf import message
from tensorflow.core.protobuf import saved_model_pb2

from rflow_tf import bijectors as rbij
from rflow_tf import data as rdata
from rflow_tf import models as rmodels

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "save",
    "load",
    "load_metadata",
    "is_export",
    "LoadedFlow",
    "ExportError",
    "ExportNotFoundError",
    "NotAnExportError",
    "InputShapeError",
    "InputDtypeError",
    "EXACT_MAX_DIMS",
    "DEFAULT_SEED",
    "METADATA_FILE",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "rflow_tf.export"
FORMAT_VERSION = 1
METADATA_FILE = "rflow_tf_export.json"
#: Images with at most this many dimensions are exported with exact log-dets.
EXACT_MAX_DIMS = 256
#: Stateless seed of the exported log-det estimator and dequantisation noise.
DEFAULT_SEED = (20191, 9)
_LN2 = math.log(2.0)
_LOGDET_CHOICES = ("auto", "exact", "unbiased", "truncated")
_DEQUANTIZATIONS = ("uniform", "midpoint")


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


class ExportError(Exception):
    """Base class of every error raised by :mod:`rflow_tf.export`.

    Example:
    ```python
    try:
        dist = rflow_tf.load(path)
    except rflow_tf.export.ExportError as e:
        print("cannot load:", e)
    ```
    """


class ExportNotFoundError(ExportError, FileNotFoundError):
    """The export path does not exist (also a ``FileNotFoundError``).

    Example: ``rflow_tf.load("no/such/dir")`` raises it.
    """


class NotAnExportError(ExportError, ValueError):
    """The path exists but is not a flow exported by :func:`save` (an empty
    or unrelated directory, a plain file, a SavedModel of another model, or a
    newer export format). Also a ``ValueError``.

    Example: ``rflow_tf.load(tempfile.mkdtemp())`` raises it.
    """


class InputShapeError(ExportError, ValueError):
    """An input of the wrong shape was given to a loaded flow; the message
    names the expected shape. Also a ``ValueError``.

    Example: ``dist.log_prob(tf.zeros([2, 28, 28, 1]))`` on an 8x8 model.
    """


class InputDtypeError(ExportError, TypeError):
    """An input of the wrong dtype was given to a loaded flow (e.g. uint8
    pixels to ``log_prob``); the message names the expected dtype. Also a
    ``TypeError``.

    Example: ``dist.log_prob(tf.zeros([2, 8, 8, 1], tf.uint8))``.
    """


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _package_version():
    try:
        import rflow_tf  # pylint: disable=import-outside-toplevel

        return str(getattr(rflow_tf, "__version__", "unknown"))
    except ImportError:  # pragma: no cover
        return "unknown"


def _resolve_logdet(logdet, cfg):
    if logdet not in _LOGDET_CHOICES:
        raise ValueError(f"logdet must be one of {_LOGDET_CHOICES}, got {logdet!r}")
    if logdet == "auto":
        return "exact" if cfg.num_dims <= EXACT_MAX_DIMS else "unbiased"
    return logdet


def _check_seed(seed, name):
    """A required stateless seed as a list of two ints (see
    :func:`rflow_tf.bijectors._check_stateless_seed`)."""
    if seed is None:
        raise ValueError(f"{name} must be a stateless seed of two ints, e.g. (1, 2); got None")
    return list(rbij._check_stateless_seed(seed, name))  # pylint: disable=protected-access


def _metadata_path(path):
    return os.path.join(path, "assets", METADATA_FILE)


def _eval_config(meta, logdet=None):
    """The FlowConfig the export was traced with (or with ``logdet`` overridden)."""
    cfg = rmodels.FlowConfig.from_dict(dict(meta["config"]))
    changes = {"logdet": logdet or meta["logdet"], "logdet_eval": logdet or meta["logdet"]}
    if meta.get("n_exact_terms_eval") is not None:
        changes["n_exact_terms_eval"] = int(meta["n_exact_terms_eval"])
    return cfg.replace(**changes)


def _copy_weights(src, dst):
    src_vars, dst_vars = src.variables, dst.variables
    if len(src_vars) != len(dst_vars):
        raise ExportError(
            f"internal error: rebuilt model has {len(dst_vars)} variables, the "
            f"model to export has {len(src_vars)}"
        )
    for a, b in zip(src_vars, dst_vars):
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            raise ExportError(
                f"internal error: variable {a.path} {a.shape} {a.dtype} does not "
                f"match rebuilt {b.path} {b.shape} {b.dtype}"
            )
        b.assign(a)


# ----------------------------------------------------------------------------
# The exported module
# ----------------------------------------------------------------------------


class _ExportModule(tf.Module):
    """Root object of the SavedModel; see the module docstring."""

    def __init__(self, model, meta, seed, dequantization):
        super().__init__(name="rflow_tf_export")
        cfg = model.flow_config
        dtype = model.flow_dtype
        h, w, c = cfg.input_shape
        d = cfg.num_dims
        n_bits = int(meta["n_bits"])
        meta_json = json.dumps(meta, sort_keys=True)
        # The training config (the traced model differs only in its log-det mode).
        cfg_json = rmodels.FlowConfig.from_dict(dict(meta["config"])).to_json()
        # Tracked children: the model (its variables, used by load()), the
        # metadata strings and the metadata file (copied into assets/).
        self.model = model
        self.config_json = tf.Variable(
            cfg_json, trainable=False, dtype=tf.string, name="config_json"
        )
        self.metadata_json = tf.Variable(
            meta_json, trainable=False, dtype=tf.string, name="metadata_json"
        )
        self.format_version = tf.Variable(
            FORMAT_VERSION, trainable=False, dtype=tf.int32, name="format_version"
        )
        self._tmpdir = tempfile.mkdtemp(prefix="rflow_tf_export_")
        meta_file = os.path.join(self._tmpdir, METADATA_FILE)
        with open(meta_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))
        self.metadata_file = tf.saved_model.Asset(meta_file)

        seed_t = tf.constant(seed, tf.int32)
        deq_seed = tf.constant(_check_seed(meta["dequantization_seed"], "seed"), tf.int32)
        image_spec = tf.TensorSpec([None, h, w, c], dtype, name="x")
        latent_spec = tf.TensorSpec([None, d], dtype, name="z")

        # Each function below is traced once; the others call it (so the
        # SavedModel holds one graph of the log-det pass and one of the
        # inverse).
        def forward(x):
            """Data -> latent: (z [B, D], log |det dz/dx| [B])."""
            return model.forward_and_log_det(x, training=False, seed=seed_t)

        def inverse(z):
            """Latent -> data: images [B, H, W, C] (not clipped)."""
            return model.bijector.inverse(z)

        def log_prob(x):
            """log p(x) [B] of float images in [0, 1]."""
            z, ld = self.forward(x)
            return model.base_log_prob(z) + ld

        def bits_per_dim(x):
            """Bits/dim [B] of raw n-bit integer images (dequantised here)."""
            xi = tf.cast(x, tf.int32)
            checks = [
                tf.debugging.assert_greater_equal(
                    xi,
                    0,
                    message=f"bits_per_dim: pixels must lie in [0, {2**n_bits - 1}] "
                    f"(integer images reduced to {n_bits} bits)",
                ),
                tf.debugging.assert_less_equal(
                    xi,
                    2**n_bits - 1,
                    message=f"bits_per_dim: pixels must lie in [0, {2**n_bits - 1}]"
                    + (
                        f" (reduce 8-bit images to {n_bits} bits first: x >> {8 - n_bits})"
                        if n_bits < 8
                        else ""
                    ),
                ),
            ]
            with tf.control_dependencies(checks):
                if dequantization == "midpoint":
                    y = (tf.cast(xi, dtype) + 0.5) / (2.0**n_bits)
                else:
                    y = rdata.dequantize(xi, n_bits, seed=deq_seed, dtype=dtype)
            lp = self.log_prob(y)
            return -(lp - d * n_bits * _LN2) / (d * _LN2)

        def sample(n, temperature, seed):
            """n images in [0, 1] from z ~ N(0, temperature^2 I), stateless seed."""
            z = tf.random.stateless_normal(
                tf.stack([n, d]), tfp.random.sanitize_seed(seed), dtype=dtype
            )
            x = self.inverse(z * tf.cast(temperature, dtype))
            return tf.clip_by_value(x, 0.0, 1.0)

        def metadata():
            """Export metadata and preprocessing facts as tensors."""
            return {
                "metadata_json": tf.constant(meta_json),
                "config_json": tf.constant(cfg_json),
                "n_bits": tf.constant(n_bits, tf.int32),
                "logit_alpha": tf.constant(float(cfg.logit_alpha), tf.float64),
                "image_shape": tf.constant(list(cfg.input_shape), tf.int32),
                "latent_shape": tf.constant([d], tf.int32),
                "rflow_tf_version": tf.constant(meta["rflow_tf_version"]),
                "logdet": tf.constant(meta["logdet"]),
                "dequantization": tf.constant(dequantization),
            }

        sample_specs = [
            tf.TensorSpec([], tf.int32, name="n"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([2], tf.int32, name="seed"),
        ]
        uint8_spec = tf.TensorSpec([None, h, w, c], tf.uint8, name="x")
        int32_spec = tf.TensorSpec([None, h, w, c], tf.int32, name="x")
        # tf.saved_model.save traces these functions (it retraces anything
        # traced before, in its own context).
        self.forward = tf.function(forward, input_signature=[image_spec])
        self.inverse = tf.function(inverse, input_signature=[latent_spec])
        self.log_prob = tf.function(log_prob, input_signature=[image_spec])
        # bits_per_dim accepts uint8 and int32 (two traces, made now: functions
        # without an input signature are saved with the traces they have).
        # A signature would let TF convert numpy int32 arrays to uint8 with
        # wrap-around, hiding out-of-range pixels.
        self.bits_per_dim = tf.function(bits_per_dim)
        self.bits_per_dim.get_concrete_function(uint8_spec)
        self.bits_per_dim.get_concrete_function(int32_spec)
        self.sample = tf.function(sample, input_signature=sample_specs)
        self.metadata = tf.function(metadata, input_signature=[])

        # Serving signatures: dict outputs with stable names, calling the
        # functions above.
        def sig_forward(x):
            """forward() with dict outputs for the serving signature."""
            z, ld = self.forward(x)
            return {"latent": z, "log_det": ld}

        sig = {}
        sig["serving_default"] = tf.function(
            lambda x: {"log_prob": self.log_prob(x)}, input_signature=[image_spec]
        )
        sig["log_prob"] = sig["serving_default"]
        sig["bits_per_dim"] = tf.function(
            lambda x: {"bits_per_dim": self.bits_per_dim(x)}, input_signature=[uint8_spec]
        )
        sig["bits_per_dim_int32"] = tf.function(
            lambda x: {"bits_per_dim": self.bits_per_dim(x)}, input_signature=[int32_spec]
        )
        sig["sample"] = tf.function(
            lambda n, temperature, seed: {"images": self.sample(n, temperature, seed)},
            input_signature=sample_specs,
        )
        sig["forward"] = tf.function(sig_forward, input_signature=[image_spec])
        sig["inverse"] = tf.function(
            lambda z: {"images": self.inverse(z)}, input_signature=[latent_spec]
        )
        sig["metadata"] = self.metadata
        if model.n_classes:

            def classify(x):
                """Logits [B, n_classes] of p(y | x), x float images in [0, 1]."""
                return model.classify(x, training=False)

            def sig_classify(x):
                """classify() with dict outputs for the serving signature."""
                logits = self.classify(x)
                return {
                    "logits": logits,
                    "probabilities": tf.nn.softmax(logits),
                    "classes": tf.argmax(logits, axis=-1, output_type=tf.int32),
                }

            self.classify = tf.function(classify, input_signature=[image_spec])
            sig["classify"] = tf.function(sig_classify, input_signature=[image_spec])
        object.__setattr__(self, "export_signatures", sig)  # not a tracked child

    def _cleanup(self):
        shutil.rmtree(self._tmpdir, ignore_errors=True)


# ----------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------


def save(
    model,
    path,
    *,
    n_bits=None,
    logdet="auto",
    seed=DEFAULT_SEED,
    dequantization="uniform",
    extra_metadata=None,
    overwrite=True,
    converge=True,
):
    """Exports a :class:`~rflow_tf.models.ResidualFlow` as a SavedModel at ``path``.

    Pass the weights you want exported already in the model (for a trained
    model, the EMA weights swapped in). ``save`` first runs
    ``model.converge_lipschitz()`` (so the exported spectral normalisation is
    converged; this updates the power-iteration vectors of ``model``; see
    ``converge``), then
    copies the weights into a fresh model built with the export's
    evaluation settings, traces the functions listed in the module
    docstring and writes the SavedModel (atomically: into a temporary
    sibling directory that then replaces ``path``).

    Args:
      model: a ``ResidualFlow`` (ActNorm initialised).
      path: output directory (created; an earlier export there is replaced).
      n_bits: bits per pixel of the data (default ``model.flow_config.n_bits``);
        used by ``bits_per_dim`` and stored in the metadata.
      logdet: log-det evaluation of the exported functions: ``"auto"``
        (``"exact"`` if the image has at most ``EXACT_MAX_DIMS`` dimensions,
        else ``"unbiased"``), ``"exact"``, ``"unbiased"`` (roulette with
        ``n_exact_terms_eval`` exact terms, fixed ``seed``) or ``"truncated"``.
      seed: stateless seed (two ints) of the log-det estimator and of the
        dequantisation noise of ``bits_per_dim``.
      dequantization: ``"uniform"`` (training preprocessing, noise from
        ``seed``) or ``"midpoint"`` (``(x + 0.5) / 2**n_bits``), used by
        ``bits_per_dim``.
      extra_metadata: optional JSON-serialisable dict stored under
        ``"extra"`` in the metadata (e.g. training step, test bits/dim).
      overwrite: replace an existing export at ``path`` (a directory that is
        not an export is never replaced).
      converge: run ``model.converge_lipschitz()`` first (default). ``False``
        exports the power-iteration state exactly as it is, e.g. a converted
        reference checkpoint whose u, v come from the reference's own
        ``validate()`` procedure (:mod:`rflow_tf.convert`), so the export
        computes the reference's function.

    Returns:
      ``path``.

    Raises:
      TypeError: ``model`` is not a ResidualFlow.
      ValueError: bad ``n_bits``, ``logdet``, ``seed`` or ``dequantization``.
      ExportError: ``path`` exists and is not an export (or ``overwrite`` is
        False), or ``extra_metadata`` is not JSON-serialisable.

    Example:
    ```python
    from rflow_tf import export, models
    flow = models.ResidualFlow("digits_small")
    ...                                   # train; swap in the EMA weights
    export.save(flow, "saved_models/digits", extra_metadata={"test_bpd": 1.9})
    ```
    """
    if not isinstance(model, rmodels.ResidualFlow):
        raise TypeError(f"save expects an rflow_tf.models.ResidualFlow, got {type(model).__name__}")
    path = os.fspath(path)
    cfg = model.flow_config
    n_bits = cfg.n_bits if n_bits is None else n_bits
    if (
        isinstance(n_bits, bool)
        or not isinstance(n_bits, (int, np.integer))
        or not 1 <= int(n_bits) <= 8
    ):
        raise ValueError(f"n_bits must be an int in 1..8, got {n_bits!r}")
    n_bits = int(n_bits)
    eval_logdet = _resolve_logdet(logdet, cfg)
    seed = _check_seed(seed, "seed")
    if dequantization not in _DEQUANTIZATIONS:
        raise ValueError(
            f"dequantization must be one of {_DEQUANTIZATIONS}, got {dequantization!r}"
        )
    if extra_metadata is not None:
        try:
            json.dumps(extra_metadata)
        except TypeError as e:
            raise ExportError(f"extra_metadata must be JSON-serialisable: {e}") from None
    if os.path.exists(path):
        if not os.path.isdir(path) or (os.listdir(path) and not is_export(path)):
            raise ExportError(
                f"{path!r} exists and is not an rflow_tf export; refusing to "
                "overwrite it (choose another path or remove it)"
            )
        if not overwrite and os.listdir(path):
            raise ExportError(f"{path!r} already holds an export and overwrite=False")
    if not model.is_initialized:
        warnings.warn(
            "save: the model's ActNorm layers were never initialised "
            "(call model.initialize(x) before training)",
            RuntimeWarning,
            stacklevel=2,
        )

    if converge:
        model.converge_lipschitz()
    # Inference-only graph: no custom (Neumann) gradients to trace or store;
    # the log-det values do not depend on the gradient method.
    export_cfg = cfg.replace(
        logdet=eval_logdet, logdet_eval=eval_logdet, neumann_grad=False, grad_in_forward=False
    )
    export_model = rmodels.ResidualFlow(export_cfg, name=model.name)
    _copy_weights(model, export_model)
    for layer in export_model.lipschitz_layers():  # frozen weights: no upkeep in the graphs
        layer.auto_update = False

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rflow_tf_version": _package_version(),
        "tensorflow_version": tf.__version__,
        "tensorflow_probability_version": tfp.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "name": model.name,
        "config": cfg.to_dict(),
        "n_bits": n_bits,
        "logit_alpha": float(cfg.logit_alpha),
        "image_shape": list(cfg.input_shape),
        "latent_shape": [cfg.num_dims],
        "dtype": cfg.dtype,
        "logdet": eval_logdet,
        "n_exact_terms_eval": int(cfg.n_exact_terms_eval),
        "logdet_seed": seed,
        "dequantization": dequantization,
        "dequantization_seed": seed,
        "bits_per_dim_offset": rdata.bits_per_dim_offset(n_bits, cfg.num_dims),
        "signatures": [
            "serving_default",
            "log_prob",
            "bits_per_dim",
            "bits_per_dim_int32",
            "sample",
            "forward",
            "inverse",
            "metadata",
        ]
        + (["classify"] if cfg.n_classes else []),
        "n_classes": int(cfg.n_classes),
        "extra": extra_metadata or {},
    }

    module = _ExportModule(export_model, meta, seed, dequantization)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", dir=parent)
    try:
        tf.saved_model.save(
            module,
            tmp,
            signatures=module.export_signatures,
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        )
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        os.chmod(path, 0o755)  # mkdtemp made it private
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        module._cleanup()  # pylint: disable=protected-access
    return path


def is_export(path):
    """True if ``path`` is a directory written by :func:`save` (it holds
    ``saved_model.pb`` and ``assets/rflow_tf_export.json``).

    Example: ``rflow_tf.export.is_export("saved_models/digits")  # True``.
    """
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "saved_model.pb")) and os.path.isfile(
        _metadata_path(path)
    )


def load_metadata(path):
    """The export metadata of ``path`` as a dict (without loading any
    weights): ``config`` (FlowConfig dict), ``n_bits``, ``logit_alpha``,
    ``image_shape``, ``latent_shape``, ``logdet``, ``logdet_seed``,
    ``dequantization``, ``rflow_tf_version``, ``extra``, ...

    Raises :class:`ExportNotFoundError` if ``path`` does not exist and
    :class:`NotAnExportError` if it is not an export.

    Example: ``load_metadata("saved_models/digits")["n_bits"]  # 8``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ExportNotFoundError(
            f"No exported flow at {path!r}: the path does not exist. Export one with "
            "rflow_tf.export.save(model, path) or train/main.py."
        )
    if not os.path.isdir(path):
        raise NotAnExportError(
            f"{path!r} is a file; expected a directory written by "
            "rflow_tf.export.save (a SavedModel with "
            f"assets/{METADATA_FILE})"
        )
    has_pb = os.path.isfile(os.path.join(path, "saved_model.pb"))
    if not os.path.isfile(_metadata_path(path)):
        what = (
            "a SavedModel without rflow_tf export metadata (not saved by rflow_tf.export.save)"
            if has_pb
            else "not a SavedModel (no saved_model.pb)"
            if os.listdir(path)
            else "empty"
        )
        raise NotAnExportError(
            f"{path!r} is not an exported rflow_tf flow: it is {what}. "
            f"Expected saved_model.pb, variables/ and assets/{METADATA_FILE}, "
            "as written by rflow_tf.export.save."
        )
    if not has_pb:
        raise NotAnExportError(
            f"{path!r} is an incomplete rflow_tf export: saved_model.pb is missing"
        )
    try:
        with open(_metadata_path(path), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise NotAnExportError(
            f"{path!r}: unreadable export metadata ({_metadata_path(path)}): {e}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NotAnExportError(f"{path!r}: {METADATA_FILE} is not rflow_tf export metadata")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise NotAnExportError(
            f"{path!r} was written with export format {meta.get('format_version')} (rflow_tf "
            f"{meta.get('rflow_tf_version')}); this rflow_tf reads format <= {FORMAT_VERSION}. "
            "Upgrade rflow_tf."
        )
    return meta


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
    dist = rflow_tf.load("saved_models/digits")
    x = dist.sample(16, seed=[1, 2])
    lp = dist.log_prob(x)
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
            return -(lp - d * n_bits * _LN2) / (d * _LN2)

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
    dist = rflow_tf.load("saved_models/digits")
    x = dist.sample(16, seed=[1, 2])
    print(dist.log_prob(x))
    shifted = tfp.bijectors.Chain([tfp.bijectors.Shift(0.1), dist.bijector])
    ```
    """
    path = os.fspath(path)
    meta = load_metadata(path)
    _check_saved_model_proto(path)
    if logdet is not None and logdet not in ("exact", "unbiased", "truncated"):
        raise ValueError(f"logdet must be 'exact', 'unbiased' or 'truncated', got {logdet!r}")
    try:
        cfg = _eval_config(meta, logdet)
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
