"""Convert the authors' PyTorch Residual Flow checkpoints into rflow_tf models.

The reference implementation (github.com/rtqichen/residual-flows) saves with
``train_img.py`` a ``torch.save``d dict: ``state_dict`` (the model),
``optimizer_state_dict``, ``args`` (the ``argparse.Namespace`` of every flag),
``ema`` (its ``ExponentialMovingAverage``: ``shadow_params`` maps parameter
names to the averaged tensors) and ``test_bpd``. :func:`from_reference` reads
such a file without PyTorch (:mod:`rflow_tf.torch_format`, a restricted
unpickler: a checkpoint is untrusted input), infers a :class:`FlowConfig` from
``args`` (:func:`config_from_args`) and copies every tensor into a
:class:`~rflow_tf.models.ResidualFlow`:

* layouts: activations NCHW -> NHWC, conv kernels OIHW -> HWIO, linear
  weights (out, in) -> kernels (in, out);
* the FC end: the reference flattens the last scale in (C, H, W) order, we in
  (H, W, C) order, so the first FC kernel's input rows, the last FC kernel's
  output columns and bias, the FC ActNorm vectors and the power-iteration
  vectors on the flattened side are permuted (:func:`flatten_permutation`);
* ActNorm ``weight`` is our ``log_scale`` (y = (x + bias) exp(weight) in
  both), LipSwish ``beta`` is our ``beta`` (x sigmoid(softplus(beta) x) / 1.1),
  the spectral-norm vectors ``u`` (W v side) and ``v`` are reshaped to our
  feature-map layout; squeezed channels keep the reference's order
  (``squeeze_order="reference"``, channel c * 4 + 2 dy + dx).

With ``weights="ema"`` (default; the reference evaluates and samples with
them) the parameters come from ``ema.shadow_params`` and then, as the
reference's ``validate()`` does, every spectral norm is re-estimated by power
iteration from the stored u, v with its stopping rule
(:func:`reference_power_iteration`). ``weights="live"`` takes ``state_dict``
as saved, power-iteration vectors included.

The latent differs from the reference's by a fixed permutation
(:func:`latent_permutation`): ``z_ours = z_ref[..., latent_permutation(cfg)]``.
Log-densities agree (tested against the reference's outputs in
``tests/test_convert.py``).

Command line (prints the inferred configuration, writes a SavedModel that
:func:`rflow_tf.load` opens)::

    python -m rflow_tf.convert cifar10_resflow_16-16-16.pth --out saved_models/cifar10

Example:
```python
import pathlib
import tensorflow as tf
import rflow_tf
from rflow_tf import convert

# The repository's small reference checkpoint (16x16 MNIST, 2-2-2 blocks of 32 channels).
path = pathlib.Path(rflow_tf.__file__).parents[1] / "tests/data/reference/mnist16.pth"
flow = convert.from_reference(str(path), logdet="exact")   # EMA weights
x = tf.random.stateless_uniform([2, 16, 16, 1], seed=[0, 1])   # dequantised, in [0, 1)
lp = flow.log_prob(x)                  # [2], nats
imgs = flow.sample(1, seed=[1, 2])     # [1, 16, 16, 1]
assert lp.shape == (2,) and imgs.shape == (1, 16, 16, 1)
```
"""

import argparse
import json
import math
import os
import re
import sys

import numpy as np
import tensorflow as tf

from rflow_tf import export as rexport
from rflow_tf import layers as rlayers
from rflow_tf import models as rmodels
from rflow_tf import torch_format
from rflow_tf.reference_config import (
    ARCHITECTURE_FIELDS,
    UnsupportedCheckpointError,
    config_from_args,
    flatten_permutation,
    latent_parts,
    latent_permutation,
    reference_arg,
)

__all__ = [
    "UnsupportedCheckpointError",
    "config_from_args",
    "flatten_permutation",
    "from_reference",
    "latent_permutation",
    "load_reference_weights",
    "main",
    "reference_power_iteration",
]

_MAX_POWER_ITERATIONS = 200  # the reference's cap in compute_weight
# ----------------------------------------------------------------------------
# The reference's power iteration (compute_weight(update=True))
# ----------------------------------------------------------------------------


def _linear_maps(layer, kernel):
    """(W v, W^T u) of a Lipschitz layer on its power-iteration vectors."""
    if isinstance(layer, rlayers.LipschitzConv2D) and layer.kernel_size != (1, 1):
        return (
            lambda v: layer.apply_kernel(v, kernel),
            lambda u: layer.apply_kernel_transpose(u, kernel),
        )
    matrix = tf.reshape(kernel, [-1, kernel.shape[-1]])  # (in, out): W = matrix^T
    return (
        lambda v: tf.linalg.matvec(matrix, v, transpose_a=True),
        lambda u: tf.linalg.matvec(matrix, u),
    )


def reference_power_iteration(
    layer, tol=1e-3, n_iterations=None, max_iterations=_MAX_POWER_ITERATIONS
):
    """Power iteration on ``layer``'s stored u, v exactly as the reference's
    ``compute_weight(update=True)`` (spectral case), in float64; stores u, v
    and sigma = u^T W v in the layer and returns the number of steps.

    One step: u <- W v / ||W v||, then v <- W^T u / ||W^T u||. It stops
    after ``n_iterations`` steps if given, else when both
    ||u - u_old|| / sqrt(dim u) < tol + tol * max(u) and the same for v
    (atol = rtol = ``tol``, the reference's ``--sn-tol``), or after
    ``max_iterations`` (200) steps.

    Example:
    ```python
    import numpy as np
    from rflow_tf.config import FlowConfig
    from rflow_tf.convert import reference_power_iteration
    from rflow_tf.models import ResidualFlow

    flow = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                   fc_end=False))
    flow.log_prob(np.zeros([1, 4, 4, 1], "float32"))     # builds the layers
    for layer in flow.lipschitz_layers():
        steps = reference_power_iteration(layer, tol=1e-3)   # stores u, v and sigma
        assert 1 <= steps <= 200 and float(layer.sigma) > 0
    ```
    """
    kernel = tf.cast(tf.convert_to_tensor(layer.kernel), tf.float64)
    w_of, wt_of = _linear_maps(layer, kernel)
    u = tf.cast(tf.convert_to_tensor(layer.u), tf.float64)
    v = tf.cast(tf.convert_to_tensor(layer.v), tf.float64)

    def normalize(t):
        return t / tf.maximum(tf.norm(tf.reshape(t, [-1])), 1e-12)

    def rms_change(new, old):
        return float(tf.norm(tf.reshape(new - old, [-1]))) / math.sqrt(int(tf.size(new)))

    steps = n_iterations if n_iterations is not None else max_iterations
    done = 0
    for done in range(1, int(steps) + 1):
        u_new = normalize(w_of(v))
        v_new = normalize(wt_of(u_new))
        converged = rms_change(u_new, u) < tol + tol * float(tf.reduce_max(u_new)) and rms_change(
            v_new, v
        ) < tol + tol * float(tf.reduce_max(v_new))
        u, v = u_new, v_new
        if n_iterations is None and converged:
            break
    sigma = tf.reduce_sum(u * w_of(v))
    layer.u.assign(tf.cast(u, layer.u.dtype))
    layer.v.assign(tf.cast(v, layer.v.dtype))
    layer.sigma.assign(tf.cast(sigma, layer.sigma.dtype))
    return done


# ----------------------------------------------------------------------------
# Tensor mapping
# ----------------------------------------------------------------------------

_KEY = re.compile(r"^transforms\.(\d+)\.chain\.(\d+)\.(.+)$")


def _reference_modules(state_dict):
    """The reference's ActNorm and residual-block modules in flow order:
    a list of (kind, prefix, sub) with kind "actnorm" or "block"; for a
    block, ``sub`` lists its net's layers as (kind, prefix), kind "linear"
    (weight, bias, u, v) or "beta" (LipSwish)."""
    groups = {}
    for key in state_dict:
        m = _KEY.match(key)
        if m is None:
            raise UnsupportedCheckpointError(
                f"unexpected state_dict entry {key!r}: not a layer of the reference's "
                "ResidualFlow (transforms.S.chain.I...)"
            )
        groups.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    modules = []
    for (s, i), names in sorted(groups.items()):
        prefix = f"transforms.{s}.chain.{i}."
        if any(n.startswith("nnet.") for n in names):
            net = "nnet.nnet." if any(n.startswith("nnet.nnet.") for n in names) else "nnet."
            layers = {}
            for n in names:
                if n.startswith(net):
                    j, _, leaf = n[len(net) :].partition(".")
                    layers.setdefault(int(j), set()).add(leaf)
            sub = []
            for j, leaves in sorted(layers.items()):
                if {"weight", "u", "v"} <= leaves:
                    sub.append(("linear", f"{prefix}{net}{j}."))
                elif leaves == {"beta"}:
                    sub.append(("beta", f"{prefix}{net}{j}."))
                else:
                    raise UnsupportedCheckpointError(
                        f"unexpected layer {prefix}{net}{j} with tensors {sorted(leaves)}"
                    )
            modules.append(("block", prefix, sub))
        elif {"weight", "bias"} <= names or {"fc_module.weight", "fc_module.bias"} <= names:
            inner = "fc_module." if "fc_module.weight" in names else ""
            modules.append(("actnorm", prefix + inner, None))
        else:
            raise UnsupportedCheckpointError(
                f"unexpected module {prefix[:-1]} with tensors {sorted(names)}"
            )
    return modules


class _Tensors:
    """Reference tensors by name: parameters from the EMA (or live), buffers live."""

    def __init__(self, state_dict, params):
        self.state_dict, self.params = state_dict, params

    def param(self, name):
        source = self.params if self.params is not None else self.state_dict
        if name not in source:
            where = "the EMA shadow parameters" if self.params is not None else "state_dict"
            raise UnsupportedCheckpointError(f"{name} is missing from {where}")
        return np.asarray(source[name], np.float64)

    def buffer(self, name):
        if name not in self.state_dict:
            raise UnsupportedCheckpointError(f"{name} is missing from state_dict")
        return np.asarray(self.state_dict[name], np.float64)


def _assign(variable, value, what):
    value = np.asarray(value)
    if tuple(variable.shape) != value.shape:
        raise UnsupportedCheckpointError(
            f"{what}: the checkpoint's tensor has shape {value.shape} after conversion, the "
            f"model built from args expects {tuple(variable.shape)}; args and state_dict "
            "do not describe the same architecture"
        )
    variable.assign(value.astype(variable.dtype))


def _to_feature_map(vec, like, what):
    """A (C*H*W,) reference vector as our (1, H, W, C) feature map."""
    _, h, w, c = like.shape
    if vec.size != h * w * c:
        raise UnsupportedCheckpointError(
            f"{what}: {vec.size} elements, expected {h}x{w}x{c} (the layer's input size)"
        )
    return vec.reshape(c, h, w).transpose(1, 2, 0)[None]


def _load_linear(layer, t, prefix, perm_in=None, perm_out=None):
    weight = t.param(prefix + "weight")
    bias = t.param(prefix + "bias") if layer.use_bias else None
    u, v = t.buffer(prefix + "u"), t.buffer(prefix + "v")
    what = prefix[:-1]
    if isinstance(layer, rlayers.LipschitzDense):
        if weight.ndim != 2:
            raise UnsupportedCheckpointError(
                f"{what}: expected a linear weight, got shape {weight.shape}"
            )
        if perm_in is not None:
            weight, v = weight[:, perm_in], v[perm_in]
        if perm_out is not None:
            weight, u = weight[perm_out], u[perm_out]
            bias = bias[perm_out] if bias is not None else None
        kernel = weight.T
    else:
        if weight.ndim != 4:
            raise UnsupportedCheckpointError(
                f"{what}: expected a conv weight, got shape {weight.shape}"
            )
        kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if len(layer.u.shape) == 4:
            u = _to_feature_map(u, layer.u, what + ".u")
            v = _to_feature_map(v, layer.v, what + ".v")
    _assign(layer.kernel, kernel, what + ".weight")
    if bias is not None:
        _assign(layer.bias, bias, what + ".bias")
    _assign(layer.u, u, what + ".u")
    _assign(layer.v, v, what + ".v")


def _load_block(net, t, prefix, sub, fc_perm):
    ours_linear = [lay for lay in net.layers if isinstance(lay, rlayers.LipschitzLayer)]
    ours_beta = [lay for lay in net.layers if isinstance(lay, rlayers.LipSwish)]
    ref_linear = [p for kind, p in sub if kind == "linear"]
    ref_beta = [p for kind, p in sub if kind == "beta"]
    if len(ours_linear) != len(ref_linear) or len(ours_beta) != len(ref_beta):
        raise UnsupportedCheckpointError(
            f"{prefix[:-1]}: the checkpoint's block has {len(ref_linear)} linear layers and "
            f"{len(ref_beta)} LipSwish activations, the block built from args "
            f"{len(ours_linear)} and {len(ours_beta)}; args and state_dict do not describe "
            "the same architecture"
        )
    last = len(ours_linear) - 1
    for k, (layer, p) in enumerate(zip(ours_linear, ref_linear)):
        _load_linear(
            layer,
            t,
            p,
            perm_in=fc_perm if k == 0 else None,
            perm_out=fc_perm if k == last else None,
        )
    for layer, p in zip(ours_beta, ref_beta):
        _assign(layer.beta, t.param(p + "beta").reshape(()), p + "beta")


def _load_actnorm(layer, t, prefix, perm):
    weight, bias = t.param(prefix + "weight"), t.param(prefix + "bias")
    if perm is not None:
        weight, bias = weight[perm], bias[perm]
    _assign(layer.log_scale, weight, prefix + "weight")
    _assign(layer.bias, bias, prefix + "bias")
    layer.initialized.assign(True)


def _estimator_settings(state_dict, modules, dist):
    """Roulette parameters of the reference's blocks (``lamb``, sigmoid(``geom_p``))."""
    blocks = [prefix for kind, prefix, _ in modules if kind == "block"]
    if not blocks:
        return {}
    first = blocks[0]
    if dist == "poisson" and first + "lamb" in state_dict:
        return {"rate": float(np.asarray(state_dict[first + "lamb"]))}
    if dist == "geometric" and first + "geom_p" in state_dict:
        return {"p": float(1.0 / (1.0 + np.exp(-np.asarray(state_dict[first + "geom_p"]))))}
    return {}


def _log(verbose, message):
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _read_reference(path):
    """(checkpoint dict, args Namespace, state_dict, modules) of a train_img.py file."""
    ckpt = torch_format.read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "args" not in ckpt:
        raise UnsupportedCheckpointError(
            f"{path}: not a train_img.py checkpoint (expected a dict with 'state_dict' and "
            f"'args', got {type(ckpt).__name__}"
            + (f" with keys {sorted(ckpt)}" if isinstance(ckpt, dict) else "")
            + ")"
        )
    args = ckpt["args"]
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    if not isinstance(args, argparse.Namespace):
        raise UnsupportedCheckpointError(
            f"{path}: 'args' is a {type(args).__name__}, not the argparse.Namespace of train_img.py"
        )
    if not isinstance(ckpt["state_dict"], dict):
        raise UnsupportedCheckpointError(f"{path}: 'state_dict' is not a dict")
    return ckpt, args, ckpt["state_dict"], _reference_modules(ckpt["state_dict"])


def from_reference(path, weights="ema", verbose=False, name="residual_flow", **overrides):
    """A :class:`~rflow_tf.models.ResidualFlow` holding the weights of the
    reference checkpoint at ``path`` (a ``train_img.py`` ``.pth`` file).

    The architecture is inferred from the checkpoint's ``args``
    (:func:`config_from_args`), the roulette's rate (or p) from its blocks,
    and every tensor is copied as the module docstring describes
    (:func:`load_reference_weights`).

    Args:
      path: the checkpoint (zip or legacy ``torch.save`` format; read without
        PyTorch by a restricted unpickler, see :mod:`rflow_tf.torch_format`).
      weights: ``"ema"`` (default): the EMA shadow parameters, then the
        reference's power iteration from the stored u, v (tolerance
        ``args.sn_tol``, at most 200 steps, or ``args.n_lipschitz_iters``
        steps), as its ``validate()`` does before evaluating; ``"live"``: the
        ``state_dict`` as saved, power-iteration vectors included.
      verbose: print progress to stderr.
      name: the Keras model's name.
      **overrides: FlowConfig fields to change after inference, e.g.
        ``logdet="exact"`` or ``dtype="float64"``.

    Returns:
      A ResidualFlow (ActNorm initialised) with ``flow.reference_metadata``:
      a dict with the checkpoint's file name, ``weights`` and ``test_bpd``.

    Raises:
      ValueError: bad ``weights``.
      UnsupportedCheckpointError: an option rflow_tf cannot express (named),
        a missing EMA, or tensors that do not match ``args``.
      rflow_tf.torch_format.UnsafeCheckpointError: the file's pickle asks
        for code outside what rebuilds tensors (nothing is run).

    Example:
    ```python
    import pathlib
    import tensorflow as tf
    import rflow_tf
    from rflow_tf.convert import from_reference

    # The repository's small reference checkpoint (16x16 MNIST, 2-2-2 blocks of 32 channels).
    path = str(pathlib.Path(rflow_tf.__file__).parents[1] / "tests/data/reference/mnist16.pth")
    flow = from_reference(path, logdet="exact")
    x = tf.random.stateless_uniform([2, 16, 16, 1], seed=[0, 1])
    bpd = flow.bits_per_dim(x)          # x dequantised NHWC in [0, 1]
    assert bpd.shape == (2,) and flow.flow_config.n_blocks == (2, 2, 2)
    ```
    """
    _check_weights(weights)
    _log(verbose, f"reading {path}")
    ckpt, args, state_dict, modules = _read_reference(path)
    settings = _estimator_settings(
        state_dict, modules, str(reference_arg(args, "n_dist", "poisson"))
    )
    cfg = config_from_args(args, **{**settings, **overrides})
    _log(verbose, "building the model")
    flow = rmodels.ResidualFlow(cfg, name=name)
    load_reference_weights(flow, path, weights, verbose=verbose, _read=(ckpt, args, modules))
    return flow


def _check_weights(weights):
    if weights not in ("ema", "live"):
        raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}")


def load_reference_weights(flow, path, weights="ema", verbose=False, _read=None):
    """Copies the tensors of the reference checkpoint at ``path`` into
    ``flow``, a ResidualFlow of the architecture :func:`config_from_args`
    infers from it (estimator settings and dtype may differ), and sets
    ``flow.reference_metadata``; see :func:`from_reference` for ``weights``.
    Returns ``flow``.

    Example:
    ```python
    import pathlib
    import tensorflow as tf
    import rflow_tf
    from rflow_tf.convert import from_reference, load_reference_weights

    # The repository's small reference checkpoint (16x16 MNIST, 2-2-2 blocks of 32 channels).
    path = str(pathlib.Path(rflow_tf.__file__).parents[1] / "tests/data/reference/mnist16.pth")
    flow = from_reference(path, weights="live", logdet="exact")
    x = tf.random.stateless_uniform([2, 16, 16, 1], seed=[0, 1])
    live = flow.log_prob(x)
    load_reference_weights(flow, path, "ema")      # same model, EMA weights
    assert not bool(tf.reduce_all(flow.log_prob(x) == live))   # the EMA weights differ
    ```
    """
    _check_weights(weights)
    if _read is None:
        ckpt, args, state_dict, modules = _read_reference(path)
    else:
        (ckpt, args, modules), state_dict = _read, _read[0]["state_dict"]
    cfg = flow.flow_config
    expected = config_from_args(args)
    differ = [f for f in ARCHITECTURE_FIELDS if getattr(cfg, f) != getattr(expected, f)]
    if differ:
        raise UnsupportedCheckpointError(
            f"{path}: the model's {', '.join(differ)} differ from the checkpoint's "
            f"({', '.join(f'{f}={getattr(expected, f)!r}' for f in differ)})"
        )
    params = None
    if weights == "ema":
        params = getattr(ckpt.get("ema"), "shadow_params", None)
        if not isinstance(params, dict) or not params:
            raise UnsupportedCheckpointError(
                f"{path}: the checkpoint holds no EMA weights (ema.shadow_params); "
                "convert with weights='live'"
            )
    tensors = _Tensors(state_dict, params)
    ours = flow.flow_layers
    if len(ours) != len(modules):
        raise UnsupportedCheckpointError(
            f"{path}: the checkpoint has {len(modules)} ActNorm/residual-block modules, the "
            f"model built from args {len(ours)}; args and state_dict do not describe the same "
            f"architecture (inferred config: {cfg.to_json(indent=None)})"
        )
    fc_perm = flatten_permutation(latent_parts(cfg)[-1])
    _log(verbose, f"copying {len(ours)} modules ({weights} weights)")
    for layer, (kind, prefix, sub) in zip(ours, modules):
        is_actnorm = isinstance(layer, rlayers.ActNormalization)
        if is_actnorm != (kind == "actnorm"):
            raise UnsupportedCheckpointError(
                f"{prefix[:-1]} is {'an ActNorm' if kind == 'actnorm' else 'a residual block'} "
                f"in the checkpoint but the model built from args has {layer.name} there"
            )
        if is_actnorm:
            # ActNorm1d of the FC end (inside FCWrapper): the flattened side.
            _load_actnorm(
                layer, tensors, prefix, fc_perm if prefix.endswith("fc_module.") else None
            )
        else:
            fc = any(isinstance(lay, rlayers.LipschitzDense) for lay in layer.layers)
            _load_block(layer, tensors, prefix, sub, fc_perm if fc else None)
    if weights == "ema":
        tol = float(reference_arg(args, "sn_tol", 1e-3))
        n_iter = reference_arg(args, "n_lipschitz_iters", None)
        lipschitz = flow.lipschitz_layers()
        _log(verbose, f"power iteration in {len(lipschitz)} layers (reference rule, tol {tol})")
        for i, layer in enumerate(lipschitz, 1):
            steps = reference_power_iteration(layer, tol=tol, n_iterations=n_iter)
            if i % 16 == 0 or i == len(lipschitz):
                _log(verbose, f"  {i}/{len(lipschitz)} layers (last: {steps} steps)")
    flow.mark_lipschitz_current()  # keep the reference's u, v as they are (exact parity)
    flow.reference_metadata = {
        "source": os.path.basename(os.fspath(path)),
        "weights": weights,
        "test_bpd": _as_float(ckpt.get("test_bpd")),
    }
    return flow


def _as_float(value):
    try:
        return float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def main(argv=None):
    """``python -m rflow_tf.convert CHECKPOINT --out DIR [--weights ema|live]``:
    converts, prints the inferred configuration (JSON) and writes a SavedModel
    that :func:`rflow_tf.load` opens (see :func:`from_reference`).

    Args:
      argv: the command line's arguments (None: ``sys.argv[1:]``).

    Returns:
      The exit status: 0, or 2 after printing an error (missing, unreadable,
      unsafe or unsupported checkpoint; failed export) to stderr.

    Example:
    ```python
    import contextlib
    import io
    from rflow_tf.convert import main

    # main(["model.pth", "--out", "converted"]) converts and exports; a file
    # that is not there is an error, with exit status 2:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["missing.pth", "--out", "converted"])
    assert status == 2 and "no checkpoint file" in err.getvalue()
    ```
    """
    parser = argparse.ArgumentParser(
        prog="python -m rflow_tf.convert",
        description="Convert a checkpoint of the authors' PyTorch Residual Flows "
        "(train_img.py .pth) into an rflow_tf SavedModel, without PyTorch.",
    )
    parser.add_argument("checkpoint", help="the .pth file")
    parser.add_argument("--out", required=True, help="output directory (a SavedModel)")
    parser.add_argument(
        "--weights",
        choices=["ema", "live"],
        default="ema",
        help="EMA weights (default; what the reference evaluates) or live ones",
    )
    parser.add_argument(
        "--logdet",
        choices=["auto", "exact", "unbiased"],
        default="auto",
        help="log-det of the exported functions (default: exact for small "
        "images, else unbiased with 20 exact terms)",
    )
    ns = parser.parse_args(argv)
    try:
        flow = from_reference(ns.checkpoint, weights=ns.weights, verbose=True)
    except (
        FileNotFoundError,
        UnsupportedCheckpointError,
        torch_format.CheckpointFormatError,
        torch_format.UnsafeCheckpointError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("inferred configuration:")
    print(flow.flow_config.to_json())
    _log(True, f"exporting to {ns.out}")
    try:
        # converge=False: keep the power-iteration state of the reference's own
        # validate() procedure, so the export computes the reference's function.
        rexport.save(
            flow,
            ns.out,
            logdet=ns.logdet,
            converge=False,
            extra_metadata={"converted_from": flow.reference_metadata},
        )
    except rexport.ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = flow.reference_metadata
    print(json.dumps({"out": ns.out, **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
