"""Hooks: code a run calls at fixed points of its training loop.

A :class:`TrainingHook` is installed with ``Trainer(..., hooks=[...])`` or
``trainer.hooks.append(hook)`` before :meth:`rflow_tf.training.Trainer.fit`.
A run without hooks compiles a training step without any hook point.
"""


class TrainingHook:
    """The points of the training loop a hook may act at; each does nothing here.

    * :meth:`adjust_loss` is traced into the compiled training step: it sees
      the loss after the all-reduce, before the finiteness check that decides
      whether the update is applied;
    * :meth:`after_step` runs in Python after each step, before its bookkeeping
      (skipped-step count, progress line, checkpoint).

    Example:
    ```python
    from rflow_tf.training.hooks import TrainingHook

    class StopAt(TrainingHook):
        def after_step(self, trainer, step):
            if step == 100:
                raise KeyboardInterrupt     # the trainer saves and stops
    ```
    """

    #: Whether :meth:`adjust_loss` is traced into the step (a hook that
    #: overrides it sets this to True).
    adjusts_loss = False

    def adjust_loss(self, loss, step):
        """The loss of training step ``step`` (an int64 tensor, counted from 1),
        given the all-reduced ``loss`` of one replica (a float32 tensor).

        Example: ``loss = hook.adjust_loss(loss, step)``.
        """
        return loss

    def after_step(self, trainer, step):
        """Called by ``trainer`` after training step ``step`` (counted from 1).

        Example: ``hook.after_step(trainer, 3)``.
        """


def loss_hook(hooks):
    """The ``loss_hook`` of :func:`rflow_tf.training.make_train_step` for
    ``hooks``: None when none of them adjusts the loss, else a function of
    ``(loss, step)`` that applies their :meth:`TrainingHook.adjust_loss` in order.

    Args:
      hooks: a sequence of :class:`TrainingHook`.

    Returns:
      A function ``(loss, step) -> loss``, or None.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training.hooks import TrainingHook, loss_hook

    class Double(TrainingHook):
        adjusts_loss = True

        def adjust_loss(self, loss, step):
            return 2.0 * loss

    assert loss_hook([TrainingHook()]) is None  # nothing to trace into the step
    adjust = loss_hook([Double(), TrainingHook(), Double()])
    assert float(adjust(tf.constant(1.5), tf.constant(1, tf.int64))) == 6.0
    ```
    """
    adjusting = [hook for hook in hooks if hook.adjusts_loss]
    if not adjusting:
        return None

    def adjust(loss, step):
        for hook in adjusting:
            loss = hook.adjust_loss(loss, step)
        return loss

    return adjust
