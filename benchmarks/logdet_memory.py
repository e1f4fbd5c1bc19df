"""Memory and time of one training step versus the number of power-series terms
(the paper's Figure 3, on CPU).

A stack of convolutional residual blocks (default: 8 blocks, 16x16x3 input,
128 hidden channels, kernels 3-1-3, batch 16) is trained for one step of
maximum likelihood with a fixed number n of power-series terms
(``logdet="truncated"``, so every mode does exactly the same work), using

* ``backprop``: plain backpropagation through the power series,
* ``neumann``: the Neumann-series gradient (Theorem 2); the backward pass
  recomputes g and differentiates it together with the surrogate u^T J v,
* ``neumann+gif``: Neumann gradient computed in the forward pass (eq. 9),
  g's activations kept for the path gradient.

Each configuration runs in a fresh subprocess; memory is the growth of the
process's peak resident set (VmHWM) during the first compiled step over the
resident set after building the model, so it contains the step's activations
and gradients. Time is the median of ``--repeats`` steps after the first.

Usage::

    python benchmarks/logdet_memory.py                  # full table (minutes)
    python benchmarks/logdet_memory.py --terms 2 5 --blocks 2 --repeats 1
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from rflow_tf.settings import parse_settings, setting  # noqa: E402  (imports TensorFlow)

MODES = {
    "backprop": dict(neumann_grad=False, grad_in_forward=False),
    "neumann": dict(neumann_grad=True, grad_in_forward=False),
    "neumann+gif": dict(neumann_grad=True, grad_in_forward=True),
}


def _rss_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not found in /proc/self/status")


def run_single(mode, n_terms, args):
    """Builds the stack, runs the steps, returns a dict of measurements."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    import rflow_tf  # noqa: F401  (first: sets TensorFlow's runtime defaults)
    from rflow_tf.bijectors import IResBlock

    keras.utils.set_random_seed(0)
    shape = (args.size, args.size, args.channels)
    blocks = [
        IResBlock.conv(
            shape,
            hidden_channels=args.hidden,
            kernels="3-1-3",
            coeff=0.98,
            logdet="truncated",
            n_terms=n_terms,
            **MODES[mode],
        )
        for _ in range(args.blocks)
    ]
    variables = [w.value for b in blocks for w in b.net.trainable_weights]
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(variables)
    x = tf.random.normal((args.batch,) + shape)

    @tf.function
    def step(x, seed):
        with tf.GradientTape() as tape:
            z, total = x, 0.0
            for i, b in enumerate(blocks):
                z, ld = b.forward_and_log_det(z, seed=seed + i, training=True)
                total += ld
            log_prob = -0.5 * tf.reduce_sum(z**2, axis=[1, 2, 3]) + total
            loss = -tf.reduce_mean(log_prob)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    step.get_concrete_function(x, tf.constant([0, 0]))  # trace outside the measurement
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    step(x, tf.constant([1, 1])).numpy()
    first = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        step(x, tf.constant([2 + r, 2])).numpy()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "mode": mode,
        "n": n_terms,
        "step_mb": peak - base,
        "peak_mb": peak,
        "median_s": times[len(times) // 2] if times else first,
    }


@dataclasses.dataclass(frozen=True)
class LogdetMemoryOptions:
    """The options of this benchmark (its command line)."""

    terms: List[int] = setting([2, 5, 10, 20], help="numbers of power-series terms n")
    modes: List[str] = setting(list(MODES), help=None, choices=list(MODES))
    blocks: int = setting(8, help="residual blocks")
    size: int = setting(16, help="image height and width")
    channels: int = setting(3, help="image channels")
    hidden: int = setting(128, help="hidden channels")
    batch: int = setting(16, help="batch size")
    repeats: int = setting(3, help="timed steps after the first")
    single: Optional[List[str]] = setting(
        None, help=None, flag="hidden", nargs=2, metavar=("MODE", "N")
    )


def main(argv=None):
    args = parse_settings(
        LogdetMemoryOptions,
        argv,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    if args.single:
        print(json.dumps(run_single(args.single[0], int(args.single[1]), args)))
        return 0

    print(
        f"# {args.blocks} conv blocks, input {args.channels}x{args.size}x{args.size}, "
        f"{args.hidden} hidden channels, batch {args.batch}; one training step"
    )
    rows, start = [], time.perf_counter()
    configs = [(m, n) for n in args.terms for m in args.modes]
    passthrough = [
        f"--blocks={args.blocks}",
        f"--size={args.size}",
        f"--channels={args.channels}",
        f"--hidden={args.hidden}",
        f"--batch={args.batch}",
        f"--repeats={args.repeats}",
    ]
    for i, (mode, n) in enumerate(configs):
        out = subprocess.run(
            [sys.executable, __file__, "--single", mode, str(n)] + passthrough,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"configuration {mode} n={n} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        elapsed = time.perf_counter() - start
        eta = elapsed / (i + 1) * (len(configs) - i - 1)
        print(
            f"  [{i + 1}/{len(configs)}] {mode:12s} n={n:<3d} {rows[-1]['step_mb']:8.0f} MB "
            f"{rows[-1]['median_s']:7.2f} s   (elapsed {elapsed:.0f} s, ETA {eta:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    print(
        "\n| n terms | "
        + " | ".join(f"{m} MB" for m in args.modes)
        + " | "
        + " | ".join(f"{m} s/step" for m in args.modes)
        + " |"
    )
    print("|---|" + "---|" * (2 * len(args.modes)))
    for n in args.terms:
        by_mode = {r["mode"]: r for r in rows if r["n"] == n}
        mem = " | ".join(f"{by_mode[m]['step_mb']:.0f}" for m in args.modes)
        sec = " | ".join(f"{by_mode[m]['median_s']:.2f}" for m in args.modes)
        print(f"| {n} | {mem} | {sec} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
