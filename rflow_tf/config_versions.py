"""The versions of :class:`rflow_tf.config.FlowConfig`'s meaning: a config
written before a default changed keeps the value it was built with."""

import numpy as np

#: Version of :class:`FlowConfig`'s meaning. A config (dict/JSON) written
#: without ``config_version`` is version 1; its missing fields take the
#: version-1 values below, so models saved before a default changed load and
#: train exactly as they were built.
CONFIG_VERSION = 4


#: Fields whose default changed, with their value up to each older version:
#: version 2 brought the reference's first block (``first_resblock``) and
#: squeeze order, version 3 the reference's initialisation (``init``) and
#: a separate evaluation estimator (``logdet_eval``; before, evaluation used
#: the training estimator, written here as :data:`SAME_AS_LOGDET`), version 4
#: mixed norms (``vnorms``, ``learn_p``; before, every linear map was
#: spectrally normalised, which is what "2222" and False mean).
SAME_AS_LOGDET = "same_as_logdet"


LEGACY_DEFAULTS = {
    1: {"first_resblock": False, "squeeze_order": "space_to_depth"},
    2: {"init": "glorot", "logdet_eval": SAME_AS_LOGDET},
    3: {"vnorms": "2222", "learn_p": False},
}


def legacy_defaults(version):
    """The values a config of ``version`` gives the fields it does not name
    (every field whose default changed after ``version``): the union of
    :data:`LEGACY_DEFAULTS` [v] over the versions v >= ``version``.

    Args:
      version: a config version, 1..:data:`CONFIG_VERSION`.

    Returns:
      A dict of field name -> value (empty for the current version).

    Example:
    ```python
    from rflow_tf.config_versions import CONFIG_VERSION, legacy_defaults

    assert legacy_defaults(1)["init"] == "glorot" and legacy_defaults(1)["first_resblock"] is False
    assert legacy_defaults(3) == {"vnorms": "2222", "learn_p": False}
    assert legacy_defaults(CONFIG_VERSION) == {}
    ```
    """
    out = {}
    for old, defaults in LEGACY_DEFAULTS.items():
        if version <= old:
            out.update(defaults)
    return out


def check_config_version(version):
    """Raises ValueError unless ``version`` is a config version this rflow_tf knows.

    Args:
      version: the value of a config's ``config_version``.

    Raises:
      ValueError: ``version`` is not an int (bools are not) in 1..:data:`CONFIG_VERSION`.

    Example:
    ```python
    from rflow_tf.config_versions import CONFIG_VERSION, check_config_version

    check_config_version(CONFIG_VERSION)
    try:
        check_config_version(CONFIG_VERSION + 1)  # written by a newer rflow_tf
    except ValueError as error:
        assert "written by a newer rflow_tf" in str(error)
    else:
        raise AssertionError("an unknown version was accepted")
    ```
    """
    if (
        isinstance(version, bool)
        or not isinstance(version, (int, np.integer))
        or not 1 <= version <= CONFIG_VERSION
    ):
        raise ValueError(
            f"FlowConfig.config_version must be an int in 1..{CONFIG_VERSION} "
            f"(the versions this rflow_tf knows), got {version!r}; a newer "
            f"version was written by a newer rflow_tf"
        )


def with_version_defaults(d, logdet_default):
    """A copy of the config dict ``d`` (without ``config_version``: version 1)
    whose missing fields take the values of its version (:func:`legacy_defaults`;
    :data:`SAME_AS_LOGDET` becomes its ``logdet``, or ``logdet_default``).

    Args:
      d: a config dict, as read from JSON.
      logdet_default: the current default of ``logdet``.

    Returns:
      A new dict with ``config_version`` set.

    Raises:
      ValueError: an unknown ``config_version`` (:func:`check_config_version`).

    Example:
    ```python
    from rflow_tf.config_versions import with_version_defaults

    old = with_version_defaults({"input_shape": [8, 8, 1]}, "unbiased")  # version 1
    assert old["config_version"] == 1 and old["init"] == "glorot"
    assert old["logdet_eval"] == "unbiased"  # evaluation used the training estimator
    named = with_version_defaults({"config_version": 2, "init": "reference"}, "unbiased")
    assert named["init"] == "reference" and "first_resblock" not in named  # fields it names stay
    ```
    """
    d = dict(d)
    version = d.setdefault("config_version", 1)
    check_config_version(version)
    for name, value in legacy_defaults(version).items():
        if value == SAME_AS_LOGDET:
            value = d.get("logdet", logdet_default)
        d.setdefault(name, value)
    return d
