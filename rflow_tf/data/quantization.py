"""Integer pixels <-> continuous values: uniform dequantisation, bits/dim offset, uint8 images."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from rflow_tf.data._checks import check_n_bits, check_positive_int


def dequantize(x_int, n_bits: int = 8, seed=None, dtype=tf.float32) -> tf.Tensor:
    """Uniformly dequantises `n_bits` integer pixels to `[0, 1)`.

    Computes

    ```none
    y = (x + u) / 2**n_bits,    u ~ Uniform[0, 1)  i.i.d. per element,
    ```

    where `x` are integers in `{0, ..., 2**n_bits - 1}` **already reduced** to
    `n_bits` (as produced by `load_image_dataset(..., n_bits=n_bits)`). The
    noise is added after the bit reduction, so each integer owns the interval
    `[x / 2**n, (x + 1) / 2**n)` and `floor(y * 2**n) == x` exactly. (The
    reference implementation adds 8-bit-scale noise before reducing to 5 bits,
    so its intervals do not align.) The result is clamped just below
    `(x + 1) / 2**n` so float rounding can never produce `y == (x+1)/2**n`
    (in particular `y < 1`).

    Args:
      x_int: Integer (or integer-valued float) tensor, any shape, values in
        `[0, 2**n_bits - 1]`.
      n_bits: Bits per pixel, in 1..8.
      seed: `None` (stateful `tf.random.uniform`), an int, or a shape-`[2]`
        int tensor for `tf.random.stateless_uniform` (same seed, same noise).
      dtype: Output dtype, `tf.float32` or `tf.float64`.

    Returns:
      Tensor of `dtype`, same shape as `x_int`, values in `[0, 1)`.

    #### Examples

    ```python
    import tensorflow as tf
    from rflow_tf.data import dequantize, load_image_dataset

    x = tf.constant([[0, 31], [7, 16]], tf.uint8)    # 5-bit pixels, 0..31
    y = dequantize(x, n_bits=5, seed=[1, 2])         # float32 in [0, 1)
    assert bool(tf.reduce_all(tf.cast(tf.floor(y * 32), tf.uint8) == x))   # x + U[0, 1), / 32

    # In a training loop (8-bit digits: values 0..255):
    for x in load_image_dataset("digits", "train", 16).take(2):
        y = dequantize(x, n_bits=8)
        assert y.shape == (16, 8, 8, 1) and float(tf.reduce_max(y)) < 1.0
    ```
    """
    n_bits = check_n_bits(n_bits)
    dtype = tf.as_dtype(dtype)
    if dtype not in (tf.float32, tf.float64):
        raise TypeError(f'dtype must be float32 or float64, got {dtype.name}.')
    x = tf.cast(x_int, dtype)
    shape = tf.shape(x)
    if seed is None:
        u = tf.random.uniform(shape, dtype=dtype)
    else:
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seed = [int(seed), 0]
        u = tf.random.stateless_uniform(shape, seed=seed, dtype=dtype)
    scale = tf.constant(1.0 / 2**n_bits, dtype)
    y = (x + u) * scale
    upper = tf.math.nextafter((x + 1.0) * scale, tf.zeros_like(x))
    return tf.minimum(y, upper)


def bits_per_dim_offset(n_bits: int, num_dims) -> float:
    """Log-likelihood correction `D * n_bits * ln 2` for dequantised data.

    If `y = dequantize(x, n_bits)` lies in `[0, 1)^D` and a flow gives the
    continuous log density `log p(y)` (including any logit-transform log-det),
    the discrete log-likelihood lower bound is `log p(y) - D * log(2**n_bits)`
    (each integer owns a cube of volume `2**(-n_bits * D)`), so

    ```none
    bits/dim = -(log p(y) - D * log(2**n_bits)) / (D * ln 2)
             = -log p(y) / (D ln 2) + n_bits
    ```

    This function returns the offset `D * log(2**n_bits) = D * n_bits * ln 2`.

    Args:
      n_bits: Bits per pixel, in 1..8.
      num_dims: Number of dimensions `D` (e.g. `H * W * C`), a positive int.

    Returns:
      The offset as a Python float.

    #### Examples

    ```python
    import math
    from rflow_tf.data import bits_per_dim_offset

    D = 32 * 32 * 3
    log_p = 0.0                     # the uniform density on [0, 1)^D: log p(y) = 0
    bpd = -(log_p - bits_per_dim_offset(8, D)) / (D * math.log(2.0))
    print(bpd)                      # 8.0: uniform over 256 levels costs 8 bits a pixel
    assert math.isclose(bpd, 8.0)
    ```
    """
    n_bits = check_n_bits(n_bits)
    num_dims = check_positive_int(num_dims, 'num_dims')
    return float(num_dims * n_bits * math.log(2.0))


def to_uint8_images(x_float, n_bits: int = 8) -> tf.Tensor:
    """Maps model samples in `[0, 1]` to displayable `uint8` images.

    Inverse of `dequantize` followed by a rescale to the full 0..255 range:

    ```none
    k   = min(floor(clip(x, 0, 1) * 2**n), 2**n - 1)     # n-bit level
    out = round(k * 255 / (2**n - 1))                      # uint8
    ```

    For `n_bits=8` this is just `k`. NaNs are mapped to 0.

    Args:
      x_float: Float tensor/array of any shape (e.g. `[B, H, W, C]`), nominally
        in `[0, 1]`; values outside are clipped.
      n_bits: Bits per pixel of the model's data, in 1..8.

    Returns:
      `tf.uint8` tensor of the same shape (`.numpy()` for numpy).

    #### Examples

    ```python
    import numpy as np
    from rflow_tf.data import save_image_grid, to_uint8_images

    samples = np.array([0.0, 0.5, 0.99, 1.0, 1.7, np.nan], np.float32)   # e.g. flow samples
    print(to_uint8_images(samples, 5).numpy())    # [  0 132 255 255 255   0]
    assert to_uint8_images(samples, 5).numpy().tolist() == [0, 132, 255, 255, 255, 0]

    grid = np.random.default_rng(0).uniform(size=[4, 8, 8, 1])           # float in [0, 1]
    save_image_grid(to_uint8_images(grid, 5).numpy(), "samples.png", nrow=2)
    ```
    """
    n_bits = check_n_bits(n_bits)
    x = tf.cast(tf.convert_to_tensor(x_float), tf.float32)
    x = tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)
    levels = 2.0**n_bits
    k = tf.minimum(tf.floor(tf.clip_by_value(x, 0.0, 1.0) * levels), levels - 1.0)
    out = tf.round(k * (255.0 / (levels - 1.0)))
    return tf.cast(out, tf.uint8)
