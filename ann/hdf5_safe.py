"""Read datasets of an untrusted HDF5 file in a child process.

libhdf5 is C code that trusts much of what a file declares: a corrupt file
can crash it (a segfault takes the whole interpreter down) or make it allocate
what a dataset declares. So ann-benchmarks files are opened by a forked child
that reads the named datasets and sends their bytes back through a pipe (raw
bytes and a JSON header; nothing is pickled). The parent turns a crash, a
hang or a refused dataset into one FormatError. Before reading, the child
checks each dataset: plain numeric dtype (no strings, objects, compounds or
references), 2-D, and a declared size of at most MAX_EXPANSION times the
file's size (an unallocated or compressed dataset could otherwise declare
terabytes).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from qkit.errors import FormatError

MAX_EXPANSION = 16      # declared bytes of one dataset per byte of file (ann-benchmarks files: <= 1)
MIN_TIMEOUT_S = 10.0    # plus 1 s per 20 MB of file (libhdf5 can loop forever on a corrupt file)
_NUMERIC = "biuf"


def _child(path: str, keys: list[str], attrs: list[str], conn) -> None:
    """Runs in the child: one JSON header, then each array's bytes, or a JSON error."""
    try:
        import h5py

        size = os.path.getsize(path)
        with h5py.File(path, "r") as f:
            head = {"attrs": {}, "arrays": []}
            for a in attrs:
                v = f.attrs.get(a)
                if isinstance(v, bytes):
                    v = v.decode("utf-8", "replace")
                head["attrs"][a] = v if isinstance(v, (str, int, float)) or v is None else repr(v)[:80]
            found = []
            for k in keys:
                obj = f.get(k)
                if not isinstance(obj, h5py.Dataset):
                    raise ValueError(f"has no dataset {k!r}; an ann-benchmarks file has train, test, neighbors, "
                                     "distances")
                dt = obj.dtype
                if dt.kind not in _NUMERIC or dt.fields is not None or dt.subdtype is not None:
                    raise ValueError(f"dataset {k!r} has dtype {dt}; vectors and ids are plain numbers")
                if len(obj.shape) != 2:
                    raise ValueError(f"dataset {k!r} has shape {obj.shape}, expected 2-D")
                nbytes = int(np.prod(obj.shape, dtype=object)) * dt.itemsize
                if nbytes > MAX_EXPANSION * size:
                    raise ValueError(f"dataset {k!r} declares {obj.shape} ({nbytes} bytes) in a {size}-byte file")
                found.append(k)
                head["arrays"].append({"name": k, "dtype": dt.newbyteorder("<").str if dt.itemsize > 1 else dt.str,
                                       "shape": list(obj.shape)})
            data = [np.ascontiguousarray(f[k][()], dtype=np.dtype(h["dtype"])) for k, h in zip(found, head["arrays"])]
        conn.send_bytes(json.dumps({"ok": head}).encode())
        for a in data:
            conn.send_bytes(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as one message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            conn.send_bytes(json.dumps({"error": msg[:300]}).encode())
        except OSError:
            pass
    finally:
        conn.close()


def _context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def read_hdf5_arrays(path: str | os.PathLike, keys: list[str], attrs: list[str] = ()) -> tuple[dict, dict]:
    """({attr: value}, {key: array}) of the named 2-D numeric datasets; FormatError for anything else."""
    p = Path(path)
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(p), list(keys), list(attrs), send), daemon=True)
    proc.start()
    send.close()
    timeout = MIN_TIMEOUT_S + p.stat().st_size / 20e6
    try:
        if not recv.poll(timeout):
            raise FormatError(f"{p}: reading the HDF5 file did not finish in {timeout:.0f} s (corrupt file?)")
        try:
            msg = json.loads(recv.recv_bytes())
        except EOFError:
            proc.join(5)
            code = proc.exitcode
            why = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise FormatError(f"{p}: the HDF5 library crashed reading it ({why}); the file is corrupt") from None
        if "error" in msg:
            raise FormatError(f"{p} is not a readable HDF5 file (ann-benchmarks layout): {msg['error']}")
        head = msg["ok"]
        arrays = {}
        for h in head["arrays"]:
            a = np.empty(h["shape"], np.dtype(h["dtype"]))
            if a.size:
                recv.recv_bytes_into(memoryview(a.reshape(-1).view(np.uint8)))
            else:
                recv.recv_bytes()
            arrays[h["name"]] = a.astype(a.dtype.newbyteorder("="), copy=False)
        return head["attrs"], arrays
    except EOFError:
        raise FormatError(f"{p}: the HDF5 reader stopped before sending every dataset (crashed?)") from None
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
