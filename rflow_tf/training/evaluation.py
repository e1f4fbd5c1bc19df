"""Evaluating a run: the test metrics with the EMA weights, and the lines and
TensorBoard scalars that report them."""

import contextlib
import math

import tensorflow as tf

from rflow_tf.training.options import UsageError
from rflow_tf.training.steps import make_eval_step


class Evaluator:
    """Evaluates ``model`` on the test split of ``run_data``
    (:class:`rflow_tf.training.run_data.RunData`), with the EMA weights of
    ``ema`` (:class:`rflow_tf.training.ema.EMAWeights`) unless told otherwise.
    ``tick`` is called after each batch (the cluster's watchdog), ``log``
    prints a line.

    Args:
      model: a :class:`~rflow_tf.models.ResidualFlow`.
      run_data: the run's :class:`~rflow_tf.training.run_data.RunData`.
      ema: the model's :class:`~rflow_tf.training.ema.EMAWeights`.
      dequantizer: the variational dequantiser of the run, if any.
      tick: called after each batch.
      log: prints a line.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf import data
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training import EMAWeights, Evaluator, RunData, TrainingOptions, resolve_run

    options = TrainingOptions(dataset="digits", batch_size=8, eval_examples=16)
    config = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1,), block="coupling",
                        hidden_channels=4, fc_end=False)  # quick to build
    spec = resolve_run(config, options)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    run_data = RunData(spec, options, strategy)
    with strategy.scope():
        model = ResidualFlow(spec.flow)
        model.initialize(data.dequantize(next(iter(run_data.train_dataset())), 8))
        ema = EMAWeights(model, model.trainable_variables, strategy)
    metrics = Evaluator(model, run_data, ema).metrics()  # 16 test images
    assert metrics["count"] == 16 and metrics["bpd"] > 0 and metrics["bpd_stderr"] > 0
    ```
    """

    def __init__(self, model, run_data, ema, *, dequantizer=None, tick=lambda: None, log=print):
        self.model = model
        self.run_data = run_data
        self.ema = ema
        self.dequantizer = dequantizer
        self.tick, self.log = tick, log
        self._steps = {}

    @property
    def task(self):
        return self.run_data.settings.task

    @property
    def name(self):
        """What the evaluation split is called in logs and results: "test", or
        "held-out" for a split of our own (see :class:`rflow_tf.data.DataSource`)."""
        return self.run_data.source.eval_name

    @property
    def tag(self):
        """TensorBoard prefix of the evaluation scalars: "test" or "held_out"."""
        return self.name.replace("-", "_")

    def metrics(self, use_ema=True, training_estimator=False):
        """Test metrics over the test split (or ``--eval_examples``), EMA
        weights, evaluation estimator: a dict with ``count``, ``bpd`` and
        ``bpd_stderr`` (NaN for classification), and for classification /
        hybrid runs ``accuracy`` and ``cross_entropy`` (nats per image).

        Example: ``evaluator.metrics()["accuracy"]``.
        """
        task, settings = self.task, self.run_data.settings
        if training_estimator not in self._steps:
            self._steps[training_estimator] = make_eval_step(
                self.model,
                self.run_data.strategy,
                n_bits=self.run_data.spec.flow.n_bits,
                seed=settings.seed,
                task=task,
                training_estimator=training_estimator,
                dequantizer=self.dequantizer,
            )
        eval_step = self._steps[training_estimator]
        ctx = self.ema.weights() if use_ema else contextlib.nullcontext()
        sums = None
        with ctx:
            batches = self.run_data.distribute(self.run_data.test_dataset())
            for i, (x, mask) in enumerate(batches):
                out = [float(v) for v in eval_step(x, mask, tf.constant(i, tf.int64))]
                sums = out if sums is None else [a + b for a, b in zip(sums, out)]
                self.tick()
        if not sums or sums[2] == 0:
            raise UsageError(f"the test split of {self.run_data.spec.dataset!r} is empty")
        s, s2, n = sums[:3]
        mean = s / n
        var = max(s2 / n - mean * mean, 0.0)
        result = {"count": int(n), "bpd": mean, "bpd_stderr": math.sqrt(var / n)}
        if task == "classification":
            result["bpd"] = result["bpd_stderr"] = float("nan")
        if task in ("classification", "hybrid"):
            result["accuracy"] = sums[3] / n
            result["cross_entropy"] = sums[4] / n
        return result

    def report(self, step):
        """Evaluates after ``step`` and logs the result (with the training
        estimator's value beside it when the run trains with another log-det
        estimator than it evaluates with); returns ``(metrics, scalars)``.
        Call it with the EMA weights in place (``with ema.weights():``).

        Example: ``metrics, scalars = evaluator.report(step)``.
        """
        m = self.metrics()
        bpd, se, n = m["bpd"], m["bpd_stderr"], m["count"]
        parts, scalars = [], {}
        name, tag, task = self.name, self.tag, self.task
        if task != "classification":
            parts.append(f"{name} bits/dim {bpd:.4f} +- {se:.4f}")
            scalars.update({f"{tag}/bpd": bpd, f"{tag}/bpd_stderr": se})
        if task in ("classification", "hybrid"):
            parts.append(
                f"accuracy {m['accuracy']:.4f}, cross-entropy {m['cross_entropy']:.4f} nats"
            )
            scalars.update(
                {f"{tag}/accuracy": m["accuracy"], f"{tag}/cross_entropy": m["cross_entropy"]}
            )
        cfg, source = self.run_data.spec.flow, self.run_data.source
        terms = (
            ""
            if task == "classification"
            else f", {cfg.logdet_eval_mode} log-det, {cfg.n_exact_terms_eval} exact terms, "
            f"{self.run_data.settings.dequantization} dequantisation bound"
        )
        split = "" if source.paper_test_split else f" of {source.test_split}"
        self.log(f"step {step}: {'; '.join(parts)} ({n} images{split}, EMA weights{terms})")
        if task != "classification" and cfg.logdet_eval_mode != cfg.logdet:
            # Trained with another estimator (e.g. the biased truncated series):
            # report what that estimator says too, beside the true value above.
            t = self.metrics(training_estimator=True)
            bpd_t, se_t = t["bpd"], t["bpd_stderr"]
            self.log(
                f"step {step}: {name} bits/dim with the training estimator ({cfg.logdet}): "
                f"{bpd_t:.4f} +- {se_t:.4f} (true: {bpd:.4f})"
            )
            scalars[f"{tag}/bpd_training_estimator"] = bpd_t
        return m, scalars
