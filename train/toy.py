"""Command line of the 2-D toy experiments (``python -m train.toy --help``).

The models, the options and the training loop live in :mod:`rflow_tf.toy`;
this script parses the flags and runs :func:`rflow_tf.toy.run`.

    python -m train.toy --data 8gaussians --model resflow --iters 2000 --out /tmp/toy
"""

import math
import sys

import rflow_tf  # noqa: F401  (first: sets TensorFlow's runtime defaults)
from rflow_tf.toy import parse_args, run


def main(argv=None):
    """CLI entry point: parses ``argv`` (default ``sys.argv[1:]``), runs
    :func:`rflow_tf.toy.run`, returns the exit status (0 on success; argparse
    exits with 2 on bad options).

    Example: ``python -m train.toy --data rings --model coupling --iters 1000``.
    """
    args = parse_args(argv)
    result = run(args)
    return 0 if math.isfinite(result["test_nll"]) else 1


if __name__ == "__main__":
    sys.exit(main())
