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
#: The newest export format this rflow_tf reads and writes. An export records
#: the lowest version that describes it: 1 for a flow of p(x) (the signatures
#: take images only), 2 for a class-conditional flow of p(x | y) (the
#: signatures also take the label; the metadata adds ``conditional``,
#: ``condition_classes`` and ``condition_embedding``). A reader of format 1
#: refuses a version-2 export instead of misreading it.
FORMAT_VERSION = 2
#: The format version of an unconditional export (what every export was
#: before class-conditional flows); its metadata and signatures are unchanged.
UNCONDITIONAL_FORMAT_VERSION = 1
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

    Example:
    ```python
    import rflow_tf
    from rflow_tf.export import ExportNotFoundError

    try:
        rflow_tf.load("no/such/dir")
    except ExportNotFoundError as error:
        assert "does not exist" in str(error) and isinstance(error, FileNotFoundError)
    else:
        raise AssertionError("loaded a path that does not exist")
    ```
    """


class NotAnExportError(ExportError, ValueError):
    """The path exists but is not a flow exported by :func:`save` (an empty
    or unrelated directory, a plain file, a SavedModel of another model, or a
    newer export format). Also a ``ValueError``.

    Example:
    ```python
    import os
    import rflow_tf
    from rflow_tf.export import NotAnExportError

    os.makedirs("empty")
    try:
        rflow_tf.load("empty")
    except NotAnExportError as error:
        assert "it is empty" in str(error) and isinstance(error, ValueError)
    else:
        raise AssertionError("loaded an empty directory")
    ```
    """


class InputShapeError(ExportError, ValueError):
    """An input of the wrong shape was given to a loaded flow; the message
    names the expected shape. Also a ``ValueError``.

    Example:
    ```python
    import pathlib
    import tensorflow as tf
    import rflow_tf
    from rflow_tf.export import InputShapeError

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]  # the repository's export
    dist = rflow_tf.load(repo / "saved_models/digits")  # a model of 8x8x1 images
    try:
        dist.log_prob(tf.zeros([2, 28, 28, 1]))
    except InputShapeError as error:
        assert "[..., 8, 8, 1]" in str(error)
    else:
        raise AssertionError("28x28 images were accepted")
    ```
    """


class InputDtypeError(ExportError, TypeError):
    """An input of the wrong dtype was given to a loaded flow (e.g. uint8
    pixels to ``log_prob``); the message names the expected dtype. Also a
    ``TypeError``.

    Example:
    ```python
    import pathlib
    import tensorflow as tf
    import rflow_tf
    from rflow_tf.export import InputDtypeError

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]  # the repository's export
    dist = rflow_tf.load(repo / "saved_models/digits")
    try:
        dist.log_prob(tf.zeros([2, 8, 8, 1], tf.uint8))  # raw pixels: dequantise first
    except InputDtypeError as error:
        assert "got dtype uint8" in str(error)
    else:
        raise AssertionError("uint8 pixels were accepted")
    ```
    """


class LabelError(ExportError, ValueError):
    """A loaded flow got a label it cannot use: none for a class-conditional
    export (which models p(x | y) and needs ``label=y``), one for an
    unconditional export, or a class outside [0, ``condition_classes``). Also
    a ``ValueError``.

    Example:
    ```python
    import pathlib
    import tensorflow as tf
    import rflow_tf
    from rflow_tf.export import LabelError

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]  # the repository's export
    dist = rflow_tf.load(repo / "saved_models/digits")  # an unconditional model of p(x)
    try:
        dist.log_prob(tf.fill([2, 8, 8, 1], 0.5), label=3)
    except LabelError as error:
        assert "unconditional" in str(error)
    else:
        raise AssertionError("a label was accepted by an unconditional flow")
    ```
    """


# ----------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------


def check_seed(seed, name):
    """A required stateless seed as a list of two ints (what the metadata stores).

    Args:
      seed: a pair of ints (a tuple, list or int tensor of shape [2]).
      name: the argument's name, for the error message.

    Returns:
      ``[int, int]``.

    Raises:
      ValueError: ``seed`` is None or not two ints.

    Example:
    ```python
    from rflow_tf.export_format import check_seed

    assert check_seed((1, 2), "seed") == [1, 2]
    try:
        check_seed(None, "logdet_seed")
    except ValueError as error:
        assert "logdet_seed must be a stateless seed" in str(error)
    else:
        raise AssertionError("None was accepted as a seed")
    ```
    """
    if seed is None:
        raise ValueError(f"{name} must be a stateless seed of two ints, e.g. (1, 2); got None")
    return list(rbij.check_stateless_seed(seed, name))


def metadata_path(path):
    """The metadata file of the export in ``path``: ``path/assets/rflow_tf_export.json``.

    Args:
      path: the export's directory.

    Returns:
      The file's path, a string.

    Example:
    ```python
    import os
    from rflow_tf.export_format import METADATA_FILE, metadata_path

    assert metadata_path("export") == os.path.join("export", "assets", METADATA_FILE)
    ```
    """
    return os.path.join(path, "assets", METADATA_FILE)


def eval_config(meta, logdet=None):
    """The FlowConfig the export with metadata ``meta`` was traced with (or with
    ``logdet`` overridden): the trained config with the exported log-det
    estimator for both training and evaluation.

    Args:
      meta: the export's metadata (:func:`load_metadata`).
      logdet: a log-det estimator to use in place of the exported one.

    Returns:
      A :class:`~rflow_tf.config.FlowConfig`.

    Example:
    ```python
    import pathlib
    import rflow_tf
    from rflow_tf.export_format import eval_config, load_metadata

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]  # the repository's export
    meta = load_metadata(repo / "saved_models/digits")
    cfg = eval_config(meta)
    assert cfg.logdet == cfg.logdet_eval == meta["logdet"]
    assert eval_config(meta, logdet="exact").logdet == "exact"
    ```
    """
    cfg = rmodels.FlowConfig.from_dict(dict(meta["config"]))
    changes = {"logdet": logdet or meta["logdet"], "logdet_eval": logdet or meta["logdet"]}
    if meta.get("n_exact_terms_eval") is not None:
        changes["n_exact_terms_eval"] = int(meta["n_exact_terms_eval"])
    return cfg.replace(**changes)


def format_version_of(config):
    """The export format version :func:`rflow_tf.export.save` records for a
    flow of configuration ``config``: :data:`UNCONDITIONAL_FORMAT_VERSION` (1)
    for a model of p(x), :data:`FORMAT_VERSION` (2) for a class-conditional
    one (``config.condition_classes`` > 0), whose signatures take the label.

    Args:
      config: a :class:`~rflow_tf.config.FlowConfig`.

    Returns:
      An int.

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.export_format import format_version_of

    assert format_version_of(FlowConfig(input_shape=(4, 4, 1))) == 1
    assert format_version_of(FlowConfig(input_shape=(4, 4, 1), condition_classes=10)) == 2
    ```
    """
    return FORMAT_VERSION if config.condition_classes else UNCONDITIONAL_FORMAT_VERSION


def is_export(path):
    """True if ``path`` is a directory written by :func:`save` (it holds
    ``saved_model.pb`` and ``assets/rflow_tf_export.json``); reads no weights.

    Args:
      path: a path.

    Returns:
      A bool.

    Example:
    ```python
    import pathlib
    import rflow_tf
    from rflow_tf.export_format import is_export

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]  # the repository's export
    assert is_export(repo / "saved_models/digits")
    assert not is_export(repo / "saved_models") and not is_export("no/such/dir")
    ```
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

    Args:
      path: the export's directory.

    Returns:
      The metadata, a dict.

    Raises:
      ExportNotFoundError: ``path`` does not exist.
      NotAnExportError: ``path`` is not an export, or of a newer format.

    Example:
    ```python
    import pathlib
    import rflow_tf
    from rflow_tf.export_format import load_metadata

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]  # the repository's export
    meta = load_metadata(repo / "saved_models/digits")
    assert meta["n_bits"] == 8 and meta["image_shape"] == [8, 8, 1]
    ```
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
