"""A run's data: where its images are, and its training and test pipelines,
distributed over the strategy's replicas and workers."""

import tensorflow as tf

from rflow_tf import data
from rflow_tf.training.distribute import distribute_dataset


class RunData:
    """The data of the run :class:`rflow_tf.training.RunSpec` ``spec`` with
    the :class:`rflow_tf.training.TrainingOptions` ``options`` (its data
    directory and download setting), distributed by ``strategy``.

    Args:
      spec: the run's :class:`~rflow_tf.training.RunSpec`.
      options: its :class:`~rflow_tf.training.TrainingOptions`.
      strategy: its ``tf.distribute.Strategy``.

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.training import RunData, TrainingOptions, resolve_run

    options = TrainingOptions(dataset="digits", batch_size=8)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    run_data = RunData(resolve_run(None, options), options, strategy)
    x = next(iter(run_data.train_dataset()))  # a batch of uint8 images
    assert x.shape == (8, 8, 8, 1) and x.dtype == tf.uint8
    assert run_data.source.kind == "sklearn" and not run_data.labelled
    ```
    """

    def __init__(self, spec, options, strategy):
        self.spec = spec
        self.settings = spec.settings
        self.options = options
        self.strategy = strategy
        self._source = None

    @property
    def source(self):
        """Where the run's images are read from (:class:`rflow_tf.data.DataSource`),
        located on first use; raises :class:`rflow_tf.data.DatasetNotFoundError`.

        Example: ``print(run_data.source.describe())``.
        """
        if self._source is None:
            self._source = data.locate_image_dataset(
                self.spec.dataset, self.options.data_dir, download=self.options.download
            )
        return self._source

    @source.setter
    def source(self, source):
        self._source = source

    @property
    def labelled(self):
        """Whether the run's batches carry labels (a classification, hybrid or
        conditional run)."""
        return self.settings.task != "density"

    def train_dataset(self, start_step=0, input_context=None, batch_size=None):
        """The training batches from optimiser step ``start_step`` on. The stream is a
        function of the seed alone (seeded shuffles, flips keyed by batch number), so
        batch k is the same whether a run started at 0 or resumed at k. Every call
        builds a fresh pipeline, to be iterated once: a second iterator over the same
        pipeline gets another order (tf.data reshuffles each iteration; a run that took
        its ActNorm batch from the training pipeline resumed onto different batches).
        Conditional runs get (images, labels) with the density runs' pipeline;
        classification and hybrid runs get (images, labels) with the reference's flips,
        random crops of padding ``settings.crop_padding`` (``--crop_padding``, default
        the reference's) and random shifts of up to ``settings.translate`` pixels
        (``--translate``, default 0: none, the meaning of runs from before the option).
        With an ``input_context`` (:meth:`train_batches`) it is the pipeline
        of one worker: its own files, batches of ``batch_size`` (per replica), and the
        first ``start_step`` optimiser steps of all its replicas skipped.

        Example: ``first_batch = next(iter(run_data.train_dataset()))``.
        """
        settings = self.settings
        labelled = self.labelled
        aug = {}
        if settings.task in ("classification", "hybrid"):
            # the reference's flips; crop padding and shifts resolved by resolve_run
            aug = data.classification_augmentation(self.spec.dataset)
            aug["crop_padding"] = settings.crop_padding
            aug["translate"] = settings.translate
        ds = data.load_image_dataset(
            self.spec.dataset,
            "train",
            batch_size=batch_size or settings.batch_size,
            data_dir=self.options.data_dir,
            n_bits=self.spec.flow.n_bits,
            shuffle=True,
            repeat=True,
            seed=int(settings.seed),
            download=self.options.download,
            drop_remainder=True,
            with_labels=labelled,
            input_context=input_context,
            **aug,
        )
        if settings.accumulate > 1:

            def micro_major(*t):  # [k, B, ...] -> [B, k, ...]
                out = tuple(tf.transpose(v, [1, 0] + list(range(2, v.shape.rank))) for v in t)
                return out if labelled else out[0]

            ds = ds.batch(settings.accumulate, drop_remainder=True).map(micro_major)
        if input_context is not None:  # each replica of this worker takes its own elements
            start_step *= input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return ds.skip(int(start_step)) if start_step else ds

    def train_batches(self, start_step=0):
        """The distributed training batches from optimiser step ``start_step`` on.

        Data read from files that can be split between workers (Glow's TFRecords) is
        sharded by file: every worker builds its own pipeline over its own shards
        (``strategy.distribute_datasets_from_function``), so no worker reads another's
        files. Other data is sharded by element of identical global batches
        (:func:`rflow_tf.training.distribute_dataset`).

        Example: ``batches = iter(run_data.train_batches(start_step=200))``.
        """
        if self.source.kind != "glow_tfrecords":
            return self.distribute(self.train_dataset(start_step))
        global_batch = int(self.settings.batch_size)

        def per_worker(ctx):
            return self.train_dataset(
                start_step,
                input_context=ctx,
                batch_size=ctx.get_per_replica_batch_size(global_batch),
            )

        return self.strategy.distribute_datasets_from_function(per_worker)

    def test_dataset(self):
        """The test split (or its first ``--eval_examples``) in batches of the
        global batch size, each padded to full size and paired with the mask of
        its real examples: ``(x, mask)``.

        Example: ``for x, mask in run_data.test_dataset(): ...``.
        """
        bs = self.settings.batch_size
        h, w, c = self.spec.flow.input_shape
        ds = data.load_image_dataset(
            self.spec.dataset,
            "test",
            batch_size=bs,
            data_dir=self.options.data_dir,
            n_bits=self.spec.flow.n_bits,
            shuffle=False,
            flip=False,
            repeat=False,
            download=self.options.download,
            with_labels=self.labelled,
        )
        if self.options.eval_examples and self.options.eval_examples > 0:
            ds = ds.unbatch().take(int(self.options.eval_examples)).batch(bs)

        def pad(x, y=None):
            n = tf.shape(x)[0]
            x = tf.ensure_shape(tf.pad(x, [[0, bs - n], [0, 0], [0, 0], [0, 0]]), [bs, h, w, c])
            if y is not None:
                x = (x, tf.ensure_shape(tf.pad(y, [[0, bs - n]]), [bs]))
            return x, tf.range(bs) < n

        return ds.map(pad)

    def distribute(self, ds):
        """``ds`` (global batches) distributed over the strategy's replicas
        (:func:`rflow_tf.training.distribute_dataset`).

        Example: ``for x, mask in run_data.distribute(run_data.test_dataset()): ...``.
        """
        return distribute_dataset(self.strategy, ds)
