"""What each image dataset is: its static description (`ImageDatasetInfo`,
`dataset_info`), its names and aliases, and the reference's augmentation of
its classification runs (`classification_augmentation`). Re-exported by
`rflow_tf.data.images` and `rflow_tf.data`."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from rflow_tf.data import reference_pth

#: The digits' test examples: the last 297 of scikit-learn's 1797 (1500 train).
DIGITS_N_TEST = 297


@dataclasses.dataclass(frozen=True)
class ImageDatasetInfo:
    """Static description of an image dataset supported by `load_image_dataset`.

    Attributes:
      name: Canonical name accepted by `load_image_dataset` (e.g. `'cifar10'`).
      image_shape: `(H, W, C)` of one image.
      n_train: Number of training images (nominal for bring-your-own data).
      n_test: Number of test images.
      n_bits: Default number of bits per pixel used for modelling (8, or 5 for
        CelebA-HQ and CelebA 5-bit as in the paper).
      horizontal_flip: Whether the training split is randomly flipped
        horizontally by default, as in the reference's `train_img.py`: CIFAR-10
        and CelebA-HQ yes; digits, house numbers and ImageNet 32/64 no. Only
        applied to the training split by default.
      train_split: TFDS split name/spec used for `split='train'` (when read
        from TFDS).
      test_split: TFDS split name/spec used for `split='test'` (when read
        from TFDS).
      source: The preferred source, `sources[0]`.
      tfds_name: TFDS builder name (with config), or `None` if not from TFDS.
      n_classes: Number of class labels `load_image_dataset(...,
        with_labels=True)` yields (labels are `0..n_classes - 1`), or `None`
        for datasets without labels here (`celeb_a_hq`, `celeba_5bit`,
        `imagenet32/64`).
      sources: Where the data may come from, in the order they are tried:
        `'sklearn'` (bundled, offline), `'glow_tfrecords'` (Glow's
        `celeba-tfr`), `'reference_pth'` (the authors' `data/` folder),
        `'npz'` (user files) and `'tfds'`.
      stored_bits: Bits per pixel of the stored data (8; 5 for
        `celeba_5bit`, stored with values 0..31).

    #### Examples

    ```python
    info = dataset_info('celeb_a_hq')
    info.image_shape   # (256, 256, 3)
    info.n_bits        # 5
    info.num_dims      # 196608
    info.sources       # ('glow_tfrecords', 'reference_pth', 'tfds')
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
    sources: Tuple[str, ...] = ()
    stored_bits: int = 8

    def __post_init__(self):
        if not self.sources:
            object.__setattr__(self, 'sources', (self.source,))

    @property
    def num_dims(self) -> int:
        """Number of dimensions `D = H * W * C` of one image."""
        h, w, c = self.image_shape
        return h * w * c


INFOS = {
    'digits': ImageDatasetInfo(
        name='digits',
        image_shape=(8, 8, 1),
        n_train=1797 - DIGITS_N_TEST,
        n_test=DIGITS_N_TEST,
        n_bits=8,
        horizontal_flip=False,
        train_split='train',
        test_split='test',
        source='sklearn',
        n_classes=10,
    ),
    'mnist': ImageDatasetInfo(
        name='mnist',
        image_shape=(28, 28, 1),
        n_train=60000,
        n_test=10000,
        n_bits=8,
        horizontal_flip=False,
        train_split='train',
        test_split='test',
        source='tfds',
        tfds_name='mnist',
        n_classes=10,
    ),
    'cifar10': ImageDatasetInfo(
        name='cifar10',
        image_shape=(32, 32, 3),
        n_train=50000,
        n_test=10000,
        n_bits=8,
        horizontal_flip=True,
        train_split='train',
        test_split='test',
        source='tfds',
        tfds_name='cifar10',
        n_classes=10,
    ),
    'svhn_cropped': ImageDatasetInfo(
        name='svhn_cropped',
        image_shape=(32, 32, 3),
        n_train=73257,
        n_test=26032,
        n_bits=8,
        horizontal_flip=False,
        train_split='train',
        test_split='test',
        source='tfds',
        tfds_name='svhn_cropped',
        n_classes=10,
    ),
    # The paper (following Glow) trains on Glow's 27000 training images and tests
    # on its 3000 validation images (Glow's TFRecords, or the authors' .pth files
    # made from them). TFDS only has a 30000-image 'train' split, which we split
    # 90/10 ourselves: not the paper's test set.
    'celeb_a_hq': ImageDatasetInfo(
        name='celeb_a_hq',
        image_shape=(256, 256, 3),
        n_train=27000,
        n_test=3000,
        n_bits=5,
        horizontal_flip=True,
        train_split='train[:90%]',
        test_split='train[90%:]',
        source='glow_tfrecords',
        tfds_name='celeb_a_hq/256',
        sources=('glow_tfrecords', 'reference_pth', 'tfds'),
    ),
    # CelebA-HQ at 64x64, 5 bits (the reference's celeba_5bit, from Flow++): one
    # file of 30000 images; test = the first 5000, train = the rest.
    'celeba_5bit': ImageDatasetInfo(
        name='celeba_5bit',
        image_shape=(64, 64, 3),
        n_train=30000 - reference_pth.CELEBA_5BIT_N_TEST,
        n_test=reference_pth.CELEBA_5BIT_N_TEST,
        n_bits=5,
        horizontal_flip=True,
        train_split='train',
        test_split='test',
        source='reference_pth',
        stored_bits=5,
    ),
    'imagenet32': ImageDatasetInfo(
        name='imagenet32',
        image_shape=(32, 32, 3),
        n_train=1281167,
        n_test=50000,
        n_bits=8,
        horizontal_flip=False,
        train_split='train',
        test_split='val',
        source='reference_pth',
        sources=('reference_pth', 'npz'),
    ),
    'imagenet64': ImageDatasetInfo(
        name='imagenet64',
        image_shape=(64, 64, 3),
        n_train=1281167,
        n_test=50000,
        n_bits=8,
        horizontal_flip=False,
        train_split='train',
        test_split='val',
        source='reference_pth',
        sources=('reference_pth', 'npz'),
    ),
}

_ALIASES = {
    'celeb_a_hq/256': 'celeb_a_hq',
    'celeba_hq': 'celeb_a_hq',
    'celebahq': 'celeb_a_hq',
    'celeba5bit': 'celeba_5bit',
    'svhn': 'svhn_cropped',
    'cifar-10': 'cifar10',
}

#: Names accepted by `load_image_dataset` and `dataset_info`.
IMAGE_DATASETS = tuple(INFOS)


def canonical_name(name) -> str:
    """The name of image dataset ``name`` in `IMAGE_DATASETS` (aliases
    resolved; case and surrounding spaces ignored).

    Args:
      name: a dataset name or alias.

    Returns:
      The canonical name, a key of `INFOS`.

    Raises:
      TypeError: ``name`` is not a str.
      ValueError: an unknown name; the message lists the valid ones.

    Example:
    ```python
    from rflow_tf.data.catalog import canonical_name

    assert canonical_name("CelebAHQ") == "celeb_a_hq" and canonical_name(" MNIST ") == "mnist"
    try:
        canonical_name("imagenet")
    except ValueError as error:
        assert "Valid names: " in str(error)
    else:
        raise AssertionError("an unknown name was accepted")
    ```
    """
    if not isinstance(name, str):
        raise TypeError(f'Dataset name must be a str, got {name!r}.')
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in INFOS:
        raise ValueError(
            f'Unknown image dataset {name!r}. Valid names: {", ".join(IMAGE_DATASETS)}.'
        )
    return key


def dataset_info(name: str) -> ImageDatasetInfo:
    """Returns the static `ImageDatasetInfo` of an image dataset.

    Args:
      name: One of `IMAGE_DATASETS` (`'digits'`, `'mnist'`, `'cifar10'`,
        `'svhn_cropped'`, `'celeb_a_hq'`, `'celeba_5bit'`, `'imagenet32'`,
        `'imagenet64'`); `'celeb_a_hq/256'` and `'celebahq'` (the
        reference's name) are accepted as aliases.

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
    return INFOS[canonical_name(name)]


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
    from rflow_tf.data import classification_augmentation, load_image_dataset

    assert classification_augmentation("cifar10") == {"flip": True, "crop_padding": 4}
    aug = classification_augmentation("digits")    # {'flip': False, 'crop_padding': 0}
    ds = load_image_dataset("digits", "train", 64, with_labels=True, **aug)
    x, y = next(iter(ds))
    assert x.shape == (64, 8, 8, 1) and y.shape == (64,)
    ```
    """
    key = canonical_name(name)
    if key not in _CLASSIFICATION_AUGMENTATION:
        raise ValueError(
            f'Dataset {name!r} has no labels here; classification datasets: '
            f'{", ".join(_CLASSIFICATION_AUGMENTATION)}.'
        )
    return dict(_CLASSIFICATION_AUGMENTATION[key])
