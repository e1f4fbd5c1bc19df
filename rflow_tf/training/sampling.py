"""Sampling a run's model into PNG grids."""

import contextlib
import os

import tensorflow as tf

from rflow_tf import data


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
        returns the path.

        Example: ``sampler.sample("/tmp/grid.png", n=16)``.
        """
        n = int(n or self.n)
        temperature = self.temperature if temperature is None else temperature
        if self._fn is None or self._fn[0] != (n, temperature):
            fn = tf.function(lambda seed: self.model.sample(n, temperature=temperature, seed=seed))
            self._fn = ((n, temperature), fn)
        ctx = self.ema.weights() if use_ema else contextlib.nullcontext()
        with ctx:
            imgs = self._fn[1](tf.constant([self.seed, 777], tf.int64))
        if self.write:
            data.save_image_grid(data.to_uint8_images(imgs, self.n_bits).numpy(), path)
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
