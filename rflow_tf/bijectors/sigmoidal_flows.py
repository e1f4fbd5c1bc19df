"""Neural autoregressive flows: deep sigmoidal (DSF) and deep dense sigmoidal (DDSF) bijectors.

Huang, Krueger, Lacoste, Courville, "Neural Autoregressive Flows", ICML 2018.

Each bijector maps x in R^D to y in R^D autoregressively: y_t = tau(x_t; c_t(x_{<t})),
where tau is a strictly increasing scalar network whose (pseudo-)parameters
c_t come from a MADE conditioner (:class:`MADE`, Keras 3). The Jacobian dy/dx
is lower triangular, so log|det dy/dx| = sum_t log dtau/dx_t, computed in
log-space. The inverse runs dimension by dimension (x_t needs x_{<t}), each a
1-D bisection (:func:`rflow_tf.bijectors.monotone.bisect_increasing`) with the stated
tolerance ``inverse_atol + inverse_rtol * |x|`` (and the same on y_t). An
element whose bisection finds no bracket (y outside the map's numerical
range, e.g. with slopes that underflowed to 0) or misses the tolerance is
NaN, and so (through the MADE's parameters, which then are NaN) are the later
dimensions of its row; this is reported (a ``RuntimeWarning`` eagerly,
stderr in a graph; under XLA the NaN is the report), never returned as a
wrong value.

Direction: ``forward`` is the cheap direction, data -> latent (as in
:mod:`rflow_tf.bijectors`, a MAF-style density model). Use it in a
``tfd.TransformedDistribution`` through ``tfb.Invert``, so ``log_prob`` runs
the forward pass and ``sample`` runs the bisection.

Variables: ``trainable_variables`` lists the conditioner's Keras weights, so
``tfp.math.minimize(..., trainable_variables=dist.trainable_variables)`` works.
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf.bijectors._base import (
    KerasBacked,
    check_bisection_settings,
    hidden_sizes,
    positive_int,
)
from rflow_tf.bijectors.monotone import (
    bisect_increasing_with_diagnostics,
    log_softplus,
    logit_of_log_mixture,
    report_bisection_failures,
    sigmoid_mixture_logit,
)

tfb = tfp.bijectors

__all__ = ["MADE", "DeepSigmoidalFlow", "DeepDenseSigmoidalFlow"]


class MADE(keras.layers.Layer):
    """Masked autoencoder for distribution estimation (Germain et al. 2015), Keras 3.

    Maps x in R^D to parameters p in R^{D x P} with p[t] depending only on
    x[:t] (strictly earlier dimensions): every weight matrix is multiplied by
    a fixed 0/1 mask built from degrees m(input t) = t + 1, hidden degrees
    cycling through 1..D-1, and m(output of dimension t) = t + 1 (an output
    sees a hidden unit only if its degree is strictly larger).

    Args:
      event_size: D.
      params_per_dim: P.
      hidden_units: widths of the hidden layers (positive ints).
      activation: Keras activation of the hidden layers.

    Example:
    ```python
    made = MADE(3, params_per_dim=6, hidden_units=(32, 32))
    p = made(tf.random.normal([8, 3]))     # [8, 3, 6]; p[:, 0] is constant in x
    ```
    """

    def __init__(
        self, event_size, params_per_dim, hidden_units=(64, 64), activation="elu", **kwargs
    ):
        super().__init__(**kwargs)
        self.event_size = positive_int(event_size, "event_size")
        self.params_per_dim = positive_int(params_per_dim, "params_per_dim")
        self.hidden_units = hidden_sizes(hidden_units)
        self.activation = keras.activations.get(activation)
        self._activation_name = activation
        d = self.event_size
        degrees = [np.arange(1, d + 1)]
        for h in self.hidden_units:
            degrees.append(np.arange(h) % max(d - 1, 1) + 1)
        out_degrees = np.repeat(np.arange(1, d + 1), self.params_per_dim)
        self._masks = [
            (degrees[k + 1][None, :] >= degrees[k][:, None]).astype(np.float32)
            for k in range(len(self.hidden_units))
        ]
        self._masks.append((out_degrees[None, :] > degrees[-1][:, None]).astype(np.float32))

    def build(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != self.event_size:
            raise ValueError(
                f"MADE built for event_size={self.event_size}, got inputs of "
                f"shape {tuple(input_shape)}"
            )
        self.kernels, self.biases = [], []
        for k, mask in enumerate(self._masks):
            self.kernels.append(
                self.add_weight(shape=mask.shape, name=f"kernel_{k}", initializer="glorot_uniform")
            )
            self.biases.append(
                self.add_weight(shape=(mask.shape[1],), name=f"bias_{k}", initializer="zeros")
            )

    def call(self, x):
        h = x
        for k, (w, b, mask) in enumerate(zip(self.kernels, self.biases, self._masks)):
            h = tf.matmul(h, w * tf.constant(mask, w.dtype)) + b
            if k < len(self._masks) - 1:
                h = self.activation(h)
        return tf.reshape(
            h, tf.concat([tf.shape(x)[:-1], [self.event_size, self.params_per_dim]], 0)
        )

    def get_config(self):
        return {
            **super().get_config(),
            "event_size": self.event_size,
            "params_per_dim": self.params_per_dim,
            "hidden_units": self.hidden_units,
            "activation": self._activation_name,
        }


class _AutoregressiveMonotone(KerasBacked):
    """y_t = tau(x_t; params_t(x_{<t})); subclasses define ``_transform``, ``_params_per_dim``."""

    def __init__(
        self,
        event_size,
        conditioner,
        hidden_units,
        activation,
        inverse_atol,
        inverse_rtol,
        inverse_max_iterations,
        dtype,
        validate_args,
        name,
        parameters,
    ):
        self.event_size = positive_int(event_size, "event_size")
        dtype, self.inverse_atol, self.inverse_rtol, self.inverse_max_iterations = (
            check_bisection_settings(dtype, inverse_atol, inverse_rtol, inverse_max_iterations)
        )
        p = self._params_per_dim()
        if conditioner is None:  # autoregressive by construction: no Jacobian check
            self.conditioner = MADE(
                self.event_size, p, hidden_units, activation, dtype=dtype.name, name=f"{name}_made"
            )
            self.conditioner.build((None, self.event_size))
        else:
            self.conditioner = conditioner
            self._check_conditioner(dtype)
        if isinstance(self.conditioner, keras.layers.Layer):
            self._track_keras(self.conditioner)
        super().__init__(
            forward_min_event_ndims=1,
            dtype=dtype,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    def _check_conditioner(self, dtype):
        """A user conditioner: shape [..., D, P] and autoregressive (d params[t]/d x[s] = 0
        for s >= t, checked on a random batch by its full Jacobian)."""
        d, p = self.event_size, self._params_per_dim()
        x = tf.random.stateless_normal([2, d], [7, 11], dtype=dtype)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = self.conditioner(x)
        if tuple(out.shape) != (2, d, p):
            raise ValueError(
                f"conditioner must map [batch, {d}] to [batch, {d}, {p}] "
                f"(event_size, params per dimension), got {tuple(out.shape)}"
            )
        jac = tape.batch_jacobian(out, x)  # [2, D, P, D]
        if jac is not None:
            dep = np.abs(jac.numpy()).max(axis=(0, 2)) > 0  # dep[t, s]: params[t] uses x[s]
            bad = np.argwhere(np.triu(dep))
            if bad.size:
                t, s = bad[0]
                raise ValueError(
                    f"conditioner mask mismatch: the parameters of dimension {t} "
                    f"depend on x[{s}], but may only use x[:{t}] "
                    "(the conditioner is not autoregressive)"
                )

    def _check_input(self, x):
        if x.shape.rank is not None and x.shape[-1] is not None and x.shape[-1] != self.event_size:
            raise ValueError(
                f"{self.name}: expected event size {self.event_size}, got input of shape {x.shape}"
            )

    def _flat(self, x):
        self._check_input(x)
        return tf.reshape(x, [-1, self.event_size])

    def forward_and_log_det(self, x):
        """(y, log|det dy/dx|) from one conditioner pass.

        Example: ``y, ld = flow.forward_and_log_det(x)``.
        """
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        flat = self._flat(x)
        y, ld = self._transform(flat, self.conditioner(flat))
        batch = tf.shape(x)[:-1]
        return (tf.reshape(y, tf.shape(x)), tf.reshape(tf.reduce_sum(ld, axis=-1), batch))

    def _forward(self, x):
        return self.forward_and_log_det(x)[0]

    def _forward_log_det_jacobian(self, x):
        return self.forward_and_log_det(x)[1]

    def _inverse(self, y):
        """Dimension by dimension: x_t = tau^{-1}(y_t; params_t(x_{<t})) by bisection.

        An element without a bracket or not within the tolerance is NaN (and with
        the MADE, whose outputs a NaN input makes NaN, so are the later
        dimensions of its row), reported by
        :func:`rflow_tf.bijectors.monotone.report_bisection_failures`."""
        flat_y = self._flat(y)
        cols, brackets, oks = [], [], []
        for t in range(self.event_size):
            known = tf.stack(cols, axis=-1) if cols else flat_y[:, :0]
            x_cur = tf.concat([known, tf.zeros_like(flat_y[:, t:])], axis=-1)
            params_t = self.conditioner(x_cur)[:, t : t + 1, :]

            def tau(s, params_t=params_t):
                return self._transform(s[:, None], params_t)[0][:, 0]

            x_t, bracketed, ok = bisect_increasing_with_diagnostics(
                tau,
                flat_y[:, t],
                self.inverse_atol,
                self.inverse_rtol,
                self.inverse_max_iterations,
            )
            cols.append(x_t)
            brackets.append(bracketed)
            oks.append(ok)
        x = report_bisection_failures(
            tf.stack(cols, axis=-1),
            tf.stack(brackets, axis=-1),
            tf.stack(oks, axis=-1),
            self.name,
            self.inverse_max_iterations,
        )
        return tf.reshape(x, tf.shape(y))


class DeepSigmoidalFlow(_AutoregressiveMonotone):
    """Deep sigmoidal flow (NAF-DSF): an autoregressive bijector on R^D.

    For each dimension t, with (a-raw_t, b_t, w-logits_t) = MADE(x_{<t}) in R^{3K}:

        y_t = logit( sum_{j=1}^K w_tj sigmoid(a_tj x_t + b_tj) ),
        w_t = softmax(w-logits_t) (on the simplex),  a_tj = softplus(a-raw_tj) > 0,
        log|det dy/dx| = sum_t log dy_t/dx_t,
        log dy_t/dx_t = logsumexp_j(log w_tj + log a_tj + log s(z_j) + log s(-z_j))
                        - log S_t - log(1 - S_t),

    with z_j = a_tj x_t + b_tj, s the sigmoid and S_t the mixture; every term is
    evaluated in log-space (:func:`rflow_tf.bijectors.monotone.sigmoid_mixture_logit`), so
    the map, its log-det and their gradients stay finite for |x| ~ 1e3 and beyond.
    Strictly increasing in x_t, onto R. Inverse: bisection per dimension, in
    order, to within ``inverse_atol + inverse_rtol * |x|``.

    ``forward`` is data -> latent (cheap); sample via ``tfb.Invert``.

    Args:
      event_size: D, the length of the vectors transformed.
      num_components: K >= 1 sigmoids per dimension.
      hidden_units: MADE hidden widths (positive ints).
      activation: MADE activation.
      conditioner: optional callable [N, D] -> [N, D, 3K] replacing the MADE; it is
        checked to be autoregressive (a "mask mismatch" raises ``ValueError``).
      inverse_atol: the bisection's absolute tolerance.
      inverse_rtol: its relative tolerance.
      inverse_max_iterations: its cap on iterations.
      dtype: float32 (default) or float64; the conditioner's weights use it too.

    Example:
    ```python
    import tensorflow as tf
    import tensorflow_probability as tfp
    from rflow_tf.bijectors import DeepSigmoidalFlow
    tfd, tfb = tfp.distributions, tfp.bijectors

    dsf = DeepSigmoidalFlow(2, num_components=8, hidden_units=(16,))   # data -> latent
    dist = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)),
                                       tfb.Invert(dsf))
    x = tf.random.normal([64, 2])
    optimizer = tf.optimizers.Adam(1e-2)
    for step in range(3):   # maximum likelihood
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(x))
        grads = tape.gradient(loss, dist.trainable_variables)
        optimizer.apply_gradients(zip(grads, dist.trainable_variables))
    z = dsf.forward(x[:4])
    x_back = dsf.inverse(z + 0.0)   # by bisection, elementwise along the autoregressive order
    assert float(tf.reduce_max(tf.abs(x_back - x[:4]))) < 1e-4
    ```

    #### References
    [1] Huang et al., Neural Autoregressive Flows, ICML 2018, eq. (8).
    [2] Germain et al., MADE, ICML 2015.
    """

    def __init__(
        self,
        event_size,
        num_components=8,
        hidden_units=(64, 64),
        activation="elu",
        conditioner=None,
        inverse_atol=1e-6,
        inverse_rtol=1e-6,
        inverse_max_iterations=200,
        dtype=tf.float32,
        validate_args=False,
        name="deep_sigmoidal_flow",
    ):
        parameters = dict(locals())
        self.num_components = positive_int(num_components, "num_components")
        super().__init__(
            event_size,
            conditioner,
            hidden_units,
            activation,
            inverse_atol,
            inverse_rtol,
            inverse_max_iterations,
            dtype,
            validate_args,
            name,
            parameters,
        )

    def _params_per_dim(self):
        return 3 * self.num_components

    def _transform(self, x, params):
        k = self.num_components
        a_raw, b, w_logits = params[..., :k], params[..., k : 2 * k], params[..., 2 * k :]
        return sigmoid_mixture_logit(
            x, tf.nn.log_softmax(w_logits, axis=-1), log_softplus(a_raw), b
        )


def _log_matmul(log_a, log_b):
    """log(exp(A) @ exp(B)) for positive matrices given by their logs ([.., m, k] @ [.., k, n])."""
    return tf.reduce_logsumexp(log_a[..., :, :, None] + log_b[..., None, :, :], axis=-2)


class DeepDenseSigmoidalFlow(_AutoregressiveMonotone):
    """Deep dense sigmoidal flow (NAF-DDSF): an autoregressive bijector on R^D.

    For each dimension t the scalar map x_t -> y_t is a stack of L dense
    sigmoidal layers h^0 = x_t (width 1) -> h^1 -> ... -> h^L = y_t (width 1), the
    hidden widths all ``hidden_size`` = H:

        C^{l+1} = a^{l+1} * (u^{l+1} h^l) + b^{l+1},                      (H)
        h^{l+1} = logit( w^{l+1} sigmoid(C^{l+1}) ),                     (d_{l+1})

    with u (H x d_l) and w (d_{l+1} x H) row-wise on the simplex (softmax), a > 0
    (softplus) and b free, all produced per dimension by a MADE of x_{<t}. Each layer
    is increasing in every input, so the map is strictly increasing. Its
    derivative is the product of the layer Jacobians (all entries positive),

        log dh^{l+1}_k/dh^l_i = logsumexp_j(log w_kj + log s(C_j) + log s(-C_j)
                                            + log a_j + log u_ji) - log D_k - log(1 - D_k),

    D_k = w_k . sigmoid(C), chained by log-space matrix products (logsumexp), so
    it is never formed outside log-space. With L = 1 this is the DSF with K = H.
    Inverse: bisection per dimension, in order, to within
    ``inverse_atol + inverse_rtol * |x|``.

    ``forward`` is data -> latent (cheap); sample via ``tfb.Invert``.

    Args:
      event_size: D.
      num_layers: L >= 1 dense sigmoidal layers.
      hidden_size: H >= 1, their width.
      hidden_units: the MADE's hidden widths, as in :class:`DeepSigmoidalFlow`.
      activation: the MADE's activation.
      conditioner: optional callable replacing the MADE; it outputs
        sum_l (H d_l + 2H + d_{l+1} H) parameters per dimension.
      inverse_atol: the bisection's absolute tolerance.
      inverse_rtol: its relative tolerance.
      inverse_max_iterations: its cap on iterations.
      dtype: float32 (default) or float64.

    Example:
    ```python
    ddsf = DeepDenseSigmoidalFlow(3, num_layers=2, hidden_size=8, hidden_units=(32,))
    x = tf.random.normal([5, 3])
    z, ld = ddsf.forward(x), ddsf.forward_log_det_jacobian(x, 1)
    x_back = ddsf.inverse(z + 0.0)     # bisection, |x_back - x| <~ 1e-6 (1 + |x|)
    ```

    #### References
    [1] Huang et al., Neural Autoregressive Flows, ICML 2018, Section 3.3 (DDSF).
    """

    def __init__(
        self,
        event_size,
        num_layers=2,
        hidden_size=16,
        hidden_units=(64, 64),
        activation="elu",
        conditioner=None,
        inverse_atol=1e-6,
        inverse_rtol=1e-6,
        inverse_max_iterations=200,
        dtype=tf.float32,
        validate_args=False,
        name="deep_dense_sigmoidal_flow",
    ):
        parameters = dict(locals())
        self.num_layers = positive_int(num_layers, "num_layers")
        self.hidden_size = hidden_sizes(hidden_size, "hidden_size")[0]
        super().__init__(
            event_size,
            conditioner,
            hidden_units,
            activation,
            inverse_atol,
            inverse_rtol,
            inverse_max_iterations,
            dtype,
            validate_args,
            name,
            parameters,
        )

    def _layer_widths(self):
        """(d_in, d_out) per layer: 1 -> H -> ... -> H -> 1."""
        h, n = self.hidden_size, self.num_layers
        return [(1 if k == 0 else h, 1 if k == n - 1 else h) for k in range(n)]

    def _params_per_dim(self):
        h = self.hidden_size
        return sum(h * d_in + 2 * h + d_out * h for d_in, d_out in self._layer_widths())

    def _transform(self, x, params):
        h_size = self.hidden_size
        h = x[..., None]  # [..., 1]
        log_jac = None  # [..., d_out, 1]
        start = 0
        for d_in, d_out in self._layer_widths():
            sizes = [h_size * d_in, h_size, h_size, d_out * h_size]
            u_logits, a_raw, b, w_logits = tf.split(
                params[..., start : start + sum(sizes)], sizes, axis=-1
            )
            start += sum(sizes)
            log_a = log_softplus(a_raw)
            log_u = tf.nn.log_softmax(
                tf.reshape(u_logits, tf.concat([tf.shape(u_logits)[:-1], [h_size, d_in]], 0))
            )
            log_w = tf.nn.log_softmax(
                tf.reshape(w_logits, tf.concat([tf.shape(w_logits)[:-1], [d_out, h_size]], 0))
            )
            c = tf.exp(log_a) * tf.linalg.matvec(tf.exp(log_u), h) + b  # [..., H]
            log_s, log_1ms, h = logit_of_log_mixture(log_w, c[..., None, :])  # [..., d_out]
            log_slope = log_a + tf.math.log_sigmoid(c) + tf.math.log_sigmoid(-c)  # [..., H]
            layer_jac = (
                tf.reduce_logsumexp(
                    log_w[..., :, :, None] + log_slope[..., None, :, None] + log_u[..., None, :, :],
                    axis=-2,
                )
                - (log_s + log_1ms)[..., None]
            )  # [..., d_out, d_in]
            log_jac = layer_jac if log_jac is None else _log_matmul(layer_jac, log_jac)
        return h[..., 0], log_jac[..., 0, 0]
