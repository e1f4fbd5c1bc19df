"""FusedAdam: Keras Adam's update, one fused op per variable, in every context."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from rflow_tf.optimizers import FusedAdam
from rflow_tf.training.steps import LinearWarmup


def _train(optimizer, compiled, steps=12, amsgrad=False):
    rng = np.random.default_rng(0)
    variables = [
        tf.Variable(rng.normal(size=(4, 3)).astype("float32")),
        tf.Variable(rng.normal(size=(3,)).astype("float32")),
    ]
    optimizer.build(variables)
    grads = [
        [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in variables]
        for _ in range(steps)
    ]

    def step(gs):
        optimizer.apply_gradients(zip(gs, variables))

    step = tf.function(step) if compiled else step
    for gs in grads:
        step(gs)
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_adam_follows_keras_adam(compiled, amsgrad):
    # A learning-rate schedule and Keras' own (beta_1, beta_2, epsilon) settings.
    settings = dict(learning_rate=LinearWarmup(0.05, 4), beta_2=0.99, epsilon=1e-8, amsgrad=amsgrad)
    fused = _train(FusedAdam(**settings), compiled)
    plain = _train(keras.optimizers.Adam(**settings), compiled)
    start = _train(FusedAdam(**settings), compiled, steps=0)
    for a, b, w0 in zip(fused, plain, start):
        assert np.abs(a - w0).max() > 0.05  # the weights moved
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float rounding apart


def test_fused_adam_updates_each_variable_with_one_op():
    def graph_of(optimizer):
        variables = [tf.Variable(tf.ones([3])) for _ in range(6)]
        optimizer.build(variables)

        @tf.function
        def step():
            optimizer.apply_gradients([(tf.ones([3]), v) for v in variables])

        return step.get_concrete_function().graph.as_graph_def()

    fused, plain = graph_of(FusedAdam(1e-3)), graph_of(keras.optimizers.Adam(1e-3))
    ops = [n.op for n in fused.node]
    assert ops.count("ResourceApplyAdam") == 6
    assert ops.count("Pow") == 2  # the step's beta powers, once
    assert len(fused.node) < len(plain.node) / 3


def test_fused_adam_checkpoints_are_keras_adams(tmp_path):
    variable = tf.Variable([1.0, 2.0])
    fused = FusedAdam(0.1)
    for _ in range(3):
        fused.apply_gradients([(tf.constant([0.5, -1.0]), variable)])
    path = tf.train.Checkpoint(optimizer=fused, variable=variable).write(f"{tmp_path}/ckpt")
    restored_variable = tf.Variable([0.0, 0.0])
    plain = keras.optimizers.Adam(0.1)
    plain.build([restored_variable])
    tf.train.Checkpoint(optimizer=plain, variable=restored_variable).read(path).assert_consumed()
    assert int(plain.iterations) == 3
    for a, b in zip(plain.variables, fused.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


MIRRORED = textwrap.dedent("""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from rflow_tf.optimizers import FusedAdam
    from rflow_tf.training.steps import LinearWarmup

    x = tf.constant(np.random.default_rng(0).normal(size=(8, 3)).astype("float32"))
    results = {}
    for use in ("single", "mirrored"):
        strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if use == "mirrored"
                    else tf.distribute.get_strategy())
        with strategy.scope():
            w = tf.Variable(tf.ones([3]))
            lr = LinearWarmup(0.1, 2)  # computed in each replica: a per-replica value
            opt = FusedAdam(lr) if use == "mirrored" else keras.optimizers.Adam(lr)
            opt.build([w])

        def step(xb):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(tf.reduce_sum((xb * w) ** 2, -1),
                                                  global_batch_size=8)
            opt.apply_gradients([(tape.gradient(loss, w), w)])

        ds = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(x).batch(8))
        for _ in range(3):
            for batch in ds:
                strategy.run(tf.function(step), args=(batch,))
        results[use] = w.numpy() if use == "single" else [
            t.numpy() for t in strategy.experimental_local_results(w)]
    for replica in results["mirrored"]:
        np.testing.assert_allclose(replica, results["single"], rtol=1e-5)
    assert np.abs(results["single"] - 1).max() > 0.1
    print("OK")
""")


def test_fused_adam_under_mirrored_strategy():
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
