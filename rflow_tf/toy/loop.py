"""The toy training loop (ToyTrainer, run), the test NLL, the density grid and the PNG panels."""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from rflow_tf import layers as rlayers
from rflow_tf import tracing
from rflow_tf.data import TOY_DATASETS, toy_2d
from rflow_tf.optimizers import FusedAdam
from rflow_tf.toy.flows import build_flow, power_iterate_all
from rflow_tf.toy.options import parse_args

#: The plots (and density grids) cover [-PLOT_LIMIT, PLOT_LIMIT]^2, as in the reference.
PLOT_LIMIT = 4.0


def evaluate_nll(log_prob_fn, x, chunk=10000):
    """Mean negative log-likelihood -1/N sum_i log p(x_i) in nats, in chunks.

    ``log_prob_fn`` maps a [n, 2] float32 tensor to [n] log-densities, e.g.
    ``flow.log_prob_exact`` (or a ``tf.function`` of it).

    Example:
    ```python
    import numpy as np
    from rflow_tf.toy import build_flow, evaluate_nll

    flow = build_flow("coupling", blocks=2, hidden=(8,))   # fresh: the identity map
    x = np.random.default_rng(0).standard_normal([20000, 2])
    nll = evaluate_nll(flow.log_prob_exact, x, chunk=5000)
    # so p = N(0, I), whose expected NLL is log(2 pi) + 1 = 2.838 nats
    assert abs(nll - (np.log(2 * np.pi) + 1)) < 0.05
    ```
    """
    x = np.asarray(x, np.float32)
    total = 0.0
    for i in range(0, len(x), chunk):
        total += float(tf.reduce_sum(log_prob_fn(tf.constant(x[i : i + chunk]))))
    return -total / len(x)


def density_grid(log_prob_fn, n=200, limit=PLOT_LIMIT, chunk=10000):
    """The model density p(x) on an n x n grid over [-limit, limit]^2.

    Returns ``(density [n, n], extent)``; row i is y = y_i (bottom to top), so
    ``plt.imshow(density, origin="lower", extent=extent)`` shows it.

    Example:
    ```python
    import numpy as np
    from rflow_tf.toy import build_flow, density_grid

    flow = build_flow("coupling", blocks=2, hidden=(8,))   # fresh: p = N(0, I)
    dens, extent = density_grid(flow.log_prob_exact, n=81)
    cell = (extent[1] - extent[0]) / 80                     # grid spacing
    assert abs(dens.sum() * cell**2 - 1.0) < 0.01           # it integrates to 1 on [-4, 4]^2
    assert abs(dens[40, 40] - 1 / (2 * np.pi)) < 1e-5       # the centre, (0, 0)
    ```
    """
    side = np.linspace(-limit, limit, int(n), dtype=np.float32)
    xx, yy = np.meshgrid(side, side)
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    logp = np.concatenate(
        [log_prob_fn(tf.constant(pts[i : i + chunk])).numpy() for i in range(0, len(pts), chunk)]
    )
    dens = np.exp(np.nan_to_num(logp, nan=-np.inf)).reshape(int(n), int(n))
    return dens, (-limit, limit, -limit, limit)


def save_panels(path, data, density, extent, samples, title=None, limit=PLOT_LIMIT):
    """Writes a PNG with three panels: data histogram, model density, model samples.

    ``density`` is the grid from :func:`density_grid`; ``data`` and ``samples``
    are [n, 2] arrays (histograms with 100 bins over [-limit, limit]^2).

    Example:
    ```python
    import os
    from rflow_tf.data import toy_2d
    from rflow_tf.toy import build_flow, density_grid, save_panels

    flow = build_flow("coupling", blocks=2, hidden=(8,))
    x_test = toy_2d("moons", 2000, seed=1)
    dens, ext = density_grid(flow.log_prob_exact, n=50)
    save_panels("out.png", x_test, dens, ext, flow.sample(2000).numpy(), "moons")
    assert os.path.getsize("out.png") > 0
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


def _fmt_time(seconds):
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


_MODEL_KEYS = (
    "model",
    "blocks",
    "hidden",
    "activation",
    "coeff",
    "vnorms",
    "learn_p",
    "init",
    "preactivation",
    "last_layer_scale",
    "actnorm",
    "dist",
    "rate",
    "p",
    "n_exact_terms",
    "n_samples",
    "n_power_series",
    "neumann_grad",
    "grad_in_forward",
    "power_iterations",
    "jit_compile",
    "batch_size",
    "lr",
    "seed",
)


class ToyTrainer:
    """A flow, its Adam optimiser and compiled train / evaluation functions.

    One optimiser step (``tf.function``, traced once; compiled whole with
    XLA with ``--jit_compile 1``):

        loss = -1/B sum_i log p(x_i)   (training estimator, seed per step)
        Adam update of the nets, then ``power_iterations`` power-iteration
        steps of every spectral norm (the reference's 5 per step), or full
        convergence when it is 0.

    :meth:`reset` restores the initial weights and optimiser state, so one
    trace serves several datasets (used by ``benchmarks/toy_densities.py``).

    Example:
    ```python
    import numpy as np
    from rflow_tf.data import toy_2d
    from rflow_tf.toy import ToyTrainer, evaluate_nll, parse_args

    # A small coupling flow; "--model resflow" also power-iterates after each step.
    trainer = ToyTrainer(parse_args(["--model", "coupling", "--blocks", "1", "--hidden", "16"]))

    def train(steps):
        trainer.reset(toy_2d("moons", 500, seed=0))
        return [float(trainer.step(toy_2d("moons", 64, seed=it), it)) for it in range(steps)]

    losses = train(3)
    np.testing.assert_allclose(train(3), losses, rtol=1e-5)   # reset: the same run again
    trainer.converge()   # (spectral norms, if any) converged before evaluation
    nll = evaluate_nll(trainer.log_prob_exact, toy_2d("moons", 500, seed=9))
    ```
    """

    def __init__(self, args):
        self.args = args
        keras.utils.set_random_seed(int(args.seed))
        self.flow = build_flow(
            args.model,
            args.blocks,
            args.hidden,
            args.activation,
            args.coeff,
            args.actnorm,
            args.dist,
            args.rate,
            args.p,
            args.n_exact_terms,
            args.n_samples,
            args.n_power_series,
            bool(args.neumann_grad),
            bool(args.grad_in_forward),
            args.init,
            bool(args.preactivation),
            args.last_layer_scale,
            vnorms=args.vnorms,
            learn_p=bool(args.learn_p),
        )
        self.optimizer = FusedAdam(args.lr)
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
                    # The warm-started re-estimate to convergence (the layers' shared
                    # upkeep; converge's restarts are for initialisation and evaluation).
                    for layer in flow.lipschitz:
                        layer.update_estimate()
            return loss

        # Each graph optimised in one round at its first call (rflow_tf.tracing).
        graph_fn = tracing.in_one_optimizer_round
        self._train_step = graph_fn(tf.function(train_step, jit_compile=bool(args.jit_compile)))
        spec = [tf.TensorSpec([None, 2], tf.float32)]
        self.log_prob_exact = graph_fn(tf.function(flow.log_prob_exact, input_signature=spec))
        self._sample = graph_fn(tf.function(self._inverse, input_signature=spec))
        self._converge = graph_fn(
            tf.function(lambda: rlayers.converge_lipschitz(flow.keras_models))
        )

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
    trainer = ToyTrainer(args)
    if reuse:
        _TRAINERS[key] = trainer
    return trainer, False


def _orders_text(trainer):
    """The learned orders of every block, one group per block: 'block 0: 2.01 2.13 ...'."""
    groups = []
    for i, net in enumerate(trainer.flow.keras_models):
        orders = rlayers.learned_orders(net)
        if orders:
            groups.append(f"block {i}: " + " ".join(f"{p:.2f}" for p in orders.values()))
    return "; ".join(groups)


def _train_seed(seed, iteration):
    return (int(seed) * 1_000_003 + int(iteration) + 1) % (2**31 - 1)


def run(args=None, reuse_trainer=False):
    """Trains one toy model and evaluates it; the in-process entry point.

    ``args``: a list of CLI strings, an ``argparse.Namespace``, a dict or a
    :class:`rflow_tf.toy.ToyOptions` (missing options take the CLI defaults).
    Data are fresh ``toy_2d`` samples every step; the test set is ``n_test``
    points from an independent seed. The test NLL is -mean log p(x) in nats with
    the exact 2-D log-det.
    ``reuse_trainer=True`` reuses the compiled model of an earlier call with
    the same model options (weights and Adam reset), which skips retracing.

    Returns a dict: ``test_nll`` (nats), ``sec_per_iter`` (mean wall time of
    a training step, first (tracing) step excluded), ``png`` (path),
    ``trace_s`` (first step), ``train_s``, ``final_loss``, ``history``
    (list of (iteration, test_nll)), ``density`` (grid), ``extent``,
    ``samples`` and ``test_data`` (numpy arrays for further plots).

    Example:
    ```python
    from rflow_tf.toy import run

    r = run(["--data", "2spirals", "--model", "coupling", "--blocks", "1", "--hidden", "16",
             "--iters", "5", "--batch_size", "64", "--n_test", "500", "--grid", "20",
             "--n_plot_samples", "200", "--out", "toy", "--quiet"])
    print(r["test_nll"], r["sec_per_iter"], r["png"])   # nats, seconds, toy/2spirals_coupling.png
    assert r["png"].endswith("2spirals_coupling.png") and len(r["history"]) == 1
    ```
    """
    args = parse_args(args)
    if args.data not in TOY_DATASETS:
        raise ValueError(
            f"Unknown toy dataset {args.data!r}. Valid names: {', '.join(TOY_DATASETS)}."
        )
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    trainer, reused = _get_trainer(args, reuse_trainer)
    x_test = toy_2d(args.data, args.n_test, seed=(2**31 - 2 - int(args.seed)))
    trainer.reset(toy_2d(args.data, max(args.batch_size, 1000), seed=_train_seed(args.seed, 0)))
    png = os.path.join(args.out, f"{args.data}_{args.model}.png")
    log(
        f"[toy] {args.model} on {args.data}: {args.blocks} blocks, hidden "
        f"{'-'.join(map(str, args.hidden))}, {len(trainer.variables)} weight tensors "
        f"({sum(int(np.prod(v.shape)) for v in trainer.variables)} parameters), "
        f"batch {args.batch_size}, {args.iters} iterations"
        + (" (compiled step reused)" if reused else "")
    )

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
        title = f"{args.model} on {args.data}, iter {it}" + (
            "" if nll is None else f", test NLL {nll:.3f} nats"
        )
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
            log(
                f"[toy] iter {it:>6d}/{args.iters} | loss {loss:8.4f} | {rate:6.2f} it/s "
                f"({1.0 / rate if rate > 0 else float('nan'):.3f} s/it) | "
                f"elapsed {_fmt_time(time.perf_counter() - t_start)} | ETA {_fmt_time(eta)}"
            )
            window_t, window_n = 0.0, 0
            if args.learn_p:
                log(f"[toy] iter {it}: learned norm orders {_orders_text(trainer)}")
        if it < args.iters:
            nll = evaluate(it) if args.eval_every and it % args.eval_every == 0 else None
            if args.plot_every and it % args.plot_every == 0:
                plot(it, nll)
    train_s = time.perf_counter() - t_start
    test_nll = evaluate(args.iters)
    dens, extent, samples = plot(args.iters, test_nll)
    sec_per_iter = step_time / timed_steps if timed_steps else trace_s
    log(
        f"[toy] done: test NLL {test_nll:.4f} nats | {sec_per_iter:.4f} s/iter "
        f"(first step incl. tracing {trace_s:.1f} s) | wrote {png}"
    )
    orders = rlayers.learned_orders(trainer.flow.lipschitz)
    if orders:
        log(f"[toy] learned norm orders: {_orders_text(trainer)}")
    return dict(
        test_nll=test_nll,
        sec_per_iter=sec_per_iter,
        png=png,
        trace_s=trace_s,
        train_s=train_s,
        final_loss=loss,
        history=history,
        density=dens,
        extent=extent,
        samples=samples,
        test_data=x_test,
        learned_orders=orders,
        args=vars(args),
    )
