"""Trainer: owns a run (strategy, model, optimiser, EMA, checkpoints, data, logs)
and runs fit / evaluate / sample / export."""

import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from rflow_tf import data, models
from rflow_tf import layers as rlayers
from rflow_tf.training.checkpoints import (
    RunDirLock,
    checkpoint_candidates,
    remove_stale_temp_checkpoints,
    restore_newest,
)
from rflow_tf.training.distribute import (
    _PEER_LOST_ERRORS,
    ProgressWatchdog,
    WorkerLostError,
    _task,
    distribute_dataset,
    make_strategy,
)
from rflow_tf.training.options import (
    TrainingDivergedError,
    TrainingOptions,
    UsageError,
    resolve_run,
)
from rflow_tf.training.steps import (
    _var,
    make_dequantizer,
    make_eval_step,
    make_optimizer,
    make_train_step,
    trained_variables,
    write_scalar,
)


class _InjectedCrash(RuntimeError):
    """Testing aid (--inject_crash_step): an abrupt stop with nothing saved, like a kill."""


class FaultInjection:
    """Testing aid: the faults a run's options ask for. ``nan_steps`` (text
    "2,5") are steps whose loss is replaced by NaN (``--inject_nan_steps``);
    after ``crash_step`` (``--inject_crash_step``, 0: never) training stops
    abruptly, saving nothing, like a kill. A run without them injects nothing.

    Example:
    ```python
    faults = FaultInjection("2", 0)
    float(faults.loss_poison(2))      # nan: step 2's loss becomes NaN
    ```
    """

    def __init__(self, nan_steps="", crash_step=0):
        self.nan_steps = {int(s) for s in str(nan_steps).split(",") if s.strip()}
        self.crash_step = int(crash_step)

    def loss_poison(self, step):
        """The value added to the loss of ``step``: NaN for a step to poison, else 0.

        Example: ``step_fn(batch, tf.constant(k, tf.int64), faults.loss_poison(k + 1))``.
        """
        return tf.constant(np.nan if step in self.nan_steps else 0.0, tf.float32)

    def after_step(self, step):
        """Stops training abruptly (an exception) after the crash step.

        Example: ``FaultInjection(crash_step=3).after_step(3)  # raises``.
        """
        if step == self.crash_step:
            raise _InjectedCrash(f"injected crash after step {step}")


class MetricsWindow:
    """Sums of the training step's outputs (``loss``, ``grad_norm``, ``logdet``
    and the task's metrics) over the finite steps since the last progress line,
    and how many steps, finite or not, it holds.

    Example:
    ```python
    window = MetricsWindow("density")
    window.add({"ok": True, "loss": 3.0, "grad_norm": 1.0, "logdet": 0.5})
    window.means()["loss"]      # 3.0
    ```
    """

    #: The metrics of each task's training step besides loss, grad_norm and logdet.
    TASK_KEYS = {"density": (), "classification": ("xent", "acc"), "hybrid": ("bpd", "xent", "acc")}

    def __init__(self, task):
        self.task_keys = self.TASK_KEYS[task]
        self.reset(time.time())

    def reset(self, now):
        """Empties the window, which starts at time ``now``.

        Example: ``window.reset(time.time())``.
        """
        self.start, self.n_steps, self.n_ok = now, 0, 0
        self.sums = dict.fromkeys(("loss", "grad_norm", "logdet") + self.task_keys, 0.0)

    def add(self, out):
        """Counts a step with outputs ``out``, and sums them if the step was finite.

        Example: ``window.add(step_fn(batch, step, poison))``.
        """
        self.n_steps += 1
        if bool(out["ok"]):
            self.n_ok += 1
            for key in self.sums:
                self.sums[key] += float(out[key])

    def means(self):
        """The means of the finite steps' outputs (0 when there were none).

        Example: ``window.means()["grad_norm"]``.
        """
        return {key: value / max(self.n_ok, 1) for key, value in self.sums.items()}


def _fmt_time(seconds):
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Trainer:
    """Owns a run: strategy, model, optimizer, EMA, checkpoints, data and logs.

    ``Trainer(config, options)`` trains the :class:`rflow_tf.models.FlowConfig`
    ``config`` (None: the preset's, :func:`flow_config_for`) with the
    :class:`TrainingOptions` ``options`` (None: all defaults). It resolves
    the run (:func:`resolve_run`), creates the strategy (unless given),
    locates the data (:func:`rflow_tf.data.locate_image_dataset`: a missing
    dataset raises :class:`rflow_tf.data.DatasetNotFoundError` before anything
    is built or written; ``check_data=False`` defers this to the first use),
    builds everything inside ``strategy.scope()`` (optimizer slots created up
    front) and checks/writes ``config.json`` in the run directory.
    :meth:`fit` (alias :meth:`train`) restores the latest checkpoint or
    initialises ActNorm from the first batch, then runs the loop, minimising
    per example

        bits/dim = -(log p(x) - D n_bits ln 2) / (D ln 2)

    (or the classification / hybrid loss of ``options.task``);
    :meth:`evaluate`, :meth:`sample`, :meth:`export` and :meth:`ema_weights`
    are usable on their own. ``train/main.py`` is this class behind flags.

    Example:
    ```python
    from rflow_tf.training import Trainer, TrainingOptions
    trainer = Trainer(None, TrainingOptions(preset="tiny", steps=10, out="/tmp/r"))
    result = trainer.fit()
    print(result["test_bpd"])
    ```
    """

    def __init__(self, config=None, options=None, strategy=None, check_data=True):
        options = TrainingOptions() if options is None else options
        self.options = options
        self.spec = resolve_run(config, options)
        self.settings = self.spec.settings
        self.flow_config = self.spec.flow
        self.run_dir = self.spec.run_dir
        self.strategy = strategy or make_strategy(options.strategy, options.cpu_devices)
        self.task_type, self.task_id, self.is_chief = _task(self.strategy)
        # The data first: a missing dataset stops the run here, in seconds, before the
        # run directory, the model or the power iteration (DatasetNotFoundError).
        # check_data=False (exporting a checkpoint) looks for it only when it is used.
        self._data_source = None
        if check_data:
            self.log(f"data: {self.data_source.describe()}")
            for note in self.data_source.warnings:
                self.warn(note)
        # Multi-worker: only the chief writes into the run directory; the other
        # workers write their (identical) checkpoints and export into a local
        # temporary directory that they delete (TensorFlow's multi-worker guidance).
        self.multi_worker = self.task_type is not None
        self._tmp_root = (
            None
            if self.is_chief
            else tempfile.mkdtemp(prefix=f"rflow_tf_{self.task_type}_{self.task_id}_")
        )
        self.watchdog = ProgressWatchdog(
            float(options.worker_timeout) if self.multi_worker else 0.0,
            f"{self.task_type} {self.task_id} made no progress: another worker of the cluster "
            f"probably hangs or died. Restart every worker with the same command; training "
            f"resumes from the chief's last checkpoint in {os.path.join(self.run_dir, 'ckpt')}",
        )
        self.n_replicas = self.strategy.num_replicas_in_sync
        if self.settings.batch_size % self.n_replicas:
            raise UsageError(
                f"--batch_size={self.settings.batch_size} is not divisible by the "
                f"{self.n_replicas} replicas"
            )
        self.faults = FaultInjection(options.inject_nan_steps, options.inject_crash_step)
        self.lock = RunDirLock(self.run_dir)
        self._check_run_dir()

        keras.utils.set_random_seed(int(self.settings.seed))
        with self.strategy.scope():
            self.model = models.ResidualFlow(self.flow_config)
            self.dequantizer = make_dequantizer(self.settings.dequantization, self.flow_config)
            self.train_variables = trained_variables(self.model, self.dequantizer)
            self.optimizer = make_optimizer(self.settings.lr, self.settings.warmup_steps)
            self.optimizer.build(self.train_variables)
            self.ema_vars = [
                tf.Variable(
                    _var(v).read_value(),
                    trainable=False,
                    name="ema_" + getattr(v, "path", v.name).replace("/", "_").replace(":", "_"),
                )
                for v in self.train_variables
            ]
            # Power-iteration state (u, v, sigma): backed up while the EMA weights
            # are swapped in, so evaluation leaves the training state untouched.
            self.power_vars = [
                w
                for layer in self.model.lipschitz_layers()
                for w in (layer.u, layer.v, layer.sigma)
            ]
            self.power_backup = [
                tf.Variable(_var(w).read_value(), trainable=False) for w in self.power_vars
            ]
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.best_bpd = tf.Variable(
                np.inf, dtype=tf.float64, trainable=False, name="best_test_bpd"
            )
        extra = {} if self.dequantizer is None else {"dequantizer": self.dequantizer}
        self.checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            ema=self.ema_vars,
            step=self.step,
            best_bpd=self.best_bpd,
            **extra,
        )
        self.ckpt_dir = self._write_dir("ckpt")
        self.best_dir = self._write_dir("ckpt_best")
        if self.is_chief:
            for directory, prefix in ((self.ckpt_dir, "ckpt"), (self.best_dir, "best")):
                for path in remove_stale_temp_checkpoints(directory, prefix):
                    self.log(f"removed {path}, left by a save that was interrupted")
        self._make_managers()
        self.writer = (
            tf.summary.create_file_writer(os.path.join(self.run_dir, "tb"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        self._train_step = None
        self._eval_step = None
        self._sample_fn = None
        self._swap_fn = None
        self._in_ema = False  # inside ema_weights()
        self._restored = False

    # --------------------------------------------------------------- helpers
    def _make_managers(self):
        # Managers read the state file when built: rebuilt after a repair.
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir, max_to_keep=2)
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint,
            self.best_dir,
            max_to_keep=int(self.options.keep_best),
            checkpoint_name="best",
        )

    def close(self):
        """Releases the run-directory lock (``train`` does so when it returns or raises).

        Non-chief workers also delete their temporary directory.

        Example: ``trainer.close()``.
        """
        self.lock.release()
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)

    def log(self, msg):
        """Prints a timestamped line (chief only)."""
        if self.is_chief:
            print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)

    def warn(self, msg):
        """Prints a warning to stderr (chief only)."""
        if self.is_chief:
            print(
                f"[{datetime.datetime.now():%H:%M:%S}] WARNING: {msg}", file=sys.stderr, flush=True
            )

    def _write_dir(self, name):
        if self.is_chief:
            return os.path.join(self.run_dir, name)
        return os.path.join(self._tmp_root, name)

    def _resumable_flow_config(self, old):
        """The run directory's config, read with its own version's meaning, if
        it was written by an older :data:`rflow_tf.models.CONFIG_VERSION` and
        differs from this run's config only in defaults that changed since;
        then the run resumes as the model it was (and ``self.flow_config`` is
        set to it). Else None."""
        try:
            old_cfg = models.FlowConfig.from_dict(dict(old))
        except (TypeError, ValueError):
            return None
        if old_cfg.config_version >= models.CONFIG_VERSION:
            return None
        versioned = {"config_version", *models.legacy_defaults(old_cfg.config_version)}
        new = self.flow_config.to_dict()
        if any(v != new.get(k) for k, v in old_cfg.to_dict().items() if k not in versioned):
            return None
        self.log(
            f"{self.run_dir} holds a config_version {old_cfg.config_version} run: resuming "
            f"it with its original architecture"
        )
        self.flow_config = self.spec.flow = old_cfg
        return old_cfg

    def _check_run_dir(self):
        path = os.path.join(self.run_dir, "config.json")
        new = self.spec.config_json()
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            old_flow = self._resumable_flow_config(old.get("flow_config", {}))
            if old_flow is not None:
                new["flow_config"] = old_flow.to_dict()
            elif old.get("flow_config") != new["flow_config"]:
                diff = sorted(
                    k
                    for k in set(old.get("flow_config", {})) | set(new["flow_config"])
                    if old.get("flow_config", {}).get(k) != new["flow_config"].get(k)
                )
                raise UsageError(
                    f"{self.run_dir} holds a run with a different model configuration "
                    f"(differs in: {', '.join(diff)}). Use another --out/--run_name, or delete "
                    f"the directory to start over."
                )
            old_deq = old.get("training", {}).get("dequantization", "uniform")
            if old_deq != new["training"]["dequantization"]:
                raise UsageError(
                    f"{self.run_dir} holds a run trained with --dequantization={old_deq}; it "
                    f"cannot continue with --dequantization="
                    f"{new['training']['dequantization']}. Use another --out/--run_name."
                )
            changed = sorted(
                k
                for k in new["training"]
                if k != "dequantization" and old.get("training", {}).get(k) != new["training"][k]
            )
            if changed:
                self.log(f"training settings changed since the last run: {', '.join(changed)}")
        if self.is_chief:
            self.lock.acquire()  # before writing anything into the run directory
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(new, f, indent=2, sort_keys=True)
            os.replace(tmp, path)

    def _save(self, manager, step):
        path = manager.save(checkpoint_number=int(step))
        self.watchdog.tick()
        if not self.is_chief:  # every worker saves (collective); only the chief keeps it
            tf.io.gfile.rmtree(os.path.dirname(path))
        return path

    # ------------------------------------------------------------------ data
    @property
    def data_source(self):
        """Where the run's images are read from (:class:`rflow_tf.data.DataSource`),
        located on first use; raises :class:`rflow_tf.data.DatasetNotFoundError`.

        Example: ``print(trainer.data_source.describe())``.
        """
        if self._data_source is None:
            self._data_source = data.locate_image_dataset(
                self.spec.dataset, self.options.data_dir, download=self.options.download
            )
        return self._data_source

    @data_source.setter
    def data_source(self, source):
        self._data_source = source

    @property
    def eval_name(self):
        """What the evaluation split is called in logs and results: "test" for the
        dataset's test set, "held-out" for a split of our own that is not the
        paper's test set (TFDS CelebA-HQ; see :class:`rflow_tf.data.DataSource`).

        Example: ``print(f"{trainer.eval_name} bits/dim: {trainer.evaluate()[0]:.3f}")``.
        """
        return self.data_source.eval_name

    @property
    def _eval_tag(self):
        """TensorBoard prefix of the evaluation scalars: "test" or "held_out"."""
        return self.eval_name.replace("-", "_")

    @property
    def task(self):
        """The run's task: "density", "classification" or "hybrid"."""
        return self.settings.task

    def _train_dataset(self, start_step=0, input_context=None, batch_size=None):
        """The training batches from optimiser step ``start_step`` on. The stream is a
        function of the seed alone (seeded shuffles, flips keyed by batch number), so
        batch k is the same whether a run started at 0 or resumed at k. Every call
        builds a fresh pipeline, to be iterated once: a second iterator over the same
        pipeline gets another order (tf.data reshuffles each iteration; a run that took
        its ActNorm batch from the training pipeline resumed onto different batches).
        Classification and hybrid runs get (images, labels) with the reference's flips,
        random crops of padding ``settings.crop_padding`` (``--crop_padding``, default
        the reference's) and random shifts of up to ``settings.translate`` pixels
        (``--translate``, default 0: none, the meaning of runs from before the option).
        With an ``input_context`` (:meth:`_distributed_train_batches`) it is the pipeline
        of one worker: its own files, batches of ``batch_size`` (per replica), and the
        first ``start_step`` optimiser steps of all its replicas skipped."""
        settings = self.settings
        labelled = self.task != "density"
        aug = {}
        if labelled:  # the reference's flips; crop padding and shifts resolved by resolve_run
            aug = data.classification_augmentation(self.spec.dataset)
            aug["crop_padding"] = settings.crop_padding
            aug["translate"] = settings.translate
        ds = data.load_image_dataset(
            self.spec.dataset,
            "train",
            batch_size=batch_size or settings.batch_size,
            data_dir=self.options.data_dir,
            n_bits=self.flow_config.n_bits,
            shuffle=True,
            repeat=True,
            seed=int(settings.seed),
            download=self.options.download,
            drop_remainder=True,
            with_labels=labelled,
            input_context=input_context,
            **aug,
        )
        if settings.accumulate > 1:

            def micro_major(*t):  # [k, B, ...] -> [B, k, ...]
                out = tuple(tf.transpose(v, [1, 0] + list(range(2, v.shape.rank))) for v in t)
                return out if labelled else out[0]

            ds = ds.batch(settings.accumulate, drop_remainder=True).map(micro_major)
        if input_context is not None:  # each replica of this worker takes its own elements
            start_step *= input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return ds.skip(int(start_step)) if start_step else ds

    def _distributed_train_batches(self, start_step=0):
        """The distributed training batches from optimiser step ``start_step`` on.

        Data read from files that can be split between workers (Glow's TFRecords) is
        sharded by file: every worker builds its own pipeline over its own shards
        (``strategy.distribute_datasets_from_function``), so no worker reads another's
        files. Other data is sharded by element of identical global batches
        (:func:`distribute_dataset`).
        """
        if self.data_source.kind != "glow_tfrecords":
            return self._distribute(self._train_dataset(start_step))
        global_batch = int(self.settings.batch_size)

        def per_worker(ctx):
            return self._train_dataset(
                start_step,
                input_context=ctx,
                batch_size=ctx.get_per_replica_batch_size(global_batch),
            )

        return self.strategy.distribute_datasets_from_function(per_worker)

    def _test_dataset(self):
        bs = self.settings.batch_size
        h, w, c = self.flow_config.input_shape
        labelled = self.task != "density"
        ds = data.load_image_dataset(
            self.spec.dataset,
            "test",
            batch_size=bs,
            data_dir=self.options.data_dir,
            n_bits=self.flow_config.n_bits,
            shuffle=False,
            flip=False,
            repeat=False,
            download=self.options.download,
            with_labels=labelled,
        )
        if self.options.eval_examples and self.options.eval_examples > 0:
            ds = ds.unbatch().take(int(self.options.eval_examples)).batch(bs)

        def pad(x, y=None):
            n = tf.shape(x)[0]
            x = tf.ensure_shape(tf.pad(x, [[0, bs - n], [0, 0], [0, 0], [0, 0]]), [bs, h, w, c])
            if y is not None:
                x = (x, tf.ensure_shape(tf.pad(y, [[0, bs - n]]), [bs]))
            return x, tf.range(bs) < n

        return ds.map(pad)

    def _distribute(self, ds):
        return distribute_dataset(self.strategy, ds)

    # ------------------------------------------------------------ components
    @property
    def train_step_fn(self):
        """The compiled training step (see :func:`make_train_step`)."""
        if self._train_step is None:
            settings = self.settings
            self._train_step = make_train_step(
                self.model,
                self.optimizer,
                self.strategy,
                self.ema_vars,
                global_batch_size=settings.batch_size,
                accumulate=settings.accumulate,
                n_bits=self.flow_config.n_bits,
                grad_clip=settings.grad_clip,
                ema_decay=settings.ema_decay,
                seed=settings.seed,
                jit_compile=settings.jit_compile,
                step_var=self.step,
                task=self.task,
                hybrid_lambda=settings.hybrid_lambda_value,
                dequantizer=self.dequantizer,
                label_smoothing=settings.label_smoothing or 0.0,
            )
        return self._train_step

    def _swap_ema(self, entering):
        if self._swap_fn is None:

            def swap(a, b):
                tmp = tf.identity(a)
                a.assign(b)
                b.assign(tmp)
                return tf.constant(True)

            def copy(dst, src):
                return dst.assign(src)

            @tf.function
            def swap_all(entering):
                update = self.strategy.extended.update
                if entering:  # keep the power-iteration state of the training weights
                    for b, w in zip(self.power_backup, self.power_vars):
                        update(b, copy, args=(_var(w),), group=False)
                for v, e in zip(self.train_variables, self.ema_vars):
                    update(_var(v), swap, args=(e,), group=False)
                if not entering:
                    for w, b in zip(self.power_vars, self.power_backup):
                        update(_var(w), copy, args=(b,), group=False)

            self._swap_fn = swap_all
        self._swap_fn(entering)
        if not entering:  # the backed-up state is the estimate for the training weights
            self.model.mark_lipschitz_current()

    @contextlib.contextmanager
    def ema_weights(self):
        """Context in which the model holds the EMA weights (power iteration
        converged for them). On exit the training weights and their exact
        power-iteration state come back, so evaluating or sampling never
        changes the course of training.

        Re-entrant: within the context, a nested one changes nothing, so
        evaluation and sampling at one step share one converged estimate.

        Example: ``with trainer.ema_weights(): trainer.model.sample(16)``.
        """
        if self._in_ema:
            yield self.model
            return
        self._swap_ema(True)
        self._in_ema = True
        try:
            self.model.converge_lipschitz()
            yield self.model
        finally:
            self._in_ema = False
            self._swap_ema(False)

    def restore_latest(self):
        """Restores the newest checkpoint of the run that restores (:func:`restore_newest`)
        and returns its path; None if there is none. Non-chief workers read the chief's
        ``ckpt/`` without repairing it.

        Example: ``trainer.restore_latest() or print("nothing to restore")``.
        """
        directory = self.ckpt_dir if self.is_chief else os.path.join(self.run_dir, "ckpt")
        path = restore_newest(
            self.checkpoint, directory, "ckpt", log=self.log, warn=self.warn, repair=self.is_chief
        )
        if path:
            self.model.mark_lipschitz_current()  # resume with the saved estimates, exactly
            self._restored = True
            self._make_managers()
            self.log(f"resumed from {path} at step {int(self.step.numpy())}")
        return path

    def _check_workers_agree_on_step(self, step):
        """Multi-worker: every worker must resume at the same step (they all read the
        chief's ``ckpt/``); otherwise they would train different batches and wait for
        each other forever."""
        local = tf.constant([step], tf.int64)
        steps = self.strategy.gather(self.strategy.run(lambda: tf.identity(local)), axis=0)
        lo, hi = int(tf.reduce_min(steps)), int(tf.reduce_max(steps))
        if lo != hi:
            raise UsageError(
                f"the workers start at different steps ({lo} to {hi}; this is "
                f"{self.task_type} {self.task_id} at step {step}): every worker must read the "
                f"chief's checkpoints in {os.path.join(self.run_dir, 'ckpt')}, so --out must be "
                f"on a filesystem shared by all workers"
            )

    def restore_or_initialize(self, first_batch=None):
        """Restores the newest checkpoint of the run directory that restores
        (falling back past corrupt ones, see :func:`restore_newest`); without one,
        initialises ActNorm from ``first_batch`` (uint8 images), converges the
        power iterations and sets the EMA to the initial weights. Returns the
        restored checkpoint path or None.
        """
        if self._restored:
            return None
        latest = self.restore_latest()
        if latest:
            return latest
        if first_batch is None:
            raise UsageError(f"no checkpoint in {self.ckpt_dir}")
        if isinstance(first_batch, (tuple, list)):  # (images, labels)
            first_batch = first_batch[0]
        x = first_batch[:, 0] if first_batch.shape.rank == 5 else first_batch
        x = data.dequantize(
            x,
            self.flow_config.n_bits,
            seed=[int(self.settings.seed), 12345],
            dtype=self.model.flow_dtype,
        )
        start = time.time()
        self.log(
            "initialising ActNorm from the first batch and the Lipschitz estimates of "
            f"{len(self.model.lipschitz_layers())} layers (power iteration)"
        )
        self.model.initialize(x)
        self.model.converge_lipschitz(progress=self._progress_lines("power iteration", "layers"))
        self.log(f"initialised in {time.time() - start:.1f} s")
        for e, v in zip(self.ema_vars, self.train_variables):
            e.assign(_var(v).read_value())
        self._restored = True
        return None

    def _progress_lines(self, what, unit, every=30.0):
        """A ``progress(done, total)`` callback that logs, at most every
        ``every`` seconds and at the end, ``what: done/total unit`` with the
        rate and the time left."""
        start = last = time.time()

        def progress(done, total):
            nonlocal last
            now = time.time()
            if now - last < every and done < total:
                return
            last = now
            rate = done / max(now - start, 1e-9)
            self.log(
                f"{what}: {done}/{total} {unit} | {rate:.2f} {unit}/s | "
                f"ETA {_fmt_time((total - done) / max(rate, 1e-9))}"
            )

        return progress

    # ----------------------------------------------------------- evaluation
    def evaluate(self, use_ema=True, training_estimator=False):
        """Test bits/dim over the test split (or ``--eval_examples``) with the
        evaluation estimator (or the training one, ``training_estimator=True``).
        Returns ``(mean, standard error, count)``; the mean is NaN for
        ``--task=classification`` (no log-det is computed).
        :meth:`evaluate_metrics` also gives accuracy and cross-entropy.

        Example: ``bpd, se, n = trainer.evaluate()``.
        """
        m = self.evaluate_metrics(use_ema, training_estimator)
        return m["bpd"], m["bpd_stderr"], m["count"]

    def evaluate_metrics(self, use_ema=True, training_estimator=False):
        """Test metrics over the test split (or ``--eval_examples``), EMA
        weights, evaluation estimator: a dict with ``count``, ``bpd`` and
        ``bpd_stderr`` (NaN for classification), and for classification /
        hybrid runs ``accuracy`` and ``cross_entropy`` (nats per image).

        Example: ``trainer.evaluate_metrics()["accuracy"]``.
        """
        task = self.task
        if self._eval_step is None:
            self._eval_step = {}
        if training_estimator not in self._eval_step:
            self._eval_step[training_estimator] = make_eval_step(
                self.model,
                self.strategy,
                n_bits=self.flow_config.n_bits,
                seed=self.settings.seed,
                task=task,
                training_estimator=training_estimator,
                dequantizer=self.dequantizer,
            )
        eval_step = self._eval_step[training_estimator]
        ctx = self.ema_weights() if use_ema else contextlib.nullcontext()
        sums = None
        with ctx:
            for i, (x, mask) in enumerate(self._distribute(self._test_dataset())):
                out = [float(v) for v in eval_step(x, mask, tf.constant(i, tf.int64))]
                sums = out if sums is None else [a + b for a, b in zip(sums, out)]
                self.watchdog.tick()
        if not sums or sums[2] == 0:
            raise UsageError(f"the test split of {self.spec.dataset!r} is empty")
        s, s2, n = sums[:3]
        mean = s / n
        var = max(s2 / n - mean * mean, 0.0)
        result = {"count": int(n), "bpd": mean, "bpd_stderr": math.sqrt(var / n)}
        if task == "classification":
            result["bpd"] = result["bpd_stderr"] = float("nan")
        if task != "density":
            result["accuracy"] = sums[3] / n
            result["cross_entropy"] = sums[4] / n
        return result

    def sample(self, path=None, n=None, temperature=None, use_ema=True):
        """Samples ``n`` images (EMA weights), writes a PNG grid to ``path``
        (default samples/step_XXXXXXX.png) and returns the path.

        Example: ``trainer.sample("/tmp/grid.png", n=16)``.
        """
        n = int(n or self.options.n_sample_images)
        temperature = self.options.temperature if temperature is None else temperature
        if self._sample_fn is None or self._sample_fn[0] != (n, temperature):
            fn = tf.function(lambda seed: self.model.sample(n, temperature=temperature, seed=seed))
            self._sample_fn = ((n, temperature), fn)
        ctx = self.ema_weights() if use_ema else contextlib.nullcontext()
        with ctx:
            imgs = self._sample_fn[1](tf.constant([int(self.settings.seed), 777], tf.int64))
        if path is None:
            path = os.path.join(self.run_dir, "samples", f"step_{int(self.step.numpy()):07d}.png")
        if self.is_chief:
            data.save_image_grid(data.to_uint8_images(imgs, self.flow_config.n_bits).numpy(), path)
        return path

    def export(self, export_dir=None):
        """Export hook: if ``rflow_tf.export`` exists, calls
        ``rflow_tf.export.save(model, export_dir)`` with the EMA weights
        swapped in. Returns the directory, or None when skipped.

        Example: ``trainer.export("saved_models/mnist")``.
        """
        export_dir = self.spec.export_dir if export_dir is None else export_dir
        if not export_dir:
            return None
        try:
            export = importlib.import_module("rflow_tf.export")
        except ImportError:
            self.log("rflow_tf.export is not available; skipping the SavedModel export")
            return None
        # Every worker exports (the chief to export_dir, the others into their
        # temporary directory, deleted at once), so that no worker waits for another.
        target = export_dir if self.is_chief else os.path.join(self._tmp_root, "export")
        with self.ema_weights():
            export.save(self.model, target)
        self.watchdog.tick()
        if not self.is_chief:
            shutil.rmtree(target, ignore_errors=True)
            return None
        self.log(f"exported SavedModel (EMA weights) to {export_dir}")
        return export_dir

    # -------------------------------------------------------------- training
    def _summaries(self, step, scalars):
        with self.writer.as_default(step=int(step)):
            for name, value in scalars.items():
                write_scalar(name, float(value), int(step))
        self.writer.flush()

    def _lipschitz_stats(self):
        sigmas = np.array([float(layer.sigma.numpy()) for layer in self.model.lipschitz_layers()])
        if sigmas.size == 0:
            return {}
        coeff = self.flow_config.coeff
        return {
            "lipschitz/max_sigma": sigmas.max(),
            "lipschitz/mean_sigma": sigmas.mean(),
            "lipschitz/max_effective": np.minimum(sigmas, coeff).max(),
            **{
                f"norm_order/{name}": p
                for name, p in rlayers.learned_orders(self.model.lipschitz_layers()).items()
            },
        }

    def _log_learned_orders(self):
        orders = rlayers.learned_orders(self.model.lipschitz_layers())
        if orders:
            values = np.array(list(orders.values()))
            self.log(
                f"learned norm orders ({values.size}; min {values.min():.3f}, mean "
                f"{values.mean():.3f}, max {values.max():.3f}): "
                + ", ".join(f"{name}={p:.3f}" for name, p in orders.items())
            )

    def _eval_and_sample(self, step, do_sample):
        """Evaluates (and samples); returns (metrics of :meth:`evaluate_metrics`, sample path)."""
        with self.ema_weights():  # one converged estimate for the evaluations and the samples
            m, path, scalars = self._evaluate_and_sample_ema(step, do_sample)
        name, tag = self.eval_name, self._eval_tag
        # Best checkpoint by test bits/dim; for classification by test error
        # (kept in the same variable, lower is better).
        criterion = 1.0 - m["accuracy"] if self.task == "classification" else m["bpd"]
        what = f"{name} error" if self.task == "classification" else f"{name} bits/dim"
        if math.isfinite(criterion) and criterion < float(self.best_bpd.numpy()):
            self.best_bpd.assign(criterion)
            best = self._save(self.best_manager, step)
            self.log(f"step {step}: new best {what}, saved {best}")
        key = f"{tag}/best_error" if self.task == "classification" else f"{tag}/best_bpd"
        scalars[key] = float(self.best_bpd.numpy())
        self._summaries(step, scalars)
        return m, path

    def _evaluate_and_sample_ema(self, step, do_sample):
        """The evaluation and sampling part of :meth:`_eval_and_sample`, with the
        EMA weights in place; returns (metrics, sample path, scalars to log)."""
        m = self.evaluate_metrics()
        bpd, se, n = m["bpd"], m["bpd_stderr"], m["count"]
        parts, scalars = [], {}
        name, tag = self.eval_name, self._eval_tag
        if self.task != "classification":
            parts.append(f"{name} bits/dim {bpd:.4f} +- {se:.4f}")
            scalars.update({f"{tag}/bpd": bpd, f"{tag}/bpd_stderr": se})
        if self.task != "density":
            parts.append(
                f"accuracy {m['accuracy']:.4f}, cross-entropy {m['cross_entropy']:.4f} nats"
            )
            scalars.update(
                {f"{tag}/accuracy": m["accuracy"], f"{tag}/cross_entropy": m["cross_entropy"]}
            )
        cfg = self.flow_config
        terms = (
            ""
            if self.task == "classification"
            else f", {cfg.logdet_eval_mode} log-det, {cfg.n_exact_terms_eval} exact terms, "
            f"{self.settings.dequantization} dequantisation bound"
        )
        split = "" if self.data_source.paper_test_split else f" of {self.data_source.test_split}"
        self.log(f"step {step}: {'; '.join(parts)} ({n} images{split}, EMA weights{terms})")
        if self.task != "classification" and cfg.logdet_eval_mode != cfg.logdet:
            # Trained with another estimator (e.g. the biased truncated series):
            # report what that estimator says too, beside the true value above.
            bpd_t, se_t, _ = self.evaluate(training_estimator=True)
            self.log(
                f"step {step}: {name} bits/dim with the training estimator ({cfg.logdet}): "
                f"{bpd_t:.4f} +- {se_t:.4f} (true: {bpd:.4f})"
            )
            scalars[f"{tag}/bpd_training_estimator"] = bpd_t
        path = None
        if do_sample and self.task != "classification":  # a classifier is no sampler
            path = self.sample()
            self.log(f"step {step}: samples written to {path}")
        return m, path, scalars

    def fit(self):
        """Trains (or resumes) the run; the same as :meth:`train` (Keras' name).

        Example: ``result = Trainer(None, TrainingOptions(steps=5, out="/tmp/r")).fit()``.
        """
        return self.train()

    def train(self):
        """Runs (or resumes) training to ``steps``, evaluating, sampling and
        checkpointing on schedule, then the final evaluation, samples,
        results.json and the export hook. Returns a dict with ``step``,
        ``test_bpd``, ``test_bpd_stderr``, ``best_bpd``, ``samples``,
        ``run_dir``, ``steps_per_sec``.

        Raises TrainingDivergedError after ``--max_nan_steps`` consecutive
        non-finite steps (nothing is saved after the last good checkpoint).
        Multi-worker: raises WorkerLostError when a collective op fails
        because another worker is gone, and ends the process (exit status 4)
        when nothing progresses for ``--worker_timeout`` seconds.
        Holds the run-directory lock while it runs and releases it on return
        or on any exception.
        """
        if self.is_chief:
            self.lock.acquire()
        try:
            with self.watchdog:
                return self._train()
        except _PEER_LOST_ERRORS as e:
            if not self.multi_worker:
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            # The informative line ("Collective ops is aborted by: Socket closed", "... are
            # unhealthy ..."), not TensorFlow's "Graph execution error:" header.
            reason = next(
                (
                    ln
                    for ln in lines
                    if re.search(
                        r"aborted by|unhealthy|socket closed|connection|deadline", ln, re.IGNORECASE
                    )
                ),
                lines[0] if lines else "",
            )
            latest = (
                checkpoint_candidates(os.path.join(self.run_dir, "ckpt"))
                or ["none yet: a restart starts over"]
            )[0]
            raise WorkerLostError(
                f"{self.task_type} {self.task_id} lost another worker of the cluster at step "
                f"{int(self.step.numpy())} ({type(e).__name__}: {reason[:300]}). Restart every "
                f"worker with the same command; training resumes from the chief's last "
                f"checkpoint ({latest})."
            ) from None
        finally:
            self.close()

    def _train(self):
        """Restores or initialises the run, trains to ``settings.steps``, then the
        final evaluation, results.json and export; returns the result dict."""
        start, batches = self._prepare_training()
        if start < self.settings.steps:
            step, steps_per_sec = self._run_steps(start, batches)
        else:
            step, steps_per_sec = start, float("nan")
            self.log(f"already trained to step {step} (--steps={self.settings.steps}); evaluating")
        return self._finish(step, steps_per_sec)

    def _prepare_training(self):
        """Restores the newest checkpoint, or initialises from the first batch;
        returns (the step training starts from, its distributed batches)."""
        settings = self.settings
        if not self._restored:
            self.restore_latest()
        start = int(self.step.numpy()) if self._restored else 0
        batches = self._distributed_train_batches(start)
        if not self._restored:
            # The first batch from a pipeline of its own: training must be the first
            # iteration of the batches (see _train_dataset).
            self.restore_or_initialize(next(iter(self._train_dataset(0))))
        if self.multi_worker:
            self._check_workers_agree_on_step(start)
        self.log(
            f"run {self.spec.run_name}: dataset {self.spec.dataset} "
            f"{self.flow_config.input_shape}, preset {self.spec.preset}, "
            f"{self.model.count_params():,} parameters, {settings.dequantization} "
            f"dequantisation, {self.n_replicas} replica(s) "
            f"({type(self.strategy).__name__}), global batch {settings.batch_size} x "
            f"{settings.accumulate}, steps {start}->{settings.steps}, dir {self.run_dir}"
        )
        if self.is_chief:
            tf.io.gfile.makedirs(os.path.join(self.run_dir, "samples"))
        return start, batches

    def _run_steps(self, start, batches):
        """The training loop from step ``start`` to ``settings.steps``: one step,
        its bookkeeping, the progress line and the scheduled work at a time.
        Returns (the last step, steps per second)."""
        total = int(self.settings.steps)
        it = iter(batches)
        step_fn = self.train_step_fn
        window = MetricsWindow(self.task)
        t_start = time.time()
        step, nan_streak = start, 0
        try:
            while step < total:
                out = self._run_step(step_fn, it, step)
                step += 1
                self.watchdog.tick()
                self.faults.after_step(step)
                nan_streak = self._count_non_finite(out, step, nan_streak)
                window.add(out)
                if step % self.options.log_every == 0 or step == total:
                    self._log_window(step, window)
                self._scheduled_work(step, nan_streak)
        except KeyboardInterrupt:
            if nan_streak == 0:
                path = self._save(self.manager, int(self.step.numpy()))
                self.log(f"interrupted; saved {path}. Rerun the same command to resume.")
            raise
        del it  # release the input pipeline before evaluation and export
        self.watchdog.tick()
        elapsed = time.time() - t_start
        steps_per_sec = (step - start) / max(elapsed, 1e-9)
        self.log(
            f"trained {step - start} steps in {_fmt_time(elapsed)} ({steps_per_sec:.2f} steps/s)"
        )
        return step, steps_per_sec

    def _run_step(self, step_fn, batches, step):
        """Runs training step ``step + 1`` on the next batch of the iterator
        ``batches``; returns the step's outputs. An XLA compilation failure
        (``--jit_compile``) becomes a UsageError."""
        poison = self.faults.loss_poison(step + 1)
        try:
            return step_fn(next(batches), tf.constant(step, tf.int64), poison)
        except tf.errors.InvalidArgumentError as e:
            if self.settings.jit_compile and ("XLA" in str(e) or "compile" in str(e)):
                reason = next(
                    (
                        ln.strip()
                        for ln in str(e).splitlines()
                        if "unsupported" in ln or "compile-time" in ln
                    ),
                    str(e).splitlines()[0],
                )
                raise UsageError(
                    f"--jit_compile: XLA cannot compile the training step: {reason[:400]}"
                ) from None
            raise

    def _count_non_finite(self, out, step, nan_streak):
        """The number of consecutive skipped (non-finite) steps after ``step``, whose
        outputs are ``out``; warns about a skipped step and raises
        TrainingDivergedError after ``--max_nan_steps`` of them in a row."""
        if bool(out["ok"]):
            return 0
        nan_streak += 1
        self.warn(
            f"step {step}: non-finite loss or gradient (loss {float(out['loss'])}, grad norm "
            f"{float(out['grad_norm'])}); update skipped ({nan_streak} in a row)"
        )
        max_nan_steps = self.options.max_nan_steps
        if nan_streak >= int(max_nan_steps):
            raise TrainingDivergedError(
                f"training stopped at step {step}: {nan_streak} consecutive "
                f"non-finite steps (--max_nan_steps={max_nan_steps}). The "
                f"last good checkpoint is "
                f"{self.manager.latest_checkpoint or '(none yet)'}; try a lower "
                f"--lr, a smaller --grad_clip or more --warmup_steps."
            )
        return nan_streak

    def _log_window(self, step, window):
        """The progress line and the TensorBoard scalars of the steps in ``window``
        (a :class:`MetricsWindow`), which then starts over."""
        total = int(self.settings.steps)
        now = time.time()
        steps_per_sec = window.n_steps / max(now - window.start, 1e-9)
        lr = (
            float(self.optimizer.learning_rate.numpy())
            if hasattr(self.optimizer.learning_rate, "numpy")
            else float(self.optimizer.learning_rate)
        )
        means = window.means()
        if self.task == "density":
            what = f"train bpd {means['loss']:.4f}"
            scalars = {"train/bpd": means["loss"], "train/logdet": means["logdet"]}
        else:
            task_means = {k: means[k] for k in window.task_keys}
            what = f"train loss {means['loss']:.4f} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in task_means.items()
            )
            scalars = {
                "train/loss": means["loss"],
                **{f"train/{k}": v for k, v in task_means.items()},
            }
        self.log(
            f"step {step}/{total} | {what} | "
            f"lr {lr:.2e} | grad norm {means['grad_norm']:.3f} | "
            f"{steps_per_sec:.2f} steps/s | ETA "
            f"{_fmt_time((total - step) / max(steps_per_sec, 1e-9))}"
        )
        scalars.update(
            {
                "train/lr": lr,
                "train/grad_norm": means["grad_norm"],
                "train/skipped_steps": window.n_steps - window.n_ok,
                "perf/steps_per_sec": steps_per_sec,
            }
        )
        scalars.update(self._lipschitz_stats())
        self._summaries(step, scalars)
        window.reset(now)

    def _scheduled_work(self, step, nan_streak):
        """The latest checkpoint, evaluation and samples due after ``step`` (the
        last step's evaluation and samples are :meth:`_finish`'s)."""
        settings = self.settings
        total = int(settings.steps)
        # No periodic checkpoint in the middle of a run of skipped steps:
        # the latest checkpoint stays the last good step.
        if (step % settings.ckpt_every == 0 and nan_streak == 0) or step == total:
            self._save(self.manager, step)
        if step == total:
            return
        if step % settings.eval_every == 0:
            self._eval_and_sample(step, step % settings.sample_every == 0)
        elif step % settings.sample_every == 0:
            self.log(f"step {step}: samples written to {self.sample()}")

    def _finish(self, step, steps_per_sec):
        """The final evaluation and samples at ``step``, the result dict (also
        written to results.json) and the export."""
        metrics, samples = self._eval_and_sample(step, True)
        self._log_learned_orders()
        result = self._result(step, steps_per_sec, metrics, samples)
        if self.is_chief:
            with open(os.path.join(self.run_dir, "results.json"), "w") as f:
                json.dump(result, f, indent=2)
        # Export hook: SavedModel with the EMA weights (rflow_tf.export.save).
        result["export_dir"] = self.export()
        return result

    def _result(self, step, steps_per_sec, metrics, samples):
        """The result dict of a run that ended at ``step`` with the final
        ``metrics`` and ``samples``; logs the final line."""
        bpd, se = metrics["bpd"], metrics["bpd_stderr"]
        result = {
            "step": step,
            "task": self.task,
            # What "test" below is: the dataset's test split, or (TFDS CelebA-HQ) our own
            # held-out split, which is not the paper's test set.
            "eval_name": self.eval_name,
            "eval_split": self.data_source.test_split,
            "data_source": self.data_source.to_dict(),
            "test_bpd": bpd,
            "test_bpd_stderr": se,
            "best_bpd": float(self.best_bpd.numpy()),
            "samples": samples,
            "run_dir": self.run_dir,
            "steps_per_sec": steps_per_sec,
            "checkpoint": self.manager.latest_checkpoint,
            "learned_orders": rlayers.learned_orders(self.model.lipschitz_layers()),
        }
        if self.task != "density":
            result["test_accuracy"] = metrics["accuracy"]
            result["test_cross_entropy"] = metrics["cross_entropy"]
        if self.task == "classification":
            result["best_error"] = result.pop("best_bpd")
            self.log(
                f"final {self.eval_name} accuracy: {metrics['accuracy']:.4f}, cross-entropy "
                f"{metrics['cross_entropy']:.4f} (EMA weights, step {step}); best error "
                f"{result['best_error']:.4f}"
            )
        else:
            name = self.eval_name
            acc = f"; {name} accuracy {metrics['accuracy']:.4f}" if self.task == "hybrid" else ""
            split = "" if self.data_source.paper_test_split else f" ({self.data_source.test_split})"
            self.log(
                f"final {name} bits/dim: {bpd:.4f} +- {se:.4f} (EMA weights, step {step}){split}; "
                f"best {result['best_bpd']:.4f}{acc}; samples: {samples}"
            )
        return result
