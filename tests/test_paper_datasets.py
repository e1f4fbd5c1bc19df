"""The paper's datasets as the paper read them, and missing data reported in seconds.

* Glow's CelebA-HQ TFRecords: shards written here with TensorFlow in Glow's
  layout (several training shards, one validation shard), every image read
  back compared with the one written, both splits, 8 and 5 bits; missing and
  damaged shards; sharding by file between workers.
* The authors' `.pth` files: the torch-written files of
  `tests/data/reference-data` (its README), every image compared with
  `expected.npz`, both splits, 8 and 5 bits; memory-mapped; unsafe pickles and
  wrong shapes refused.
* Missing data: `load_image_dataset` names every place it looked within
  `LOAD_LIMIT_S`; `train/main.py` exits with status 2 within `TRAINER_LIMIT_S`
  before building anything; a download with the network made unreachable
  fails within `OFFLINE_LIMIT_S` saying so.
* The trainer on 256x256 Glow-format images with a small model, and the TFDS
  CelebA-HQ split reported as "held-out", never as the paper's test set.
"""

import dataclasses
import errno
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tiny_runs import DEFAULT, tiny_flags, tiny_options  # noqa: E402
from torch_files import zip_to_legacy  # noqa: E402

from rflow_tf import data, models, torch_format  # noqa: E402
from rflow_tf.data import glow, network, reference_pth  # noqa: E402

REFERENCE_DATA = os.path.join(REPO, 'tests', 'data', 'reference-data')
EXPECTED = os.path.join(REFERENCE_DATA, 'expected.npz')

#: Time limits (seconds) of the missing-data paths.
LOAD_LIMIT_S = 15.0
TRAINER_LIMIT_S = 30.0
OFFLINE_LIMIT_S = 60.0

CELEBA_SHAPE = data.dataset_info('celeb_a_hq').image_shape
TRAIN_SHARDS, VALIDATION_SHARDS, PER_SHARD = 3, 1, 2


def _collect(ds):
    return np.concatenate([x.numpy() for x in ds], axis=0)


def _multiset(images):
    return sorted(img.tobytes() for img in images)


# ----------------------------------------------------------------------------
# Glow's TFRecords, written here in Glow's format
# ----------------------------------------------------------------------------


def _example(img, label=0, shape=None):
    shape = list(img.shape) if shape is None else shape
    feature = {
        'shape': tf.train.Feature(int64_list=tf.train.Int64List(value=shape)),
        'data': tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()])),
        'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        'attr': tf.train.Feature(int64_list=tf.train.Int64List(value=[0] * 40)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_glow_split(root, folder, n_shards, per_shard, rng, shape=CELEBA_SHAPE):
    """Writes `folder/folder-r08-s-{i:04d}-of-{n:04d}.tfrecords` under root; returns
    {shard path: uint8 images [per_shard, H, W, C]}."""
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    written = {}
    for i in range(n_shards):
        path = os.path.join(root, folder, f'{folder}-r08-s-{i:04d}-of-{n_shards:04d}.tfrecords')
        images = rng.integers(0, 256, size=(per_shard, *shape), dtype=np.uint8)
        with tf.io.TFRecordWriter(path) as writer:
            for k, img in enumerate(images):
                writer.write(_example(img, label=k))
        written[path] = images
    return written


@pytest.fixture(scope='module')
def glow_root(tmp_path_factory):
    """An extracted `celeba-tfr` folder: {root, train: {path: images}, test: {path: images}}."""
    root = str(tmp_path_factory.mktemp('celeba-tfr'))
    rng = np.random.default_rng(7)
    train = write_glow_split(root, 'train', TRAIN_SHARDS, PER_SHARD, rng)
    test = write_glow_split(root, 'validation', VALIDATION_SHARDS, PER_SHARD, rng)
    return {'root': root, 'train': train, 'test': test}


def _images(shards):
    return np.concatenate(list(shards.values()))


@pytest.mark.parametrize('n_bits', [8, 5])
@pytest.mark.parametrize('split', ['train', 'test'])
def test_glow_tfrecords_every_image_both_splits(glow_root, split, n_bits):
    written = _images(glow_root[split])
    kw = dict(data_dir=glow_root['root'], n_bits=n_bits, shuffle=False, flip=False)
    got = _collect(data.load_image_dataset('celeb_a_hq', split, 4, **kw))
    assert got.dtype == np.uint8 and got.shape == written.shape
    # floor(x / 2**(8 - n_bits)), the reference's reduce_bits.
    expected = written // 2 ** (8 - n_bits)
    assert _multiset(got) == _multiset(expected)
    assert got.max() <= 2**n_bits - 1
    # A fixed order without shuffling.
    np.testing.assert_array_equal(
        got, _collect(data.load_image_dataset('celeb_a_hq', split, 4, **kw))
    )


def test_glow_tfrecords_are_the_paper_split_wherever_data_dir_points(glow_root, tmp_path):
    source = data.locate_image_dataset('celeb_a_hq', glow_root['root'])
    assert source.kind == 'glow_tfrecords' and source.paper_test_split
    assert source.eval_name == 'test' and "the paper's test set" in source.test_split
    assert source.warnings == ()
    # The authors' data/ folder with celeba-tfr extracted into celebahq/, as their README does.
    data_folder = tmp_path / 'data'
    shutil.copytree(glow_root['root'], data_folder / 'celebahq' / 'celeba-tfr')
    nested = data.locate_image_dataset('celeb_a_hq', str(data_folder))
    assert nested.kind == 'glow_tfrecords'
    assert nested.location == str(data_folder / 'celebahq' / 'celeba-tfr')
    got = _collect(
        data.load_image_dataset(
            'celeb_a_hq', 'test', 8, data_dir=str(data_folder), n_bits=8, shuffle=False
        )
    )
    assert _multiset(got) == _multiset(_images(glow_root['test']))


def test_glow_shuffled_training_stream_is_seeded_and_complete(glow_root):
    kw = dict(data_dir=glow_root['root'], n_bits=8, flip=False, seed=3)
    a = _collect(data.load_image_dataset('celeb_a_hq', 'train', 4, **kw))
    b = _collect(data.load_image_dataset('celeb_a_hq', 'train', 4, **kw))
    np.testing.assert_array_equal(a, b)
    assert _multiset(a) == _multiset(_images(glow_root['train']))


def test_glow_missing_shard_is_warned_about(glow_root, tmp_path):
    root = tmp_path / 'celeba-tfr'
    shutil.copytree(glow_root['root'], root)
    paths = sorted(glow_root['train'])
    gone = paths[1]
    os.remove(root / 'train' / os.path.basename(gone))
    missing = rf'1 of the {TRAIN_SHARDS} shards are missing \(shard {paths.index(gone):04d}\)'
    with pytest.warns(UserWarning, match=missing):
        source = data.locate_image_dataset('celeb_a_hq', str(root))
    assert len(source.warnings) == 1 and 'missing' in source.warnings[0]
    with pytest.warns(UserWarning, match='missing'):
        ds = data.load_image_dataset(
            'celeb_a_hq', 'train', 4, data_dir=str(root), n_bits=8, shuffle=False, flip=False
        )
    kept = np.concatenate([glow_root['train'][p] for p in paths if p != gone])
    assert _multiset(_collect(ds)) == _multiset(kept)


def test_glow_workers_read_their_own_shards(glow_root):
    """Sharded by file: worker i reads shards i, i + n, ...; together all images once."""
    n_workers = 2
    paths = sorted(glow_root['train'])
    seen = []
    for worker in range(n_workers):
        ctx = tf.distribute.InputContext(
            num_input_pipelines=n_workers, input_pipeline_id=worker, num_replicas_in_sync=n_workers
        )
        got = _collect(
            data.load_image_dataset(
                'celeb_a_hq',
                'train',
                2,
                data_dir=glow_root['root'],
                n_bits=8,
                shuffle=False,
                flip=False,
                input_context=ctx,
            )
        )
        own = np.concatenate([glow_root['train'][p] for p in paths[worker::n_workers]])
        assert _multiset(got) == _multiset(own)
        seen.extend(_multiset(got))
    assert sorted(seen) == _multiset(_images(glow_root['train']))
    ctx = tf.distribute.InputContext(
        num_input_pipelines=len(paths) + 1, input_pipeline_id=0, num_replicas_in_sync=1
    )
    with pytest.raises(ValueError, match='split by file'):
        data.load_image_dataset(
            'celeb_a_hq', 'train', 2, data_dir=glow_root['root'], input_context=ctx
        )


def test_glow_damaged_shards_are_named(glow_root, tmp_path):
    root = tmp_path / 'celeba-tfr'
    shutil.copytree(glow_root['root'], root)
    path = str(root / 'train' / os.path.basename(sorted(glow_root['train'])[0]))
    n_records = glow.check_tfrecord_file(path)
    assert n_records == PER_SHARD
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:  # truncated in the middle of the last record
        f.truncate(size - 100)
    with pytest.raises(data.DatasetFormatError, match='truncated') as e:
        data.load_image_dataset('celeb_a_hq', 'train', 2, data_dir=str(root))
    assert path in str(e.value)
    with open(path, 'wb') as f:  # not a TFRecord file at all
        f.write(b'this is not a tfrecord file, just text' * 10)
    with pytest.raises(data.DatasetFormatError, match='corrupt') as e:
        data.load_image_dataset('celeb_a_hq', 'train', 2, data_dir=str(root))
    assert path in str(e.value)


def test_glow_record_of_the_wrong_shape_is_named(tmp_path):
    rng = np.random.default_rng(0)
    write_glow_split(str(tmp_path), 'validation', 1, 1, rng)
    small = (CELEBA_SHAPE[0] // 2, CELEBA_SHAPE[1] // 2, CELEBA_SHAPE[2])
    (path,) = write_glow_split(str(tmp_path), 'train', 1, 1, rng, shape=small)
    ds = data.load_image_dataset('celeb_a_hq', 'train', 1, data_dir=str(tmp_path))
    with pytest.raises(tf.errors.InvalidArgumentError, match='wrong shape') as e:
        _collect(ds)
    assert os.path.basename(path) in str(e.value)


def test_glow_mixed_exports_are_refused(glow_root, tmp_path):
    root = tmp_path / 'celeba-tfr'
    shutil.copytree(glow_root['root'], root)
    write_glow_split(str(root), 'train', TRAIN_SHARDS + 1, 1, np.random.default_rng(1))
    with pytest.raises(data.DatasetFormatError, match='different shard counts'):
        data.locate_image_dataset('celeb_a_hq', str(root))


# ----------------------------------------------------------------------------
# The authors' .pth files (tests/data/reference-data)
# ----------------------------------------------------------------------------


def _expected(name, split):
    """The NHWC images expected.npz holds for dataset `name`'s `split` file."""
    rel = reference_pth.REFERENCE_PTH_FILES[name][split]
    key = os.path.splitext(rel)[0].replace(os.sep, '__')
    with np.load(EXPECTED) as f:
        return f[key]


@pytest.mark.parametrize('n_bits', [8, 5])
@pytest.mark.parametrize('name', ['celeb_a_hq', 'imagenet32', 'imagenet64'])
def test_reference_pth_every_image_both_splits(name, n_bits):
    source = data.locate_image_dataset(name, REFERENCE_DATA)
    assert source.kind == 'reference_pth' and source.paper_test_split
    for split in ('train', 'test'):
        got = _collect(
            data.load_image_dataset(
                name,
                split,
                2,
                data_dir=REFERENCE_DATA,
                n_bits=n_bits,
                shuffle=False,
                flip=False,
            )
        )
        np.testing.assert_array_equal(got, _expected(name, split) // 2 ** (8 - n_bits))


@pytest.mark.parametrize('n_bits', [5, 3])
def test_celeba_5bit_test_is_the_first_images_and_train_the_rest(monkeypatch, n_bits):
    everything = _expected('celeba_5bit', 'train')  # one file for both splits
    stored = data.dataset_info('celeba_5bit').stored_bits
    assert everything.max() <= 2**stored - 1
    # The fixture is small: move the boundary (5,000 in the real file) inside it.
    n_test = len(everything) // 2
    monkeypatch.setattr(reference_pth, 'CELEBA_5BIT_N_TEST', n_test)
    kw = dict(data_dir=REFERENCE_DATA, n_bits=n_bits, shuffle=False, flip=False)
    test = _collect(data.load_image_dataset('celeba_5bit', 'test', 3, **kw))
    train = _collect(data.load_image_dataset('celeba_5bit', 'train', 3, **kw))
    shift = stored - n_bits
    np.testing.assert_array_equal(test, everything[:n_test] >> shift)
    np.testing.assert_array_equal(train, everything[n_test:] >> shift)  # no test image
    with pytest.raises(ValueError, match='stored with 5 bits'):
        data.load_image_dataset('celeba_5bit', 'test', 3, data_dir=REFERENCE_DATA, n_bits=8)
    # A file too small to leave training images is refused with its size.
    monkeypatch.setattr(reference_pth, 'CELEBA_5BIT_N_TEST', len(everything))
    with pytest.raises(data.DatasetFormatError, match='none is left for training'):
        data.load_image_dataset('celeba_5bit', 'train', 3, data_dir=REFERENCE_DATA, n_bits=None)


def test_celeba_5bit_dataset_and_preset_follow_the_reference():
    info = data.dataset_info('celeba_5bit')
    assert info.image_shape == (64, 64, 3) and info.n_bits == info.stored_bits == 5
    assert info.n_test == reference_pth.CELEBA_5BIT_N_TEST and info.horizontal_flip
    assert models.preset_for_dataset('celeba_5bit') == 'celeba_5bit'
    preset = models.PRESETS['celeba_5bit']
    cfg = preset.config
    assert cfg.input_shape == info.image_shape and cfg.n_bits == info.n_bits
    # train_img.py's defaults for --data celeba_5bit: LogitTransform(0.05), swish,
    # 16-16-16, idim 512, FC end, no squeeze / factor-out, 2 exact terms, batch 64.
    assert cfg.logit_alpha == 0.05 and cfg.activation == 'lipswish'
    assert cfg.n_blocks == (16, 16, 16) and cfg.hidden_channels == 512 and cfg.fc_end
    assert not cfg.squeeze_first and not cfg.factor_out and cfg.n_exact_terms == 2
    assert preset.batch_size == 64 and preset.lr == 1e-3
    source = data.locate_image_dataset('celeba_5bit', REFERENCE_DATA)
    assert 'disjoint' in source.train_split


def test_reference_pth_is_memory_mapped_not_loaded():
    path = os.path.join(REFERENCE_DATA, reference_pth.REFERENCE_PTH_FILES['celeb_a_hq']['train'])
    images = reference_pth.read_reference_images(path, CELEBA_SHAPE)
    base = images
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)  # a view of the file, nothing copied
    assert not images.flags.writeable
    np.testing.assert_array_equal(images, _expected('celeb_a_hq', 'train'))


def test_reference_pth_in_the_legacy_format_is_memory_mapped_too(tmp_path):
    """Files written by PyTorch < 1.6 (the reference's era) use the legacy stream."""
    rel = reference_pth.REFERENCE_PTH_FILES['imagenet64']
    for split in ('train', 'test'):
        dst = tmp_path / rel[split]
        dst.parent.mkdir(parents=True, exist_ok=True)
        zip_to_legacy(os.path.join(REFERENCE_DATA, rel[split]), str(dst))
        assert not zipfile.is_zipfile(dst)
    images = reference_pth.read_reference_images(
        str(tmp_path / rel['train']), data.dataset_info('imagenet64').image_shape
    )
    base = images
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    for split in ('train', 'test'):
        got = _collect(
            data.load_image_dataset(
                'imagenet64', split, 2, data_dir=str(tmp_path), shuffle=False, n_bits=8
            )
        )
        np.testing.assert_array_equal(got, _expected('imagenet64', split))


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_reference_pth_unsafe_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / 'pwned'
    payload = pickle.dumps(_RunsCommand(f'touch {marker}'), protocol=2)
    for split in ('train', 'test'):
        path = tmp_path / reference_pth.REFERENCE_PTH_FILES['imagenet32'][split]
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, 'w') as zf:
            zf.writestr('archive/data.pkl', payload)
            zf.writestr('archive/byteorder', 'little')
    with pytest.raises(torch_format.UnsafeCheckpointError, match='system'):
        data.load_image_dataset('imagenet32', 'train', 2, data_dir=str(tmp_path))
    assert not marker.exists()


def test_reference_pth_of_the_wrong_shape_or_kind_is_named(tmp_path):
    target = tmp_path / reference_pth.REFERENCE_PTH_FILES['imagenet32']['train']
    target.parent.mkdir(parents=True)
    shutil.copy(
        os.path.join(REFERENCE_DATA, reference_pth.REFERENCE_PTH_FILES['imagenet64']['train']),
        target,
    )
    h, w, c = data.dataset_info('imagenet32').image_shape
    with pytest.raises(
        data.DatasetFormatError, match=rf'shape .* expected \[N, {c}, {h}, {w}\]'
    ) as e:
        data.load_image_dataset('imagenet32', 'train', 2, data_dir=str(tmp_path))
    assert str(target) in str(e.value)
    target.write_bytes(b'not a torch file')
    with pytest.raises(data.DatasetFormatError, match='not a readable torch.save file'):
        data.load_image_dataset('imagenet32', 'train', 2, data_dir=str(tmp_path))


def test_reference_pth_workers_read_their_own_blocks():
    name = 'imagenet32'
    expected = _expected(name, 'train')
    n_workers = 2
    parts = []
    for worker in range(n_workers):
        ctx = tf.distribute.InputContext(n_workers, worker, n_workers)
        parts.append(
            _collect(
                data.load_image_dataset(
                    name,
                    'train',
                    1,
                    data_dir=REFERENCE_DATA,
                    shuffle=False,
                    input_context=ctx,
                )
            )
        )
    assert all(len(p) for p in parts)
    assert sorted(_multiset(np.concatenate(parts))) == _multiset(expected)


# ----------------------------------------------------------------------------
# Missing data, in seconds
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, places',
    [
        ('celeb_a_hq', ('Glow TFRecords', "the authors' .pth", 'TFDS', glow.GLOW_CELEBA_HQ_URL)),
        ('celeba_5bit', ("the authors' .pth", 'celeba_full_64x64_5bit.pth', 'flowpp')),
        ('imagenet32', ("the authors' .pth", 'valid_32x32.pth', '.npz files', 'train*.npz')),
        ('imagenet64', ("the authors' .pth", 'train_64x64.pth', '.npz files', 'val*.npz')),
        ('mnist', ('TFDS', 'download=True')),
    ],
)
def test_missing_dataset_names_every_place_within_the_limit(tmp_path, name, places):
    # Downloads allowed where no network is needed to find out (TFDS mnist: see below).
    download = 'tfds' not in data.dataset_info(name).sources or name == 'celeb_a_hq'
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_image_dataset(
            name, 'train', 8, data_dir=str(tmp_path), download=download, n_bits=None
        )
    elapsed = time.monotonic() - start
    assert elapsed < LOAD_LIMIT_S, elapsed
    msg = str(e.value)
    assert name in msg and str(tmp_path) in msg and 'Looked for' in msg
    for place in places:
        assert place in msg, (place, msg)


def _refuse_network(monkeypatch):
    """Every name lookup and connection of this process fails, as without a network."""

    def no_lookup(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

    def no_route(self, *args, **kwargs):
        raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

    monkeypatch.setattr(socket, 'getaddrinfo', no_lookup)
    monkeypatch.setattr(socket.socket, 'connect', no_route)
    monkeypatch.setattr(socket.socket, 'connect_ex', no_route)


def test_download_without_network_fails_fast_saying_so(tmp_path, monkeypatch):
    _refuse_network(monkeypatch)
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError, match='network is unreachable') as e:
        data.load_image_dataset('mnist', 'train', 8, data_dir=str(tmp_path), download=True)
    elapsed = time.monotonic() - start
    assert elapsed < OFFLINE_LIMIT_S, elapsed
    assert 'storage.googleapis.com' in str(e.value)
    assert network.network_unreachable_reason('storage.googleapis.com') is not None


def test_network_check_goes_through_the_proxy(monkeypatch):
    closed = _closed_port()
    monkeypatch.setenv('https_proxy', f'http://127.0.0.1:{closed}')
    reason = network.network_unreachable_reason('storage.googleapis.com')
    assert reason is not None and f'127.0.0.1:{closed}' in reason and 'proxy' in reason
    monkeypatch.setenv('no_proxy', 'storage.googleapis.com')
    reason = network.network_unreachable_reason('storage.googleapis.com')
    assert reason is None or 'proxy' not in reason


def _closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run_trainer(tmp_path, *args, env=None):
    env = dict(os.environ if env is None else env)
    env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, 'train', 'main.py'), *args],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, time.monotonic() - start


def test_trainer_missing_dataset_exits_2_before_any_work(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    run_dir = tmp_path / 'run'
    proc, elapsed = _run_trainer(
        tmp_path, '--dataset=celeb_a_hq', f'--data_dir={empty}', f'--out={run_dir}'
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert elapsed < TRAINER_LIMIT_S, elapsed
    err = proc.stderr
    for place in ('Glow TFRecords', "the authors' .pth", 'TFDS', str(empty)):
        assert place in err
    assert 'Traceback' not in err
    assert not run_dir.exists()  # nothing written, no model built


def test_trainer_offline_download_exits_2_saying_the_network_is_unreachable(tmp_path):
    """The network is unreachable for the child: every proxy variable names a closed port."""
    proxy = f'http://127.0.0.1:{_closed_port()}'
    env = dict(os.environ)
    for var in ('http_proxy', 'https_proxy', 'all_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY'):
        env[var] = proxy
    env.pop('no_proxy', None)
    env.pop('NO_PROXY', None)
    proc, elapsed = _run_trainer(
        tmp_path,
        '--dataset=mnist',
        f'--data_dir={tmp_path / "tfds"}',
        f'--out={tmp_path / "run"}',
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert elapsed < OFFLINE_LIMIT_S, elapsed
    assert 'network is unreachable' in proc.stderr and proxy in proc.stderr


# ----------------------------------------------------------------------------
# The trainer on 256x256 Glow-format data, and the honest name of TFDS's split
# ----------------------------------------------------------------------------

SMALL_MODEL = tiny_flags(
    download=DEFAULT, n_sample_images=1, batch_size=2, eval_examples=2, steps=2
)


def test_trainer_trains_on_glow_tfrecords(glow_root, tmp_path):
    """`train/main.py --dataset=celeb_a_hq --data_dir=<celeba-tfr>`: a small model on the
    256x256 images, two steps, then the test bits/dim on Glow's validation shard. In a
    subprocess, as users run it (rflow_tf imported before TensorFlow: oneDNN on)."""
    run_dir = tmp_path / 'run'
    proc, _ = _run_trainer(
        tmp_path,
        *SMALL_MODEL,
        '--dataset=celeb_a_hq',
        f'--data_dir={glow_root["root"]}',
        f'--out={run_dir}',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Glow's TFRecords" in proc.stdout and 'final test bits/dim' in proc.stdout
    saved = json.load(open(run_dir / 'results.json'))
    assert saved['step'] == 2 and np.isfinite(saved['test_bpd'])
    assert saved['eval_name'] == 'test' and saved['data_source']['kind'] == 'glow_tfrecords'
    cfg = json.load(open(run_dir / 'config.json'))['flow_config']
    assert tuple(cfg['input_shape']) == CELEBA_SHAPE
    assert cfg['n_bits'] == data.dataset_info('celeb_a_hq').n_bits


def test_tfds_celeb_a_hq_split_is_not_the_papers(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        source = data.locate_image_dataset('celeb_a_hq', str(tmp_path), download=False)
    assert source.kind == 'tfds' and not source.paper_test_split
    assert source.eval_name == 'held-out' and "NOT the paper's test set" in source.test_split
    assert 'held-out = ' in source.describe()


def test_trainer_names_a_held_out_split_for_what_it_is(tmp_path, capsys, tb_scalars):
    """Every printed and written result of a run whose evaluation split is not the
    paper's test set (TFDS CelebA-HQ) says "held-out" and what the split is; the
    reporting is checked on the digits, whose tiny model trains in seconds."""
    from rflow_tf.training import Trainer

    options = tiny_options(
        tmp_path,
        steps=1,
        eval_every=1,
        n_sample_images=1,
        eval_examples=4,
        batch_size=DEFAULT,
        download=DEFAULT,
    )
    trainer = Trainer(None, options)
    own_split = "our own 10% of the training images, NOT the paper's test set"
    trainer.data_source = dataclasses.replace(
        trainer.data_source, paper_test_split=False, test_split=own_split
    )
    result = trainer.fit()
    out = capsys.readouterr().out
    assert 'held-out bits/dim' in out and own_split in out
    assert 'test bits/dim' not in out
    saved = json.load(open(tmp_path / 'results.json'))
    assert saved['eval_name'] == result['eval_name'] == 'held-out'
    assert saved['eval_split'] == own_split
    assert tb_scalars(str(tmp_path), 'held_out/bpd') and not tb_scalars(str(tmp_path), 'test/bpd')
