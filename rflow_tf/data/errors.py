"""The errors of `rflow_tf.data`: data that is missing, and data that is damaged."""


class DatasetNotFoundError(Exception):
    """Raised when the data for a requested dataset is not available.

    The message states what is missing, every place it was looked for (Glow's
    TFRecords, the reference's `.pth` files, `.npz` files, the TFDS data
    directory, as they apply to the dataset) and how to obtain it. It is
    raised instead of the (long) TFDS / network / file-system error, whose
    one-line summary is included in the message. A download that cannot
    start because the network is unreachable raises it too, within seconds.

    #### Examples

    ```python
    try:
        ds = load_image_dataset('mnist', 'train', 64, download=False)
    except DatasetNotFoundError as e:
        print(e)   # says where it looked and what to do
    ```
    """


class DatasetFormatError(ValueError):
    """Raised when data files exist but cannot be read as the dataset.

    The message names the file and the problem: a corrupt or truncated
    TFRecord shard, a `.pth` tensor of the wrong shape or type, shard names
    that disagree. It is a `ValueError`, as a malformed `.npz` file's error is.

    #### Examples

    ```python
    try:
        ds = load_image_dataset('celeb_a_hq', 'train', 8, data_dir='/data/celeba-tfr')
    except DatasetFormatError as e:
        print(e)   # e.g. ".../train-r08-s-0007-of-0120.tfrecords: corrupt TFRecord file ..."
    ```
    """
