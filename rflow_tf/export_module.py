"""What a SavedModel written by :func:`rflow_tf.export.save` holds: its
metadata (:func:`export_metadata`) and its root object (:class:`ExportModule`,
a ``tf.Module``) with the traced functions and serving signatures that
:mod:`rflow_tf.export` describes."""

import datetime
import json
import os
import shutil
import tempfile

import tensorflow as tf
import tensorflow_probability as tfp

from rflow_tf import data as rdata
from rflow_tf import models as rmodels
from rflow_tf.export_format import FORMAT, LN2, METADATA_FILE, check_seed, format_version_of

# ----------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------


def _package_version():
    try:
        import rflow_tf  # pylint: disable=import-outside-toplevel

        return str(getattr(rflow_tf, "__version__", "unknown"))
    except ImportError:  # pragma: no cover
        return "unknown"


def export_metadata(model, *, n_bits, logdet, seed, dequantization, extra_metadata=None):
    """The metadata :func:`rflow_tf.export.save` writes for ``model`` (its
    ``metadata_json`` and ``assets/rflow_tf_export.json``), from the export's
    settings as ``save`` has checked and resolved them.

    Args:
      model: the ``ResidualFlow`` exported (its configuration and name).
      n_bits: bits per pixel of the data (1..8).
      logdet: the log-det evaluation of the export: ``"exact"``,
        ``"unbiased"`` or ``"truncated"``.
      seed: stateless seed (two ints) of the log-det estimator and of the
        dequantisation noise.
      dequantization: ``"uniform"`` or ``"midpoint"``.
      extra_metadata: a JSON-serialisable dict stored under ``"extra"``.

    Returns:
      A JSON-serialisable dict: the format and its version, the package
      versions, the configuration, the preprocessing facts and the signatures.

    Example:
    ```python
    import json
    from rflow_tf import models
    from rflow_tf.export_module import export_metadata

    flow = models.ResidualFlow(models.FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,),
                                                 hidden_channels=4, fc_end=False))
    meta = export_metadata(flow, n_bits=5, logdet="exact", seed=[20191, 9],
                           dequantization="uniform", extra_metadata={"step": 100})
    assert meta["format_version"] == 1 and meta["image_shape"] == [4, 4, 1]
    assert meta["n_bits"] == 5 and "classify" not in meta["signatures"]
    assert json.loads(json.dumps(meta))["extra"] == {"step": 100}
    ```
    """
    cfg = model.flow_config
    meta = {
        "format": FORMAT,
        "format_version": format_version_of(cfg),
        "rflow_tf_version": _package_version(),
        "tensorflow_version": tf.__version__,
        "tensorflow_probability_version": tfp.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "name": model.name,
        "config": cfg.to_dict(),
        "n_bits": n_bits,
        "logit_alpha": float(cfg.logit_alpha),
        "image_shape": list(cfg.input_shape),
        "latent_shape": [cfg.num_dims],
        "dtype": cfg.dtype,
        "logdet": logdet,
        "n_exact_terms_eval": int(cfg.n_exact_terms_eval),
        "logdet_seed": seed,
        "dequantization": dequantization,
        "dequantization_seed": seed,
        "bits_per_dim_offset": rdata.bits_per_dim_offset(n_bits, cfg.num_dims),
        "signatures": [
            "serving_default",
            "log_prob",
            "bits_per_dim",
            "bits_per_dim_int32",
            "sample",
            "forward",
            "inverse",
            "metadata",
        ]
        + (["classify"] if cfg.n_classes else []),
        "n_classes": int(cfg.n_classes),
        "extra": extra_metadata or {},
    }
    if cfg.condition_classes:  # format 2: the signatures take the label
        meta["conditional"] = True
        meta["condition_classes"] = int(cfg.condition_classes)
        meta["condition_embedding"] = int(cfg.condition_embedding)
    return meta


# ----------------------------------------------------------------------------
# The root object
# ----------------------------------------------------------------------------


def _dequantized(x, n_bits, dequantization, seed, dtype):
    """Raw ``n_bits``-bit integer images ``x`` (checked to lie in range) as the
    export's ``bits_per_dim`` dequantises them."""
    xi = tf.cast(x, tf.int32)
    checks = [
        tf.debugging.assert_greater_equal(
            xi,
            0,
            message=f"bits_per_dim: pixels must lie in [0, {2**n_bits - 1}] "
            f"(integer images reduced to {n_bits} bits)",
        ),
        tf.debugging.assert_less_equal(
            xi,
            2**n_bits - 1,
            message=f"bits_per_dim: pixels must lie in [0, {2**n_bits - 1}]"
            + (
                f" (reduce 8-bit images to {n_bits} bits first: x >> {8 - n_bits})"
                if n_bits < 8
                else ""
            ),
        ),
    ]
    with tf.control_dependencies(checks):
        if dequantization == "midpoint":
            return (tf.cast(xi, dtype) + 0.5) / (2.0**n_bits)
        return rdata.dequantize(xi, n_bits, seed=seed, dtype=dtype)


def _latent_draw(n, d, temperature, seed, dtype):
    """n latents [n, d] ~ N(0, temperature^2 I) from a stateless seed."""
    z = tf.random.stateless_normal(tf.stack([n, d]), tfp.random.sanitize_seed(seed), dtype=dtype)
    return z * tf.cast(temperature, dtype)


def _one_label_per_example(label, batch, n_classes):
    """``label`` (one int, or one per example) as [batch] int32 class ids; an
    ``InvalidArgumentError`` naming the problem for any other shape."""
    size = tf.size(label)
    check = tf.debugging.assert_equal(
        (tf.rank(label) <= 1) & ((size == 1) | (size == batch)),
        True,
        message=f"label must be one class id in [0, {n_classes}) or a vector of one per "
        "example (as many as images or samples)",
    )
    with tf.control_dependencies([check]):
        return tf.broadcast_to(tf.reshape(label, [-1]), tf.reshape(batch, [1]))


class ExportModule(tf.Module):
    """The root object of an export's SavedModel: the model, its configuration
    and metadata, and the functions and serving signatures traced from the
    model (their inputs and outputs: :mod:`rflow_tf.export`).

    ``tf.saved_model.save(root, path, signatures=root.export_signatures)``
    writes it (as :func:`rflow_tf.export.save` does, after building the model
    with the export's evaluation settings); ``cleanup()`` then removes the
    temporary copy of the metadata file.

    Args:
      model: the ``ResidualFlow`` to trace (ActNorm initialised).
      meta: its metadata (:func:`export_metadata`).
      seed: stateless seed (two ints) of the log-det estimator.
      dequantization: ``"uniform"`` or ``"midpoint"`` (of ``bits_per_dim``).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf import models
    from rflow_tf.export_format import DEFAULT_SEED
    from rflow_tf.export_module import ExportModule, export_metadata

    flow = models.ResidualFlow(models.FlowConfig(input_shape=(4, 4, 1), n_blocks=(1,),
                                                 hidden_channels=4, fc_end=False, logdet="exact"))
    x = tf.random.stateless_uniform([2, 4, 4, 1], seed=[0, 1])
    flow.initialize(x)
    meta = export_metadata(flow, n_bits=8, logdet="exact", seed=DEFAULT_SEED,
                           dequantization="midpoint")
    root = ExportModule(flow, meta, DEFAULT_SEED, "midpoint")
    lp = root.log_prob(x)                                  # the traced functions
    bpd = root.bits_per_dim(tf.zeros([2, 4, 4, 1], tf.uint8))
    root.cleanup()
    assert lp.shape == bpd.shape == (2,) and "sample" in root.export_signatures
    ```
    """

    def __init__(self, model, meta, seed, dequantization):
        super().__init__(name="rflow_tf_export")
        cfg = model.flow_config
        meta_json = json.dumps(meta, sort_keys=True)
        # The training config (the traced model differs only in its log-det mode).
        cfg_json = rmodels.FlowConfig.from_dict(dict(meta["config"])).to_json()
        # Tracked children: the model (its variables, used by load()), the
        # metadata strings and the metadata file (copied into assets/).
        self.model = model
        self.config_json = tf.Variable(
            cfg_json, trainable=False, dtype=tf.string, name="config_json"
        )
        self.metadata_json = tf.Variable(
            meta_json, trainable=False, dtype=tf.string, name="metadata_json"
        )
        self.format_version = tf.Variable(
            int(meta["format_version"]), trainable=False, dtype=tf.int32, name="format_version"
        )
        self._tmpdir = tempfile.mkdtemp(prefix="rflow_tf_export_")
        meta_file = os.path.join(self._tmpdir, METADATA_FILE)
        with open(meta_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))
        self.metadata_file = tf.saved_model.Asset(meta_file)

        n_bits = int(meta["n_bits"])
        deq_seed = tf.constant(check_seed(meta["dequantization_seed"], "seed"), tf.int32)

        def metadata():
            """Export metadata and preprocessing facts as tensors."""
            facts = {
                "metadata_json": tf.constant(meta_json),
                "config_json": tf.constant(cfg_json),
                "n_bits": tf.constant(n_bits, tf.int32),
                "logit_alpha": tf.constant(float(cfg.logit_alpha), tf.float64),
                "image_shape": tf.constant(list(cfg.input_shape), tf.int32),
                "latent_shape": tf.constant([cfg.num_dims], tf.int32),
                "rflow_tf_version": tf.constant(meta["rflow_tf_version"]),
                "logdet": tf.constant(meta["logdet"]),
                "dequantization": tf.constant(dequantization),
            }
            if cfg.condition_classes:
                facts["condition_classes"] = tf.constant(int(cfg.condition_classes), tf.int32)
            return facts

        self.metadata = tf.function(metadata, input_signature=[])
        make = self._conditional_functions if cfg.condition_classes else self._functions
        sig = make(
            model,
            tf.constant(seed, tf.int32),
            lambda x: _dequantized(x, n_bits, dequantization, deq_seed, model.flow_dtype),
            n_bits,
        )
        sig["metadata"] = self.metadata
        object.__setattr__(self, "export_signatures", sig)  # not a tracked child

    def _functions(self, model, seed_t, dequantized, n_bits):
        """The functions of a flow of p(x) (set on ``self``); returns the
        serving signatures."""
        cfg = model.flow_config
        dtype = model.flow_dtype
        h, w, c = cfg.input_shape
        d = cfg.num_dims
        image_spec = tf.TensorSpec([None, h, w, c], dtype, name="x")
        latent_spec = tf.TensorSpec([None, d], dtype, name="z")

        # Each function below is traced once; the others call it (so the
        # SavedModel holds one graph of the log-det pass and one of the
        # inverse).
        def forward(x):
            """Data -> latent: (z [B, D], log |det dz/dx| [B])."""
            return model.forward_and_log_det(x, training=False, seed=seed_t)

        def inverse(z):
            """Latent -> data: images [B, H, W, C] (not clipped)."""
            return model.bijector.inverse(z)

        def log_prob(x):
            """log p(x) [B] of float images in [0, 1]."""
            z, ld = self.forward(x)
            return model.base_log_prob(z) + ld

        def bits_per_dim(x):
            """Bits/dim [B] of raw n-bit integer images (dequantised here)."""
            lp = self.log_prob(dequantized(x))
            return -(lp - d * n_bits * LN2) / (d * LN2)

        def sample(n, temperature, seed):
            """n images in [0, 1] from z ~ N(0, temperature^2 I), stateless seed."""
            x = self.inverse(_latent_draw(n, d, temperature, seed, dtype))
            return tf.clip_by_value(x, 0.0, 1.0)

        sample_specs = [
            tf.TensorSpec([], tf.int32, name="n"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([2], tf.int32, name="seed"),
        ]
        uint8_spec = tf.TensorSpec([None, h, w, c], tf.uint8, name="x")
        int32_spec = tf.TensorSpec([None, h, w, c], tf.int32, name="x")
        # tf.saved_model.save traces these functions (it retraces anything
        # traced before, in its own context).
        self.forward = tf.function(forward, input_signature=[image_spec])
        self.inverse = tf.function(inverse, input_signature=[latent_spec])
        self.log_prob = tf.function(log_prob, input_signature=[image_spec])
        # bits_per_dim accepts uint8 and int32 (two traces, made now: functions
        # without an input signature are saved with the traces they have).
        # A signature would let TF convert numpy int32 arrays to uint8 with
        # wrap-around, hiding out-of-range pixels.
        self.bits_per_dim = tf.function(bits_per_dim)
        self.bits_per_dim.get_concrete_function(uint8_spec)
        self.bits_per_dim.get_concrete_function(int32_spec)
        self.sample = tf.function(sample, input_signature=sample_specs)

        # Serving signatures: dict outputs with stable names, calling the
        # functions above.
        def sig_forward(x):
            """forward() with dict outputs for the serving signature."""
            z, ld = self.forward(x)
            return {"latent": z, "log_det": ld}

        sig = {}
        sig["serving_default"] = tf.function(
            lambda x: {"log_prob": self.log_prob(x)}, input_signature=[image_spec]
        )
        sig["log_prob"] = sig["serving_default"]
        sig["bits_per_dim"] = tf.function(
            lambda x: {"bits_per_dim": self.bits_per_dim(x)}, input_signature=[uint8_spec]
        )
        sig["bits_per_dim_int32"] = tf.function(
            lambda x: {"bits_per_dim": self.bits_per_dim(x)}, input_signature=[int32_spec]
        )
        sig["sample"] = tf.function(
            lambda n, temperature, seed: {"images": self.sample(n, temperature, seed)},
            input_signature=sample_specs,
        )
        sig["forward"] = tf.function(sig_forward, input_signature=[image_spec])
        sig["inverse"] = tf.function(
            lambda z: {"images": self.inverse(z)}, input_signature=[latent_spec]
        )
        if model.n_classes:

            def classify(x):
                """Logits [B, n_classes] of p(y | x), x float images in [0, 1]."""
                return model.classify(x, training=False)

            def sig_classify(x):
                """classify() with dict outputs for the serving signature."""
                logits = self.classify(x)
                return {
                    "logits": logits,
                    "probabilities": tf.nn.softmax(logits),
                    "classes": tf.argmax(logits, axis=-1, output_type=tf.int32),
                }

            self.classify = tf.function(classify, input_signature=[image_spec])
            sig["classify"] = tf.function(sig_classify, input_signature=[image_spec])
        return sig

    def _conditional_functions(self, model, seed_t, dequantized, n_bits):
        """The functions of a class-conditional flow of p(x | y) (set on
        ``self``): each takes the label after the images or the sample count;
        returns the serving signatures."""
        cfg = model.flow_config
        dtype = model.flow_dtype
        h, w, c = cfg.input_shape
        d = cfg.num_dims
        k = int(cfg.condition_classes)
        image_spec = tf.TensorSpec([None, h, w, c], dtype, name="x")
        latent_spec = tf.TensorSpec([None, d], dtype, name="z")
        # One class for the whole batch (a scalar) or one per example ([B]).
        label_spec = tf.TensorSpec(None, tf.int32, name="label")

        def forward(x, label):
            """Data -> latent given the label: (z [B, D], log |det dz/dx| [B])."""
            label = _one_label_per_example(label, tf.shape(x)[0], k)
            return model.forward_and_log_det(x, training=False, seed=seed_t, label=label)

        def inverse(z, label):
            """Latent -> data given the label: images [B, H, W, C] (not clipped)."""
            label = _one_label_per_example(label, tf.shape(z)[0], k)
            return model.bijector.inverse(z, conditional_input=model.label_context(label))

        def log_prob(x, label):
            """log p(x | y) [B] of float images in [0, 1]."""
            z, ld = self.forward(x, label)
            return model.base_log_prob(z) + ld

        def bits_per_dim(x, label):
            """Bits/dim [B] of p(x | y) for raw n-bit integer images."""
            lp = self.log_prob(dequantized(x), label)
            return -(lp - d * n_bits * LN2) / (d * LN2)

        def sample(n, label, temperature, seed):
            """n images in [0, 1] of class ``label`` (one, or n) from z ~ N(0, T^2 I)."""
            x = self.inverse(_latent_draw(n, d, temperature, seed, dtype), label)
            return tf.clip_by_value(x, 0.0, 1.0)

        sample_specs = [
            tf.TensorSpec([], tf.int32, name="n"),
            label_spec,
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([2], tf.int32, name="seed"),
        ]
        uint8_spec = tf.TensorSpec([None, h, w, c], tf.uint8, name="x")
        int32_spec = tf.TensorSpec([None, h, w, c], tf.int32, name="x")
        self.forward = tf.function(forward, input_signature=[image_spec, label_spec])
        self.inverse = tf.function(inverse, input_signature=[latent_spec, label_spec])
        self.log_prob = tf.function(log_prob, input_signature=[image_spec, label_spec])
        # Two traces, uint8 and int32 pixels (see _functions).
        self.bits_per_dim = tf.function(bits_per_dim)
        self.bits_per_dim.get_concrete_function(uint8_spec, label_spec)
        self.bits_per_dim.get_concrete_function(int32_spec, label_spec)
        self.sample = tf.function(sample, input_signature=sample_specs)

        def sig_forward(x, label):
            """forward() with dict outputs for the serving signature."""
            z, ld = self.forward(x, label)
            return {"latent": z, "log_det": ld}

        sig = {}
        sig["serving_default"] = tf.function(
            lambda x, label: {"log_prob": self.log_prob(x, label)},
            input_signature=[image_spec, label_spec],
        )
        sig["log_prob"] = sig["serving_default"]
        sig["bits_per_dim"] = tf.function(
            lambda x, label: {"bits_per_dim": self.bits_per_dim(x, label)},
            input_signature=[uint8_spec, label_spec],
        )
        sig["bits_per_dim_int32"] = tf.function(
            lambda x, label: {"bits_per_dim": self.bits_per_dim(x, label)},
            input_signature=[int32_spec, label_spec],
        )
        sig["sample"] = tf.function(
            lambda n, label, temperature, seed: {
                "images": self.sample(n, label, temperature, seed)
            },
            input_signature=sample_specs,
        )
        sig["forward"] = tf.function(sig_forward, input_signature=[image_spec, label_spec])
        sig["inverse"] = tf.function(
            lambda z, label: {"images": self.inverse(z, label)},
            input_signature=[latent_spec, label_spec],
        )
        return sig

    def cleanup(self):
        """Removes the temporary directory of the metadata file (once the
        SavedModel, which copies it into ``assets/``, is written)."""
        shutil.rmtree(self._tmpdir, ignore_errors=True)
