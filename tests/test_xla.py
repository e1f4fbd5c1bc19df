"""A whole training step of residual blocks in a plain TFP program compiles
with XLA (``tf.function(jit_compile=True)``), the Lipschitz upkeep after the
optimiser step included, and computes what the graph step computes: the same
losses, gradients, updated weights and Lipschitz estimates, with the bound
kept (SVD of every effective kernel).

XLA draws other numbers than TensorFlow's kernels from the same stateless
seed (its Philox stream is laid out differently), so the comparison uses the
deterministic exact log-det; with the default unbiased estimator the compiled
step is checked to train and keep the bound.

The image trainer's step on one replica (``make_train_step(jit_compile=True)``)
is one XLA program too, compiled once: it is compared with the graph step
with the exact log-det and the dequantisation noise replaced by the cell
centres (for the same reason)."""

import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rl
from rflow_tf.bijectors import IResBlock, flow_kwargs
from rflow_tf.data import toy_2d
from rflow_tf.layers.lipschitz import plane_wave_start
from rflow_tf.layers.lipschitz.mixed_estimators import GeneralisedPowerMethod
from rflow_tf.toy import ToyTrainer, parse_args

tfb, tfd = tfp.bijectors, tfp.distributions


def _training_step(jit_compile, logdet):
    """A two-block 2-D flow built from fixed seeds, and its Adam step with the
    Lipschitz upkeep, compiled with or without XLA."""
    keras.utils.set_random_seed(0)
    blocks = [
        IResBlock.dense(2, hidden_units=(8, 8), coeff=0.9, logdet=logdet, name=f"block_{i}")
        for i in range(2)
    ]
    dist = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(blocks))
    )
    x = tf.random.stateless_normal([64, 2], seed=[1, 2])
    dist.log_prob(x)  # builds the layers
    variables = dist.trainable_variables
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(variables)

    def step(x, seed):
        kwargs = flow_kwargs(dist.bijector, seed=seed, training=True)
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(x, bijector_kwargs=kwargs))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        rl.update_lipschitz(blocks)
        return loss, grads

    return blocks, variables, tf.function(step, jit_compile=jit_compile), x


def _run(jit_compile, logdet, n_steps=2):
    blocks, variables, step, x = _training_step(jit_compile, logdet)
    losses, grads = [], []
    for i in range(n_steps):
        loss, g = step(x * (1.0 + 0.1 * i), tf.constant([7, i]))
        losses.append(float(loss))
        grads.append([t.numpy() for t in g])
    layers = rl.lipschitz_layers(blocks)
    # Read before any eager use of a kernel (which would re-estimate it): the
    # estimates the compiled step's upkeep stored are those of the new kernels.
    current = [bool(layer.estimate_is_current()) for layer in layers]
    return {
        "current": current,
        "losses": np.array(losses),
        "grads": grads,
        "weights": [v.numpy() for v in variables],
        "sigmas": np.array([float(layer.sigma) for layer in layers]),
        "norms": [np.linalg.norm(layer.effective_kernel().numpy(), 2) for layer in layers],
        "coeffs": [layer.coeff for layer in layers],
    }


def test_whole_training_step_compiles_with_xla_and_matches_the_graph_step():
    graph, xla = _run(False, "exact"), _run(True, "exact")
    np.testing.assert_allclose(xla["losses"], graph["losses"], rtol=1e-5)
    for g_xla, g_graph in zip(xla["grads"], graph["grads"]):
        for a, b in zip(g_xla, g_graph):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(xla["weights"], graph["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(xla["sigmas"], graph["sigmas"], rtol=1e-5)
    # The upkeep ran inside the compiled step: the bound holds for the new weights.
    assert all(xla["current"])
    for norm, coeff in zip(xla["norms"], xla["coeffs"]):
        assert norm <= coeff * (1 + 1e-3)


def test_compiled_step_with_the_unbiased_estimator_trains_and_keeps_the_bound():
    xla = _run(True, "unbiased", n_steps=3)
    assert np.all(np.isfinite(xla["losses"]))
    assert all(np.all(np.isfinite(w)) for w in xla["weights"])
    assert all(xla["current"])
    for norm, coeff in zip(xla["norms"], xla["coeffs"]):
        assert norm <= coeff * (1 + 1e-3)


def test_toy_trainer_compiles_its_whole_step_with_xla():
    args = ["--model", "resflow", "--blocks", "1", "--hidden", "8", "--power_iterations", "0"]
    trainer = ToyTrainer(parse_args(args + ["--jit_compile", "1"]))
    trainer.reset(toy_2d("moons", 256, seed=0))
    losses = [float(trainer.step(toy_2d("moons", 64, seed=i), i)) for i in range(2)]
    assert np.all(np.isfinite(losses))
    layers = trainer.flow.lipschitz
    assert layers and all(bool(layer.estimate_is_current()) for layer in layers)
    for layer in layers:
        assert np.linalg.norm(layer.effective_kernel().numpy(), 2) <= layer.coeff * (1 + 1e-3)


def _operator_norm(layer):
    """||W||_2 of a Lipschitz layer's map with its effective kernel: a dense
    kernel's, or a 'same' convolution's on its whole input map as a matrix."""
    kernel = layer.effective_kernel()
    if kernel.shape.rank == 2:
        return np.linalg.norm(kernel.numpy(), 2)
    (h, w), c_in = layer._input_hw, kernel.shape[2]  # noqa: SLF001
    basis = tf.reshape(tf.eye(h * w * c_in), [h * w * c_in, h, w, c_in])
    matrix = tf.reshape(layer.apply_kernel(basis, kernel), [h * w * c_in, -1])
    return np.linalg.norm(matrix.numpy(), 2)


def _image_steps(jit_compile, monkeypatch, n_steps=3):
    """Steps of the image trainer's training step (make_train_step, one
    replica, EMA, a step counter) on a one-block flow with the exact log-det;
    the loss hook makes step 2's loss NaN, so that update is skipped. The
    dequantisation noise is replaced by the cell centres: XLA's uniform draws
    from the same seed are other numbers."""
    import rflow_tf.data
    from rflow_tf.config import FlowConfig
    from rflow_tf.models import ResidualFlow
    from rflow_tf.training.ema import EMAWeights
    from rflow_tf.training.steps import make_optimizer, make_train_step

    def centres(x_int, n_bits=8, seed=None, dtype=tf.float32):
        return (tf.cast(x_int, dtype) + 0.5) / float(2**n_bits)

    monkeypatch.setattr(rflow_tf.data, "dequantize", centres)
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    config = FlowConfig(
        input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4, fc_end=False, logdet="exact"
    )
    # ActNorm is initialised on a batch of its own: on the training batches
    # no gradient is ~0 (Adam would magnify its rounding).
    images = np.random.default_rng(0).integers(0, 256, [n_steps + 1, 8, 4, 4, 1], dtype=np.uint8)
    with strategy.scope():
        model = ResidualFlow(config)
        model.initialize(centres(images[n_steps]))
        optimizer = make_optimizer(1e-2, 2)
        optimizer.build(model.trainable_variables)
        ema = EMAWeights(model, model.trainable_variables, strategy).variables
        step_var = tf.Variable(0, dtype=tf.int64)

    def nan_at_step_2(loss, step):
        return tf.where(tf.equal(step, 2), tf.constant(np.nan, loss.dtype), loss)

    step_fn = make_train_step(
        model,
        optimizer,
        strategy,
        ema,
        global_batch_size=8,
        ema_decay=0.9,
        jit_compile=jit_compile,
        step_var=step_var,
        loss_hook=nan_at_step_2,
    )
    outs, weights, seconds = [], [], []
    for i in range(n_steps):
        t = time.perf_counter()
        out = step_fn(tf.constant(images[i]), tf.constant(i, tf.int64))
        outs.append({k: float(v) for k, v in out.items()})
        seconds.append(time.perf_counter() - t)
        weights.append([v.numpy() for v in model.trainable_variables])
    layers = rl.lipschitz_layers(model)
    return {
        "outs": outs,
        "weights": weights,
        "ema": [v.numpy() for v in ema],
        "current": [bool(layer.estimate_is_current()) for layer in layers],
        "sigmas": np.array([float(layer.sigma) for layer in layers]),
        "norms": [_operator_norm(layer) for layer in layers],
        "coeffs": [layer.coeff for layer in layers],
        "counters": (int(step_var.numpy()), int(optimizer.iterations.numpy())),
        "traces": step_fn.experimental_get_tracing_count(),
        "seconds": seconds,
    }


def test_image_trainer_compiles_its_whole_step_once_and_matches_the_graph_step(monkeypatch):
    """--jit_compile on one replica: one XLA executable for the whole step
    (dequantisation, forward, backward, clipping, Adam, EMA, the skip of a
    non-finite update, the Lipschitz upkeep), compiled at the first step and
    reused by the next ones, with the graph step's losses, weights, EMA
    weights and Lipschitz estimates."""
    graph = _image_steps(False, monkeypatch)
    xla = _image_steps(True, monkeypatch)
    assert [o["ok"] for o in xla["outs"]] == [1.0, 0.0, 1.0]  # step 2's NaN: skipped
    for o_xla, o_graph in zip(xla["outs"], graph["outs"]):
        for key in ("loss", "grad_norm", "logdet"):
            np.testing.assert_allclose(o_xla[key], o_graph[key], rtol=1e-4, equal_nan=True)
    for w_xla, w_graph in zip(xla["weights"], graph["weights"]):
        for a, b in zip(w_xla, w_graph):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(xla["ema"], graph["ema"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(xla["sigmas"], graph["sigmas"], rtol=1e-5)
    assert xla["counters"] == graph["counters"] == (3, 2)  # the skipped update: no Adam step
    assert all(xla["current"])
    for norm, coeff in zip(xla["norms"], xla["coeffs"]):
        assert norm <= coeff * (1 + 1e-3)
    # Compiled once: one trace, and the later steps run the first step's
    # executable (a recompilation takes seconds; a step, milliseconds).
    assert xla["traces"] == 1
    first, later = xla["seconds"][0], xla["seconds"][1:]
    assert max(later) < first / 10, xla["seconds"]


def _plane_wave():
    return lambda kernel: plane_wave_start(kernel, (6, 6))


def _mixed_norm_restart():
    layer = rl.LipschitzDense(3, domain=2, codomain=3)
    layer.build((None, 5))
    estimator = GeneralisedPowerMethod(layer, (3,), (5,))
    return lambda kernel: tf.concat(estimator.iterate(kernel, tf.ones([5]), 1e-6, 50, 4), 0)


@pytest.mark.parametrize(
    "make, shape", [(_plane_wave, [3, 3, 2, 3]), (_mixed_norm_restart, [5, 3])]
)
def test_restart_vectors_compile_once_for_a_changing_kernel(make, shape):
    """The restarts pick their best start (the conv layers' plane wave its
    frequency, the mixed-norm power method its best random start) with
    gathers: a slice at the computed index would make XLA need the kernel's
    value at compile time, so a compiled step recompiled for every new kernel."""
    kernel = tf.Variable(tf.random.stateless_normal(shape, seed=[0, 1]))
    change = 0.1 * tf.random.stateless_normal(shape, seed=[2, 3])
    fn = make()

    @tf.function(jit_compile=True)
    def move_then_start(delta):
        kernel.assign_add(delta)
        return fn(kernel.read_value())

    compiled = tf.function(fn, jit_compile=True)
    seconds = []
    for _ in range(3):
        t = time.perf_counter()
        got = move_then_start(change).numpy()
        seconds.append(time.perf_counter() - t)
        np.testing.assert_allclose(got, compiled(kernel.read_value()).numpy(), atol=1e-6)
    assert max(seconds[1:]) < seconds[0] / 10, seconds
