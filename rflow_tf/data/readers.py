"""Readers of the image sources that have no module of their own: TFDS,
ImageNet `.npz` files and scikit-learn's digits (Glow's TFRecords are read by
`rflow_tf.data.glow`, the authors' `.pth` files by `rflow_tf.data.reference_pth`).

Each reader returns single `uint8` images (or `(image, label)` pairs);
`rflow_tf.data.images.load_image_dataset` batches and augments them:

* `tfds_dataset`: a TFDS dataset, downloaded if allowed (an unreachable
  network is reported within seconds: `raise_if_offline`).
* `npz_dataset`: bring-your-own ImageNet `.npz` files.
* `digits_split`: scikit-learn's digits (offline).

Also here, for `rflow_tf.data.sources.locate_source`: where the files of these
sources are (`default_data_dir`, `npz_files`, `tfds_available`) and how to get
them when they are missing (`tfds_help`, `npz_help`).
"""

from __future__ import annotations

import glob
import os
import zipfile
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from rflow_tf.data import glow
from rflow_tf.data._checks import one_line
from rflow_tf.data.catalog import DIGITS_N_TEST
from rflow_tf.data.errors import DatasetFormatError, DatasetNotFoundError
from rflow_tf.data.network import DOWNLOAD_HOSTS, network_unreachable_reason

if TYPE_CHECKING:
    from rflow_tf.data.catalog import ImageDatasetInfo


def _tfds():
    """Imports tensorflow_datasets lazily (it is slow to import)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


def default_data_dir() -> str:
    """The data directory used when none is given: `$TFDS_DATA_DIR`, else
    `~/tensorflow_datasets` (user directory expanded).

    Example:
    ```python
    import os
    from rflow_tf.data.readers import default_data_dir

    expected = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    assert default_data_dir() == os.path.expanduser(expected)
    ```
    """
    env = os.environ.get('TFDS_DATA_DIR')
    if env:
        return os.path.expanduser(env)
    return os.path.expanduser(os.path.join('~', 'tensorflow_datasets'))


_DIGITS_CACHE = {}


def digits_split(is_train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as (uint8 [N, 8, 8, 1], int64 labels [N]); the last
    297 images are test. Pixels 0..16 are scaled to 0..255: round(v * 255 / 16).

    Args:
      is_train: the first 1,500 images (True) or the last 297 (False).

    Returns:
      ``(images, labels)``, NumPy arrays.

    Example:
    ```python
    import numpy as np
    from rflow_tf.data.readers import digits_split

    train_x, train_y = digits_split(is_train=True)
    test_x, test_y = digits_split(is_train=False)
    assert train_x.shape == (1500, 8, 8, 1) and test_x.shape == (297, 8, 8, 1)
    assert train_x.dtype == np.uint8 and train_x.max() == 255
    assert sorted(set(test_y.tolist())) == list(range(10))
    ```
    """
    if 'all' not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        bunch = load_digits()
        raw = bunch.images  # [1797, 8, 8] float64, values 0..16
        imgs = np.round(raw * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        _DIGITS_CACHE['all'] = (imgs[..., None], bunch.target.astype(np.int64))
    imgs, labels = _DIGITS_CACHE['all']
    n_train = len(imgs) - DIGITS_N_TEST
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
    'data1024x1024.tar)"; only data256x256.tar is needed here.'
)


def tfds_help(info: ImageDatasetInfo, data_dir: str, manual_dir: str) -> str:
    """How to get TFDS dataset `info` when it is missing: a download (or, for
    CelebA-HQ, the manual-download file TFDS prepares it from).

    Args:
      info: the dataset's `ImageDatasetInfo` (`rflow_tf.data.dataset_info`).
      data_dir: the TFDS data directory looked in.
      manual_dir: the directory of manually downloaded files.

    Returns:
      Instructions, one paragraph.

    Example:
    ```python
    from rflow_tf.data import dataset_info
    from rflow_tf.data.readers import tfds_help

    text = tfds_help(dataset_info("mnist"), "data", "data/downloads/manual")
    assert "download=True" in text and "tfds build mnist" in text
    assert "data256x256.tar" in tfds_help(dataset_info("celeb_a_hq"), "data", "manual")
    ```
    """
    if info.name == 'celeb_a_hq':
        return _CELEBA_HQ_HELP.format(manual_dir=manual_dir)
    return (
        f'To get it, rerun with download=True on a machine with network access '
        f'(TFDS downloads it into data_dir), or prepare it elsewhere with '
        f'`tfds build {info.tfds_name} --data_dir=DIR` / '
        f'`tfds.load("{info.tfds_name}", data_dir=DIR)`, copy DIR here and '
        f'pass data_dir=DIR (--data_dir DIR on the command line).'
    )


def _tfds_is_prepared(tfds, tfds_name: str, data_dir: Optional[str]) -> bool:
    try:
        return bool(tfds.builder(tfds_name, data_dir=data_dir).is_prepared())
    except Exception:  # pylint: disable=broad-except
        return False


def tfds_dataset(
    info: ImageDatasetInfo,
    split: str,
    data_dir: Optional[str],
    download: bool,
    shuffle: bool,
    seed: Optional[int],
    manual_dir: Optional[str],
    with_labels: bool = False,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Loads `info.tfds_name` as a dataset of single uint8 images (with
    `with_labels`: of (image, label) pairs). With an `input_context`, TFDS
    shards by file over its input pipelines. Data already prepared is read
    without a download attempt; otherwise, with `download`, TFDS downloads and
    prepares it (CelebA-HQ from the manual directory).

    Args:
      info: the dataset's `ImageDatasetInfo` (`rflow_tf.data.dataset_info`).
      split: a TFDS split name, e.g. "train" or "test".
      data_dir: the TFDS data directory (None: TFDS's default).
      download: download and prepare the data if it is not there.
      shuffle: shuffle the files (seeded by `seed`).
      seed: the file-shuffle seed.
      manual_dir: where manually downloaded files are (None: TFDS's default).
      with_labels: (image, label) pairs instead of images.
      input_context: a `tf.distribute.InputContext`, to shard by file.

    Returns:
      A `tf.data.Dataset` of uint8 images [H, W, C] (or pairs), unbatched.

    Raises:
      DatasetNotFoundError: the data is not there and cannot be downloaded;
        the message says how to get it.

    Example:
    ```python
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from rflow_tf.data import dataset_info
    from rflow_tf.data.readers import tfds_dataset

    with tfds.testing.mock_data(num_examples=4):  # offline: TFDS's stand-in for MNIST
        ds = tfds_dataset(dataset_info("mnist"), "train", data_dir="tfds", download=False,
                          shuffle=False, seed=None, manual_dir=None, with_labels=True)
        image, label = next(iter(ds))
    assert image.dtype == tf.uint8 and image.shape == (28, 28, 1) and label.dtype == tf.int64
    ```
    """
    tfds = _tfds()
    shown_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    if manual_dir is None:
        manual_dir = os.path.join(shown_dir, 'downloads', 'manual')
    manual_dir = os.path.expanduser(manual_dir)
    read_config = tfds.ReadConfig(
        shuffle_seed=seed, try_autocache=False, input_context=input_context
    )
    kwargs = dict(split=split, data_dir=data_dir, shuffle_files=shuffle, read_config=read_config)
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
                f'{what}: could not read split {split!r} from {shown_dir}: {one_line(e)}'
            ) from None
        first_error = e
        ds = None

    if ds is None:
        if not download:
            raise DatasetNotFoundError(
                f'{what} not found: no prepared data in data_dir={shown_dir} '
                f'(looked for {os.path.join(shown_dir, info.tfds_name)}) and '
                f'download=False. '
                + tfds_help(info, shown_dir, manual_dir)
                + f' [{one_line(first_error)}]'
            ) from None

        download_kwargs = {}
        if info.name == 'celeb_a_hq':
            tar_name = 'data%dx%d.tar' % info.image_shape[:2]
            tar_path = os.path.join(manual_dir, tar_name)
            if not tf.io.gfile.exists(tar_path):
                raise DatasetNotFoundError(
                    f'{what} not found: no prepared data in data_dir={shown_dir} and '
                    f'the manual-download file {tar_name} is missing (looked for '
                    f'{tar_path}). ' + tfds_help(info, shown_dir, manual_dir)
                ) from None
            download_kwargs['download_config'] = tfds.download.DownloadConfig(manual_dir=manual_dir)
        else:
            raise_if_offline(info, shown_dir, manual_dir)
        try:
            ds = tfds.load(
                info.tfds_name, download=True, download_and_prepare_kwargs=download_kwargs, **kwargs
            )
        except Exception as e:  # pylint: disable=broad-except
            raise DatasetNotFoundError(
                f'{what} not found in data_dir={shown_dir} and downloading/'
                f'preparing it failed (no network?): {one_line(e)}. '
                + tfds_help(info, shown_dir, manual_dir)
            ) from None

    if with_labels:
        return ds.map(lambda ex: (ex['image'], ex['label']), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda ex: ex['image'], num_parallel_calls=tf.data.AUTOTUNE)


def raise_if_offline(info: ImageDatasetInfo, shown_dir: str, manual_dir: str) -> None:
    """Raises `DatasetNotFoundError` at once when a TFDS download of `info`
    cannot reach its server (`rflow_tf.data.network`), instead of minutes of
    download retries.

    Args:
      info: the dataset's `ImageDatasetInfo`.
      shown_dir: the data directory the message names.
      manual_dir: the directory of manually downloaded files (for the message).

    Raises:
      DatasetNotFoundError: the network is unreachable; the message says why
        and how to get the data otherwise.

    Example:
    ```python
    from rflow_tf.data import DatasetNotFoundError, dataset_info
    from rflow_tf.data.readers import raise_if_offline

    try:
        raise_if_offline(dataset_info("mnist"), "data", "data/downloads/manual")
        print("the download server of mnist is reachable")
    except DatasetNotFoundError as error:
        assert "network is unreachable" in str(error)
    ```
    """
    host = DOWNLOAD_HOSTS.get(info.name, 'storage.googleapis.com')
    reason = network_unreachable_reason(host)
    if reason:
        raise DatasetNotFoundError(
            f'Dataset {info.name!r} (TFDS {info.tfds_name!r}) is not in data_dir={shown_dir} '
            f'and cannot be downloaded: the network is unreachable ({reason}). '
            + tfds_help(info, shown_dir, manual_dir)
        )


def tfds_available(info: ImageDatasetInfo, data_dir: Optional[str]) -> bool:
    """Whether TFDS serves dataset `info` without a download (prepared in
    `data_dir`, or mocked in tests).

    Args:
      info: the dataset's `ImageDatasetInfo`.
      data_dir: the TFDS data directory (None: TFDS's default).

    Returns:
      True if `tfds.load(..., download=False)` reads its training split.

    Example:
    ```python
    import tensorflow_datasets as tfds
    from rflow_tf.data import dataset_info
    from rflow_tf.data.readers import tfds_available

    assert not tfds_available(dataset_info("mnist"), data_dir="empty")
    with tfds.testing.mock_data(num_examples=4):  # TFDS's offline stand-in
        assert tfds_available(dataset_info("mnist"), data_dir="empty")
    ```
    """
    tfds = _tfds()
    if _tfds_is_prepared(tfds, info.tfds_name, data_dir):
        return True
    try:
        tfds.load(info.tfds_name, split=info.train_split, data_dir=data_dir, download=False)
        return True
    except Exception:  # pylint: disable=broad-except
        return False


# ----------------------------------------------------------------------------
# Bring-your-own ImageNet .npz files.
# ----------------------------------------------------------------------------

_NPZ_CHUNK = 4096


def npz_files(
    info: ImageDatasetInfo, is_train: bool, data_dir: Optional[str]
) -> Tuple[str, Sequence[str]]:
    """The `.npz` files of one split of `info`: `<data_dir>/<name>/train*.npz`
    or `val*.npz`.

    Args:
      info: the dataset's `ImageDatasetInfo` (imagenet32 or imagenet64).
      is_train: the training files (True) or the validation files (False).
      data_dir: the data directory (None: `default_data_dir()`).

    Returns:
      `(pattern, files)`: the glob pattern and the sorted paths matching it.

    Example:
    ```python
    import os
    import numpy as np
    from rflow_tf.data import dataset_info
    from rflow_tf.data.readers import npz_files

    os.makedirs("data/imagenet32")
    np.savez("data/imagenet32/train_data_batch_1.npz", data=np.zeros([1, 32, 32, 3], np.uint8))
    pattern, files = npz_files(dataset_info("imagenet32"), is_train=True, data_dir="data")
    assert pattern == os.path.join("data", "imagenet32", "train*.npz")
    assert files == [os.path.join("data", "imagenet32", "train_data_batch_1.npz")]
    ```
    """
    root = os.path.expanduser(data_dir) if data_dir else default_data_dir()
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
                raise DatasetFormatError(f'{path}: no array named "data" (keys: {keys}).')
            with zf.open('data.npy') as fp:
                version = np.lib.format.read_magic(fp)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetFormatError(f'{path}: not a readable .npz file ({one_line(e)}).') from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _npz_layout(
    path: str, shape: Tuple[int, ...], dtype: np.dtype, image_shape: Tuple[int, int, int]
) -> str:
    """Returns 'nhwc', 'nchw' or 'flat' for a valid array, else raises."""
    h, w, c = image_shape
    if dtype != np.uint8:
        raise DatasetFormatError(f'{path}: "data" must be uint8, got {dtype}.')
    if len(shape) == 4 and shape[1:] == (h, w, c):
        return 'nhwc'
    if len(shape) == 4 and shape[1:] == (c, h, w):
        return 'nchw'
    if len(shape) == 2 and shape[1] == h * w * c:
        return 'flat'
    raise DatasetFormatError(
        f'{path}: "data" has shape {shape}; expected [N, {h}, {w}, {c}], '
        f'[N, {c}, {h}, {w}] or the flattened [N, {h * w * c}].'
    )


def _npz_to_nhwc(arr: np.ndarray, image_shape: Tuple[int, int, int]):
    h, w, c = image_shape
    if arr.ndim == 2:
        arr = arr.reshape(-1, c, h, w)
    if arr.shape[1:] == (c, h, w) and arr.shape[1:] != (h, w, c):
        arr = arr.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(arr)


def npz_help(info: ImageDatasetInfo) -> str:
    """What ImageNet `.npz` files dataset `info` reads, where to get them and
    where to put them.

    Args:
      info: the dataset's `ImageDatasetInfo` (imagenet32 or imagenet64).

    Returns:
      Instructions, one paragraph.

    Example:
    ```python
    from rflow_tf.data import dataset_info
    from rflow_tf.data.readers import npz_help

    text = npz_help(dataset_info("imagenet64"))
    assert text.startswith("ImageNet 64x64 .npz files")
    assert "<data_dir>/imagenet64/train*.npz" in text
    ```
    """
    h, w, _ = info.image_shape
    return (
        f'ImageNet {h}x{w} .npz files: a uint8 array under key "data", either '
        f'[N, {h}, {w}, 3] or the official "Downsampled ImageNet {h}x{w} (npz format)" '
        f'layout [N, {3 * h * w}] (R plane, G plane, B plane; as in Imagenet{h}_train_npz: '
        f'train_data_batch_1.npz .. train_data_batch_10.npz and Imagenet{h}_val_npz: '
        f'val_data.npz, from the ImageNet website after login). Put the training files '
        f'at <data_dir>/{info.name}/train*.npz and the validation files at '
        f'<data_dir>/{info.name}/val*.npz (e.g. val_data.npz or valid_*.npz).'
    )


def npz_dataset(
    info: ImageDatasetInfo,
    is_train: bool,
    data_dir: Optional[str],
    shuffle: bool,
    seed: Optional[int],
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Streams images from user-supplied ImageNet .npz files (sharded by file
    over the pipelines of an `input_context`). Each file holds a uint8 array
    "data", [N, H, W, 3] or the official flattened [N, 3 H W] (R, G, B planes);
    every file is checked before the first image is read.

    Args:
      info: the dataset's `ImageDatasetInfo` (imagenet32 or imagenet64).
      is_train: read `<data_dir>/<name>/train*.npz` (True) or `val*.npz` (False).
      data_dir: the data directory (None: the default).
      shuffle: shuffle the file order (seeded by `seed`).
      seed: the shuffle seed.
      input_context: a `tf.distribute.InputContext`, to shard by file.

    Returns:
      A `tf.data.Dataset` of uint8 images [H, W, 3], unbatched.

    Raises:
      DatasetNotFoundError: no files; the message says where to put them.
      DatasetFormatError: a file of the wrong layout.

    Example:
    ```python
    import os
    import numpy as np
    from rflow_tf.data import dataset_info
    from rflow_tf.data.readers import npz_dataset

    os.makedirs("data/imagenet32")
    planes = np.arange(2 * 3 * 32 * 32).astype(np.uint8).reshape(2, 3 * 32 * 32)
    np.savez("data/imagenet32/val_data.npz", data=planes)  # the official layout
    ds = npz_dataset(dataset_info("imagenet32"), is_train=False, data_dir="data",
                     shuffle=False, seed=None)
    images = np.stack(list(ds.as_numpy_iterator()))
    assert images.shape == (2, 32, 32, 3)
    assert np.array_equal(images[..., 0], planes[:, :1024].reshape(2, 32, 32))  # red plane
    ```
    """
    pattern, files = npz_files(info, is_train, data_dir)
    h, w, c = info.image_shape
    if not files:
        split_name = 'train' if is_train else 'validation/test'
        raise DatasetNotFoundError(
            f'Dataset {info.name!r} ({split_name} split) not found: no files '
            f'matching {pattern} (data_dir='
            f'{os.path.expanduser(data_dir) if data_dir else default_data_dir()}'
            f'). ImageNet {h}x{w} is bring-your-own-files (the TFDS '
            f'downsampled_imagenet download is dead). Provide '
            + npz_help(info)
            + ' Then pass data_dir=<data_dir>.'
        )
    for path in files:  # Validate everything up front: no errors mid-epoch.
        shape, dtype = _npz_data_shape(path)
        _npz_layout(path, shape, dtype, info.image_shape)
    files = glow.files_for_worker(files, input_context, f'.npz file(s) matching {pattern}')

    def gen(path):
        path = path.decode() if isinstance(path, bytes) else str(path)
        with np.load(path) as f:
            arr = _npz_to_nhwc(f['data'], info.image_shape)
        for i in range(0, len(arr), _NPZ_CHUNK):
            yield arr[i : i + _NPZ_CHUNK]

    spec = tf.TensorSpec([None, h, w, c], tf.uint8)

    def read_file(path):
        return tf.data.Dataset.from_generator(gen, args=(path,), output_signature=spec).unbatch()

    files_ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle and len(files) > 1:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return files_ds.interleave(read_file, cycle_length=min(2, len(files)), block_length=16)
