"""Tiny trainer runs shared by the tests: the flags of a tiny digits run for the
command line (:func:`tiny_flags`, :func:`tiny_run_args`) and its options and
model for the library (:func:`tiny_options`, :func:`tiny_run`).

Every function takes the settings to change as keywords, named as the
command line's flags and :class:`~rflow_tf.training.TrainingOptions`' fields
are; :data:`DEFAULT` leaves a setting out (its flag is not given, the option
keeps its default)."""

from rflow_tf.training import TrainingOptions, flow_config_for
from train import main as trainer_main

#: A setting's value that leaves it out: the run takes the default.
DEFAULT = object()

#: What every tiny run sets: the tiny preset, a log line every step, 4 sample
#: images, no export and no download.
RUN = dict(preset="tiny", export_dir="", log_every=1, n_sample_images=4, download=False)

#: The tiny run's model: the tiny preset cut to one conv block of 4 hidden
#: channels without an FC end.
MODEL = dict(n_blocks=(1,), fc_end=False, hidden_channels=4)

#: What a tiny run from the library sets besides :data:`RUN`: three steps of 16
#: digits, evaluated on 32 at the end.
LIBRARY = dict(dataset="digits", steps=3, batch_size=16, eval_every=3, eval_examples=32)


def _given(settings):
    return {k: v for k, v in settings.items() if v is not DEFAULT}


def _flag(name, value):
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, tuple):
        value = "-".join(str(v) for v in value)
    return f"--{name}={value}"


def tiny_flags(*extra, **settings):
    """The command line of a tiny run (:data:`RUN` and :data:`MODEL` with
    ``settings`` changed or added), then the ``extra`` flags as given."""
    flags = _given({"preset": RUN["preset"], **MODEL, **RUN, **settings})
    return [_flag(k, v) for k, v in flags.items()] + list(extra)


def tiny_run_args(tmp_path, *extra, **settings):
    """The trainer's parsed arguments of a tiny run writing to ``tmp_path``;
    the ``extra`` flags come last."""
    return trainer_main.parse_args(tiny_flags(f"--out={tmp_path}", *extra, **settings))


def tiny_options(tmp_path, **changes):
    """:class:`TrainingOptions` of a tiny digits run (:data:`RUN` and
    :data:`LIBRARY`) writing to ``tmp_path``, with ``changes``."""
    return TrainingOptions(**_given({**RUN, **LIBRARY, "out": str(tmp_path), **changes}))


def tiny_run(tmp_path, config_changes=None, **changes):
    """``(FlowConfig, TrainingOptions)`` of a tiny digits run in ``tmp_path``:
    ``changes`` go to the options (:func:`tiny_options`), ``config_changes`` to
    the model (:data:`MODEL`)."""
    options = tiny_options(tmp_path, **changes)
    return flow_config_for(options, **{**MODEL, **(config_changes or {})}), options
