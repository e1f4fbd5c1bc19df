"""rflow_tf: Residual Flows (Chen et al., NeurIPS 2019) for TensorFlow and TFP.

Modules:
  rflow_tf.layers      Keras 3 layers: LipSwish, LipschitzDense, LipschitzConv2D, ActNormalization
  rflow_tf.norms       pure functions: induced mixed norms ||W||_{p->q}, learnable orders, chaining
  rflow_tf.activations Keras 3 layers: LipschitzCube, FullSort, MaxMin (1-Lipschitz in every p-norm)
  rflow_tf.estimators  pure functions: roulette weights, Hutchinson probes, power/Neumann series
  rflow_tf.bijectors   TFP bijectors: IResBlock, ActNorm, Squeeze, LogitTransform
  rflow_tf.coupling    AffineCoupling (the paper's coupling baseline) and its nets
  rflow_tf.invertible_conv  Invertible1x1Conv (Glow 1x1 convolution, exact log-det)
  rflow_tf.classifier  ClassifierHeads, hybrid_loss, ChannelNormalize (hybrid models)
  rflow_tf.sigmoidal_flows  NAF bijectors: DeepSigmoidalFlow, DeepDenseSigmoidalFlow (MADE)
  rflow_tf.mixlogcdf   Flow++ MixLogCDFCoupling and its gated-conv/attention conditioner
  rflow_tf.dequantization  UniformDequantizer, VariationalDequantizer (negative ELBO, bits/dim)
  rflow_tf.monotone    log-space sigmoid mixtures and the vectorised bisection they share
  rflow_tf.models      ResidualFlow (Keras model), FlowConfig, paper presets
  rflow_tf.data        package: TFDS image pipelines, offline digits, dequantisation, 2-D toys
  rflow_tf.export      SavedModel export; load() returns a TransformedDistribution
  rflow_tf.convert     the authors' PyTorch checkpoints -> ResidualFlow / SavedModel (no PyTorch)
  rflow_tf.torch_format  safe reader of torch.save files (restricted unpickler)
"""
import os as _os

# TensorFlow reads these when it loads, so they apply when rflow_tf is imported
# before TensorFlow (the training scripts and benchmarks do so); set either
# variable yourself to override. oneDNN's CPU kernels are off by default on
# non-Intel CPUs; on the 2-core AMD machine of benchmarks/ they make a
# training step about 1.7x faster.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from rflow_tf import estimators, norms, activations, layers, bijectors  # noqa: E402,F401
from rflow_tf import coupling, invertible_conv, classifier  # noqa: E402,F401
from rflow_tf.bijectors import IResBlock, ActNorm, Squeeze, LogitTransform  # noqa: E402,F401
from rflow_tf.layers import (  # noqa: E402,F401
    LipSwish, LipschitzDense, LipschitzConv2D, converge_lipschitz, update_lipschitz)
from rflow_tf.sigmoidal_flows import (  # noqa: E402,F401
    MADE, DeepSigmoidalFlow, DeepDenseSigmoidalFlow)
from rflow_tf.mixlogcdf import MixLogCDFCoupling, GatedAttentionConditioner  # noqa: E402,F401
from rflow_tf.dequantization import UniformDequantizer, VariationalDequantizer  # noqa: E402,F401
from rflow_tf.models import ResidualFlow, FlowConfig, get_preset  # noqa: E402,F401
from rflow_tf.export import load, save  # noqa: E402,F401

__version__ = "0.1.0"
