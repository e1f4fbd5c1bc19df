#!/usr/bin/env python
"""Fixed cost of residual flows: graph size, tracing and first-call time, per workload.

For each compiled function it prints the graph's nodes (the outer graph plus
every function in its library), the number of library functions, Python
tracing time, the first call's time (graph optimisation, instantiation and one
run) and the steady-state time per call (median of ``--steps`` calls).

Workloads (each in a fresh subprocess, so no trace or cache is shared):

* ``four_block``: 4 x ``IResBlock.dense(2, hidden_units=(64, 64), coeff=0.9)``
  in ``tfd.TransformedDistribution(base, tfb.Invert(tfb.Chain(blocks)))``,
  batch 256, a Keras Adam ``tf.function`` training step written as a TFP user
  would, and ``log_prob`` alone;
* ``maf``: TFP's ``MaskedAutoregressiveFlow`` of the same size (4 blocks, hidden
  64-64, ReLU, permutations between them) with the same step, for scale;
* ``toy``: the toy trainer at the authors' settings (8gaussians, 10 blocks,
  hidden 128-128-128-128, geometric roulette p = 0.5, coeff 0.9, batch 500):
  training step, evaluation with the exact log-det (the same compiled function
  serves the density grid) and the sampler (fixed-point inverses);
* ``image``: the canonical image model of ``benchmarks/train_step.py`` (MNIST
  shape, 3 scales x 2 blocks, 128 channels, our default Neumann backward),
  batch 64: the trainer's training step, its evaluation step, the sampler and
  the SavedModel export (its time is the whole ``rflow_tf.save`` call);
* ``image_xla``: the same model and batch, the trainer's training step with
  ``jit_compile=True`` (one replica: the whole step, Lipschitz upkeep included,
  is one XLA program); its first call is the compilation;
* ``celebahq``: constructing the paper's CelebA-HQ 256 model (``--celebahq``; slow).

Usage::

    python benchmarks/graph_cost.py                    # four_block, maf, toy, image, image_xla
    python benchmarks/graph_cost.py --workloads four_block,maf
    python benchmarks/graph_cost.py --celebahq         # also the CelebA-HQ construction
    python benchmarks/graph_cost.py --single toy       # one workload, JSON lines
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from rflow_tf.settings import parse_settings, setting  # noqa: E402  (imports TensorFlow)

WORKLOADS = ("four_block", "maf", "toy", "image", "image_xla")


def _nodes(concrete):
    graph = concrete.graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function), len(
        graph.library.function
    )


def measure(name, fn, args, steps):
    """Traces ``fn`` (a tf.function) for ``args``, calls it once, then ``steps``
    times; returns a row dict."""
    import numpy as np
    import tensorflow as tf

    def run():
        out = fn(*args)
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)

    t = time.perf_counter()
    concrete = fn.get_concrete_function(*args)
    trace = time.perf_counter() - t
    nodes, functions = _nodes(concrete)
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {
        "part": name,
        "nodes": nodes,
        "functions": functions,
        "trace_s": trace,
        "first_call_s": first,
        "step_s": float(np.median(times)) if times else None,
    }


def _four_block(maf, steps):
    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp

    from rflow_tf import IResBlock

    tfb, tfd = tfp.bijectors, tfp.distributions
    keras.utils.set_random_seed(0)
    base = tfd.MultivariateNormalDiag(tf.zeros(2))
    if maf:
        parts = []
        for _ in range(4):
            net = tfb.AutoregressiveNetwork(params=2, hidden_units=[64, 64], activation="relu")
            parts += [tfb.MaskedAutoregressiveFlow(net), tfb.Permute([1, 0])]
        dist = tfd.TransformedDistribution(base, tfb.Chain(parts))
    else:
        blocks = [IResBlock.dense(2, hidden_units=(64, 64), coeff=0.9) for _ in range(4)]
        dist = tfd.TransformedDistribution(base, tfb.Invert(tfb.Chain(blocks)))
    x = tf.random.stateless_normal([256, 2], [1, 2])
    dist.log_prob(x)  # builds the weights
    opt = keras.optimizers.Adam(1e-3)
    opt.build(dist.trainable_variables)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(x))
        grads = tape.gradient(loss, dist.trainable_variables)
        opt.apply_gradients(zip(grads, dist.trainable_variables))
        return loss

    rows = [measure("train step", train_step, (x,), steps)]
    rows.append(measure("log_prob", tf.function(dist.log_prob), (x,), steps))
    return rows


def _toy(steps):
    import numpy as np
    import tensorflow as tf

    from rflow_tf.data import toy_2d
    from rflow_tf.toy.loop import ToyTrainer
    from rflow_tf.toy.options import parse_args

    args = parse_args(
        "--data 8gaussians --blocks 10 --hidden 128-128-128-128 --dist geometric --p 0.5 "
        "--coeff 0.9".split()
    )
    t = time.perf_counter()
    trainer = ToyTrainer(args)
    build = time.perf_counter() - t
    x = tf.constant(toy_2d("8gaussians", args.batch_size, seed=0), tf.float32)
    trainer.reset(x.numpy())
    seed = tf.constant([0, 0], tf.int32)
    rows = [{"part": "build + optimizer", "build_s": build}]
    rows.append(measure("train step", trainer._train_step, (x, seed), steps))  # noqa: SLF001
    pts = tf.constant(np.asarray(toy_2d("8gaussians", 10000, seed=1)), tf.float32)
    rows.append(measure("exact log-det eval / grid", trainer.log_prob_exact, (pts,), 2))
    z = tf.random.stateless_normal([2000, 2], [3, 4])
    rows.append(measure("sampler", trainer._sample, (z,), 2))  # noqa: SLF001
    return rows


def _image_model():
    """The canonical image model (one replica), its optimiser and EMA copies,
    initialised on a batch of 64 uint8 images; returns them, the batch, the
    strategy and the build time."""
    import tensorflow as tf

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from train_step import benchmark_config

    from rflow_tf import models
    from rflow_tf import training as trainer

    tf.keras.utils.set_random_seed(0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    t = time.perf_counter()
    with strategy.scope():
        model = models.ResidualFlow(benchmark_config(grad_in_forward=False))
        optimizer = trainer.make_optimizer(1e-3, 1000)
        optimizer.build(model.trainable_variables)
        ema = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False) for v in model.trainable_variables
        ]
    build = time.perf_counter() - t
    x_int = tf.cast(
        tf.random.stateless_uniform([64, 28, 28, 1], [0, 1], minval=0, maxval=256, dtype=tf.int32),
        tf.uint8,
    )
    model.initialize(tf.cast(x_int, tf.float32) / 256.0 + 1.0 / 512.0)
    return model, optimizer, ema, x_int, strategy, build


def _image(steps):
    import tensorflow as tf

    import rflow_tf
    from rflow_tf import training as trainer

    model, optimizer, ema, x_int, strategy, build = _image_model()
    step = trainer.make_train_step(
        model, optimizer, strategy, ema, global_batch_size=64, n_bits=8, seed=0
    )
    rows = [{"part": "build model + optimizer", "build_s": build}]
    rows.append(measure("train step", step, (x_int, tf.constant(0, tf.int64)), steps))
    evaluate = trainer.make_eval_step(model, strategy, n_bits=8, seed=0)
    mask = tf.ones([64], tf.bool)
    rows.append(measure("eval step", evaluate, (x_int, mask, tf.constant(0, tf.int64)), 2))
    sample = tf.function(lambda seed: model.sample(16, seed=seed))
    rows.append(measure("sampler (16)", sample, (tf.constant([1, 2]),), 2))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rflow_tf.save(model, os.path.join(tmp, "flow"), n_bits=8)
        rows.append({"part": "SavedModel export", "build_s": time.perf_counter() - t})
    return rows


def _image_xla(steps):
    import tensorflow as tf

    from rflow_tf import training as trainer

    model, optimizer, ema, x_int, strategy, build = _image_model()
    step = trainer.make_train_step(
        model, optimizer, strategy, ema, global_batch_size=64, n_bits=8, seed=0, jit_compile=True
    )
    rows = [{"part": "build model + optimizer", "build_s": build}]
    # The first call compiles the whole step with XLA; the next ones reuse it.
    rows.append(measure("train step (XLA, whole)", step, (x_int, tf.constant(0, tf.int64)), steps))
    rows[-1]["tracing_count"] = step.experimental_get_tracing_count()
    return rows


def _celebahq():
    from rflow_tf import models

    t = time.perf_counter()
    model = models.ResidualFlow(models.get_preset("celeb_a_hq"))
    return [
        {
            "part": "construct the celeb_a_hq preset",
            "build_s": time.perf_counter() - t,
            "params": int(model.count_params()),
        }
    ]


def run_single(name, steps):
    sys.path.insert(0, REPO)
    import rflow_tf  # noqa: F401  (first: sets TensorFlow's runtime defaults)

    if name in ("four_block", "maf"):
        return _four_block(name == "maf", steps)
    if name == "toy":
        return _toy(steps)
    if name == "image":
        return _image(steps)
    if name == "image_xla":
        return _image_xla(steps)
    if name == "celebahq":
        return _celebahq()
    raise ValueError(f"unknown workload {name!r}")


def _fmt(value, unit=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}{unit}" if value < 1 else f"{value:.1f}{unit}"
    return f"{value:,}"


@dataclasses.dataclass(frozen=True)
class GraphCostOptions:
    """The options of this benchmark (its command line)."""

    single: Optional[str] = setting(None, help="run one workload in this process, print JSON lines")
    workloads: str = setting(",".join(WORKLOADS), help="comma-separated list")
    celebahq: bool = setting(False, help="also construct the CelebA-HQ model")
    steps: int = setting(10, help="timed calls of each training step")


def main(argv=None):
    args = parse_settings(GraphCostOptions, argv, description=__doc__.split("\n\n")[0])
    if args.single:
        for row in run_single(args.single, args.steps):
            print(json.dumps({"workload": args.single, **row}), flush=True)
        return
    names = [w for w in args.workloads.split(",") if w] + (["celebahq"] if args.celebahq else [])
    import platform

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from _common import load_average

    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} python {platform.python_version()}")
    header = "| workload | part | nodes | functions | trace | first call | step | other |"
    print(header)
    print("|" + "---|" * 8)
    results = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--single", name]
        proc = subprocess.run(cmd + ["--steps", str(args.steps)], capture_output=True, text=True)
        if proc.returncode:
            print(f"| {name} | failed | {proc.stderr.strip().splitlines()[-1][:200]} |||||")
            continue
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            results[(name, row["part"])] = row
            other = f"{row['build_s']:.1f} s" if "build_s" in row else ""
            print(
                f"| {name} | {row['part']} | {_fmt(row.get('nodes'))} | "
                f"{_fmt(row.get('functions'))} | {_fmt(row.get('trace_s'), ' s')} | "
                f"{_fmt(row.get('first_call_s'), ' s')} | {_fmt(row.get('step_s'), ' s')} | "
                f"{other} |",
                flush=True,
            )
    ours, maf = results.get(("four_block", "train step")), results.get(("maf", "train step"))
    if ours and maf:
        first = lambda r: r["trace_s"] + r["first_call_s"]  # noqa: E731
        print(
            f"\n4-block flow vs MAF, train step: nodes {ours['nodes'] / maf['nodes']:.2f}x "
            f"(goal <= 2.5x), first result (trace + first call) "
            f"{first(ours) / first(maf):.2f}x (goal <= 3x)"
        )
    toy = results.get(("toy", "train step"))
    if toy:
        print(f"toy first step (trace + first call): {toy['trace_s'] + toy['first_call_s']:.1f} s")
    image = results.get(("image", "train step"))
    if image:
        print(
            f"image first step (trace + first call): "
            f"{image['trace_s'] + image['first_call_s']:.1f} s"
        )
    xla = results.get(("image_xla", "train step (XLA, whole)"))
    if xla:
        print(
            f"image XLA whole step: trace + compile + first run "
            f"{xla['trace_s'] + xla['first_call_s']:.1f} s, then {xla['step_s']:.3f} s per step"
            f" (traced {xla['tracing_count']} time(s))"
        )
    print(load_average())


if __name__ == "__main__":
    main()
