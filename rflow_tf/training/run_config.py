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

    Example: ``resumable_flow_config({"config_version": 1, ...}, spec.flow)``.
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
    becomes it. Returns the config to write (:meth:`write_run_config`).

    Example: ``write_run_config(spec.run_dir, check_run_config(spec))``.
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
    """Writes ``config`` (a dict) to ``<run_dir>/config.json`` atomically.

    Example: ``write_run_config("runs/x", spec.config_json())``.
    """
    path = os.path.join(run_dir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
