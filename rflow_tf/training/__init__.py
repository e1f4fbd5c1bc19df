"""Training as a library: ``Trainer(config, options).fit()``, usable in a notebook.

* ``options``: :class:`TrainingOptions` (every non-architecture setting,
  declared once with its flag, checked on construction), :func:`check_flags`,
  :class:`UsageError`, :class:`TrainingDivergedError`;
* ``run_spec``: :func:`flow_config_for` (the FlowConfig a run of the options
  trains), :func:`resolve_run` (both into a :class:`RunSpec` and its typed
  :class:`RunSettings`);
* ``trainer``: :class:`Trainer` with ``fit`` (alias ``train``), ``evaluate``,
  ``sample``, ``export``, ``ema_weights``: a loop over the parts below;
* the parts of a run: ``run_data`` (:class:`RunData`, its pipelines),
  ``initialization`` (a fresh model initialised from its first batch), ``ema``
  (:class:`EMAWeights`), ``checkpoints`` (:class:`Checkpointer`),
  ``evaluation`` (:class:`Evaluator`), ``sampling`` (:class:`Sampler`, :func:`class_sample_grid`),
  ``exporting`` (:class:`Exporter`), ``metrics`` (:class:`MetricsWindow`,
  progress lines), ``run_config`` (``config.json``), ``results`` (the result
  dict, its final line, ``results.json``), ``hooks`` (:class:`TrainingHook`);
* ``steps``: the compiled distributed training / evaluation steps, the run of
  a training step and the optimiser;
* ``checkpoints``: the run-directory lock, checkpoint recovery and saving;
* ``distribute``: strategies, data sharding, the multi-worker step check and
  watchdog.

``train/main.py`` is the command line over this package (flags ->
(FlowConfig, TrainingOptions) -> Trainer).

Example:
```python
import os
from rflow_tf.training import Trainer, TrainingOptions, flow_config_for

# One step of batch 4 on the digits, evaluated on 8 test images, no export.
options = TrainingOptions(dataset="digits", preset="tiny", steps=1, batch_size=4,
                          eval_examples=8, n_sample_images=4, export_dir="", out="run")
config = flow_config_for(options, n_blocks=(1,), hidden_channels=4, fc_end=False,
                         n_exact_terms_eval=2)             # or None: the preset's
trainer = Trainer(config, options)
result = trainer.fit()            # {"test_bpd": ..., "step": 1, ...}
trainer.sample("run/grid.png", n=4)
assert result["step"] == 1 and result["test_bpd"] > 0 and os.path.exists("run/grid.png")
```
"""

from rflow_tf.training.checkpoints import (
    Checkpointer,
    RunDirLock,
    RunDirLockedError,
    checkpoint_candidates,
    remove_stale_temp_checkpoints,
    restore_newest,
)
from rflow_tf.training.distribute import (
    ProgressWatchdog,
    WorkerLostError,
    configure_cpu_devices,
    distribute_dataset,
    make_strategy,
)
from rflow_tf.training.ema import EMAWeights
from rflow_tf.training.evaluation import Evaluator
from rflow_tf.training.exporting import Exporter
from rflow_tf.training.hooks import TrainingHook
from rflow_tf.training.metrics import MetricsWindow
from rflow_tf.training.options import (
    ARCHITECTURE_FLAGS,
    FLAG_CONSTRAINTS,
    TASKS,
    TrainingDivergedError,
    TrainingOptions,
    UsageError,
    check_flags,
)
from rflow_tf.training.run_data import RunData
from rflow_tf.training.run_spec import RunSettings, RunSpec, flow_config_for, resolve_run
from rflow_tf.training.sampling import Sampler, class_sample_grid
from rflow_tf.training.steps import (
    LinearWarmup,
    PreReducedAdam,
    make_dequantizer,
    make_eval_step,
    make_optimizer,
    make_train_step,
    trained_variables,
    variable_value,
    write_scalar,
)
from rflow_tf.training.trainer import Trainer

__all__ = [
    "Trainer",
    "TrainingHook",
    "RunData",
    "EMAWeights",
    "Checkpointer",
    "Evaluator",
    "Sampler",
    "class_sample_grid",
    "Exporter",
    "MetricsWindow",
    "variable_value",
    "TrainingOptions",
    "flow_config_for",
    "resolve_run",
    "RunSpec",
    "RunSettings",
    "TASKS",
    "UsageError",
    "TrainingDivergedError",
    "WorkerLostError",
    "FLAG_CONSTRAINTS",
    "ARCHITECTURE_FLAGS",
    "check_flags",
    "make_train_step",
    "make_eval_step",
    "make_optimizer",
    "make_dequantizer",
    "trained_variables",
    "LinearWarmup",
    "PreReducedAdam",
    "write_scalar",
    "make_strategy",
    "configure_cpu_devices",
    "distribute_dataset",
    "ProgressWatchdog",
    "RunDirLock",
    "RunDirLockedError",
    "checkpoint_candidates",
    "remove_stale_temp_checkpoints",
    "restore_newest",
]
