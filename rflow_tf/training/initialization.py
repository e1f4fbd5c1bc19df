"""The start of a fresh run: the model initialised from its first batch (ActNorm
from the data, the Lipschitz estimates converged by power iteration)."""

import time

from rflow_tf import data
from rflow_tf.training.metrics import progress_lines


def initialize_from_batch(model, first_batch, flow_config, seed, log=print):
    """Initialises a freshly built ``model`` from ``first_batch``: dequantises the
    images (uniform noise of seed ``seed``), initialises ActNorm from them (a
    class-conditional flow with their labels) and converges the power iterations
    of its Lipschitz layers, logging the progress.

    Args:
      model: the :class:`rflow_tf.models.ResidualFlow` of ``flow_config``, not
        yet initialised.
      first_batch: ``n_bits`` integer images ``[B, H, W, C]`` (``[B, k, H, W, C]``
        with accumulation: the first micro-batch is used), or ``(images, labels)``.
      flow_config: the model's :class:`rflow_tf.config.FlowConfig` (its
        ``n_bits`` and ``condition_classes``).
      seed: the run's seed.
      log: prints a progress line.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf import models
    from rflow_tf.config import FlowConfig
    from rflow_tf.training.initialization import initialize_from_batch

    config = FlowConfig(input_shape=(8, 8, 1), n_blocks=(1,), block="coupling",
                        hidden_channels=4, fc_end=False)
    model = models.ResidualFlow(config)
    images = tf.random.stateless_uniform((4, 8, 8, 1), [0, 1], 0, 256, dtype=tf.int32)
    initialize_from_batch(model, images, config, seed=0)  # prints two progress lines
    ```
    """
    labels = None
    if isinstance(first_batch, (tuple, list)):  # (images, labels)
        first_batch, labels = first_batch[0], first_batch[1]
    x = first_batch[:, 0] if first_batch.shape.rank == 5 else first_batch
    if labels is not None and labels.shape.rank == 2:  # accumulation: [B, k]
        labels = labels[:, 0]
    x = data.dequantize(x, flow_config.n_bits, seed=[int(seed), 12345], dtype=model.flow_dtype)
    start = time.time()
    log(
        "initialising ActNorm from the first batch and the Lipschitz estimates of "
        f"{len(model.lipschitz_layers())} layers (power iteration)"
    )
    if flow_config.condition_classes:  # a class-conditional flow needs the labels
        model.initialize(x, label=labels)
    else:
        model.initialize(x)
    model.converge_lipschitz(progress=progress_lines(log, "power iteration", "layers"))
    log(f"initialised in {time.time() - start:.1f} s")
