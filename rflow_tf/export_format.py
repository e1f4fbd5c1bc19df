"""The format of a flow exported by :func:`rflow_tf.export.save`: its
identifiers, metadata file and seeds, the errors of saving and loading, and
reading the metadata back (:func:`load_metadata`, :func:`is_export`). See
:mod:`rflow_tf.export` for the whole format."""

import json
import math
import os

from rflow_tf import bijectors as rbij
from rflow_tf import models as rmodels

FORMAT = "rflow_tf.export"
FORMAT_VERSION = 1
METADATA_FILE = "rflow_tf_export.json"
#: Images with at most this many dimensions are exported with exact log-dets.
EXACT_MAX_DIMS = 256
#: Stateless seed of the exported log-det estimator and dequantisation noise.
DEFAULT_SEED = (20191, 9)
#: ln 2 (bits per nat).
LN2 = math.log(2.0)
_LOGDET_CHOICES = ("auto", "exact", "unbiased", "truncated")
_DEQUANTIZATIONS = ("uniform", "midpoint")


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


class ExportError(Exception):
    """Base class of every error raised by :mod:`rflow_tf.export`.

    Example:
    ```python
    import os
    import rflow_tf

    os.makedirs("not_an_export")      # a folder without a SavedModel
    for path in ("missing", "not_an_export"):
        try:
            dist = rflow_tf.load(path)
            raise AssertionError("loaded a non-export")
        except rflow_tf.export.ExportError as e:
            print("cannot load:", e)   # ExportNotFoundError, then NotAnExportError
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
# Metadata
# ----------------------------------------------------------------------------


def check_seed(seed, name):
    """A required stateless seed as a list of two ints.

    Example: ``check_seed((1, 2), "seed")  # [1, 2]``.
    """
    if seed is None:
        raise ValueError(f"{name} must be a stateless seed of two ints, e.g. (1, 2); got None")
    return list(rbij._check_stateless_seed(seed, name))  # pylint: disable=protected-access


def metadata_path(path):
    """The metadata file of the export in ``path``.

    Example: ``metadata_path("saved_models/mnist")  # '.../assets/rflow_tf_export.json'``.
    """
    return os.path.join(path, "assets", METADATA_FILE)


def eval_config(meta, logdet=None):
    """The FlowConfig the export with metadata ``meta`` was traced with (or with
    ``logdet`` overridden).

    Example: ``eval_config(load_metadata(path)).logdet``.
    """
    cfg = rmodels.FlowConfig.from_dict(dict(meta["config"]))
    changes = {"logdet": logdet or meta["logdet"], "logdet_eval": logdet or meta["logdet"]}
    if meta.get("n_exact_terms_eval") is not None:
        changes["n_exact_terms_eval"] = int(meta["n_exact_terms_eval"])
    return cfg.replace(**changes)


def is_export(path):
    """True if ``path`` is a directory written by :func:`save` (it holds
    ``saved_model.pb`` and ``assets/rflow_tf_export.json``).

    Example: ``rflow_tf.export.is_export("saved_models/digits")  # True``.
    """
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "saved_model.pb")) and os.path.isfile(
        metadata_path(path)
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
    if not os.path.isfile(metadata_path(path)):
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
        with open(metadata_path(path), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise NotAnExportError(
            f"{path!r}: unreadable export metadata ({metadata_path(path)}): {e}"
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
