"""Torch checkpoint files rewritten for tests, without torch: the zip format
``torch.save`` writes today turned into the legacy stream of PyTorch < 1.6."""

import collections
import io
import pickle
import struct
import zipfile


def storage_types(pkl_bytes):
    """key -> storage class name of every storage a torch pickle refers to."""
    found = {}

    class Scan(pickle.Unpickler):
        def find_class(self, module, name):
            if name == "OrderedDict":
                return collections.OrderedDict
            return type(
                name,
                (),
                {"__init__": lambda self, *a, **k: None, "__setstate__": lambda self, s: None},
            )

        def persistent_load(self, pid):
            found[pid[2]] = pid[1].__name__

    Scan(io.BytesIO(pkl_bytes)).load()
    return found


def zip_to_legacy(src, dst):
    """Rewrites a zip-format torch checkpoint in torch.save's legacy format
    (magic, protocol, system info, object pickle, storage keys, storages)."""
    itemsize = {"DoubleStorage": 8, "FloatStorage": 4, "LongStorage": 8, "ByteStorage": 1}
    with zipfile.ZipFile(src) as zf:
        root = next(n for n in zf.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        pkl = zf.read(root + "data.pkl")
        types = storage_types(pkl)
        with open(dst, "wb") as f:
            for header in (
                0x1950A86A20F9469CFC6C,
                1001,
                {"protocol_version": 1001, "little_endian": True},
            ):
                pickle.dump(header, f, protocol=2)
            f.write(pkl)
            keys = sorted(types)
            pickle.dump(keys, f, protocol=2)
            for key in keys:
                raw = zf.read(f"{root}data/{key}")
                f.write(struct.pack("<q", len(raw) // itemsize[types[key]]))
                f.write(raw)
