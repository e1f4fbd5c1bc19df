"""What :class:`rflow_tf.models.ResidualFlow` accepts, checked before the flow
runs: a batch of dequantised images, class labels and their contexts, and the
batches a Keras dataset yields to ``fit`` and ``evaluate``. Each error names the
model (``owner``) and says how to fix the input."""

import tensorflow as tf

from rflow_tf import data as rdata
from rflow_tf.flow import check_pixels


def image_batch(x, input_shape, dtype, n_bits, owner, validate, name="x"):
    """``(x, was_unbatched)``: images as a [B, H, W, C] tensor of ``dtype``.

    ``x`` holds dequantised floats in [0, 1] of shape [B, H, W, C] or one image
    [H, W, C] (then ``was_unbatched`` is True and a batch axis is added).
    ``validate`` also checks finiteness and the [0, 1] range
    (:func:`rflow_tf.flow.check_pixels`).

    Raises:
      TypeError: integer pixels (dequantise them with ``n_bits``).
      ValueError: another shape than ``input_shape``.

    Example:
    ```python
    x, unbatched = image_batch(tf.zeros([4, 4, 1]), (4, 4, 1), tf.float32, 8, "flow", True)
    assert x.shape == (1, 4, 4, 1) and unbatched
    ```
    """
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise TypeError(
            f"{owner}: {name} must be dequantised floats in [0, 1], got dtype "
            f"{x.dtype.name}; convert integer pixels with "
            f"rflow_tf.data.dequantize(x, n_bits={n_bits})"
        )
    if x.dtype != dtype:
        x = tf.cast(x, dtype)
    shape = tuple(input_shape)
    unbatched = x.shape.rank == 3 and tuple(x.shape) == shape
    if unbatched:
        x = x[None]
    if x.shape.rank != 4 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{owner}: {name} must have shape [batch, {shape[0]}, "
            f"{shape[1]}, {shape[2]}] (or {list(shape)}), got {x.shape}"
        )
    return check_pixels(x, owner, name, values=validate), unbatched


def checked_labels(label, n_classes, owner):
    """``label`` as an integer tensor whose values are checked to be in
    [0, n_classes) (a ValueError eagerly, an assertion in graphs).

    Example:
    ```python
    assert checked_labels([3, 7], 10, "flow").numpy().tolist() == [3, 7]
    ```
    """
    label = tf.convert_to_tensor(label)
    if not label.dtype.is_integer:
        raise TypeError(f"{owner}: label must be integer class ids, got {label.dtype.name}")
    n = n_classes
    message = f"{owner}: label must be in [0, {n})"
    checks = [
        tf.debugging.assert_less(label, tf.cast(n, label.dtype), message=message),
        tf.debugging.assert_non_negative(label, message=message),
    ]
    with tf.control_dependencies([c for c in checks if c is not None]):
        label = tf.identity(label)
    return label


def one_context_per_image(context, x, owner):
    """The context vectors [B, K] of the images ``x`` [B, ...]: one context [K]
    broadcast to every image, or one per image, checked.

    Example:
    ```python
    c = one_context_per_image(tf.ones([3]), tf.zeros([5, 4, 4, 1]), "flow")
    assert c.shape == (5, 3)
    ```
    """
    if context.shape.rank == 1:
        context = tf.broadcast_to(context, [tf.shape(x)[0], context.shape[-1]])
    elif context.shape.rank != 2 or (
        x.shape[0] is not None and context.shape[0] not in (None, x.shape[0])
    ):
        raise ValueError(
            f"{owner}: label must be one int or one per image ({x.shape[0]}), got "
            f"shape {context.shape[:-1]}"
        )
    return context


def images_from_batch(data, n_bits, dtype, owner):
    """Dequantised images from what a Keras dataset yields: x, (x,),
    (x, y[, w]) (y and w ignored) or a dict with key "image". Integer
    pixels are dequantised with uniform noise (``n_bits``).

    Example:
    ```python
    images = tf.zeros([2, 4, 4, 1], tf.uint8)
    x = images_from_batch({"image": images, "label": [0, 1]}, 8, tf.float32, "flow")
    assert x.dtype == tf.float32 and x.shape == (2, 4, 4, 1)
    ```
    """
    if isinstance(data, dict):
        if "image" not in data:
            raise ValueError(f"{owner}: a dict batch needs an 'image' key, got keys {sorted(data)}")
        data = data["image"]
    if isinstance(data, (tuple, list)):
        data = data[0]
    x = tf.convert_to_tensor(data)
    if x.dtype.is_integer:
        x = rdata.dequantize(x, n_bits, dtype=dtype)
    return x


def labels_from_batch(data, owner):
    """The labels of a class-conditional flow's batch, (x, y[, w]) or a dict
    with keys "image" and "label".

    Example:
    ```python
    assert labels_from_batch(("images", [3, 7]), "flow") == [3, 7]
    ```
    """
    if isinstance(data, dict) and "label" in data:
        return data["label"]
    if isinstance(data, (tuple, list)) and len(data) >= 2:
        return data[1]
    raise ValueError(
        f"{owner}: a class-conditional flow trains on (image, label) batches or "
        "dicts with 'image' and 'label'"
    )
