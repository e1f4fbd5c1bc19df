"""Tests for rflow_tf.data (offline: sklearn digits, TFDS mock data, tmp files)."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from rflow_tf import data


def _collect(ds):
    return np.concatenate([x.numpy() for x in ds], axis=0)


def _assert_each_maybe_flipped(plain, flipped):
    """Each image equals the plain one or its mirror; returns #mirrored."""
    assert plain.shape == flipped.shape
    n_flipped = 0
    for a, b in zip(plain, flipped):
        if np.array_equal(a, b):
            continue
        assert np.array_equal(a[:, ::-1], b)
        n_flipped += 1
    return n_flipped


# ----------------------------------------------------------------------------
# dataset_info / argument checking
# ----------------------------------------------------------------------------


def test_dataset_info_table():
    assert data.dataset_info('digits').image_shape == (8, 8, 1)
    assert data.dataset_info('mnist').image_shape == (28, 28, 1)
    assert data.dataset_info('cifar10').image_shape == (32, 32, 3)
    celeb = data.dataset_info('celeb_a_hq')
    assert celeb.image_shape == (256, 256, 3)
    assert celeb.n_bits == 5 and celeb.tfds_name == 'celeb_a_hq/256'
    assert celeb.n_train == 27000 and celeb.n_test == 3000
    assert data.dataset_info('celeb_a_hq/256') is celeb
    assert data.dataset_info('imagenet64').image_shape == (64, 64, 3)
    # As the reference's train_img.py: no flips for ImageNet 32/64.
    for name in ('mnist', 'digits', 'svhn_cropped', 'imagenet32', 'imagenet64'):
        assert not data.dataset_info(name).horizontal_flip
    for name in ('cifar10', 'celeb_a_hq'):
        assert data.dataset_info(name).horizontal_flip
    assert data.dataset_info('cifar10').num_dims == 3072
    with pytest.raises(Exception):
        celeb.n_bits = 8  # frozen
    assert set(data.IMAGE_DATASETS) == {
        'digits',
        'mnist',
        'cifar10',
        'svhn_cropped',
        'celeb_a_hq',
        'celeba_5bit',
        'imagenet32',
        'imagenet64',
    }


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError) as e:
        data.load_image_dataset('cifar100', 'train', 8)
    for name in data.IMAGE_DATASETS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match='digits'):
        data.dataset_info('nope')


@pytest.mark.parametrize(
    'kwargs, err',
    [
        (dict(batch_size=0), ValueError),
        (dict(batch_size=-4), ValueError),
        (dict(batch_size=2.5), TypeError),
        (dict(batch_size=8, n_bits=0), ValueError),
        (dict(batch_size=8, n_bits=9), ValueError),
        (dict(batch_size=8, n_bits=5.0), TypeError),
        (dict(batch_size=8, split='holdout'), ValueError),
        (dict(batch_size=8, flip='yes'), TypeError),
    ],
)
def test_bad_arguments(kwargs, err):
    kwargs = dict(kwargs)
    split = kwargs.pop('split', 'train')
    with pytest.raises(err):
        data.load_image_dataset('digits', split, **kwargs)


# ----------------------------------------------------------------------------
# digits (offline, scikit-learn)
# ----------------------------------------------------------------------------


def test_digits_shapes_sizes_range():
    info = data.dataset_info('digits')
    train = data.load_image_dataset('digits', 'train', 64, shuffle=False)
    test = data.load_image_dataset('digits', 'test', 64, shuffle=False)
    first = next(iter(train))
    assert first.dtype == tf.uint8 and first.shape == (64, 8, 8, 1)
    xtr, xte = _collect(train), _collect(test)
    assert xtr.shape == (info.n_train, 8, 8, 1) == (1500, 8, 8, 1)
    assert xte.shape == (info.n_test, 8, 8, 1) == (297, 8, 8, 1)
    assert xtr.min() == 0 and xtr.max() == 255
    # Matches sklearn's data: values 0..16 rescaled, last 297 are the test set.
    from sklearn.datasets import load_digits

    raw = load_digits().images
    expected = np.round(raw * 255.0 / 16.0).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(xtr, expected[:1500])
    np.testing.assert_array_equal(xte, expected[1500:])


def test_digits_deterministic_split_and_shuffle():
    a = _collect(data.load_image_dataset('digits', 'train', 100, seed=3))
    b = _collect(data.load_image_dataset('digits', 'train', 100, seed=3))
    c = _collect(data.load_image_dataset('digits', 'train', 100, seed=4))
    plain = _collect(data.load_image_dataset('digits', 'train', 100, shuffle=False))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, plain)

    # Same multiset of images: a permutation of the split.
    def key(x):
        return np.sort(x.reshape(len(x), -1).view('S64').ravel())

    np.testing.assert_array_equal(key(a), key(plain))


def test_digits_batching_repeat_drop_remainder():
    ds = data.load_image_dataset('digits', 'test', 64, drop_remainder=True)
    shapes = [tuple(x.shape) for x in ds]
    assert shapes == [(64, 8, 8, 1)] * (297 // 64)
    assert ds.element_spec.shape.as_list() == [64, 8, 8, 1]
    ds = data.load_image_dataset('digits', 'test', 64)
    assert [x.shape[0] for x in ds] == [64] * 4 + [297 - 256]
    ds = data.load_image_dataset('digits', 'test', 100, repeat=True, seed=0)
    batches = list(ds.take(7))  # 700 > 297 images: crosses epochs
    assert all(b.shape == (100, 8, 8, 1) for b in batches)


def test_digits_n_bits_and_flips():
    plain = _collect(data.load_image_dataset('digits', 'train', 256, shuffle=False))
    low = _collect(data.load_image_dataset('digits', 'train', 256, n_bits=3, shuffle=False))
    np.testing.assert_array_equal(low, plain // 32)
    assert low.max() == 7
    # Default: never flipped.
    default = _collect(data.load_image_dataset('digits', 'train', 256, shuffle=False, seed=0))
    np.testing.assert_array_equal(default, plain)
    # Explicit override flips about half (with a warning), deterministically.
    with pytest.warns(UserWarning, match='flip'):
        f1 = _collect(
            data.load_image_dataset('digits', 'train', 256, shuffle=False, flip=True, seed=0)
        )
    with pytest.warns(UserWarning):
        f2 = _collect(
            data.load_image_dataset('digits', 'train', 256, shuffle=False, flip=True, seed=0)
        )
    np.testing.assert_array_equal(f1, f2)
    n_flipped = _assert_each_maybe_flipped(plain, f1)
    assert 600 < n_flipped < 900  # ~750 of 1500 (symmetric images count as 0)


# ----------------------------------------------------------------------------
# TFDS datasets with tfds.testing.mock_data (offline)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, shape',
    [
        ('mnist', (28, 28, 1)),
        ('cifar10', (32, 32, 3)),
        ('svhn_cropped', (32, 32, 3)),
    ],
)
def test_tfds_mock_shapes(tmp_path, name, shape):
    with tfds.testing.mock_data(num_examples=10):
        ds = data.load_image_dataset(
            name, 'train', 4, data_dir=str(tmp_path), download=False, seed=0
        )
        x = _collect(ds)
    assert x.dtype == np.uint8 and x.shape == (10,) + shape
    assert x.max() > 128


def test_tfds_mock_flips_only_where_expected(tmp_path):
    kw = dict(data_dir=str(tmp_path), shuffle=False, seed=1)
    with tfds.testing.mock_data(num_examples=24):
        plain = _collect(data.load_image_dataset('cifar10', 'train', 8, flip=False, **kw))
        train = _collect(data.load_image_dataset('cifar10', 'train', 8, **kw))
        test = _collect(data.load_image_dataset('cifar10', 'test', 8, **kw))
        test_plain = _collect(data.load_image_dataset('cifar10', 'test', 8, flip=False, **kw))
        mnist_plain = _collect(data.load_image_dataset('mnist', 'train', 8, flip=False, **kw))
        mnist = _collect(data.load_image_dataset('mnist', 'train', 8, **kw))
    assert 0 < _assert_each_maybe_flipped(plain, train) < 24
    np.testing.assert_array_equal(test, test_plain)
    np.testing.assert_array_equal(mnist, mnist_plain)


def test_celeb_a_hq_mock_5_bits(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_image_dataset(
            'celeb_a_hq', 'train', 3, n_bits=5, data_dir=str(tmp_path), shuffle=False, seed=0
        )
        x = _collect(ds)
        x8 = _collect(
            data.load_image_dataset(
                'celeb_a_hq', 'train', 3, data_dir=str(tmp_path), shuffle=False, flip=False
            )
        )
        xt = _collect(
            data.load_image_dataset('celeb_a_hq', 'test', 3, n_bits=5, data_dir=str(tmp_path))
        )
    assert x.shape == (6, 256, 256, 3) and x.dtype == np.uint8
    assert x.max() == 31 and x.min() == 0
    assert xt.shape[1:] == (256, 256, 3) and xt.max() <= 31
    # Bit reduction is floor(x / 8); train images are randomly flipped.
    n_flipped = _assert_each_maybe_flipped(x8 // 8, x)
    assert 0 <= n_flipped <= 6


# ----------------------------------------------------------------------------
# Missing data -> DatasetNotFoundError
# ----------------------------------------------------------------------------


def test_missing_tfds_dataset_no_download(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_image_dataset('mnist', 'train', 8, data_dir=str(tmp_path), download=False)
    msg = str(e.value)
    assert 'mnist' in msg and str(tmp_path) in msg
    assert 'download=True' in msg and 'data_dir' in msg
    assert e.value.__suppress_context__ and e.value.__cause__ is None


def test_failed_download_is_wrapped(tmp_path, monkeypatch):
    """A download that starts (the network check passes) but fails is reported
    with TFDS's error in one line."""
    from rflow_tf.data import readers

    monkeypatch.setattr(readers, 'network_unreachable_reason', lambda host: None)
    real_load = tfds.load

    def fake_load(*args, download=True, **kwargs):
        if download:
            raise ConnectionError('Failed to resolve storage.googleapis.com')
        return real_load(*args, download=download, **kwargs)

    monkeypatch.setattr(tfds, 'load', fake_load)
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_image_dataset('cifar10', 'train', 8, data_dir=str(tmp_path))
    msg = str(e.value)
    assert 'cifar10' in msg and str(tmp_path) in msg
    assert 'ConnectionError' in msg


@pytest.mark.parametrize('download', [True, False])
def test_celeb_a_hq_missing_manual_files(tmp_path, download):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_image_dataset('celeb_a_hq', 'train', 8, data_dir=str(tmp_path), download=download)
    msg = str(e.value)
    assert 'celeb_a_hq' in msg and str(tmp_path) in msg
    assert 'data256x256.tar' in msg
    assert os.path.join(str(tmp_path), 'downloads', 'manual') in msg
    assert 'progressive_growing_of_gans' in msg


def test_celeb_a_hq_prepared_from_manual_tar(tmp_path):
    """Real (unmocked) TFDS preparation from a small fake data256x256.tar."""
    import io
    import tarfile

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(10, 256, 256, 3), dtype=np.uint8)
    manual = tmp_path / 'downloads' / 'manual'
    manual.mkdir(parents=True)
    with tarfile.open(manual / 'data256x256.tar', 'w') as tar:
        for i, img in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format='PNG')
            info = tarfile.TarInfo(f'{i:05d}.png')
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    kw = dict(data_dir=str(tmp_path), shuffle=False, flip=False)
    train = _collect(data.load_image_dataset('celeb_a_hq', 'train', 4, n_bits=5, **kw))
    # Now prepared: works without download, test split is the last 10%;
    # n_bits=None means the dataset default (5 for CelebA-HQ).
    test = _collect(
        data.load_image_dataset('celeb_a_hq', 'test', 4, n_bits=None, download=False, **kw)
    )
    assert train.shape == (9, 256, 256, 3) and test.shape == (1, 256, 256, 3)
    assert train.max() == 31 and test.max() == 31
    expected = {img.tobytes() for img in imgs // 8}
    assert all(img.tobytes() in expected for img in train)
    assert test[0].tobytes() in expected
    train8 = _collect(data.load_image_dataset('celeb_a_hq', 'train', 4, **kw))
    np.testing.assert_array_equal(train8 // 8, train)
    with pytest.raises(ValueError, match='split'):
        data.load_image_dataset('celeb_a_hq', 'train[', 4, **kw)


def test_imagenet_missing_npz(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_image_dataset('imagenet32', 'train', 8, data_dir=str(tmp_path))
    msg = str(e.value)
    assert 'imagenet32' in msg and str(tmp_path) in msg
    assert os.path.join(str(tmp_path), 'imagenet32', 'train*.npz') in msg
    assert '"data"' in msg and '3072' in msg


# ----------------------------------------------------------------------------
# ImageNet bring-your-own npz
# ----------------------------------------------------------------------------


def _fake_imagenet(root, res=32):
    rng = np.random.default_rng(0)
    folder = root / f'imagenet{res}'
    folder.mkdir(parents=True)
    # Two training files in the official flattened channel-planar layout.
    nhwc = rng.integers(0, 256, size=(13, res, res, 3), dtype=np.uint8)
    flat = nhwc.transpose(0, 3, 1, 2).reshape(13, -1)
    np.savez(folder / 'train_data_batch_1.npz', data=flat[:7], labels=np.arange(7))
    np.savez(folder / 'train_data_batch_2.npz', data=flat[7:], labels=np.arange(6))
    # Validation file already channels-last.
    val = rng.integers(0, 256, size=(5, res, res, 3), dtype=np.uint8)
    np.savez(folder / 'val_data.npz', data=val)
    return nhwc, val


def test_imagenet32_from_fake_npz(tmp_path):
    nhwc, val = _fake_imagenet(tmp_path)
    ds = data.load_image_dataset('imagenet32', 'train', 4, data_dir=str(tmp_path), shuffle=False)
    assert ds.element_spec.shape.as_list() == [None, 32, 32, 3]
    x = _collect(ds)
    assert x.dtype == np.uint8 and x.shape == (13, 32, 32, 3)

    # cycle_length=2 interleaving reorders; compare as a multiset, and check
    # that flips (default for the train split) are mirror images.
    def flat(a):
        return {r.tobytes() for r in a}

    mirrored = nhwc[:, :, ::-1]
    for img in x:
        assert img.tobytes() in flat(nhwc) | flat(mirrored)
    xv = _collect(
        data.load_image_dataset(
            'imagenet32', 'test', 4, n_bits=4, data_dir=str(tmp_path), shuffle=False
        )
    )
    np.testing.assert_array_equal(xv, val // 16)
    xs = _collect(data.load_image_dataset('imagenet32', 'train', 5, seed=0, data_dir=str(tmp_path)))
    assert xs.shape == (13, 32, 32, 3)


def test_imagenet_malformed_npz(tmp_path):
    folder = tmp_path / 'imagenet32'
    folder.mkdir()
    np.savez(folder / 'train_0.npz', data=np.zeros((4, 100), np.uint8))
    with pytest.raises(ValueError, match='shape'):
        data.load_image_dataset('imagenet32', 'train', 2, data_dir=str(tmp_path))
    np.savez(folder / 'train_0.npz', images=np.zeros((4, 3072), np.uint8))
    with pytest.raises(ValueError, match='"data"'):
        data.load_image_dataset('imagenet32', 'train', 2, data_dir=str(tmp_path))


# ----------------------------------------------------------------------------
# Dequantisation
# ----------------------------------------------------------------------------


def test_dequantize_range_and_noise_mean():
    x = tf.zeros([200000], tf.uint8)
    y = data.dequantize(x, 8, seed=0)
    assert y.dtype == tf.float32
    u = y.numpy() * 256.0
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1.0 / 12.0) < 0.002
    top = data.dequantize(tf.fill([200000], tf.constant(255, tf.uint8)), 8)
    assert float(tf.reduce_max(top)) < 1.0
    assert float(tf.reduce_min(top)) >= 255.0 / 256.0


@pytest.mark.parametrize('n_bits', [1, 5, 8])
def test_dequantize_alignment(n_bits):
    levels = 2**n_bits
    x = tf.constant(np.tile(np.arange(levels, dtype=np.uint8), 2000))
    for dtype in (tf.float32, tf.float64):
        y = data.dequantize(x, n_bits, seed=[3, 4], dtype=dtype).numpy()
        assert y.min() >= 0.0 and y.max() < 1.0
        np.testing.assert_array_equal(np.floor(y * levels).astype(np.uint8), x.numpy())


def test_dequantize_seeds_and_errors():
    x = tf.constant([[0, 3], [7, 31]], tf.uint8)
    a = data.dequantize(x, 5, seed=7)
    b = data.dequantize(x, 5, seed=7)
    c = data.dequantize(x, 5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert data.dequantize(x, 5).shape == (2, 2)
    f = tf.function(lambda t: data.dequantize(t, 5, seed=[1, 2]))
    np.testing.assert_array_equal(f(x), data.dequantize(x, 5, seed=[1, 2]))
    with pytest.raises(ValueError):
        data.dequantize(x, 0)
    with pytest.raises(ValueError):
        data.dequantize(x, 9)
    with pytest.raises(TypeError):
        data.dequantize(x, 8, dtype=tf.int32)


def test_bits_per_dim_offset():
    d = 32 * 32 * 3
    assert data.bits_per_dim_offset(8, d) == pytest.approx(d * 8 * math.log(2))
    assert data.bits_per_dim_offset(5, 10) == pytest.approx(10 * math.log(32))
    # A uniform density on [0,1)^D (log p = 0) costs exactly n_bits bits/dim.
    bpd = -(0.0 - data.bits_per_dim_offset(5, d)) / (d * math.log(2))
    assert bpd == pytest.approx(5.0)
    with pytest.raises(ValueError):
        data.bits_per_dim_offset(0, d)
    with pytest.raises(ValueError):
        data.bits_per_dim_offset(8, 0)


def test_to_uint8_images():
    x = tf.constant([-1.0, 0.0, 0.5, 0.999, 1.0, 3.0, float('nan')])
    out = data.to_uint8_images(x, 8).numpy()
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255, 255, 0])
    out5 = data.to_uint8_images(x, 5).numpy()
    np.testing.assert_array_equal(out5, [0, 0, 132, 255, 255, 255, 0])
    # Round trip integer -> dequantize -> uint8 recovers the 8-bit pixels.
    ints = tf.constant(np.arange(256, dtype=np.uint8))
    back = data.to_uint8_images(data.dequantize(ints, 8, seed=0), 8)
    np.testing.assert_array_equal(back, ints)


# ----------------------------------------------------------------------------
# 2-D toy data
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', data.TOY_DATASETS)
def test_toy_2d(name):
    x = data.toy_2d(name, 1001, seed=0)
    assert x.shape == (1001, 2) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    std = x.std(axis=0)
    assert np.all(std > 0.5) and np.all(std < 5.0)
    assert np.abs(x).max() < 20.0
    np.testing.assert_array_equal(x, data.toy_2d(name, 1001, seed=0))
    assert not np.array_equal(x, data.toy_2d(name, 1001, seed=1))
    assert data.toy_2d(name, 1).shape == (1, 2)


def test_toy_2d_errors():
    assert len(data.TOY_DATASETS) == 8
    with pytest.raises(ValueError) as e:
        data.toy_2d('spiral', 10)
    for name in data.TOY_DATASETS:
        assert name in str(e.value)
    with pytest.raises(ValueError):
        data.toy_2d('moons', 0)


# ----------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------


def test_save_image_grid_gray(tmp_path):
    x = next(iter(data.load_image_dataset('digits', 'test', 10, shuffle=False)))
    path = tmp_path / 'a' / 'b' / 'grid.png'
    data.save_image_grid(x, str(path), nrow=4)
    with Image.open(path) as im:
        assert im.format == 'PNG'
        assert im.size == (4 * 9 + 1, 3 * 9 + 1)  # (width, height)
        arr = np.asarray(im)
    assert arr.ndim == 2
    np.testing.assert_array_equal(arr[1:9, 1:9], x.numpy()[0, :, :, 0])
    np.testing.assert_array_equal(arr[10:18, 1 + 9 : 9 + 9], x.numpy()[5, :, :, 0])


def test_save_image_grid_scale_is_nearest_neighbour(tmp_path):
    x = next(iter(data.load_image_dataset('digits', 'test', 16, shuffle=False)))
    small, large = tmp_path / 'small.png', tmp_path / 'large.png'
    data.save_image_grid(x, str(small))
    data.save_image_grid(x, str(large), scale=8)
    with Image.open(small) as im:
        arr = np.asarray(im)
    with Image.open(large) as im:
        assert im.size == (8 * 37, 8 * 37)
        big = np.asarray(im)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(arr, 8, 0), 8, 1))
    for bad in (0, 1.5, True):
        with pytest.raises((TypeError, ValueError)):
            data.save_image_grid(x, str(large), scale=bad)


def test_save_image_grid_rgb(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    path = tmp_path / 'rgb.png'
    data.save_image_grid(x, str(path), padding=0)  # nrow = ceil(sqrt(5)) = 3
    with Image.open(path) as im:
        assert im.mode == 'RGB' and im.size == (3 * 7, 2 * 6)
        arr = np.asarray(im)
    np.testing.assert_array_equal(arr[6:12, 7:14], x[4])
    with pytest.raises(TypeError):
        data.save_image_grid(x.astype(np.float32) / 255, str(path))
    with pytest.raises(ValueError):
        data.save_image_grid(np.zeros((2, 4, 4, 2), np.uint8), str(path))


# ----------------------------------------------------------------------------
# Labels and the classification augmentation (random crop, flips)
# ----------------------------------------------------------------------------


def _collect_pairs(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def _window_offsets(plain, cropped, padding, allow_mirror=False):
    """Each cropped image is an H x W window of the reflection-padded plain
    image (or, with allow_mirror, of its mirror); returns the offsets found."""
    h, w = plain.shape[1:3]
    found = []
    for a, b in zip(plain, cropped):
        candidates = [a, a[:, ::-1]] if allow_mirror else [a]
        hits = []
        for img in candidates:
            padded = np.pad(img, [(padding, padding), (padding, padding), (0, 0)], mode='reflect')
            hits += [
                (i, j)
                for i in range(2 * padding + 1)
                for j in range(2 * padding + 1)
                if np.array_equal(padded[i : i + h, j : j + w], b)
            ]
        assert hits, 'cropped image is no window of the padded original'
        found.append(hits[0])
    return found


def test_digits_labels_are_sklearn_targets():
    from sklearn.datasets import load_digits

    target = load_digits().target
    x_tr, y_tr = _collect_pairs(
        data.load_image_dataset('digits', 'train', 500, shuffle=False, with_labels=True)
    )
    _, y_te = _collect_pairs(
        data.load_image_dataset('digits', 'test', 500, shuffle=False, with_labels=True)
    )
    assert y_tr.dtype == np.int64 and x_tr.dtype == np.uint8
    np.testing.assert_array_equal(y_tr, target[:1500])
    np.testing.assert_array_equal(y_te, target[1500:])
    np.testing.assert_array_equal(
        x_tr, _collect(data.load_image_dataset('digits', 'train', 500, shuffle=False))
    )


def test_digits_labels_stay_with_their_images_when_shuffled():
    x0, y0 = _collect_pairs(
        data.load_image_dataset('digits', 'train', 256, shuffle=False, with_labels=True)
    )
    labels_of = {}
    for x, y in zip(x0, y0):
        labels_of.setdefault(x.tobytes(), set()).add(int(y))
    x1, y1 = _collect_pairs(
        data.load_image_dataset('digits', 'train', 256, seed=3, with_labels=True)
    )
    assert not np.array_equal(y0, y1)  # really shuffled
    assert all(int(y) in labels_of[x.tobytes()] for x, y in zip(x1, y1))


def _plain_and_augmented_digits(**aug):
    """(plain images, augmented images) of the digits training split in order;
    checks that the labels are kept and that a seeded augmentation repeats."""
    kw = dict(shuffle=False, with_labels=True)
    x0, y0 = _collect_pairs(data.load_image_dataset('digits', 'train', 100, **kw))
    x1, y1 = _collect_pairs(data.load_image_dataset('digits', 'train', 100, seed=5, **aug, **kw))
    x2, _ = _collect_pairs(data.load_image_dataset('digits', 'train', 100, seed=5, **aug, **kw))
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(x1, x2)  # seeded: repeatable
    return x0, x1


def test_digits_random_crop_is_a_window_of_the_padded_image():
    x0, x1 = _plain_and_augmented_digits(crop_padding=2)
    offsets = _window_offsets(x0[:200], x1[:200], 2)
    # 25 equally likely offsets: all 200 images uncropped has probability 25^-200.
    assert len({o for o in offsets if o != (2, 2)}) > 5


def test_random_translate_is_bilinear_with_zero_fill():
    from rflow_tf.data import images

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 8, 8, 1)).astype(np.uint8)
    offsets = np.array([[0.0, 0.0], [1.0, -2.0], [0.5, 0.0]], np.float32)
    out = images._random_translate_batch(tf.constant(x), tf.constant(offsets)).numpy()
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], x[0])  # no shift
    # Integer shift (dy, dx) = (1, -2): out(i, j) = x(i - 1, j + 2), zero outside.
    want = np.zeros_like(x[1])
    want[1:, :6] = x[1, :7, 2:]
    np.testing.assert_array_equal(out[1], want)
    # Half a pixel down: the rounded mean of each pixel and the one above it (0 above row 0).
    above = np.concatenate([np.zeros_like(x[2, :1]), x[2, :7]], 0).astype(float)
    np.testing.assert_allclose(out[2], (above + x[2]) / 2, atol=0.51)


def test_digits_translate_is_seeded_and_keeps_labels():
    x0, x1 = _plain_and_augmented_digits(translate=1.0)
    changed = np.any(x1 != x0, axis=(1, 2, 3))
    assert changed.mean() > 0.9  # a uniform offset in [-1, 1]^2 is almost never 0
    # A shift by at most one pixel moves ink, it does not create it.
    assert np.all(x1.astype(int).sum((1, 2, 3)) <= x0.astype(int).sum((1, 2, 3)) + 64)
    for bad in (-0.5, 8, float('nan'), True, '1'):
        with pytest.raises(ValueError, match='translate must be'):
            data.load_image_dataset('digits', 'train', 4, translate=bad)


@pytest.mark.parametrize('name', ['mnist', 'cifar10', 'svhn_cropped'])
def test_tfds_mock_labels(tmp_path, name):
    kw = dict(data_dir=str(tmp_path), download=False, shuffle=False, seed=0)
    with tfds.testing.mock_data(num_examples=12):
        x, y = _collect_pairs(data.load_image_dataset(name, 'test', 5, with_labels=True, **kw))
        x_plain = _collect(data.load_image_dataset(name, 'test', 5, **kw))
        aug = data.classification_augmentation(name)
        x_aug, y_aug = _collect_pairs(
            data.load_image_dataset(name, 'train', 6, with_labels=True, **aug, **kw)
        )
        x_train, y_train = _collect_pairs(
            data.load_image_dataset(name, 'train', 6, with_labels=True, flip=False, **kw)
        )
    assert y.shape == (12,) and y.dtype == np.int64
    assert 0 <= y.min() and y.max() < data.dataset_info(name).n_classes
    np.testing.assert_array_equal(x, x_plain)
    np.testing.assert_array_equal(y_aug, y_train)
    if aug['crop_padding']:
        _window_offsets(x_train, x_aug, aug['crop_padding'], allow_mirror=aug['flip'])
    else:
        np.testing.assert_array_equal(x_aug, x_train)


def test_classification_augmentation_is_the_references():
    assert data.classification_augmentation('svhn') == dict(flip=False, crop_padding=4)
    assert data.classification_augmentation('cifar10') == dict(flip=True, crop_padding=4)
    assert data.classification_augmentation('mnist') == dict(flip=False, crop_padding=0)
    with pytest.raises(ValueError, match='no labels'):
        data.classification_augmentation('celeb_a_hq')


def test_labels_and_crop_argument_errors():
    with pytest.raises(ValueError, match='no labels'):
        data.load_image_dataset('imagenet32', 'train', 4, with_labels=True)
    with pytest.raises(ValueError, match='crop_padding'):
        data.load_image_dataset('digits', 'train', 4, crop_padding=-1)
    with pytest.raises(ValueError, match='smaller than the image'):
        data.load_image_dataset('digits', 'train', 4, crop_padding=8)
    with pytest.raises(TypeError, match='with_labels'):
        data.load_image_dataset('digits', 'train', 4, with_labels='yes')
