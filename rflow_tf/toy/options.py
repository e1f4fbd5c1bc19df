"""The options of a toy run: ToyOptions (their single declaration: defaults, parsers,
help), build_parser (train/toy.py's command line, generated from it) and parse_args
(a list, dict, Namespace or ToyOptions)."""

import argparse
import dataclasses
from typing import Tuple

from rflow_tf import layers as rlayers
from rflow_tf import norms
from rflow_tf.data import TOY_DATASETS
from rflow_tf.settings import add_flags, setting
from rflow_tf.toy.flows import COUPLING_ACTIVATIONS, MODELS


def _hidden_units(text):
    """'128-128-128' -> (128, 128, 128) for argparse."""
    try:
        units = tuple(int(t) for t in str(text).split("-") if t != "")
    except ValueError:
        units = ()
    if not units or min(units) < 1:
        raise argparse.ArgumentTypeError(
            f"--hidden must be positive widths joined by '-', e.g. 128-128-128-128; got {text!r}"
        )
    return units


def _number_above(cast, minimum, description):
    """An argparse type: ``cast(text)`` that must be >= ``minimum``."""

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    return parse


_positive_int = _number_above(int, 1, "a positive integer")


_non_negative_int = _number_above(int, 0, "an integer >= 0")


_positive_float = _number_above(float, float.fromhex("0x1p-1074"), "a positive number")


def _vnorms(text):
    text = str(text).strip().lower()
    if not text:
        raise argparse.ArgumentTypeError("--vnorms must not be empty (e.g. 2 or 2f2f22)")
    for i, ch in enumerate(text):
        try:
            norms.parse_order(ch, name=f"--vnorms[{i}]")
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def check_args(args):
    """Checks the combinations of parsed options that argparse cannot (the
    norm orders against the nets' depth, activations per model); raises
    ValueError naming the option. :func:`parse_args` runs it (and exits with
    its message as an argparse error).

    Args:
      args: parsed options (an ``argparse.Namespace``).

    Returns:
      ``args``.

    Raises:
      ValueError: an inconsistent combination, naming the option.

    Example:
    ```python
    from rflow_tf.toy.options import build_parser, check_args

    parser = build_parser()
    assert check_args(parser.parse_args(["--vnorms", "2f2f2"])).vnorms == "2f2f2"
    try:  # the default nets have 5 linear layers: 3 orders do not chain them
        check_args(parser.parse_args(["--vnorms", "2f2"]))
    except ValueError as error:
        assert str(error).startswith("--vnorms 2f2 for --hidden with 5 linear layers")
    else:
        raise AssertionError("3 orders were accepted for 5 layers")
    ```
    """
    residual = args.model in ("resflow", "iresnet")
    n_layers = len(args.hidden) + 1
    if not residual:
        if set(args.vnorms) != {"2"} or args.learn_p:
            raise ValueError(
                f"--vnorms {args.vnorms} / --learn_p apply to the residual models "
                f"(resflow, iresnet), not --model {args.model}"
            )
        if args.activation not in COUPLING_ACTIVATIONS:
            raise ValueError(
                f"--activation {args.activation} applies to the residual models only; "
                f"--model {args.model} takes one of {sorted(COUPLING_ACTIVATIONS)}"
            )
        return args
    try:
        rlayers.chained_layer_orders(args.vnorms, False, n_layers)
    except ValueError as e:
        raise ValueError(f"--vnorms {args.vnorms} for --hidden with {n_layers} linear layers: {e}")
    if args.learn_p:
        low, high = norms.LEARNABLE_ORDER_RANGE
        if not all(low < norms.parse_order(ch) < high for ch in args.vnorms):
            raise ValueError(
                f"--learn_p: the orders of --vnorms {args.vnorms} are the initial values of "
                f"learnable orders and must lie in ({low}, {high}); '1' and 'f' cannot be learned"
            )
    if args.activation == "maxmin" and any(h % 2 for h in args.hidden):
        raise ValueError(
            f"--activation maxmin pairs features: --hidden widths must be even, got {args.hidden}"
        )
    return args


def _dataset_name(text):
    name = str(text).strip().lower()
    if name not in TOY_DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown toy dataset {text!r}; valid names: {', '.join(TOY_DATASETS)}"
        )
    return name


DATA_AND_MODEL = "data and model"
ESTIMATOR = "log-det estimator (residual models)"
TRAINING = "training"
OUTPUT = "evaluation and output"


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    """Every option of a toy run, each declared once (:func:`rflow_tf.settings.setting`:
    default, help, parser); ``train/toy.py``'s command line is generated from
    them (:func:`build_parser`). The constraints on single values are their
    parsers (a positive integer, say); :func:`check_args` checks combinations.

    Example:
    ```python
    from rflow_tf.toy import ToyOptions, run

    options = ToyOptions(data="moons", model="coupling", blocks=1, hidden=(16,), iters=5,
                         batch_size=64, n_test=500, grid=20, n_plot_samples=200, quiet=True)
    result = run(options)      # result["test_nll"], result["png"]
    assert result["args"]["blocks"] == 1 and result["png"] == "toy_out/moons_coupling.png"
    ```
    """

    data: str = setting(
        "8gaussians",
        group=DATA_AND_MODEL,
        parse=_dataset_name,
        help=f"toy dataset, one of: {', '.join(TOY_DATASETS)}",
    )
    model: str = setting(
        "resflow",
        group=DATA_AND_MODEL,
        choices=MODELS,
        help="resflow: unbiased residual flow; iresnet: truncated (biased) "
        "log-det; coupling: tfb.RealNVP affine coupling layers + tfb.Permute; "
        "naf: DeepSigmoidalFlow (NAF-DSF) layers + tfb.Permute; mixlogcdf: "
        "Flow++ logistic-mixture CDF couplings",
    )
    blocks: int = setting(
        10,
        group=DATA_AND_MODEL,
        parse=_positive_int,
        help="number of residual blocks (or coupling layers)",
    )
    hidden: Tuple[int, ...] = setting(
        (128, 128, 128, 128),
        group=DATA_AND_MODEL,
        parse=_hidden_units,
        help="hidden widths of each block's network, joined by '-'",
    )
    activation: str = setting(
        "lipswish",
        group=DATA_AND_MODEL,
        choices=sorted(set(rlayers.ACTIVATIONS) | {"swish"}),
        help="activation of the residual nets (1-Lipschitz; 'swish' is an alias of "
        "lipswish for residual blocks); coupling nets use the plain version",
    )
    coeff: float = setting(
        0.9,
        group=DATA_AND_MODEL,
        parse=_positive_float,
        help="Lipschitz bound of every linear layer in a residual block (< 1)",
    )
    vnorms: str = setting(
        "2",
        group=DATA_AND_MODEL,
        parse=_vnorms,
        help="norm orders of each residual net's linear maps, one per linear layer + 1 "
        "('f' = inf), first = last, e.g. 222222 or 2f2f22 for --hidden 128-128-128-128 "
        "(a string of equal orders fits any depth): layer i is normalised in "
        "||W||_{p_i->p_{i+1}} <= coeff, so each block contracts in one norm. 2 = spectral",
    )
    learn_p: int = setting(
        0,
        group=DATA_AND_MODEL,
        choices=(0, 1),
        help="1: learn the norm orders (each block its own, tied along its chain, "
        "initialised at --vnorms, kept in [1.001, 5]); printed while training and at the end",
    )
    init: str = setting(
        "reference",
        group=DATA_AND_MODEL,
        choices=rlayers.INITS,
        help="initialisation of the residual nets: 'reference' (weights and biases "
        "U(+-1/sqrt(fan_in)), as the authors' code) or 'glorot' (Glorot weights, "
        "zero biases; the default before the parity work)",
    )
    preactivation: int = setting(
        1,
        group=DATA_AND_MODEL,
        choices=(0, 1),
        help="1: g = W_L act(... W_1 act(x)), activation before every linear layer "
        "(the reference's toy nets); 0: no activation on g's input",
    )
    last_layer_scale: float = setting(
        1e-3,
        group=DATA_AND_MODEL,
        parse=_positive_float,
        help="factor on the initial range of each block's last layer (the "
        "reference's 1/1000: every block starts near the identity)",
    )
    actnorm: bool = setting(
        False,
        group=DATA_AND_MODEL,
        help="add ActNorm (data-initialised affine) before the first and after every block",
    )
    dist: str = setting(
        "poisson",
        group=ESTIMATOR,
        choices=("poisson", "geometric"),
        help="Russian-roulette distribution of the number of extra terms (resflow)",
    )
    rate: float = setting(
        2.0, group=ESTIMATOR, parse=_positive_float, help="Poisson rate (resflow)"
    )
    p: float = setting(0.5, group=ESTIMATOR, help="geometric success probability (resflow)")
    n_exact_terms: int = setting(
        2,
        group=ESTIMATOR,
        parse=_non_negative_int,
        help="terms always evaluated before the roulette tail in training (resflow)",
    )
    n_samples: int = setting(
        1,
        group=ESTIMATOR,
        parse=_positive_int,
        help="roulette draws averaged per block and call (resflow)",
    )
    n_power_series: int = setting(
        5,
        group=ESTIMATOR,
        parse=_positive_int,
        help="number of power-series terms of the truncated estimator (iresnet)",
    )
    neumann_grad: int = setting(
        1,
        group=ESTIMATOR,
        choices=(0, 1),
        help="1: Neumann-series gradient of the log-det (memory-free); "
        "0: backpropagate through the power series",
    )
    grad_in_forward: int = setting(
        0,
        group=ESTIMATOR,
        choices=(0, 1),
        help="1: compute the Neumann log-det gradients during the forward pass "
        "(the reference's mode, paper eq. 9); 0: recompute the block in the "
        "backward pass and share one backward pass with the path gradient "
        "(same gradients, slightly faster, fewer activations kept); ignored "
        "when --neumann_grad 0",
    )
    power_iterations: int = setting(
        5,
        group=ESTIMATOR,
        parse=_non_negative_int,
        help="power-iteration steps per optimiser step for the spectral norms "
        "(0: iterate to convergence every step, slow); they are always "
        "converged before evaluation and sampling",
    )
    iters: int = setting(2000, group=TRAINING, parse=_positive_int, help="optimiser steps")
    jit_compile: int = setting(
        0,
        group=TRAINING,
        choices=(0, 1),
        help="1: compile the whole training step (loss, gradients, Adam and the "
        "Lipschitz upkeep) with XLA",
    )
    batch_size: int = setting(
        500, group=TRAINING, parse=_positive_int, help="fresh samples per step"
    )
    lr: float = setting(1e-3, group=TRAINING, parse=_positive_float, help="Adam learning rate")
    seed: int = setting(
        0,
        group=TRAINING,
        parse=_non_negative_int,
        help="seed of the weights, the data stream and the estimator",
    )
    out: str = setting("toy_out", group=OUTPUT, help="output directory for <data>_<model>.png")
    n_test: int = setting(
        10000, group=OUTPUT, parse=_positive_int, help="held-out points for the test NLL"
    )
    eval_every: int = setting(
        0,
        group=OUTPUT,
        parse=_non_negative_int,
        help="evaluate the test NLL every this many steps (0: only at the end)",
    )
    plot_every: int = setting(
        0,
        group=OUTPUT,
        parse=_non_negative_int,
        help="rewrite the PNG every this many steps (0: only at the end)",
    )
    log_every: int = setting(
        100,
        group=OUTPUT,
        parse=_positive_int,
        help="print a progress line every this many steps",
    )
    grid: int = setting(
        200, group=OUTPUT, parse=_positive_int, help="density grid points per axis on [-4, 4]^2"
    )
    n_plot_samples: int = setting(
        5000,
        group=OUTPUT,
        parse=_positive_int,
        help="model samples drawn (fixed-point inverse) for the third panel",
    )
    quiet: bool = setting(False, group=OUTPUT, help="no progress output")


def build_parser():
    """The ``argparse`` parser of ``train/toy.py``: a flag for every
    :class:`ToyOptions` field, with its help, default and parser.

    Example:
    ```python
    args = build_parser().parse_args(["--data", "rings", "--model", "iresnet"])
    ```
    """
    p = argparse.ArgumentParser(
        prog="python -m train.toy",
        description=(
            "Fit a 2-D toy density with a residual flow (unbiased log-det), an "
            "i-ResNet (truncated log-det) or a RealNVP coupling flow; report the test "
            "NLL in nats (exact 2-D log-det) and write a PNG with the data histogram, "
            "the model density and model samples."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flags(p, [ToyOptions], bools="switch")
    return p


def parse_args(argv=None):
    """Parses a list of CLI strings (or returns a copy of a Namespace, dict or
    :class:`ToyOptions` as a Namespace filled up with the defaults of :func:`build_parser`).

    Example:
    ```python
    args = parse_args(["--data", "moons", "--iters", "100"])
    args.hidden      # (128, 128, 128, 128)
    ```
    """
    parser = build_parser()
    if isinstance(argv, argparse.Namespace):
        args = parser.parse_args([])
        for key, value in vars(argv).items():
            setattr(args, key, value)
        if isinstance(args.hidden, str):
            args.hidden = _hidden_units(args.hidden)
        args.data = str(args.data).strip().lower()
        args.vnorms = _vnorms(args.vnorms)
        return check_args(args)
    if isinstance(argv, ToyOptions):
        argv = dataclasses.asdict(argv)
    if isinstance(argv, dict):
        return parse_args(argparse.Namespace(**argv))
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    try:
        return check_args(args)
    except ValueError as e:
        parser.error(str(e))
