"""Where raw images come from: scikit-learn digits, Glow's TFRecords, the
authors' `.pth` files, ImageNet `.npz` files and TFDS.

`locate_source` decides, before any slow work, which of a dataset's sources
holds its data (`DataSource`: what is read from where, and what its test
split is); data that is missing raises `DatasetNotFoundError`, whose message
names every place looked in and how to get the data. Each reader returns a
`tf.data.Dataset` of single `uint8` images (or `(image, label)` pairs);
`rflow_tf.data.images.load_image_dataset` batches and augments them.

Sources, in the order they are tried:

* `celeb_a_hq`: Glow's `celeba-tfr` TFRecords (`rflow_tf.data.glow`; the
  paper's split), the authors' `.pth` files (`rflow_tf.data.reference_pth`;
  the same split), then TFDS `celeb_a_hq/256` (our own 90/10 split of its
  single split: not the paper's test set).
* `celeba_5bit`: the authors' `.pth` file.
* `imagenet32` / `imagenet64`: the authors' `.pth` files, then `.npz` files.
* `mnist`, `cifar10`, `svhn_cropped`: TFDS (downloaded if allowed; an
  unreachable network is reported within seconds, `network_unreachable_reason`).
* `digits`: scikit-learn (offline).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings
import zipfile
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from rflow_tf.data import glow, reference_pth
from rflow_tf.data._checks import one_line
from rflow_tf.data.catalog import DIGITS_N_TEST
from rflow_tf.data.errors import DatasetFormatError, DatasetNotFoundError
from rflow_tf.data.network import (  # noqa: F401  (NETWORK_TIMEOUT re-exported)
    DOWNLOAD_HOSTS,
    NETWORK_TIMEOUT,
    network_unreachable_reason,
)

if TYPE_CHECKING:
    from rflow_tf.data.catalog import ImageDatasetInfo


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
    from rflow_tf.data.sources import digits_split

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
    from rflow_tf.data.sources import tfds_dataset

    with tfds.testing.mock_data(num_examples=4):  # offline: TFDS's stand-in for MNIST
        ds = tfds_dataset(dataset_info("mnist"), "train", data_dir="tfds", download=False,
                          shuffle=False, seed=None, manual_dir=None, with_labels=True)
        image, label = next(iter(ds))
    assert image.dtype == tf.uint8 and image.shape == (28, 28, 1) and label.dtype == tf.int64
    ```
    """
    tfds = _tfds()
    shown_dir = os.path.expanduser(data_dir) if data_dir else _default_data_dir()
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
                + _tfds_help(info, shown_dir, manual_dir)
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
                    f'{tar_path}). ' + _tfds_help(info, shown_dir, manual_dir)
                ) from None
            download_kwargs['download_config'] = tfds.download.DownloadConfig(manual_dir=manual_dir)
        else:
            _raise_if_offline(info, shown_dir, manual_dir)
        try:
            ds = tfds.load(
                info.tfds_name, download=True, download_and_prepare_kwargs=download_kwargs, **kwargs
            )
        except Exception as e:  # pylint: disable=broad-except
            raise DatasetNotFoundError(
                f'{what} not found in data_dir={shown_dir} and downloading/'
                f'preparing it failed (no network?): {one_line(e)}. '
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


def _npz_help(info: ImageDatasetInfo) -> str:
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
    from rflow_tf.data.sources import npz_dataset

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
    pattern, files = _npz_files(info, is_train, data_dir)
    h, w, c = info.image_shape
    if not files:
        split_name = 'train' if is_train else 'validation/test'
        raise DatasetNotFoundError(
            f'Dataset {info.name!r} ({split_name} split) not found: no files '
            f'matching {pattern} (data_dir='
            f'{os.path.expanduser(data_dir) if data_dir else _default_data_dir()}'
            f'). ImageNet {h}x{w} is bring-your-own-files (the TFDS '
            f'downsampled_imagenet download is dead). Provide '
            + _npz_help(info)
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


# ----------------------------------------------------------------------------
# Network reachability: fail in seconds instead of minutes of download retries.
# ----------------------------------------------------------------------------


def _raise_if_offline(info: ImageDatasetInfo, shown_dir: str, manual_dir: str) -> None:
    """Raises DatasetNotFoundError at once when a download of `info` cannot reach its server."""
    host = DOWNLOAD_HOSTS.get(info.name, 'storage.googleapis.com')
    reason = network_unreachable_reason(host)
    if reason:
        raise DatasetNotFoundError(
            f'Dataset {info.name!r} (TFDS {info.tfds_name!r}) is not in data_dir={shown_dir} '
            f'and cannot be downloaded: the network is unreachable ({reason}). '
            + _tfds_help(info, shown_dir, manual_dir)
        )


# ----------------------------------------------------------------------------
# Locating a dataset's data, before any slow work.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a dataset's images are read from, and what its two splits are.

    Returned by `rflow_tf.data.locate_image_dataset` (which raises
    `DatasetNotFoundError` instead when no source holds the data), and used
    by `load_image_dataset`. The trainer prints and records it, so that a
    result always says which images it was measured on.

    Attributes:
      dataset: Canonical dataset name (`'celeb_a_hq'`, ...).
      kind: `'glow_tfrecords'`, `'reference_pth'`, `'npz'`, `'tfds'` or
        `'sklearn'`.
      location: The folder (or TFDS directory) the data is read from.
      train_split: What the `'train'` split is.
      test_split: What the `'test'` split is.
      paper_test_split: Whether the `'test'` split is the test set results
        are published on (the paper's, or the dataset's standard one).
        `False` for TFDS CelebA-HQ, whose `'test'` is our own 10% of TFDS's
        single split: call its bits/dim "held-out", never "test".
      warnings: Problems that do not stop reading (missing Glow shards).
      needs_download: TFDS will download or prepare the data on first use.

    #### Examples

    ```python
    import os
    from rflow_tf.data import locate_image_dataset

    for folder in ("train", "validation"):     # Glow's layout (the files are not read here)
        os.makedirs(f"celeba-tfr/{folder}")
        open(f"celeba-tfr/{folder}/{folder}-r08-s-0000-of-0001.tfrecords", "wb").close()
    source = locate_image_dataset("celeb_a_hq", data_dir="celeba-tfr")
    assert (source.kind, source.paper_test_split) == ("glow_tfrecords", True)
    print(source.describe())
    ```
    """

    dataset: str
    kind: str
    location: str
    train_split: str
    test_split: str
    paper_test_split: bool = True
    warnings: Tuple[str, ...] = ()
    needs_download: bool = False

    @property
    def eval_name(self) -> str:
        """What to call bits/dim on the `'test'` split: `'test'` or `'held-out'`.

        #### Examples

        ```python
        from rflow_tf.data import locate_image_dataset
        from rflow_tf.data.sources import DataSource

        source, bpd = locate_image_dataset("digits"), 1.9876
        print(f"{source.eval_name} bits/dim: {bpd:.4f}")    # test bits/dim: 1.9876
        held_out = DataSource("celeb_a_hq", "tfds", "~/tensorflow_datasets",
                              "90% of TFDS's split", "the other 10%", paper_test_split=False)
        assert (source.eval_name, held_out.eval_name) == ("test", "held-out")
        ```
        """
        return 'test' if self.paper_test_split else 'held-out'

    def describe(self) -> str:
        """One line: the dataset, its source and both splits.

        #### Examples

        ```python
        from rflow_tf.data import locate_image_dataset

        line = locate_image_dataset("digits").describe()
        print(line)   # "digits from scikit-learn's bundled digits (...): train = ...; test = ..."
        assert line.startswith("digits from") and "; test = " in line
        ```
        """
        return (
            f'{self.dataset} from {_KIND_NAMES[self.kind]} ({self.location}): '
            f'train = {self.train_split}; {self.eval_name} = {self.test_split}'
        )

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (the trainer writes it to results.json).

        #### Examples

        ```python
        import json
        from rflow_tf.data import locate_image_dataset

        source = locate_image_dataset("digits")
        record = json.loads(json.dumps(source.to_dict()))
        assert record["kind"] == "sklearn" and record["paper_test_split"] is True
        ```
        """
        d = dataclasses.asdict(self)
        d['warnings'] = list(self.warnings)
        d['eval_name'] = self.eval_name
        return d


_KIND_NAMES = {
    'glow_tfrecords': "Glow's TFRecords",
    'reference_pth': "the authors' .pth files",
    'npz': '.npz files',
    'tfds': 'TFDS',
    'sklearn': "scikit-learn's bundled digits",
}


def _glow_candidate(info, root: str, splits, looked: List[str]) -> Optional[DataSource]:
    for folder in glow.glow_root_candidates(root):
        shards = {
            split: glow.find_glow_shards(folder, split, info.image_shape[0])
            for split in ('train', 'test')
        }
        if all(shards[split] for split in splits):
            notes = tuple(s.missing_message() for s in shards.values() if s and s.missing)
            train, test = shards['train'], shards['test']
            return DataSource(
                dataset=info.name,
                kind='glow_tfrecords',
                location=folder,
                train_split=(
                    f"Glow's {len(train.files)} training shards ({train.folder})"
                    if train
                    else f'none (no {os.path.join(folder, "train")}/ shards)'
                ),
                test_split=(
                    f"Glow's {len(test.files)} validation shards ({test.folder}): the paper's "
                    'test set'
                    if test
                    else f'none (no {os.path.join(folder, "validation")}/ shards)'
                ),
                warnings=notes,
            )
        if any(shards.values()):
            lacking = [glow.GLOW_SPLIT_FOLDERS[s] for s in splits if not shards[s]]
            looked.append(
                f'Glow TFRecords: {folder} has no '
                + ' and no '.join(f'{d}/{d}-r08-s-*-of-*.tfrecords' for d in lacking)
            )
            return None
    looked.append(
        'Glow TFRecords: no '
        + ' and no '.join(
            f'{glow.GLOW_SPLIT_FOLDERS[s]}/{glow.GLOW_SPLIT_FOLDERS[s]}-r08-s-*-of-*.tfrecords'
            for s in splits
        )
        + ' in '
        + ', '.join(glow.glow_root_candidates(root))
    )
    return None


def _pth_candidate(info, root: str, splits, looked: List[str]) -> Optional[DataSource]:
    files = reference_pth.REFERENCE_PTH_FILES[info.name]
    paths = {split: os.path.join(root, rel) for split, rel in files.items()}
    absent = sorted({paths[s] for s in splits if not os.path.isfile(paths[s])})
    if absent:
        looked.append(f"the authors' .pth files: {', '.join(absent)} missing")
        return None
    if info.name == 'celeba_5bit':
        n_test = reference_pth.CELEBA_5BIT_N_TEST
        name = os.path.basename(paths['test'])
        train = f'the images after the first {n_test:,} of {name} (disjoint from the test split)'
        test = f"the first {n_test:,} images of {name}: the reference's test set"
    else:
        train = os.path.basename(paths['train'])
        test = os.path.basename(paths['test'])
        test += (
            ": the paper's test set (Glow's validation images)"
            if info.name == 'celeb_a_hq'
            else ': the ImageNet validation images'
        )
    return DataSource(
        dataset=info.name,
        kind='reference_pth',
        location=root,
        train_split=train,
        test_split=test,
    )


def _npz_candidate(info, root: str, splits, looked: List[str]) -> Optional[DataSource]:
    found = {split: _npz_files(info, split == 'train', root) for split in ('train', 'test')}
    absent = [found[s][0] for s in splits if not found[s][1]]
    if absent:
        looked.append(f'.npz files: nothing matches {" or ".join(absent)}')
        return None
    (train_pattern, train_files), (test_pattern, test_files) = found['train'], found['test']
    return DataSource(
        dataset=info.name,
        kind='npz',
        location=os.path.dirname(train_pattern),
        train_split=f'{len(train_files)} file(s) {train_pattern}',
        test_split=f'{len(test_files)} file(s) {test_pattern}: the ImageNet validation images',
    )


def _tfds_loads_without_download(tfds, info, data_dir) -> bool:
    """Whether TFDS serves the data without a download (prepared, or mocked in tests)."""
    if _tfds_is_prepared(tfds, info.tfds_name, data_dir):
        return True
    try:
        tfds.load(info.tfds_name, split=info.train_split, data_dir=data_dir, download=False)
        return True
    except Exception:  # pylint: disable=broad-except
        return False


def _tfds_candidate(
    info, data_dir: Optional[str], root: str, download: bool, manual_dir: Optional[str], looked
) -> Optional[DataSource]:
    tfds = _tfds()
    manual_dir = os.path.expanduser(manual_dir or os.path.join(root, 'downloads', 'manual'))
    if info.name == 'celeb_a_hq':
        train = f'TFDS {info.tfds_name} {info.train_split} ({info.n_train:,} images)'
        test = (
            f'TFDS {info.tfds_name} {info.test_split}: our own 90/10 split of TFDS\'s single '
            f"30,000-image split, NOT the paper's test set (its bits/dim are not comparable "
            "with the paper's)"
        )
        paper = False
    else:
        train = f'TFDS {info.tfds_name} {info.train_split!r}'
        test = f'TFDS {info.tfds_name} {info.test_split!r}'
        paper = True
    source = DataSource(
        dataset=info.name,
        kind='tfds',
        location=os.path.join(root, info.tfds_name),
        train_split=train,
        test_split=test,
        paper_test_split=paper,
    )
    if _tfds_loads_without_download(tfds, info, data_dir):
        return source
    where = f'TFDS: no prepared {info.tfds_name} in {os.path.join(root, info.tfds_name)}'
    if info.name == 'celeb_a_hq':
        tar = os.path.join(manual_dir, 'data%dx%d.tar' % info.image_shape[:2])
        if download and os.path.isfile(tar):
            return dataclasses.replace(source, needs_download=True)
        looked.append(f'{where}, and no manual-download file {tar}')
        return None
    if not download:
        looked.append(f'{where} (and download=False)')
        return None
    _raise_if_offline(info, root, manual_dir)
    return dataclasses.replace(source, needs_download=True)


_SOURCE_KINDS_HELP = {
    'glow_tfrecords': lambda info: (
        f"Glow's TFRecords (the paper's split): download {glow.GLOW_CELEBA_HQ_URL}, "
        'extract it (tar -xf celeba-tfr.tar) and pass the extracted celeba-tfr folder, '
        'which holds train/ and validation/, as data_dir (--data_dir).'
    ),
    'reference_pth': lambda info: (
        f"The authors' .pth files: {reference_pth.REFERENCE_PTH_HELP[info.name]}; pass "
        "their data/ folder as data_dir (--data_dir), holding "
        + ' and '.join(sorted(set(reference_pth.REFERENCE_PTH_FILES[info.name].values())))
        + '.'
    ),
    'npz': lambda info: 'ImageNet ' + _npz_help(info)[len('ImageNet ') :],
}


def _help_for(info, kind: str, root: str, manual_dir: Optional[str]) -> str:
    if kind == 'tfds':
        manual = os.path.expanduser(manual_dir or os.path.join(root, 'downloads', 'manual'))
        return 'TFDS: ' + _tfds_help(info, root, manual)
    return _SOURCE_KINDS_HELP[kind](info)


def locate_source(
    info: ImageDatasetInfo,
    data_dir: Optional[str] = None,
    *,
    download: bool = True,
    manual_dir: Optional[str] = None,
    splits: Sequence[str] = ('train', 'test'),
) -> DataSource:
    """The `DataSource` of dataset `info`: the first of `info.sources` holding
    the `splits` (`'train'`, `'test'`); `rflow_tf.data.locate_image_dataset`
    is its public form.

    Only the file system is read (and, for a TFDS download, one connection
    opened), so it answers in seconds. Raises `DatasetNotFoundError` naming
    every place looked in, with how to get the data from each source.

    #### Examples

    ```python
    import os
    import numpy as np
    from rflow_tf.data import dataset_info
    from rflow_tf.data.sources import locate_source

    os.makedirs("data/imagenet32")              # bring-your-own ImageNet .npz files
    np.savez("data/imagenet32/val_data.npz", data=np.zeros([2, 32, 32, 3], np.uint8))
    source = locate_source(dataset_info("imagenet32"), "data", splits=("test",))
    source.kind    # 'npz' here; 'reference_pth' if data/imagenet32/valid_32x32.pth exists
    assert source.kind == "npz"
    ```
    """
    root = os.path.expanduser(data_dir) if data_dir else _default_data_dir()
    splits = tuple(splits)
    unknown = sorted(set(splits) - {'train', 'test'})
    if unknown or not splits:
        raise ValueError(f"splits must name 'train' and/or 'test', got {splits!r}.")
    looked: List[str] = []
    for kind in info.sources:
        if kind == 'sklearn':
            n_train = info.n_train
            return DataSource(
                dataset=info.name,
                kind='sklearn',
                location='sklearn.datasets.load_digits',
                train_split=f'the first {n_train:,} images',
                test_split=f'the last {info.n_test:,} images',
            )
        if kind == 'glow_tfrecords':
            found = _glow_candidate(info, root, splits, looked)
        elif kind == 'reference_pth':
            found = _pth_candidate(info, root, splits, looked)
        elif kind == 'npz':
            found = _npz_candidate(info, root, splits, looked)
        else:
            found = _tfds_candidate(info, data_dir, root, download, manual_dir, looked)
        if found is not None:
            for note in found.warnings:
                warnings.warn(note, stacklevel=3)
            return found
    places = ''.join(f'\n  - {line}' for line in looked)
    ways = ''.join(f'\n  - {_help_for(info, kind, root, manual_dir)}' for kind in info.sources)
    raise DatasetNotFoundError(
        f'Dataset {info.name!r} not found (data_dir={root}). Looked for:{places}\n'
        f'To get it, any one of:{ways}'
    ) from None
