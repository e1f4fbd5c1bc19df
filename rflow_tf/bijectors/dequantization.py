"""Dequantisation of integer data for continuous flows: uniform and variational (Flow++).

For integers x in {0, ..., 2^n - 1}^D and a continuous model density p on
[0, 1)^D of y = (x + u) / 2^n, each x owns a cube of volume 2^{-nD}, and for any
noise density q(u|x) on [0, 1)^D (Ho et al. 2019, eq. 12-13):

    log P(x) = log int_{[0,1)^D} p((x + u) / 2^n) 2^{-nD} du
             >= E_{u ~ q(.|x)} [ log p((x + u) / 2^n) - nD ln 2 - log q(u|x) ].

The negative of the right-hand side is the training loss (the negative ELBO);
divided by D ln 2 it is the reported bits/dim, an upper bound on the
model's discrete bits/dim (the "dequantisation bound"). Uniform q (log q = 0)
is the special case of :func:`rflow_tf.data.dequantize`; a learned q tightens
the bound.

:class:`VariationalDequantizer` draws u from a small conditional flow:
eps ~ N(0, I), v = c_K o ... o c_1(eps) with :class:`MixLogCDFCoupling` layers
conditioned on features of x, then u = sigmoid(v), so

    log q(u|x) = log N(eps; 0, I) - sum_k log|det dc_k| - sum_d [log s(v_d) + log s(-v_d)].

Both dequantisers take any ``log_prob_fn(y)`` (e.g. ``ResidualFlow.log_prob``
or a ``TransformedDistribution.log_prob``) and share the bookkeeping of
:meth:`negative_elbo` and :meth:`bits_per_dim`.
"""

import math

import keras
import tensorflow as tf

from rflow_tf.bijectors._base import hidden_sizes, positive_int
from rflow_tf.bijectors.mixlogcdf import MixLogCDFCoupling
from rflow_tf.data import bits_per_dim_offset
from rflow_tf.data._checks import check_n_bits

__all__ = ["UniformDequantizer", "VariationalDequantizer"]

_LOG_2PI = math.log(2.0 * math.pi)


class _Dequantizer(tf.Module):
    """Shared bookkeeping: subclasses define ``sample_and_log_prob(x_int, seed)``."""

    def __init__(self, event_shape, n_bits, dtype, name):
        super().__init__(name=name)
        self.event_shape_ = tuple(int(s) for s in event_shape)
        if len(self.event_shape_) not in (1, 3) or min(self.event_shape_) < 1:
            raise ValueError(
                f"event_shape must be (D,) or (H, W, C) with positive sizes, got {event_shape!r}"
            )
        self.n_bits = check_n_bits(n_bits)
        self.dtype = tf.as_dtype(dtype)
        self.num_dims = int(math.prod(self.event_shape_))

    def _check_x(self, x_int):
        x = tf.convert_to_tensor(x_int)
        rank = len(self.event_shape_)
        if x.shape.rank is not None and tuple(x.shape[-rank:]) != self.event_shape_:
            raise ValueError(
                f"{self.name}: expected integer data of event shape "
                f"{self.event_shape_}, got shape {x.shape}"
            )
        return tf.cast(x, self.dtype)

    def dequantize(self, x_int, seed):
        """(y, log q(u|x)): y = (x + u) / 2^n in [0, 1)^D with u ~ q(.|x); log q per example.

        Example: ``y, log_q = deq.dequantize(x_int, seed=[0, 1])``.
        """
        x = self._check_x(x_int)
        u, log_q = self.sample_and_log_prob(x, seed)
        return (x + u) / float(2**self.n_bits), log_q

    def negative_elbo(self, x_int, log_prob_fn, seed):
        """Per-example -(log p(y) - nD ln 2 - log q(u|x)) in nats, one draw of u per example.

        ``log_prob_fn(y)`` is the continuous model log-density of y in [0, 1)^D
        (batch shape of ``x_int``). Its mean over data is the training loss;
        its expectation is >= -log P(x).

        Example: ``loss = tf.reduce_mean(deq.negative_elbo(x_int, dist.log_prob, [0, step]))``.
        """
        y, log_q = self.dequantize(x_int, seed)
        offset = tf.constant(bits_per_dim_offset(self.n_bits, self.num_dims), y.dtype)
        return -(log_prob_fn(y) - offset - log_q)

    def bits_per_dim(self, x_int, log_prob_fn, seed):
        """Per-example negative ELBO / (D ln 2): the dequantisation bound on bits/dim.

        Example: ``bpd = tf.reduce_mean(deq.bits_per_dim(x_test, flow.log_prob, [1, 2]))``.
        """
        return self.negative_elbo(x_int, log_prob_fn, seed) / (self.num_dims * math.log(2.0))


class UniformDequantizer(_Dequantizer):
    """u ~ Uniform[0, 1)^D, log q(u|x) = 0: the standard dequantisation bound.

    Example:
    ```python
    import numpy as np
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import UniformDequantizer
    tfd = tfp.distributions

    deq = UniformDequantizer((8, 8, 1), n_bits=8)
    model = tfd.Independent(tfd.Uniform(tf.zeros([8, 8, 1]), 1.0), 3)   # p(y) = 1 on [0,1)^D
    x_int = tf.random.uniform([4, 8, 8, 1], 0, 256, tf.int32)
    bpd = deq.bits_per_dim(x_int, model.log_prob, seed=[0, 1])   # [4], exactly 8.0
    np.testing.assert_allclose(bpd, 8.0, rtol=1e-6)
    ```
    """

    def __init__(self, event_shape, n_bits=8, dtype=tf.float32, name="uniform_dequantizer"):
        super().__init__(event_shape, n_bits, dtype, name)

    def sample_and_log_prob(self, x, seed):
        """(u, log q(u|x) = 0) for float ``x`` of shape [..., *event_shape]."""
        u = tf.random.stateless_uniform(tf.shape(x), seed, dtype=self.dtype)
        return u, tf.zeros(tf.shape(x)[: tf.rank(x) - len(self.event_shape_)], self.dtype)


class VariationalDequantizer(_Dequantizer):
    """Flow++ variational dequantisation: u ~ q(u|x), a conditional flow, then a sigmoid.

    Features of x: h = Conv3(elu(Conv3(x / (2^n - 1) - 1/2))) with
    ``feature_channels`` channels (1-D convolutions over the D entries of a
    vector, 2-D over an image). Noise: eps ~ N(0, I) of ``event_shape``,
    v = c_K o ... o c_1(eps) with ``num_couplings`` :class:`MixLogCDFCoupling`
    layers (alternating checkerboard masks) whose conditioners also see h,
    then u = sigmoid(v) in (0, 1)^D and

        log q(u|x) = log N(eps; 0, I) - sum_k log|det dc_k/d.| - sum_d [log s(v_d) + log s(-v_d)].

    Train it jointly with the model on :meth:`negative_elbo` (gradients flow to
    both through the reparameterised u). ``trainable_variables`` lists every
    weight (feature net and couplings). A fresh dequantiser has identity
    couplings, so u = sigmoid(eps) (logit-normal) at the start.

    Args:
      event_shape: ``(D,)`` or ``(H, W, C)`` of one example.
      n_bits: bits per value, 1..8 (x in {0, ..., 2^n - 1}).
      num_couplings: K >= 1.
      feature_channels: channels of h (positive).
      num_components: logistics per element of each coupling (see
        :class:`MixLogCDFCoupling`).
      hidden_channels: width of each coupling's conditioner.
      num_blocks: conditioner blocks per coupling.
      attention: whether those blocks have attention.
      num_heads: attention heads.
      dtype: float32 (default) or float64.

    Example:
    ```python
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import VariationalDequantizer
    tfd = tfp.distributions

    deq = VariationalDequantizer((2,), n_bits=3, num_couplings=2, hidden_channels=8)
    model = tfd.Independent(tfd.Beta(tf.fill([2], 2.0), 3.0), 1)   # any log p(y) on [0,1)^D
    x_int = tf.constant([[1, 5], [0, 7]])
    y, log_q = deq.dequantize(x_int, seed=[0, 1])        # y in [x / 8, (x + 1) / 8)
    assert tf.reduce_all(tf.floor(y * 8) == tf.cast(x_int, tf.float32))
    optimizer = tf.optimizers.Adam(1e-2)
    for step in range(3):   # train q (jointly with the model, in practice)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(deq.negative_elbo(x_int, model.log_prob, [0, step]))
        grads = tape.gradient(loss, deq.trainable_variables)
        optimizer.apply_gradients(zip(grads, deq.trainable_variables))
        print(f"step {step}: negative ELBO {float(loss):.3f} nats")
    ```

    #### References
    [1] Ho et al., Flow++, ICML 2019, Section 3.1.
    """

    def __init__(
        self,
        event_shape,
        n_bits=8,
        num_couplings=4,
        feature_channels=8,
        num_components=4,
        hidden_channels=16,
        num_blocks=1,
        attention=False,
        num_heads=2,
        dtype=tf.float32,
        name="variational_dequantizer",
    ):
        super().__init__(event_shape, n_bits, dtype, name)
        self.num_couplings = positive_int(num_couplings, "num_couplings")
        self.feature_channels = hidden_sizes(feature_channels, "feature_channels")[0]
        vector = len(self.event_shape_) == 1
        conv = keras.layers.Conv1D if vector else keras.layers.Conv2D
        self.features_net = keras.Sequential(
            [
                keras.Input((self.event_shape_ + (1,)) if vector else self.event_shape_),
                conv(
                    self.feature_channels,
                    3,
                    padding="same",
                    activation="elu",
                    dtype=self.dtype.name,
                ),
                conv(self.feature_channels, 3, padding="same", dtype=self.dtype.name),
            ],
            name=f"{name}_features",
        )
        self.couplings = [
            MixLogCDFCoupling(
                self.event_shape_,
                parity=k % 2,
                num_components=num_components,
                hidden_channels=hidden_channels,
                num_blocks=num_blocks,
                attention=attention,
                num_heads=num_heads,
                condition_channels=self.feature_channels,
                dtype=self.dtype,
                name=f"{name}_coupling_{k}",
            )
            for k in range(self.num_couplings)
        ]
        self._keras_tf_variables = tuple(w.value for w in self.features_net.weights)

    def features(self, x):
        """h(x): [..., *positions, feature_channels] from float integers ``x``."""
        scaled = x / float(2**self.n_bits - 1) - 0.5
        if len(self.event_shape_) == 1:
            scaled = scaled[..., None]
        return self.features_net(scaled)

    def sample_and_log_prob(self, x, seed):
        """(u, log q(u|x)) for float integers ``x`` [batch, *event_shape], u in (0, 1).

        Example: ``u, log_q = deq.sample_and_log_prob(tf.cast(x_int, tf.float32), [0, 1])``.
        """
        eps = tf.random.stateless_normal(tf.shape(x), seed, dtype=self.dtype)
        return self.noise_and_log_prob(eps, x)

    def noise_and_log_prob(self, eps, x):
        """The deterministic part of q: (u(eps; x), log q(u|x)) for base noise ``eps``.

        Example: ``u, log_q = deq.noise_and_log_prob(tf.random.normal(x.shape), x)``.
        """
        axes = list(range(1, 1 + len(self.event_shape_)))
        log_q = -0.5 * tf.reduce_sum(tf.square(eps), axis=axes) - 0.5 * self.num_dims * _LOG_2PI
        h = self.features(x)
        v = eps
        for c in self.couplings:
            v, ld = c.forward_and_log_det(v, condition=h)
            log_q -= ld
        log_q -= tf.reduce_sum(tf.math.log_sigmoid(v) + tf.math.log_sigmoid(-v), axis=axes)
        return tf.sigmoid(v), log_q
