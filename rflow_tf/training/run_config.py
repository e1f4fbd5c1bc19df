"""The run directory's ``config.json``: a run continues only the model it
trained, and says which training settings changed since."""

import json
import os

from rflow_tf import models
from rflow_tf.training.options import UsageError


def resumable_flow_config(old, flow_config):
    """The run directory's model configuration ``old`` (a dict), read with its
    own version's meaning, if it was written by an older
    :data:`rflow_tf.models.CONFIG_VERSION` and differs from ``flow_config``
    only in defaults that changed since; then the run resumes as the model it
    was. Else None.

    Args:
      old: the ``flow_config`` dict of the run directory's ``config.json``.
      flow_config: the :class:`~rflow_tf.config.FlowConfig` of the new run.

    Returns:
      The old :class:`~rflow_tf.config.FlowConfig`, or None.

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.training.run_config import resumable_flow_config

    new = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1,))
    old = {k: v for k, v in new.to_dict().items() if k not in ("init", "config_version")}
    old["config_version"] = 2  # written before init's default changed
    resumed = resumable_flow_config(old, new)
    assert resumed.init == "glorot" and new.init != "glorot"  # the model it was
    assert resumable_flow_config({**old, "hidden_channels": 7}, new) is None  # another model
    ```
    """
    try:
        old_cfg = models.FlowConfig.from_dict(dict(old))
    except (TypeError, ValueError):
        return None
    if old_cfg.config_version >= models.CONFIG_VERSION:
        return None
    versioned = {"config_version", *models.legacy_defaults(old_cfg.config_version)}
    new = flow_config.to_dict()
    if any(v != new.get(k) for k, v in old_cfg.to_dict().items() if k not in versioned):
        return None
    return old_cfg


def check_run_config(spec, *, log=print):
    """Checks the ``config.json`` of ``spec.run_dir`` (when there is one) against
    the run :class:`rflow_tf.training.RunSpec` ``spec``: raises UsageError for
    another model configuration or dequantisation, logs the training settings
    that changed. An older config version that differs only in defaults that
    changed since is resumed with its original architecture: ``spec.flow``
    becomes it.

    Args:
      spec: the run's :class:`~rflow_tf.training.RunSpec`.
      log: prints a line.

    Returns:
      The config to write (:func:`write_run_config`), a dict.

    Raises:
      UsageError: the directory holds a run of another model or dequantisation.

    Example:
    ```python
    import os
    from rflow_tf.training import TrainingOptions, UsageError, resolve_run
    from rflow_tf.training.run_config import check_run_config, write_run_config

    spec = resolve_run(None, TrainingOptions(dataset="digits", out="run"))
    os.makedirs(spec.run_dir)
    write_run_config(spec.run_dir, check_run_config(spec))  # a new run: its config
    lines = []
    check_run_config(resolve_run(None, TrainingOptions(dataset="digits", out="run", lr=1e-4)),
                     log=lines.append)  # resuming with another learning rate
    assert lines == ["training settings changed since the last run: lr"]
    other = resolve_run(spec.flow.replace(hidden_channels=8),
                        TrainingOptions(dataset="digits", out="run"))
    try:
        check_run_config(other)
    except UsageError as error:
        assert "differs in: hidden_channels" in str(error)
    else:
        raise AssertionError("another model resumed the run")
    ```
    """
    run_dir = spec.run_dir
    path = os.path.join(run_dir, "config.json")
    new = spec.config_json()
    if not os.path.exists(path):
        return new
    with open(path) as f:
        old = json.load(f)
    old_flow = resumable_flow_config(old.get("flow_config", {}), spec.flow)
    if old_flow is not None:
        log(
            f"{run_dir} holds a config_version {old_flow.config_version} run: resuming "
            f"it with its original architecture"
        )
        spec.flow = old_flow
        new["flow_config"] = old_flow.to_dict()
    elif old.get("flow_config") != new["flow_config"]:
        diff = sorted(
            k
            for k in set(old.get("flow_config", {})) | set(new["flow_config"])
            if old.get("flow_config", {}).get(k) != new["flow_config"].get(k)
        )
        raise UsageError(
            f"{run_dir} holds a run with a different model configuration "
            f"(differs in: {', '.join(diff)}). Use another --out/--run_name, or delete "
            f"the directory to start over."
        )
    old_deq = old.get("training", {}).get("dequantization", "uniform")
    if old_deq != new["training"]["dequantization"]:
        raise UsageError(
            f"{run_dir} holds a run trained with --dequantization={old_deq}; it "
            f"cannot continue with --dequantization="
            f"{new['training']['dequantization']}. Use another --out/--run_name."
        )
    changed = sorted(
        k
        for k in new["training"]
        if k != "dequantization" and old.get("training", {}).get(k) != new["training"][k]
    )
    if changed:
        log(f"training settings changed since the last run: {', '.join(changed)}")
    return new


def write_run_config(run_dir, config):
    """Writes ``config`` (a dict) to ``<run_dir>/config.json`` atomically (a
    temporary file, then renamed: a reader never sees half a file).

    Args:
      run_dir: an existing run directory.
      config: a JSON-serialisable dict.

    Example:
    ```python
    import json
    import os
    from rflow_tf.training.run_config import write_run_config

    os.makedirs("run")
    write_run_config("run", {"training": {"lr": 0.001}})
    with open("run/config.json") as f:
        assert json.load(f) == {"training": {"lr": 0.001}}
    assert os.listdir("run") == ["config.json"]
    ```
    """
    path = os.path.join(run_dir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
