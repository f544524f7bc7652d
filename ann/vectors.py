"""Vector files in and out: .npy, TEXMEX (.fvecs/.ivecs/.bvecs), IDX, ann-benchmarks .hdf5.

Readers return numpy arrays and fail with one readable ``QkitError``: a file that is not there is an
``InputError``; a file that is there but cannot be what its suffix says (truncated, rows of different
dimension, bad header) is a ``FormatError``. No reader unpickles (.npy object arrays are refused) and .hdf5
files are read in a child process (qkit.ann.hdf5_safe), so a file that crashes libhdf5 is an error, not a
crash. ``read_vectors`` also takes the name of a built-in set (qkit.eval.datasets, fetched on first use).

Distance conventions (smaller is closer): ``l2`` squared Euclidean (faiss's IndexFlatL2), ``cosine``
1 - cos(q, x), ``ip`` -<q, x>.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkit.errors import FormatError, InputError, UsageError
from qkit.fileio import atomic_write

METRICS = ("l2", "cosine", "ip")
ROLES = ("base", "queries", "gt")


# --------------------------------------------------------------------------- files

def _existing(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such file: {p}" if not p.exists() else f"{p} is not a regular file")
    return p


# TEXMEX format (corpus-texmex.irisa.fr, "ANN_SIFT1M ... file formats"): raw little-endian rows,
# each an int32 dimension d followed by d values: 4+4d bytes (.fvecs float32, .ivecs int32),
# 4+d bytes (.bvecs uint8). The format has no magic and no row count: the only checks possible
# are that every row repeats the same d and that the file is a whole number of rows.

def _read_texmex(path, value: str, *, mmap: bool) -> np.ndarray:
    p = _existing(path)
    size = p.stat().st_size
    vdt = np.dtype(value)
    if size == 0:  # zero vectors; their dimension is not recorded anywhere
        return np.empty((0, 0), dtype=vdt.newbyteorder("="))
    if size < 4:
        raise FormatError(f"{p}: {size} bytes is shorter than one row header (4 bytes): truncated")
    with open(p, "rb") as f:
        d = int(np.frombuffer(f.read(4), "<i4")[0])
    if d < 0:
        raise FormatError(f"{p}: first row claims dimension {d}; not a {p.suffix} file")
    row = 4 + d * vdt.itemsize
    n, rem = divmod(size, row)
    if rem:
        raise FormatError(f"{p}: {size} bytes is not a whole number of {row}-byte rows (d={d} from the first row): "
                          "the file is truncated or its rows differ in dimension")
    rec = np.dtype([("d", "<i4"), ("x", vdt, (d,))])
    rows = np.memmap(p, dtype=rec, mode="r", shape=(n,)) if mmap else np.fromfile(p, dtype=rec, count=n)
    bad = np.flatnonzero(rows["d"] != d)
    if bad.size:
        i = int(bad[0])
        raise FormatError(f"{p}: row {i} has dimension {int(rows['d'][i])}, row 0 has {d}: "
                          "inconsistent dimensions or a corrupt file")
    X = rows["x"]  # a strided view that skips the per-row headers
    return X if mmap else np.ascontiguousarray(X, dtype=vdt.newbyteorder("="))


def read_fvecs(path, *, mmap: bool = False) -> np.ndarray:
    """float32 (n, d) from a TEXMEX .fvecs file; mmap=True returns a read-only strided view of the file."""
    return _read_texmex(path, "<f4", mmap=mmap)


def read_ivecs(path, *, mmap: bool = False) -> np.ndarray:
    """int32 (n, d) from a TEXMEX .ivecs file (ground-truth ids in the TEXMEX sets)."""
    return _read_texmex(path, "<i4", mmap=mmap)


def read_bvecs(path, *, mmap: bool = False) -> np.ndarray:
    """uint8 (n, d) from a TEXMEX .bvecs file (SIFT1B)."""
    return _read_texmex(path, "u1", mmap=mmap)


def _check_range(X: np.ndarray, lo: int, hi: int, what: str) -> None:
    if not (np.issubdtype(X.dtype, np.integer) or X.dtype == bool):
        raise InputError(f"{what} stores integers; got dtype {X.dtype}")
    if X.size and (X.min() < lo or X.max() > hi):
        raise InputError(f"{what} stores values in [{lo}, {hi}]; got [{X.min()}, {X.max()}]")


def _write_texmex(path, X, value: str, what: str) -> None:
    X = np.asarray(X)
    if X.ndim != 2:
        raise InputError(f"{what} writes a 2-D array (n, d); got shape {X.shape}")
    if value == "<f4":
        if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool) or np.iscomplexobj(X):
            raise InputError(f"{what} stores real numbers; got dtype {X.dtype}")
    else:
        info = np.iinfo(np.dtype(value))
        _check_range(X, int(info.min), int(info.max), what)
    rows = np.empty(X.shape[0], dtype=[("d", "<i4"), ("x", value, (X.shape[1],))])
    rows["d"] = X.shape[1]
    rows["x"] = X
    with atomic_write(path) as f:
        f.write(rows.tobytes())


def write_fvecs(path, X) -> None:
    """Write (n, d) as TEXMEX .fvecs (float32), atomically. n=0 gives an empty file, which reads back as (0, 0)."""
    _write_texmex(path, X, "<f4", "write_fvecs")


def write_ivecs(path, X) -> None:
    """Write integer (n, d) as TEXMEX .ivecs (int32), atomically; values must fit int32."""
    _write_texmex(path, X, "<i4", "write_ivecs")


def write_bvecs(path, X) -> None:
    """Write integer (n, d) as TEXMEX .bvecs (uint8), atomically; values must lie in [0, 255]."""
    _write_texmex(path, X, "u1", "write_bvecs")


def _npy_header(p: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, checked before numpy reads or maps its data.

    NEP 1 (numpy/lib/format.py): magic b"\\x93NUMPY", version bytes, a little-endian header length
    (u2 for 1.0, u4 for 2.0), then a Python-literal dict parsed by numpy with ast.literal_eval
    (no code runs). Object dtypes would need pickle: refused here, and np.load is called with
    allow_pickle=False as well. The declared shape must fit in the bytes the file has.
    """
    from numpy.lib import format as npf

    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(6)
        if head[:4] == b"PK\x03\x04":
            raise FormatError(f"{p} is an .npz archive, not a single .npy array")
        if head != npf.MAGIC_PREFIX:
            raise FormatError(f"{p} is not a .npy file (bad magic)")
        f.seek(0)
        try:
            version = npf.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version[0]}.{version[1]} (this reader takes 1.0 and 2.0)")
            read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
            shape, _fortran, dtype = read(f)
        except Exception as e:  # noqa: BLE001 - numpy's header parser (tokenize + literal_eval) raises many kinds
            raise FormatError(f"{p} is not a readable .npy file: {str(e).splitlines()[0] if str(e) else e!r}") from None
        offset = f.tell()
    if dtype.hasobject:
        raise FormatError(f"{p} is not a readable .npy file: it holds Python objects, which would need "
                          "unpickling (qkit never unpickles)")
    if len(shape) != 2 or dtype.fields is not None or dtype.subdtype is not None or \
            not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise FormatError(f"{p} holds a {dtype} array of shape {shape}; vectors are a 2-D numeric array (n, d)")
    need = shape[0] * shape[1] * dtype.itemsize   # Python ints: no overflow on a crafted shape
    if offset + need > size:
        raise FormatError(f"{p} is not a readable .npy file: truncated (shape {shape} of {dtype} needs {need} "
                          f"bytes of data, the file has {size - offset})")
    return shape, dtype, offset


def read_npy(path, *, mmap: bool = False) -> np.ndarray:
    """A 2-D numeric array from .npy; never unpickles. mmap=True maps it read-only instead of reading it."""
    p = _existing(path)
    _npy_header(p)
    try:
        X = np.load(p, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError, OSError) as e:  # checked above; kept for files that change underneath
        raise FormatError(f"{p} is not a readable .npy file: {e}") from None
    return X


# IDX format (Fashion-MNIST keeps MNIST's, yann.lecun.com/exdb/mnist "FILE FORMATS FOR THE MNIST
# DATABASE"): magic = two zero bytes, a type byte, a number-of-dimensions byte; then one big-endian
# uint32 per dimension; then the values, big-endian, row-major. Images: magic 0x00000803 (uint8, 3-d).
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """An IDX array (gzip-compressed if the name ends in .gz), in its own dtype and shape."""
    p = _existing(path)
    try:
        with (gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise FormatError(f"{p}: cannot decompress ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise FormatError(f"{p}: bad IDX magic {raw[:4].hex() or '(empty)'}; expected 0000 <type> <ndim>")
    dt, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise FormatError(f"{p}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", ndim, 4))
    want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(raw) - head != want:
        raise FormatError(f"{p}: IDX shape {shape} needs {want} bytes of data, the file has {len(raw) - head}")
    return np.frombuffer(raw, dt, offset=head).reshape(shape).astype(dt.newbyteorder("="))


# ann-benchmarks HDF5 (github.com/erikbern/ann-benchmarks, ann_benchmarks/datasets.py write_output):
# datasets train (n, d), test (m, d), neighbors (m, k) int, distances (m, k) float, and the root
# attribute `distance`. Its distances are scipy's: euclidean (not squared), cosine = 1 - cos.
_HDF5_KEYS = {"base": "train", "queries": "test", "gt": "neighbors"}
_HDF5_METRICS = {"euclidean": "l2", "angular": "cosine", "dot": "ip"}


def _hdf5_arrays(path, keys: list[str]) -> tuple[Path, dict, dict]:
    """(path, root attributes, {key: 2-D array}) read by a child process (qkit.ann.hdf5_safe): a file
    that crashes libhdf5 becomes a FormatError instead of taking this process down."""
    from qkit.ann.hdf5_safe import read_hdf5_arrays

    p = _existing(path)
    attrs, arrays = read_hdf5_arrays(p, keys, ["distance"])
    return p, attrs, arrays


def read_hdf5(path) -> VectorDataset:
    """An ann-benchmarks .hdf5 file as a VectorDataset (base/queries float32, gt int64).

    gt_D is converted to this module's conventions (euclidean is squared to match l2); for
    `dot` files it is None because ann-benchmarks has not fixed how it stores dot distances.
    """
    keys = ["train", "test", "neighbors", "distances"]
    p, attrs, arrays = _hdf5_arrays(path, keys)
    dist = attrs.get("distance")
    if dist not in _HDF5_METRICS:
        raise FormatError(f"{p}: distance attribute {dist!r} is not one of {', '.join(_HDF5_METRICS)}")
    base, queries, gt, gd = (arrays[k] for k in keys)
    if not np.issubdtype(gt.dtype, np.integer):
        raise FormatError(f"{p}: neighbors are {gt.dtype}, expected integer ids")
    if base.shape[1] != queries.shape[1] or gt.shape[0] != queries.shape[0] or gd.shape != gt.shape:
        raise FormatError(f"{p}: inconsistent shapes train {base.shape}, test {queries.shape}, "
                          f"neighbors {gt.shape}, distances {gd.shape}")
    metric = _HDF5_METRICS[dist]
    gt_D = {"l2": np.square(gd, dtype=np.float64), "cosine": gd, "ip": None}[metric]
    return VectorDataset(p.stem, metric, base.astype(np.float32), queries.astype(np.float32),
                         gt.astype(np.int64), None if gt_D is None else gt_D.astype(np.float32))


_READERS = {".npy": read_npy, ".fvecs": read_fvecs, ".ivecs": read_ivecs, ".bvecs": read_bvecs}
_HDF5_SUFFIXES = (".hdf5", ".h5")


def read_vectors(path_or_name, *, role: str = "base", mmap: bool = False) -> np.ndarray:
    """One array from a file (by suffix) or from a registry dataset (by name, e.g. "glove-50").

    role picks base / queries / gt in an .hdf5 file or a dataset; a plain file holds one array and
    ignores it. role="gt" of a dataset computes (or loads the cached) exact top-100. mmap applies
    to .npy and TEXMEX files (a read-only view of the file instead of a copy in memory).
    """
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    s = str(path_or_name)
    suffix = Path(s).suffix.lower()
    if suffix in _READERS:
        return _READERS[suffix](s, mmap=mmap)
    if suffix in _HDF5_SUFFIXES:
        key = _HDF5_KEYS[role]
        return _hdf5_arrays(s, [key])[2][key]
    from qkit.eval import datasets  # the built-in sets (fetched on first use) live with the benchmarks

    if s in datasets.DATASETS:
        if role == "gt":
            return datasets.load_dataset(s).gt
        base, queries, _ = datasets._split(s)
        return base if role == "base" else queries
    supported = ", ".join([*_READERS, *_HDF5_SUFFIXES])
    raise UsageError(f"cannot read {s!r}: supported files are {supported}; datasets are {', '.join(datasets.DATASETS)}")


@dataclass(frozen=True, eq=False)
class VectorDataset:
    """Base vectors, queries and their exact neighbours: ids index `base`, distances follow `metric`.

    base and queries are float32 (n, d) and (m, d); gt is int64 (m, k), nearest first (ties by
    smaller id); gt_D float32 (m, k) holds their true distances when known (see recall_at_k).
    """

    name: str
    metric: str
    base: np.ndarray
    queries: np.ndarray
    gt: np.ndarray
    gt_D: np.ndarray | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise InputError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        b, q, g = self.base, self.queries, self.gt
        if b.ndim != 2 or q.ndim != 2 or b.shape[1] != q.shape[1]:
            raise InputError(f"base {b.shape} and queries {q.shape} must be 2-D with the same dimension")
        if g.ndim != 2 or g.shape[0] != q.shape[0] or not np.issubdtype(g.dtype, np.integer):
            raise InputError(f"gt must be integer ids of shape ({q.shape[0]}, k); got {g.dtype} {g.shape}")
        if self.gt_D is not None and self.gt_D.shape != g.shape:
            raise InputError(f"gt_D has shape {self.gt_D.shape}, gt {g.shape}")

    def __repr__(self):
        return (f"VectorDataset({self.name!r}, {self.metric!r}, base={self.base.shape}, "
                f"queries={self.queries.shape}, gt={self.gt.shape})")
