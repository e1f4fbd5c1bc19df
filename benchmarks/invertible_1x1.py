#!/usr/bin/env python
"""Time of an invertible 1x1 convolution: LU versus plain-matrix weights.

One step is a forward pass y = W x per pixel, the log-det
(positions * log |det W|), and the gradient of sum(y^2) / 2 - log-det
w.r.t. x and the weights, inside ``tf.function`` (plain and XLA). Input
[batch, size, size, channels], default 64 x 16 x 16 x 12.
The four configurations run interleaved, round after round, so a shared
machine's load hits them alike; the table gives the median and the minimum
over ``--rounds`` rounds (tracing excluded).

Usage::

    python benchmarks/invertible_1x1.py                    # markdown table
    python benchmarks/invertible_1x1.py --channels 512 --size 4
"""

import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rflow_tf  # noqa: E402,F401  (sets TensorFlow defaults first)

# isort: split
import tensorflow as tf  # noqa: E402

from rflow_tf.bijectors.invertible_conv import Invertible1x1Conv  # noqa: E402
from rflow_tf.settings import parse_settings, setting  # noqa: E402


def make_step(parameterization, shape, jit):
    conv = Invertible1x1Conv(shape[1:], parameterization, "orthogonal", seed=0)
    variables = list(conv.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv.forward(x)
            loss = 0.5 * tf.reduce_mean(tf.reduce_sum(tf.square(y), [1, 2, 3])) - tf.reduce_mean(
                conv.forward_log_det_jacobian(x, 3)
            )
        return tape.gradient(loss, [x] + variables)

    return step


@dataclasses.dataclass(frozen=True)
class Invertible1x1Options:
    """The options of this benchmark (its command line)."""

    batch: int = setting(64, help=None)
    size: int = setting(16, help=None)
    channels: int = setting(12, help=None)
    rounds: int = setting(200, help=None)


def main(argv=None):
    args = parse_settings(Invertible1x1Options, argv, description=__doc__.splitlines()[0])
    shape = (args.batch, args.size, args.size, args.channels)
    x = tf.random.stateless_normal(shape, [0, 1])
    configs = [(par, jit) for par in ("lu", "matrix") for jit in (False, True)]
    steps = {c: make_step(c[0], shape, c[1]) for c in configs}
    times = {c: [] for c in configs}
    for c in configs:  # trace / compile
        [g.numpy() for g in steps[c](x)]
    for _ in range(args.rounds):
        for c in configs:
            t0 = time.perf_counter()
            [g.numpy() for g in steps[c](x)]
            times[c].append(time.perf_counter() - t0)
    print(
        f"input {shape}, {args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| parameterization | XLA | median ms/step | min ms/step |")
    print("|---|---|---|---|")
    for par, jit in configs:
        t = times[(par, jit)]
        print(
            f"| {par} | {'yes' if jit else 'no'} | {1e3 * statistics.median(t):.2f} "
            f"| {1e3 * min(t):.2f} |"
        )


if __name__ == "__main__":
    main()
