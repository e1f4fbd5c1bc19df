"""2-D toy densities: residual flow, i-ResNet, coupling, NAF and Flow++ models and their loop.

The paper's 2-D experiments (Chen et al. 2019, Fig. 3): a flow f (data ->
latent, the cheap direction of a residual block) is fitted by maximum
likelihood,

    log p(x) = log N(f(x); 0, I) + sum_b log |det df_b/dx_b|,

where the sum runs over the flow's bijectors b (residual blocks, optional
ActNorm, or coupling layers). Four model families:

* ``resflow``  -- invertible residual blocks x + g(x), Lip(g) <= coeff, with
  the *unbiased* Russian-roulette log-det estimator and Neumann gradients.
* ``iresnet``  -- the same blocks with the *truncated* (biased) power series
  of i-ResNets (``--n_power_series`` terms).
* ``coupling`` -- TFP's own ``tfb.RealNVP`` affine coupling layers with
  ``tfb.Permute`` between them (a Glow/RealNVP-style baseline).
* ``naf``      -- neural autoregressive flow: ``DeepSigmoidalFlow`` layers
  (``rflow_tf.bijectors.sigmoidal_flows``) with ``tfb.Permute`` between them.
* ``mixlogcdf`` -- Flow++ logistic-mixture CDF couplings
  (``rflow_tf.bijectors.mixlogcdf.MixLogCDFCoupling``, vector mode, alternating halves).

Evaluation always uses the exact 2-D log-det (log|det(I + J_g)| per block, by QR),
so the test negative log-likelihood (nats) is comparable across models.
Samples are drawn through the fixed-point inverse of the residual blocks
(the analytic inverse for coupling layers).

Options: :class:`ToyOptions` declares each option once (default, parser,
help); :func:`build_parser`, the command line of ``train/toy.py``, is
generated from it. :func:`run` takes the options as a list of strings, a
dict, a Namespace or a ToyOptions.

In-process::

    from rflow_tf.toy import run
    result = run({"data": "moons", "model": "coupling", "iters": 50})
    result["test_nll"], result["sec_per_iter"], result["png"]

Command line (see ``python -m train.toy --help``)::

    python -m train.toy --data 8gaussians --model resflow --iters 2000 --out /tmp/toy
"""

from rflow_tf.toy.flows import (
    MODELS,
    ToyFlow,
    build_flow,
    power_iterate_all,
    standard_normal_log_prob,
)
from rflow_tf.toy.loop import PLOT_LIMIT, ToyTrainer, density_grid, evaluate_nll, run, save_panels
from rflow_tf.toy.options import ToyOptions, build_parser, parse_args

__all__ = [
    "MODELS",
    "PLOT_LIMIT",
    "ToyFlow",
    "build_flow",
    "ToyOptions",
    "build_parser",
    "parse_args",
    "power_iterate_all",
    "standard_normal_log_prob",
    "evaluate_nll",
    "density_grid",
    "save_panels",
    "ToyTrainer",
    "run",
]
