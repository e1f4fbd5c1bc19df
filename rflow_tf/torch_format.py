"""Read PyTorch ``.pth`` checkpoints without PyTorch, safely.

A checkpoint written by ``torch.save`` is a pickle, and unpickling runs
whatever callables the file names: loading an untrusted checkpoint with
``pickle`` (or ``torch.load`` without ``weights_only``) can execute arbitrary
code. :func:`read_checkpoint` instead uses a restricted unpickler that

* rebuilds tensors as NumPy arrays (``torch._utils._rebuild_tensor_v2`` and
  ``_rebuild_parameter`` over the file's typed storages);
* allows only ``collections.OrderedDict``, ``argparse.Namespace`` and the
  builtin ``set`` / ``frozenset`` besides;
* replaces every class of the authors' reference code (``resflows.*``) and of
  ``torch.nn.modules.*`` -- pickled inside the reference's ``ema`` object,
  which holds the whole model -- by an inert :class:`PickledObject` stub that
  records the class name and the pickled state, without importing or running
  anything;
* refuses everything else with :class:`UnsafeCheckpointError` naming the
  global, before it is looked up.

Both of ``torch.save``'s formats are read: the zip archive (PyTorch >= 1.6:
``NAME/data.pkl`` plus one file per storage under ``NAME/data/``) and the
legacy stream (magic number, protocol, system info, the object pickle, the
storage keys, then each storage as an int64 element count and raw bytes).

``read_checkpoint(path, mmap=True)`` memory-maps every storage instead of
reading it (a zip member must be stored uncompressed, as ``torch.save``
writes it): tensors are then read-only strided views of the file, so a
5 GB dataset tensor costs no RAM until its pages are read.

Example:
```python
import pathlib
import rflow_tf
from rflow_tf import torch_format

# A checkpoint of the authors' train_img.py (a small MNIST model, in the repository's tests).
repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]
ckpt = torch_format.read_checkpoint(repo / "tests/data/reference/mnist16.pth")
print(ckpt["args"].nblocks)                                   # '2-2-2'
w = ckpt["state_dict"]["transforms.0.chain.2.nnet.0.weight"]  # a NumPy array (O, I, H, W)
assert w.shape == (32, 1, 3, 3)
print(ckpt["ema"])   # <pickled resflows.utils.ExponentialMovingAverage>: an inert stub
```
"""

import argparse
import collections
import functools
import io
import os
import pickle
import struct
import zipfile

import numpy as np

__all__ = [
    "CheckpointFormatError",
    "PickledObject",
    "UnsafeCheckpointError",
    "read_checkpoint",
]


class CheckpointFormatError(ValueError):
    """The file is not a readable ``torch.save`` checkpoint: not a zip archive
    nor a legacy pickle stream, or a damaged, truncated or big-endian one.

    Example:
    ```python
    import pathlib
    from rflow_tf.torch_format import CheckpointFormatError, read_checkpoint

    pathlib.Path("notes.pth").write_text("not a checkpoint")
    try:
        read_checkpoint("notes.pth")
    except CheckpointFormatError as error:
        assert "not a readable torch.save checkpoint" in str(error)
    else:
        raise AssertionError("a text file was read as a checkpoint")
    ```
    """


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global that is neither needed to
    rebuild tensors nor a class of the reference code; nothing was run.

    Example:
    ```python
    import os
    import pickle
    import zipfile
    from rflow_tf.torch_format import UnsafeCheckpointError, read_checkpoint

    class RunsCode:  # what a malicious checkpoint pickles
        def __reduce__(self):
            return (os.system, ("echo this would have run",))

    with zipfile.ZipFile("evil.pth", "w") as zf:  # the layout torch.save writes
        zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": RunsCode()}))
    try:
        read_checkpoint("evil.pth")
    except UnsafeCheckpointError as error:
        assert "nothing was executed" in str(error) and "system" in str(error)
    else:
        raise AssertionError("the pickle was not refused")
    ```
    """


#: torch storage class -> NumPy dtype (little-endian).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
#: Prefixes of modules whose classes are replaced by inert stubs.
_STUBBED_MODULE_PREFIXES = ("resflows.", "torch.nn.modules.")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class PickledObject:
    """Inert stand-in for an object of a class we do not import (the
    reference's modules and ``ExponentialMovingAverage``).

    ``pickled_class`` is "module.Name"; the pickled state is available as
    attributes (``obj.shadow_params``) when it was a dict, else as ``state``;
    constructor arguments (if any) as ``args``. Nothing of the pickled class
    runs: unpickling sets attributes only.

    Example:
    ```python
    import pathlib
    import rflow_tf
    from rflow_tf.torch_format import PickledObject, read_checkpoint

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]  # the repository's test data
    ema = read_checkpoint(repo / "tests/data/reference/mnist16.pth")["ema"]
    assert isinstance(ema, PickledObject)
    assert ema.pickled_class == "resflows.utils.ExponentialMovingAverage"
    assert 0 < ema.decay < 1 and len(ema.shadow_params) > 0  # its pickled state
    ```
    """

    pickled_class = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = {**state[0], **(state[1] or {})}  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["state"] = state

    def __repr__(self):
        return f"<pickled {self.pickled_class}>"


_stub_types = {}


def _stub(module, name):
    key = f"{module}.{name}"
    if key not in _stub_types:
        _stub_types[key] = type(
            name, (PickledObject,), {"pickled_class": key, "__module__": __name__}
        )
    return _stub_types[key]


class _StorageType:
    """A torch storage class named in the pickle: only its element dtype."""

    def __init__(self, name):
        self.name = name
        dtype = _STORAGE_DTYPES[name]
        self.dtype = None if dtype == "bfloat16" else np.dtype(dtype)
        self.itemsize = 2 if dtype == "bfloat16" else self.dtype.itemsize

    def from_file(self, path, offset, numel):
        """A read-only memory map of ``numel`` elements at byte ``offset`` of ``path``."""
        if self.dtype is None:
            raise CheckpointFormatError("bfloat16 storages cannot be memory-mapped")
        numel = int(numel)
        end = int(offset) + numel * self.itemsize
        if end > os.path.getsize(path):
            raise CheckpointFormatError(
                f"{path}: storage of {numel} {self.name} elements at byte {offset} is truncated"
            )
        if numel == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(path, self.dtype, mode="r", offset=int(offset), shape=(numel,))

    def from_bytes(self, raw, numel=None):
        count = len(raw) // self.itemsize if numel is None else int(numel)
        if count * self.itemsize > len(raw):
            raise CheckpointFormatError(f"storage of {count} {self.name} elements is truncated")
        if self.dtype is None:  # bfloat16: the upper half of a float32
            half = np.frombuffer(raw, "<u2", count)
            return (half.astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, self.dtype, count)


def _rebuild_tensor(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad=False,
    backward_hooks=None,
    metadata=None,
    *,
    keep_view=False,
):
    """The tensor as a NumPy array: a copy, or with ``keep_view`` the strided
    read-only view of its storage (a memory map when ``mmap=True``)."""
    if isinstance(storage, _LegacyStorage):  # bytes not read yet: resolved later
        return _LegacyTensor((storage, storage_offset, size, stride), keep_view)
    if not isinstance(storage, np.ndarray):
        raise CheckpointFormatError("a tensor refers to something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
        if min(size) > 0 and (offset < 0 or last >= storage.size or min(stride) < 0):
            raise CheckpointFormatError(
                f"tensor of size {size} and stride {stride} at offset {offset} does not fit "
                f"its storage of {storage.size} elements"
            )
    elif offset >= storage.size:
        raise CheckpointFormatError("scalar tensor outside its storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return view if keep_view else np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals listed in the module docstring."""

    def __init__(self, file, load_storage, keep_views=False):
        super().__init__(file, encoding="latin1")
        self._load_storage = load_storage
        self._keep_views = keep_views

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2") and self._keep_views:
            return functools.partial(_rebuild_tensor, keep_view=True)
        if (module, name) in _TENSOR_GLOBALS:
            return _TENSOR_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module.startswith(_STUBBED_MODULE_PREFIXES) and name.isidentifier():
            return _stub(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load the checkpoint: its pickle asks for the global "
            f"'{module}.{name}', which is not needed to rebuild tensors (a checkpoint is "
            "untrusted input and unpickling that global could run code); nothing was executed"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointFormatError(f"unknown persistent id {pid!r} in the checkpoint")
        return self._load_storage(pid)


def _member_data_offset(path, info):
    """Byte offset of a stored (uncompressed) zip member's data in the file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointFormatError(
            f"{path}: storage {info.filename} is compressed; only uncompressed members (as "
            "torch.save writes them) can be memory-mapped"
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointFormatError(f"{path}: damaged zip header of {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_zip(path, mmap=False):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointFormatError(
                f"{path}: zip archive without a single */data.pkl; not a torch.save checkpoint"
            )
        root = pkl[0][: -len("data.pkl")]
        byteorder = (
            zf.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
        )
        if byteorder != "little":
            raise CheckpointFormatError(f"{path}: big-endian checkpoints are not supported")
        cache = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            if not isinstance(storage_type, _StorageType):
                raise CheckpointFormatError(f"unknown storage type in {pid!r}")
            if key not in cache:
                member = f"{root}data/{key}"
                if member not in names:
                    raise CheckpointFormatError(f"{path}: storage {member} is missing")
                if mmap:
                    info = zf.getinfo(member)
                    offset = _member_data_offset(path, info)
                    if info.file_size < int(numel) * storage_type.itemsize:
                        raise CheckpointFormatError(
                            f"{path}: storage {member} holds {info.file_size} bytes, fewer "
                            f"than its {numel} {storage_type.name} elements"
                        )
                    cache[key] = storage_type.from_file(path, offset, numel)
                else:
                    cache[key] = storage_type.from_bytes(zf.read(member), numel)
            return cache[key]

        return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage, mmap).load()


def _read_legacy(path, mmap=False):
    with open(path, "rb") as f:

        def plain():
            return _RestrictedUnpickler(f, _no_storage).load()

        if plain() != _LEGACY_MAGIC:
            raise CheckpointFormatError(f"{path}: not a torch.save checkpoint (bad magic number)")
        if plain() != 1001:
            raise CheckpointFormatError(f"{path}: unsupported legacy torch.save protocol")
        sys_info = plain()
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointFormatError(f"{path}: big-endian checkpoints are not supported")
        pending = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            view = pid[5] if len(pid) > 5 else None
            if not isinstance(storage_type, _StorageType):
                raise CheckpointFormatError(f"unknown storage type in {pid!r}")
            pending.setdefault(key, [storage_type, int(numel), None])
            holder = _LegacyStorage(pending, key)
            if view is not None:
                _view_key, offset, view_size = view
                holder = _LegacyStorage(pending, key, int(offset), int(view_size))
            return holder

        obj = _RestrictedUnpickler(f, load_storage, mmap).load()
        keys = plain()
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            storage_type = pending[key][0] if key in pending else None
            itemsize = storage_type.itemsize if storage_type else 1
            if mmap and storage_type is not None:
                pending[key][2] = storage_type.from_file(path, f.tell(), count)
                f.seek(count * itemsize, os.SEEK_CUR)
                continue
            raw = f.read(count * itemsize)
            if storage_type is not None:
                pending[key][2] = storage_type.from_bytes(raw, count)
    return _resolve_legacy(obj)


def _no_storage(pid):
    raise CheckpointFormatError("unexpected storage outside the object pickle")


class _LegacyStorage:
    """Placeholder for a legacy storage whose bytes come after the pickle."""

    def __init__(self, pending, key, offset=0, size=None):
        self.pending, self.key, self.offset, self.size = pending, key, offset, size

    def array(self):
        data = self.pending[self.key][2]
        if data is None:
            raise CheckpointFormatError(f"storage {self.key} is missing from the checkpoint")
        end = None if self.size is None else self.offset + self.size
        return data[self.offset : end]


class _LegacyTensor:
    def __init__(self, args, keep_view=False):
        self.args = args
        self.keep_view = keep_view


def _resolve_legacy(obj, seen=None):
    """Replaces legacy tensor placeholders (built before their bytes were read)."""
    seen = set() if seen is None else seen
    if isinstance(obj, _LegacyTensor):
        storage, *rest = obj.args
        return _rebuild_tensor(storage.array(), *rest, keep_view=obj.keep_view)
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve_legacy(obj[k], seen)
    elif isinstance(obj, list):
        obj[:] = [_resolve_legacy(v, seen) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(_resolve_legacy(v, seen) for v in obj)
    elif isinstance(obj, (PickledObject, argparse.Namespace)):
        for k, v in list(vars(obj).items()):
            setattr(obj, k, _resolve_legacy(v, seen))
    return obj


def read_checkpoint(path, mmap=False):
    """The object saved by ``torch.save`` at ``path``, with tensors as NumPy
    arrays and the reference's classes as inert :class:`PickledObject` stubs.

    With ``mmap=True`` no storage is read: every tensor is a read-only NumPy
    view (with the tensor's own strides) of a memory map of the file, so
    only the pages that are used are ever read. The pickle is unpickled by
    the same restricted unpickler either way.

    Raises:
      FileNotFoundError: no file at ``path``.
      UnsafeCheckpointError: the pickle names a global outside the allowed
        set (nothing is executed).
      CheckpointFormatError: not a ``torch.save`` file, or damaged.

    Example:
    ```python
    import pathlib
    import pickle
    import zipfile
    import numpy as np
    import rflow_tf
    from rflow_tf.torch_format import UnsafeCheckpointError, read_checkpoint

    repo = pathlib.Path(rflow_tf.__file__).resolve().parents[1]   # the repository's test data
    ckpt = read_checkpoint(repo / "tests/data/reference/mnist16.pth")
    assert sorted(ckpt) == ["args", "ema", "optimizer_state_dict", "state_dict", "test_bpd"]
    data = repo / "tests/data/reference-data/imagenet32/valid_32x32.pth"
    images = read_checkpoint(data, mmap=True)   # no bytes read: a read-only view of the file
    assert images.dtype == np.uint8 and not images.flags.writeable

    class RunsCode:   # what a malicious checkpoint pickles
        def __reduce__(self):
            return (print, ("this would have run",))

    with zipfile.ZipFile("evil.pth", "w") as zf:   # the layout torch.save writes
        zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": RunsCode()}))
    try:
        read_checkpoint("evil.pth")
    except UnsafeCheckpointError as e:
        print(e)   # ... the global 'builtins.print' ...; nothing was executed
    ```
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path, mmap=bool(mmap))
        return _read_legacy(path, mmap=bool(mmap))
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        struct.error,
        KeyError,
        TypeError,
        ValueError,
    ) as e:
        raise CheckpointFormatError(
            f"{path}: not a readable torch.save checkpoint ({type(e).__name__}: {e})"
        ) from None
