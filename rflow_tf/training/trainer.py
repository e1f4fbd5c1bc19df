"""Trainer: owns a run (strategy, model, optimiser, EMA, checkpoints, data, logs)
and runs fit / evaluate / sample / export over the parts of training/."""

import datetime
import math
import os
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from rflow_tf import layers as rlayers
from rflow_tf import models
from rflow_tf.training.checkpoints import Checkpointer, RunDirLock
from rflow_tf.training.distribute import (
    PEER_LOST_ERRORS,
    ProgressWatchdog,
    check_workers_agree_on_step,
    make_strategy,
    task_of,
    worker_lost_error,
)
from rflow_tf.training.ema import EMAWeights
from rflow_tf.training.evaluation import Evaluator
from rflow_tf.training.exporting import Exporter
from rflow_tf.training.hooks import loss_hook
from rflow_tf.training.initialization import initialize_from_batch
from rflow_tf.training.metrics import (
    MetricsWindow,
    format_duration,
    learned_orders_line,
    lipschitz_scalars,
)
from rflow_tf.training.options import TrainingDivergedError, TrainingOptions, UsageError
from rflow_tf.training.results import final_line, run_result, write_results
from rflow_tf.training.run_config import check_run_config, write_run_config
from rflow_tf.training.run_data import RunData
from rflow_tf.training.run_spec import resolve_run
from rflow_tf.training.sampling import Sampler, step_sample_path
from rflow_tf.training.steps import (
    make_dequantizer,
    make_optimizer,
    make_train_step,
    run_train_step,
    trained_variables,
    write_scalar,
)


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

    The run is made of parts: its data (:class:`RunData`), the EMA weights
    (:class:`EMAWeights`), the checkpoints (:class:`Checkpointer`), the
    evaluation (:class:`Evaluator`), the samples (:class:`Sampler`) and the
    export (:class:`Exporter`); :meth:`fit` is a loop over them. ``hooks``
    (:class:`rflow_tf.training.hooks.TrainingHook`, also ``trainer.hooks``
    until the training step is built) act at fixed points of the loop.

    Example:
    ```python
    from rflow_tf.config import FlowConfig
    from rflow_tf.training import Trainer, TrainingOptions

    # One step of a one-block flow on the digits, 8 test images, no export
    # (config None: the preset's model). An affine-coupling block builds and
    # traces in seconds; a residual block trains the same way (the package's example).
    config = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1,), block="coupling",
                        hidden_channels=4, fc_end=False)
    options = TrainingOptions(preset="tiny", steps=1, batch_size=4, eval_examples=8,
                              n_sample_images=4, export_dir="", out="r")
    trainer = Trainer(config, options)
    result = trainer.fit()
    print(result["test_bpd"])
    assert result["step"] == 1 and result["test_bpd"] > 0
    ```
    """

    def __init__(self, config=None, options=None, strategy=None, check_data=True, hooks=()):
        options = TrainingOptions() if options is None else options
        self.options = options
        self.spec = resolve_run(config, options)
        self.settings = self.spec.settings
        self.flow_config = self.spec.flow
        self.run_dir = self.spec.run_dir
        self.strategy = strategy or make_strategy(options.strategy, options.cpu_devices)
        self.task_type, self.task_id, self.is_chief = task_of(self.strategy)
        self.hooks = list(hooks)
        # The data first: a missing dataset stops the run here, in seconds, before the
        # run directory, the model or the power iteration (DatasetNotFoundError).
        # check_data=False (exporting a checkpoint) looks for it only when it is used.
        self.run_data = RunData(self.spec, options, self.strategy)
        if check_data:
            self.log(f"data: {self.data_source.describe()}")
            for note in self.data_source.warnings:
                self.warn(note)
        # Multi-worker: only the chief writes into the run directory; the other
        # workers write their (identical) checkpoints and export into a local
        # temporary directory that they delete (TensorFlow's multi-worker guidance).
        self.multi_worker = self.task_type is not None
        self.tmp_root = (
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
        self.lock = RunDirLock(self.run_dir)
        run_config = check_run_config(self.spec, log=self.log)
        self.flow_config = self.spec.flow  # an older run's config resumes as it was
        if self.is_chief:
            self.lock.acquire()  # before writing anything into the run directory
            write_run_config(self.run_dir, run_config)
        self._build()
        self._train_step = None
        self._restored = False

    def _build(self):
        """The model, dequantiser, optimiser, EMA, step counters and the parts of
        the run, inside the strategy's scope."""
        settings, tick = self.settings, self.watchdog.tick
        keras.utils.set_random_seed(int(settings.seed))
        with self.strategy.scope():
            self.model = models.ResidualFlow(self.flow_config)
            self.dequantizer = make_dequantizer(settings.dequantization, self.flow_config)
            self.train_variables = trained_variables(self.model, self.dequantizer)
            self.optimizer = make_optimizer(settings.lr, settings.warmup_steps)
            self.optimizer.build(self.train_variables)
            self.ema = EMAWeights(self.model, self.train_variables, self.strategy)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.best_bpd = tf.Variable(
                np.inf, dtype=tf.float64, trainable=False, name="best_test_bpd"
            )
        extra = {} if self.dequantizer is None else {"dequantizer": self.dequantizer}
        self.checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            ema=self.ema.variables,
            step=self.step,
            best_bpd=self.best_bpd,
            **extra,
        )
        self.checkpointer = Checkpointer(
            self.checkpoint,
            self.run_dir,
            is_chief=self.is_chief,
            write_root=self.tmp_root,
            keep_best=self.options.keep_best,
            tick=tick,
            log=self.log,
            warn=self.warn,
        )
        self.writer = (
            tf.summary.create_file_writer(os.path.join(self.run_dir, "tb"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        self.evaluator = Evaluator(
            self.model,
            self.run_data,
            self.ema,
            dequantizer=self.dequantizer,
            tick=tick,
            log=self.log,
        )
        self.sampler = Sampler(
            self.model,
            self.ema,
            seed=settings.seed,
            n=self.options.n_sample_images,
            temperature=self.options.temperature,
            n_bits=self.flow_config.n_bits,
            write=self.is_chief,
        )
        self.exporter = Exporter(
            self.model,
            self.ema,
            is_chief=self.is_chief,
            tmp_root=self.tmp_root,
            tick=tick,
            log=self.log,
        )

    # --------------------------------------------------------------- helpers
    @property
    def ema_vars(self):
        """The EMA copies of the trained weights (:attr:`EMAWeights.variables`)."""
        return self.ema.variables

    @property
    def ckpt_dir(self):
        """The directory of the latest checkpoints this process writes."""
        return self.checkpointer.ckpt_dir

    def close(self):
        """Releases the run-directory lock (``train`` does so when it returns or raises).

        Non-chief workers also delete their temporary directory.

        Example: ``trainer.close()``.
        """
        self.lock.release()
        if self.tmp_root is not None:
            shutil.rmtree(self.tmp_root, ignore_errors=True)

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

    @property
    def data_source(self):
        """Where the run's images are read from (:class:`rflow_tf.data.DataSource`),
        located on first use; raises :class:`rflow_tf.data.DatasetNotFoundError`.

        Example: ``print(trainer.data_source.describe())``.
        """
        return self.run_data.source

    @data_source.setter
    def data_source(self, source):
        self.run_data.source = source

    @property
    def eval_name(self):
        """What the evaluation split is called in logs and results: "test" for the
        dataset's test set, "held-out" for a split of our own that is not the
        paper's test set (TFDS CelebA-HQ; see :class:`rflow_tf.data.DataSource`).

        Example: ``print(f"{trainer.eval_name} bits/dim: {trainer.evaluate()[0]:.3f}")``.
        """
        return self.evaluator.name

    @property
    def task(self):
        """The run's task: "density", "classification", "hybrid" or "conditional"."""
        return self.settings.task

    @property
    def train_step_fn(self):
        """The compiled training step (see :func:`make_train_step`), with the
        loss hooks of :attr:`hooks` installed when it is first built."""
        if self._train_step is None:
            settings = self.settings
            self._train_step = make_train_step(
                self.model,
                self.optimizer,
                self.strategy,
                self.ema.variables,
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
                loss_hook=loss_hook(self.hooks),
            )
        return self._train_step

    def ema_weights(self):
        """Context in which the model holds the EMA weights (see
        :meth:`EMAWeights.weights`): re-entrant, and on exit the training weights
        and their exact power-iteration state come back.

        Example: ``with trainer.ema_weights(): trainer.model.sample(16)``.
        """
        return self.ema.weights()

    # ------------------------------------------------------ restore or start
    def restore_latest(self):
        """Restores the newest checkpoint of the run that restores
        (:func:`restore_newest`) and returns its path; None if there is none.
        Non-chief workers read the chief's ``ckpt/`` without repairing it.

        Example: ``trainer.restore_latest() or print("nothing to restore")``.
        """
        path = self.checkpointer.restore_latest()
        if path:
            self.model.mark_lipschitz_current()  # resume with the saved estimates, exactly
            self._restored = True
            self.log(f"resumed from {path} at step {int(self.step.numpy())}")
        return path

    def restore_or_initialize(self, first_batch=None):
        """Restores the newest checkpoint of the run directory that restores
        (falling back past corrupt ones, see :func:`restore_newest`); without one,
        initialises the model from ``first_batch`` (uint8 images; ActNorm and the
        power iterations, :func:`initialize_from_batch`) and sets the EMA to the
        initial weights. Returns the restored checkpoint path or None.

        Example: ``trainer.restore_or_initialize(next(iter(trainer.run_data.train_dataset())))``.
        """
        if self._restored:
            return None
        latest = self.restore_latest()
        if latest:
            return latest
        if first_batch is None:
            raise UsageError(f"no checkpoint in {self.ckpt_dir}")
        initialize_from_batch(
            self.model, first_batch, self.flow_config, self.settings.seed, log=self.log
        )
        self.ema.reset()
        self._restored = True
        return None

    # ------------------------------------------------ evaluate, sample, export
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
        return self.evaluator.metrics(use_ema, training_estimator)

    def sample(self, path=None, n=None, temperature=None, use_ema=True):
        """Samples ``n`` images (EMA weights), writes a PNG grid to ``path``
        (default samples/step_XXXXXXX.png) and returns the path.

        Example: ``trainer.sample("/tmp/grid.png", n=16)``.
        """
        if path is None:
            path = step_sample_path(self.run_dir, int(self.step.numpy()))
        return self.sampler.sample(path, n=n, temperature=temperature, use_ema=use_ema)

    def export(self, export_dir=None):
        """Export hook: if ``rflow_tf.export`` exists, calls
        ``rflow_tf.export.save(model, export_dir)`` with the EMA weights
        swapped in. Returns the directory, or None when skipped.

        Example: ``trainer.export("saved_models/mnist")``.
        """
        return self.exporter.export(self.spec.export_dir if export_dir is None else export_dir)

    # -------------------------------------------------------------- training
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

        Example: ``result = trainer.train()``.
        """
        if self.is_chief:
            self.lock.acquire()
        try:
            with self.watchdog:
                return self._train()
        except PEER_LOST_ERRORS as e:
            if not self.multi_worker:
                raise
            step = int(self.step.numpy())
            raise worker_lost_error(e, self.task_type, self.task_id, step, self.run_dir) from None
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
        batches = self.run_data.train_batches(start)
        if not self._restored:
            # The first batch from a pipeline of its own: training must be the first
            # iteration of the batches (see RunData.train_dataset).
            self.restore_or_initialize(next(iter(self.run_data.train_dataset(0))))
        if self.multi_worker:
            check_workers_agree_on_step(
                self.strategy, start, self.task_type, self.task_id, self.run_dir
            )
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
        the hooks, its bookkeeping, the progress line and the scheduled work at a
        time. Returns (the last step, steps per second)."""
        total = int(self.settings.steps)
        it = iter(batches)
        step_fn = self.train_step_fn
        window = MetricsWindow(self.task)
        t_start = time.time()
        step, nan_streak = start, 0
        try:
            while step < total:
                out = run_train_step(step_fn, it, step, self.settings.jit_compile)
                step += 1
                self.watchdog.tick()
                for hook in self.hooks:
                    hook.after_step(self, step)
                nan_streak = self._count_non_finite(out, step, nan_streak)
                window.add(out)
                if step % self.options.log_every == 0 or step == total:
                    self._log_window(step, window)
                self._scheduled_work(step, nan_streak)
        except KeyboardInterrupt:
            if nan_streak == 0:
                path = self.checkpointer.save(int(self.step.numpy()))
                self.log(f"interrupted; saved {path}. Rerun the same command to resume.")
            raise
        del it  # release the input pipeline before evaluation and export
        self.watchdog.tick()
        elapsed = time.time() - t_start
        steps_per_sec = (step - start) / max(elapsed, 1e-9)
        self.log(
            f"trained {step - start} steps in {format_duration(elapsed)} "
            f"({steps_per_sec:.2f} steps/s)"
        )
        return step, steps_per_sec

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
                f"{self.checkpointer.latest or '(none yet)'}; try a lower "
                f"--lr, a smaller --grad_clip or more --warmup_steps."
            )
        return nan_streak

    def _log_window(self, step, window):
        """The progress line and the TensorBoard scalars of the steps in ``window``
        (a :class:`MetricsWindow`), which then starts over."""
        now = time.time()
        lr = (
            float(self.optimizer.learning_rate.numpy())
            if hasattr(self.optimizer.learning_rate, "numpy")
            else float(self.optimizer.learning_rate)
        )
        line, scalars = window.report(step, int(self.settings.steps), lr, now)
        self.log(line)
        scalars.update(lipschitz_scalars(self.model.lipschitz_layers(), self.flow_config.coeff))
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
            self.checkpointer.save(step)
        if step == total:
            return
        if step % settings.eval_every == 0:
            self._eval_and_sample(step, step % settings.sample_every == 0)
        elif step % settings.sample_every == 0:
            self.log(f"step {step}: samples written to {self.sample()}")

    def _eval_and_sample(self, step, do_sample):
        """Evaluates (and samples), keeps the best checkpoint and writes the
        scalars; returns (metrics of :meth:`evaluate_metrics`, sample path)."""
        path = None
        with self.ema.weights():  # one converged estimate for the evaluations and the samples
            m, scalars = self.evaluator.report(step)
            if do_sample and self.task != "classification":  # a classifier is no sampler
                path = self.sample()
                self.log(f"step {step}: samples written to {path}")
        name, tag = self.eval_name, self.evaluator.tag
        # Best checkpoint by test bits/dim; for classification by test error
        # (kept in the same variable, lower is better).
        criterion = 1.0 - m["accuracy"] if self.task == "classification" else m["bpd"]
        what = f"{name} error" if self.task == "classification" else f"{name} bits/dim"
        if math.isfinite(criterion) and criterion < float(self.best_bpd.numpy()):
            self.best_bpd.assign(criterion)
            best = self.checkpointer.save(step, best=True)
            self.log(f"step {step}: new best {what}, saved {best}")
        key = f"{tag}/best_error" if self.task == "classification" else f"{tag}/best_bpd"
        scalars[key] = float(self.best_bpd.numpy())
        self._summaries(step, scalars)
        return m, path

    def _summaries(self, step, scalars):
        with self.writer.as_default(step=int(step)):
            for name, value in scalars.items():
                write_scalar(name, float(value), int(step))
        self.writer.flush()

    def _finish(self, step, steps_per_sec):
        """The final evaluation and samples at ``step``, the result dict (also
        written to results.json) and the export."""
        metrics, samples = self._eval_and_sample(step, True)
        line = learned_orders_line(self.model.lipschitz_layers())
        if line:
            self.log(line)
        result = run_result(
            step,
            metrics,
            samples,
            task=self.task,
            data_source=self.data_source,
            best=float(self.best_bpd.numpy()),
            run_dir=self.run_dir,
            steps_per_sec=steps_per_sec,
            checkpoint=self.checkpointer.latest,
            learned_orders=rlayers.learned_orders(self.model.lipschitz_layers()),
        )
        self.log(final_line(result))
        if self.is_chief:
            write_results(self.run_dir, result)
        # Export hook: SavedModel with the EMA weights (rflow_tf.export.save).
        result["export_dir"] = self.export()
        return result
