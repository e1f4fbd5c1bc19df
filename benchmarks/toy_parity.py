"""Benchmark: learning parity with the authors' ``train_toy.py`` on the 2-D toy densities.

The reference's settings: 10 residual blocks, each g = 2-128-128-128-128-2
with LipSwish (pre-activated, last layer initialised at 1/1000), coeff 0.9,
unbiased log-det with geometric(0.5) roulette and 2 exact terms, Adam lr
1e-3, batch 500 of fresh samples per step, 5 power iterations per step, no
ActNorm, 1000 iterations. The test NLL (nats) is -mean log p(x) on 10,000
fresh points with the exact 2-D log-det, after the spectral norms are
converged (the reference: 200 power iterations, then its brute-force 2-D
log-det on a fresh batch of 10,000).

For every dataset and seed this runs ``python -m train.toy`` in-process with
those settings and prints one progress line; at the end a markdown table of
mean +- sd test NLL and s/iter per dataset, with the reference's figures
(one seed each, from the authors' train_toy.py) beside ours.

Usage::

    nice -n 10 python benchmarks/toy_parity.py                      # 4 datasets x 3 seeds
    python benchmarks/toy_parity.py --datasets all --seeds 0 1 2    # all 8 datasets
    python benchmarks/toy_parity.py --datasets rings --seeds 0 --iters 200
"""

import argparse
import dataclasses
import json
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
from rflow_tf.settings import at_least, parse_settings, setting  # noqa: E402

#: The reference's train_toy.py settings, as flags of train/toy.py.
REFERENCE_SETTINGS = [
    "--model",
    "resflow",
    "--blocks",
    "10",
    "--hidden",
    "128-128-128-128",
    "--activation",
    "lipswish",
    "--coeff",
    "0.9",
    "--dist",
    "geometric",
    "--p",
    "0.5",
    "--n_exact_terms",
    "2",
    "--lr",
    "1e-3",
    "--batch_size",
    "500",
    "--power_iterations",
    "5",
    "--n_test",
    "10000",
]
#: Test NLL (nats) of the authors' train_toy.py at these settings after 1000
#: iterations (one seed each).
REFERENCE_NLL = {"checkerboard": 4.27, "8gaussians": 3.78, "2spirals": 3.59, "rings": 3.56}
#: The four datasets with a reference figure (the default selection).
DEFAULT_DATASETS = tuple(REFERENCE_NLL)


def run_one(dataset, seed, iters, out_dir, extra=()):
    """One training run at :data:`REFERENCE_SETTINGS`; returns (test NLL, s/iter).

    Example: ``nll, spi = run_one("rings", 0, 100, "/tmp/toy_parity")``.
    """
    argv = [
        *REFERENCE_SETTINGS,
        "--data",
        dataset,
        "--seed",
        str(seed),
        "--iters",
        str(iters),
        "--out",
        out_dir,
        "--quiet",
        "--grid",
        "50",
        "--n_plot_samples",
        "500",
        *extra,
    ]
    result = toy.run(argv, reuse_trainer=True)
    return float(result["test_nll"]), float(result["sec_per_iter"])


def table(results, iters):
    """Markdown table of ``results`` ({dataset: [(nll, s_per_iter), ...]}).

    Example: ``print(table({"rings": [(3.5, 0.07), (3.52, 0.07)]}, 1000))``.
    """
    header = (
        f"| dataset | ours: test NLL, mean +- sd ({iters} iters) | seeds | reference "
        f"(1 seed) | ours - reference | s/iter (ours, mean) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        nll = np.array([r[0] for r in runs])
        spi = np.array([r[1] for r in runs])
        sd = float(nll.std(ddof=1)) if len(nll) > 1 else float("nan")
        ref = REFERENCE_NLL.get(name)
        ref_s = f"{ref:.2f}" if ref is not None and iters == 1000 else "-"
        diff = f"{nll.mean() - ref:+.3f}" if ref is not None and iters == 1000 else "-"
        lines.append(
            f"| {name} | {nll.mean():.3f} +- {sd:.3f} | {len(nll)} | {ref_s} | "
            f"{diff} | {spi.mean():.4f} |"
        )
    return "\n".join(lines)


def _check_datasets(options):
    """Raises ValueError for a name in ``--datasets`` that is no toy dataset (nor 'all')."""
    if options.datasets != ["all"]:
        unknown = sorted(set(options.datasets) - set(TOY_DATASETS))
        if unknown:
            raise ValueError(
                f"unknown datasets {unknown}; valid: {', '.join(TOY_DATASETS)} or 'all'"
            )


@dataclasses.dataclass(frozen=True)
class ToyParityOptions:
    """The options of this benchmark (its command line; flags it does not know
    go to every train/toy.py run)."""

    datasets: List[str] = setting(
        list(DEFAULT_DATASETS), help=f"datasets, or 'all' for {', '.join(TOY_DATASETS)}"
    )
    seeds: List[int] = setting([0, 1, 2], help="seeds")
    iters: int = setting(1000, help="training iterations per run", check=at_least(1))
    json: Optional[str] = setting(None, help="also write the raw results to this JSON file")
    out: Optional[str] = setting(None, help="directory for the toy PNGs (default: a temp dir)")


def main(argv=None):
    args, extra = parse_settings(
        ToyParityOptions,
        argv,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        check=_check_datasets,
        known=True,
    )
    datasets = list(TOY_DATASETS) if args.datasets == ["all"] else args.datasets
    out_dir = args.out or tempfile.mkdtemp(prefix="toy_parity_")
    print(
        f"[toy_parity] {len(datasets)} datasets x {len(args.seeds)} seeds, {args.iters} "
        f"iterations each; {load_average()}",
        flush=True,
    )
    results = {name: [] for name in datasets}
    t0 = time.perf_counter()
    n_runs, done = len(datasets) * len(args.seeds), 0
    for seed in args.seeds:
        for name in datasets:
            nll, spi = run_one(name, seed, args.iters, out_dir, extra)
            results[name].append((nll, spi))
            done += 1
            elapsed = time.perf_counter() - t0
            print(
                f"[toy_parity] {done}/{n_runs} {name} seed {seed}: test NLL {nll:.4f} nats, "
                f"{spi:.4f} s/iter | elapsed {elapsed / 60:.1f} min, ETA "
                f"{elapsed / done * (n_runs - done) / 60:.1f} min | {load_average()}",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"iters": args.iters, "results": results}, f, indent=2)
    print()
    print(table(results, args.iters))
    print(f"\n{load_average()} (s/iter is noisy on a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
