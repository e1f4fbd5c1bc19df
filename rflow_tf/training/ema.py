"""The exponential moving average (EMA) of the trained weights, and swapping it
into the model for evaluation, sampling and export."""

import contextlib

import tensorflow as tf

from rflow_tf.training.steps import variable_value


class EMAWeights:
    """The EMA copies of ``variables`` (the weights the optimiser trains) of
    ``model``, and the context in which the model holds them. Build it inside
    ``strategy.scope()``; the training step updates :attr:`variables`.

    The power-iteration state (u, v, sigma) of the model's Lipschitz layers is
    backed up while the EMA weights are swapped in, so evaluating leaves the
    training state untouched.

    The training step updates each copy as ``ema <- decay * ema + (1 - decay) * w``.

    Args:
      model: a :class:`~rflow_tf.models.ResidualFlow`.
      variables: the weights the optimiser trains.
      strategy: the run's ``tf.distribute.Strategy``.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training import EMAWeights

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():  # a one-block coupling flow: quick to build
        model = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), block="coupling",
                                        hidden_channels=4, fc_end=False))
        model.initialize(tf.random.stateless_uniform([8, 4, 4, 1], seed=[0, 1]))
        ema = EMAWeights(model, model.trainable_variables, strategy)
    w = model.trainable_variables[0]
    before = w.numpy()
    w.assign_add(tf.ones_like(w))  # training moves the weights; the EMA is still `before`
    with ema.weights():  # the EMA swapped in, for evaluation, sampling or export
        assert np.array_equal(w.numpy(), before)
    assert np.array_equal(w.numpy(), before + 1)  # and swapped back
    ```
    """

    def __init__(self, model, variables, strategy):
        self.model = model
        self.trained = list(variables)
        self.strategy = strategy
        self.variables = [
            tf.Variable(
                variable_value(v).read_value(),
                trainable=False,
                name="ema_" + getattr(v, "path", v.name).replace("/", "_").replace(":", "_"),
            )
            for v in self.trained
        ]
        self.power_vars = [
            w for layer in model.lipschitz_layers() for w in (layer.u, layer.v, layer.sigma)
        ]
        self.power_backup = [
            tf.Variable(variable_value(w).read_value(), trainable=False) for w in self.power_vars
        ]
        self._swap_fn = None
        self._inside = False

    def reset(self):
        """Sets the EMA to the current trained weights.

        Example: ``ema.reset()  # after initialising the model``.
        """
        for e, v in zip(self.variables, self.trained):
            e.assign(variable_value(v).read_value())

    def _swap(self, entering):
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
                        update(b, copy, args=(variable_value(w),), group=False)
                for v, e in zip(self.trained, self.variables):
                    update(variable_value(v), swap, args=(e,), group=False)
                if not entering:
                    for w, b in zip(self.power_vars, self.power_backup):
                        update(variable_value(w), copy, args=(b,), group=False)

            self._swap_fn = swap_all
        self._swap_fn(entering)
        if not entering:  # the backed-up state is the estimate for the training weights
            self.model.mark_lipschitz_current()

    @contextlib.contextmanager
    def weights(self):
        """Context in which the model holds the EMA weights (power iteration
        converged for them). On exit the training weights and their exact
        power-iteration state come back, so evaluating or sampling never
        changes the course of training.

        Re-entrant: within the context, a nested one changes nothing, so
        evaluation and sampling at one step share one converged estimate.

        Example: ``with ema.weights(): model.sample(16)``.
        """
        if self._inside:
            yield self.model
            return
        self._swap(True)
        self._inside = True
        try:
            self.model.converge_lipschitz()
            yield self.model
        finally:
            self._inside = False
            self._swap(False)
