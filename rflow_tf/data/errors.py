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
    import os
    from rflow_tf.data import DatasetNotFoundError, load_image_dataset

    os.makedirs("empty")
    try:
        ds = load_image_dataset("mnist", "train", 64, data_dir="empty", download=False)
        raise AssertionError("an empty folder holds no MNIST")
    except DatasetNotFoundError as e:
        print(e)   # says where it looked and what to do
        assert "empty" in str(e)
    ```
    """


class DatasetFormatError(ValueError):
    """Raised when data files exist but cannot be read as the dataset.

    The message names the file and the problem: a corrupt or truncated
    TFRecord shard, a `.pth` tensor of the wrong shape or type, shard names
    that disagree. It is a `ValueError`, as a malformed `.npz` file's error is.

    #### Examples

    ```python
    import os
    from rflow_tf.data import DatasetFormatError, load_image_dataset

    for folder in ("train", "validation"):      # Glow's layout, but the shards hold junk
        os.makedirs(f"celeba-tfr/{folder}")
        with open(f"celeba-tfr/{folder}/{folder}-r08-s-0000-of-0001.tfrecords", "wb") as f:
            f.write(b"not a TFRecord file")
    try:
        ds = load_image_dataset("celeb_a_hq", "train", 8, data_dir="celeba-tfr")
        raise AssertionError("junk shards are not a dataset")
    except DatasetFormatError as e:
        print(e)   # ".../train-r08-s-0000-of-0001.tfrecords: corrupt TFRecord file ..."
        assert "train-r08-s-0000-of-0001.tfrecords" in str(e)
    ```
    """
