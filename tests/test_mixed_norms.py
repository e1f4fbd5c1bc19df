"""Mixed norms in the layers, blocks, config and CLIs: every bound is checked
against exact math (brute-force norms of the layers' matrices, full Jacobians
with slogdet, worst-case pairs found by gradient ascent)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import exact_log_det, jacobian

from rflow_tf import layers as rl
from rflow_tf import models
from rflow_tf import norms as rn
from rflow_tf.bijectors import IResBlock

INF = rn.INF


def _norm(x, p):
    """||x||_p over all but the first axis (numpy, independent of rflow_tf.norms)."""
    a = np.abs(np.reshape(x, (x.shape[0], -1)))
    return a.max(1) if p == INF else (a**p).sum(1) ** (1.0 / p)


def _dense_matrix(layer, kernel):
    """The matrix of the layer's whole linear map (columns: images of unit vectors)."""
    shape = layer._operator_input_shape[1:]
    n = int(np.prod(shape))
    eye = tf.reshape(tf.eye(n, dtype=kernel.dtype), [n] + list(shape))
    return tf.reshape(layer.apply_kernel(eye, kernel), [n, -1]).numpy().T


def _dual_dir(y, r):
    """numpy: the unit vector of the dual norm attaining <., y> = ||y||_r (rows of y)."""
    a = np.abs(y)
    if r == 1.0:
        return np.sign(y)
    if r == INF:
        top = (a >= a.max(1, keepdims=True)).astype(y.dtype)
        return np.sign(y) * top / top.sum(1, keepdims=True)
    z = np.sign(y) * (a / a.max(1, keepdims=True)) ** (r - 1.0)
    rs = r / (r - 1.0)
    return z / ((np.abs(z) ** rs).sum(1, keepdims=True) ** (1.0 / rs))


def _exact_norm(w, p, q, starts=256, steps=300):
    """||W||_{p->q} in numpy, independent of rflow_tf.norms: exact for p = 1 (largest
    column q-norm), q = inf (largest row p*-norm) and 2->2 (SVD); elsewhere the best
    of ``starts`` random starts of the generalised power method (a lower bound)."""
    w = np.asarray(w, np.float64)
    if p == 1.0:
        return float(_norm(w.T, q).max())
    if q == INF:
        return float(_norm(w, 1.0 if p == INF else p / (p - 1.0)).max())
    if p == q == 2.0:
        return float(np.linalg.svd(w, compute_uv=False)[0])
    ps = INF if p == 1.0 else (1.0 if p == INF else p / (p - 1.0))
    v = np.random.default_rng(0).normal(size=(starts, w.shape[1]))
    best = 0.0
    for _ in range(steps):
        v = _dual_dir(_dual_dir(v @ w.T, q) @ w, ps)
        new = float((_norm(v @ w.T, q) / _norm(v, p)).max())
        if new - best <= 1e-9 * new:
            break
        best = new
    return max(best, new)


def _block_order(block):
    """The block's one norm: the first linear layer's domain order (a float)."""
    first = rl.lipschitz_layers(block)[0]
    p = first.orders()[0]
    return float(p) if tf.is_tensor(p) else p


def _worst_ratio(g, p, shape, n_pairs=128, steps=15, seed=0):
    """max ||g(x) - g(y)||_p / ||x - y||_p over random pairs, each then pushed
    by gradient ascent on the ratio (so a wrong bound is found, not just hoped for)."""
    rng = np.random.default_rng(seed)
    x = tf.Variable(rng.normal(size=(n_pairs,) + shape) * 2.0, dtype=tf.float32)
    d = tf.Variable(
        rng.normal(size=(n_pairs,) + shape)
        * 10.0 ** rng.uniform(-3, 0, (n_pairs,) + (1,) * len(shape)),
        dtype=tf.float32,
    )
    opt = keras.optimizers.Adam(0.05)
    axes = list(range(1, len(shape) + 1))

    def ratio():
        num = rn.vector_norm(g(x + d) - g(x), p, axis=axes)
        return num / rn.vector_norm(d, p, axis=axes)

    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_sum(tf.math.log(ratio() + 1e-30))
        opt.apply_gradients(zip(tape.gradient(loss, [x, d]), [x, d]))
    # The final ratio in float64 with numpy norms, independent of the ascent.
    x64, d64 = x.numpy(), d.numpy()
    num = g(tf.constant(x64 + d64)).numpy() - g(tf.constant(x64)).numpy()
    return float(np.max(_norm(num, p) / _norm(d64, p)))


# ------------------------------------------------------------------- layers


@pytest.mark.parametrize("domain,codomain", [(2, 3), ("f", 2), (3, 1), (1, 2), (2, "f"), (1.5, 4)])
def test_layer_norm_estimate_against_brute_force(domain, codomain):
    keras.utils.set_random_seed(1)
    dense = rl.LipschitzDense(5, coeff=0.9, domain=domain, codomain=codomain)
    dense(tf.zeros([1, 4]))
    conv = rl.LipschitzConv2D(3, 3, coeff=0.9, domain=domain, codomain=codomain)
    conv(tf.zeros([1, 3, 3, 2]))
    p, q = rn.parse_order(domain), rn.parse_order(codomain)
    for layer in (dense, conv):
        kernel = layer._kernel_value()
        exact = _exact_norm(_dense_matrix(layer, kernel), p, q)
        sigma = float(layer.sigma)
        # a lower bound (attained by v) within 1% of the norm, the closed forms exact
        assert 0.99 * exact <= sigma <= exact * (1 + 1e-5), (layer.name, sigma, exact)
        eff = _exact_norm(_dense_matrix(layer, layer.effective_kernel()), p, q)
        assert eff <= 0.9 * exact / sigma * (1 + 1e-5) and eff <= 0.9 / 0.99
        if rn.has_closed_form(p, q):
            np.testing.assert_allclose(sigma, exact, rtol=1e-5)


def test_layers_of_one_configuration_share_the_careful_estimate_function():
    """Two 2->3 conv layers of one configuration, built eagerly: one traced
    careful-estimate function serves both (so a model's build traces it once
    per configuration), and each layer gets the estimate of its own kernel."""
    from rflow_tf.layers.lipschitz import upkeep

    keras.utils.set_random_seed(3)
    layers = [rl.LipschitzConv2D(3, 3, coeff=0.9, domain=2, codomain=3) for _ in range(2)]
    for layer in layers:
        layer(tf.zeros([1, 3, 3, 2]))
    keys = {("lipschitz_converge",) + upkeep.upkeep_signature(layer, True) for layer in layers}
    assert len(keys) == 1
    function = upkeep._SHARED_UPKEEP[keys.pop()][0]
    assert function.experimental_get_tracing_count() == 1
    layers[1].kernel.assign(layers[1].kernel * 3.0)
    layers[1].converge()
    sigmas = [float(layer.sigma) for layer in layers]
    for layer, sigma in zip(layers, sigmas):
        exact = _exact_norm(_dense_matrix(layer, layer._kernel_value()), 2.0, 3.0)
        assert 0.99 * exact <= sigma <= exact * (1 + 1e-5), (layer.name, sigma, exact)
    assert sigmas[1] > 2.5 * sigmas[0]


def test_layer_reestimates_when_kernel_or_learned_order_changes():
    order = rl.LearnableOrder(3.0)
    layer = rl.LipschitzDense(6, coeff=0.9, domain=2, codomain=order)
    layer(tf.zeros([1, 4]))
    assert not layer.is_spectral
    for change in ("order", "kernel"):
        if change == "order":
            order.raw.assign(order.raw + 0.7)
        else:
            layer.kernel.assign(layer.kernel * 1.5 + 0.1)
        layer(tf.ones([1, 4]))  # in-call upkeep (no converge call)
        q = float(order.order())
        exact = _exact_norm(layer.kernel.numpy().T, 2.0, q)
        np.testing.assert_allclose(float(layer.sigma), exact, rtol=1e-3)


def test_layers_with_their_own_learned_orders_share_one_function_each_its_orders():
    """Two layers of one configuration, each with a learnable codomain order of
    its own: one traced careful estimate and one upkeep serve both, each
    reading its own order (from its state), in a graph and eagerly."""
    from rflow_tf.layers.lipschitz import upkeep

    keras.utils.set_random_seed(4)
    orders = [rl.LearnableOrder(3.0), rl.LearnableOrder(1.5)]
    layers = [rl.LipschitzDense(6, coeff=0.9, domain=2, codomain=o) for o in orders]
    for layer in layers:
        layer(tf.zeros([1, 4]))
    signatures = {upkeep.upkeep_signature(layer, True) for layer in layers}
    assert len(signatures) == 1
    converge = upkeep._SHARED_UPKEEP[("lipschitz_converge",) + next(iter(signatures))][0]

    @tf.function
    def both(x):
        return [layer(x) for layer in layers]

    for change in ("order", "kernel"):
        for order, layer in zip(orders, layers):
            if change == "order":
                order.raw.assign(order.raw + 0.4)
            else:
                layer.kernel.assign(layer.kernel * 1.5 + 0.1)
        both(tf.ones([1, 4]))  # the in-call upkeep, in the shared function
        for order, layer in zip(orders, layers):
            assert bool(layer.estimate_is_current())
            exact = _exact_norm(layer.kernel.numpy().T, 2.0, float(order.order()))
            np.testing.assert_allclose(float(layer.sigma), exact, rtol=1e-3)
    for layer in layers:
        layer.kernel.assign(layer.kernel * 0.5)
        layer.converge()  # eagerly, in the shared careful estimate
    for order, layer in zip(orders, layers):
        exact = _exact_norm(layer.kernel.numpy().T, 2.0, float(order.order()))
        np.testing.assert_allclose(float(layer.sigma), exact, rtol=1e-3)
    assert converge.experimental_get_tracing_count() == 1
    upkeeps = [
        f
        for f in both.get_concrete_function(tf.ones([1, 4])).graph.as_graph_def().library.function
        if "lipschitz_upkeep" in f.signature.name
    ]
    assert len(upkeeps) == 1


def test_get_config_round_trips_orders():
    order = rl.LearnableOrder(2.5)
    layer = rl.LipschitzDense(3, coeff=0.8, domain="f", codomain=order)
    x = tf.random.normal([4, 5])
    y = layer(x)
    order.raw.assign(0.3)
    y = layer(x)
    cfg = layer.get_config()
    assert cfg["domain"] == "inf" and json.loads(json.dumps(cfg))
    clone = rl.LipschitzDense.from_config(cfg)
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(float(clone.codomain.order()), float(order.order()), rtol=1e-6)
    np.testing.assert_allclose(clone(x).numpy(), y.numpy(), rtol=1e-5, atol=1e-6)
    default = rl.LipschitzConv2D(2, 1).get_config()
    assert (default["domain"], default["codomain"]) == (2.0, 2.0)


def test_bad_orders_are_refused_clearly():
    with pytest.raises(ValueError, match="domain must be in"):
        rl.LipschitzDense(3, domain=0.5)
    with pytest.raises(ValueError, match="learnable order must lie in"):
        rl.LearnableOrder("f")
    with pytest.raises(ValueError, match="learn_p.*order 1 is inf"):
        rl.lipschitz_dense_net(2, (4,), vnorms="2f2", learn_p=True)
    with pytest.raises(ValueError, match="first and last"):
        IResBlock.dense(2, (4, 4), vnorms="2f31")
    with pytest.raises(ValueError, match="static input height and width"):
        rl.LipschitzConv2D(2, 1, domain=3).build((None, None, None, 2))


# ------------------------------------------------------------------- blocks


def _train_a_few_steps(block, shape, steps=3):
    """Adam steps that push g's output up (so normalisation is active), through
    the block's log-det too; every trainable variable moves, orders included."""
    variables = block.trainable_variables
    opt = keras.optimizers.Adam(0.1)
    x = tf.random.stateless_normal((16,) + shape, [3, 4])
    for i in range(steps):
        with tf.GradientTape() as tape:
            y, ld = block.forward_and_log_det(x, seed=[i, 0], training=True)
            loss = -tf.reduce_mean((y - x) ** 2) - tf.reduce_mean(ld)
        grads = tape.gradient(loss, variables)
        assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
        opt.apply_gradients(zip(grads, variables))


BLOCK_CASES = [
    ("dense", "2f12", False),
    ("dense", "2332", True),
    ("conv", "2f32", False),
    ("conv", "3", True),
]


@pytest.mark.parametrize("kind,vnorms,learn_p", BLOCK_CASES)
def test_block_is_lipschitz_in_its_own_norm(kind, vnorms, learn_p):
    keras.utils.set_random_seed(7)
    coeff = 0.9
    if kind == "dense":
        shape = (3,)
        block = IResBlock.dense(
            3,
            (8, 8),
            coeff=coeff,
            vnorms=vnorms,
            learn_p=learn_p,
            init="glorot",
            activation="lcube",
        )
    else:
        shape = (3, 3, 2)
        block = IResBlock.conv(
            shape,
            4,
            "3-1-3",
            coeff=coeff,
            vnorms=vnorms,
            learn_p=learn_p,
            init="glorot",
            preactivation=False,
        )
    layers = rl.lipschitz_layers(block)
    assert all(not layer.is_spectral for layer in layers)
    orders_before = rl.learned_orders(block)
    for stage in ("init", "trained"):
        if stage == "trained":
            _train_a_few_steps(block, shape)
            if learn_p:
                assert rl.learned_orders(block) != orders_before  # the orders moved
        # normalisation is active somewhere, so the bound is really exercised
        assert max(float(layer.sigma) for layer in layers) > coeff
        p = _block_order(block)
        # the exact product bound, from brute-force norms of the effective maps
        bound = 1.0
        for layer in layers:
            kernel = layer.effective_kernel()
            a, b = (float(o) for o in layer.orders())
            norm = _exact_norm(_dense_matrix(layer, kernel), a, b)
            assert norm <= coeff / 0.99, (stage, layer.name, norm)
            bound *= norm
        worst = _worst_ratio(block.net, p, shape)
        assert worst <= bound * (1 + 1e-4), (stage, worst, bound)
        assert worst <= coeff, (stage, worst)


def test_unbiased_logdet_and_inverse_with_mixed_norms_and_learned_p():
    keras.utils.set_random_seed(3)
    block = IResBlock.dense(
        3,
        (16,),
        coeff=0.95,
        vnorms="232",
        learn_p=True,
        activation="elu",
        dtype="float64",
        n_exact_terms=2,
    )
    first, second = rl.lipschitz_layers(block)
    # the learned orders away from their start: p0 = 2.6, p1 = 4.2
    first.domain.raw.assign(rn.unconstrained_from_order(2.6))
    first.codomain.raw.assign(rn.unconstrained_from_order(4.2))
    first.kernel.assign(first.kernel * 5.0)
    second.kernel.assign(tf.transpose(first.kernel))
    first.bias.assign(tf.random.normal(first.bias.shape, dtype=tf.float64) + 1.0)
    rl.converge_lipschitz(block)
    x = tf.random.stateless_normal([3, 3], [4, 2], dtype=tf.float64)
    exact = exact_log_det(lambda t: t + block.net(t), x)
    assert np.max(np.abs(jacobian(block.net, x))) > 0.3  # far from the identity: a real test

    @tf.function
    def estimate(seed):
        return block.forward_and_log_det(x, seed=seed, training=True)[1]

    n = 400
    samples = np.stack([estimate(tf.constant([i, 23])).numpy() for i in range(n)])
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(n)
    assert np.all(np.abs(mean - exact) < 4 * se + 1e-12), (mean, exact, se)
    y = block.forward(x)
    np.testing.assert_allclose(block.inverse(tf.identity(y)).numpy(), x.numpy(), atol=1e-5)


def test_order_gradients_finite_at_the_bounds():
    keras.utils.set_random_seed(5)
    block = IResBlock.dense(2, (6,), coeff=0.9, vnorms="222", learn_p=True, logdet="exact")
    first = rl.lipschitz_layers(block)[0]
    x = tf.random.normal([8, 2])
    for raw_p, raw_q in [(-60.0, 60.0), (60.0, -60.0), (-3.0, 8.0), (0.0, 0.0)]:
        first.domain.raw.assign(raw_p)
        first.codomain.raw.assign(raw_q)
        p, q = float(first.domain.order()), float(first.codomain.order())
        assert 1.001 <= min(p, q) and max(p, q) <= 5.0
        with tf.GradientTape() as tape:
            y, ld = block.forward_and_log_det(x)
            loss = tf.reduce_sum(y**2) + tf.reduce_sum(ld)
        grads = tape.gradient(loss, block.trainable_variables)
        assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads), (p, q)


# ---------------------------------------------------------- config and CLIs


def test_flow_config_vnorms_versions_and_errors():
    base = dict(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4, fc_hidden=(4, 4))
    cfg = models.FlowConfig(**base, vnorms="2f32").validate()
    assert cfg.config_version == 4 == models.CONFIG_VERSION
    assert models.FlowConfig.from_json(cfg.to_json()) == cfg
    old = models.FlowConfig.from_dict(
        {"input_shape": [4, 4, 1], "n_blocks": [1], "config_version": 3}
    )
    assert (old.vnorms, old.learn_p) == ("2222", False)
    flow = models.ResidualFlow(
        models.FlowConfig(**base, vnorms="2332", learn_p=True, n_fc_blocks=1)
    )
    layers = rl.lipschitz_layers(flow)
    assert layers and all(not layer.is_spectral for layer in layers)
    assert len(rl.learned_orders(flow)) == 6  # 3 per block (conv, FC), tied in chains
    for bad, match in [
        (dict(vnorms="2f3f2"), "does not fit the 3 linear layers"),
        (dict(vnorms="2f32", fc_hidden=(4,)), "fc_hidden"),
        (dict(vnorms="2f32", learn_p=True), "cannot be learned"),
        (dict(activation="fullsort"), "toy nets"),
        (dict(vnorms="2f32", block="coupling"), "residual blocks only"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            models.FlowConfig(**{**base, **bad}).validate()


def test_cli_flags_reach_the_config():
    from rflow_tf.toy import options as toy_options
    from train import main

    args = main.parse_args(["--preset=tiny", "--vnorms=2f2", "--learn_p=false"])
    cfg = main.config_from_args(args)
    assert (cfg.vnorms, cfg.learn_p) == ("2f2", False)  # tiny: 3 convs, 2 FC layers
    args = toy_options.parse_args(["--vnorms", "2332", "--hidden", "8-8", "--learn_p", "1"])
    assert (args.vnorms, args.learn_p) == ("2332", 1)
    for bad, match in [
        (dict(vnorms="2f2"), "5 linear layers"),
        (dict(vnorms="2f2f22", learn_p=1), "cannot be learned"),
        (dict(vnorms="2f2f22", model="coupling"), "residual models"),
        (dict(activation="lcube", model="naf"), "residual models only"),
        (dict(activation="maxmin", hidden="8-7"), "even"),
    ]:
        with pytest.raises(ValueError, match=match):
            toy_options.parse_args(bad)


def test_make_activation_knows_the_mixed_norm_activations():
    assert isinstance(rl.make_activation("lcube"), rl.LipschitzCube)
    assert isinstance(rl.make_activation("fullsort"), rl.FullSort)
    assert isinstance(rl.make_activation("maxmin"), rl.MaxMin)
    # LipschitzCube keeps the explicit Jacobian factors of image/dense blocks
    net = rl.lipschitz_dense_net(2, (4,), activation="lcube")
    assert rl.JacobianChain.from_net(net) is not None
    assert rl.JacobianChain.from_net(rl.lipschitz_dense_net(2, (4,), activation="maxmin")) is None
