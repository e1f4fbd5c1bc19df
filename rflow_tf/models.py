"""Multiscale Residual Flow image models (Chen et al. 2019, Section 5 / Appendix E).

Contents
--------
* :class:`ResidualFlow` -- a Keras 3 model holding the whole flow, with
  ``log_prob``, ``bits_per_dim``, ``sample``, ``.bijector`` and
  ``.distribution()``.
* :class:`FlowDistribution` -- the ``tfd.TransformedDistribution`` of a
  flow, which forwards per-call seeds to its residual blocks, and
  :class:`FlowLayer` -- a distribution as a Keras layer, so that a Keras model
  tracks its weights (both in :mod:`rflow_tf.distribution`, re-exported here).

The configuration lives in :mod:`rflow_tf.config` (:class:`FlowConfig`), the
paper's presets in :mod:`rflow_tf.presets` (:func:`get_preset`) and the multiscale structure in
:mod:`rflow_tf.flow` (:class:`FlowBijector`, :class:`FactorOut`) and
:mod:`rflow_tf.stages` (:func:`build_stages`); their names are re-exported here.

The architecture (the stages, data -> latent), its variants and the latent
layout are described in :mod:`rflow_tf.stages`.

Change of variables, with the log-dets of all pieces (including the logit):

    log p(x) = log N(f(x); 0, I) + sum_pieces log |det J_piece|
    bits/dim = -(log p(x) - D n_bits ln 2) / (D ln 2)

where ``x`` is uniformly dequantised (:func:`rflow_tf.data.dequantize`), so
``D n_bits ln 2`` converts the density on [0, 1]^D into a likelihood of the
discrete n-bit pixels.

Example:
```python
import tensorflow as tf
from rflow_tf import data, models

# A one-block flow of the 8x8 digits (models.get_preset("digits_small") for a real run).
cfg = models.FlowConfig(input_shape=(8, 8, 1), n_blocks=(1,), hidden_channels=4, fc_end=False)
flow = models.ResidualFlow(cfg)
x = data.dequantize(next(iter(data.load_image_dataset("digits", "train", 16))), 8)
flow.initialize(x)                      # data-dependent ActNorm init
bpd = flow.bits_per_dim(x)              # [16]
imgs = flow.sample(4, temperature=0.8, seed=[1, 2])   # [4, 8, 8, 1] in [0, 1]
assert bpd.shape == (16,) and imgs.shape == (4, 8, 8, 1)
assert bool(tf.reduce_all((imgs >= 0) & (imgs <= 1)))
```
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import bijectors as rbij
from rflow_tf import classifier as rclf
from rflow_tf import layers as rlayers
from rflow_tf import model_inputs as rinputs

# The configuration's names are re-exported: rflow_tf.models.FlowConfig, ...
from rflow_tf.config import (  # noqa: F401
    BLOCK_TYPES,
    CONFIG_VERSION,
    INIT_LAYERS,
    LEGACY_DEFAULTS,
    FlowConfig,
    legacy_defaults,
)
from rflow_tf.distribution import FlowDistribution, FlowLayer, finite_images_or_nan
from rflow_tf.flow import (  # noqa: F401
    FactorOut,
    FlowBijector,
    as_seed,
    check_pixels,
    check_sample_args,
    iter_stages,
)
from rflow_tf.presets import (  # noqa: F401
    PRESETS,
    Preset,
    get_preset,
    get_preset_training,
    preset_for_dataset,
)
from rflow_tf.stages import build_stages

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "FlowConfig",
    "BLOCK_TYPES",
    "INIT_LAYERS",
    "CONFIG_VERSION",
    "LEGACY_DEFAULTS",
    "legacy_defaults",
    "Preset",
    "PRESETS",
    "get_preset",
    "get_preset_training",
    "preset_for_dataset",
    "FlowBijector",
    "FactorOut",
    "FlowDistribution",
    "ResidualFlow",
    "FlowLayer",
]

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


class ResidualFlow(keras.Model):
    """A multiscale Residual Flow for images (a Keras 3 model).

    Built from a :class:`FlowConfig` (or a dict, JSON text or preset name);
    see :mod:`rflow_tf.stages` for the architecture. For dequantised images
    x in [0, 1]^D (D = H W C), with f the data -> latent map:

        log p(x) = log N(f(x); 0, I) + log |det df/dx|          (per example)
        bits/dim = -(log p(x) - D n_bits ln 2) / (D ln 2)

    log |det df/dx| sums the logit transform, ActNorm and squeeze log-dets
    (exact) and every residual block's estimate (unbiased Russian roulette
    with Hutchinson probes unless ``config.logdet`` says otherwise).
    ``training=True`` uses the training estimator (``n_exact_terms``, Neumann
    gradient); ``training=False`` the evaluation one (``n_exact_terms_eval``).

    Main methods: :meth:`initialize` (data-dependent ActNorm init, once,
    before training), :meth:`log_prob`, :meth:`bits_per_dim`,
    :meth:`forward_and_log_det`, :meth:`sample` (fixed-point inverse),
    :meth:`converge_lipschitz` (the careful norm estimates before
    evaluation, sampling or export; training needs no call), ``.bijector``
    (the whole flow as one TFP bijector, data -> latent) and
    :meth:`distribution`; with ``config.n_classes``: :meth:`classify`
    (logits, no log-det) and :meth:`log_prob_and_logits`.

    All weights are Keras variables of ``model.flow_layers`` (the residual
    nets and ActNorm layers), so ``model.trainable_variables``,
    ``tf.train.Checkpoint(model=model)`` and EMA see every weight.

    Example:
    ```python
    flow = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                   fc_end=False))     # or a preset: ResidualFlow("tiny")
    x = tf.random.uniform([8, 4, 4, 1])
    flow.initialize(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(flow.bits_per_dim(x, training=True, seed=[0, 1]))
    grads = tape.gradient(loss, flow.trainable_variables)
    assert all(g is not None for g in grads)
    ```
    """

    def __init__(self, config=None, name="residual_flow", **kwargs):
        super().__init__(name=name, **kwargs)
        cfg = FlowConfig.coerce(config)
        self.flow_config = cfg
        named_layers, feature_stages, last_shape = [], [], []
        stages = self._build(cfg, named_layers, feature_stages, last_shape)
        # Classifier heads (n_classes > 0) read one feature map per scale.
        object.__setattr__(self, "_feature_stages", [b for b, _ in feature_stages])
        object.__setattr__(self, "_last_shape", tuple(last_shape))
        self.classifier_heads = None
        if cfg.n_classes:
            heads = rclf.ClassifierHeads(
                cfg.n_classes,
                cfg.head_channels,
                pooling=cfg.head_pooling,
                dtype=cfg.dtype,
                name="classifier_heads",
            )
            heads.build(
                [(None,) + tuple(shape) for _, shape in feature_stages]
                + [(None,) + tuple(last_shape)]
            )
            self.classifier_heads = heads
        self.label_embedding = None
        if cfg.condition_classes:
            embedding = keras.layers.Embedding(
                cfg.condition_classes,
                cfg.condition_embedding,
                dtype=cfg.dtype,
                name="label_embedding",
            )
            embedding.build((None,))
            self.label_embedding = embedding
        # The Keras layers holding every weight, each set as an attribute so
        # that Keras (trainable_variables) and tf.train.Checkpoint track them
        # (Keras 3 lists of layers are not checkpoint dependencies) with
        # stable names such as "s0_block0_net" and "s0_actnorm1".
        for attr, layer in named_layers:
            setattr(self, attr, layer)
        object.__setattr__(self, "_flow_layers", [layer for _, layer in named_layers])
        # Bijectors are tf.Modules; keep them out of Keras/AutoTrackable
        # tracking so checkpoints do not store each variable twice.
        object.__setattr__(self, "_stages", stages)
        object.__setattr__(self, "_flow", FlowBijector(stages, cfg.input_shape, name=self.name))
        object.__setattr__(self, "_iresblocks", self._flow.iresblocks)
        object.__setattr__(
            self, "_actnorms", [b for b in iter_stages(stages) if isinstance(b, rbij.ActNorm)]
        )
        self.built = True

    # ----------------------------------------------------------- building
    _build = staticmethod(build_stages)

    # ------------------------------------------------------------ properties
    @property
    def bijector(self):
        """The whole flow as one TFP bijector (a :class:`FlowBijector`), data ->
        latent: ``forward`` maps images [..., H, W, C] to latents [..., D];
        call kwargs ``seed`` and ``training`` select the log-det estimate.

        Example:
        ```python
        import tensorflow as tf
        from rflow_tf.config import FlowConfig
        from rflow_tf.models import ResidualFlow

        flow = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                       fc_end=False, logdet="exact"))
        x = tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1])   # dequantised images
        flow.initialize(x)
        z = flow.bijector.forward(x)           # [2, 16]
        ld = flow.bijector.forward_log_det_jacobian(x, event_ndims=3, seed=[1, 2])
        x2 = flow.bijector.inverse(z)          # fixed-point inverse
        assert z.shape == (2, 16) and ld.shape == (2,)
        tf.debugging.assert_near(x2, x, atol=1e-3)
        ```
        """
        return self._flow

    @property
    def flow_layers(self):
        """The Keras layers holding all weights: each residual net and ActNorm layer."""
        return list(self._flow_layers)

    @property
    def stages(self):
        """The flow's pieces in application (data -> latent) order."""
        return list(self._stages)

    @property
    def input_shape_(self):
        """(H, W, C)."""
        return tuple(self.flow_config.input_shape)

    @property
    def num_dims(self):
        """D = H W C (also the latent size)."""
        return self.flow_config.num_dims

    @property
    def latent_shape(self):
        """(D,): the latent is a flat vector."""
        return (self.num_dims,)

    @property
    def flow_dtype(self):
        """tf.DType of the flow's computations (config.dtype)."""
        return tf.as_dtype(self.flow_config.dtype)

    @property
    def iresblocks(self):
        """All residual blocks, in application order."""
        return list(self._iresblocks)

    @property
    def actnorms(self):
        """All ActNorm bijectors, in application order."""
        return list(self._actnorms)

    @property
    def is_initialized(self):
        """True when every ActNorm layer (also the classifier heads') has had
        its data-dependent init."""
        norms = [a.layer for a in self._actnorms]
        if self.classifier_heads is not None:
            norms += list(self.classifier_heads.norms)
        return all(bool(n.initialized.numpy()) for n in norms)

    @property
    def n_classes(self):
        """Number of classes of the classifier heads (0: a density model only)."""
        return int(self.flow_config.n_classes)

    def lipschitz_layers(self):
        """The spectrally normalised layers (see :func:`rflow_tf.layers.lipschitz_layers`)."""
        return rlayers.lipschitz_layers(self.flow_layers)

    # ------------------------------------------------------------ validation
    def _check_input(self, x, validate, name="x"):
        """Returns (x as a [B, H, W, C] tensor of the flow dtype, was_unbatched)."""
        cfg = self.flow_config
        return rinputs.image_batch(
            x, cfg.input_shape, self.flow_dtype, cfg.n_bits, self.name, validate, name
        )

    # ------------------------------------------------------------ the flow
    def forward_and_log_det(self, x, training=False, seed=None, validate=True, label=None):
        """``(z, log |det df/dx|)`` for images x in [0, 1]: z [B, D], log-det [B].

        Every piece runs once (see :class:`FlowBijector`); ``seed`` is an
        optional stateless seed (shape [2]) split over the residual blocks.
        ``label``: the class of each image ([B] ints, or one int for all) of a
        class-conditional flow (``config.condition_classes``), else None.

        Example: ``z, ld = flow.forward_and_log_det(x, seed=[0, 1])``.
        """
        x, unbatched = self._check_input(x, validate)
        cond = self._condition(label, x)
        z, ld = self._flow.forward_and_log_det(x, seed=seed, training=training, **cond)
        if unbatched:
            z, ld = z[0], ld[0]
        return z, ld

    # ---------------------------------------------------------- conditioning
    def label_context(self, label):
        """The context vectors e(y) [..., condition_embedding] of labels y (ints
        in [0, condition_classes)) of a class-conditional flow: the
        ``conditional_input`` its residual blocks take, e.g. for
        ``self.distribution().log_prob(x, bijector_kwargs={"conditional_input":
        flow.label_context(y)})``.

        Example: ``c = flow.label_context([3, 7])``.
        """
        if self.label_embedding is None:
            raise ValueError(
                f"{self.name}: got a label, but this flow is unconditional (build it with "
                "FlowConfig.condition_classes >= 2)"
            )
        label = rinputs.checked_labels(label, self.flow_config.condition_classes, self.name)
        return self.label_embedding(label)

    def _condition(self, label, x):
        """The flow's call kwargs for ``label`` and images ``x`` [B, ...]: {} for an
        unconditional flow, else the embedded label, one per image."""
        if label is None:
            if self.label_embedding is not None:
                raise ValueError(
                    f"{self.name}: this class-conditional flow needs label=y (ints in "
                    f"[0, {self.flow_config.condition_classes}))"
                )
            return {}
        context = rinputs.one_context_per_image(self.label_context(label), x, self.name)
        return {"conditional_input": context}

    # ------------------------------------------------------ classification
    def _check_classifier(self, method):
        if self.classifier_heads is None:
            raise ValueError(
                f"{self.name}.{method} needs a classifier: build the model with "
                f"FlowConfig.n_classes >= 2 (this one has n_classes=0)"
            )

    def _head_inputs(self, z, features):
        """Per-scale feature maps of the heads: the inter-scale outputs (with
        factor-out: the factored halves) and the final output, i.e. the last
        scale's part of z reshaped to that scale's (H, W, C)."""
        h, w, c = self._last_shape
        final = tf.reshape(z[:, z.shape[-1] - h * w * c :], [-1, h, w, c])
        return list(features) + [final]

    def classify(self, x, training=False, validate=True):
        """Logits [B, n_classes] of p(y | x) for dequantised images x in [0, 1].

        The flow runs forward (data -> latent) once without any log-det
        (a pure classifier never needs one), and the heads
        (:class:`rflow_tf.classifier.ClassifierHeads`) read one feature map
        per scale: the output of each scale but the last (after its squeeze;
        with factor-out, the factored half) and the final output of the flow
        (the last scale's latent, after the FC end, reshaped to (H, W, C)).
        (The reference reads, with factor-out, a stale tensor, the previous
        scale's factored half, for its last head; this reads the final output.)

        Example: ``probs = tf.nn.softmax(flow.classify(x))``.
        """
        self._check_classifier("classify")
        x, unbatched = self._check_input(x, validate)
        z, _, feats = self._flow.forward_with_features(x, self._feature_stages, training=training)
        logits = self.classifier_heads(self._head_inputs(z, feats))
        return logits[0] if unbatched else logits

    def log_prob_and_logits(self, x, training=False, seed=None, validate=True):
        """``(log p(x) [B], logits [B, n_classes])`` in one pass of the flow:
        :meth:`log_prob` and :meth:`classify` of the same forward pass (the
        hybrid model's two outputs).

        Example:
        ```python
        import math
        import tensorflow as tf
        from rflow_tf.config import FlowConfig
        from rflow_tf.models import ResidualFlow

        flow = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                       fc_end=False, n_classes=10))
        x = tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1])   # dequantised images
        from rflow_tf import classifier

        y = tf.constant([3, 7])                 # labels
        flow.initialize(x)
        lp, logits = flow.log_prob_and_logits(x, training=True, seed=[1, 2])
        loss = classifier.hybrid_loss(lp - flow.num_dims * 8 * math.log(2), logits, y, "1/D",
                                      num_dims=flow.num_dims)
        assert lp.shape == (2,) and logits.shape == (2, 10) and loss.shape == (2,)
        ```
        """
        self._check_classifier("log_prob_and_logits")
        x, unbatched = self._check_input(x, validate)
        z, ld, feats = self._flow.forward_with_features(
            x, self._feature_stages, mode="logdet", seed=seed, training=training
        )
        lp = self.base_log_prob(z) + ld
        logits = self.classifier_heads(self._head_inputs(z, feats))
        return (lp[0], logits[0]) if unbatched else (lp, logits)

    def base_log_prob(self, z):
        """log N(z; 0, I) = -|z|^2 / 2 - D/2 log(2 pi), summed over the last axis.

        Example: ``flow.base_log_prob(tf.zeros([2, flow.num_dims]))``.
        """
        d = tf.cast(tf.shape(z)[-1], z.dtype)
        return -0.5 * tf.reduce_sum(tf.square(z), axis=-1) - 0.5 * d * math.log(2 * math.pi)

    def log_prob(self, x, training=False, seed=None, validate=True, label=None):
        """log p(x) for dequantised images x in [0, 1] (shape [B, H, W, C] or
        [H, W, C]), one value per example, including the logit log-det:

            log p(x) = log N(f(x); 0, I) + log |det df/dx|

        ``training`` selects the training estimator (``n_exact_terms``) or the
        evaluation one (``n_exact_terms_eval``); ``seed`` an optional
        stateless seed. ``validate`` checks dtype, shape, finiteness and the
        [0, 1] range (a ValueError eagerly, an assertion in graphs). ``label``:
        the classes of a class-conditional flow, log p(x | y).

        Example: ``lp = flow.log_prob(data.dequantize(x_uint8, 8))``.
        """
        z, ld = self.forward_and_log_det(
            x, training=training, seed=seed, validate=validate, label=label
        )
        return self.base_log_prob(z) + ld

    def bits_per_dim(self, x, n_bits=None, training=False, seed=None, validate=True, label=None):
        """Bits per dimension of the n-bit data behind dequantised x:

            bpd = -(log p(x) - D n_bits ln 2) / (D ln 2)

        (``n_bits`` defaults to ``config.n_bits``). One value per example.

        Example: ``tf.reduce_mean(flow.bits_per_dim(x))``.
        """
        n_bits = self.flow_config.n_bits if n_bits is None else int(n_bits)
        if not 1 <= n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
        lp = self.log_prob(x, training=training, seed=seed, validate=validate, label=label)
        d = float(self.num_dims)
        return -(lp - d * n_bits * _LN2) / (d * _LN2)

    def call(self, inputs, training=False):
        """Keras entry point: the per-example :meth:`log_prob` of ``inputs``."""
        return self.log_prob(inputs, training=bool(training) if training is not None else False)

    def initialize(self, x, label=None):
        """Data-dependent ActNorm initialisation from a batch of dequantised
        images x in [0, 1] (no-op for layers already initialised, e.g. after
        restoring a checkpoint): each ActNorm sets bias = -mean and
        log_scale = -0.5 log max(var, 0.2) of its input, in flow order.

        Call once before training, in eager mode and (under a
        tf.distribute strategy) in cross-replica context.

        A class-conditional flow needs the batch's ``label`` too.

        Example: ``flow.initialize(data.dequantize(first_batch, 8))``.
        """
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            raise RuntimeError(
                "ResidualFlow.initialize must be called in cross-replica context "
                "(outside strategy.run)"
            )
        x, _ = self._check_input(x, True)
        cond = self._condition(label, x)
        if cond:
            self._flow.initialize(x, **cond)
        else:
            self._flow.initialize(x)
        if self.classifier_heads is not None:
            # Forward pass again: the flow's ActNorms were initialised on the way.
            z, _, feats = self._flow.forward_with_features(x, self._feature_stages)
            self.classifier_heads.initialize(self._head_inputs(z, feats))

    def converge_lipschitz(self, tol=None, max_iterations=None, progress=None):
        """Careful power iteration to convergence in every Lipschitz layer (see
        :func:`rflow_tf.layers.converge_lipschitz`, whose ``progress(done,
        total)`` callback it passes on); returns the sigma estimates. Not
        needed for the bound during training (each layer re-estimates when its
        kernel changed); use before evaluation or export.

        Example: ``flow.converge_lipschitz()``.
        """
        if not self.lipschitz_layers():  # coupling / Flow++ blocks: nothing to converge
            return []
        return rlayers.converge_lipschitz(self.flow_layers, tol, max_iterations, progress)

    def update_lipschitz(self):
        """Re-estimates sigma in every Lipschitz layer whose kernel changed since
        its last estimate (see :func:`rflow_tf.layers.update_lipschitz`). Each
        use of a changed kernel does this by itself; a distributed training
        loop calls it after the optimiser step, in cross-replica context, so
        the stored estimates are current for every replica.

        Example: ``optimizer.apply_gradients(...); flow.update_lipschitz()``.
        """
        rlayers.update_lipschitz(self.flow_layers)

    def mark_lipschitz_current(self):
        """Declares the stored power-iteration state current for the present
        weights (after restoring a checkpoint: see
        :func:`rflow_tf.layers.mark_lipschitz_current`).

        Example: ``ckpt.restore(path); flow.mark_lipschitz_current()``.
        """
        rlayers.mark_lipschitz_current(self.flow_layers)

    # ------------------------------------------------------------ Keras fit
    def _images_from(self, data):
        """Dequantised images from what a Keras dataset yields (see
        :func:`rflow_tf.model_inputs.images_from_batch`)."""
        return rinputs.images_from_batch(data, self.flow_config.n_bits, self.flow_dtype, self.name)

    def _labels_from(self, data):
        """The labels of a class-conditional flow's batch; None for an
        unconditional flow (see :func:`rflow_tf.model_inputs.labels_from_batch`)."""
        if self.label_embedding is None:
            return None
        return rinputs.labels_from_batch(data, self.name)

    def train_step(self, data):
        """One Keras ``fit`` step: loss = mean bits/dim of the batch (training
        estimator), no targets needed. The Lipschitz estimates are updated
        after the optimiser step (and by every layer on its next use).

        Example:
        ```python
        import keras
        import numpy as np
        import tensorflow as tf
        from rflow_tf.config import FlowConfig
        from rflow_tf.models import ResidualFlow

        flow = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                       fc_end=False, logdet="exact"))
        images = np.random.default_rng(0).integers(0, 256, [8, 4, 4, 1], dtype=np.uint8)
        images_dataset = tf.data.Dataset.from_tensor_slices(images).batch(4)   # 2 steps
        flow.initialize(tf.cast(images[:4], tf.float32) / 255)   # x_first_batch
        flow.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = flow.fit(images_dataset, epochs=1, shuffle=False, verbose=0)   # uint8 or [0, 1]
        assert np.isfinite(history.history["loss"][-1])          # mean bits/dim
        ```
        """
        x, label = self._images_from(data), self._labels_from(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(self.bits_per_dim(x, training=True, validate=False, label=label))
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        if rlayers.can_store_in_context():
            self.update_lipschitz()
        return {"loss": loss}

    def test_step(self, data):
        """Keras ``evaluate``: mean bits/dim with the evaluation estimator."""
        x, label = self._images_from(data), self._labels_from(data)
        bpd = self.bits_per_dim(x, training=False, validate=False, label=label)
        return {"loss": tf.reduce_mean(bpd)}

    def fit(self, *args, **kwargs):
        """Keras ``fit`` on images alone (see :meth:`train_step`): the loss is
        bits/dim, so no targets and no ``loss=`` in ``compile`` are needed.
        ActNorm must be initialised first (:meth:`initialize`).

        Example: ``flow.compile(optimizer="adam"); flow.fit(ds, epochs=2)``.
        """
        if not self.is_initialized:
            raise RuntimeError(
                f"{self.name}: ActNorm is not initialised; call flow.initialize(x) with a "
                "batch of dequantised images in [0, 1] before fit (data-dependent init)"
            )
        return super().fit(*args, **kwargs)

    def export(self, filepath, *args, **kwargs):
        """Not supported: use :func:`rflow_tf.export.save` (``rflow_tf.save``),
        which writes a SavedModel with sampling, log-density and bits/dim
        signatures that loads back as a TFP distribution."""
        raise NotImplementedError(
            f"{self.name}: keras.Model.export cannot export a residual flow (its fixed-point "
            f"inverse and log-det estimators need fixed seeds and shapes); use "
            f"rflow_tf.save(flow, {filepath!r}) (rflow_tf.export.save), and rflow_tf.load to "
            "read it back"
        )

    def sample(self, n, temperature=1.0, seed=None, label=None):
        """``n`` images in [0, 1] (shape [n, H, W, C]): z ~ N(0, T^2 I) over the
        latent, x = f^-1(z) by the blocks' fixed-point inverses (Banach
        iteration x <- y - g(x)) and the other pieces' exact inverses, then
        clipped to [0, 1] (the logit's alpha margin can overshoot slightly).
        A sample whose inverse is not finite (a diverged fixed-point
        iteration, e.g. from an infinite latent) is returned as NaN, never
        clipped into a plausible image, with a warning (a ``RuntimeWarning``
        eagerly, a line on stderr inside ``tf.function``). ``label``: the
        class (one int, or n ints) of a class-conditional flow, x ~ p(x | y).

        Example: ``imgs = flow.sample(64, temperature=0.7, seed=[3, 4])``.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        check_sample_args(n, seed, self.name)
        if not float(temperature) >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        shape = [int(n), self.num_dims]
        if seed is None:
            z = tf.random.normal(shape, dtype=self.flow_dtype)
        else:
            z = tf.random.stateless_normal(
                shape, as_seed(seed, "ResidualFlow.sample"), dtype=self.flow_dtype
            )
        z = z * tf.cast(temperature, self.flow_dtype)
        cond = self._condition(label, z)
        return finite_images_or_nan(self._flow.inverse(z, **cond), z, "ResidualFlow.sample")

    def distribution(self):
        """The model as a ``tfd.TransformedDistribution`` over images:
        base N(0, I) over the latent (D,), bijector ``tfb.Invert(self.bijector)``
        (latent -> data). ``log_prob`` runs the cheap data -> latent direction,
        ``sample`` the fixed-point inverse (see :class:`FlowDistribution`). Its
        ``trainable_variables`` are the flow's weights. ActNorm is not
        initialised implicitly: call :meth:`initialize` first.

        Example:
        ```python
        import tensorflow as tf
        from rflow_tf.config import FlowConfig
        from rflow_tf.models import ResidualFlow

        flow = ResidualFlow(FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,), hidden_channels=4,
                                       fc_end=False, logdet="exact"))
        x = tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1])   # dequantised images
        flow.initialize(x)
        dist = flow.distribution()
        lp = dist.log_prob(x)        # same as flow.log_prob(x) (random estimate; here exact)
        imgs = dist.sample(4)        # not clipped to [0, 1]
        tf.debugging.assert_near(lp, flow.log_prob(x), atol=1e-3)
        assert imgs.shape == (4, 4, 4, 1)
        ```
        """
        base = tfd.MultivariateNormalDiag(loc=tf.zeros([self.num_dims], self.flow_dtype))
        return FlowDistribution(base, tfb.Invert(self._flow), name=self.name)

    # ---------------------------------------------------------- serialisation
    def get_config(self):
        """{"name": ..., "config": FlowConfig.to_dict()}."""
        return {"name": self.name, "config": self.flow_config.to_dict()}

    @classmethod
    def from_config(cls, config):
        """Inverse of :meth:`get_config` (weights are not included).

        Example: ``ResidualFlow.from_config(flow.get_config())``.
        """
        config = dict(config)
        cfg = FlowConfig.from_dict(config.pop("config"))
        config.pop("trainable", None)
        config.pop("dtype", None)
        return cls(cfg, **config)
