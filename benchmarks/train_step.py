#!/usr/bin/env python
"""Time and peak memory of one full Residual Flow training step.

A fixed configuration (the paper's MNIST block design, reduced):
input 1x28x28, 3 scales of 2 blocks, 128 hidden channels, kernels 3-1-3,
LipSwish, coeff 0.98, Russian roulette Poisson(lambda=2) with 2 exact terms,
Neumann gradient with the gradient computed in the forward pass, ActNorm,
FC end (4 blocks d -> 128 -> 128 -> d), logit alpha 1e-6, batch 64, Adam.

A step is exactly the trainer's (``rflow_tf.training.make_train_step``):
dequantisation, forward + unbiased log-det, Neumann backward, gradient
all-reduce and clipping, Adam, EMA update and power iteration to convergence.

Rows: that configuration (gradient-in-forward, the reference's
memory-saving mode), the same model with our default Neumann backward
(``grad_in_forward=False``: g is recomputed in the backward pass and one
backward pass serves the path and the log-det gradients), and XLA.

Each configuration runs in a fresh subprocess so that its peak memory is its
own: peak RSS from ``resource.getrusage``; "TF runtime" is the RSS right
after importing TensorFlow, TFP and Keras (before any model); "step memory"
is peak RSS minus that; "tensor peak" is TensorFlow's allocator peak
(``tf.config.experimental.get_memory_info``, available on CPU with the oneDNN
kernels that ``rflow_tf`` turns on). Times are the median of ``--steps``
steps after ``--warmup`` steps (tracing/compilation excluded).

XLA: the whole step compiles (the roulette draw is an inversion of a
stateless uniform and the series weights are computed per term, so every
shape is static); a row that fails to compile reports the compiler's message.

The machine is shared: the load average during the run is printed; compare
rows measured at similar loads.

Usage::

    python benchmarks/train_step.py                 # the table (3 rows)
    python benchmarks/train_step.py --steps 20 --batch 32
    python benchmarks/train_step.py --single --jit  # one configuration, JSON line
    python benchmarks/train_step.py --single --no_grad_in_forward
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from rflow_tf.settings import parse_settings, setting  # noqa: E402  (imports TensorFlow)

# Reference (authors' PyTorch implementation, same configuration, this machine).
REFERENCE_SECONDS = 2.0
REFERENCE_PEAK_GB = 1.8


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def benchmark_config(grad_in_forward=True):
    """The fixed FlowConfig of the benchmark (``grad_in_forward=False``: our
    default Neumann backward instead of the reference's gradient-in-forward).

    Example: ``ResidualFlow(benchmark_config())``.
    """
    from rflow_tf import models

    return models.FlowConfig(
        input_shape=(28, 28, 1),
        n_blocks=(2, 2, 2),
        hidden_channels=128,
        kernels="3-1-3",
        activation="lipswish",
        coeff=0.98,
        dist="poisson",
        rate=2.0,
        n_exact_terms=2,
        neumann_grad=True,
        grad_in_forward=grad_in_forward,
        actnorm=True,
        fc_end=True,
        n_fc_blocks=4,
        fc_hidden=(128, 128),
        logit_alpha=1e-6,
        n_bits=8,
    ).validate()


def run_single(jit, batch, steps, warmup, grad_in_forward=True):
    """Builds the model, runs ``warmup`` + ``steps`` training steps; returns a dict."""
    sys.path.insert(0, REPO)
    import numpy as np
    import tensorflow as tf

    import rflow_tf  # noqa: F401  (first: sets TensorFlow's runtime defaults)
    from rflow_tf import models
    from rflow_tf import training as trainer

    rss0 = _rss_mb()  # the TensorFlow runtime after import, before any model
    tf.keras.utils.set_random_seed(0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = models.ResidualFlow(benchmark_config(grad_in_forward))
        optimizer = trainer.make_optimizer(1e-3, 1000)
        optimizer.build(model.trainable_variables)
        ema = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False) for v in model.trainable_variables
        ]
    x_int = tf.random.stateless_uniform(
        [batch, 28, 28, 1], [0, 1], minval=0, maxval=256, dtype=tf.int32
    )
    x_int = tf.cast(x_int, tf.uint8)
    model.initialize(tf.cast(x_int, tf.float32) / 256.0 + 1.0 / 512.0)
    model.converge_lipschitz()
    step_fn = trainer.make_train_step(
        model,
        optimizer,
        strategy,
        ema,
        global_batch_size=batch,
        n_bits=8,
        grad_clip=1.0,
        ema_decay=0.999,
        seed=0,
        jit_compile=jit,
    )
    x = strategy.experimental_distribute_values_from_function(lambda ctx: x_int)
    t0 = time.perf_counter()
    for i in range(warmup):
        out = step_fn(x, tf.constant(i, tf.int64))
        float(out["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t = time.perf_counter()
        out = step_fn(x, tf.constant(warmup + i, tf.int64))
        loss = float(out["loss"])  # waits for the step
        times.append(time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        mem = tf.config.experimental.get_memory_info("CPU:0")
        tf_peak_mb = mem["peak"] / 2**20
    except (ValueError, RuntimeError):
        tf_peak_mb = None
    return {
        "jit_compile": bool(jit),
        "grad_in_forward": bool(grad_in_forward),
        "batch": batch,
        "steps": steps,
        "import_rss_mb": rss0,
        "median_s": float(np.median(times)),
        "min_s": float(np.min(times)),
        "max_s": float(np.max(times)),
        "warmup_s": compile_s,
        "peak_rss_mb": peak_mb,
        "step_mem_mb": peak_mb - rss0,
        "tf_peak_mb": tf_peak_mb,
        "loss": loss,
        "params": int(model.count_params()),
        "loadavg": os.getloadavg()[0],
    }


def _failure_reason(stderr):
    """The most informative line of a failed run's stderr."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for key in (
        "Detected unsupported operations",
        "must be a compile-time constant",
        "Error:",
        "Error",
    ):
        for i, ln in enumerate(lines):
            if key in ln:
                if key == "must be a compile-time constant" or "Detected" in ln:
                    return ln[:300]
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                return (ln + " " + nxt)[:300]
    return lines[-1][:300] if lines else "unknown error"


@dataclasses.dataclass(frozen=True)
class TrainStepOptions:
    """The options of this benchmark (its command line)."""

    single: bool = setting(False, help="run one configuration, print JSON")
    jit: bool = setting(False, help="with --single: jit_compile=True")
    batch: int = setting(64, help=None)
    steps: int = setting(10, help="timed steps")
    warmup: int = setting(3, help="untimed steps (tracing/compiling)")
    no_grad_in_forward: bool = setting(
        False,
        help="with --single: our default Neumann backward (recompute g, one shared "
        "backward pass) instead of the reference's gradient-in-forward",
    )


def main(argv=None):
    args = parse_settings(TrainStepOptions, argv, description=__doc__.split("\n\n")[0])
    if args.single:
        print(
            "RESULT "
            + json.dumps(
                run_single(
                    args.jit, args.batch, args.steps, args.warmup, not args.no_grad_in_forward
                )
            ),
            flush=True,
        )
        return 0

    rows, failures = [], {}
    configs = [(False, True), (False, False), (True, True)]  # (jit_compile, grad_in_forward)
    for jit, gif in configs:
        cmd = (
            [
                sys.executable,
                os.path.abspath(__file__),
                "--single",
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            + (["--jit"] if jit else [])
            + ([] if gif else ["--no_grad_in_forward"])
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            failures[(jit, gif)] = _failure_reason(proc.stderr)
            print(
                f"jit_compile={jit}, grad_in_forward={gif}: failed (exit {proc.returncode}): "
                f"{failures[(jit, gif)]}",
                file=sys.stderr,
            )
            continue
        rows.append(json.loads(lines[-1][len("RESULT ") :]))

    print(
        f"Training step, input 1x28x28, blocks 2-2-2, 128 channels, batch {args.batch}, "
        f"{os.cpu_count()} CPU cores; median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        "| configuration | median s/step | vs PyTorch 2.0 s | peak RSS (GB) | TF runtime "
        "after import (GB) | step memory (GB) | tensor peak (GB) | warm-up (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| PyTorch reference | {REFERENCE_SECONDS:.2f} | 1.00x | {REFERENCE_PEAK_GB:.2f} "
        "| - | - | - | - |"
    )

    def label(jit, gif):
        name = "XLA jit_compile" if jit else "graph (tf.function)"
        return name + (", grad-in-forward" if gif else ", Neumann backward (default)")

    def gb(mb):
        return "-" if mb is None else f"{mb / 1024:.2f}"

    for r in rows:
        name = label(r["jit_compile"], r["grad_in_forward"])
        ratio = REFERENCE_SECONDS / r["median_s"]
        speed = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        print(
            f"| {name} | {r['median_s']:.3f} | {speed} | {gb(r['peak_rss_mb'])} "
            f"| {gb(r['import_rss_mb'])} | {gb(r['step_mem_mb'])} | {gb(r['tf_peak_mb'])} "
            f"| {r['warmup_s']:.0f} |"
        )
    for key, reason in failures.items():
        print(f"| {label(*key)} | fails to compile: {reason[:160]} | - | - | - | - | - | - |")
    for r in rows:
        print(
            f"# {label(r['jit_compile'], r['grad_in_forward'])}: "
            f"min {r['min_s']:.3f} s, "
            f"max {r['max_s']:.3f} s, {r['params']:,} parameters, load average {r['loadavg']:.1f}, "
            f"tf memory info: {r['tf_peak_mb']}"
        )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
