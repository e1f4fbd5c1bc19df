"""A flow as a TFP distribution and as a Keras layer.

* :class:`FlowDistribution` -- the ``tfd.TransformedDistribution`` of a
  flow, which forwards per-call seeds to its residual blocks and runs the
  cheap data -> latent direction for ``log_prob``.
* :class:`FlowLayer` -- a distribution or bijector as a Keras layer, so that a
  Keras model tracks its weights.
* :func:`finite_images_or_nan` -- the guard on sampled images: clipped to
  [0, 1] when finite, NaN (and reported) when not.

The two classes are re-exported by :mod:`rflow_tf.models`.
"""

import sys
import warnings

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rlayers
from rflow_tf.flow import check_sample_args

tfd = tfp.distributions

#: The Keras registration package of rflow_tf's serialisable objects.
KERAS_PACKAGE = "rflow_tf"


class FlowDistribution(tfd.TransformedDistribution):
    """``tfd.TransformedDistribution(base, tfb.Invert(flow))`` whose
    ``log_prob`` runs the cheap data -> latent direction once:

        log p(x) = base.log_prob(flow(x)) + log |det d flow / dx|

    (TFP's generic ``log_prob`` would evaluate the log-det at
    ``flow.inverse(flow(x))``, i.e. run the fixed-point inverse of every
    residual block.) ``bijector_kwargs`` such as ``{"seed": s, "training":
    True}`` reach the flow. Requires ``bijector`` to be
    ``tfb.Invert(FlowBijector)``.

    Example:
    ```python
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.config import FlowConfig
    from rflow_tf.distribution import FlowDistribution
    from rflow_tf.models import ResidualFlow
    tfb, tfd = tfp.bijectors, tfp.distributions

    model = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                    fc_end=False, logdet="exact"))
    x = tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1])
    model.initialize(x)
    dist = FlowDistribution(tfd.MultivariateNormalDiag(tf.zeros([16])),   # D = 4 * 4 * 1
                            tfb.Invert(model.bijector))
    lp = dist.log_prob(x, bijector_kwargs={"seed": [1, 2]})
    tf.debugging.assert_near(lp, model.log_prob(x), atol=1e-3)   # the model's own log p(x)
    ```
    """

    def sample(self, sample_shape=(), seed=None, name="sample", **kwargs):
        """Samples (see ``tfd.Distribution.sample``) after checking the arguments:
        ``sample_shape`` positive ints, ``seed`` None, an int or shape [2]
        (:func:`check_sample_args`), so bad values raise a clear ValueError.

        Example: ``dist.sample(4, seed=[1, 2])``.
        """
        check_sample_args(sample_shape, seed, self.name)
        return super().sample(sample_shape, seed=seed, name=name, **kwargs)

    def _log_prob(self, y, **kwargs):
        distribution_kwargs, bijector_kwargs = self._kwargs_split_fn(kwargs)
        flow = self.bijector.bijector
        z, ld = flow.forward_and_log_det(y, **bijector_kwargs)
        return self.distribution.log_prob(z, **distribution_kwargs) + tf.cast(ld, self.dtype)


# Registered as "rflow_tf>_finite_images_or_nan", the name saved objects refer to.
@keras.saving.register_keras_serializable(package=KERAS_PACKAGE, name="_finite_images_or_nan")
def finite_images_or_nan(x, z, where):
    """Sampled images ``x`` (from latents ``z``) clipped to [0, 1] where the
    sample is finite; a sample whose image or latent is not finite becomes
    all-NaN, never a plausible image, and is reported (a ``RuntimeWarning``
    eagerly, a line on stderr inside ``tf.function``, naming ``where``).

    Example:
    ```python
    import warnings
    import numpy as np
    import tensorflow as tf
    from rflow_tf.distribution import finite_images_or_nan

    x = tf.constant([[1.2, 0.5], [0.3, 0.4]])
    z = tf.constant([[0.0, 1.0], [np.inf, 0.0]])          # the second latent is infinite
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = finite_images_or_nan(x, z, "example").numpy()
    assert out[0].tolist() == [1.0, 0.5] and np.isnan(out[1]).all()
    assert "1 of 2" in str(caught[0].message)
    ```
    """
    ok = tf.reduce_all(tf.math.is_finite(x), axis=list(range(1, x.shape.rank))) & tf.reduce_all(
        tf.math.is_finite(z), axis=list(range(1, z.shape.rank))
    )
    bad = tf.reduce_sum(tf.cast(~ok, tf.int32))
    msg = (
        "sample(s) not finite (infinite latent or temperature, or a diverged fixed-point "
        "inverse); returned as NaN"
    )
    if tf.executing_eagerly():
        if int(bad):
            warnings.warn(
                f"{where}: {int(bad)} of {int(tf.size(ok))} {msg}", RuntimeWarning, stacklevel=3
            )
    else:

        def report():
            tf.print("WARNING:", where + ":", bad, "of", tf.size(ok), msg, output_stream=sys.stderr)
            return tf.constant(False)

        flag = tf.cond(bad > 0, report, lambda: tf.constant(True))
        with tf.control_dependencies([flag]):
            x = tf.identity(x)
    mask = tf.reshape(ok, [-1] + [1] * (x.shape.rank - 1))
    return tf.where(mask, tf.clip_by_value(x, 0.0, 1.0), tf.constant(np.nan, x.dtype))


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class FlowLayer(keras.layers.Layer):
    """A Keras layer holding a TFP distribution or bijector built from
    rflow_tf pieces, so that a ``keras.Model`` that holds it sees its weights
    (Keras 3 does not look inside ``tf.Module``s such as distributions).

    ``call(x)`` is ``dist.log_prob(x)`` for a distribution, and
    ``bijector.forward(x)`` for a bijector. The Lipschitz bound is kept by the
    layers themselves in any training loop.

    Example:
    ```python
    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import IResBlock
    from rflow_tf.distribution import FlowLayer
    tfb, tfd = tfp.bijectors, tfp.distributions

    blocks = [IResBlock.dense(2, hidden_units=(8,), coeff=0.9) for _ in range(2)]
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)),
                                       tfb.Invert(tfb.Chain(blocks)))
    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.flow = FlowLayer(dist)
        def call(self, x):
            return self.flow(x)
    model = Model()
    lp = model(tf.random.normal([4, 2]))   # log p(x), [4]
    print(len(model.trainable_weights))     # every weight of the blocks
    assert lp.shape == (4,) and model.trainable_weights
    ```
    """

    def __init__(self, flow, **kwargs):
        super().__init__(**kwargs)
        parts = rlayers.keras_layers(flow)
        if not parts:
            raise ValueError(f"FlowLayer: found no Keras layers inside {type(flow).__name__}")
        object.__setattr__(self, "_flow", flow)  # a tf.Module: keep out of Keras tracking
        self.flow_parts = parts  # tracked: their weights are this layer's
        self.built = True

    @property
    def flow(self):
        """The wrapped distribution or bijector."""
        return self._flow

    def call(self, x):
        if isinstance(self._flow, tfd.Distribution):
            return self._flow.log_prob(x)
        return self._flow.forward(x)

    def get_config(self):
        raise NotImplementedError(
            "FlowLayer wraps a Python object and has no config; save its "
            "weights with tf.train.Checkpoint or model.save_weights"
        )
