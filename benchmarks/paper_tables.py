"""Small-scale versions of the Residual Flows paper's Tables 3, 4/5 and Figure 2.

Every run is an ordinary ``train/main.py`` run (same trainer, EMA weights for
the test numbers), on the offline 8x8 digits by default:

* **Table 4/5 analogue** (paper Section 5.4, hybrid modelling): rows =
  residual blocks, affine coupling blocks, coupling + invertible 1x1 conv;
  columns = classification only (lambda = 0, no log-det), hybrid with
  lambda = 1/D, hybrid with lambda = 1. Cells: test accuracy and test
  bits/dim (the latter with 20 exact terms for residual models). Training
  images get the reference's augmentation for the dataset (none for
  digits); ``--train_flags=--crop_padding=1`` translates every training
  image by up to 1 pixel each way (see the README for what it does here).
* **Table 3 analogue** (paper Section 5.1 ablation): i-ResNet (truncated
  log-det estimator with ``--n_terms`` terms, ELU) vs Residual Flow with ELU
  vs with LipSwish (unbiased estimator). For each: the model's own training
  estimate of bits/dim and the true value, on a fixed batch of training
  images at the end of training, and the true test bits/dim (EMA weights).
  "True" means the exact log-det (``logdet="exact"``, full Jacobian) when
  D <= 256, else the unbiased estimator with 20 exact terms.
* **Figure 2 analogue**: bits/dim of the truncated (i-ResNet) model over
  training, its biased training estimate against its true value on the same
  fixed training batch, as a PNG (``<out>/figure2_truncated_bias.png``).

Usage::

    python benchmarks/paper_tables.py                        # small version, digits
    python benchmarks/paper_tables.py --tables 3             # Table 3 and Figure 2 only
    python benchmarks/paper_tables.py --tables 45 --steps 300
    python benchmarks/paper_tables.py --dataset cifar10 --preset cifar10 --steps 0 \\
        --train_flags="--batch_size=64 --epochs=250"         # paper scale (GPUs)

``--steps 0`` keeps the preset's training length; ``--train_flags`` passes
any other ``train/main.py`` flag to every run. Prints each table as markdown
and writes ``<out>/paper_tables.md`` and ``<out>/results.json``.
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import rflow_tf  # noqa: E402,F401  (first: sets TensorFlow's runtime defaults)

# isort: split
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from rflow_tf import data, export, models  # noqa: E402
from rflow_tf.settings import parse_settings, setting  # noqa: E402
from train import main as tm  # noqa: E402

#: Table 4/5 rows: (label, train/main.py flags).
ROWS = (
    ("Residual blocks", ["--block=residual"]),
    ("Coupling", ["--block=coupling"]),
    ("Coupling + 1x1 conv", ["--block=coupling", "--invertible_1x1"]),
)
#: Table 4/5 columns: (label, flags).
COLUMNS = (
    ("classification only", ["--task=classification"]),
    ("hybrid, lambda = 1/D", ["--task=hybrid", "--hybrid_lambda=1/D"]),
    ("hybrid, lambda = 1", ["--task=hybrid", "--hybrid_lambda=1"]),
)
#: Table 3 rows: (label, flags).
TABLE3 = (
    ("i-ResNet (truncated, ELU)", ["--activation=elu", "--logdet=truncated"]),
    ("Residual Flow, ELU", ["--activation=elu", "--logdet=unbiased"]),
    ("Residual Flow, LipSwish", ["--activation=lipswish", "--logdet=unbiased"]),
)


def _base_flags(args, out):
    flags = [
        f"--dataset={args.dataset}",
        f"--out={out}",
        "--export_dir=",
        f"--seed={args.seed}",
        f"--log_every={args.log_every}",
        f"--sample_every={10**9}",
    ]
    if args.preset:
        flags.append(f"--preset={args.preset}")
    if args.logit_alpha:
        flags.append(f"--logit_alpha={args.logit_alpha}")
    if args.steps:
        flags += [f"--steps={args.steps}", f"--eval_every={args.steps}"]
    return flags + shlex.split(args.train_flags)


def table45(args, workdir):
    """Runs the 9 cells; returns {(row, column): result dict}."""
    results = {}
    for row, row_flags in ROWS:
        for col, col_flags in COLUMNS:
            out = os.path.join(workdir, f"t45_{len(results)}")
            t0 = time.time()
            print(f"\n=== Table 4/5: {row} / {col} ===", flush=True)
            res = tm.train(tm.parse_args(_base_flags(args, out) + row_flags + col_flags))
            res["seconds"] = time.time() - t0
            results[(row, col)] = res
    return results


def format_table45(results):
    lines = [
        "| blocks | " + " | ".join(c for c, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for row, _ in ROWS:
        cells = []
        for col, _ in COLUMNS:
            r = results[(row, col)]
            acc = f"{100 * r['test_accuracy']:.2f}%"
            bpd = r.get("test_bpd")
            cells.append(acc if bpd is None or not math.isfinite(bpd) else f"{acc} / {bpd:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _true_model(cfg):
    """A model with the "true" log-det of ``cfg``'s flow (exact for D <= 256)."""
    if cfg.num_dims <= export.EXACT_MAX_DIMS:
        return models.ResidualFlow(
            cfg.replace(logdet="exact", neumann_grad=False, grad_in_forward=False)
        )
    return models.ResidualFlow(cfg.replace(logdet="unbiased", n_exact_terms_eval=20))


def _mean_bpd(model, batches, n_bits, training, seed=(3, 4)):
    vals = [
        model.bits_per_dim(x, n_bits=n_bits, training=training, seed=list(seed), validate=False)
        for x in batches
    ]
    return float(tf.reduce_mean(tf.concat(vals, 0)).numpy())


def _fixed_batches(name, split, n_bits, n_images, batch=100):
    ds = data.load_image_dataset(
        name, split, batch, n_bits=n_bits, shuffle=False, flip=False, repeat=False
    )
    out, count = [], 0
    for i, x in enumerate(ds):
        out.append(data.dequantize(x, n_bits, seed=[11, i]))
        count += int(x.shape[0])
        if n_images and count >= n_images:
            break
    return out


def table3(args, workdir):
    """Trains the three Table-3 models, tracking the training estimate and the
    true bits/dim on a fixed training batch every ``--curve_every`` steps."""
    results = {}
    for i, (label, flags) in enumerate(TABLE3):
        print(f"\n=== Table 3: {label} ===", flush=True)
        t0 = time.time()
        trainer = tm.make_trainer(
            tm.parse_args(_base_flags(args, os.path.join(workdir, f"t3_{i}")) + flags)
        )
        cfg, settings = trainer.flow_config, trainer.settings
        n_bits = cfg.n_bits
        train_fixed = _fixed_batches(trainer.spec.dataset, "train", n_bits, args.curve_images)
        test_fixed = _fixed_batches(trainer.spec.dataset, "test", n_bits, args.test_images)
        exact = _true_model(cfg)
        # As the trainer: the ActNorm batch from a pipeline of its own, so training
        # is the first iteration of ds (a second one is reshuffled by tf.data).
        first = next(iter(trainer.run_data.train_dataset()))
        trainer.restore_or_initialize(first)
        ds = trainer.run_data.train_dataset()
        it = iter(trainer.run_data.distribute(ds))
        step_fn = trainer.train_step_fn
        curve = []

        def point(step):
            est = _mean_bpd(trainer.model, train_fixed, n_bits, training=True)
            export.copy_weights(trainer.model, exact)
            true = _mean_bpd(exact, train_fixed, n_bits, training=False)
            curve.append((step, est, true))
            print(
                f"  step {step}: training estimate {est:.4f}, true {true:.4f} bits/dim", flush=True
            )

        total = int(settings.steps)
        for step in range(total):
            step_fn(next(it), tf.constant(step, tf.int64))
            if (step + 1) % args.curve_every == 0 or step + 1 == total:
                point(step + 1)
        with trainer.ema_weights():
            own_test = _mean_bpd(trainer.model, test_fixed, n_bits, training=False)
            export.copy_weights(trainer.model, exact)
            true_test = _mean_bpd(exact, test_fixed, n_bits, training=False)
        trainer.close()
        results[label] = {
            "train_estimate": curve[-1][1],
            "train_true": curve[-1][2],
            "test_own_estimator": own_test,
            "test_true": true_test,
            "curve": curve,
            "seconds": time.time() - t0,
            "logdet": cfg.logdet,
            "n_terms": cfg.n_terms,
            "activation": cfg.activation,
        }
    return results


def format_table3(results):
    lines = [
        "| model | training estimate | training, true | test (own estimator) | test, true |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['train_estimate']:.3f} | {r['train_true']:.3f} | "
            f"{r['test_own_estimator']:.3f} | {r['test_true']:.3f} |"
        )
    return "\n".join(lines)


def figure2(results, path):
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(6, 4))
    label = TABLE3[0][0]
    curve = np.array(results[label]["curve"])
    ax.plot(curve[:, 0], curve[:, 1], label=f"{label}: training estimate (biased)")
    ax.plot(curve[:, 0], curve[:, 2], label=f"{label}: true value")
    other = TABLE3[2][0]
    if other in results:
        c2 = np.array(results[other]["curve"])
        ax.plot(c2[:, 0], c2[:, 2], "--", label=f"{other}: true value")
    ax.set_xlabel("training step")
    ax.set_ylabel("bits/dim (fixed training batch)")
    ax.set_title("Truncated log-det: estimate vs true value")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclasses.dataclass(frozen=True)
class PaperTablesOptions:
    """The options of this benchmark (its command line)."""

    tables: List[str] = setting(
        ["45", "3"], choices=["45", "3"], help="Which tables (Table 3 includes Figure 2)."
    )
    dataset: str = setting("digits", help=None)
    preset: Optional[str] = setting(None, help="Default: the dataset's (digits_small).")
    logit_alpha: float = setting(
        0.05,
        help="alpha of every run's logit layer (0: the preset's). 0.05 is the "
        "reference's value except for MNIST; see the README for why digits "
        "uses it here.",
    )
    steps: int = setting(500, help="Training steps of every run (0: the preset's length).")
    seed: int = setting(0, help=None)
    log_every: int = setting(200, help=None)
    train_flags: str = setting(
        "", help="Extra train/main.py flags for every run, e.g. '--batch_size=128'."
    )
    curve_every: int = setting(100, help="Figure 2: steps between points.")
    curve_images: int = setting(200, help="Figure 2: size of the fixed training batch.")
    test_images: int = setting(0, help="Table 3: test images for the true test bits/dim (0: all).")
    out: str = setting(os.path.join(REPO, "docs", "paper_tables"), help=None)
    workdir: Optional[str] = setting(None, help="Run directories (default: a temp dir).")


def main(argv=None):
    args = parse_settings(
        PaperTablesOptions,
        argv,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    workdir = args.workdir or tempfile.mkdtemp(prefix="paper_tables_")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    report, saved = [], {"args": vars(args)}
    if "45" in args.tables:
        r45 = table45(args, workdir)
        md = format_table45(r45)
        print("\nTable 4/5 analogue (test accuracy / test bits/dim):\n" + md, flush=True)
        report.append("Table 4/5 analogue (test accuracy / test bits/dim)\n\n" + md)
        saved["table45"] = {
            f"{r} | {c}": {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
            for (r, c), res in r45.items()
        }
    if "3" in args.tables:
        r3 = table3(args, workdir)
        md = format_table3(r3)
        print("\nTable 3 analogue (bits/dim):\n" + md, flush=True)
        report.append("Table 3 analogue (bits/dim)\n\n" + md)
        fig = figure2(r3, os.path.join(args.out, "figure2_truncated_bias.png"))
        print(f"Figure 2 analogue: {fig}")
        saved["table3"] = r3
    load = os.getloadavg()
    footer = (
        f"Total {time.time() - t0:.0f} s; load average at the end "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} CPUs."
    )
    print(footer)
    with open(os.path.join(args.out, "paper_tables.md"), "w") as f:
        f.write("\n\n".join(report) + "\n\n" + footer + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(saved, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
