"""rflow_tf: Residual Flows (Chen et al., NeurIPS 2019) for TensorFlow and TFP.

Modules:
  rflow_tf.layers      Keras 3 layers: LipSwish, LipschitzDense, LipschitzConv2D, ActNormalization
  rflow_tf.estimators  pure functions: roulette weights, Hutchinson probes, power/Neumann series
  rflow_tf.bijectors   TFP bijectors: IResBlock, ActNorm, Squeeze, LogitTransform
"""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from rflow_tf import estimators, layers, bijectors  # noqa: E402,F401
from rflow_tf.bijectors import IResBlock, ActNorm, Squeeze, LogitTransform  # noqa: E402,F401
from rflow_tf.layers import (  # noqa: E402,F401
    LipSwish, LipschitzDense, LipschitzConv2D, converge_lipschitz)
from rflow_tf.export import load, save  # noqa

__version__ = "0.1.0"
