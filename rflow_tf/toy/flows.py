"""The toy flows: ToyFlow (a chain of bijectors with an exact 2-D log-det for
evaluation) and build_flow for the five model families."""

import collections
import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rlayers
from rflow_tf.bijectors import ActNorm, IResBlock
from rflow_tf.bijectors.mixlogcdf import MixLogCDFCoupling
from rflow_tf.bijectors.sigmoidal_flows import DeepSigmoidalFlow

tfb = tfp.bijectors


MODELS = ("resflow", "iresnet", "coupling", "naf", "mixlogcdf")


#: The ``--activation`` names the non-residual toy models accept -> the Keras
#: activation of the coupling and NAF nets (no Lipschitz bound is needed there,
#: so "lipswish" is plain swish; mixlogcdf's nets keep their own).
COUPLING_ACTIVATIONS = {
    "lipswish": "swish",
    "swish": "swish",
    "elu": "elu",
    "relu": "relu",
    "softplus": "softplus",
    "identity": "linear",
}


_LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z):
    """log N(z; 0, I) = -0.5 ||z||^2 - (D/2) log(2 pi), summed over the last axis.

    Example:
    ```python
    standard_normal_log_prob(tf.zeros([3, 2]))   # [-1.8379, -1.8379, -1.8379]
    ```
    """
    d = tf.cast(tf.shape(z)[-1], z.dtype)
    return -0.5 * tf.reduce_sum(tf.square(z), axis=-1) - 0.5 * d * tf.cast(_LOG_2PI, z.dtype)


class _CouplingNet:
    """shift_and_log_scale_fn for ``tfb.RealNVP`` (a Keras 3 MLP, last layer zero).

    Returns (shift, log_scale) with log_scale = 2 tanh(raw / 2) in (-2, 2), so a
    freshly built coupling layer is the identity and no step can explode.
    """

    def __init__(self, num_masked, hidden_units, activation, name):
        self.model = keras.Sequential(
            [keras.Input((num_masked,))]
            + [keras.layers.Dense(u, activation=activation) for u in hidden_units]
            + [keras.layers.Dense(2, kernel_initializer="zeros")],
            name=name,
        )

    def __call__(self, x0, output_units, **condition_kwargs):
        h = self.model(x0)
        shift, raw = h[..., :output_units], h[..., output_units:]
        return shift, 2.0 * tf.tanh(0.5 * raw)


class ToyFlow(tf.Module):
    """A 2-D flow f = f_B o ... o f_1 (data -> latent) with a N(0, I) base.

    ``bijectors`` are applied in list order to data; residual blocks use their
    training estimator, ``eval_bijectors`` the same weights with the exact
    2-D log-det. Then

        log p(x) = log N(f(x); 0, I) + sum_b log |det J_{f_b}|,
        sample:   x = f_1^{-1}( ... f_B^{-1}(z)),  z ~ N(0, I)

    (fixed-point inverse for residual blocks).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.data import toy_2d
    from rflow_tf.toy import build_flow

    flow = build_flow("resflow", blocks=2, hidden=(16,), actnorm=True)
    flow.initialize(toy_2d("moons", 500, seed=0))       # ActNorm's data-dependent start
    x = toy_2d("moons", 8, seed=1)
    lp = flow.log_prob(x, seed=[1, 2], training=True)   # unbiased estimate
    lp_exact = flow.log_prob_exact(x)                   # exact 2-D log-det
    print(float(tf.reduce_mean(lp - lp_exact)))         # about 0: the estimate's error
    samples = flow.sample(100, seed=0)                  # [100, 2], fixed-point inverse
    assert lp.shape == lp_exact.shape == [8] and samples.shape == [100, 2]
    ```
    """

    def __init__(self, bijectors, eval_bijectors, keras_models, model_type, name="toy_flow"):
        super().__init__(name=name)
        self.bijectors = list(bijectors)
        self.eval_bijectors = list(eval_bijectors)
        self.keras_models = list(keras_models)
        self.model_type = model_type
        self.lipschitz = rlayers.lipschitz_layers(self.keras_models)

    @property
    def variables_to_train(self):
        """Trainable weights of every Keras model in the flow (nets, ActNorms)."""
        out = []
        for m in self.keras_models:
            out.extend(m.trainable_variables)
        return out

    def initialize(self, x):
        """Data-dependent ActNorm initialisation from the batch ``x``: each ActNorm
        sees the batch pushed through the bijectors before it (no-op without ActNorm).

        Example: ``flow.initialize(toy_2d("moons", 1000, seed=0))``.
        """
        z = tf.convert_to_tensor(x, tf.float32)
        for b in self.bijectors:
            if isinstance(b, ActNorm):
                b.initialize(z)
            z = b.forward(z)
        return z

    @staticmethod
    def _apply(bijectors, x, seed=None, training=False):
        z = tf.convert_to_tensor(x, tf.float32)
        ld = tf.zeros(tf.shape(z)[:-1], z.dtype)
        n_random = sum(isinstance(b, IResBlock) for b in bijectors)
        seeds = (
            tf.random.experimental.stateless_split(
                tf.convert_to_tensor(seed, tf.int32), max(n_random, 1)
            )
            if seed is not None and n_random
            else None
        )
        i = 0
        for b in bijectors:
            if isinstance(b, IResBlock):
                z, ld_b = b.forward_and_log_det(
                    z, seed=None if seeds is None else seeds[i], training=training
                )
                i += 1
            elif isinstance(b, MixLogCDFCoupling):
                z, ld_b = b.forward_and_log_det(z)  # one conditioner pass
            else:
                ld_b = b.forward_log_det_jacobian(z, event_ndims=1)
                z = b.forward(z)
            ld = ld + ld_b
        return z, ld

    def log_prob(self, x, seed=None, training=False):
        """log p(x) = log N(f(x); 0, I) + sum_b log|det J_b| with the training
        estimator of each block ([batch]).

        ``seed``: stateless seed (shape [2]) split across the residual blocks;
        ``training=True`` selects the blocks' training settings.

        Example: ``flow.log_prob(x, seed=[0, it], training=True)``.
        """
        z, ld = self._apply(self.bijectors, x, seed, training)
        return standard_normal_log_prob(z) + ld

    def log_prob_exact(self, x):
        """log p(x) with the exact 2-D log-det log|det(I + J_g)| of every block ([batch]).

        Example: ``nll = -tf.reduce_mean(flow.log_prob_exact(x_test))``.
        """
        z, ld = self._apply(self.eval_bijectors, x)
        return standard_normal_log_prob(z) + ld

    def sample(self, n, seed=0):
        """``n`` samples x = f^{-1}(z), z ~ N(0, I) (fixed-point inverse
        x <- y - g(x) for residual blocks). ``seed``: int or stateless seed.

        Example: ``x = flow.sample(1000, seed=0)  # [1000, 2]``.
        """
        seed = [int(seed), 0] if isinstance(seed, (int, np.integer)) else seed
        x = tf.random.stateless_normal([int(n), 2], seed)
        for b in reversed(self.eval_bijectors):
            x = b.inverse(x)
        return x


def build_flow(
    model="resflow",
    blocks=10,
    hidden=(128, 128, 128, 128),
    activation="lipswish",
    coeff=0.9,
    actnorm=False,
    dist="poisson",
    rate=2.0,
    p=0.5,
    n_exact_terms=2,
    n_samples=1,
    n_power_series=5,
    neumann_grad=True,
    grad_in_forward=False,
    init="reference",
    preactivation=True,
    last_layer_scale=1e-3,
    vnorms="2",
    learn_p=False,
):
    """Builds a :class:`ToyFlow` of one of :data:`MODELS` for 2-D data.

    * ``resflow``: ``blocks`` x IResBlock(logdet="unbiased") with
      g = LipschitzDense(2 -> h_1) phi ... phi LipschitzDense(h_L -> 2)
      (with ``preactivation``, phi is applied to the input too, as in the
      reference), every spectral norm <= ``coeff``; roulette ``dist``
      (``rate``/``p``), ``n_exact_terms`` exact terms, ``n_samples`` draws.
      ``init`` (:data:`rflow_tf.layers.INITS`) and ``last_layer_scale`` (the
      reference's 1e-3: blocks start near the identity) set the initial weights.
      ``vnorms``, ``learn_p``: the norm orders of each net's linear maps
      (:func:`rflow_tf.layers.lipschitz_dense_net`); default: spectral norm.
    * ``iresnet``: the same blocks, logdet="truncated" with ``n_power_series`` terms.
    * ``coupling``: ``blocks`` x [tfb.RealNVP(num_masked=1), tfb.Permute([1, 0])],
      shift and log-scale from an MLP with widths ``hidden``.
    * ``naf``: ``blocks`` x [DeepSigmoidalFlow(2, 8 sigmoids), tfb.Permute([1, 0])],
      MADE conditioner with widths ``hidden``; sampling inverts by bisection.
    * ``mixlogcdf``: ``blocks`` x MixLogCDFCoupling((2,)) with 8 logistics, the
      kept coordinate alternating; conditioner of ``hidden[0]`` channels and
      ``len(hidden) // 2`` gated conv blocks (no attention: 2 positions);
      sampling inverts by bisection.

    With ``actnorm``, an ActNorm comes before the first and after every block.
    The evaluation copy of each residual block shares its net and uses
    logdet="exact".

    Example:
    ```python
    flow = build_flow("iresnet", blocks=5, hidden=(64, 64), n_power_series=5)
    ```
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    activation = "lipswish" if activation == "swish" else activation
    train_b, eval_b, models = [], [], []

    def add_actnorm(i):
        an = ActNorm(
            event_shape=(2,),
            name=f"actnorm_{i}",
            layer=rlayers.ActNormalization(
                variance="unbiased" if init == "reference" else "biased", name=f"actnorm_{i}"
            ),
        )
        train_b.append(an)
        eval_b.append(an)
        models.append(an.layer)

    if actnorm:
        add_actnorm(0)
    for i in range(int(blocks)):
        if model == "coupling":
            net = _CouplingNet(1, hidden, COUPLING_ACTIVATIONS[activation], name=f"coupling_{i}")
            layer = tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=net, name=f"realnvp_{i}")
            perm = tfb.Permute([1, 0], name=f"permute_{i}")
            train_b += [layer, perm]
            eval_b += [layer, perm]
            models.append(net.model)
        elif model == "naf":
            layer = DeepSigmoidalFlow(
                2,
                num_components=8,
                hidden_units=hidden,
                activation=COUPLING_ACTIVATIONS[activation],
                name=f"dsf_{i}",
            )
            perm = tfb.Permute([1, 0], name=f"permute_{i}")
            train_b += [layer, perm]
            eval_b += [layer, perm]
            models.append(layer.conditioner)
        elif model == "mixlogcdf":
            layer = MixLogCDFCoupling(
                (2,),
                parity=i % 2,
                num_components=8,
                hidden_channels=hidden[0],
                num_blocks=max(1, len(hidden) // 2),
                attention=False,
                name=f"mixlogcdf_{i}",
            )
            train_b.append(layer)
            eval_b.append(layer)
            models.append(layer.net)
        else:
            net = rlayers.lipschitz_dense_net(
                2,
                hidden,
                coeff,
                activation,
                preactivation=bool(preactivation),
                name=f"resnet_{i}",
                init=init,
                last_layer_scale=last_layer_scale,
                vnorms=vnorms,
                learn_p=learn_p,
            )
            kw = dict(
                neumann_grad=bool(neumann_grad),
                grad_in_forward=bool(grad_in_forward) and bool(neumann_grad),
                name=f"block_{i}",
            )
            if model == "resflow":
                block = IResBlock(
                    net,
                    logdet="unbiased",
                    dist=dist,
                    rate=rate,
                    p=p,
                    n_exact_terms=n_exact_terms,
                    n_samples=n_samples,
                    **kw,
                )
            else:
                block = IResBlock(net, logdet="truncated", n_terms=n_power_series, **kw)
            train_b.append(block)
            eval_b.append(
                IResBlock(
                    net,
                    logdet="exact",
                    inverse_atol=1e-5,
                    inverse_rtol=1e-5,
                    inverse_max_iterations=500,
                    name=f"block_{i}_exact",
                )
            )
            models.append(net)
        if actnorm:
            add_actnorm(i + 1)
    return ToyFlow(train_b, eval_b, models, model)


def power_iterate_all(layers, n):
    """``n`` power-iteration steps for many :class:`rflow_tf.layers.LipschitzDense`
    layers at once: kernels of equal shape are stacked, so the whole update is
    a few batched ops instead of ~10 per layer and step.

        v <- normalize(W^T u),  u <- normalize(W v),  sigma = u^T W v

    (W = kernel^T, the same update and stored state as ``layer.power_iterate(n)``).
    Other Lipschitz layers fall back to their own ``power_iterate``.

    Example:
    ```python
    import keras
    import numpy as np
    from rflow_tf import layers as rlayers
    from rflow_tf.toy import build_flow, power_iterate_all

    keras.utils.set_random_seed(0)                         # the same initial weights every run
    flow = build_flow("resflow", blocks=2, hidden=(16,))   # two nets: 2 -> 16 -> 2
    layers = rlayers.lipschitz_layers(flow.keras_models)   # 4 layers, 2 kernel shapes
    # (in training: optimizer.apply_gradients(...), then a few steps, e.g. 5)
    power_iterate_all(layers, 50)
    for layer in layers:   # sigma: the largest singular value of the kernel
        top = np.linalg.svd(layer.kernel.numpy(), compute_uv=False)[0]
        assert abs(float(layer.sigma) - top) <= 1e-4 * top
    ```
    """
    groups = collections.defaultdict(list)
    for layer in layers:
        if isinstance(layer, rlayers.LipschitzDense) and layer.is_spectral:
            groups[tuple(layer.kernel.shape)].append(layer)
        else:
            layer.power_iterate(n)
    for group in groups.values():
        k = tf.stop_gradient(tf.stack([tf.convert_to_tensor(layer.kernel) for layer in group]))
        u = tf.stack([tf.convert_to_tensor(layer.u) for layer in group])  # [G, units]
        v = tf.stack([tf.convert_to_tensor(layer.v) for layer in group])  # [G, d_in]

        def normalize(t):
            return t / (tf.norm(t, axis=-1, keepdims=True) + 1e-12)

        for _ in range(int(n)):
            v = normalize(tf.linalg.matvec(k, u))  # W^T u
            u = normalize(tf.linalg.matvec(k, v, transpose_a=True))  # W v
        sigma = tf.reduce_sum(u * tf.linalg.matvec(k, v, transpose_a=True), axis=-1)
        # one Unpack per tensor, where indexing would add a slice and its
        # three constants per layer
        for layer, u_i, v_i, sigma_i in zip(group, tf.unstack(u), tf.unstack(v), tf.unstack(sigma)):
            layer.u.assign(u_i)
            layer.v.assign(v_i)
            layer.sigma.assign(sigma_i)
