"""Image grids written as PNG files."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from rflow_tf.data._checks import check_positive_int


def save_image_grid(
    images_uint8,
    path: str,
    nrow: Optional[int] = None,
    padding: int = 1,
    pad_value: int = 0,
    scale: int = 1,
) -> str:
    """Writes a batch of images as one PNG grid.

    Images are laid out row by row, `nrow` images per row, separated by
    `padding` pixels of `pad_value`. The PNG has size

    ```none
    height = rows * (H + padding) + padding,   rows = ceil(N / nrow)
    width  = nrow * (W + padding) + padding
    ```

    times `scale`: every pixel of the grid becomes a `scale` x `scale` block
    (nearest-neighbour), so that small images stay sharp at a legible size.
    Grayscale input (`C == 1` or `[N, H, W]`) gives an 8-bit grayscale PNG;
    `C == 3` an RGB PNG. Parent directories are created.

    Args:
      images_uint8: `uint8` array/tensor `[N, H, W, C]` (`C` in {1, 3}) or
        `[N, H, W]` (if the last axis is not 1 or 3), or a single image
        `[H, W, C]`. Convert model floats with
        `to_uint8_images` first.
      path: Output file name (a `.png` is written whatever the extension).
      nrow: Images per row; default `ceil(sqrt(N))`.
      padding: Pixels between images and around the grid (>= 0).
      pad_value: Grey level (0..255) of the padding.
      scale: Integer nearest-neighbour upscaling factor (>= 1).

    Returns:
      `path`.

    Raises:
      TypeError: if the images are not uint8.
      ValueError: bad shapes or arguments.

    #### Examples

    ```python
    import tensorflow as tf
    from rflow_tf.data import load_image_dataset, save_image_grid

    x = next(iter(load_image_dataset("digits", "test", 64)))   # uint8 [64, 8, 8, 1]
    save_image_grid(x, "digits.png", nrow=8)                   # 73 x 73 PNG
    save_image_grid(x, "digits_large.png", nrow=8, scale=4)    # 292 x 292 PNG
    png = tf.io.decode_png(tf.io.read_file("digits_large.png"))
    assert png.shape == (292, 292, 1)    # 8 * (8 + 1) + 1 = 73 pixels, times 4
    ```
    """
    imgs = np.asarray(images_uint8)
    if imgs.dtype != np.uint8:
        raise TypeError(
            f'images must be uint8, got {imgs.dtype}; use to_uint8_images() '
            'to convert floats in [0, 1].'
        )
    if imgs.ndim == 3:
        # A single [H, W, C] image if the last axis looks like channels,
        # otherwise a batch of grayscale [N, H, W] images.
        imgs = imgs[None] if imgs.shape[-1] in (1, 3) else imgs[..., None]
    if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
        raise ValueError(
            'images must have shape [N, H, W, C] with C in {1, 3}, or '
            f'[N, H, W]; got {np.asarray(images_uint8).shape}.'
        )
    n, h, w, c = imgs.shape
    if n == 0:
        raise ValueError('images is empty.')
    if nrow is None:
        nrow = int(math.ceil(math.sqrt(n)))
    nrow = min(check_positive_int(nrow, 'nrow'), n)
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f'padding must be a non-negative int, got {padding!r}.')
    scale = check_positive_int(scale, 'scale')
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f'pad_value must be in 0..255, got {pad_value}.')
    rows = int(math.ceil(n / nrow))
    grid = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(n):
        r, col = divmod(i, nrow)
        y0 = padding + r * (h + padding)
        x0 = padding + col * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = imgs[i]
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    out = grid[..., 0] if c == 1 else grid
    try:
        from PIL import Image  # pylint: disable=g-import-not-at-top

        Image.fromarray(out).save(path, format='PNG')
    except ImportError:  # pragma: no cover - PIL ships with matplotlib.
        import matplotlib.image  # pylint: disable=g-import-not-at-top

        if c == 1:
            matplotlib.image.imsave(path, out, cmap='gray', vmin=0, vmax=255, format='png')
        else:
            matplotlib.image.imsave(path, out, format='png')
    return path
