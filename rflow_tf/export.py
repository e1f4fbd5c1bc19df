"""SavedModel export of Residual Flow image models, and loading them back as
TFP distributions.

Two halves (writing here, with the metadata and the SavedModel's root object
in :mod:`rflow_tf.export_module`; the format's identifiers, metadata file and
errors in :mod:`rflow_tf.export_format`; loading in :mod:`rflow_tf.loading`,
whose names are re-exported here):

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

Class-conditional flows
-----------------------
A flow of p(x | y) (``FlowConfig.condition_classes`` = K > 0) is exported
with the same functions and signatures, each taking the class after the
images, latents or sample count: ``log_prob(x, label)``,
``bits_per_dim(x, label)``, ``sample(n, label, temperature, seed)``,
``forward(x, label)``, ``inverse(z, label)``; the signatures' extra input is
named ``label``. A label is int32: one class for the whole batch (a scalar) or
one per example ([B], or [n] for ``sample``); a class outside [0, K) or a
label of another length raises ``InvalidArgumentError`` naming the problem.
Such an export has ``format_version`` 2 (:data:`FORMAT_VERSION`) and its
metadata adds ``conditional`` (true), ``condition_classes`` (K) and
``condition_embedding``; ``metadata()`` adds ``condition_classes``. A reader
of format 1 refuses it. An unconditional export is written exactly as before,
with ``format_version`` 1. :func:`load` gives back a :class:`LoadedFlow`
whose ``log_prob``, ``prob``, ``bits_per_dim`` and ``sample`` take ``label=``.

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
import tensorflow as tf
import rflow_tf
from rflow_tf import export, models

# A tiny model of 4x4 images (a trained one has its EMA weights swapped in first).
model = models.ResidualFlow(models.FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,),
                                              hidden_channels=4, fc_end=False, logdet="exact"))
x = rflow_tf.data.dequantize(tf.zeros([2, 4, 4, 1], tf.uint8), 8, seed=[0, 1])
model.initialize(x)
export.save(model, "saved_models/tiny")
dist = rflow_tf.load("saved_models/tiny")        # a TransformedDistribution
lp = dist.log_prob(x)                            # [2]; dist.sample(2, seed=[1, 2]) samples

# Without rflow_tf:
import tensorflow as tf
obj = tf.saved_model.load("saved_models/tiny")
imgs = obj.sample(2, 0.8, [1, 2])
bpd = obj.bits_per_dim(tf.zeros([2, 4, 4, 1], tf.uint8))
assert imgs.shape == (2, 4, 4, 1) and bpd.shape == (2,) and lp.shape == (2,)
```
"""

import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import models as rmodels
from rflow_tf.export_format import (
    DEFAULT_SEED,
    EXACT_MAX_DIMS,
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    ExportError,
    ExportNotFoundError,
    InputDtypeError,
    InputShapeError,
    LabelError,
    NotAnExportError,
    check_seed,
    is_export,
    load_metadata,
)
from rflow_tf.export_module import ExportModule, export_metadata
from rflow_tf.loading import LoadedFlow, load

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
    "LabelError",
    "EXACT_MAX_DIMS",
    "DEFAULT_SEED",
    "METADATA_FILE",
    "FORMAT",
    "FORMAT_VERSION",
]

_LOGDET_CHOICES = ("auto", "exact", "unbiased", "truncated")
_DEQUANTIZATIONS = ("uniform", "midpoint")


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _resolve_logdet(logdet, cfg):
    if logdet not in _LOGDET_CHOICES:
        raise ValueError(f"logdet must be one of {_LOGDET_CHOICES}, got {logdet!r}")
    if logdet == "auto":
        return "exact" if cfg.num_dims <= EXACT_MAX_DIMS else "unbiased"
    return logdet


def copy_weights(src, dst):
    """Assigns the variables of the model ``src`` to those of ``dst``, a model
    of the same configuration, in order (what :func:`save` does to the model
    it rebuilds for export).

    Args:
      src: the model whose weights are copied.
      dst: a model with variables of the same shapes and dtypes, in the same order.

    Raises:
      ExportError: the variables do not match (count, shape or dtype).

    Example:
    ```python
    import numpy as np
    from rflow_tf.config import FlowConfig
    from rflow_tf.export import ExportError, copy_weights
    from rflow_tf.models import ResidualFlow

    cfg = FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4, fc_end=False)
    trained, rebuilt = ResidualFlow(cfg), ResidualFlow(cfg)  # two random initialisations
    copy_weights(trained, rebuilt)
    assert all(np.array_equal(a, b) for a, b in zip(trained.variables, rebuilt.variables))
    try:
        copy_weights(trained, ResidualFlow(cfg.replace(hidden_channels=8)))
    except ExportError as error:
        assert "does not match" in str(error)
    else:
        raise AssertionError("weights of another shape were copied")
    ```
    """
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
    import json
    import tensorflow as tf
    from rflow_tf import export, models

    flow = models.ResidualFlow(models.FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,),
                                                 hidden_channels=4, fc_end=False, logdet="exact"))
    flow.initialize(tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1]))
    ...                                   # train; swap in the EMA weights
    export.save(flow, "saved_models/tiny", extra_metadata={"test_bpd": 1.9})
    meta = export.load_metadata("saved_models/tiny")      # the export's metadata.json
    assert meta["extra"] == {"test_bpd": 1.9} and export.is_export("saved_models/tiny")
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
    seed = check_seed(seed, "seed")
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
    copy_weights(model, export_model)
    for layer in export_model.lipschitz_layers():  # frozen weights: no upkeep in the graphs
        layer.auto_update = False

    meta = export_metadata(
        model,
        n_bits=n_bits,
        logdet=eval_logdet,
        seed=seed,
        dequantization=dequantization,
        extra_metadata=extra_metadata,
    )

    module = ExportModule(export_model, meta, seed, dequantization)
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
        module.cleanup()
    return path
