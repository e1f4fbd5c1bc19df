"""Benchmark: flow families on the 2-D toy densities, and dequantisation on the digits.

Two tables (markdown, printed and written to ``--out``):

1. **Toy densities**: residual flow (``resflow``), NAF with deep sigmoidal
   flows (``naf``), Flow++ MixLogCDF couplings (``mixlogcdf``) and RealNVP
   (``coupling``), each trained by :func:`rflow_tf.toy.run` with one budget on
   the 8 toy datasets and several seeds (one compiled trainer per model,
   reused across datasets and seeds: :func:`benchmarks.toy_densities.run_table`).
   Cells: test NLL in nats (exact log-det, 10,000 held-out points), mean
   +- standard deviation over seeds; last row: median seconds per training
   iteration.
2. **Digits bits/dim**: the small Flow++ (preset ``flowpp_digits``) and the
   small ResidualFlow (``digits_small``), each trained by ``train/main.py``
   for the same number of steps with ``--dequantization=uniform`` and
   ``--dequantization=variational``. Cells: test bits/dim (EMA weights, whole
   test split) +- standard error. Each number is the run's own
   dequantisation bound (uniform: E_u[-log2 p((x+u)/256)]/D + 8; variational:
   the negative ELBO in bits/dim), so lower is a better bound on the same
   model family.

Usage::

    python benchmarks/flow_families.py                                   # full (hours on 2 cores)
    nice -n 10 python benchmarks/flow_families.py --iters 300 --seeds 0 --digits_steps 300
    python benchmarks/flow_families.py --skip_digits --datasets moons rings --seeds 0 1 2
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from benchmarks._common import load_average  # noqa: E402
from benchmarks.toy_densities import run_table  # noqa: E402
from rflow_tf.data import TOY_DATASETS  # noqa: E402
from rflow_tf.settings import parse_settings, setting  # noqa: E402
from train import main as trainer_main  # noqa: E402

#: The toy model families compared (names of :data:`rflow_tf.toy.MODELS`).
TOY_FAMILIES = ("resflow", "naf", "mixlogcdf", "coupling")
#: The digits runs: (preset, dequantisation).
DIGITS_RUNS = (
    ("flowpp_digits", "uniform"),
    ("flowpp_digits", "variational"),
    ("digits_small", "uniform"),
    ("digits_small", "variational"),
)


def toy_table(datasets, models, seeds, iters, blocks, hidden, log=print):
    """``{(dataset, model): [result per seed]}`` of :func:`run_table` runs.

    Example: ``toy_table(["moons"], ["naf"], [0], iters=50, blocks=2, hidden="16-16")``.
    """
    out = {}
    for seed in seeds:
        res = run_table(datasets, models, iters, blocks, hidden, seed, log=log)
        for key, r in res.items():
            out.setdefault(key, []).append(r)
    return out


def toy_markdown(results, datasets, models):
    """Markdown: test NLL mean +- std over seeds per (dataset, model), best in bold,
    and a row of median s/iter per model.

    Example: ``print(toy_markdown(toy_table(...), ["moons"], ["naf"]))``.
    """
    lines = ["| dataset | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for data in datasets:
        means = [np.mean([r["test_nll"] for r in results[(data, m)]]) for m in models]
        cells = []
        for m, mean in zip(models, means):
            nll = [r["test_nll"] for r in results[(data, m)]]
            text = f"{mean:.3f}" + (f" +- {np.std(nll):.3f}" if len(nll) > 1 else "")
            cells.append(f"**{text}**" if mean == min(means) else text)
        lines.append(f"| {data} | " + " | ".join(cells) + " |")
    spi = [
        np.median([r["sec_per_iter"] for d in datasets for r in results[(d, m)]]) for m in models
    ]
    lines.append("| *s/iter (median)* | " + " | ".join(f"{s:.4f}" for s in spi) + " |")
    return "\n".join(lines)


def digits_runs(steps, seed=0, runs=DIGITS_RUNS, workdir=None, log=print):
    """Trains every (preset, dequantisation) of ``runs`` on the digits for ``steps``
    steps; returns ``{(preset, dequantisation): train/main.py result dict}``.

    Example: ``digits_runs(20, runs=[("tiny", "variational")])``.
    """
    workdir = workdir or tempfile.mkdtemp(prefix="flow_families_")
    out = {}
    for preset, deq in runs:
        args = trainer_main.parse_args(
            [
                f"--preset={preset}",
                f"--steps={steps}",
                f"--dequantization={deq}",
                f"--seed={seed}",
                f"--out={os.path.join(workdir, f'{preset}_{deq}')}",
                "--export_dir=",
                f"--eval_every={steps}",
                f"--sample_every={steps}",
                "--log_every=100",
                "--download=false",
            ]
        )
        t0 = time.perf_counter()
        r = trainer_main.train(args)
        r["wall_s"] = time.perf_counter() - t0
        out[(preset, deq)] = r
        log(
            f"[bench] {preset} {deq}: test bpd {r['test_bpd']:.4f} +- "
            f"{r['test_bpd_stderr']:.4f} | {r['steps_per_sec']:.2f} steps/s | "
            f"run {r['wall_s']:.0f} s",
            flush=True,
        )
    return out


def digits_markdown(results, steps):
    """Markdown: test bits/dim +- standard error, rows = presets, columns =
    dequantisation; plus steps/s.

    Example: ``print(digits_markdown(digits_runs(20), 20))``.
    """
    presets = sorted(
        {p for p, _ in results},
        key=lambda p: (
            [q for q, _ in DIGITS_RUNS].index(p) if p in [q for q, _ in DIGITS_RUNS] else 99
        ),
    )
    lines = [
        f"| model ({steps} steps) | uniform bpd | variational bpd | steps/s (u / v) |",
        "|---|---:|---:|---:|",
    ]
    for p in presets:
        u, v = results.get((p, "uniform")), results.get((p, "variational"))

        def cell(r):
            return "-" if r is None else f"{r['test_bpd']:.3f} +- {r['test_bpd_stderr']:.3f}"

        def rate(r):
            return "-" if r is None else f"{r['steps_per_sec']:.2f}"

        lines.append(f"| {p} | {cell(u)} | {cell(v)} | {rate(u)} / {rate(v)} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class FlowFamiliesOptions:
    """The options of this benchmark (its command line)."""

    datasets: List[str] = setting(list(TOY_DATASETS), help=None, choices=TOY_DATASETS)
    models: List[str] = setting(list(TOY_FAMILIES), help=None, choices=TOY_FAMILIES)
    seeds: List[int] = setting([0, 1, 2], help=None)
    iters: int = setting(1000, help="toy training steps per run")
    blocks: int = setting(5, help="blocks / coupling layers per toy model")
    hidden: str = setting("64-64-64", help="hidden widths of the toy nets")
    digits_steps: int = setting(1200, help="train/main.py steps of every digits run")
    skip_toy: bool = setting(False, help=None)
    skip_digits: bool = setting(False, help=None)
    out: str = setting(
        os.path.join(tempfile.gettempdir(), "flow_families"),
        help="directory for tables.md and results.json",
    )


def main(argv=None):
    """CLI: see the module docstring. Returns 0."""
    a = parse_settings(
        FlowFamiliesOptions,
        argv,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    os.makedirs(a.out, exist_ok=True)
    print(f"[bench] {load_average()} (timings on a shared machine are noisy)", flush=True)
    sections, dump = [], {}
    if not a.skip_toy:
        res = toy_table(a.datasets, a.models, a.seeds, a.iters, a.blocks, a.hidden)
        sections.append(
            f"Toy test NLL (nats), {a.iters} iterations, seeds {a.seeds}:\n\n"
            + toy_markdown(res, a.datasets, a.models)
        )
        dump["toy"] = {
            f"{d}/{m}": [{"test_nll": r["test_nll"], "sec_per_iter": r["sec_per_iter"]} for r in rs]
            for (d, m), rs in res.items()
        }
    if not a.skip_digits:
        res = digits_runs(a.digits_steps, seed=a.seeds[0])
        sections.append("Digits test bits/dim:\n\n" + digits_markdown(res, a.digits_steps))
        dump["digits"] = {
            f"{p}/{d}": {k: r[k] for k in ("test_bpd", "test_bpd_stderr", "steps_per_sec")}
            for (p, d), r in res.items()
        }
    text = "\n\n".join(sections) + f"\n\n({load_average()})\n"
    print(text)
    with open(os.path.join(a.out, "tables.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(dump, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
