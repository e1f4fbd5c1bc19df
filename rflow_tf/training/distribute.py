"""Devices, tf.distribute strategies, data sharding over replicas and workers,
the check that the workers resume at one step, and the watchdog and error of a
cluster whose peer is lost."""

import os
import re
import sys
import threading
import time

import tensorflow as tf

from rflow_tf.training.checkpoints import checkpoint_candidates
from rflow_tf.training.options import UsageError


class WorkerLostError(Exception):
    """A worker of a multi-worker cluster died or stopped answering; the message
    names the checkpoint a restart of every worker resumes from. The trainer
    raises it (:func:`worker_lost_error`) in place of the collective op's error.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training.distribute import WorkerLostError, worker_lost_error

    collective = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: EOF")
    try:
        raise worker_lost_error(collective, "worker", 0, 40, "run") from None
    except WorkerLostError as error:
        assert "Restart every worker with the same command" in str(error)
    ```
    """


# The errors a collective op raises when a peer of the cluster is gone: UNAVAILABLE
# (connection closed, or the coordination service's heartbeats stopped), DEADLINE_EXCEEDED,
# ABORTED / CANCELLED (collectives aborted after another failure).
PEER_LOST_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)


def configure_cpu_devices(n):
    """Splits the first physical CPU into ``n`` logical devices. Must run before
    TensorFlow initialises its runtime (before any op or device listing of
    logical devices); configuring the number TensorFlow already has is a no-op.

    Args:
      n: the number of logical CPU devices, >= 1.

    Raises:
      UsageError: ``n`` < 1, or TensorFlow already runs with another number.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training.distribute import configure_cpu_devices
    from rflow_tf.training.options import UsageError

    # First thing in a process: configure_cpu_devices(2), then
    # make_strategy("mirrored", cpu_devices=2) mirrors over the two. Once
    # TensorFlow runs, its number of devices is fixed:
    n = len(tf.config.list_logical_devices("CPU"))  # (starts TensorFlow's runtime)
    configure_cpu_devices(n)  # what it has already: fine
    try:
        configure_cpu_devices(n + 1)
    except UsageError as error:
        assert "already initialised" in str(error)
    else:
        raise AssertionError("the devices changed after TensorFlow started")
    ```
    """
    n = int(n)
    if n < 1:
        raise UsageError(f"--cpu_devices must be >= 1, got {n}")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as e:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise UsageError(
                f"--cpu_devices={n}: TensorFlow was already initialised with {have} logical "
                f"CPU device(s); configure the devices before running any TensorFlow op "
                f"({e})"
            ) from None


def make_strategy(kind="mirrored", cpu_devices=0):
    """A tf.distribute strategy by name.

    * ``"mirrored"``: MirroredStrategy over all GPUs if there are several;
      over the logical CPUs if ``cpu_devices > 1``; otherwise a
      OneDeviceStrategy on the single GPU or the CPU.
    * ``"one_device"``: OneDeviceStrategy on the first GPU or the CPU.
    * ``"multi_worker"``: MultiWorkerMirroredStrategy (cluster from $TF_CONFIG).

    Args:
      kind: ``"mirrored"``, ``"one_device"`` or ``"multi_worker"``.
      cpu_devices: the number of logical CPUs to mirror over (see
        :func:`configure_cpu_devices`); 0 or 1: not over CPUs.

    Returns:
      A ``tf.distribute.Strategy``.

    Raises:
      UsageError: an unknown ``kind``, or fewer logical CPUs than ``cpu_devices``.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training.distribute import make_strategy

    strategy = make_strategy("mirrored")  # all GPUs, or one device
    gpus = tf.config.list_logical_devices("GPU")
    assert strategy.num_replicas_in_sync == max(1, len(gpus))
    assert make_strategy("one_device").num_replicas_in_sync == 1
    ```
    """
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")
    if kind != "mirrored":
        raise UsageError(f"unknown --strategy {kind!r}")
    if cpu_devices and int(cpu_devices) > 1:
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(cpus) < int(cpu_devices):
            raise UsageError(
                f"--cpu_devices={cpu_devices} but only {len(cpus)} logical CPU "
                "device(s) exist (call configure_cpu_devices first)"
            )
        return tf.distribute.MirroredStrategy(cpus[: int(cpu_devices)])
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(gpus)
    return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")


def task_of(strategy):
    """``(task_type, task_id, is_chief)`` of this process under ``strategy``:
    ``(None, 0, True)`` without a cluster. Without a ``chief`` task, worker 0
    is the chief.

    Args:
      strategy: a ``tf.distribute.Strategy`` (its ``cluster_resolver``, if any).

    Returns:
      ``(task_type, task_id, is_chief)``.

    Example:
    ```python
    import types
    import tensorflow as tf
    from rflow_tf.training.distribute import task_of

    assert task_of(tf.distribute.OneDeviceStrategy("/cpu:0")) == (None, 0, True)
    cluster = tf.train.ClusterSpec({"worker": ["host0:2222", "host1:2222"]})
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster, task_type="worker", task_id=1)
    worker1 = types.SimpleNamespace(cluster_resolver=resolver)  # as a multi-worker strategy
    assert task_of(worker1) == ("worker", 1, False)
    ```
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0, True
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return task_type, task_id, is_chief


def distribute_dataset(strategy, ds):
    """``strategy.experimental_distribute_dataset`` of a dataset of *global*
    batches, sharded by data: each global batch of B examples is split into
    ``num_replicas_in_sync`` consecutive slices of B / num_replicas, and
    replica r (of any worker) gets slice r. So the workers together see every
    example of every global batch exactly once, whatever the number of files
    behind ``ds`` (TFDS) or none (the in-memory digits), and a multi-worker
    run sees the same batches in the same order as a single-process run with
    the same global batch. Every worker must build the same ``ds`` (same seed).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf import data
    from rflow_tf.training.distribute import distribute_dataset

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")     # or MirroredStrategy()
    ds = data.load_image_dataset("digits", "train", batch_size=64, seed=0)
    for x in distribute_dataset(strategy, ds.take(2)):   # x: PerReplica slices of 64 / replicas
        parts = strategy.experimental_local_results(x)
        assert sum(p.shape[0] for p in parts) == 64
    ```
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(ds.with_options(options))


class ProgressWatchdog:
    """Ends the process when no progress is reported for ``timeout`` seconds.

    A daemon thread checks every ``min(timeout / 4, 5)`` seconds whether
    :meth:`tick` was called within the last ``timeout`` seconds; if not, it
    calls ``on_timeout(seconds_since_last_tick)``, whose default prints
    ``message`` to stderr and ends the process with ``os._exit(4)`` (a thread
    cannot interrupt a collective op that waits for a worker that hangs).
    ``timeout=0`` disables it. Use as a context manager; ticks are cheap (one
    ``time.monotonic()``).

    Example:
    ```python
    import time
    from rflow_tf.training.distribute import ProgressWatchdog

    with ProgressWatchdog(600, "no training step finished for 600 s") as dog:
        for batch in range(3):
            time.sleep(0.01)              # a training step
            dog.tick()

    stalls = []                           # on_timeout replaces ending the process
    with ProgressWatchdog(0.2, on_timeout=stalls.append):
        time.sleep(0.5)                   # no tick for longer than the timeout
    assert stalls and stalls[0] >= 0.2    # seconds since the last tick
    ```
    """

    def __init__(self, timeout, message="no progress", on_timeout=None):
        self.timeout = float(timeout)
        self.message = message
        self.on_timeout = on_timeout or self._exit
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def _exit(self, idle):
        print(
            f"error: {self.message} (nothing finished for {idle:.0f} s, "
            f"--worker_timeout={self.timeout:g})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(4)  # pylint: disable=protected-access

    def tick(self):
        """Reports progress: the timeout starts again."""
        self._last = time.monotonic()

    def _run(self):
        period = min(self.timeout / 4.0, 5.0)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                self.on_timeout(idle)
                return

    def __enter__(self):
        self.tick()
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._run, daemon=True, name="ProgressWatchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return False


def worker_lost_error(error, task_type, task_id, step, run_dir):
    """The :class:`WorkerLostError` of ``error`` (one of :data:`PEER_LOST_ERRORS`),
    raised at ``step`` in the worker ``task_type`` ``task_id`` of the run in
    ``run_dir``: it names the informative line of the error and the
    checkpoint a restart resumes from.

    Args:
      error: the error the collective op raised.
      task_type: this worker's task type.
      task_id: this worker's task id.
      step: the training step it failed at.
      run_dir: the run directory (its ``ckpt/`` names the checkpoint).

    Returns:
      A :class:`WorkerLostError`, to raise.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training.distribute import WorkerLostError, worker_lost_error

    error = tf.errors.UnavailableError(
        None, None, "Graph execution error:\\nCollective ops is aborted by: Socket closed")
    lost = worker_lost_error(error, "worker", 1, 40, "run")
    assert isinstance(lost, WorkerLostError)
    assert "worker 1 lost another worker of the cluster at step 40" in str(lost)
    assert "aborted by: Socket closed" in str(lost)  # the informative line, not the header
    assert "(none yet: a restart starts over)" in str(lost)  # no checkpoint in run/ckpt
    ```
    """
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
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
        checkpoint_candidates(os.path.join(run_dir, "ckpt")) or ["none yet: a restart starts over"]
    )[0]
    return WorkerLostError(
        f"{task_type} {task_id} lost another worker of the cluster at step "
        f"{step} ({type(error).__name__}: {reason[:300]}). Restart every "
        f"worker with the same command; training resumes from the chief's last "
        f"checkpoint ({latest})."
    )


def check_workers_agree_on_step(strategy, step, task_type, task_id, run_dir):
    """Checks that every worker of a multi-worker ``strategy`` resumes at the same
    ``step``: they all read the chief's ``ckpt/`` in ``run_dir``; workers that
    started at different steps would train different batches and wait for each
    other forever.

    Args:
      strategy: the run's ``tf.distribute.Strategy``.
      step: the step this worker resumes at.
      task_type: this worker's task type.
      task_id: this worker's task id.
      run_dir: the run directory.

    Raises:
      UsageError: the workers start at different steps (``--out`` is not on a
        filesystem that all workers share).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training.distribute import check_workers_agree_on_step

    # One process: its replicas agree with themselves.
    check_workers_agree_on_step(tf.distribute.OneDeviceStrategy("/cpu:0"), 40, None, 0, "run")
    ```
    """
    local = tf.constant([step], tf.int64)
    steps = strategy.gather(strategy.run(lambda: tf.identity(local)), axis=0)
    lo, hi = int(tf.reduce_min(steps)), int(tf.reduce_max(steps))
    if lo != hi:
        raise UsageError(
            f"the workers start at different steps ({lo} to {hi}; this is "
            f"{task_type} {task_id} at step {step}): every worker must read the "
            f"chief's checkpoints in {os.path.join(run_dir, 'ckpt')}, so --out must be "
            f"on a filesystem shared by all workers"
        )
