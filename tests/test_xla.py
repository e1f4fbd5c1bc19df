"""A whole training step of residual blocks in a plain TFP program compiles
with XLA (``tf.function(jit_compile=True)``), the Lipschitz upkeep after the
optimiser step included, and computes what the graph step computes: the same
losses, gradients, updated weights and Lipschitz estimates, with the bound
kept (SVD of every effective kernel).

XLA draws other numbers than TensorFlow's kernels from the same stateless
seed (its Philox stream is laid out differently), so the comparison uses the
deterministic exact log-det; with the default unbiased estimator the compiled
step is checked to train and keep the bound."""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import layers as rl
from rflow_tf.bijectors import IResBlock, flow_kwargs
from rflow_tf.data import toy_2d
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
