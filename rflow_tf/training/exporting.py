"""Exporting a run's model as a SavedModel with the EMA weights."""

import importlib
import os
import shutil


class Exporter:
    """Exports ``model`` with the EMA weights of ``ema``
    (:class:`rflow_tf.training.ema.EMAWeights`) through
    ``rflow_tf.export.save``. Every worker of a cluster exports (so that no
    worker waits for another): the chief to the export directory, the others
    into ``tmp_root``, deleted at once. ``tick`` is called after the export
    (the cluster's watchdog).

    Example: ``Exporter(model, ema).export("saved_models/mnist")``.
    """

    def __init__(self, model, ema, *, is_chief=True, tmp_root=None, tick=lambda: None, log=print):
        self.model = model
        self.ema = ema
        self.is_chief = is_chief
        self.tmp_root = tmp_root
        self.tick, self.log = tick, log

    def export(self, export_dir):
        """If ``rflow_tf.export`` exists, calls ``rflow_tf.export.save(model,
        export_dir)`` with the EMA weights swapped in. Returns the directory, or
        None when skipped (no ``export_dir``, no ``rflow_tf.export``, or not
        the chief).

        Example: ``exporter.export("saved_models/mnist")``.
        """
        if not export_dir:
            return None
        if getattr(self.model.flow_config, "condition_classes", 0):
            self.log(
                "the SavedModel export does not take a label yet; skipping it for this "
                "class-conditional flow (its checkpoints hold the model)"
            )
            return None
        try:
            export = importlib.import_module("rflow_tf.export")
        except ImportError:
            self.log("rflow_tf.export is not available; skipping the SavedModel export")
            return None
        target = export_dir if self.is_chief else os.path.join(self.tmp_root, "export")
        with self.ema.weights():
            export.save(self.model, target)
        self.tick()
        if not self.is_chief:
            shutil.rmtree(target, ignore_errors=True)
            return None
        self.log(f"exported SavedModel (EMA weights) to {export_dir}")
        return export_dir
