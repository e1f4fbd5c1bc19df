"""The custom Neumann gradients under MirroredStrategy equal single-device gradients."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from rflow_tf.bijectors import IResBlock

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = tf.random.stateless_normal([8, 3], [1, 2])
    for gif in (False, True):
        results = {}
        for use in ("single", "mirrored"):
            keras.utils.set_random_seed(0)
            with (strategy if use == "mirrored" else tf.distribute.get_strategy()).scope():
                block = IResBlock.dense(3, hidden_units=(8,), grad_in_forward=gif)
                variables = [w.value for w in block.net.trainable_weights]

            def step(xb):
                with tf.GradientTape() as tape:
                    y, ld = block.forward_and_log_det(xb, seed=[5, 5], training=True)
                    nll = -ld + 0.5 * tf.reduce_sum(y ** 2, -1)
                    loss = tf.nn.compute_average_loss(nll, global_batch_size=8)
                return tape.gradient(loss, variables)

            if use == "single":   # each replica sees half the batch with the same seed
                f = tf.function(step)
                results[use] = [a.numpy() + b.numpy() for a, b in zip(f(x[:4]), f(x[4:]))]
            else:
                ds = strategy.experimental_distribute_dataset(
                    tf.data.Dataset.from_tensor_slices(x).batch(8))
                per_replica = strategy.run(tf.function(step), args=(next(iter(ds)),))
                results[use] = [strategy.reduce("SUM", g, axis=None).numpy() for g in per_replica]
        for a, b in zip(results["single"], results["mirrored"]):
            assert np.abs(a).sum() > 0
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    print("MIRRORED_OK")
""")


def test_neumann_gradients_under_mirrored_strategy():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MIRRORED_OK" in out.stdout
