"""Benchmark: spectral norm vs learned mixed norms (the paper's 2-D comparison).

Residual Flows (Chen et al. 2019, Section 5.1 / Table 6) compare residual flows
whose linear maps are constrained in the spectral norm (||W||_{2->2}) with the
same flows constrained in induced mixed norms ||W||_{p->q} with learned
orders p (``--vnorms`` / ``--learn_p``). Three parts:

1. **Toy table**: both variants on every 2-D toy dataset (default all 8),
   ``--seeds`` seeds each (default 3): test NLL in nats (exact 2-D log-det,
   held-out points), mean +- standard deviation over seeds, and the learned
   orders' range at the end.
2. **Digits**: one small image run per variant (``preset="tiny"`` on the
   8x8 digits, ``--image_steps`` steps): test bits/dim.
3. **Cost per step**: seconds per training step of each variant (toy: median
   step time of the table runs; digits: median of 5 more steps of the
   trainer's compiled step after training), and the ratio mixed / spectral.

The machine may be shared; the load average is printed with the results.

Usage::

    python benchmarks/mixed_norms.py                  # full run (8 datasets, 3 seeds)
    python benchmarks/mixed_norms.py --iters 20 --seeds 1 --datasets moons rings \\
        --image_steps 10 --n_test 2000                # reduced run (README)
"""

import dataclasses
import os
import sys
import tempfile
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from benchmarks._common import load_average  # noqa: E402
from rflow_tf import toy  # noqa: E402  (imports TensorFlow)
from rflow_tf.data import TOY_DATASETS  # noqa: E402
from rflow_tf.settings import parse_settings, setting  # noqa: E402

#: The two variants: (label, toy/flow settings). The mixed one starts every order
#: at 2 and learns them (the authors' toy setting: one order per layer boundary).
VARIANTS = (
    ("spectral", dict(vnorms="2", learn_p=False)),
    ("learned mixed", dict(vnorms="2", learn_p=True)),
)


def run_toy(datasets, seeds, iters, blocks, hidden, n_test, lr, tmpdir, log=print):
    """Trains both :data:`VARIANTS` on every dataset and seed; returns
    ``{(variant, dataset): [result dicts of rflow_tf.toy.run]}``.

    Example:
    ```python
    res = run_toy(["moons"], [0], iters=20, blocks=2, hidden="16-16", n_test=500,
                  lr=5e-3, tmpdir="/tmp/mn")
    ```
    """
    results = {}
    for label, settings in VARIANTS:
        for data in datasets:
            for seed in seeds:
                argv = [
                    "--data", data, "--model", "resflow", "--blocks", str(blocks),
                    "--hidden", hidden, "--iters", str(iters), "--batch_size", "500",
                    "--lr", str(lr), "--seed", str(seed), "--out", tmpdir,
                    "--n_test", str(n_test), "--grid", "60", "--n_plot_samples", "500",
                    "--actnorm", "--vnorms", settings["vnorms"],
                    "--learn_p", str(int(settings["learn_p"])), "--quiet",
                ]  # fmt: skip
                t0 = time.perf_counter()
                r = toy.run(argv, reuse_trainer=True)
                orders = list(r["learned_orders"].values())
                span = f" | p in [{min(orders):.2f}, {max(orders):.2f}]" if orders else ""
                log(
                    f"[mixed_norms] {label:>13s} {data:<12s} seed {seed}: test NLL "
                    f"{r['test_nll']:.3f} nats | {r['sec_per_iter']:.4f} s/step | "
                    f"{time.perf_counter() - t0:.0f} s{span}",
                    flush=True,
                )
                results.setdefault((label, data), []).append(r)
    return results


def _seconds_per_step(trainer, n=5):
    """Median wall time of ``n`` more training steps with the trainer's compiled
    step (already traced by ``fit``), so tracing is not counted."""
    import tensorflow as tf

    it = iter(trainer.run_data.distribute(trainer.run_data.train_dataset(0)))
    step_fn, step = trainer.train_step_fn, int(trainer.step.numpy())
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        out = step_fn(next(it), tf.constant(step + i, tf.int64))
        float(out["ok"])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_digits(steps, tmpdir, log=print):
    """One tiny digits run per variant; returns ``{variant: trainer result}``.

    Example: ``run_digits(10, "/tmp/mn")["spectral"]["test_bpd"]``.
    """
    from rflow_tf.training import Trainer, TrainingOptions, flow_config_for

    results = {}
    for label, settings in VARIANTS:
        out = os.path.join(tmpdir, "digits_" + label.replace(" ", "_"))
        options = TrainingOptions(
            dataset="digits",
            preset="tiny",
            steps=int(steps),
            out=out,
            export_dir="",
            log_every=max(1, int(steps) // 4),
            eval_every=int(steps),
            sample_every=int(steps),
            n_sample_images=16,
        )
        vnorms = "2222" if settings["vnorms"] == "2" else settings["vnorms"]
        config = flow_config_for(options, vnorms=vnorms, learn_p=settings["learn_p"])
        t0 = time.perf_counter()
        trainer = Trainer(config, options)
        r = trainer.fit()
        r["sec_per_step"] = _seconds_per_step(trainer)
        orders = list(r.get("learned_orders", {}).values())
        span = f" | p in [{min(orders):.2f}, {max(orders):.2f}]" if orders else ""
        log(
            f"[mixed_norms] {label:>13s} digits (tiny, {steps} steps): test bits/dim "
            f"{r['test_bpd']:.3f} +- {r['test_bpd_stderr']:.3f} | "
            f"{r['sec_per_step']:.3f} s/step | {time.perf_counter() - t0:.0f} s{span}",
            flush=True,
        )
        results[label] = r
    return results


def markdown(toy_results, digits_results, datasets):
    """The markdown tables of the three parts.

    Example: ``print(markdown(run_toy(...), run_digits(...), ["moons"]))``.
    """
    labels = [label for label, _ in VARIANTS]
    lines = ["| dataset | " + " | ".join(f"{v} NLL (nats)" for v in labels) + " |"]
    lines.append("|---|" + "---:|" * len(labels))
    for data in datasets:
        cells = []
        for label in labels:
            nll = np.array([r["test_nll"] for r in toy_results[(label, data)]])
            sd = f" +- {nll.std(ddof=1):.3f}" if nll.size > 1 else ""
            cells.append(f"{nll.mean():.3f}{sd}")
        lines.append(f"| {data} | " + " | ".join(cells) + " |")
    if digits_results:
        lines.append(
            "| digits (bits/dim) | "
            + " | ".join(
                f"{digits_results[v]['test_bpd']:.3f} +- {digits_results[v]['test_bpd_stderr']:.3f}"
                for v in labels
            )
            + " |"
        )
    cost = {
        v: float(np.median([r["sec_per_iter"] for k, rs in toy_results.items() if k[0] == v
                            for r in rs]))
        for v in labels
    }  # fmt: skip
    lines += ["", "| cost per step | " + " | ".join(labels) + " | mixed / spectral |"]
    lines.append("|---|" + "---:|" * (len(labels) + 1))
    lines.append(
        "| toy (s/step, median) | "
        + " | ".join(f"{cost[v]:.4f}" for v in labels)
        + f" | {cost[labels[1]] / cost[labels[0]]:.2f}x |"
    )
    if digits_results:
        sec = {v: digits_results[v]["sec_per_step"] for v in labels}
        lines.append(
            "| digits tiny (s/step) | "
            + " | ".join(f"{sec[v]:.3f}" for v in labels)
            + f" | {sec[labels[1]] / sec[labels[0]]:.2f}x |"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MixedNormsOptions:
    """The options of this benchmark (its command line)."""

    datasets: List[str] = setting(list(TOY_DATASETS), help=None, choices=TOY_DATASETS)
    seeds: int = setting(3, help="seeds 0 .. seeds-1 per dataset")
    iters: int = setting(1000, help="Adam steps per toy run")
    blocks: int = setting(5, help=None)
    hidden: str = setting("64-64-64", help=None)
    lr: float = setting(5e-3, help=None)
    n_test: int = setting(10000, help="held-out toy points")
    image_steps: int = setting(200, help="digits steps (0: skip)")
    out: Optional[str] = setting(None, help="working directory (default: a temp dir)")


def main(argv=None):
    args = parse_settings(MixedNormsOptions, argv, description=__doc__.split("\n\n")[0])
    tmpdir = args.out or tempfile.mkdtemp(prefix="mixed_norms_")
    print(f"[mixed_norms] {load_average()}", flush=True)
    toy_results = run_toy(
        args.datasets,
        list(range(args.seeds)),
        args.iters,
        args.blocks,
        args.hidden,
        args.n_test,
        args.lr,
        tmpdir,
    )
    digits = run_digits(args.image_steps, tmpdir) if args.image_steps else {}
    print(f"\n[mixed_norms] {load_average()}")
    print(
        f"toy: {args.blocks} blocks of {args.hidden}, ActNorm, batch 500, {args.iters} "
        f"steps, lr {args.lr}, seeds 0..{args.seeds - 1}, {args.n_test} test points; "
        f"digits: preset tiny, {args.image_steps} steps\n"
    )
    print(markdown(toy_results, digits, args.datasets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
