# Copyright 2025 The rflow_tf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Data pipelines for Residual Flows: images, dequantisation and 2-D toys.

This module provides

* `load_image_dataset` / `dataset_info`: `tf.data` pipelines yielding batches
  of **raw integer pixels** `[B, H, W, C]` (`tf.uint8`, values in
  `[0, 2**n_bits - 1]`) for `digits` (offline, bundled with scikit-learn),
  `mnist`, `cifar10`, `svhn_cropped`, `celeb_a_hq` (TFDS) and `imagenet32` /
  `imagenet64` (user-supplied `.npz` files).
* `dequantize`, `bits_per_dim_offset`, `to_uint8_images`: uniform
  dequantisation of those integers to `[0, 1)` and the matching
  log-likelihood correction for bits/dim.
* `toy_2d` / `TOY_DATASETS`: the 2-D toy densities of the paper (FFJORD /
  Residual Flows toy experiments), generated with numpy from a seed.
* `save_image_grid`: writes a batch of images as one PNG grid.

A typical image-training input pipeline:

```python
from rflow_tf import data

info = data.dataset_info('cifar10')
ds = data.load_image_dataset('cifar10', 'train', batch_size=64, repeat=True)
for x_int in ds:
  x = data.dequantize(x_int, n_bits=info.n_bits)   # float32 in [0, 1)
  # log p_cont(x) from the flow, then
  # bpd = -(log_p - bits_per_dim_offset(n_bits, D)) / (D * ln 2)
```

No dataset is downloaded by this module unless `download=True` and the
machine has network access; every "data not available" situation raises
`DatasetNotFoundError` with instructions.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import warnings
import zipfile
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

__all__ = [
    'DatasetNotFoundError',
    'IMAGE_DATASETS',
    'ImageDatasetInfo',
    'TOY_DATASETS',
    'bits_per_dim_offset',
    'classification_augmentation',
    'dataset_info',
    'dequantize',
    'load_image_dataset',
    'save_image_grid',
    'to_uint8_images',
    'toy_2d',
]


class DatasetNotFoundError(Exception):
  """Raised when the data for a requested dataset is not available.

  The message states what is missing, where it was looked for (the data
  directory) and how to obtain it. It is raised instead of the (long) TFDS /
  network / file-system error, whose one-line summary is included in the
  message.

  #### Examples

  ```python
  try:
    ds = load_image_dataset('mnist', 'train', 64, download=False)
  except DatasetNotFoundError as e:
    print(e)   # says where it looked and what to do
  ```
  """


@dataclasses.dataclass(frozen=True)
class ImageDatasetInfo:
  """Static description of an image dataset supported by `load_image_dataset`.

  Attributes:
    name: Canonical name accepted by `load_image_dataset` (e.g. `'cifar10'`).
    image_shape: `(H, W, C)` of one image.
    n_train: Number of training images (nominal for bring-your-own data).
    n_test: Number of test images.
    n_bits: Default number of bits per pixel used for modelling (8, or 5 for
      CelebA-HQ as in the paper).
    horizontal_flip: Whether the training split is randomly flipped
      horizontally by default, as in the reference's `train_img.py`: CIFAR-10
      and CelebA-HQ yes; digits, house numbers and ImageNet 32/64 no. Only
      applied to the training split by default.
    train_split: Split name/spec used for `split='train'`.
    test_split: Split name/spec used for `split='test'`.
    source: `'sklearn'` (bundled, offline), `'tfds'` or `'npz'` (user files).
    tfds_name: TFDS builder name (with config), or `None` if not from TFDS.
    n_classes: Number of class labels `load_image_dataset(...,
      with_labels=True)` yields (labels are `0..n_classes - 1`), or `None`
      for datasets without labels here (`celeb_a_hq`, `imagenet32/64`).

  #### Examples

  ```python
  info = dataset_info('celeb_a_hq')
  info.image_shape   # (256, 256, 3)
  info.n_bits        # 5
  info.num_dims      # 196608
  ```
  """

  name: str
  image_shape: Tuple[int, int, int]
  n_train: int
  n_test: int
  n_bits: int
  horizontal_flip: bool
  train_split: str
  test_split: str
  source: str
  tfds_name: Optional[str] = None
  n_classes: Optional[int] = None

  @property
  def num_dims(self) -> int:
    """Number of dimensions `D = H * W * C` of one image."""
    h, w, c = self.image_shape
    return h * w * c


_DIGITS_N_TEST = 297

_INFOS = {
    'digits': ImageDatasetInfo(
        name='digits', image_shape=(8, 8, 1), n_train=1797 - _DIGITS_N_TEST,
        n_test=_DIGITS_N_TEST, n_bits=8, horizontal_flip=False,
        train_split='train', test_split='test', source='sklearn',
        n_classes=10),
    'mnist': ImageDatasetInfo(
        name='mnist', image_shape=(28, 28, 1), n_train=60000, n_test=10000,
        n_bits=8, horizontal_flip=False, train_split='train',
        test_split='test', source='tfds', tfds_name='mnist',
        n_classes=10),
    'cifar10': ImageDatasetInfo(
        name='cifar10', image_shape=(32, 32, 3), n_train=50000, n_test=10000,
        n_bits=8, horizontal_flip=True, train_split='train',
        test_split='test', source='tfds', tfds_name='cifar10',
        n_classes=10),
    'svhn_cropped': ImageDatasetInfo(
        name='svhn_cropped', image_shape=(32, 32, 3), n_train=73257,
        n_test=26032, n_bits=8, horizontal_flip=False, train_split='train',
        test_split='test', source='tfds', tfds_name='svhn_cropped',
        n_classes=10),
    # TFDS only has a 30000-image 'train' split; the paper (following Glow)
    # uses 27000 for training and 3000 for testing.
    'celeb_a_hq': ImageDatasetInfo(
        name='celeb_a_hq', image_shape=(256, 256, 3), n_train=27000,
        n_test=3000, n_bits=5, horizontal_flip=True,
        train_split='train[:90%]', test_split='train[90%:]', source='tfds',
        tfds_name='celeb_a_hq/256'),
    'imagenet32': ImageDatasetInfo(
        name='imagenet32', image_shape=(32, 32, 3), n_train=1281167,
        n_test=50000, n_bits=8, horizontal_flip=False, train_split='train',
        test_split='val', source='npz'),
    'imagenet64': ImageDatasetInfo(
        name='imagenet64', image_shape=(64, 64, 3), n_train=1281167,
        n_test=50000, n_bits=8, horizontal_flip=False, train_split='train',
        test_split='val', source='npz'),
}

_ALIASES = {
    'celeb_a_hq/256': 'celeb_a_hq',
    'celeba_hq': 'celeb_a_hq',
    'svhn': 'svhn_cropped',
    'cifar-10': 'cifar10',
}

#: Names accepted by `load_image_dataset` and `dataset_info`.
IMAGE_DATASETS = tuple(_INFOS)

_TEST_SPLIT_ALIASES = ('test', 'val', 'valid', 'validation')

# Approximate memory budget of the default shuffle buffer.
_SHUFFLE_BUFFER_BYTES = 128 * 2**20


# ----------------------------------------------------------------------------
# Argument checking helpers.
# ----------------------------------------------------------------------------


def _canonical_name(name) -> str:
  if not isinstance(name, str):
    raise TypeError(f'Dataset name must be a str, got {name!r}.')
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  if key not in _INFOS:
    raise ValueError(
        f'Unknown image dataset {name!r}. Valid names: '
        f'{", ".join(IMAGE_DATASETS)}.')
  return key


def _check_n_bits(n_bits) -> int:
  if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)):
    raise TypeError(f'n_bits must be an int in 1..8, got {n_bits!r}.')
  if not 1 <= int(n_bits) <= 8:
    raise ValueError(f'n_bits must be in 1..8, got {n_bits}.')
  return int(n_bits)


def _check_positive_int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{what} must be a positive int, got {value!r}.')
  if int(value) <= 0:
    raise ValueError(f'{what} must be a positive int, got {value}.')
  return int(value)


def _check_seed(seed) -> Optional[int]:
  if seed is None:
    return None
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f'seed must be an int or None, got {seed!r}.')
  return int(seed)


def _one_line(err: BaseException, limit: int = 300) -> str:
  text = str(err).strip().splitlines()
  text = text[0] if text else ''
  if len(text) > limit:
    text = text[:limit] + '...'
  return f'{type(err).__name__}: {text}'


def _tfds():
  """Imports tensorflow_datasets lazily (it is slow to import)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _default_data_dir() -> str:
  env = os.environ.get('TFDS_DATA_DIR')
  if env:
    return os.path.expanduser(env)
  return os.path.expanduser(os.path.join('~', 'tensorflow_datasets'))


# ----------------------------------------------------------------------------
# Public dataset API.
# ----------------------------------------------------------------------------


def dataset_info(name: str) -> ImageDatasetInfo:
  """Returns the static `ImageDatasetInfo` of an image dataset.

  Args:
    name: One of `IMAGE_DATASETS` (`'digits'`, `'mnist'`, `'cifar10'`,
      `'svhn_cropped'`, `'celeb_a_hq'`, `'imagenet32'`, `'imagenet64'`);
      `'celeb_a_hq/256'` is accepted as an alias.

  Returns:
    The frozen `ImageDatasetInfo` (shape, sizes, default bits, flips, splits).

  Raises:
    ValueError: if `name` is unknown (the message lists valid names).

  #### Examples

  ```python
  info = dataset_info('mnist')
  info.image_shape, info.n_train, info.n_test   # (28, 28, 1), 60000, 10000
  ```
  """
  return _INFOS[_canonical_name(name)]


# Training-split augmentation of the reference's classification / hybrid runs
# (train_img.py): random crops of the image padded by 4 pixels (reflection
# padding, its default) for SVHN and CIFAR-10, plus horizontal flips for
# CIFAR-10; none for MNIST (and the digits).
_CLASSIFICATION_AUGMENTATION = {
    'digits': dict(flip=False, crop_padding=0),
    'mnist': dict(flip=False, crop_padding=0),
    'svhn_cropped': dict(flip=False, crop_padding=4),
    'cifar10': dict(flip=True, crop_padding=4),
}


def classification_augmentation(name: str) -> dict:
  """Training-split augmentation of the reference's classification runs.

  Returns the keyword arguments `flip` and `crop_padding` of
  `load_image_dataset` that reproduce the augmentation of the reference's
  classification and hybrid runs (`--task classification|hybrid`):

  | dataset | random crop (4-pixel reflection padding) | horizontal flip |
  |---|---|---|
  | `svhn_cropped` | yes | no |
  | `cifar10` | yes | yes |
  | `mnist`, `digits` | no | no |

  Use it for the training split only; test images are never augmented.

  Args:
    name: A dataset with labels: `'digits'`, `'mnist'`, `'svhn_cropped'` or
      `'cifar10'` (aliases accepted).

  Returns:
    A new dict `{'flip': bool, 'crop_padding': int}`.

  Raises:
    ValueError: unknown dataset, or a dataset without labels.

  #### Examples

  ```python
  aug = classification_augmentation('cifar10')  # {'flip': True, 'crop_padding': 4}
  ds = load_image_dataset('cifar10', 'train', 64, with_labels=True, **aug)
  ```
  """
  key = _canonical_name(name)
  if key not in _CLASSIFICATION_AUGMENTATION:
    raise ValueError(
        f'Dataset {name!r} has no labels here; classification datasets: '
        f'{", ".join(_CLASSIFICATION_AUGMENTATION)}.')
  return dict(_CLASSIFICATION_AUGMENTATION[key])


def load_image_dataset(
    name: str,
    split: str,
    batch_size: int,
    *,
    data_dir: Optional[str] = None,
    n_bits: Optional[int] = 8,
    shuffle: bool = True,
    flip: Optional[bool] = None,
    repeat: bool = False,
    seed: Optional[int] = None,
    download: bool = True,
    drop_remainder: bool = False,
    shuffle_buffer: Optional[int] = None,
    manual_dir: Optional[str] = None,
    with_labels: bool = False,
    crop_padding: int = 0,
) -> tf.data.Dataset:
  """Builds a batched `tf.data` pipeline of raw integer images.

  Each element is a `tf.uint8` tensor of shape `[B, H, W, C]` (with
  `with_labels=True`, a pair `(pixels, labels)` with `tf.int64` labels of
  shape `[B]`) holding raw pixel values reduced to `n_bits` bits:

  ```none
  x = floor(x_8bit / 2**(8 - n_bits))   in {0, ..., 2**n_bits - 1}
  ```

  No dequantisation or scaling is applied; use `dequantize(x, n_bits)` to get
  continuous inputs in `[0, 1)` for the flow.

  The pipeline is `read -> shuffle -> repeat -> batch -> (bit reduction,
  random crop, random horizontal flip) -> prefetch`, with all per-example
  work done by TF ops (`num_parallel_calls=AUTOTUNE`), none in Python.
  Labels travel with their images through every step.

  Datasets and where their data comes from:

  * `digits`: scikit-learn's bundled `load_digits()` (1797 real 8x8
    handwritten digits, values 0..16), rescaled to 0..255 as
    `round(v * 255 / 16)`, shape `[8, 8, 1]`. Works offline. Deterministic
    split: the first 1500 images are `train`, the last 297 are `test`.
    `data_dir` and `download` are ignored.
  * `mnist` (28x28x1), `cifar10` (32x32x3), `svhn_cropped` (32x32x3): TFDS,
    downloaded into `data_dir` if `download=True` and the network is
    reachable.
  * `celeb_a_hq`: TFDS `celeb_a_hq/256` (256x256x3), default 5 bits. It needs
    a *manual download*: `data256x256.tar` (built with the
    progressive_growing_of_gans `dataset_tool.py create_celebahq`) must be in
    `manual_dir` (default `<data_dir>/downloads/manual/`). TFDS has a single
    30000-image split; `train` is its first 90% (27000), `test` the last 10%
    (3000), as in the paper.
  * `imagenet32` / `imagenet64`: bring-your-own `.npz` files (the upstream
    TFDS `downsampled_imagenet` URL is dead). Expected layout:

    ```none
    <data_dir>/imagenet32/train*.npz   e.g. train_data_batch_1.npz ... _10.npz
    <data_dir>/imagenet32/val*.npz     e.g. val_data.npz (or valid_*.npz)
    <data_dir>/imagenet64/train*.npz
    <data_dir>/imagenet64/val*.npz
    ```

    Each file holds an array under key `'data'`, `uint8`, either
    `[N, H, W, 3]` (channels last), `[N, 3, H, W]`, or the official
    "Downsampled ImageNet (npz format)" flattened layout `[N, 3*H*W]` (the
    R plane, then G, then B, each row-major). Other keys (`labels`, `mean`)
    are ignored. `data_dir=None` means the TFDS default data directory
    (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

  Args:
    name: Dataset name, one of `IMAGE_DATASETS`.
    split: `'train'` or `'test'` (`'val'`, `'valid'`, `'validation'` are
      aliases of `'test'`). For TFDS datasets any other TFDS split spec
      (e.g. `'train[:10%]'`) is passed through unchanged.
    batch_size: Positive number of images per batch.
    data_dir: Root data directory (TFDS `data_dir`; parent of the
      `imagenet32/` / `imagenet64/` folders). `None`: TFDS default.
    n_bits: Bits per pixel to keep, in 1..8; `None` means the dataset
      default `dataset_info(name).n_bits` (5 for `celeb_a_hq`, else 8).
    shuffle: Shuffle files and examples (buffered shuffle, reshuffled each
      epoch).
    flip: Random horizontal flips with probability 1/2 per image. `None`
      means the dataset default: on for the training split of `cifar10`,
      `celeb_a_hq`, `imagenet32`, `imagenet64`; off otherwise (never for
      `mnist`, `digits`, `svhn_cropped`, where it would be wrong).
    repeat: Repeat indefinitely (batches then cross epoch boundaries).
    seed: Optional int making shuffling and flips deterministic.
    download: For TFDS datasets, download and prepare the data if it is not
      in `data_dir` yet. Ignored for `digits` and ImageNet.
    drop_remainder: Drop the last incomplete batch (gives a static batch
      dimension).
    shuffle_buffer: Size of the example shuffle buffer. Default: the whole
      split for `digits`, otherwise
      `clip(128 MiB / image_bytes, 1024, 10000)`.
    manual_dir: Directory holding the manually downloaded CelebA-HQ tar file
      (default `<data_dir>/downloads/manual`).
    with_labels: Yield `(pixels, labels)` pairs; `labels` are `tf.int64`
      class indices `[B]` in `0..info.n_classes - 1` (the digit for `digits`,
      `mnist`, `svhn_cropped`; the class for `cifar10`). Only for datasets
      with `info.n_classes` set.
    crop_padding: `p > 0` applies a random crop to every image: the image is
      padded by `p` pixels on each side by reflection (the reference's
      default `padding_mode='reflect'`) and an `H x W` window is cut at a
      uniformly random offset in `{0, ..., 2p}^2`, independently per image.
      `0` (default): no crop. The reference's classification runs use `4`
      on the training split (`classification_augmentation(name)`).

  Returns:
    A `tf.data.Dataset` of `tf.uint8` tensors `[B, H, W, C]`, or of pairs
    `([B, H, W, C] uint8, [B] int64)` with `with_labels=True`.

  Raises:
    ValueError: unknown dataset name (message lists valid names), bad
      `split`, `n_bits` not in 1..8, non-positive `batch_size`, or malformed
      ImageNet `.npz` files.
    TypeError: arguments of the wrong type.
    DatasetNotFoundError: the data is not available locally and could not be
      obtained (message says what is missing, where it looked, how to get it).

  #### Examples

  ```python
  # Offline dataset bundled with scikit-learn.
  ds = load_image_dataset('digits', 'train', batch_size=64, seed=0)
  x = next(iter(ds))          # uint8, [64, 8, 8, 1], values 0..255

  # Labelled digits with the reference's classification augmentation.
  ds = load_image_dataset('digits', 'train', 64, with_labels=True,
                          **classification_augmentation('digits'))
  x, y = next(iter(ds))       # uint8 [64, 8, 8, 1], int64 [64] in 0..9

  # CelebA-HQ 256 at 5 bits (values 0..31), with default flips.
  ds = load_image_dataset('celeb_a_hq', 'train', 8, n_bits=5,
                          data_dir='/data/tfds', repeat=True)
  ```
  """
  key = _canonical_name(name)
  info = _INFOS[key]
  n_bits = info.n_bits if n_bits is None else _check_n_bits(n_bits)
  batch_size = _check_positive_int(batch_size, 'batch_size')
  seed = _check_seed(seed)
  if shuffle_buffer is not None:
    shuffle_buffer = _check_positive_int(shuffle_buffer, 'shuffle_buffer')
  if not isinstance(split, str) or not split.strip():
    raise ValueError(f'split must be a non-empty str, got {split!r}.')
  if flip is not None and not isinstance(flip, bool):
    raise TypeError(f'flip must be None, True or False, got {flip!r}.')
  if not isinstance(with_labels, bool):
    raise TypeError(f'with_labels must be True or False, got {with_labels!r}.')
  if with_labels and info.n_classes is None:
    raise ValueError(
        f'Dataset {key!r} has no labels here; with_labels=True needs one of '
        f'{", ".join(k for k, v in _INFOS.items() if v.n_classes)}.')
  if isinstance(crop_padding, bool) or not isinstance(
      crop_padding, (int, np.integer)) or crop_padding < 0:
    raise ValueError(
        f'crop_padding must be a non-negative int, got {crop_padding!r}.')
  crop_padding = int(crop_padding)
  if crop_padding >= min(info.image_shape[:2]):
    raise ValueError(
        f'crop_padding={crop_padding} must be smaller than the image height '
        f'and width {info.image_shape[:2]} (reflection padding).')

  split_key = split.strip()
  if split_key.lower() == 'train':
    is_train, source_split = True, info.train_split
  elif split_key.lower() in _TEST_SPLIT_ALIASES:
    is_train, source_split = False, info.test_split
  elif info.source == 'tfds':
    is_train, source_split = split_key.startswith('train'), split_key
  else:
    raise ValueError(
        f'Dataset {key!r} has splits "train" and "test"; got {split!r}.')

  if flip is None:
    flip = info.horizontal_flip and is_train
  elif flip and not info.horizontal_flip:
    warnings.warn(
        f'Horizontal flips requested for {key!r}, whose images are not '
        'mirror-symmetric in distribution (digits/house numbers).',
        stacklevel=2)

  if shuffle_buffer is None:
    h, w, c = info.image_shape
    if key == 'digits':
      shuffle_buffer = 1797
    else:
      shuffle_buffer = int(
          np.clip(_SHUFFLE_BUFFER_BYTES // (h * w * c), 1024, 10000))

  if info.source == 'sklearn':
    images, labels = _digits_split(is_train)
    ds = tf.data.Dataset.from_tensor_slices(
        (images, labels) if with_labels else images)
  elif info.source == 'npz':
    ds = _npz_dataset(info, is_train, data_dir, shuffle, seed)
  else:
    ds = _tfds_dataset(info, source_split, data_dir, download, shuffle, seed,
                       manual_dir, with_labels)

  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = _postprocess(ds, n_bits=n_bits, flip=flip, crop_padding=crop_padding,
                    seed=seed, with_labels=with_labels)
  return ds.prefetch(tf.data.AUTOTUNE)


def _random_crop_batch(x, padding: int, offsets):
  """Per-image crops of the reflection-padded batch x at offsets [B, 2]."""
  h, w = tf.shape(x)[1], tf.shape(x)[2]
  padded = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]],
                  mode='REFLECT')
  rows = offsets[:, :1] + tf.range(h)[None]                 # [B, H]
  cols = offsets[:, 1:] + tf.range(w)[None]                 # [B, W]
  out = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(out, cols, axis=2, batch_dims=1)


def _postprocess(ds: tf.data.Dataset, *, n_bits: int, flip: bool,
                 crop_padding: int, seed: Optional[int],
                 with_labels: bool) -> tf.data.Dataset:
  """Batch-level bit reduction, random crops and flips (pure TF).

  Elements are image batches, or (images, labels) pairs with `with_labels`;
  labels pass through unchanged.
  """
  shift = 8 - n_bits

  def reduce_bits(x):
    x = tf.cast(x, tf.uint8)
    if shift:
      x = tf.bitwise.right_shift(x, tf.constant(shift, tf.uint8))
    return x

  def augment(x, pair):
    """Crop then flip; `pair` is a stateless seed or None (stateful)."""
    x = reduce_bits(x)
    batch = tf.shape(x)[0]
    if crop_padding:
      shape, hi = [batch, 2], 2 * crop_padding + 1
      if pair is None:
        offsets = tf.random.uniform(shape, 0, hi, dtype=tf.int32)
      else:
        # A seed derived from `pair`, so the flips below stay those of
        # crop-free pipelines with the same seed.
        crop_seed = tf.random.experimental.stateless_fold_in(pair, 1)
        offsets = tf.random.stateless_uniform(shape, crop_seed, 0, hi,
                                              dtype=tf.int32)
      x = _random_crop_batch(x, crop_padding, offsets)
    if flip:
      if pair is None:
        flips = tf.random.uniform([batch]) < 0.5
      else:
        flips = tf.random.stateless_uniform([batch], seed=pair) < 0.5
      x = tf.where(tf.reshape(flips, [-1, 1, 1, 1]), tf.reverse(x, axis=[2]),
                   x)
    return x

  def apply(elem, pair):
    if with_labels:
      return augment(elem[0], pair), tf.cast(elem[1], tf.int64)
    return augment(elem, pair)

  if seed is None or not (flip or crop_padding):
    return ds.map(lambda *elem: apply(elem if with_labels else elem[0], None),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def fn_seeded(step, elem):
    return apply(elem, tf.stack([tf.constant(seed, tf.int64), step]))

  ds = tf.data.Dataset.zip((tf.data.Dataset.counter(), ds))
  return ds.map(fn_seeded, num_parallel_calls=tf.data.AUTOTUNE)


_DIGITS_CACHE = {}


def _digits_split(is_train: bool) -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn digits as (uint8 [N, 8, 8, 1], int64 labels [N]); the last
  297 images are test."""
  if 'all' not in _DIGITS_CACHE:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    bunch = load_digits()
    raw = bunch.images  # [1797, 8, 8] float64, values 0..16
    imgs = np.round(raw * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    _DIGITS_CACHE['all'] = (imgs[..., None], bunch.target.astype(np.int64))
  imgs, labels = _DIGITS_CACHE['all']
  n_train = len(imgs) - _DIGITS_N_TEST
  part = slice(None, n_train) if is_train else slice(n_train, None)
  return imgs[part], labels[part]


# ----------------------------------------------------------------------------
# TFDS-backed datasets.
# ----------------------------------------------------------------------------

_CELEBA_HQ_HELP = (
    'CelebA-HQ needs a manual download (TFDS cannot fetch it). Build the '
    '256x256 images with the progressive_growing_of_gans tools '
    '(https://github.com/tkarras/progressive_growing_of_gans#preparing-'
    'datasets-for-training: `python dataset_tool.py create_celebahq ...`), '
    'pack them as a tar of PNG files named `data256x256.tar` and put it in '
    'the manual directory {manual_dir} (or pass manual_dir=... / point '
    'data_dir to a TFDS directory where `celeb_a_hq/256` is already '
    'prepared). Then call load_image_dataset(..., download=True) once to '
    'let TFDS prepare it. TFDS instructions: "manual_dir should contain '
    'multiple tar files with images (data2x2.tar, data4x4.tar .. '
    'data1024x1024.tar)"; only data256x256.tar is needed here.')


def _tfds_help(info: ImageDatasetInfo, data_dir: str, manual_dir: str) -> str:
  if info.name == 'celeb_a_hq':
    return _CELEBA_HQ_HELP.format(manual_dir=manual_dir)
  return (
      f'To get it, rerun with download=True on a machine with network access '
      f'(TFDS downloads it into data_dir), or prepare it elsewhere with '
      f'`tfds build {info.tfds_name} --data_dir=DIR` / '
      f'`tfds.load("{info.tfds_name}", data_dir=DIR)`, copy DIR here and '
      f'pass data_dir=DIR (--data_dir DIR on the command line).')


def _tfds_is_prepared(tfds, tfds_name: str, data_dir: Optional[str]) -> bool:
  try:
    return bool(tfds.builder(tfds_name, data_dir=data_dir).is_prepared())
  except Exception:  # pylint: disable=broad-except
    return False


def _tfds_dataset(info: ImageDatasetInfo, split: str, data_dir: Optional[str],
                  download: bool, shuffle: bool, seed: Optional[int],
                  manual_dir: Optional[str],
                  with_labels: bool = False) -> tf.data.Dataset:
  """Loads `info.tfds_name` as a dataset of single uint8 images (with
  `with_labels`: of (image, label) pairs)."""
  tfds = _tfds()
  shown_dir = os.path.expanduser(data_dir) if data_dir else _default_data_dir()
  if manual_dir is None:
    manual_dir = os.path.join(shown_dir, 'downloads', 'manual')
  manual_dir = os.path.expanduser(manual_dir)
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
  kwargs = dict(split=split, data_dir=data_dir, shuffle_files=shuffle,
                read_config=read_config)
  what = f'Dataset {info.name!r} (TFDS {info.tfds_name!r})'

  # 1) Already prepared (or mocked in tests): no download attempt.
  try:
    ds = tfds.load(info.tfds_name, download=False, **kwargs)
  except AssertionError as e:  # TFDS: "could not find data in ..."
    first_error = e
    ds = None
  except Exception as e:  # pylint: disable=broad-except
    if _tfds_is_prepared(tfds, info.tfds_name, data_dir):
      # The data exists but the request is bad (e.g. unknown split).
      raise ValueError(
          f'{what}: could not read split {split!r} from {shown_dir}: '
          f'{_one_line(e)}') from None
    first_error = e
    ds = None

  if ds is None:
    if not download:
      raise DatasetNotFoundError(
          f'{what} not found: no prepared data in data_dir={shown_dir} '
          f'(looked for {os.path.join(shown_dir, info.tfds_name)}) and '
          f'download=False. ' + _tfds_help(info, shown_dir, manual_dir) +
          f' [{_one_line(first_error)}]') from None

    download_kwargs = {}
    if info.name == 'celeb_a_hq':
      tar_name = 'data%dx%d.tar' % info.image_shape[:2]
      tar_path = os.path.join(manual_dir, tar_name)
      if not tf.io.gfile.exists(tar_path):
        raise DatasetNotFoundError(
            f'{what} not found: no prepared data in data_dir={shown_dir} and '
            f'the manual-download file {tar_name} is missing (looked for '
            f'{tar_path}). ' + _tfds_help(info, shown_dir, manual_dir)
        ) from None
      download_kwargs['download_config'] = tfds.download.DownloadConfig(
          manual_dir=manual_dir)
    try:
      ds = tfds.load(info.tfds_name, download=True,
                     download_and_prepare_kwargs=download_kwargs, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetNotFoundError(
          f'{what} not found in data_dir={shown_dir} and downloading/'
          f'preparing it failed (no network?): {_one_line(e)}. ' +
          _tfds_help(info, shown_dir, manual_dir)) from None

  if with_labels:
    return ds.map(lambda ex: (ex['image'], ex['label']),
                  num_parallel_calls=tf.data.AUTOTUNE)
  return ds.map(lambda ex: ex['image'], num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Bring-your-own ImageNet .npz files.
# ----------------------------------------------------------------------------

_NPZ_CHUNK = 4096


def _npz_files(info: ImageDatasetInfo, is_train: bool,
               data_dir: Optional[str]) -> Tuple[str, Sequence[str]]:
  root = os.path.expanduser(data_dir) if data_dir else _default_data_dir()
  folder = os.path.join(root, info.name)
  prefix = 'train' if is_train else 'val'
  pattern = os.path.join(folder, prefix + '*.npz')
  return pattern, sorted(glob.glob(pattern))


def _npz_data_shape(path: str) -> Tuple[Tuple[int, ...], np.dtype]:
  """Reads shape/dtype of the 'data' array of an .npz without loading it."""
  try:
    with zipfile.ZipFile(path) as zf:
      if 'data.npy' not in zf.namelist():
        keys = [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
        raise ValueError(f'{path}: no array named "data" (keys: {keys}).')
      with zf.open('data.npy') as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
          shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
          shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f'{path}: not a readable .npz file ({_one_line(e)}).'
                     ) from None
  return tuple(int(s) for s in shape), np.dtype(dtype)


def _npz_layout(path: str, shape: Tuple[int, ...], dtype: np.dtype,
                image_shape: Tuple[int, int, int]) -> str:
  """Returns 'nhwc', 'nchw' or 'flat' for a valid array, else raises."""
  h, w, c = image_shape
  if dtype != np.uint8:
    raise ValueError(f'{path}: "data" must be uint8, got {dtype}.')
  if len(shape) == 4 and shape[1:] == (h, w, c):
    return 'nhwc'
  if len(shape) == 4 and shape[1:] == (c, h, w):
    return 'nchw'
  if len(shape) == 2 and shape[1] == h * w * c:
    return 'flat'
  raise ValueError(
      f'{path}: "data" has shape {shape}; expected [N, {h}, {w}, {c}], '
      f'[N, {c}, {h}, {w}] or the flattened [N, {h * w * c}].')


def _npz_to_nhwc(arr: np.ndarray, image_shape: Tuple[int, int, int]):
  h, w, c = image_shape
  if arr.ndim == 2:
    arr = arr.reshape(-1, c, h, w)
  if arr.shape[1:] == (c, h, w) and arr.shape[1:] != (h, w, c):
    arr = arr.transpose(0, 2, 3, 1)
  return np.ascontiguousarray(arr)


def _npz_dataset(info: ImageDatasetInfo, is_train: bool,
                 data_dir: Optional[str], shuffle: bool,
                 seed: Optional[int]) -> tf.data.Dataset:
  """Streams images from user-supplied ImageNet .npz files."""
  pattern, files = _npz_files(info, is_train, data_dir)
  h, w, c = info.image_shape
  if not files:
    split_name = 'train' if is_train else 'validation/test'
    raise DatasetNotFoundError(
        f'Dataset {info.name!r} ({split_name} split) not found: no files '
        f'matching {pattern} (data_dir='
        f'{os.path.expanduser(data_dir) if data_dir else _default_data_dir()}'
        f'). ImageNet {h}x{w} is bring-your-own-files (the TFDS '
        f'downsampled_imagenet download is dead). Provide .npz files with a '
        f'uint8 array under key "data", either [N, {h}, {w}, 3] or the '
        f'official "Downsampled ImageNet {h}x{w} (npz format)" layout '
        f'[N, {3 * h * w}] (R plane, G plane, B plane; as in '
        f'Imagenet{h}_train_npz: train_data_batch_1.npz .. '
        f'train_data_batch_10.npz and Imagenet{h}_val_npz: val_data.npz, '
        f'from the ImageNet website after login). Put the training files at '
        f'<data_dir>/{info.name}/train*.npz and the validation files at '
        f'<data_dir>/{info.name}/val*.npz (e.g. val_data.npz or '
        f'valid_*.npz), then pass data_dir=<data_dir>.')
  for path in files:  # Validate everything up front: no errors mid-epoch.
    shape, dtype = _npz_data_shape(path)
    _npz_layout(path, shape, dtype, info.image_shape)

  def gen(path):
    path = path.decode() if isinstance(path, bytes) else str(path)
    with np.load(path) as f:
      arr = _npz_to_nhwc(f['data'], info.image_shape)
    for i in range(0, len(arr), _NPZ_CHUNK):
      yield arr[i:i + _NPZ_CHUNK]

  spec = tf.TensorSpec([None, h, w, c], tf.uint8)

  def read_file(path):
    return tf.data.Dataset.from_generator(
        gen, args=(path,), output_signature=spec).unbatch()

  files_ds = tf.data.Dataset.from_tensor_slices(list(files))
  if shuffle and len(files) > 1:
    files_ds = files_ds.shuffle(len(files), seed=seed,
                                reshuffle_each_iteration=True)
  return files_ds.interleave(read_file, cycle_length=min(2, len(files)),
                             block_length=16)


# ----------------------------------------------------------------------------
# Dequantisation and likelihood bookkeeping.
# ----------------------------------------------------------------------------


def dequantize(x_int, n_bits: int = 8, seed=None,
               dtype=tf.float32) -> tf.Tensor:
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
  x = tf.constant([[0, 31], [7, 16]], tf.uint8)    # 5-bit pixels, 0..31
  y = dequantize(x, n_bits=5, seed=[1, 2])         # float32 in [0, 1)
  tf.reduce_all(tf.cast(tf.floor(y * 32), tf.uint8) == x)   # True

  # In a training loop:
  for x in load_image_dataset('celeb_a_hq', 'train', 8, n_bits=5):
    y = dequantize(x, n_bits=5)
  ```
  """
  n_bits = _check_n_bits(n_bits)
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
  D = 32 * 32 * 3
  bpd = -(log_p - bits_per_dim_offset(8, D)) / (D * math.log(2.))
  ```
  """
  n_bits = _check_n_bits(n_bits)
  num_dims = _check_positive_int(num_dims, 'num_dims')
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
  samples = flow.sample(16)                         # float in [0, 1]
  save_image_grid(to_uint8_images(samples, 5).numpy(), 'samples.png')
  ```
  """
  n_bits = _check_n_bits(n_bits)
  x = tf.cast(tf.convert_to_tensor(x_float), tf.float32)
  x = tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)
  levels = 2.0**n_bits
  k = tf.minimum(tf.floor(tf.clip_by_value(x, 0.0, 1.0) * levels),
                 levels - 1.0)
  out = tf.round(k * (255.0 / (levels - 1.0)))
  return tf.cast(out, tf.uint8)


# ----------------------------------------------------------------------------
# Image grids.
# ----------------------------------------------------------------------------


def save_image_grid(images_uint8, path: str, nrow: Optional[int] = None,
                    padding: int = 1, pad_value: int = 0) -> str:
  """Writes a batch of images as one PNG grid.

  Images are laid out row by row, `nrow` images per row, separated by
  `padding` pixels of `pad_value`. The PNG has size

  ```none
  height = rows * (H + padding) + padding,   rows = ceil(N / nrow)
  width  = nrow * (W + padding) + padding
  ```

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

  Returns:
    `path`.

  Raises:
    TypeError: if the images are not uint8.
    ValueError: bad shapes or arguments.

  #### Examples

  ```python
  x = next(iter(load_image_dataset('digits', 'test', 64)))
  save_image_grid(x, '/tmp/out/digits.png', nrow=8)   # 73 x 73 PNG
  ```
  """
  imgs = np.asarray(images_uint8)
  if imgs.dtype != np.uint8:
    raise TypeError(
        f'images must be uint8, got {imgs.dtype}; use to_uint8_images() '
        'to convert floats in [0, 1].')
  if imgs.ndim == 3:
    # A single [H, W, C] image if the last axis looks like channels,
    # otherwise a batch of grayscale [N, H, W] images.
    imgs = imgs[None] if imgs.shape[-1] in (1, 3) else imgs[..., None]
  if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
    raise ValueError(
        'images must have shape [N, H, W, C] with C in {1, 3}, or '
        f'[N, H, W]; got {np.asarray(images_uint8).shape}.')
  n, h, w, c = imgs.shape
  if n == 0:
    raise ValueError('images is empty.')
  if nrow is None:
    nrow = int(math.ceil(math.sqrt(n)))
  nrow = min(_check_positive_int(nrow, 'nrow'), n)
  if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) \
      or padding < 0:
    raise ValueError(f'padding must be a non-negative int, got {padding!r}.')
  if not 0 <= int(pad_value) <= 255:
    raise ValueError(f'pad_value must be in 0..255, got {pad_value}.')
  rows = int(math.ceil(n / nrow))
  grid = np.full((rows * (h + padding) + padding,
                  nrow * (w + padding) + padding, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, nrow)
    y0 = padding + r * (h + padding)
    x0 = padding + col * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = imgs[i]
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
      matplotlib.image.imsave(path, out, cmap='gray', vmin=0, vmax=255,
                              format='png')
    else:
      matplotlib.image.imsave(path, out, format='png')
  return path


# ----------------------------------------------------------------------------
# 2-D toy datasets.
# ----------------------------------------------------------------------------

#: Names accepted by `toy_2d`.
TOY_DATASETS = ('swissroll', '8gaussians', 'pinwheel', 'circles', 'moons',
                '2spirals', 'checkerboard', 'rings')


def _split_counts(n: int, k: int) -> np.ndarray:
  """k non-negative counts summing to n, as equal as possible."""
  counts = np.full(k, n // k, dtype=np.int64)
  counts[:n % k] += 1
  return counts


def _toy_swissroll(n, rng):
  t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
  x = t * np.cos(t)
  z = t * np.sin(t)
  pts = np.stack([x, z], axis=1) + 1.0 * rng.standard_normal((n, 2))
  return pts / 5.0


def _toy_circles(n, rng):
  n_out = n // 2
  n_in = n - n_out
  t_out = np.linspace(0.0, 2 * np.pi, n_out, endpoint=False)
  t_in = np.linspace(0.0, 2 * np.pi, n_in, endpoint=False)
  pts = np.concatenate([
      np.stack([np.cos(t_out), np.sin(t_out)], axis=1),
      0.5 * np.stack([np.cos(t_in), np.sin(t_in)], axis=1)])
  pts = pts[rng.permutation(n)] + 0.08 * rng.standard_normal((n, 2))
  return 3.0 * pts


def _toy_rings(n, rng):
  counts = _split_counts(n, 4)
  radii = (1.0, 0.75, 0.5, 0.25)
  parts = []
  for m, r in zip(counts, radii):
    t = np.linspace(0.0, 2 * np.pi, m, endpoint=False)
    parts.append(r * np.stack([np.cos(t), np.sin(t)], axis=1))
  pts = 3.0 * np.concatenate(parts)
  pts = pts[rng.permutation(n)]
  return pts + 0.08 * rng.standard_normal((n, 2))


def _toy_moons(n, rng):
  n_out = n // 2
  n_in = n - n_out
  t_out = np.linspace(0.0, np.pi, n_out)
  t_in = np.linspace(0.0, np.pi, n_in)
  pts = np.concatenate([
      np.stack([np.cos(t_out), np.sin(t_out)], axis=1),
      np.stack([1.0 - np.cos(t_in), 1.0 - np.sin(t_in) - 0.5], axis=1)])
  pts = pts[rng.permutation(n)] + 0.1 * rng.standard_normal((n, 2))
  return 2.0 * pts + np.array([-1.0, -0.2])


def _toy_8gaussians(n, rng):
  s = 1.0 / np.sqrt(2.0)
  centers = 4.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s),
                            (s, -s), (-s, s), (-s, -s)])
  idx = rng.integers(0, 8, size=n)
  pts = 0.5 * rng.standard_normal((n, 2)) + centers[idx]
  return pts / 1.414


def _toy_pinwheel(n, rng):
  radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
  rads = np.linspace(0.0, 2 * np.pi, num_classes, endpoint=False)
  labels = np.repeat(np.arange(num_classes), _split_counts(n, num_classes))
  feats = rng.standard_normal((n, 2)) * np.array([radial_std,
                                                  tangential_std])
  feats[:, 0] += 1.0
  angles = rads[labels] + rate * np.exp(feats[:, 0])
  cos, sin = np.cos(angles), np.sin(angles)
  # Row vector times rotation [[cos, -sin], [sin, cos]].
  pts = np.stack([feats[:, 0] * cos + feats[:, 1] * sin,
                  -feats[:, 0] * sin + feats[:, 1] * cos], axis=1)
  return 2.0 * pts[rng.permutation(n)]


def _toy_2spirals(n, rng):
  n1 = n // 2
  n2 = n - n1
  m = max(n1, n2)
  t = np.sqrt(rng.random((m, 1))) * 540.0 * (2 * np.pi) / 360.0
  d1x = -np.cos(t) * t + rng.random((m, 1)) * 0.5
  d1y = np.sin(t) * t + rng.random((m, 1)) * 0.5
  arm = np.hstack([d1x, d1y])
  pts = np.vstack([arm[:n1], -arm[:n2]]) / 3.0
  pts = pts + 0.1 * rng.standard_normal(pts.shape)
  return pts[rng.permutation(n)]


def _toy_checkerboard(n, rng):
  x1 = rng.random(n) * 4.0 - 2.0
  x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2.0
  x2 = x2 + np.floor(x1) % 2
  return 2.0 * np.stack([x1, x2], axis=1)


_TOY_FNS = {
    'swissroll': _toy_swissroll,
    '8gaussians': _toy_8gaussians,
    'pinwheel': _toy_pinwheel,
    'circles': _toy_circles,
    'moons': _toy_moons,
    '2spirals': _toy_2spirals,
    'checkerboard': _toy_checkerboard,
    'rings': _toy_rings,
}


def toy_2d(name: str, n: int, seed: Optional[int] = None) -> np.ndarray:
  """Samples `n` points from a 2-D toy density of the Residual Flows paper.

  The densities follow the FFJORD / Residual Flows toy data (re-implemented
  here with numpy, no scikit-learn):

  * `swissroll`: `t ~ 1.5 pi (1 + 2 U)`, point `(t cos t, t sin t) + N(0, 1)`,
    divided by 5 (sklearn `make_swiss_roll(noise=1)[:, [0, 2]] / 5`).
  * `8gaussians`: `N(c_k, 0.5^2 I) / 1.414` with 8 centres `c_k` evenly on
    the circle of radius 4.
  * `pinwheel`: 5 arms; radial `N(1, 0.3^2)`, tangential `N(0, 0.1^2)`,
    rotated by `2 pi k / 5 + 0.25 exp(radial)`, times 2.
  * `circles`: two concentric circles (radii 1, 0.5) + `N(0, 0.08^2)`,
    times 3 (sklearn `make_circles(factor=.5, noise=.08) * 3`).
  * `moons`: two interleaved half-circles + `N(0, 0.1^2)`, then
    `2 x + (-1, -0.2)` (sklearn `make_moons(noise=.1)`).
  * `2spirals`: two opposite spiral arms `t in [0, 3 pi]` (sqrt-uniform),
    `(-t cos t, t sin t) + U[0, .5)^2`, divided by 3, + `N(0, 0.1^2)`.
  * `checkerboard`: uniform on alternating unit squares of `[-2, 2]^2`,
    times 2 (support `[-4, 4]^2`).
  * `rings`: four concentric circles (radii 3, 2.25, 1.5, 0.75) +
    `N(0, 0.08^2)`.

  Args:
    name: One of `TOY_DATASETS`.
    n: Positive number of samples (exactly `n` rows are returned).
    seed: Optional int for `np.random.default_rng`; same seed, same data.

  Returns:
    `np.ndarray` of shape `[n, 2]`, dtype `float32`, in random order.

  Raises:
    ValueError: unknown `name` (lists the valid names) or non-positive `n`.

  #### Examples

  ```python
  x = toy_2d('pinwheel', 1000, seed=0)    # float32 [1000, 2]
  x.std(0)                                # about 2 in each coordinate
  ```
  """
  if not isinstance(name, str) or name.strip().lower() not in _TOY_FNS:
    raise ValueError(f'Unknown toy dataset {name!r}. Valid names: '
                     f'{", ".join(TOY_DATASETS)}.')
  n = _check_positive_int(n, 'n')
  seed = _check_seed(seed)
  rng = np.random.default_rng(seed)
  pts = _TOY_FNS[name.strip().lower()](n, rng)
  return np.asarray(pts, dtype=np.float32).reshape(n, 2)
