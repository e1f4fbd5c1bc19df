"""rflow_tf: Residual Flows (Chen et al., NeurIPS 2019) for TensorFlow and TFP.

Packages and modules, lowest layer first (no import runs back up; docs/ARCHITECTURE.md):
  rflow_tf.estimators  pure functions: roulette weights, Hutchinson probes, power/Neumann series
  rflow_tf.norms       pure functions: induced mixed norms ||W||_{p->q}, learnable orders, chaining
  rflow_tf.tracing     values reused within one trace while no variable may have been written
  rflow_tf.data        TFDS image pipelines, offline digits, dequantisation, 2-D toys, PNG grids
  rflow_tf.layers      Keras 3 layers: LipSwish and other 1-Lipschitz activations, LipschitzDense,
                       LipschitzConv2D, ActNormalization, Lipschitz nets, JacobianChain
  rflow_tf.bijectors   TFP bijectors, one module each: IResBlock, ActNorm, Squeeze, LogitTransform,
                       AffineCoupling, Invertible1x1Conv, DeepSigmoidalFlow / DeepDenseSigmoidalFlow
                       (NAF), MixLogCDFCoupling (Flow++), Uniform/VariationalDequantizer
  rflow_tf.classifier  ClassifierHeads, hybrid_loss, ChannelNormalize (hybrid models)
  rflow_tf.config      FlowConfig (versioned), paper presets
  rflow_tf.flow        the multiscale flow as one bijector: FlowBijector, FactorOut
  rflow_tf.stages      the stages of a FlowConfig's flow: build_stages
  rflow_tf.models      ResidualFlow (Keras model), FlowDistribution
  rflow_tf.export      SavedModel export; load() returns a TransformedDistribution
  rflow_tf.convert     the authors' PyTorch checkpoints -> ResidualFlow / SavedModel (no PyTorch)
  rflow_tf.torch_format  safe reader of torch.save files (restricted unpickler)
  rflow_tf.training    Trainer(config, options).fit(): training as a library (train/main.py:
                       its command line)
  rflow_tf.toy         2-D toy models and their training loop (train/toy.py is its CLI)
"""

import os as _os

# TensorFlow reads these when it loads, so they apply when rflow_tf is imported
# before TensorFlow (the training scripts and benchmarks do so); set either
# variable yourself to override. oneDNN's CPU kernels are off by default on
# non-Intel CPUs; on the 2-core AMD machine of benchmarks/ they make a
# training step about 1.7x faster.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _exclude_from_autograph():
    """Autograph leaves rflow_tf's functions as they are, as it does TFP's and
    Keras's: they are graph code already (explicit tf.cond / tf.while_loop), and
    converting them anew inside every ``@tf.function`` that calls a flow cost
    tens of seconds of tracing for a 10-block toy flow. (A rule prepended to
    TensorFlow's own list; if TensorFlow ever moves that list, nothing changes
    but the tracing time.)"""
    try:
        from tensorflow.python.autograph.core import config
    except ImportError:  # pragma: no cover
        return
    if not any(getattr(rule, "_prefix", None) == __name__ for rule in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (config.DoNotConvert(__name__),) + tuple(config.CONVERSION_RULES)


_exclude_from_autograph()

from rflow_tf import (  # noqa: E402,F401
    bijectors,
    classifier,  # noqa: E402,F401
    estimators,
    layers,
    norms,
)
from rflow_tf.bijectors import ActNorm, IResBlock, LogitTransform, Squeeze  # noqa: E402,F401
from rflow_tf.bijectors.dequantization import UniformDequantizer, VariationalDequantizer  # noqa: E402,F401
from rflow_tf.bijectors.mixlogcdf import GatedAttentionConditioner, MixLogCDFCoupling  # noqa: E402,F401
from rflow_tf.bijectors.sigmoidal_flows import (  # noqa: E402,F401
    MADE,
    DeepDenseSigmoidalFlow,
    DeepSigmoidalFlow,
)
from rflow_tf.export import load, save  # noqa: E402,F401
from rflow_tf.layers import (  # noqa: E402,F401
    LipschitzConv2D,
    LipschitzDense,
    LipSwish,
    converge_lipschitz,
    update_lipschitz,
)
from rflow_tf.models import FlowConfig, ResidualFlow, get_preset  # noqa: E402,F401

__version__ = "0.1.0"
