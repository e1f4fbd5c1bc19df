"""The compiled distributed training and evaluation steps, the run of a training
step (an XLA compilation failure as a usage error) and the optimiser (Adam with
linear warm-up, gradients all-reduced before clipping)."""

import importlib
import importlib.util
import math

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from rflow_tf import classifier as rclf
from rflow_tf import data, tracing
from rflow_tf.bijectors import dequantization as rdeq
from rflow_tf.layers.lipschitz.upkeep import backing
from rflow_tf.optimizers import FusedAdam
from rflow_tf.training.options import TASKS, UsageError

_HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


_LN2 = math.log(2.0)


@keras.saving.register_keras_serializable(package="rflow_tf_train")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """lr(t) = lr * min(1, (t + 1) / warmup_steps), t = optimiser iterations.

    Args:
      lr: the learning rate after the warm-up.
      warmup_steps: the steps of the linear ramp (<= 0: none).

    Example:
    ```python
    import numpy as np
    from rflow_tf.training.steps import LinearWarmup

    schedule = LinearWarmup(1e-3, 4)  # keras.optimizers.Adam(schedule) uses it
    rates = [float(schedule(t)) for t in range(6)]
    assert np.allclose(rates, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert LinearWarmup(**schedule.get_config()).warmup_steps == 4
    ```
    """

    def __init__(self, lr, warmup_steps):
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        lr = tf.constant(self.lr, tf.float32)
        if self.warmup_steps <= 0:
            return lr
        frac = (tf.cast(step, tf.float32) + 1.0) / float(self.warmup_steps)
        return lr * tf.minimum(1.0, frac)

    def get_config(self):
        return {"lr": self.lr, "warmup_steps": self.warmup_steps}


class PreReducedAdam(FusedAdam):
    """:class:`~rflow_tf.optimizers.FusedAdam` that expects gradients already summed over replicas.

    The training step all-reduces the gradients itself so that the global
    gradient norm is clipped (and checked for NaN) identically on every
    replica; Keras' own all-reduce inside ``apply_gradients`` is therefore
    skipped. The update is Adam's: w <- w - lr m_hat / (sqrt(v_hat) + epsilon).

    Args: those of ``keras.optimizers.Adam``.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.training.steps import PreReducedAdam

    w = tf.Variable([1.0, -2.0])
    optimizer = PreReducedAdam(0.1, beta_1=0.9, beta_2=0.99, epsilon=1e-8)
    optimizer.apply_gradients([(tf.constant([0.5, -3.0]), w)])  # gradients as given
    assert np.allclose(w.numpy(), [0.9, -1.9])  # Adam's first step: lr * sign(g)
    ```
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def make_optimizer(lr, warmup_steps):
    """Adam(beta_1=0.9, beta_2=0.99, epsilon=1e-8) with :class:`LinearWarmup`.
    Call inside ``strategy.scope()`` and ``build`` it there.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training.steps import make_optimizer

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                        fc_end=False))   # its weights exist on construction
        opt = make_optimizer(1e-3, 1000)
        opt.build(model.trainable_variables)
    assert np.isclose(float(opt.learning_rate), 1e-6)    # warm-up: 1e-3 * 1 / 1000 at step 0
    ```
    """
    return PreReducedAdam(
        learning_rate=LinearWarmup(lr, warmup_steps), beta_1=0.9, beta_2=0.99, epsilon=1e-8
    )


def write_scalar(name, value, step):
    """Writes a TensorBoard scalar to the default summary writer.

    Uses ``tf.summary.scalar`` when the ``tensorboard`` package is installed,
    otherwise writes the same event (a float32 tensor with the "scalars"
    plugin metadata) with the core ``tf.summary.write``, so logs are
    readable by TensorBoard either way.

    Example:
    ```python
    with tf.summary.create_file_writer("tb").as_default():
        write_scalar("train/bpd", 1.23, step=10)
    ```
    """
    if _HAVE_TENSORBOARD:
        return tf.summary.scalar(name, value, step=step)
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    return tf.summary.write(
        name, tf.constant(value, tf.float32), step=step, metadata=metadata.SerializeToString()
    )


def _one_device(strategy):
    """Whether ``strategy`` runs one replica on one device with no collective
    all-reduce (a ``OneDeviceStrategy`` or the default strategy)."""
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    return strategy.num_replicas_in_sync == 1 and not isinstance(strategy, mirrored)


def _first(strategy, value):
    return strategy.experimental_local_results(value)[0]


#: The ``tf.Variable`` behind a Keras variable (a ``tf.Variable`` as it is): the
#: Lipschitz layers' helper under the name the training code and its users know.
variable_value = backing


def make_dequantizer(kind, flow_config):
    """None for ``kind="uniform"`` (the trainer adds uniform noise with
    :func:`rflow_tf.data.dequantize`), or a
    :class:`rflow_tf.bijectors.dequantization.VariationalDequantizer` for the images of
    ``flow_config`` (its default size: 4 MixLogCDF couplings, no attention).

    Args:
      kind: ``"uniform"`` or ``"variational"``.
      flow_config: the run's :class:`~rflow_tf.config.FlowConfig`.

    Returns:
      None, or a ``VariationalDequantizer``.

    Raises:
      UsageError: another ``kind``.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.training.steps import make_dequantizer

    config = FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,))
    assert make_dequantizer("uniform", config) is None
    dequantizer = make_dequantizer("variational", config)
    y, log_q = dequantizer.dequantize(tf.zeros([2, 4, 4, 1], tf.uint8), seed=[0, 1])
    assert y.shape == (2, 4, 4, 1) and log_q.shape == (2,)  # y in [0, 1/256) here
    ```
    """
    if kind == "uniform":
        return None
    if kind != "variational":
        raise UsageError(f"--dequantization must be 'uniform' or 'variational', got {kind!r}")
    return rdeq.VariationalDequantizer(
        tuple(flow_config.input_shape), n_bits=flow_config.n_bits, dtype=flow_config.dtype
    )


def trained_variables(model, dequantizer=None):
    """Every weight the optimiser trains: the model's, then the dequantiser's.

    Args:
      model: a :class:`~rflow_tf.models.ResidualFlow`.
      dequantizer: the run's variational dequantiser, or None.

    Returns:
      A list of variables.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training.steps import make_dequantizer, trained_variables

    config = FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), block="coupling",
                        hidden_channels=4, fc_end=False)
    model, dequantizer = ResidualFlow(config), make_dequantizer("variational", config)
    dequantizer.dequantize(tf.zeros([1, 4, 4, 1], tf.uint8), seed=[0, 1])  # builds its weights
    variables = trained_variables(model, dequantizer)
    assert variables[: len(model.trainable_variables)] == model.trainable_variables
    assert len(variables) == len(model.trainable_variables) + len(dequantizer.trainable_variables)
    ```
    """
    extra = list(dequantizer.trainable_variables) if dequantizer is not None else []
    return list(model.trainable_variables) + extra


def make_train_step(
    model,
    optimizer,
    strategy,
    ema_vars,
    *,
    global_batch_size,
    accumulate=1,
    n_bits=8,
    grad_clip=1.0,
    ema_decay=0.999,
    seed=0,
    jit_compile=False,
    converge=True,
    step_var=None,
    task="density",
    hybrid_lambda=None,
    dequantizer=None,
    label_smoothing=0.0,
    loss_hook=None,
):
    """The distributed training step, a ``tf.function(x, step)`` whose graph is
    optimised in one round at its first call
    (:func:`rflow_tf.tracing.in_one_optimizer_round`).

    Per replica (seed = fold_in([seed, step], replica id)), for each of
    ``accumulate`` micro-batches of uint8 images: dequantise, compute
    bits/dim with the training estimator, loss =
    compute_average_loss(bpd, global_batch_size) / accumulate, gradients.
    Then all-reduce (sum) the gradients and the loss, clip to the global norm
    ``grad_clip``; if the loss and the norm are finite, apply Adam and update
    the EMA ``e <- d e + (1 - d) w``, else skip
    the update. Finally run power iteration to convergence (``converge``)
    and increment ``step_var`` if given.

    ``jit_compile``: compile with XLA. With one replica on one device
    (:class:`tf.distribute.OneDeviceStrategy` or the default strategy) the
    whole step above is one XLA program (``tf.function(jit_compile=True)``),
    compiled at the first call and reused by the next ones; with several
    replicas each replica's forward and backward is compiled, the
    all-reduce, the update and the upkeep run in the graph.

    ``loss_hook``: None, or ``(loss, step) -> loss`` traced after the
    all-reduce, before the finiteness check, with the number of the step
    being trained (``step + 1``; see :mod:`rflow_tf.training.hooks`).

    ``dequantizer``: None (uniform noise) or a
    :class:`rflow_tf.bijectors.dequantization.VariationalDequantizer`; then the loss
    is its negative ELBO in bits/dim and its weights are trained too (the
    variables, and ``ema_vars``, are the model's followed by the
    dequantiser's: :func:`trained_variables`).

    ``x``: a distributed batch of uint8 images [B, H, W, C], or [B, k, H, W, C]
    with accumulation; for ``task`` "classification" or "hybrid" a pair
    (images, int labels [B] or [B, k]). Returns a dict of scalars: ``loss``
    (the mean training objective: bits/dim for "density", cross-entropy in
    nats for "classification", the hybrid loss of
    :func:`rflow_tf.classifier.hybrid_loss` with ``hybrid_lambda`` (a float)
    for "hybrid"; with ``label_smoothing`` eps its cross-entropy term is
    taken against the smoothed labels), ``grad_norm`` (before clipping), ``ok`` (update applied),
    ``logdet`` (mean total log-det per example; 0 for "classification",
    which never computes one), and for the labelled tasks ``bpd`` (hybrid),
    ``xent`` and ``acc`` (training batch means).

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training.distribute import distribute_dataset
    from rflow_tf.training.ema import EMAWeights
    from rflow_tf.training.steps import make_optimizer, make_train_step

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    images = np.random.default_rng(0).integers(0, 256, [8, 4, 4, 1], dtype=np.uint8)
    with strategy.scope():
        model = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                        fc_end=False))
        model.initialize(tf.cast(images, tf.float32) / 255)
        opt = make_optimizer(1e-3, 10)
        opt.build(model.trainable_variables)
        ema = EMAWeights(model, model.trainable_variables, strategy).variables
    ds = tf.data.Dataset.from_tensor_slices(images).batch(4)      # global batches of uint8
    dist_iter = iter(distribute_dataset(strategy, ds))
    step_fn = make_train_step(model, opt, strategy, ema, global_batch_size=4)
    out = step_fn(next(dist_iter), tf.constant(0, tf.int64))
    print({k: float(v) for k, v in out.items()})   # loss (bits/dim), grad_norm, ok, logdet
    assert bool(out["ok"]) and np.isfinite(float(out["loss"]))
    ```
    """
    variables = trained_variables(model, dequantizer)
    dtype = model.flow_dtype
    num_dims = float(model.num_dims)
    offset = num_dims * n_bits * _LN2
    k = int(accumulate)
    base_seed = tf.constant(int(seed), tf.int64)

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "hybrid" and hybrid_lambda is None:
        raise ValueError("task='hybrid' needs hybrid_lambda (a float)")
    labelled = task != "density"

    def batch_mean(v):
        return (
            tf.nn.compute_average_loss(tf.cast(v, tf.float32), global_batch_size=global_batch_size)
            / k
        )

    def micro(x_int, seed_pair, labels=None):
        seeds = tf.random.experimental.stateless_split(seed_pair, 2)
        metrics = {}
        with tf.GradientTape() as tape:
            if dequantizer is None:
                x, log_q = data.dequantize(x_int, n_bits, seed=seeds[0], dtype=dtype), 0.0
            else:
                x, log_q = dequantizer.dequantize(x_int, seeds[0])
            if task in ("density", "conditional"):
                cond = {"label": labels} if task == "conditional" else {}
                z, ld = model.forward_and_log_det(
                    x, training=True, seed=seeds[1], validate=False, **cond
                )
                lp = model.base_log_prob(z) + ld
                bpd = -(lp - offset - log_q) / (num_dims * _LN2)
                loss = batch_mean(bpd)
            else:
                if task == "classification":  # no log-det anywhere
                    logits = model.classify(x, training=True, validate=False)
                    lp, ld = None, tf.zeros([tf.shape(x)[0]], dtype)
                else:
                    lp, logits = model.log_prob_and_logits(
                        x, training=True, seed=seeds[1], validate=False
                    )
                    # the log-det alone, for the logs: log p(x) - log N(f(x))
                    ld = tf.zeros([tf.shape(x)[0]], dtype)
                    metrics["bpd"] = batch_mean(-(lp - offset) / (num_dims * _LN2))
                    lp = lp - offset  # log P(discrete x), nats
                per_example = rclf.hybrid_loss(
                    lp,
                    logits,
                    labels,
                    0.0 if task == "classification" else hybrid_lambda,
                    label_smoothing=label_smoothing,
                )
                loss = batch_mean(per_example)
                metrics["xent"] = batch_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=tf.cast(labels, tf.int64), logits=logits
                    )
                )
                metrics["acc"] = batch_mean(
                    tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(labels, tf.int64)), tf.float32)
                )
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]
        ld_mean = tf.reduce_sum(tf.cast(ld, tf.float32)) / float(global_batch_size * k)
        if labelled:
            return loss, grads, ld_mean, metrics
        return loss, grads, ld_mean

    # One replica on one device: XLA compiles the whole step (below); several
    # replicas: each replica's forward and backward, the all-reduce and the
    # update staying in the graph.
    whole_step_xla = bool(jit_compile) and _one_device(strategy)
    if jit_compile and not whole_step_xla:
        micro = tf.function(micro, jit_compile=True)

    classifier = task in ("classification", "hybrid")
    metric_names = (("bpd",) if task == "hybrid" else ()) + (("xent", "acc") if classifier else ())

    def micro_all(batch, i, seed_pair):
        """micro() of micro-batch i (None: no accumulation) -> (loss, grads, ld, metrics)."""
        x_int, labels = batch if labelled else (batch, None)
        if i is not None:
            x_int = x_int[:, i]
            labels = None if labels is None else labels[:, i]
            seed_pair = tf.random.experimental.stateless_fold_in(seed_pair, i)
        out = micro(x_int, seed_pair, labels) if labelled else micro(x_int, seed_pair)
        metrics = out[3] if labelled else {}
        return out[0], out[1], out[2], [metrics[m] for m in metric_names]

    def replica_fn(batch, step):
        ctx = tf.distribute.get_replica_context()
        seed_pair = tf.random.experimental.stateless_fold_in(
            tf.stack([base_seed, tf.cast(step, tf.int64)]), ctx.replica_id_in_sync_group
        )
        if k == 1:
            loss, grads, ld, metrics = micro_all(batch, None, seed_pair)
        else:

            def body(i, loss_acc, grads_acc, ld_acc, m_acc):
                l_i, g_i, ld_i, m_i = micro_all(batch, i, seed_pair)
                return (
                    i + 1,
                    loss_acc + l_i,
                    [a + b for a, b in zip(grads_acc, g_i)],
                    ld_acc + ld_i,
                    [a + b for a, b in zip(m_acc, m_i)],
                )

            init = (
                tf.constant(0),
                tf.constant(0.0),
                [tf.zeros(v.shape, v.dtype) for v in variables],
                tf.constant(0.0),
                [tf.constant(0.0) for _ in metric_names],
            )
            _, loss, grads, ld, metrics = tf.while_loop(lambda i, *_: i < k, body, init)
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        loss, ld, *metrics = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [loss, ld, *metrics])
        if loss_hook is not None:
            loss = loss_hook(loss, tf.cast(step, tf.int64) + 1)
        gnorm = tf.linalg.global_norm(grads)
        ok = tf.math.is_finite(loss) & tf.math.is_finite(gnorm)
        if grad_clip and grad_clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, grad_clip, use_norm=gnorm)
        return loss, gnorm, ok, ld, grads, metrics

    def apply_fn(grads):
        optimizer.apply_gradients(zip(grads, variables))

    def ema_update(e, w, weights):
        decay, rest = weights[e.dtype.name]
        return e.assign(decay * e + rest * tf.cast(w, e.dtype))

    @tf.function(jit_compile=whole_step_xla)
    def train_step(x, step):
        loss, gnorm, ok, ld, grads, metrics = strategy.run(replica_fn, args=(x, step))
        ok0 = _first(strategy, ok)

        def apply():
            strategy.run(apply_fn, args=(grads,))
            # decay and 1 - decay as one pair of constants per dtype, not per variable
            weights = {
                dtype.name: (tf.constant(ema_decay, dtype), tf.constant(1.0 - ema_decay, dtype))
                for dtype in {e.dtype for e in ema_vars}
            }
            for e, v in zip(ema_vars, variables):
                strategy.extended.update(
                    e, ema_update, args=(variable_value(v), weights), group=False
                )
            return tf.constant(True)

        tf.cond(ok0, apply, lambda: tf.constant(False))
        if converge:
            model.update_lipschitz()
        if step_var is not None:
            step_var.assign_add(1)
        out = {
            "loss": _first(strategy, loss),
            "grad_norm": _first(strategy, gnorm),
            "ok": ok0,
            "logdet": _first(strategy, ld),
        }
        out.update({m: _first(strategy, v) for m, v in zip(metric_names, metrics)})
        return out

    return tracing.in_one_optimizer_round(train_step)


def run_train_step(step_fn, batches, step, jit_compile=False):
    """Runs training step ``step + 1``: ``step_fn(batch, step)`` (a step of
    :func:`make_train_step`) on the next batch of the iterator ``batches``, and
    returns the step's outputs. With ``jit_compile`` (the step compiles with
    XLA, ``--jit_compile``), an XLA compilation failure becomes a
    :class:`~rflow_tf.training.UsageError` naming the reason.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training import UsageError
    from rflow_tf.training.steps import run_train_step

    def step_fn(batch, step):  # stands in for make_train_step(...)
        return {"loss": tf.reduce_mean(batch), "step": step}

    assert float(run_train_step(step_fn, iter([tf.ones([4])]), 0)["loss"]) == 1.0

    def uncompilable(batch, step):
        raise tf.errors.InvalidArgumentError(
            None, None, "XLA compilation failed:\\nop Foo unsupported on XLA_CPU_JIT")
    try:
        run_train_step(uncompilable, iter([tf.ones([4])]), 0, jit_compile=True)
    except UsageError as error:
        assert "XLA cannot compile the training step: op Foo unsupported" in str(error)
    else:
        raise AssertionError("an XLA compilation failure was not reported")
    ```
    """
    try:
        return step_fn(next(batches), tf.constant(step, tf.int64))
    except tf.errors.InvalidArgumentError as e:
        if jit_compile and ("XLA" in str(e) or "compile" in str(e)):
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


def make_eval_step(
    model, strategy, *, n_bits=8, seed=0, task="density", training_estimator=False, dequantizer=None
):
    """The distributed evaluation step ``(x, mask, batch_index) -> (sum bpd,
    sum bpd^2, count)`` over the masked examples, with the evaluation
    estimator (``logdet_eval``, ``n_exact_terms_eval`` = 20 exact terms; or
    the training estimator if ``training_estimator``) and fixed seeds (the
    same weights give the same result). With a variational ``dequantizer``
    (density task) the bits/dim are its bound, -(log p(y) - D n ln 2 -
    log q(u|x)) / (D ln 2) with one draw of u per image; else the uniform-noise
    bound.

    For ``task`` "classification" / "hybrid", ``x`` is a pair (images,
    labels) and the step returns ``(sum bpd, sum bpd^2, count, number
    correct, sum cross-entropy)``; for "classification" the bits/dim sums are
    0 (no log-det is computed).

    Args:
      model: a :class:`~rflow_tf.models.ResidualFlow`.
      strategy: the ``tf.distribute.Strategy`` it was built in.
      n_bits: bits per pixel of the images.
      seed: the int the evaluation seeds derive from.
      task: ``"density"``, ``"classification"`` or ``"hybrid"``.
      training_estimator: evaluate with the training log-det estimator.
      dequantizer: the run's variational dequantiser, or None (uniform noise).

    Returns:
      A ``tf.function`` ``(x, mask, batch_index) -> sums`` (see above), its
      graph optimised in one round at its first call
      (:func:`rflow_tf.tracing.in_one_optimizer_round`).

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training.steps import make_eval_step

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    images = np.random.default_rng(0).integers(0, 256, [4, 4, 4, 1], dtype=np.uint8)
    with strategy.scope():  # a one-block coupling flow: quick to build
        model = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), block="coupling",
                                        hidden_channels=4, fc_end=False))
        model.initialize(tf.cast(images, tf.float32) / 255)
    eval_fn = make_eval_step(model, strategy)
    mask = tf.constant([1.0, 1.0, 1.0, 0.0])  # the last image is padding
    s, s2, n = eval_fn(tf.constant(images), mask, tf.constant(0, tf.int64))
    assert float(n) == 3 and float(s) / 3 > 0  # mean bits/dim of the 3 images
    again = eval_fn(tf.constant(images), mask, tf.constant(0, tf.int64))[0]
    assert float(again) == float(s)  # fixed seeds: the same result
    ```
    """
    dtype = model.flow_dtype
    base_seed = tf.constant(int(seed) + 1_000_003, tf.int64)
    d = float(model.num_dims)

    def replica_fn(batch, mask, index):
        x_int, labels = batch if task != "density" else (batch, None)
        ctx = tf.distribute.get_replica_context()
        seed_pair = tf.random.experimental.stateless_fold_in(
            tf.stack([base_seed, tf.cast(index, tf.int64)]), ctx.replica_id_in_sync_group
        )
        seeds = tf.random.experimental.stateless_split(seed_pair, 2)
        if dequantizer is None:
            x, log_q = data.dequantize(x_int, n_bits, seed=seeds[0], dtype=dtype), 0.0
        else:
            x, log_q = dequantizer.dequantize(x_int, seeds[0])
        m = tf.cast(mask, tf.float64)
        if task in ("density", "conditional"):
            cond = {"label": labels} if task == "conditional" else {}
            bpd = model.bits_per_dim(
                x, n_bits=n_bits, training=training_estimator, seed=seeds[1], validate=False, **cond
            ) + log_q / (d * _LN2)
        elif task == "classification":
            logits = model.classify(x, training=False, validate=False)
            bpd = tf.zeros([tf.shape(x)[0]], dtype)
        else:
            lp, logits = model.log_prob_and_logits(x, training=False, seed=seeds[1], validate=False)
            bpd = -(lp - d * n_bits * _LN2) / (d * _LN2)
        bpd = tf.cast(bpd, tf.float64)
        sums = [tf.reduce_sum(bpd * m), tf.reduce_sum(tf.square(bpd) * m), tf.reduce_sum(m)]
        if task in ("classification", "hybrid"):
            labels = tf.cast(labels, tf.int64)
            correct = tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float64)
            xent = tf.cast(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits),
                tf.float64,
            )
            sums += [tf.reduce_sum(correct * m), tf.reduce_sum(xent * m)]
        return sums

    @tf.function
    def eval_step(x, mask, index):
        out = strategy.run(replica_fn, args=(x, mask, index))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None) for t in out]

    return tracing.in_one_optimizer_round(eval_step)
