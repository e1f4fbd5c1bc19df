"""The run directory: its lock and checkpoints that are never lost (restore the
newest one that restores, move unrestorable ones aside, clean interrupted saves)."""

import fcntl
import os
import re
import shutil
import socket

import tensorflow as tf

from rflow_tf.training.options import UsageError


class RunDirLockedError(UsageError):
    """Another live process holds the lock of the run directory (a
    :class:`~rflow_tf.training.options.UsageError`: the command line exits
    with its message).

    Example:
    ```python
    from rflow_tf.training.checkpoints import RunDirLock, RunDirLockedError

    holder = RunDirLock("run").acquire()  # as a running trainer holds it
    try:
        RunDirLock("run").acquire()
    except RunDirLockedError as error:
        assert "run is in use by another trainer" in str(error)
    else:
        raise AssertionError("two holders of one run directory")
    holder.release()
    ```
    """


class RunDirLock:
    """An exclusive lock on a run directory: ``fcntl.flock`` on ``<dir>/.lock``.

    The operating system releases the lock when the holder exits or is killed
    (even by SIGKILL), so a crashed trainer never leaves a stale lock. The
    lock file is never deleted (deleting it would let two processes lock two
    different files); it holds the pid and host of the current holder, for the
    message the next trainer prints. :meth:`acquire` is idempotent.

    Example:
    ```python
    lock = RunDirLock("runs/x")
    lock.acquire()        # RunDirLockedError if another process holds it
    ...
    lock.release()
    ```
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, ".lock")
        self._fd = None

    @property
    def held(self):
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self):
        """Takes the lock, or raises RunDirLockedError naming the holder."""
        if self._fd is not None:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirLockedError(
                f"{os.path.dirname(self.path)} is in use by another trainer ({holder}); "
                f"wait for it to finish or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        """Releases the lock (no-op when not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self):
        self.release()


def _checkpoint_step(path, prefix):
    m = re.fullmatch(re.escape(prefix) + r"-(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else None


def checkpoint_candidates(directory, prefix="ckpt"):
    """Checkpoint prefixes ``<directory>/<prefix>-N`` to try, newest first: the
    union of those listed in the ``checkpoint`` state file and those whose
    ``.index`` file is present, so a deleted or garbage state file loses nothing.

    Args:
      directory: the checkpoint directory.
      prefix: the checkpoints' name prefix.

    Returns:
      A list of checkpoint paths (without ``.index``), the highest step first.

    Example:
    ```python
    import os
    import tensorflow as tf
    from rflow_tf.training.checkpoints import checkpoint_candidates

    checkpoint = tf.train.Checkpoint(w=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(checkpoint, "ckpt", max_to_keep=3)
    for step in (10, 20):
        manager.save(checkpoint_number=step)
    os.remove("ckpt/checkpoint")  # the state file lost: the files still count
    assert checkpoint_candidates("ckpt") == ["ckpt/ckpt-20", "ckpt/ckpt-10"]
    ```
    """
    found = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".index"):
                step = _checkpoint_step(name[: -len(".index")], prefix)
                if step is not None:
                    found[step] = os.path.join(directory, name[: -len(".index")])
    state = tf.train.get_checkpoint_state(directory)
    if state is not None:
        for path in list(state.all_model_checkpoint_paths) + [state.model_checkpoint_path]:
            path = path if os.path.isabs(path) else os.path.join(directory, path)
            step = _checkpoint_step(path, prefix)
            if step is not None and os.path.exists(path + ".index"):
                found[step] = path
    return [found[k] for k in sorted(found, reverse=True)]


def remove_stale_temp_checkpoints(directory, prefix="ckpt"):
    """Removes ``<prefix>-N_temp/`` directories, which TensorFlow writes a
    checkpoint into before renaming it into place and which a kill mid-save
    leaves behind. Only this exact naming is touched (call it while holding
    the run-directory lock).

    Args:
      directory: the checkpoint directory.
      prefix: the checkpoints' name prefix.

    Returns:
      The removed paths.

    Example:
    ```python
    import os
    from rflow_tf.training.checkpoints import remove_stale_temp_checkpoints

    os.makedirs("ckpt/ckpt-30_temp")  # left by a save that was killed
    os.makedirs("ckpt/notes")
    assert remove_stale_temp_checkpoints("ckpt") == ["ckpt/ckpt-30_temp"]
    assert os.listdir("ckpt") == ["notes"]
    ```
    """
    removed = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if re.fullmatch(re.escape(prefix) + r"-\d+_temp", name) and os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def _move_aside(path, log):
    """Moves the files of checkpoint ``path`` to ``<dir>/unrestorable/`` (kept,
    never deleted, and out of the way of the save that will reuse the name)."""
    directory = os.path.dirname(path)
    dest = os.path.join(directory, "unrestorable")
    os.makedirs(dest, exist_ok=True)
    base = os.path.basename(path)
    for name in os.listdir(directory):
        if name == base + ".index" or name.startswith(base + ".data-"):
            target = os.path.join(dest, name)
            n = 1
            while os.path.exists(target):
                target, n = os.path.join(dest, f"{name}.{n}"), n + 1
            os.replace(os.path.join(directory, name), target)
    log(f"moved the files of the unrestorable checkpoint {path} to {dest}/")


def restore_newest(checkpoint, directory, prefix="ckpt", log=print, warn=print, repair=True):
    """Restores the newest checkpoint of ``directory`` that restores completely.

    Candidates come from :func:`checkpoint_candidates` (state file and files
    present), newest first. A candidate that fails to restore (truncated or
    corrupt files) is reported and the next older one is tried; once one
    restores, the failed ones are moved to ``<directory>/unrestorable/``
    (kept, and out of the way of the saves that will reuse their names).
    The state file is rewritten when it was missing, unreadable or did not
    name the restored checkpoint; it then lists the restored one (and the
    older ones it listed) without timestamps, which ``CheckpointManager``
    never rotates away, and checkpoints it did not list are left in place:
    nothing this run did not write is ever deleted.

    ``repair=False`` (readers such as non-chief workers) only restores:
    nothing is moved and no state is written.

    Args:
      checkpoint: the ``tf.train.Checkpoint`` to restore into.
      directory: the checkpoint directory.
      prefix: the checkpoints' name prefix.
      log: prints what was moved.
      warn: prints what failed to restore.
      repair: move the failed checkpoints aside and rewrite the state file.

    Returns:
      The restored path, or None when there is no checkpoint.

    Raises:
      UsageError: checkpoints exist but none restores; they are then left
        untouched and the caller must not start over and overwrite them.

    Example:
    ```python
    import os
    import tensorflow as tf
    from rflow_tf.training.checkpoints import restore_newest

    w = tf.Variable(1.0)
    checkpoint = tf.train.Checkpoint(w=w)
    manager = tf.train.CheckpointManager(checkpoint, "ckpt", max_to_keep=3)
    manager.save(checkpoint_number=10)
    w.assign(2.0)
    manager.save(checkpoint_number=20)
    for name in os.listdir("ckpt"):  # the newest save is truncated
        if name.startswith("ckpt-20.data"):
            open(os.path.join("ckpt", name), "wb").close()
    messages = []
    path = restore_newest(checkpoint, "ckpt", log=messages.append, warn=messages.append)
    assert path == "ckpt/ckpt-10" and float(w) == 1.0  # the older one, restored
    assert os.path.exists("ckpt/unrestorable/ckpt-20.index")  # kept, out of the way
    ```
    """
    candidates = checkpoint_candidates(directory, prefix)
    state = tf.train.get_checkpoint_state(directory)
    state_file = os.path.join(directory, "checkpoint")
    if candidates and state is None:
        warn(
            f"{state_file} is {'unreadable' if os.path.exists(state_file) else 'missing'}; "
            f"recovering from the checkpoint files present: "
            f"{', '.join(os.path.basename(c) for c in candidates)}"
        )
    failures = []
    for path in candidates:
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # noqa: BLE001  (any failure: try the older one)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failures.append((path, f"{os.path.basename(path)} ({type(e).__name__}: {reason})"))
            warn(
                f"checkpoint {path} does not restore ({type(e).__name__}: {reason}); "
                f"trying the next older checkpoint"
            )
            continue
        for bad, _ in failures:
            if repair:
                _move_aside(bad, log)
        step = _checkpoint_step(path, prefix)
        listed = (
            []
            if state is None
            else [
                q if os.path.isabs(q) else os.path.join(directory, q)
                for q in state.all_model_checkpoint_paths
            ]
        )
        kept = sorted(
            {
                q
                for q in listed
                if os.path.exists(q + ".index")
                and _checkpoint_step(q, prefix) is not None
                and _checkpoint_step(q, prefix) <= step
            }
            | {path},
            key=lambda q: _checkpoint_step(q, prefix),
        )
        if repair and (state is None or state.model_checkpoint_path != path or failures):
            tf.compat.v1.train.update_checkpoint_state(
                directory, path, all_model_checkpoint_paths=kept
            )
        if failures:
            warn(
                f"resumed from the older checkpoint {path} because newer ones did not "
                f"restore: {'; '.join(f for _, f in failures)}"
            )
        return path
    if failures:
        raise UsageError(
            f"none of the {len(failures)} checkpoint(s) in {directory} restores: "
            f"{'; '.join(f for _, f in failures)}. Not starting over from step 0 (that would "
            f"overwrite them); move or delete {directory} to start over."
        )
    return None


class Checkpointer:
    """A run's checkpoints: the latest ones (``ckpt/``, the newest two kept) and
    the best ones (``ckpt_best/``, ``keep_best`` kept) of ``checkpoint``.

    The chief writes into ``run_dir``; another worker of a cluster saves too (the
    save is collective) into ``write_root``, a temporary directory of its own,
    and deletes what it saved at once. ``tick`` is called after each save (the
    cluster's watchdog). Building it on the chief removes the temporary
    directories of interrupted saves.

    Args:
      checkpoint: the ``tf.train.Checkpoint`` of the run's state.
      run_dir: the run directory.
      is_chief: whether this worker keeps what it saves.
      write_root: where a non-chief worker saves (and deletes at once).
      keep_best: how many best checkpoints to keep.
      tick: called after each save.
      log: prints progress.
      warn: prints what failed to restore.

    Example:
    ```python
    import os
    import tensorflow as tf
    from rflow_tf.training.checkpoints import Checkpointer

    w = tf.Variable(1.0)
    checkpointer = Checkpointer(tf.train.Checkpoint(w=w), "run")
    path = checkpointer.save(100)  # run/ckpt/ckpt-100
    w.assign(5.0)
    assert checkpointer.restore_latest() == path == os.path.join("run", "ckpt", "ckpt-100")
    assert float(w) == 1.0 and checkpointer.latest == path
    ```
    """

    def __init__(
        self,
        checkpoint,
        run_dir,
        *,
        is_chief=True,
        write_root=None,
        keep_best=1,
        tick=lambda: None,
        log=print,
        warn=print,
    ):
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        self.is_chief = is_chief
        root = run_dir if is_chief else write_root
        self.ckpt_dir = os.path.join(root, "ckpt")
        self.best_dir = os.path.join(root, "ckpt_best")
        self.keep_best = int(keep_best)
        self.tick, self.log, self.warn = tick, log, warn
        if is_chief:
            for directory, prefix in ((self.ckpt_dir, "ckpt"), (self.best_dir, "best")):
                for path in remove_stale_temp_checkpoints(directory, prefix):
                    log(f"removed {path}, left by a save that was interrupted")
        self.make_managers()

    def make_managers(self):
        """(Re)builds the checkpoint managers, which read the state file when built
        (so after :func:`restore_newest` repaired it).

        Example: ``checkpointer.make_managers()``.
        """
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir, max_to_keep=2)
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, self.best_dir, max_to_keep=self.keep_best, checkpoint_name="best"
        )

    @property
    def latest(self):
        """The path of the latest checkpoint this run saved or restored, or None.

        Example: ``print(checkpointer.latest or "(none yet)")``.
        """
        return self.manager.latest_checkpoint

    def save(self, step, best=False):
        """Saves the checkpoint of ``step`` (a best one with ``best``); returns its path.

        Example: ``checkpointer.save(200)``.
        """
        manager = self.best_manager if best else self.manager
        path = manager.save(checkpoint_number=int(step))
        self.tick()
        if not self.is_chief:  # every worker saves (collective); only the chief keeps it
            tf.io.gfile.rmtree(os.path.dirname(path))
        return path

    def restore_latest(self):
        """Restores the newest checkpoint of the run that restores
        (:func:`restore_newest`) and returns its path; None if there is none.
        Other workers than the chief read the chief's ``ckpt/`` without repairing it.

        Example: ``checkpointer.restore_latest() or print("nothing to restore")``.
        """
        directory = self.ckpt_dir if self.is_chief else os.path.join(self.run_dir, "ckpt")
        path = restore_newest(
            self.checkpoint, directory, "ckpt", log=self.log, warn=self.warn, repair=self.is_chief
        )
        if path:
            self.make_managers()
        return path
