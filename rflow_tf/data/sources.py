"""Where raw images come from: scikit-learn digits, TFDS and ImageNet `.npz` files.

Each reader returns a `tf.data.Dataset` of single `uint8` images (or
`(image, label)` pairs); `rflow_tf.data.images.load_image_dataset` batches and
augments them. Data that is missing raises `DatasetNotFoundError`, whose
message says what is missing, where it was looked for and how to get it.
"""

from __future__ import annotations

import glob
import os
import zipfile
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from rflow_tf.data._checks import _one_line

if TYPE_CHECKING:
    from rflow_tf.data.images import ImageDatasetInfo


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


_DIGITS_N_TEST = 297


def _tfds():
    """Imports tensorflow_datasets lazily (it is slow to import)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


def _default_data_dir() -> str:
    env = os.environ.get('TFDS_DATA_DIR')
    if env:
        return os.path.expanduser(env)
    return os.path.expanduser(os.path.join('~', 'tensorflow_datasets'))


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
    'data1024x1024.tar)"; only data256x256.tar is needed here.'
)


def _tfds_help(info: ImageDatasetInfo, data_dir: str, manual_dir: str) -> str:
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


def _tfds_dataset(
    info: ImageDatasetInfo,
    split: str,
    data_dir: Optional[str],
    download: bool,
    shuffle: bool,
    seed: Optional[int],
    manual_dir: Optional[str],
    with_labels: bool = False,
) -> tf.data.Dataset:
    """Loads `info.tfds_name` as a dataset of single uint8 images (with
    `with_labels`: of (image, label) pairs)."""
    tfds = _tfds()
    shown_dir = os.path.expanduser(data_dir) if data_dir else _default_data_dir()
    if manual_dir is None:
        manual_dir = os.path.join(shown_dir, 'downloads', 'manual')
    manual_dir = os.path.expanduser(manual_dir)
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
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
                f'{what}: could not read split {split!r} from {shown_dir}: {_one_line(e)}'
            ) from None
        first_error = e
        ds = None

    if ds is None:
        if not download:
            raise DatasetNotFoundError(
                f'{what} not found: no prepared data in data_dir={shown_dir} '
                f'(looked for {os.path.join(shown_dir, info.tfds_name)}) and '
                f'download=False. '
                + _tfds_help(info, shown_dir, manual_dir)
                + f' [{_one_line(first_error)}]'
            ) from None

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
            download_kwargs['download_config'] = tfds.download.DownloadConfig(manual_dir=manual_dir)
        try:
            ds = tfds.load(
                info.tfds_name, download=True, download_and_prepare_kwargs=download_kwargs, **kwargs
            )
        except Exception as e:  # pylint: disable=broad-except
            raise DatasetNotFoundError(
                f'{what} not found in data_dir={shown_dir} and downloading/'
                f'preparing it failed (no network?): {_one_line(e)}. '
                + _tfds_help(info, shown_dir, manual_dir)
            ) from None

    if with_labels:
        return ds.map(lambda ex: (ex['image'], ex['label']), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda ex: ex['image'], num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Bring-your-own ImageNet .npz files.
# ----------------------------------------------------------------------------

_NPZ_CHUNK = 4096


def _npz_files(
    info: ImageDatasetInfo, is_train: bool, data_dir: Optional[str]
) -> Tuple[str, Sequence[str]]:
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
        raise ValueError(f'{path}: not a readable .npz file ({_one_line(e)}).') from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _npz_layout(
    path: str, shape: Tuple[int, ...], dtype: np.dtype, image_shape: Tuple[int, int, int]
) -> str:
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
        f'[N, {c}, {h}, {w}] or the flattened [N, {h * w * c}].'
    )


def _npz_to_nhwc(arr: np.ndarray, image_shape: Tuple[int, int, int]):
    h, w, c = image_shape
    if arr.ndim == 2:
        arr = arr.reshape(-1, c, h, w)
    if arr.shape[1:] == (c, h, w) and arr.shape[1:] != (h, w, c):
        arr = arr.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(arr)


def _npz_dataset(
    info: ImageDatasetInfo,
    is_train: bool,
    data_dir: Optional[str],
    shuffle: bool,
    seed: Optional[int],
) -> tf.data.Dataset:
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
            f'valid_*.npz), then pass data_dir=<data_dir>.'
        )
    for path in files:  # Validate everything up front: no errors mid-epoch.
        shape, dtype = _npz_data_shape(path)
        _npz_layout(path, shape, dtype, info.image_shape)

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
