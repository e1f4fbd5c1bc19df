"""Amortised posterior inference with a conditional residual flow q(theta | x).

Two simulators, each trained by maximum likelihood on simulated pairs
(theta, x), theta from the prior and x from the simulator:

* ``linear``: theta ~ N(0, 0.1 I_d), x = theta + N(0, 0.1 I_d), whose posterior
  is analytic, theta | x ~ N(x / 2, 0.05 I_d). Prints a table of the held-out
  NLL -log q(theta | x) beside the analytic posterior's NLL on the same pairs,
  and their gap (nats per pair).
* ``moons``: the "two moons" simulator of the SBI benchmarks, theta ~ U[-1, 1]^2,
  a ~ U(-pi/2, pi/2), r ~ N(0.1, 0.01^2),
  x = (r cos a + 0.25, r sin a) + (-|theta_1 + theta_2| / sqrt 2,
  (-theta_1 + theta_2) / sqrt 2), whose posterior is a pair of crescents.
  Writes a PNG of posterior samples of q for a few observations over the true
  posterior density (prior times the likelihood, evaluated on a grid).

The flow maps theta to the latent through ``--blocks`` pairs of ActNorm and a
conditional :class:`rflow_tf.bijectors.IResBlock` (``condition_size`` = dim x);
it trains with the unbiased log-det estimator and evaluates with the exact one.

Usage::

    python examples/conditional_inference.py linear            # d = 5, the table
    python examples/conditional_inference.py linear --dim 10
    python examples/conditional_inference.py moons --png docs/guides/conditional_moons.png
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import rflow_tf  # noqa: E402, F401  (first: it sets TensorFlow's runtime defaults)
from rflow_tf.bijectors import ActNorm, IResBlock, conditional_kwargs  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions

PRIOR_VAR = 0.1
NOISE_VAR = 0.1


# ------------------------------------------------------------------ simulators
def simulate_linear(n, dim, rng):
    """(theta, x) pairs of the linear-Gaussian simulator, float32 [n, dim] each."""
    theta = rng.normal(0.0, np.sqrt(PRIOR_VAR), size=(n, dim))
    x = theta + rng.normal(0.0, np.sqrt(NOISE_VAR), size=(n, dim))
    return theta.astype(np.float32), x.astype(np.float32)


def linear_posterior_nll(theta, x):
    """-log N(theta; x / 2, 0.05 I) per pair: the analytic posterior's NLL."""
    var = PRIOR_VAR * NOISE_VAR / (PRIOR_VAR + NOISE_VAR)
    mean = x * PRIOR_VAR / (PRIOR_VAR + NOISE_VAR)
    sq = np.sum((theta.astype(np.float64) - mean) ** 2, axis=1)
    return 0.5 * theta.shape[1] * np.log(2 * np.pi * var) + sq / (2 * var)


def _moons_offset(theta):
    t1, t2 = theta[..., 0], theta[..., 1]
    return np.stack([-np.abs(t1 + t2) / np.sqrt(2), (-t1 + t2) / np.sqrt(2)], axis=-1)


def simulate_moons(n, rng):
    """(theta, x) pairs of the two-moons simulator, float32 [n, 2] each."""
    theta = rng.uniform(-1.0, 1.0, size=(n, 2))
    a = rng.uniform(-np.pi / 2, np.pi / 2, size=n)
    r = rng.normal(0.1, 0.01, size=n)
    p = np.stack([r * np.cos(a) + 0.25, r * np.sin(a)], axis=1)
    return theta.astype(np.float32), (p + _moons_offset(theta)).astype(np.float32)


def moons_log_likelihood(theta, x):
    """log p(x | theta) of the two-moons simulator, for a grid of theta [..., 2]:
    q = x - offset(theta) - (0.25, 0) in polar coordinates (r, a), density
    N(r; 0.1, 0.01^2) / (pi r) for a in (-pi/2, pi/2) (q_1 > 0), else 0."""
    q = x - _moons_offset(theta) - np.array([0.25, 0.0])
    r = np.hypot(q[..., 0], q[..., 1])
    log_n = -0.5 * ((r - 0.1) / 0.01) ** 2 - np.log(0.01 * np.sqrt(2 * np.pi))
    return np.where(q[..., 0] > 0, log_n - np.log(np.pi * np.maximum(r, 1e-12)), -np.inf)


# ------------------------------------------------------------------ the flow
def conditional_flow(dim, condition_size, blocks, hidden, coeff):
    """q(theta | x): a TransformedDistribution whose bijector maps theta to the
    latent through ``blocks`` pairs of ActNorm and a conditional IResBlock."""
    parts = []
    for i in range(blocks):
        parts.append(ActNorm((dim,), name=f"actnorm_{i}"))
        parts.append(
            IResBlock.dense(
                dim,
                hidden_units=hidden,
                coeff=coeff,
                condition_size=condition_size,
                condition_hidden_units=(64,),
                logdet_eval="exact",
                name=f"block_{i}",
            )
        )
    flow = tfb.Chain(parts[::-1])  # Chain applies its last bijector first
    base = tfd.MultivariateNormalDiag(tf.zeros(dim))
    return tfd.TransformedDistribution(base, tfb.Invert(flow)), parts


def initialize(parts, theta, x):
    """ActNorm's data-dependent initialisation, each on the data it sees."""
    h = tf.constant(theta)
    for part in parts:
        if isinstance(part, ActNorm):
            part.initialize(h)
            h = part.forward(h)
        else:
            h = part.forward(h, conditional_input=x)


def fit(dist, theta, x, steps, batch_size, lr, seed):
    """Maximum likelihood: Adam on -mean log q(theta | x) over minibatches of pairs
    (the unbiased log-det estimate and its Neumann gradient). Returns seconds/step."""
    variables = dist.trainable_variables
    opt = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps, alpha=0.05))
    data = (
        tf.data.Dataset.from_tensor_slices((theta, x))
        .shuffle(len(theta), seed=seed)
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )

    @tf.function
    def step(t, c, s):
        kwargs = conditional_kwargs(dist, c, seed=s, training=True)
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(t, bijector_kwargs=kwargs))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    it = iter(data)
    step(*next(it), tf.constant([seed, 0]))  # trace
    start = time.perf_counter()
    for i in range(1, steps):
        step(*next(it), tf.constant([seed, i]))
    return (time.perf_counter() - start) / max(1, steps - 1)


def nll(dist, theta, x, batch_size=2000):
    """-log q(theta | x) per pair with the exact log-det (evaluation settings)."""
    out = []
    for i in range(0, len(theta), batch_size):
        c = x[i : i + batch_size]
        kwargs = conditional_kwargs(dist, c)
        out.append(-dist.log_prob(theta[i : i + batch_size], bijector_kwargs=kwargs).numpy())
    return np.concatenate(out).astype(np.float64)


# ------------------------------------------------------------------ tasks
def run_linear(args):
    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    theta, x = simulate_linear(args.train, args.dim, rng)
    theta_test, x_test = simulate_linear(args.test, args.dim, rng)
    dist, parts = conditional_flow(args.dim, args.dim, args.blocks, args.hidden, args.coeff)
    initialize(parts, theta[:2000], x[:2000])
    sec = fit(dist, theta, x, args.steps, args.batch_size, args.lr, args.seed)
    q = nll(dist, theta_test, x_test)
    p = linear_posterior_nll(theta_test, x_test)
    diff = q - p
    return {
        "task": "linear",
        "dim": args.dim,
        "nll_q": float(q.mean()),
        "nll_posterior": float(p.mean()),
        "gap": float(diff.mean()),
        "gap_se": float(diff.std() / np.sqrt(len(diff))),
        "s_per_step": sec,
    }


def run_moons(args):
    rng = np.random.default_rng(args.seed)
    keras.utils.set_random_seed(args.seed)
    theta, x = simulate_moons(args.train, rng)
    theta_test, x_test = simulate_moons(args.test, rng)
    dist, parts = conditional_flow(2, 2, args.blocks, args.hidden, args.coeff)
    initialize(parts, theta[:2000], x[:2000])
    sec = fit(dist, theta, x, args.steps, args.batch_size, args.lr, args.seed)
    result = {
        "task": "moons",
        "nll_q": float(nll(dist, theta_test, x_test).mean()),
        "s_per_step": sec,
    }
    if args.png:
        observations = np.array([[0.0, 0.0], [0.2, -0.3], [-0.3, 0.4]], np.float32)
        write_moons_png(dist, observations, args.png, args.seed)
        result["png"] = args.png
    return result


def write_moons_png(dist, observations, path, seed):
    """One panel per observation x_o: the true posterior density p(theta | x_o) on a
    grid (blue, shown as density ** 0.3) and 1000 samples of q(theta | x_o) (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-1, 1, 401)
    t1, t2 = np.meshgrid(grid, grid)
    thetas = np.stack([t1, t2], axis=-1)
    fig, axes = plt.subplots(1, len(observations), figsize=(4 * len(observations), 4))
    for i, (ax, obs) in enumerate(zip(np.atleast_1d(axes), observations)):
        logp = moons_log_likelihood(thetas, obs)
        dens = np.exp(logp - np.max(logp))
        # dens ** 0.3 widens the thin crescents enough to be seen at this size
        ax.imshow(dens**0.3, origin="lower", extent=(-1, 1, -1, 1), cmap="Blues", vmin=0)
        samples = dist.sample(
            1000, seed=[seed, i], bijector_kwargs=conditional_kwargs(dist, tf.constant(obs))
        ).numpy()
        ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.3, color="tab:red")
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_title(f"x_o = ({obs[0]:.1f}, {obs[1]:.1f})")
        ax.set_xlabel("theta_1")
        ax.set_ylabel("theta_2")
    fig.suptitle("two moons: true posterior (blue) and samples of q(theta | x_o) (red)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["linear", "moons"])
    p.add_argument("--dim", type=int, default=5, help="linear: dimension of theta and x")
    p.add_argument("--train", type=int, default=20000, help="simulated training pairs")
    p.add_argument("--test", type=int, default=10000, help="held-out pairs")
    p.add_argument("--steps", type=int, default=None, help="Adam steps (linear 1500, moons 4000)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--blocks", type=int, default=None, help="ActNorm + block pairs (2 / 6)")
    p.add_argument("--hidden", type=str, default="64-64", help="hidden units of each g")
    p.add_argument("--coeff", type=float, default=0.97, help="Lipschitz bound of each g")
    p.add_argument("--png", type=str, default="", help="moons: where to write the PNG")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    linear = args.task == "linear"
    args.steps = args.steps or (1500 if linear else 4000)
    args.blocks = args.blocks or (2 if linear else 6)
    args.hidden = tuple(int(h) for h in args.hidden.split("-"))
    return args


def main(argv=None):
    args = parse_args(argv)
    result = run_linear(args) if args.task == "linear" else run_moons(args)
    command = "python examples/conditional_inference.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    settings = (
        f"blocks={args.blocks} hidden={'-'.join(map(str, args.hidden))} coeff={args.coeff} "
        f"steps={args.steps} batch={args.batch_size} lr={args.lr} train={args.train} "
        f"test={args.test} seed={args.seed}"
    )
    print(f"command: {command}")
    print(f"settings: {settings}")
    if args.task == "linear":
        print("| d | NLL of q | NLL of the posterior | gap (nats) | s/step |")
        print("|---:|---:|---:|---:|---:|")
        print(
            f"| {result['dim']} | {result['nll_q']:.4f} | {result['nll_posterior']:.4f} | "
            f"{result['gap']:.4f} +- {result['gap_se']:.4f} | {result['s_per_step']:.4f} |"
        )
    else:
        print("| task | NLL of q (nats) | s/step |")
        print("|---|---:|---:|")
        print(f"| two moons | {result['nll_q']:.4f} | {result['s_per_step']:.4f} |")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
