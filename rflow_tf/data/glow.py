"""Glow's preprocessed CelebA-HQ (`celeba-tfr`), read directly with `tf.data`.

The paper (following Glow, Kingma & Dhariwal 2018) trains CelebA-HQ 256x256 on
the 27,000 images of Glow's training shards and reports test bits/dim on the
3,000 images of its validation shards. Glow distributes them as
`celeba-tfr.tar` (https://storage.googleapis.com/glow-demo/data/celeba-tfr.tar);
extracted, it is a folder holding

```none
train/train-r08-s-0000-of-0120.tfrecords ... train-r08-s-0119-of-0120.tfrecords
validation/validation-r08-s-0000-of-0040.tfrecords ... -0039-of-0040.tfrecords
```

(`r08`: 2**8 = 256 pixels a side). Every record is a `tf.train.Example` with
`shape` (int64 [3], `[256, 256, 3]`), `data` (the raw uint8 pixels, H*W*C
bytes in row-major HWC order), `label` (int64 [1]) and `attr` (int64 [40]);
only `shape` and `data` are read here.

`find_glow_shards` lists a split's shards and names the missing ones (Glow
itself checks that all n are present); `check_tfrecord_file` walks a file's
record headers (length and length checksum) so that a damaged or truncated
file is named before training starts; `glow_dataset` reads the shards with a
parallel interleave, sharded by file when several input pipelines (workers)
share the work. `rflow_tf.data.load_image_dataset('celeb_a_hq', ...)` uses
them when `data_dir` points at the extracted folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from typing import Optional, Sequence, Tuple

import tensorflow as tf

from rflow_tf.data.errors import DatasetFormatError

#: Where Glow's CelebA-HQ TFRecords can be downloaded (one tar file).
GLOW_CELEBA_HQ_URL = 'https://storage.googleapis.com/glow-demo/data/celeba-tfr.tar'

#: Sub-folder of each split of `load_image_dataset` in Glow's layout.
GLOW_SPLIT_FOLDERS = {'train': 'train', 'test': 'validation'}

_SHARD_NAME = re.compile(
    r'^(?P<split>[a-z]+)-r(?P<res>\d+)-s-(?P<index>\d+)-of-(?P<count>\d+)\.tfrecords$'
)


@dataclasses.dataclass(frozen=True)
class GlowShards:
    """The TFRecord shards of one split of Glow's `celeba-tfr` folder.

    Attributes:
      folder: The split's folder (e.g. `<root>/validation`).
      files: Paths of the shards present, in shard-index order.
      n_expected: The shard count their names announce (`-of-0040`).
      missing: Indices of the announced shards that are absent.

    #### Examples

    ```python
    import os
    import numpy as np
    import tensorflow as tf
    from rflow_tf.data.glow import find_glow_shards

    def write_shard(path, images):   # Glow's record format: shape + raw HWC bytes
        with tf.io.TFRecordWriter(path) as w:
            for im in images:
                f = {"shape": tf.train.Feature(int64_list=tf.train.Int64List(value=im.shape)),
                     "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[im.tobytes()]))}
                w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())

    os.makedirs("celeba-tfr/validation")
    images = np.zeros([2, 8, 8, 3], np.uint8)   # 8x8 images: resolution 8 is "r03"
    for i in (0, 2):                              # shard 1 of 3 is missing
        write_shard(f"celeba-tfr/validation/validation-r03-s-{i:04d}-of-0003.tfrecords", images)
    shards = find_glow_shards("celeba-tfr", "test", resolution=8)
    print(len(shards.files), shards.n_expected, shards.missing)   # 2 3 (1,)
    assert (len(shards.files), shards.n_expected, shards.missing) == (2, 3, (1,))
    ```
    """

    folder: str
    files: Tuple[str, ...]
    n_expected: int
    missing: Tuple[int, ...]

    def missing_message(self) -> str:
        """A one-paragraph warning naming the missing shards ('' when complete).

        #### Examples

        ```python
        import os
        from rflow_tf.data.glow import find_glow_shards

        os.makedirs("celeba-tfr/validation")
        for i in (0, 1, 3):                   # shard 2 of 4 is absent (empty files suffice)
            open(f"celeba-tfr/validation/validation-r08-s-{i:04d}-of-0004.tfrecords", "wb").close()
        shards = find_glow_shards("celeba-tfr", "test")
        print(shards.missing_message())      # ... 1 of the 4 shards are missing (shard 0002) ...
        assert "shard 0002" in shards.missing_message()
        ```
        """
        if not self.missing:
            return ''
        shown = ', '.join(f'{i:04d}' for i in self.missing[:10])
        more = f' and {len(self.missing) - 10} more' if len(self.missing) > 10 else ''
        return (
            f'Glow TFRecords in {self.folder}: {len(self.missing)} of the {self.n_expected} '
            f'shards are missing (shard {shown}{more}); reading the {len(self.files)} present, '
            f'so this split is incomplete and its results are not comparable with the '
            f"paper's. Re-extract {GLOW_CELEBA_HQ_URL.rsplit('/', 1)[-1]} to restore them."
        )


def glow_root_candidates(data_dir: str) -> Tuple[str, ...]:
    """The folders that may hold Glow's `train/` and `validation/` under `data_dir`.

    `data_dir` itself (the extracted `celeba-tfr` folder), `data_dir/celeba-tfr`,
    and `data_dir/celebahq/celeba-tfr` (where the authors' README extracts it
    inside their `data/` folder).

    #### Examples

    ```python
    glow_root_candidates('/data')
    # ('/data', '/data/celeba-tfr', '/data/celebahq/celeba-tfr')
    ```
    """
    return (
        data_dir,
        os.path.join(data_dir, 'celeba-tfr'),
        os.path.join(data_dir, 'celebahq', 'celeba-tfr'),
    )


def find_glow_shards(root: str, split: str, resolution: int = 256) -> Optional[GlowShards]:
    """The shards of `split` (`'train'` or `'test'`) under Glow's folder `root`.

    Looks for `root/train/train-r08-s-*-of-*.tfrecords` (`'train'`) or
    `root/validation/validation-r08-s-*-of-*.tfrecords` (`'test'`), `r08`
    standing for `resolution` 256.

    Args:
      root: The extracted `celeba-tfr` folder (holding `train/`, `validation/`).
      split: `'train'` or `'test'`.
      resolution: Image side in pixels, a power of 2.

    Returns:
      A `GlowShards`, or `None` when the folder holds no shard of this split.

    Raises:
      DatasetFormatError: the shard names announce different counts.

    #### Examples

    ```python
    import os
    from rflow_tf.data.glow import find_glow_shards

    os.makedirs("celeba-tfr/train")
    for i in range(3):                       # names only: the files are not read here
        open(f"celeba-tfr/train/train-r08-s-{i:04d}-of-0003.tfrecords", "wb").close()
    shards = find_glow_shards("celeba-tfr", "train")
    assert shards.n_expected == 3 and shards.missing == ()
    assert find_glow_shards("celeba-tfr", "test") is None    # no validation/ folder
    ```
    """
    folder_name = GLOW_SPLIT_FOLDERS[split]
    folder = os.path.join(root, folder_name)
    if not os.path.isdir(folder):
        return None
    res = f'{int(resolution).bit_length() - 1:02d}'
    found, counts = {}, set()
    for name in os.listdir(folder):
        m = _SHARD_NAME.match(name)
        if not m or m.group('split') != folder_name or m.group('res') != res:
            continue
        found[int(m.group('index'))] = os.path.join(folder, name)
        counts.add(int(m.group('count')))
    if not found:
        return None
    if len(counts) != 1:
        raise DatasetFormatError(
            f'Glow TFRecords in {folder}: the shard names announce different shard counts '
            f'({sorted(counts)}); the folder mixes two exports. Keep one of them.'
        )
    (n_expected,) = counts
    beyond = sorted(i for i in found if i >= n_expected)
    if beyond:
        raise DatasetFormatError(
            f'Glow TFRecords in {folder}: shard indices {beyond} are outside 0..{n_expected - 1} '
            f'announced by their names.'
        )
    missing = tuple(i for i in range(n_expected) if i not in found)
    return GlowShards(
        folder=folder,
        files=tuple(found[i] for i in sorted(found)),
        n_expected=n_expected,
        missing=missing,
    )


# ----------------------------------------------------------------------------
# Structure check of a TFRecord file (record headers only).
# ----------------------------------------------------------------------------


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (Castagnoli) of `data`."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def check_tfrecord_file(path: str) -> int:
    """Walks the record headers of a TFRecord file; returns its number of records.

    Each record is `uint64 length`, `uint32 masked CRC-32C of length`,
    `length` bytes, `uint32 masked CRC-32C of the bytes`. The lengths and
    their checksums are verified and the records must end exactly at the end
    of the file; the record bytes themselves are skipped (so a 40 MB shard is
    checked in about a millisecond). This catches truncated, overwritten and
    non-TFRecord files up front, with the file's name, instead of a
    `DataLossError` in the middle of an epoch.

    Raises:
      DatasetFormatError: naming the file, the record and the byte offset.

    #### Examples

    ```python
    import tensorflow as tf
    from rflow_tf.data.errors import DatasetFormatError
    from rflow_tf.data.glow import check_tfrecord_file

    with tf.io.TFRecordWriter("shard.tfrecords") as w:
        for record in (b"first", b"second", b"third"):
            w.write(record)
    assert check_tfrecord_file("shard.tfrecords") == 3

    data = open("shard.tfrecords", "rb").read()
    open("truncated.tfrecords", "wb").write(data[:-5])    # cut inside the last record
    try:
        check_tfrecord_file("truncated.tfrecords")
    except DatasetFormatError as e:
        print(e)   # truncated.tfrecords: corrupt TFRecord file, record 2 (...) runs past the end
    ```
    """
    size = os.path.getsize(path)
    count, offset = 0, 0
    with open(path, 'rb') as f:
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                raise DatasetFormatError(
                    f'{path}: corrupt TFRecord file, truncated header of record {count} at '
                    f'byte {offset} (file size {size}).'
                )
            (length,) = struct.unpack('<Q', header[:8])
            (length_crc,) = struct.unpack('<I', header[8:])
            if _masked_crc32c(header[:8]) != length_crc:
                raise DatasetFormatError(
                    f'{path}: corrupt TFRecord file, the length checksum of record {count} at '
                    f'byte {offset} does not match (not a TFRecord file, or damaged).'
                )
            offset += 12 + length + 4
            if offset > size:
                raise DatasetFormatError(
                    f'{path}: corrupt TFRecord file, record {count} ({length} bytes) runs past '
                    f'the end of the file (truncated at {size} bytes).'
                )
            f.seek(offset)
            count += 1
    return count


# ----------------------------------------------------------------------------
# The tf.data pipeline.
# ----------------------------------------------------------------------------


def _parse_fn(image_shape: Tuple[int, int, int]):
    expected = tf.constant(image_shape, tf.int64)
    features = {
        'shape': tf.io.FixedLenFeature([3], tf.int64),
        'data': tf.io.FixedLenFeature([], tf.string),
    }

    def parse(record, path):
        example = tf.io.parse_single_example(record, features)
        check = tf.debugging.Assert(
            tf.reduce_all(tf.equal(example['shape'], expected)),
            [
                f'Glow TFRecord image of the wrong shape (expected {list(image_shape)}) in',
                path,
                'with shape',
                example['shape'],
            ],
        )
        with tf.control_dependencies([check]):
            pixels = tf.io.decode_raw(example['data'], tf.uint8)
        return tf.reshape(pixels, image_shape)

    return parse


def files_for_worker(files: Sequence[str], input_context, what: str) -> list:
    """The files one input pipeline (worker) reads: files[i::n] for pipeline i
    of n (``tf.distribute.InputContext``; all of them without one). Data is
    sharded by file, never by element, so no worker reads another's images.

    Args:
      files: the files of the dataset, in a fixed order.
      input_context: a ``tf.distribute.InputContext``, or None.
      what: what the files are, for the message.

    Returns:
      The list of files of this pipeline.

    Raises:
      ValueError: fewer files than pipelines (naming ``what``).

    Example:
    ```python
    import tensorflow as tf
    from rflow_tf.data.glow import files_for_worker

    shards = ["s0", "s1", "s2", "s3", "s4"]
    assert files_for_worker(shards, None, "shards") == shards
    second = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
    assert files_for_worker(shards, second, "shards") == ["s1", "s3"]
    try:
        files_for_worker(["s0"], second, "shards")
    except ValueError as error:
        assert str(error).startswith("1 shards cannot be split by file over 2 input pipelines")
    else:
        raise AssertionError("one file was split over two workers")
    ```
    """
    files = list(files)
    if input_context is not None and input_context.num_input_pipelines > 1:
        n_pipes = input_context.num_input_pipelines
        if len(files) < n_pipes:
            raise ValueError(
                f'{len(files)} {what} cannot be split by file over {n_pipes} input '
                'pipelines (workers); every worker needs a file of its own.'
            )
        files = files[input_context.input_pipeline_id :: n_pipes]
    return files


def glow_dataset(
    files: Sequence[str],
    image_shape: Tuple[int, int, int],
    *,
    shuffle: bool,
    seed: Optional[int],
    input_context: Optional[tf.distribute.InputContext] = None,
    cycle_length: int = 8,
) -> tf.data.Dataset:
    """A dataset of single uint8 images `[H, W, C]` from Glow TFRecord shards.

    The shards are read with a parallel interleave (`cycle_length` at a
    time, one record from each in turn) and deterministic order; with
    `shuffle` the shard order is reshuffled every epoch (seeded by `seed`;
    shuffle the examples afterwards too, as `load_image_dataset` does). With
    an `input_context` of several input pipelines (one per worker), pipeline
    `i` reads only the shards `i, i + n, i + 2n, ...`: sharded by file, never
    by element, so no worker reads another's files.

    Every record's `shape` feature must equal `image_shape`; otherwise reading
    fails with an `InvalidArgumentError` naming the file and the shape.

    Args:
      files: The shard paths (e.g. `find_glow_shards(...).files`).
      image_shape: `(H, W, C)` of every image.
      shuffle: Reshuffle the shard order every epoch.
      seed: Seed of that shuffle (or `None`).
      input_context: A `tf.distribute.InputContext`, or `None` (one pipeline).
      cycle_length: Shards read concurrently.

    Raises:
      ValueError: fewer shards than input pipelines.

    #### Examples

    ```python
    import os
    import numpy as np
    import tensorflow as tf
    from rflow_tf.data.glow import find_glow_shards, glow_dataset

    def write_shard(path, images):   # Glow's record format: shape + raw HWC bytes
        with tf.io.TFRecordWriter(path) as w:
            for im in images:
                f = {"shape": tf.train.Feature(int64_list=tf.train.Int64List(value=im.shape)),
                     "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[im.tobytes()]))}
                w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())

    os.makedirs("celeba-tfr/validation")
    for i in range(2):                      # 2 shards of 3 images of 8x8x3, pixel value 10 i + k
        images = np.stack([np.full([8, 8, 3], 10 * i + k, np.uint8) for k in range(3)])
        write_shard(f"celeba-tfr/validation/validation-r03-s-{i:04d}-of-0002.tfrecords", images)
    shards = find_glow_shards("celeba-tfr", "test", resolution=8)
    ds = glow_dataset(shards.files, (8, 8, 3), shuffle=False, seed=None)
    firsts = [int(x[0, 0, 0]) for x in ds]    # one record from each shard in turn
    print(firsts)                             # [0, 10, 1, 11, 2, 12]
    assert sorted(firsts) == [0, 1, 2, 10, 11, 12]
    ```
    """
    files = files_for_worker(files, input_context, 'Glow TFRecord shard(s)')
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and len(files) > 1:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    parse = _parse_fn(tuple(int(d) for d in image_shape))

    def read(path):
        records = tf.data.TFRecordDataset(path, buffer_size=8 * 2**20)
        return records.map(lambda r: parse(r, path))

    return files_ds.interleave(
        read,
        cycle_length=max(1, min(int(cycle_length), len(files))),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
