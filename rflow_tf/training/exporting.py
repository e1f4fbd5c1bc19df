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

    Args:
      model: a :class:`~rflow_tf.models.ResidualFlow`.
      ema: its :class:`~rflow_tf.training.ema.EMAWeights`.
      is_chief: whether this worker writes the export directory.
      tmp_root: where another worker exports (deleted at once).
      tick: called after the export.
      log: prints a line.

    Example:
    ```python
    import tensorflow as tf
    import rflow_tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training import EMAWeights, Exporter

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():  # a one-block coupling flow: quick to build
        model = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), block="coupling",
                                        hidden_channels=4, fc_end=False))
        model.initialize(tf.random.stateless_uniform([8, 4, 4, 1], seed=[0, 1]))
        ema = EMAWeights(model, model.trainable_variables, strategy)
    exporter = Exporter(model, ema)
    assert exporter.export("") is None  # no export directory: skipped
    assert rflow_tf.export.is_export(exporter.export("exported"))  # the EMA weights
    ```
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
