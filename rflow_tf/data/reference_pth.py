"""The authors' preprocessed datasets: `.pth` tensors in their `data/` folder.

The reference implementation (rtqichen/residual-flows, `resflows/datasets.py`)
reads CelebA-HQ 256, CelebA-HQ 64x64 5-bit and ImageNet 32/64 from files its
preprocessing scripts write with `torch.save`, under its `data/` folder:

| dataset (ours) | files under `data/` | split |
|---|---|---|
| `celeb_a_hq` | `celebahq/celeba256_train.pth`, `celebahq/celeba256_validation.pth` | train, test |
| `celeba_5bit` | `celebahq64_5bit/celeba_full_64x64_5bit.pth` | test = first 5,000, train = rest |
| `imagenet32` | `imagenet32/train_32x32.pth`, `imagenet32/valid_32x32.pth` | train, test |
| `imagenet64` | `imagenet64/train_64x64.pth`, `imagenet64/valid_64x64.pth` | train, test |

Each file holds one uint8 tensor `[N, C, H, W]`, saved as a non-contiguous
view of NHWC storage (`torch.tensor(nhwc).permute(0, 3, 1, 2)`). The files
are large (CelebA-HQ's training file is 27,000 x 3 x 256 x 256 bytes =
5.3 GB), so they are never loaded: `read_reference_images` unpickles the
file's small pickle with `rflow_tf.torch_format`'s restricted unpickler (the
converter's; anything but tensors is refused with `UnsafeCheckpointError`
before it runs) and memory-maps the stored bytes; `array_dataset` streams
chunks of that map into `tf.data`.

The reference's `CelebA5bit` tests on the first 5,000 images of its one file
but trains on all of them, test images included. Here `train` is the images
after the first `CELEBA_5BIT_N_TEST`, so the two splits are disjoint.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from rflow_tf import torch_format
from rflow_tf.data.errors import DatasetFormatError

#: `{dataset: {split: path under the authors' data/ folder}}`.
REFERENCE_PTH_FILES: Dict[str, Dict[str, str]] = {
    'celeb_a_hq': {
        'train': os.path.join('celebahq', 'celeba256_train.pth'),
        'test': os.path.join('celebahq', 'celeba256_validation.pth'),
    },
    'celeba_5bit': {
        'train': os.path.join('celebahq64_5bit', 'celeba_full_64x64_5bit.pth'),
        'test': os.path.join('celebahq64_5bit', 'celeba_full_64x64_5bit.pth'),
    },
    'imagenet32': {
        'train': os.path.join('imagenet32', 'train_32x32.pth'),
        'test': os.path.join('imagenet32', 'valid_32x32.pth'),
    },
    'imagenet64': {
        'train': os.path.join('imagenet64', 'train_64x64.pth'),
        'test': os.path.join('imagenet64', 'valid_64x64.pth'),
    },
}

#: CelebA 5-bit: the first this many images of the file are the test split.
CELEBA_5BIT_N_TEST = 5000

#: How the reference's preprocessing makes each dataset's files (for messages).
REFERENCE_PTH_HELP = {
    'celeb_a_hq': (
        "the authors' preprocessing/extract_celeba_from_tfrecords.py writes them from Glow's "
        'celeba-tfr TFRecords (which this loader can also read directly)'
    ),
    'celeba_5bit': (
        "download the 64x64 5-bit CelebA-HQ .npy files of Flow++ "
        '(https://github.com/aravindsrinivas/flowpp/tree/master/flows_celeba) and convert '
        "them with the authors' preprocessing/convert_to_pth.py"
    ),
    'imagenet32': (
        "the authors' preprocessing/create_imagenet_benchmark_datasets.py and "
        'convert_to_pth.py write them from ImageNet'
    ),
    'imagenet64': (
        "the authors' preprocessing/create_imagenet_benchmark_datasets.py and "
        'convert_to_pth.py write them from ImageNet'
    ),
}


def reference_pth_path(data_dir: str, name: str, split: str) -> str:
    """The path of dataset `name`'s `split` file under the authors' `data/` folder.

    #### Examples

    ```python
    reference_pth_path('/work/data', 'imagenet32', 'test')
    # '/work/data/imagenet32/valid_32x32.pth'
    ```
    """
    return os.path.join(data_dir, REFERENCE_PTH_FILES[name][split])


def read_reference_images(
    path: str, image_shape: Tuple[int, int, int], max_value: int = 255
) -> np.ndarray:
    """The images of one of the authors' `.pth` files as a read-only NHWC array.

    The array is a view of a memory map of the file: nothing is read until
    its elements are used, and then only those pages. The pickle is read
    with the restricted unpickler of `rflow_tf.torch_format` (the
    converter's), which refuses any global beyond what tensors need.

    Args:
      path: A `.pth` file written by `torch.save` (zip or legacy format).
      image_shape: `(H, W, C)` every image must have.
      max_value: Largest pixel value the dataset may hold (31 for 5-bit
        data); the first image is checked against it.

    Returns:
      A uint8 array `[N, H, W, C]` (a strided view of the file).

    Raises:
      FileNotFoundError: no file at `path`.
      rflow_tf.torch_format.UnsafeCheckpointError: the pickle names a global
        that is not needed to rebuild a tensor (nothing was executed).
      DatasetFormatError: not a `torch.save` file, or not one uint8 tensor
        `[N, C, H, W]` (or `[N, H, W, C]`) of the expected size and range.

    #### Examples

    ```python
    import pathlib
    import numpy as np
    import rflow_tf
    from rflow_tf.data.reference_pth import read_reference_images

    # The repository's few-image copy of the authors' data/ folder.
    data = pathlib.Path(rflow_tf.__file__).parents[1] / "tests/data/reference-data"
    images = read_reference_images(str(data / "imagenet32/valid_32x32.pth"), (32, 32, 3))
    images.shape       # (3, 32, 32, 3) here, (50000, ...) for the real file; nothing read yet
    batch = np.ascontiguousarray(images[:2])
    assert images.dtype == np.uint8 and batch.shape == (2, 32, 32, 3)
    ```
    """
    h, w, c = image_shape
    try:
        tensor = torch_format.read_checkpoint(path, mmap=True)
    except torch_format.CheckpointFormatError as e:
        raise DatasetFormatError(f'{path}: not a readable torch.save file ({e}).') from None
    if not isinstance(tensor, np.ndarray):
        raise DatasetFormatError(
            f'{path}: holds a {type(tensor).__name__}, not a single image tensor '
            f'[N, {c}, {h}, {w}] as the reference writes.'
        )
    if tensor.dtype != np.uint8:
        raise DatasetFormatError(
            f'{path}: the tensor has type {tensor.dtype}; the reference stores uint8 pixels.'
        )
    if tensor.ndim == 4 and tensor.shape[1:] == (c, h, w):
        images = tensor.transpose(0, 2, 3, 1)
    elif tensor.ndim == 4 and tensor.shape[1:] == (h, w, c):
        images = tensor
    else:
        raise DatasetFormatError(
            f'{path}: the tensor has shape {list(tensor.shape)}; expected [N, {c}, {h}, {w}] '
            f'(the reference layout) or [N, {h}, {w}, {c}].'
        )
    if len(images) and int(images[0].max()) > max_value:
        raise DatasetFormatError(
            f'{path}: pixel values up to {int(images[0].max())} in the first image; this '
            f'dataset holds values 0..{max_value}.'
        )
    return images


def reference_split_range(name: str, split: str, n_images: int, path: str = '') -> Tuple[int, int]:
    """`(start, stop)` of `split`'s images among the `n_images` of its file.

    Every dataset has a file per split, except `celeba_5bit`: its test split
    is the first `CELEBA_5BIT_N_TEST` images and its training split the rest
    (disjoint, unlike the reference's).

    Raises:
      DatasetFormatError: a `celeba_5bit` file with no image left for training.

    #### Examples

    ```python
    reference_split_range('celeba_5bit', 'train', 30000)   # (5000, 30000)
    reference_split_range('imagenet32', 'test', 50000)     # (0, 50000)
    ```
    """
    if name != 'celeba_5bit':
        return 0, n_images
    n_test = CELEBA_5BIT_N_TEST
    if n_images <= n_test:
        raise DatasetFormatError(
            f'{path}: holds {n_images} images, but the first {n_test} are the test split; '
            'none is left for training.'
        )
    return (n_test, n_images) if split == 'train' else (0, n_test)


def array_dataset(
    images: np.ndarray,
    start: int,
    stop: int,
    *,
    shuffle: bool,
    seed: Optional[int],
    input_context: Optional[tf.distribute.InputContext] = None,
    chunk: int = 64,
) -> tf.data.Dataset:
    """A dataset of single images `images[start:stop]`, read in chunks.

    `images` is an NHWC array, typically the memory map of
    `read_reference_images`. The range is cut into chunks of `chunk`
    consecutive images; each chunk is copied out of the array when the
    pipeline needs it (in parallel), so memory holds only the chunks in
    flight. With `shuffle` the chunk order is reshuffled every epoch (shuffle
    the images afterwards too, as `load_image_dataset` does). With an
    `input_context` of several pipelines, pipeline `i` reads chunks
    `i, i + n, ...` only: each worker reads its own parts of the file.

    #### Examples

    ```python
    import pathlib
    import numpy as np
    import rflow_tf
    from rflow_tf.data.reference_pth import array_dataset, read_reference_images

    data = pathlib.Path(rflow_tf.__file__).parents[1] / "tests/data/reference-data"
    images = read_reference_images(str(data / "imagenet32/train_32x32.pth"), (32, 32, 3))
    ds = array_dataset(images, 1, len(images), shuffle=False, seed=None)   # all but the first
    streamed = np.stack([x.numpy() for x in ds])
    assert np.array_equal(streamed, images[1:])
    ```
    """
    h, w, c = images.shape[1:]
    n = int(stop) - int(start)
    n_chunks = max(1, math.ceil(n / chunk))
    if input_context is not None and input_context.num_input_pipelines > 1:
        if n_chunks < input_context.num_input_pipelines:
            chunk = max(1, n // input_context.num_input_pipelines)
            n_chunks = math.ceil(n / chunk)
    index = tf.data.Dataset.range(n_chunks)
    if input_context is not None and input_context.num_input_pipelines > 1:
        index = index.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle and n_chunks > 1:
        index = index.shuffle(n_chunks, seed=seed, reshuffle_each_iteration=True)

    def read(i):
        lo = int(start) + int(i) * chunk
        return np.ascontiguousarray(images[lo : min(lo + chunk, int(stop))])

    def read_op(i):
        out = tf.numpy_function(read, [i], tf.uint8, stateful=False)
        return tf.ensure_shape(out, [None, h, w, c])

    ds = index.map(read_op, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.unbatch()
