"""Which of a dataset's sources holds its data: scikit-learn digits, Glow's
TFRecords, the authors' `.pth` files, ImageNet `.npz` files or TFDS.

`locate_source` decides, before any slow work, which of a dataset's sources
holds its data (`DataSource`: what is read from where, and what its test
split is); data that is missing raises `DatasetNotFoundError`, whose message
names every place looked in and how to get the data. The readers of the
sources are `rflow_tf.data.readers` (TFDS, `.npz` files and digits; its
`tfds_dataset`, `npz_dataset` and `digits_split` are importable from here
too), `rflow_tf.data.glow` and `rflow_tf.data.reference_pth`.

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
import os
import warnings
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from rflow_tf.data import glow, reference_pth
from rflow_tf.data.errors import DatasetNotFoundError
from rflow_tf.data.network import NETWORK_TIMEOUT  # noqa: F401  (re-exported)
from rflow_tf.data.readers import (  # noqa: F401  (digits_split, npz_dataset, tfds_dataset re-exported)
    default_data_dir,
    digits_split,
    npz_dataset,
    npz_files,
    npz_help,
    raise_if_offline,
    tfds_available,
    tfds_dataset,
    tfds_help,
)

if TYPE_CHECKING:
    from rflow_tf.data.catalog import ImageDatasetInfo

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
    found = {split: npz_files(info, split == 'train', root) for split in ('train', 'test')}
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


def _tfds_candidate(
    info, data_dir: Optional[str], root: str, download: bool, manual_dir: Optional[str], looked
) -> Optional[DataSource]:
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
    if tfds_available(info, data_dir):
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
    raise_if_offline(info, root, manual_dir)
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
    'npz': lambda info: 'ImageNet ' + npz_help(info)[len('ImageNet ') :],
}


def _help_for(info, kind: str, root: str, manual_dir: Optional[str]) -> str:
    if kind == 'tfds':
        manual = os.path.expanduser(manual_dir or os.path.join(root, 'downloads', 'manual'))
        return 'TFDS: ' + tfds_help(info, root, manual)
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
    root = os.path.expanduser(data_dir) if data_dir else default_data_dir()
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
