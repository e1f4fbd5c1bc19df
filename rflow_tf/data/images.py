"""Image datasets: static descriptions, batched `tf.data` pipelines, labels, augmentation.

`load_image_dataset` yields batches of **raw integer pixels** `[B, H, W, C]`
(`tf.uint8`, values in `[0, 2**n_bits - 1]`), optionally with labels and the
reference's random crops and flips; `dataset_info` describes each dataset and
`locate_image_dataset` says, in seconds, where its data is (or raises
`DatasetNotFoundError` naming every place it looked).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from rflow_tf.data import glow, reference_pth
from rflow_tf.data._checks import check_n_bits, check_positive_int, check_seed
from rflow_tf.data.catalog import (  # noqa: F401  (re-exported)
    IMAGE_DATASETS,
    INFOS,
    ImageDatasetInfo,
    canonical_name,
    classification_augmentation,
    dataset_info,
)
from rflow_tf.data.errors import DatasetNotFoundError
from rflow_tf.data.readers import digits_split, npz_dataset, tfds_dataset
from rflow_tf.data.sources import DataSource, locate_source

_TEST_SPLIT_ALIASES = ('test', 'val', 'valid', 'validation')

# Approximate memory budget of the default shuffle buffer.
_SHUFFLE_BUFFER_BYTES = 128 * 2**20


def locate_image_dataset(
    name: str,
    data_dir: Optional[str] = None,
    *,
    download: bool = True,
    manual_dir: Optional[str] = None,
    splits: Sequence[str] = ('train', 'test'),
) -> DataSource:
    """Where `load_image_dataset` would read dataset `name` from, found in seconds.

    Tries the dataset's sources (`dataset_info(name).sources`) in order and
    returns the first that holds the `splits` (default both), as a `DataSource` that says
    what its train and test splits are (and whether the test split is the
    paper's). Only the file system is read, plus one connection when TFDS
    would have to download, so a missing dataset is reported at once;
    `train/main.py` calls it before it builds a model.

    Where `data_dir` is looked at:

    * Glow's TFRecords (`celeb_a_hq`): `data_dir`, `data_dir/celeba-tfr` and
      `data_dir/celebahq/celeba-tfr`, each holding `train/` and `validation/`.
    * The authors' `.pth` files (`celeb_a_hq`, `celeba_5bit`, `imagenet32`,
      `imagenet64`): `data_dir` as their `data/` folder, e.g.
      `data_dir/celebahq/celeba256_train.pth`
      (`rflow_tf.data.reference_pth.REFERENCE_PTH_FILES`).
    * `.npz` files (`imagenet32`, `imagenet64`): `data_dir/imagenet32/train*.npz`
      and `val*.npz`.
    * TFDS (`mnist`, `cifar10`, `svhn_cropped`, `celeb_a_hq`): `data_dir` as
      TFDS's data directory.

    `data_dir=None` means TFDS's default (`$TFDS_DATA_DIR` or
    `~/tensorflow_datasets`).

    Args:
      name: One of `IMAGE_DATASETS`.
      data_dir: The folder to look in (see above).
      download: Whether TFDS may download a missing dataset; if it would have
        to and the network is unreachable, that is reported here.
      manual_dir: Folder of TFDS CelebA-HQ's manual download
        (default `<data_dir>/downloads/manual`).
      splits: The splits that must be present, `'train'` and/or `'test'`.

    Returns:
      The `DataSource` (also warns, `UserWarning`, about missing Glow shards).

    Raises:
      ValueError: unknown dataset name.
      DatasetNotFoundError: no source holds the data; the message names every
        place looked in and how to get the data from each source (or that the
        network is unreachable for a download).

    #### Examples

    ```python
    import os
    from rflow_tf.data import locate_image_dataset

    for folder in ("train", "validation"):     # Glow's layout (the files are not read here)
        os.makedirs(f"celeba-tfr/{folder}")
        open(f"celeba-tfr/{folder}/{folder}-r08-s-0000-of-0001.tfrecords", "wb").close()
    source = locate_image_dataset("celeb_a_hq", data_dir="celeba-tfr")
    print(source.describe())   # Glow's TFRecords; test = the paper's test set
    assert source.kind == "glow_tfrecords" and source.paper_test_split
    assert locate_image_dataset("digits").kind == "sklearn"
    ```
    """
    info = INFOS[canonical_name(name)]
    return locate_source(info, data_dir, download=download, manual_dir=manual_dir, splits=splits)


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
    translate: float = 0.0,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Builds a batched `tf.data` pipeline of raw integer images.

    Each element is a `tf.uint8` tensor of shape `[B, H, W, C]` (with
    `with_labels=True`, a pair `(pixels, labels)` with `tf.int64` labels of
    shape `[B]`) holding raw pixel values reduced to `n_bits` bits:

    ```none
    x = floor(x_8bit / 2**(8 - n_bits))   in {0, ..., 2**n_bits - 1}
    ```

    (the reference's `reduce_bits`; for `celeba_5bit`, stored with 5 bits,
    `floor(x_5bit / 2**(5 - n_bits))`).

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
    * `celeb_a_hq` (256x256x3, default 5 bits), from the first of:
      1. Glow's TFRecords (`celeba-tfr.tar` extracted; `data_dir` is the
         folder holding `train/` and `validation/`): `train` is Glow's 27,000
         training images (120 shards), `test` its 3,000 validation images
         (40 shards), the paper's split. Missing shards are warned about.
      2. The authors' `data/` folder (`data_dir`), holding
         `celebahq/celeba256_train.pth` and `celeba256_validation.pth` (the
         same split).
      3. TFDS `celeb_a_hq/256`, which needs a *manual download*
         (`data256x256.tar`, built with the progressive_growing_of_gans
         `dataset_tool.py create_celebahq`, in `manual_dir`, default
         `<data_dir>/downloads/manual/`). TFDS has a single 30000-image
         split; `train` is its first 90%, `test` the last 10%: our own split,
         **not** the paper's test set (`locate_image_dataset(...)` says so).
    * `celeba_5bit` (64x64x3, stored with 5 bits): the authors' file
      `celebahq64_5bit/celeba_full_64x64_5bit.pth` under `data_dir`; `test`
      is its first 5,000 images and `train` the rest (the reference trains
      on all of them, test images included; we do not).
    * `imagenet32` / `imagenet64`: the authors' files
      `imagenet32/{train,valid}_32x32.pth` / `imagenet64/{train,valid}_64x64.pth`
      under `data_dir`, or else bring-your-own `.npz` files (the upstream
      TFDS `downsampled_imagenet` URL is dead). Expected `.npz` layout:

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
      are ignored.

    The authors' `.pth` files are read with the converter's restricted
    unpickler (`rflow_tf.torch_format`; anything but tensors is refused) and
    memory-mapped, never loaded whole. `data_dir=None` means the TFDS default
    data directory (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). The source
    is chosen by `locate_image_dataset`, which says what each split is.

    Args:
      name: Dataset name, one of `IMAGE_DATASETS`.
      split: `'train'` or `'test'` (`'val'`, `'valid'`, `'validation'` are
        aliases of `'test'`). For TFDS datasets any other TFDS split spec
        (e.g. `'train[:10%]'`) is passed through unchanged.
      batch_size: Positive number of images per batch.
      data_dir: Root data directory: Glow's `celeba-tfr` folder, the
        authors' `data/` folder, the parent of `imagenet32/` / `imagenet64/`
        `.npz` folders, or TFDS's `data_dir` (see `locate_image_dataset`).
        `None`: TFDS default.
      n_bits: Bits per pixel to keep, in 1..8 (at most 5 for `celeba_5bit`);
        `None` means the dataset default `dataset_info(name).n_bits` (5 for
        `celeb_a_hq` and `celeba_5bit`, else 8).
      shuffle: Shuffle files and examples (buffered shuffle, reshuffled each
        epoch).
      flip: Random horizontal flips with probability 1/2 per image. `None`
        means the dataset default: on for the training split of `cifar10`,
        `celeb_a_hq`, `imagenet32`, `imagenet64`; off otherwise (never for
        `mnist`, `digits`, `svhn_cropped`, where it would be wrong).
      repeat: Repeat indefinitely (batches then cross epoch boundaries).
      seed: Optional int making shuffling and flips deterministic: the first
        iterator of a dataset built with the same seed (and the same global
        seed, `tf.random.set_seed`, which tf.data's shuffle combines with it)
        yields the same stream. A second iterator over the same dataset object
        is shuffled differently (tf.data reshuffles each iteration): build a
        fresh dataset for each stream that must repeat.
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
      translate: `t > 0` shifts every image by a random sub-pixel offset
        `(dy, dx)`, each uniform in `[-t, t]` and independent per image, with
        bilinear interpolation and zero fill (x'(i, j) = x(i - dy, j - dx),
        0 outside the image), rounded back to integer pixel values; applied
        before the bit reduction and any crop. `0.0` (default): none. Not a
        reference option: on 8x8 digits it lifts classifier accuracy across
        writers (README, "Digits accuracy").
      input_context: A `tf.distribute.InputContext` (from
        `strategy.distribute_datasets_from_function`): with several input
        pipelines (workers), pipeline `i` reads only its own part of the
        data, sharded by file for Glow's TFRecords, `.npz` files and TFDS,
        by blocks of the file for `.pth` files, so no worker reads another's
        files. `None`: one pipeline reads everything.

    Returns:
      A `tf.data.Dataset` of `tf.uint8` tensors `[B, H, W, C]`, or of pairs
      `([B, H, W, C] uint8, [B] int64)` with `with_labels=True`.

    Raises:
      ValueError: unknown dataset name (message lists valid names), bad
        `split`, `n_bits` not in 1..8 (or above the stored bits), non-positive
        `batch_size`.
      DatasetFormatError: (a `ValueError`) damaged data: a corrupt or
        truncated TFRecord shard, a `.pth` tensor of the wrong shape or type,
        a malformed ImageNet `.npz` file (the message names the file).
      rflow_tf.torch_format.UnsafeCheckpointError: a `.pth` file whose pickle
        asks for more than tensors (refused before anything runs).
      TypeError: arguments of the wrong type.
      DatasetNotFoundError: the data is not available locally and could not be
        obtained (message names every place it looked and how to get the data;
        a download without network fails within seconds saying so).

    #### Examples

    ```python
    import os
    import pathlib
    import numpy as np
    import tensorflow as tf
    import rflow_tf
    from rflow_tf.data import classification_augmentation, load_image_dataset

    # Offline dataset bundled with scikit-learn.
    ds = load_image_dataset("digits", "train", batch_size=64, seed=0)
    x = next(iter(ds))          # uint8, [64, 8, 8, 1], values 0..255
    assert x.dtype == tf.uint8 and x.shape == (64, 8, 8, 1)

    # Labelled digits with the reference's classification augmentation.
    ds = load_image_dataset("digits", "train", 64, with_labels=True,
                            **classification_augmentation("digits"))
    x, y = next(iter(ds))       # uint8 [64, 8, 8, 1], int64 [64] in 0..9
    assert y.dtype == tf.int64 and int(tf.reduce_max(y)) <= 9

    # CelebA-HQ 256 at 5 bits (values 0..31) from Glow's TFRecords, with flips;
    # here a folder of one shard per split holding 2 images of 256x256x3.
    def feature(image):     # Glow's record: shape and the raw HWC bytes
        return {"shape": tf.train.Feature(int64_list=tf.train.Int64List(value=image.shape)),
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()]))}

    for folder in ("train", "validation"):
        os.makedirs(f"celeba-tfr/{folder}")
        path = f"celeba-tfr/{folder}/{folder}-r08-s-0000-of-0001.tfrecords"
        with tf.io.TFRecordWriter(path) as w:
            for image in np.full([2, 256, 256, 3], 255, np.uint8):
                example = tf.train.Example(features=tf.train.Features(feature=feature(image)))
                w.write(example.SerializeToString())
    ds = load_image_dataset("celeb_a_hq", "train", 2, n_bits=5,
                            data_dir="celeba-tfr", repeat=True)
    assert int(tf.reduce_max(next(iter(ds)))) == 31     # 255 >> 3

    # The authors' data/ folder: ImageNet 32x32, valid_32x32.pth as the test
    # split (here the repository's few-image copy of that folder).
    data_dir = pathlib.Path(rflow_tf.__file__).parents[1] / "tests/data/reference-data"
    ds = load_image_dataset("imagenet32", "test", 3, data_dir=str(data_dir))
    assert next(iter(ds)).shape == (3, 32, 32, 3)
    ```
    """
    key = canonical_name(name)
    info = INFOS[key]
    n_bits = info.n_bits if n_bits is None else check_n_bits(n_bits)
    if n_bits > info.stored_bits:
        raise ValueError(
            f'Dataset {key!r} is stored with {info.stored_bits} bits per pixel; n_bits must be '
            f'at most {info.stored_bits}, got {n_bits} (n_bits=None: {info.n_bits}).'
        )
    batch_size = check_positive_int(batch_size, 'batch_size')
    seed = check_seed(seed)
    if shuffle_buffer is not None:
        shuffle_buffer = check_positive_int(shuffle_buffer, 'shuffle_buffer')
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f'split must be a non-empty str, got {split!r}.')
    if flip is not None and not isinstance(flip, bool):
        raise TypeError(f'flip must be None, True or False, got {flip!r}.')
    if not isinstance(with_labels, bool):
        raise TypeError(f'with_labels must be True or False, got {with_labels!r}.')
    if with_labels and info.n_classes is None:
        raise ValueError(
            f'Dataset {key!r} has no labels here; with_labels=True needs one of '
            f'{", ".join(k for k, v in INFOS.items() if v.n_classes)}.'
        )
    if (
        isinstance(crop_padding, bool)
        or not isinstance(crop_padding, (int, np.integer))
        or crop_padding < 0
    ):
        raise ValueError(f'crop_padding must be a non-negative int, got {crop_padding!r}.')
    crop_padding = int(crop_padding)
    if (
        isinstance(translate, bool)
        or not isinstance(translate, (int, float, np.integer, np.floating))
        or not 0.0 <= float(translate) < min(info.image_shape[:2])
    ):
        raise ValueError(
            f'translate must be a number in [0, {min(info.image_shape[:2])}) '
            f'(pixels, less than the image size), got {translate!r}.'
        )
    translate = float(translate)
    if crop_padding >= min(info.image_shape[:2]):
        raise ValueError(
            f'crop_padding={crop_padding} must be smaller than the image height '
            f'and width {info.image_shape[:2]} (reflection padding).'
        )

    split_key = split.strip()
    if split_key.lower() == 'train':
        is_train, source_split = True, info.train_split
    elif split_key.lower() in _TEST_SPLIT_ALIASES:
        is_train, source_split = False, info.test_split
    elif 'tfds' in info.sources:  # a TFDS split spec, e.g. 'train[:10%]'
        is_train, source_split = split_key.startswith('train'), split_key
    else:
        raise ValueError(f'Dataset {key!r} has splits "train" and "test"; got {split!r}.')
    source = None
    if info.source != 'sklearn':
        source = locate_source(
            info,
            data_dir,
            download=download,
            manual_dir=manual_dir,
            splits=('train' if is_train else 'test',),
        )
        if source_split not in (info.train_split, info.test_split) and source.kind != 'tfds':
            raise ValueError(
                f'Dataset {key!r} read from {source.kind} has splits "train" and "test"; '
                f'got {split!r} (TFDS split specs apply to TFDS data only).'
            )

    if flip is None:
        flip = info.horizontal_flip and is_train
    elif flip and not info.horizontal_flip:
        warnings.warn(
            f'Horizontal flips requested for {key!r}, whose images are not '
            'mirror-symmetric in distribution (digits/house numbers).',
            stacklevel=2,
        )

    if shuffle_buffer is None:
        h, w, c = info.image_shape
        if key == 'digits':
            shuffle_buffer = 1797
        else:
            shuffle_buffer = int(np.clip(_SHUFFLE_BUFFER_BYTES // (h * w * c), 1024, 10000))

    if source is None:
        images, labels = digits_split(is_train)
        ds = tf.data.Dataset.from_tensor_slices((images, labels) if with_labels else images)
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    elif source.kind == 'glow_tfrecords':
        ds = _glow_split(info, source, is_train, shuffle, seed, input_context)
    elif source.kind == 'reference_pth':
        ds = _pth_split(info, source, is_train, shuffle, seed, input_context)
    elif source.kind == 'npz':
        ds = npz_dataset(info, is_train, data_dir, shuffle, seed, input_context)
    else:
        ds = tfds_dataset(
            info,
            source_split,
            data_dir,
            download,
            shuffle,
            seed,
            manual_dir,
            with_labels,
            input_context,
        )

    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _postprocess(
        ds,
        n_bits=n_bits,
        stored_bits=info.stored_bits,
        flip=flip,
        crop_padding=crop_padding,
        translate=translate,
        seed=seed,
        with_labels=with_labels,
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def _glow_split(info, source, is_train, shuffle, seed, input_context) -> tf.data.Dataset:
    """Single images of one split of Glow's TFRecords (structure-checked first)."""
    split = 'train' if is_train else 'test'
    shards = glow.find_glow_shards(source.location, split, info.image_shape[0])
    if shards is None:  # removed since it was located
        raise DatasetNotFoundError(
            f'Glow TFRecords of split {split!r} disappeared from {source.location}.'
        )
    if shards.missing:
        warnings.warn(shards.missing_message(), stacklevel=3)
    for path in shards.files:
        glow.check_tfrecord_file(path)
    return glow.glow_dataset(
        shards.files, info.image_shape, shuffle=shuffle, seed=seed, input_context=input_context
    )


def _pth_split(info, source, is_train, shuffle, seed, input_context) -> tf.data.Dataset:
    """Single images of one split of the authors' .pth files (memory-mapped)."""
    split = 'train' if is_train else 'test'
    path = reference_pth.reference_pth_path(source.location, info.name, split)
    images = reference_pth.read_reference_images(
        path, info.image_shape, max_value=2**info.stored_bits - 1
    )
    start, stop = reference_pth.reference_split_range(info.name, split, len(images), path)
    return reference_pth.array_dataset(
        images, start, stop, shuffle=shuffle, seed=seed, input_context=input_context
    )


def _random_crop_batch(x, padding: int, offsets):
    """Per-image crops of the reflection-padded batch x at offsets [B, 2]."""
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    padded = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode='REFLECT')
    rows = offsets[:, :1] + tf.range(h)[None]  # [B, H]
    cols = offsets[:, 1:] + tf.range(w)[None]  # [B, W]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def _random_translate_batch(x, offsets):
    """Shifts each uint8 image of x [B, H, W, C] by offsets [B, 2] (dy, dx) pixels:
    bilinear interpolation, zero fill, rounded back to uint8."""
    b = tf.shape(x)[0]
    one, zero = tf.ones([b]), tf.zeros([b])
    # Output pixel (i, j) reads input (i - dy, j - dx): [a0 a1 a2 b0 b1 b2 c0 c1].
    transforms = tf.stack([one, zero, -offsets[:, 1], zero, one, -offsets[:, 0], zero, zero], 1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(x, tf.float32),
        transforms=transforms,
        output_shape=tf.shape(x)[1:3],
        fill_value=0.0,
        interpolation='BILINEAR',
        fill_mode='CONSTANT',
    )
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _postprocess(
    ds: tf.data.Dataset,
    *,
    n_bits: int,
    stored_bits: int = 8,
    flip: bool,
    crop_padding: int,
    translate: float,
    seed: Optional[int],
    with_labels: bool,
) -> tf.data.Dataset:
    """Batch-level random translations, bit reduction, random crops and flips (pure TF).

    Elements are image batches, or (images, labels) pairs with `with_labels`;
    labels pass through unchanged.
    """
    shift = stored_bits - n_bits

    def reduce_bits(x):
        x = tf.cast(x, tf.uint8)
        if shift:
            x = tf.bitwise.right_shift(x, tf.constant(shift, tf.uint8))
        return x

    def offsets(pair, salt, batch, lo, hi, dtype):
        """[batch, 2] uniform offsets in [lo, hi): stateful without `pair`, else
        from a seed derived from `pair` and `salt`, so the flips (seeded by `pair`
        itself) stay those of pipelines without crops or shifts."""
        shape = [batch, 2]
        if pair is None:
            return tf.random.uniform(shape, lo, hi, dtype=dtype)
        seed = tf.random.experimental.stateless_fold_in(pair, salt)
        return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=dtype)

    def augment(x, pair):
        """Translate, reduce bits, crop, flip; `pair` is a stateless seed or None (stateful)."""
        batch = tf.shape(x)[0]
        if translate:
            shifts = offsets(pair, 2, batch, -translate, translate, tf.float32)
            x = _random_translate_batch(tf.cast(x, tf.uint8), shifts)
        x = reduce_bits(x)
        if crop_padding:
            corners = offsets(pair, 1, batch, 0, 2 * crop_padding + 1, tf.int32)
            x = _random_crop_batch(x, crop_padding, corners)
        if flip:
            if pair is None:
                flips = tf.random.uniform([batch]) < 0.5
            else:
                flips = tf.random.stateless_uniform([batch], seed=pair) < 0.5
            x = tf.where(tf.reshape(flips, [-1, 1, 1, 1]), tf.reverse(x, axis=[2]), x)
        return x

    def apply(elem, pair):
        if with_labels:
            return augment(elem[0], pair), tf.cast(elem[1], tf.int64)
        return augment(elem, pair)

    if seed is None or not (flip or crop_padding or translate):
        return ds.map(
            lambda *elem: apply(elem if with_labels else elem[0], None),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def fn_seeded(step, elem):
        return apply(elem, tf.stack([tf.constant(seed, tf.int64), step]))

    ds = tf.data.Dataset.zip((tf.data.Dataset.counter(), ds))
    return ds.map(fn_seeded, num_parallel_calls=tf.data.AUTOTUNE)
