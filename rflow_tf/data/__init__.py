"""Data pipelines for Residual Flows: images, dequantisation and 2-D toys.

The package's modules, each re-exported here:

* `images`: `load_image_dataset` / `dataset_info` / `locate_image_dataset` /
  `classification_augmentation`: `tf.data` pipelines yielding batches of
  **raw integer pixels** `[B, H, W, C]` (`tf.uint8`, values in
  `[0, 2**n_bits - 1]`) for `digits` (offline, bundled with scikit-learn),
  `mnist`, `cifar10`, `svhn_cropped` (TFDS), `celeb_a_hq` (Glow's TFRecords,
  the authors' `.pth` files or TFDS), `celeba_5bit` (the authors' `.pth`)
  and `imagenet32` / `imagenet64` (the authors' `.pth` or `.npz` files),
  optionally with labels and the reference's crops and flips; where the data
  is, found in seconds (`DataSource`).
* `catalog`: what each dataset is (`ImageDatasetInfo`, `dataset_info`,
  `classification_augmentation`), re-exported by `images`;
* `sources`: the choice of source (`DataSource`); `readers`: the readers of
  TFDS, ImageNet `.npz` files and scikit-learn's digits behind them, with the
  network check (`network`); `glow`: Glow's CelebA-HQ TFRecords;
  `reference_pth`: the authors' `data/` folder (memory-mapped `.pth` tensors).
* `errors`: `DatasetNotFoundError` (missing data, with every place looked in)
  and `DatasetFormatError` (damaged data, naming the file).
* `quantization`: `dequantize`, `bits_per_dim_offset`, `to_uint8_images`:
  uniform dequantisation of those integers to `[0, 1)`, the matching
  log-likelihood correction for bits/dim, and the way back to `uint8` images.
* `toy2d`: `toy_2d` / `TOY_DATASETS`: the 2-D toy densities of the paper
  (FFJORD / Residual Flows toy experiments), generated with numpy from a seed.
* `png`: `save_image_grid` writes a batch of images as one PNG grid.

A typical image-training input pipeline:

```python
import math
from rflow_tf import data

info = data.dataset_info("digits")         # offline: bundled with scikit-learn
ds = data.load_image_dataset("digits", "train", batch_size=64, repeat=True)
for x_int in ds.take(3):
    x = data.dequantize(x_int, n_bits=info.n_bits)   # float32 in [0, 1)
    log_p = 0.0   # log p_cont(x) from the flow; 0 for the uniform density on [0, 1)^D
    D = info.num_dims
    bpd = -(log_p - data.bits_per_dim_offset(info.n_bits, D)) / (D * math.log(2))
assert x.shape == (64, 8, 8, 1) and math.isclose(bpd, info.n_bits)
```

No dataset is downloaded by this package unless `download=True` and the
machine has network access; every "data not available" situation raises
`DatasetNotFoundError` with instructions, within seconds (an unreachable
network included). Which files give which split, and which test splits are
the paper's: `docs/datasets.md`.
"""

from rflow_tf.data.errors import DatasetFormatError, DatasetNotFoundError
from rflow_tf.data.images import (
    IMAGE_DATASETS,
    ImageDatasetInfo,
    classification_augmentation,
    dataset_info,
    load_image_dataset,
    locate_image_dataset,
)
from rflow_tf.data.png import save_image_grid
from rflow_tf.data.quantization import bits_per_dim_offset, dequantize, to_uint8_images
from rflow_tf.data.sources import DataSource
from rflow_tf.data.toy2d import TOY_DATASETS, toy_2d

__all__ = [
    'DataSource',
    'DatasetFormatError',
    'DatasetNotFoundError',
    'IMAGE_DATASETS',
    'ImageDatasetInfo',
    'TOY_DATASETS',
    'bits_per_dim_offset',
    'classification_augmentation',
    'dataset_info',
    'dequantize',
    'load_image_dataset',
    'locate_image_dataset',
    'save_image_grid',
    'to_uint8_images',
    'toy_2d',
]
