"""Sampling a run's model into PNG grids."""

import contextlib
import os

import tensorflow as tf

from rflow_tf import data, tracing


class Sampler:
    """Draws image grids from ``model`` with the EMA weights of ``ema``
    (:class:`rflow_tf.training.ema.EMAWeights`) and fixed seeds derived from
    ``seed``: the same weights give the same grid. ``n`` images at
    ``temperature`` by default; only the chief (``write``) writes the files.

    Args:
      model: a :class:`~rflow_tf.models.ResidualFlow`.
      ema: its :class:`~rflow_tf.training.ema.EMAWeights`.
      seed: the int the sampling seeds derive from.
      n: images per grid.
      temperature: the latent's standard deviation.
      n_bits: bits per pixel of the grid's images.
      write: write the PNG files (only the chief does).

    Example:
    ```python
    import os
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training import EMAWeights, Sampler

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():  # a one-block coupling flow: quick to build
        model = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), block="coupling",
                                        hidden_channels=4, fc_end=False))
        model.initialize(tf.random.stateless_uniform([8, 4, 4, 1], seed=[0, 1]))
        ema = EMAWeights(model, model.trainable_variables, strategy)
    sampler = Sampler(model, ema, seed=0, n=4, temperature=1.0, n_bits=8)
    assert sampler.sample("grid.png") == "grid.png" and os.path.exists("grid.png")
    ```
    """

    def __init__(self, model, ema, *, seed, n, temperature, n_bits, write=True):
        self.model = model
        self.ema = ema
        self.seed = int(seed)
        self.n = n
        self.temperature = temperature
        self.n_bits = n_bits
        self.write = write
        self._fn = None

    def sample(self, path, n=None, temperature=None, use_ema=True):
        """Samples ``n`` images (EMA weights), writes a PNG grid to ``path`` and
        returns the path. For a class-conditional flow the grid has one row of
        ``n // condition_classes`` samples per class.

        Example: ``sampler.sample("/tmp/grid.png", n=16)``.
        """
        n = int(n or self.n)
        temperature = self.temperature if temperature is None else temperature
        classes = int(getattr(self.model.flow_config, "condition_classes", 0) or 0)
        nrow = None
        if self._fn is None or self._fn[0] != (n, temperature):
            if classes:  # a class-conditional flow: one row of n // classes per class
                per_class = max(1, n // classes)
                labels = tf.repeat(tf.range(classes), per_class)
                fn = tf.function(
                    lambda seed: self.model.sample(
                        classes * per_class, temperature=temperature, seed=seed, label=labels
                    )
                )
            else:
                fn = tf.function(
                    lambda seed: self.model.sample(n, temperature=temperature, seed=seed)
                )
            self._fn = ((n, temperature), tracing.in_one_optimizer_round(fn))
        if classes:
            nrow = max(1, n // classes)
        ctx = self.ema.weights() if use_ema else contextlib.nullcontext()
        with ctx:
            imgs = self._fn[1](tf.constant([self.seed, 777], tf.int64))
        if self.write:
            grid = data.to_uint8_images(imgs, self.n_bits).numpy()
            data.save_image_grid(grid, path, **({"nrow": nrow} if nrow else {}))
        return path


def step_sample_path(run_dir, step):
    """Where the samples of ``step`` go: ``<run_dir>/samples/step_XXXXXXX.png``
    (seven digits, so the files sort by step).

    Args:
      run_dir: the run directory.
      step: the training step.

    Returns:
      The path, a string.

    Example:
    ```python
    import os
    from rflow_tf.training.sampling import step_sample_path

    path = step_sample_path("run", 200)
    assert path == os.path.join("run", "samples", "step_0000200.png")
    ```
    """
    return os.path.join(run_dir, "samples", f"step_{int(step):07d}.png")


def class_sample_grid(model, path, per_class=8, temperature=1.0, seed=0, n_bits=None):
    """Writes a PNG grid of samples of a class-conditional flow
    (``model.flow_config.condition_classes`` = K): row y holds ``per_class``
    draws x ~ p(x | y) at ``temperature``, for y = 0 .. K-1, all from one
    stateless ``seed``. Returns ``path``.

    Example:
    ```python
    import os, tempfile
    import tensorflow as tf
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training.sampling import class_sample_grid

    flow = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                   fc_end=False, condition_classes=3))
    flow.initialize(tf.random.uniform([6, 4, 4, 1]), label=[0, 1, 2, 0, 1, 2])
    path = class_sample_grid(flow, os.path.join(tempfile.mkdtemp(), "classes.png"), per_class=2)
    assert os.path.exists(path)
    ```
    """
    classes = int(getattr(model.flow_config, "condition_classes", 0))
    if classes < 2:
        raise ValueError(
            "class_sample_grid needs a class-conditional flow (condition_classes >= 2)"
        )
    per_class = int(per_class)
    labels = tf.repeat(tf.range(classes), per_class)
    imgs = model.sample(classes * per_class, temperature=temperature, seed=[int(seed), 0],
                        label=labels)  # fmt: skip
    n_bits = model.flow_config.n_bits if n_bits is None else int(n_bits)
    data.save_image_grid(data.to_uint8_images(imgs, n_bits).numpy(), path, nrow=per_class)
    return path
