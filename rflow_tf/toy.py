"""2-D toy densities: residual flow, i-ResNet, coupling, NAF and Flow++ models and their loop.

The paper's 2-D experiments (Chen et al. 2019, Fig. 3): a flow f (data ->
latent, the cheap direction of a residual block) is fitted by maximum
likelihood,

    log p(x) = log N(f(x); 0, I) + sum_b log |det df_b/dx_b|,

where the sum runs over the flow's bijectors b (residual blocks, optional
ActNorm, or coupling layers). Four model families:

* ``resflow``  -- invertible residual blocks x + g(x), Lip(g) <= coeff, with
  the *unbiased* Russian-roulette log-det estimator and Neumann gradients.
* ``iresnet``  -- the same blocks with the *truncated* (biased) power series
  of i-ResNets (``--n_power_series`` terms).
* ``coupling`` -- TFP's own ``tfb.RealNVP`` affine coupling layers with
  ``tfb.Permute`` between them (a Glow/RealNVP-style baseline).
* ``naf``      -- neural autoregressive flow: ``DeepSigmoidalFlow`` layers
  (``rflow_tf.bijectors.sigmoidal_flows``) with ``tfb.Permute`` between them.
* ``mixlogcdf`` -- Flow++ logistic-mixture CDF couplings
  (``rflow_tf.bijectors.mixlogcdf.MixLogCDFCoupling``, vector mode, alternating halves).

Evaluation always uses the exact 2-D log-det (``slogdet(I + J_g)`` per block),
so the test negative log-likelihood (nats) is comparable across models.
Samples are drawn through the fixed-point inverse of the residual blocks
(the analytic inverse for coupling layers).

Options: :func:`run` takes the command line's options as a list of strings,
a dict or a Namespace; :func:`build_parser` is their single definition
(defaults, checks, help), which ``train/toy.py``, the command line, shares.

In-process::

    from rflow_tf.toy import run
    result = run({"data": "moons", "model": "coupling", "iters": 50})
    result["test_nll"], result["sec_per_iter"], result["png"]

Command line (see ``python -m train.toy --help``)::

    python -m train.toy --data 8gaussians --model resflow --iters 2000 --out /tmp/toy
"""

import argparse
import collections
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rlayers
from rflow_tf.bijectors import ActNorm, IResBlock
from rflow_tf.bijectors.mixlogcdf import MixLogCDFCoupling
from rflow_tf.bijectors.sigmoidal_flows import DeepSigmoidalFlow
from rflow_tf.data import TOY_DATASETS, toy_2d

tfb = tfp.bijectors

__all__ = [
    "MODELS",
    "PLOT_LIMIT",
    "ToyFlow",
    "build_flow",
    "build_parser",
    "parse_args",
    "power_iterate_all",
    "standard_normal_log_prob",
    "evaluate_nll",
    "density_grid",
    "save_panels",
    "Trainer",
    "run",
]

MODELS = ("resflow", "iresnet", "coupling", "naf", "mixlogcdf")
#: The plots (and density grids) cover [-PLOT_LIMIT, PLOT_LIMIT]^2, as in the reference.
PLOT_LIMIT = 4.0
_COUPLING_ACTIVATIONS = {"lipswish": "swish", "swish": "swish", "elu": "elu", "relu": "relu",
                         "softplus": "softplus", "identity": "linear"}
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- parsing
def _hidden_units(text):
    """'128-128-128' -> (128, 128, 128) for argparse."""
    try:
        units = tuple(int(t) for t in str(text).split("-") if t != "")
    except ValueError:
        units = ()
    if not units or min(units) < 1:
        raise argparse.ArgumentTypeError(
            f"--hidden must be positive widths joined by '-', e.g. 128-128-128-128; got {text!r}")
    return units


def _number_above(cast, minimum, description):
    """An argparse type: ``cast(text)`` that must be >= ``minimum``."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value
    return parse


_positive_int = _number_above(int, 1, "a positive integer")
_non_negative_int = _number_above(int, 0, "an integer >= 0")
_positive_float = _number_above(float, float.fromhex("0x1p-1074"), "a positive number")


def _dataset_name(text):
    name = str(text).strip().lower()
    if name not in TOY_DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown toy dataset {text!r}; valid names: {', '.join(TOY_DATASETS)}")
    return name


def build_parser():
    """The ``argparse`` parser of ``train/toy.py`` (every option has a help text).

    Example:
    ```python
    args = build_parser().parse_args(["--data", "rings", "--model", "iresnet"])
    ```
    """
    p = argparse.ArgumentParser(
        prog="python -m train.toy",
        description=("Fit a 2-D toy density with a residual flow (unbiased log-det), an "
                     "i-ResNet (truncated log-det) or a RealNVP coupling flow; report the test "
                     "NLL in nats (exact 2-D log-det) and write a PNG with the data histogram, "
                     "the model density and model samples."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=_dataset_name, default="8gaussians",
                   help=f"toy dataset, one of: {', '.join(TOY_DATASETS)}")
    g.add_argument("--model", choices=MODELS, default="resflow",
                   help="resflow: unbiased residual flow; iresnet: truncated (biased) "
                        "log-det; coupling: tfb.RealNVP affine coupling layers + tfb.Permute; "
                        "naf: DeepSigmoidalFlow (NAF-DSF) layers + tfb.Permute; mixlogcdf: "
                        "Flow++ logistic-mixture CDF couplings")
    g.add_argument("--blocks", type=_positive_int, default=10,
                   help="number of residual blocks (or coupling layers)")
    g.add_argument("--hidden", type=_hidden_units, default=(128, 128, 128, 128),
                   help="hidden widths of each block's network, joined by '-'")
    g.add_argument("--activation", default="lipswish",
                   choices=sorted(set(rlayers.ACTIVATIONS) | {"swish"}),
                   help="activation of the residual nets (1-Lipschitz; 'swish' is an alias of "
                        "lipswish for residual blocks); coupling nets use the plain version")
    g.add_argument("--coeff", type=_positive_float, default=0.9,
                   help="Lipschitz bound of every linear layer in a residual block (< 1)")
    g.add_argument("--init", choices=rlayers.INITS, default="reference",
                   help="initialisation of the residual nets: 'reference' (weights and biases "
                        "U(+-1/sqrt(fan_in)), as the authors' code) or 'glorot' (Glorot weights, "
                        "zero biases; the default before the parity work)")
    g.add_argument("--preactivation", type=int, choices=(0, 1), default=1,
                   help="1: g = W_L act(... W_1 act(x)), activation before every linear layer "
                        "(the reference's toy nets); 0: no activation on g's input")
    g.add_argument("--last_layer_scale", type=_positive_float, default=1e-3,
                   help="factor on the initial range of each block's last layer (the "
                        "reference's 1/1000: every block starts near the identity)")
    g.add_argument("--actnorm", action="store_true",
                   help="add ActNorm (data-initialised affine) before the first and after "
                        "every block")
    e = p.add_argument_group("log-det estimator (residual models)")
    e.add_argument("--dist", choices=("poisson", "geometric"), default="poisson",
                   help="Russian-roulette distribution of the number of extra terms (resflow)")
    e.add_argument("--rate", type=_positive_float, default=2.0, help="Poisson rate (resflow)")
    e.add_argument("--p", type=float, default=0.5, help="geometric success probability (resflow)")
    e.add_argument("--n_exact_terms", type=_non_negative_int, default=2,
                   help="terms always evaluated before the roulette tail in training (resflow)")
    e.add_argument("--n_samples", type=_positive_int, default=1,
                   help="roulette draws averaged per block and call (resflow)")
    e.add_argument("--n_power_series", type=_positive_int, default=5,
                   help="number of power-series terms of the truncated estimator (iresnet)")
    e.add_argument("--neumann_grad", type=int, choices=(0, 1), default=1,
                   help="1: Neumann-series gradient of the log-det (memory-free); "
                        "0: backpropagate through the power series")
    e.add_argument("--grad_in_forward", type=int, choices=(0, 1), default=0,
                   help="1: compute the Neumann log-det gradients during the forward pass "
                        "(the reference's mode, paper eq. 9); 0: recompute the block in the "
                        "backward pass and share one backward pass with the path gradient "
                        "(same gradients, slightly faster, fewer activations kept); ignored "
                        "when --neumann_grad 0")
    e.add_argument("--power_iterations", type=_non_negative_int, default=5,
                   help="power-iteration steps per optimiser step for the spectral norms "
                        "(0: iterate to convergence every step, slow); they are always "
                        "converged before evaluation and sampling")
    t = p.add_argument_group("training")
    t.add_argument("--iters", type=_positive_int, default=2000, help="optimiser steps")
    t.add_argument("--batch_size", type=_positive_int, default=500,
                   help="fresh samples per step")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    t.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the weights, the data stream and the estimator")
    o = p.add_argument_group("evaluation and output")
    o.add_argument("--out", default="toy_out",
                   help="output directory for <data>_<model>.png")
    o.add_argument("--n_test", type=_positive_int, default=10000,
                   help="held-out points for the test NLL")
    o.add_argument("--eval_every", type=_non_negative_int, default=0,
                   help="evaluate the test NLL every this many steps (0: only at the end)")
    o.add_argument("--plot_every", type=_non_negative_int, default=0,
                   help="rewrite the PNG every this many steps (0: only at the end)")
    o.add_argument("--log_every", type=_positive_int, default=100,
                   help="print a progress line every this many steps")
    o.add_argument("--grid", type=_positive_int, default=200,
                   help="density grid points per axis on [-4, 4]^2")
    o.add_argument("--n_plot_samples", type=_positive_int, default=5000,
                   help="model samples drawn (fixed-point inverse) for the third panel")
    o.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def parse_args(argv=None):
    """Parses a list of CLI strings (or returns a copy of a Namespace filled up with
    the defaults of :func:`build_parser`).

    Example:
    ```python
    args = parse_args(["--data", "moons", "--iters", "100"])
    args.hidden      # (128, 128, 128, 128)
    ```
    """
    parser = build_parser()
    if isinstance(argv, argparse.Namespace):
        args = parser.parse_args([])
        for key, value in vars(argv).items():
            setattr(args, key, value)
        if isinstance(args.hidden, str):
            args.hidden = _hidden_units(args.hidden)
        args.data = str(args.data).strip().lower()
        return args
    if isinstance(argv, dict):
        return parse_args(argparse.Namespace(**argv))
    return parser.parse_args(None if argv is None else [str(a) for a in argv])


# --------------------------------------------------------------------------- the flow
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
            + [keras.layers.Dense(2, kernel_initializer="zeros")], name=name)

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
    flow = build_flow("resflow", blocks=4, hidden=(64, 64))
    flow.initialize(x_first_batch)
    lp = flow.log_prob(x, seed=[1, 2], training=True)   # unbiased estimate
    lp_exact = flow.log_prob_exact(x)                   # exact 2-D log-det
    samples = flow.sample(1000, seed=0)
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
        seeds = (tf.random.experimental.stateless_split(tf.convert_to_tensor(seed, tf.int32),
                                                        max(n_random, 1))
                 if seed is not None and n_random else None)
        i = 0
        for b in bijectors:
            if isinstance(b, IResBlock):
                z, ld_b = b.forward_and_log_det(z, seed=None if seeds is None else seeds[i],
                                             training=training)
                i += 1
            elif isinstance(b, MixLogCDFCoupling):
                z, ld_b = b.forward_and_log_det(z)     # one conditioner pass
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
        """log p(x) with the exact 2-D log-det slogdet(I + J_g) of every block ([batch]).

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


def build_flow(model="resflow", blocks=10, hidden=(128, 128, 128, 128), activation="lipswish",
               coeff=0.9, actnorm=False, dist="poisson", rate=2.0, p=0.5, n_exact_terms=2,
               n_samples=1, n_power_series=5, neumann_grad=True, grad_in_forward=False,
               init="reference", preactivation=True, last_layer_scale=1e-3):
    """Builds a :class:`ToyFlow` of one of :data:`MODELS` for 2-D data.

    * ``resflow``: ``blocks`` x IResBlock(logdet="unbiased") with
      g = LipschitzDense(2 -> h_1) phi ... phi LipschitzDense(h_L -> 2)
      (with ``preactivation``, phi is applied to the input too, as in the
      reference), every spectral norm <= ``coeff``; roulette ``dist``
      (``rate``/``p``), ``n_exact_terms`` exact terms, ``n_samples`` draws.
      ``init`` (:data:`rflow_tf.layers.INITS`) and ``last_layer_scale`` (the
      reference's 1e-3: blocks start near the identity) set the initial weights.
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
        an = ActNorm(event_shape=(2,), name=f"actnorm_{i}",
                     layer=rlayers.ActNormalization(
                         variance="unbiased" if init == "reference" else "biased",
                         name=f"actnorm_{i}"))
        train_b.append(an)
        eval_b.append(an)
        models.append(an.layer)

    if actnorm:
        add_actnorm(0)
    for i in range(int(blocks)):
        if model == "coupling":
            net = _CouplingNet(1, hidden, _COUPLING_ACTIVATIONS[activation], name=f"coupling_{i}")
            layer = tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=net, name=f"realnvp_{i}")
            perm = tfb.Permute([1, 0], name=f"permute_{i}")
            train_b += [layer, perm]
            eval_b += [layer, perm]
            models.append(net.model)
        elif model == "naf":
            layer = DeepSigmoidalFlow(2, num_components=8, hidden_units=hidden,
                                      activation=_COUPLING_ACTIVATIONS[activation],
                                      name=f"dsf_{i}")
            perm = tfb.Permute([1, 0], name=f"permute_{i}")
            train_b += [layer, perm]
            eval_b += [layer, perm]
            models.append(layer.conditioner)
        elif model == "mixlogcdf":
            layer = MixLogCDFCoupling((2,), parity=i % 2, num_components=8,
                                      hidden_channels=hidden[0],
                                      num_blocks=max(1, len(hidden) // 2), attention=False,
                                      name=f"mixlogcdf_{i}")
            train_b.append(layer)
            eval_b.append(layer)
            models.append(layer.net)
        else:
            net = rlayers.lipschitz_dense_net(2, hidden, coeff, activation,
                                              preactivation=bool(preactivation),
                                              name=f"resnet_{i}", init=init,
                                              last_layer_scale=last_layer_scale)
            kw = dict(neumann_grad=bool(neumann_grad),
                      grad_in_forward=bool(grad_in_forward) and bool(neumann_grad),
                      name=f"block_{i}")
            if model == "resflow":
                block = IResBlock(net, logdet="unbiased", dist=dist, rate=rate, p=p,
                                  n_exact_terms=n_exact_terms, n_samples=n_samples, **kw)
            else:
                block = IResBlock(net, logdet="truncated", n_terms=n_power_series, **kw)
            train_b.append(block)
            eval_b.append(IResBlock(net, logdet="exact", inverse_atol=1e-5, inverse_rtol=1e-5,
                                    inverse_max_iterations=500, name=f"block_{i}_exact"))
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
    layers = rflow_tf.layers.lipschitz_layers(nets)
    optimizer.apply_gradients(zip(grads, variables))
    power_iterate_all(layers, 5)
    ```
    """
    groups = collections.defaultdict(list)
    for layer in layers:
        if isinstance(layer, rlayers.LipschitzDense):
            groups[tuple(layer.kernel.shape)].append(layer)
        else:
            layer.power_iterate(n)
    for group in groups.values():
        k = tf.stop_gradient(tf.stack([tf.convert_to_tensor(layer.kernel) for layer in group]))
        u = tf.stack([tf.convert_to_tensor(layer.u) for layer in group])        # [G, units]
        v = tf.stack([tf.convert_to_tensor(layer.v) for layer in group])        # [G, d_in]

        def normalize(t):
            return t / (tf.norm(t, axis=-1, keepdims=True) + 1e-12)

        for _ in range(int(n)):
            v = normalize(tf.linalg.matvec(k, u))                      # W^T u
            u = normalize(tf.linalg.matvec(k, v, transpose_a=True))    # W v
        sigma = tf.reduce_sum(u * tf.linalg.matvec(k, v, transpose_a=True), axis=-1)
        for i, layer in enumerate(group):
            layer.u.assign(u[i])
            layer.v.assign(v[i])
            layer.sigma.assign(sigma[i])


# --------------------------------------------------------------------------- evaluation
def evaluate_nll(log_prob_fn, x, chunk=10000):
    """Mean negative log-likelihood -1/N sum_i log p(x_i) in nats, in chunks.

    ``log_prob_fn`` maps a [n, 2] float32 tensor to [n] log-densities, e.g.
    ``flow.log_prob_exact`` (or a ``tf.function`` of it).

    Example:
    ```python
    nll = evaluate_nll(flow.log_prob_exact, toy_2d("moons", 10000, seed=1))
    ```
    """
    x = np.asarray(x, np.float32)
    total = 0.0
    for i in range(0, len(x), chunk):
        total += float(tf.reduce_sum(log_prob_fn(tf.constant(x[i:i + chunk]))))
    return -total / len(x)


def density_grid(log_prob_fn, n=200, limit=PLOT_LIMIT, chunk=10000):
    """The model density p(x) on an n x n grid over [-limit, limit]^2.

    Returns ``(density [n, n], extent)``; row i is y = y_i (bottom to top), so
    ``plt.imshow(density, origin="lower", extent=extent)`` shows it.

    Example:
    ```python
    dens, extent = density_grid(flow.log_prob_exact, n=100)
    ```
    """
    side = np.linspace(-limit, limit, int(n), dtype=np.float32)
    xx, yy = np.meshgrid(side, side)
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    logp = np.concatenate([log_prob_fn(tf.constant(pts[i:i + chunk])).numpy()
                           for i in range(0, len(pts), chunk)])
    dens = np.exp(np.nan_to_num(logp, nan=-np.inf)).reshape(int(n), int(n))
    return dens, (-limit, limit, -limit, limit)


def save_panels(path, data, density, extent, samples, title=None, limit=PLOT_LIMIT):
    """Writes a PNG with three panels: data histogram, model density, model samples.

    ``density`` is the grid from :func:`density_grid`; ``data`` and ``samples``
    are [n, 2] arrays (histograms with 100 bins over [-limit, limit]^2).

    Example:
    ```python
    dens, ext = density_grid(flow.log_prob_exact)
    save_panels("out.png", x_test, dens, ext, flow.sample(2000).numpy(), "moons")
    ```
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = [[-limit, limit], [-limit, limit]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    axes[0].hist2d(data[:, 0], data[:, 1], bins=100, range=rng, cmap="inferno")
    axes[0].set_title("data")
    axes[1].imshow(density, origin="lower", extent=extent, cmap="inferno", aspect="auto")
    axes[1].set_title("model density (exact log-det)")
    s = np.asarray(samples)
    s = s[np.all(np.isfinite(s), axis=1)]
    axes[2].hist2d(s[:, 0], s[:, 1], bins=100, range=rng, cmap="inferno")
    axes[2].set_title("model samples (inverse)")
    for ax in axes:
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- training
def _fmt_time(seconds):
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


_MODEL_KEYS = ("model", "blocks", "hidden", "activation", "coeff", "init", "preactivation",
               "last_layer_scale", "actnorm", "dist", "rate", "p",
               "n_exact_terms", "n_samples", "n_power_series", "neumann_grad", "grad_in_forward",
               "power_iterations", "batch_size", "lr", "seed")


class Trainer:
    """A flow, its Adam optimiser and compiled train / evaluation functions.

    One optimiser step (``tf.function``, traced once):

        loss = -1/B sum_i log p(x_i)   (training estimator, seed per step)
        Adam update of the nets, then ``power_iterations`` power-iteration
        steps of every spectral norm (the reference's 5 per step), or full
        convergence when it is 0.

    :meth:`reset` restores the initial weights and optimiser state, so one
    trace serves several datasets (used by ``benchmarks/toy_densities.py``).

    Example:
    ```python
    trainer = Trainer(parse_args(["--model", "resflow", "--blocks", "4"]))
    trainer.reset(x_first_batch)
    loss = trainer.step(x_batch, iteration=0)
    ```
    """

    def __init__(self, args):
        self.args = args
        keras.utils.set_random_seed(int(args.seed))
        self.flow = build_flow(
            args.model, args.blocks, args.hidden, args.activation, args.coeff, args.actnorm,
            args.dist, args.rate, args.p, args.n_exact_terms, args.n_samples,
            args.n_power_series, bool(args.neumann_grad), bool(args.grad_in_forward),
            args.init, bool(args.preactivation), args.last_layer_scale)
        self.optimizer = keras.optimizers.Adam(args.lr)
        self.variables = self.flow.variables_to_train
        self.optimizer.build(self.variables)
        self._initial = [tf.identity(v) for v in self._all_state()]
        self._compile()

    def _all_state(self):
        state = []
        for m in self.flow.keras_models:
            state.extend(w.value for w in m.weights)
        return state

    def _compile(self):
        flow, opt, args = self.flow, self.optimizer, self.args
        variables = self.variables

        def train_step(x, seed):
            with tf.GradientTape() as tape:
                loss = -tf.reduce_mean(flow.log_prob(x, seed=seed, training=True))
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))
            if flow.lipschitz:
                if args.power_iterations > 0:
                    power_iterate_all(flow.lipschitz, args.power_iterations)
                else:
                    for layer in flow.lipschitz:
                        layer.converge()
            return loss

        self._train_step = tf.function(train_step)
        spec = [tf.TensorSpec([None, 2], tf.float32)]
        self.log_prob_exact = tf.function(flow.log_prob_exact, input_signature=spec)
        self._sample = tf.function(self._inverse, input_signature=spec)
        self._converge = tf.function(lambda: rlayers.converge_lipschitz(flow.keras_models))

    def _inverse(self, z):
        x = z
        for b in reversed(self.flow.eval_bijectors):
            x = b.inverse(x)
        return x

    def reset(self, x_init):
        """Restores the initial weights, zeroes Adam's moments and step count and
        re-initialises ActNorm from ``x_init`` (a [n, 2] batch).

        Example: ``trainer.reset(toy_2d("rings", 1000, seed=0))``.
        """
        for var, value in zip(self._all_state(), self._initial):
            var.assign(value)
        self.optimizer.iterations.assign(0)
        for var in self.optimizer.variables:
            if var.name.endswith(("_momentum", "_velocity")):
                var.assign(tf.zeros_like(var))
        self.flow.initialize(x_init)
        self.converge()

    def converge(self):
        """Power iteration to convergence in every Lipschitz layer, so that
        ||W_eff||_2 <= coeff holds before evaluation and sampling.

        Example: ``trainer.converge(); nll = evaluate_nll(trainer.log_prob_exact, x)``.
        """
        if self.flow.lipschitz:
            self._converge()

    def step(self, x, iteration):
        """One optimiser step on the batch ``x`` with the stateless seed
        (seed, iteration); returns the loss estimate -mean log p(x) (tensor).

        Example: ``loss = float(trainer.step(toy_2d("moons", 500, seed=it), it))``.
        """
        seed = tf.constant([int(self.args.seed), int(iteration)], tf.int32)
        return self._train_step(tf.convert_to_tensor(x, tf.float32), seed)

    def sample(self, n, seed=0):
        """``n`` model samples x = f^{-1}(z), z ~ N(0, I), via the compiled
        inverse of the flow (numpy [n, 2]).

        Example: ``samples = trainer.sample(2000, seed=0)``.
        """
        z = tf.random.stateless_normal([int(n), 2], [int(seed), 1])
        return self._sample(z).numpy()


_TRAINERS = {}


def _get_trainer(args, reuse):
    key = tuple((k, getattr(args, k)) for k in _MODEL_KEYS)
    if reuse and key in _TRAINERS:
        return _TRAINERS[key], True
    trainer = Trainer(args)
    if reuse:
        _TRAINERS[key] = trainer
    return trainer, False


def _train_seed(seed, iteration):
    return (int(seed) * 1_000_003 + int(iteration) + 1) % (2**31 - 1)


def run(args=None, reuse_trainer=False):
    """Trains one toy model and evaluates it; the in-process entry point.

    ``args``: a list of CLI strings, an ``argparse.Namespace`` or a dict (missing
    options take the CLI defaults). Data are fresh ``toy_2d`` samples every
    step; the test set is ``n_test`` points from an independent seed. The test
    NLL is -mean log p(x) in nats with the exact 2-D log-det.
    ``reuse_trainer=True`` reuses the compiled model of an earlier call with
    the same model options (weights and Adam reset), which skips retracing.

    Returns a dict: ``test_nll`` (nats), ``sec_per_iter`` (mean wall time of
    a training step, first (tracing) step excluded), ``png`` (path),
    ``trace_s`` (first step), ``train_s``, ``final_loss``, ``history``
    (list of (iteration, test_nll)), ``density`` (grid), ``extent``,
    ``samples`` and ``test_data`` (numpy arrays for further plots).

    Example:
    ```python
    from train.toy import run
    r = run(["--data", "2spirals", "--model", "resflow", "--blocks", "4",
             "--hidden", "64-64", "--iters", "200", "--out", "/tmp/toy"])
    print(r["test_nll"], r["sec_per_iter"], r["png"])
    ```
    """
    args = parse_args(args)
    if args.data not in TOY_DATASETS:
        raise ValueError(f"Unknown toy dataset {args.data!r}. Valid names: "
                         f"{', '.join(TOY_DATASETS)}.")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    trainer, reused = _get_trainer(args, reuse_trainer)
    x_test = toy_2d(args.data, args.n_test, seed=(2**31 - 2 - int(args.seed)))
    trainer.reset(toy_2d(args.data, max(args.batch_size, 1000), seed=_train_seed(args.seed, 0)))
    png = os.path.join(args.out, f"{args.data}_{args.model}.png")
    log(f"[toy] {args.model} on {args.data}: {args.blocks} blocks, hidden "
        f"{'-'.join(map(str, args.hidden))}, {len(trainer.variables)} weight tensors "
        f"({sum(int(np.prod(v.shape)) for v in trainer.variables)} parameters), "
        f"batch {args.batch_size}, {args.iters} iterations"
        + (" (compiled step reused)" if reused else ""))

    history = []

    def evaluate(it):
        trainer.converge()
        nll = evaluate_nll(trainer.log_prob_exact, x_test)
        history.append((it, nll))
        log(f"[toy] iter {it}: test NLL {nll:.4f} nats (exact log-det)")
        return nll

    def plot(it, nll):
        trainer.converge()
        dens, extent = density_grid(trainer.log_prob_exact, args.grid)
        samples = trainer.sample(args.n_plot_samples, seed=args.seed)
        title = (f"{args.model} on {args.data}, iter {it}"
                 + ("" if nll is None else f", test NLL {nll:.3f} nats"))
        save_panels(png, x_test, dens, extent, samples, title)
        return dens, extent, samples

    step_time, timed_steps, trace_s = 0.0, 0, 0.0
    window_t, window_n = 0.0, 0
    loss = float("nan")
    t_start = time.perf_counter()
    for it in range(1, args.iters + 1):
        x = toy_2d(args.data, args.batch_size, seed=_train_seed(args.seed, it))
        t0 = time.perf_counter()
        loss_t = trainer.step(x, it)
        if it == 1 or it % args.log_every == 0 or it == args.iters:
            loss = float(loss_t)
        dt = time.perf_counter() - t0
        if it == 1 and not reused:
            trace_s = dt
        else:
            step_time += dt
            timed_steps += 1
            window_t += dt
            window_n += 1
        if not math.isfinite(loss):
            log(f"[toy] iter {it}: loss is {loss}; stopping")
            break
        if it % args.log_every == 0 or it == args.iters:
            rate = window_n / window_t if window_t > 0 else float("nan")
            eta = (args.iters - it) * (step_time / max(timed_steps, 1))
            log(f"[toy] iter {it:>6d}/{args.iters} | loss {loss:8.4f} | {rate:6.2f} it/s "
                f"({1.0 / rate if rate > 0 else float('nan'):.3f} s/it) | "
                f"elapsed {_fmt_time(time.perf_counter() - t_start)} | ETA {_fmt_time(eta)}")
            window_t, window_n = 0.0, 0
        if it < args.iters:
            nll = evaluate(it) if args.eval_every and it % args.eval_every == 0 else None
            if args.plot_every and it % args.plot_every == 0:
                plot(it, nll)
    train_s = time.perf_counter() - t_start
    test_nll = evaluate(args.iters)
    dens, extent, samples = plot(args.iters, test_nll)
    sec_per_iter = step_time / timed_steps if timed_steps else trace_s
    log(f"[toy] done: test NLL {test_nll:.4f} nats | {sec_per_iter:.4f} s/iter "
        f"(first step incl. tracing {trace_s:.1f} s) | wrote {png}")
    return dict(test_nll=test_nll, sec_per_iter=sec_per_iter, png=png, trace_s=trace_s,
                train_s=train_s, final_loss=loss, history=history, density=dens,
                extent=extent, samples=samples, test_data=x_test, args=vars(args))
