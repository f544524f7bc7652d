"""What qkit.eval.fuzz mutates: one seed builder and one loader per file format qkit reads.

A seed is a small valid file set written by qkit's own writers (or the format's
reference library), with the byte offsets of its sections (for truncation), of
its integer fields (for huge and negative declared sizes) and a list of
structured edits (fields of the wrong type or value, re-signed so that a
checksum does not hide them). A loader opens the files the way qkit does and
uses what it got (searches the index, reads every tensor), returning a digest
that tells an unchanged load from a changed one.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# values that break naive readers: zero, negative, sign bits, all ones, past any file
EVIL_INTS = [0, 1, -1, 2, 7, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1,
             2**63, 2**64 - 1]
EVIL_JSON = [0, -1, 1, 2**31, 2**63, 10**30, 1.5, -0.0, 1e308, float("nan"), "12", "", "x" * 3, None, True, [],
             {}, [1, 2], {"a": 1}, [2**62, 2**62]]
# a pickle that would run `echo` if anything unpickled it: qkit must only ever see it as bytes
PICKLE_PAYLOAD = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x04echo\x85R."


@dataclass
class Seed:
    files: dict[str, bytes]                       # mutable files: name -> content
    main: str                                     # what the loader is given
    bounds: dict[str, list[int]] = field(default_factory=dict)
    ints: dict[str, list[tuple[int, int]]] = field(default_factory=dict)   # (offset, width)
    edits: list[Callable[[random.Random, dict], dict]] = field(default_factory=list)
    static: dict[str, bytes] = field(default_factory=dict)                # files written once, never mutated
    reference: str | None = None                  # the loader's digest of the unmutated files


@dataclass
class Target:
    name: str
    build: Callable[[Path], list[Seed]]
    load: Callable[[Path], str]


def digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        if isinstance(p, np.ndarray):
            p = np.ascontiguousarray(p)
            h.update(f"{p.dtype.str}{p.shape}".encode())
            h.update(p.reshape(-1).view(np.uint8).tobytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def _pick_json_path(rng: random.Random, obj, depth=0):
    """A random (container, key) inside a JSON object, for an in-place edit."""
    keys = list(obj.keys()) if isinstance(obj, dict) else list(range(len(obj)))
    if not keys:
        return obj, None
    k = rng.choice(keys)
    child = obj[k]
    if isinstance(child, (dict, list)) and child and depth < 4 and rng.random() < 0.6:
        return _pick_json_path(rng, child, depth + 1)
    return obj, k


def json_edit(rng: random.Random, obj):
    """Set, delete or retype one value somewhere in a JSON document (in place; returns it)."""
    parent, k = _pick_json_path(rng, obj)
    if k is None:
        return obj
    r = rng.random()
    if r < 0.15 and isinstance(parent, dict):
        del parent[k]
    elif r < 0.25 and isinstance(parent[k], (int, float)) and not isinstance(parent[k], bool):
        parent[k] = type(parent[k])(parent[k] * rng.choice([2, 8, 1 << 20]) + rng.choice([0, 1, -1]))
    else:
        parent[k] = rng.choice(EVIL_JSON)
    return obj


# ------------------------------------------------------------------ qkit index files
def _container(blob: bytes):
    from qkit.ann import fileformat as ff

    pre = ff._PRE.unpack_from(blob)
    header_len, meta_len = pre[3], pre[4]
    return pre, header_len, meta_len


def _fixed_size(blob: bytes) -> int:
    from qkit.ann import fileformat as ff

    return ff.INDEX_FIELDS.size if blob[:8] == ff.MAGIC_INDEX else ff.VECTOR_FIELDS.size


def _resign(blob: bytes, *, data=True) -> bytes:
    """Recompute the header CRC (and the data CRC from the table, when it still parses)."""
    import zlib

    from qkit.ann import fileformat as ff

    b = bytearray(blob)
    _, header_len, meta_len = _container(blob)
    if data:
        try:
            fs = _fixed_size(blob)
            meta = json.loads(bytes(b[32 + fs: 32 + fs + meta_len]))
            crc = 0
            for t in meta["arrays"]:
                n = int(np.prod(t["shape"])) * np.dtype(ff._DTYPES[t["dtype"]]).itemsize
                s = header_len + t["offset"]
                crc = zlib.crc32(bytes(b[s: s + n]), crc)
            struct.pack_into("<I", b, 24, crc)
        except Exception:  # noqa: BLE001 - a table we broke on purpose: keep the old data CRC
            pass
    if header_len <= len(b):
        struct.pack_into("<I", b, 12, zlib.crc32(bytes(b[16:header_len])))
    return bytes(b)


def _set_meta(blob: bytes, meta_bytes: bytes) -> bytes:
    """Replace the JSON; grow the header by whole 64-byte blocks if needed (array offsets are relative)."""
    _, header_len, meta_len = _container(blob)
    if header_len > len(blob):   # an earlier mutation broke header_len: nothing to re-sign
        raise ValueError("header_len past the end of the file")
    fs = _fixed_size(blob)
    start = 32 + fs
    need = start + len(meta_bytes)
    new_len = max(header_len, -(-need // 64) * 64)
    head = bytearray(blob[:start]) + meta_bytes
    head += b"\0" * (new_len - len(head))
    struct.pack_into("<II", head, 16, new_len, len(meta_bytes))
    return _resign(bytes(head) + blob[header_len:])


def _index_edits(name: str):
    from qkit.ann import fileformat as ff

    def meta_of(blob):
        _, _, meta_len = _container(blob)
        fs = _fixed_size(blob)
        return json.loads(blob[32 + fs: 32 + fs + meta_len])

    def table_edit(rng, files):
        blob = files[name]
        meta = meta_of(blob)
        t = rng.choice(meta["arrays"])
        key = rng.choice(["shape", "offset", "dtype", "name"])
        t[key] = rng.choice({
            "shape": [[2**62], [-1, 4], [0], [t["shape"][0] + 1] + t["shape"][1:], [2**31, 2**31], [], [1, 1, 1],
                      "x", [1.5], [2**64]],
            "offset": [-64, 2**63, 1, 64 * 2**40, t["offset"] + 64, t["offset"] - 64, "0", 1e300],
            "dtype": ["|O", "<f8", "<i2", ">f4", "|V8", "pickle", 7, "<u8"],
            "name": [rng.choice(meta["arrays"])["name"], 5, "", "codes"],
        }[key])
        return dict(files, **{name: _set_meta(blob, json.dumps(meta).encode())})

    def meta_edit(rng, files):
        blob = files[name]
        meta = meta_of(blob)
        return dict(files, **{name: _set_meta(blob, json.dumps(json_edit(rng, meta)).encode())})

    def pickled_table(rng, files):
        return dict(files, **{name: _set_meta(files[name], PICKLE_PAYLOAD)})

    def fixed_edit(rng, files):
        blob = bytearray(files[name])
        if blob[:8] == ff.MAGIC_INDEX:
            st, n_fields = ff.INDEX_FIELDS, 12
        else:
            st, n_fields = ff.VECTOR_FIELDS, 3
        vals = list(st.unpack_from(blob, 32))
        i = rng.randrange(n_fields)
        if isinstance(vals[i], bytes):
            vals[i] = rng.choice([b"pickle", b"rabitq9", b"qjl", b"tq4", b"flat\x01", b"sq8\xff"])
        else:
            fmt = st.format.lstrip("<").replace("x", "")
            code = [c for c in fmt if not c.isdigit()][i]
            bits = struct.calcsize(code) * 8
            v = rng.choice(EVIL_INTS + [vals[i] + 1, vals[i] - 1])
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code.islower() else (0, (1 << bits) - 1)
            vals[i] = min(max(v, lo), hi)
        st.pack_into(blob, 32, *vals)
        return dict(files, **{name: _resign(bytes(blob), data=False)})

    def array_edit(rng, files):
        blob = bytearray(files[name])
        _, header_len, _ = _container(blob)
        meta = meta_of(bytes(blob))
        t = rng.choice([t for t in meta["arrays"] if np.prod(t["shape"]) > 0] or meta["arrays"])
        dt = np.dtype(ff._DTYPES[t["dtype"]])
        n = int(np.prod(t["shape"]))
        if n:
            a = np.frombuffer(blob, dt, n, header_len + t["offset"]).copy()
            for _ in range(rng.randint(1, 3)):
                j = rng.randrange(n)
                if dt.kind == "f":
                    a[j] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -1.0, 3e38])
                else:
                    info = np.iinfo(dt)
                    a[j] = rng.choice([info.min, info.max, -1 if info.min < 0 else 0, 0, 1, n, n + 1, 2**31 - 1]
                                      ) if dt.itemsize > 1 else rng.randrange(256)
            blob[header_len + t["offset"]: header_len + t["offset"] + a.nbytes] = a.tobytes()
        return dict(files, **{name: _resign(bytes(blob))})

    return [table_edit, meta_edit, pickled_table, fixed_edit, array_edit, array_edit]


def _sync_vectors_crc(index_name: str, vec_name: str):
    """An edit of the vectors file, then the index's vectors_crc set to match: the deeper checks run."""
    def edit(rng, files):
        inner = rng.choice(_index_edits(vec_name))
        files = inner(rng, files)
        v = files[vec_name]
        crc = struct.unpack_from("<I", v, 24)[0]
        blob = files[index_name]
        _, _, meta_len = _container(blob)
        fs = _fixed_size(blob)
        meta = json.loads(blob[32 + fs: 32 + fs + meta_len])
        meta["vectors_crc"] = crc
        return dict(files, **{index_name: _set_meta(blob, json.dumps(meta).encode())})
    return edit


def _container_layout(blob: bytes) -> tuple[list[int], list[tuple[int, int]]]:
    from qkit.ann import fileformat as ff

    _, header_len, meta_len = _container(blob)
    fs = _fixed_size(blob)
    bounds = [0, 8, 12, 16, 20, 24, 28, 32, 32 + fs, 32 + fs + meta_len, header_len, len(blob)]
    meta = json.loads(blob[32 + fs: 32 + fs + meta_len])
    for t in meta["arrays"]:
        s = header_len + t["offset"]
        bounds += [s, s + int(np.prod(t["shape"])) * np.dtype(ff._DTYPES[t["dtype"]]).itemsize]
    ints = [(8, 4), (12, 4), (16, 4), (20, 4), (24, 4)]
    st = ff.INDEX_FIELDS if blob[:8] == ff.MAGIC_INDEX else ff.VECTOR_FIELDS
    off = 32
    for code in st.format.lstrip("<"):
        if code.isdigit():
            continue
        size = struct.calcsize(code)
        if code in "IiQqH":
            ints.append((off, size))
        off += size
    return sorted(set(bounds)), ints


def write_legacy_pair(path: Path) -> None:
    """Rewrite an index saved by this qkit into the layout of files written before 2026-11-23: the
    re-rank store in PATH.vectors, tied to the index by its data CRC (the loader still reads those)."""
    from qkit.ann import fileformat as ff
    from qkit.ann.index import vectors_path

    c = ff.read_file(path, ff.MAGIC_INDEX, ff.INDEX_FIELDS.size, mmap=False)
    arrays = {k: np.array(v) for k, v in c.arrays.items()}
    sc = arrays.pop("store_codes")
    store_code = ff.INDEX_FIELDS.unpack(c.fixed)[-1]
    dim = ff.INDEX_FIELDS.unpack(c.fixed)[0]
    ff.write_file(vectors_path(path), ff.MAGIC_VECTORS, ff.VECTOR_FIELDS.pack(dim, store_code, len(sc)), {},
                  {"codes": sc})
    meta = {k: v for k, v in c.meta.items() if k != "arrays"}
    meta["vectors_crc"] = ff.crc_arrays([sc])
    ff.write_file(path, ff.MAGIC_INDEX, c.fixed, meta, arrays)


def build_index(d: Path) -> list[Seed]:
    from qkit.ann import Index

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    seeds = []
    # the last seed is the older two-file layout (index + PATH.vectors), which the loader still reads
    for i, (codec, store, metric) in enumerate([("sq8", "float", "l2"), ("sq4", "sq8", "ip"),
                                                 ("flat", None, "cosine"), ("rabitq4", "float", "l2"),
                                                 ("sq8", "u8", "l2")]):
        idx = Index(12, metric, codec, M=4, ef_construction=16, store=store)
        idx.add(np.abs(x * 40).round().clip(0, 255) if store == "u8" else x)
        if i == 0:
            idx.remove([3, 7])
        p = d / f"s{i}.qkit"
        idx.save(p)
        if i == 4:
            write_legacy_pair(p)
        files = {p.name: p.read_bytes()}
        if Path(str(p) + ".vectors").exists():
            files[p.name + ".vectors"] = Path(str(p) + ".vectors").read_bytes()
        bounds, ints = {}, {}
        edits = []
        for n, blob in files.items():
            bounds[n], ints[n] = _container_layout(blob)
            edits += _index_edits(n)
        if len(files) == 2:
            edits.append(_sync_vectors_crc(p.name, p.name + ".vectors"))
        seeds.append(Seed(files, p.name, bounds, ints, edits))
    return seeds


def load_index(path: Path) -> str:
    from qkit.ann import Index

    idx = Index.load(path)
    q = np.random.default_rng(1).normal(size=(4, idx.dim)).astype(np.float32)
    k = min(3, idx.n_live)
    D, I = idx.search(q, k)
    with np.errstate(over="ignore", invalid="ignore"):   # mutated codec parameters may give inf distances
        out = [D.round(3), I]
    if idx.store is not None:
        out += list(idx.search(q, k, rerank=6))
    out.append(idx.search(q, k, filter=idx.labels[: max(1, len(idx.labels) // 2)])[1])
    for a in out[1::2]:
        if not np.isin(a[a >= 0], idx.labels).all():
            raise AssertionError("search returned an id that is not in the index")
    return digest(*out)


# ------------------------------------------------------------------ .npy
def _npy_with_header(header: str, data: bytes, version=(1, 0)) -> bytes:
    h = header.encode("latin1")
    pre = 10 if version == (1, 0) else 12
    pad = (-(pre + len(h) + 1)) % 64
    h = h + b" " * pad + b"\n"
    ln = struct.pack("<H", len(h)) if version == (1, 0) else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes(version) + ln + h + data


def build_npy(d: Path) -> list[Seed]:
    X = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, X)
    blob = buf.getvalue()
    hlen = struct.unpack_from("<H", blob, 8)[0]
    data = blob[10 + hlen:]

    def header_edit(rng, files):
        descr = rng.choice(["'<f4'", "'|O'", "'<f8'", "'>f4'", "'|S4'", "'<U2'", "'|V4'", "[('a', '<f4')]",
                            "'<f4' + __import__('os').system('echo')", "'bogus'", "'<c8'", "'|b1'", "'<i8'"])
        shape = rng.choice(["(20, 8)", "(2**62, 2**62)", "(4611686018427387904, 4)", "(-1, 8)", "(20,)",
                            "(20, 8, 1)", "(21, 8)", "(0, 8)", "('a', 8)", "(2147483648, 2147483648)", "(19, 8)"])
        fortran = rng.choice(["False", "True", "'x'"])
        version = rng.choice([(1, 0), (1, 0), (2, 0), (3, 0), (9, 9)])
        head = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
        return {"x.npy": _npy_with_header(head, data, version)}

    def pickled(rng, files):
        obj = io.BytesIO()
        np.save(obj, np.array([[None, 1]], dtype=object), allow_pickle=True)
        raw = obj.getvalue()
        return {"x.npy": raw[: raw.index(b"\n") + 1] + PICKLE_PAYLOAD}

    bounds = [0, 6, 8, 10, 10 + hlen, len(blob) // 2, len(blob)]
    return [Seed({"x.npy": blob}, "x.npy", {"x.npy": bounds}, {"x.npy": [(8, 2)]},
                 [header_edit, header_edit, pickled])]


def load_npy(path: Path) -> str:
    from qkit.eval.datasets import read_vectors

    X = read_vectors(path, mmap=digest(path.stat().st_mtime_ns)[0] in "01234567")
    return digest(np.asarray(X))


# ------------------------------------------------------------------ TEXMEX .fvecs / .ivecs / .bvecs
def _texmex_builder(suffix: str):
    def build(d: Path) -> list[Seed]:
        from qkit.eval import datasets as ds

        rng = np.random.default_rng(0)
        n, dim = 12, 6
        X = {"fvecs": rng.normal(size=(n, dim)).astype(np.float32), "ivecs": rng.integers(0, 99, (n, dim)),
             "bvecs": rng.integers(0, 255, (n, dim))}[suffix]
        p = d / f"x.{suffix}"
        getattr(ds, f"write_{suffix}")(p, X)
        blob = p.read_bytes()
        row = len(blob) // n
        bounds = sorted({0, 2, 4} | {i * row for i in range(n + 1)} | {i * row + 4 for i in range(n)})

        def append_partial(rng, files):
            return {p.name: files[p.name] + files[p.name][: rng.randrange(1, row)]}

        return [Seed({p.name: blob}, p.name, {p.name: bounds}, {p.name: [(i * row, 4) for i in range(n)]},
                     [append_partial])]
    return build


def load_vectors(path: Path) -> str:
    from qkit.eval.datasets import read_vectors

    return digest(np.asarray(read_vectors(path)))


# ------------------------------------------------------------------ ann-benchmarks .hdf5
def build_hdf5(d: Path) -> list[Seed]:
    import h5py

    rng = np.random.default_rng(0)
    seeds = []
    for i, variant in enumerate(["ok", "strings", "3d", "huge"]):
        p = d / f"h{i}.hdf5"
        with h5py.File(p, "w") as f:
            f.attrs["distance"] = "euclidean"
            f["train"] = rng.normal(size=(20, 8)).astype(np.float32)
            f["test"] = rng.normal(size=(4, 8)).astype(np.float32)
            f["neighbors"] = rng.integers(0, 20, (4, 3)).astype(np.int32)
            f["distances"] = rng.random((4, 3)).astype(np.float32)
            if variant == "strings":
                del f["test"]
                f["test"] = np.array([[b"ab", b"cd"]])
            elif variant == "3d":
                del f["train"]
                f["train"] = np.zeros((2, 2, 2), np.float32)
            elif variant == "huge":  # declared, never written: libhdf5 would fill 2^40 bytes with zeros
                del f["train"]
                f.create_dataset("train", shape=(2**34, 64), dtype=np.float32, chunks=(1024, 64))
        blob = p.read_bytes()
        size = len(blob)
        bounds = sorted({0, 8, 96, 512, 800, 1400, 2048, size // 4, size // 2, 3 * size // 4, size - 1, size})
        ints = [(o, 8) for o in range(0, min(size, 2048), 8)] + [(o, 4) for o in range(4, min(size, 2048), 8)]
        seeds.append(Seed({p.name: blob}, p.name, {p.name: bounds}, {p.name: ints}))
    return seeds


def load_hdf5(path: Path) -> str:
    from qkit.eval.datasets import read_hdf5

    v = read_hdf5(path)
    return digest(v.base, v.queries, v.gt, v.metric)


# ------------------------------------------------------------------ safetensors
def build_safetensors(d: Path) -> list[Seed]:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tens = {"a": torch.randn(4, 8, generator=g), "b": torch.randn(8, generator=g).half(),
            "c": torch.arange(6).reshape(2, 3), "d": torch.randn(3, 3, generator=g).bfloat16(),
            "e": torch.zeros(0, 4)}
    blob = save(tens, metadata={"format": "pt"})
    n = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8: 8 + n])
    bounds = {0, 4, 8, 8 + n, len(blob)}
    for k, v in header.items():
        if k != "__metadata__":
            bounds |= {8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]}

    def header_edit(rng, files):
        raw = files["m.safetensors"]
        hn = struct.unpack_from("<Q", raw)[0]
        h = json.loads(raw[8: 8 + hn])
        name = rng.choice([k for k in h if k != "__metadata__"])
        key = rng.choice(["dtype", "shape", "data_offsets", "meta", "drop", "any"])
        if key == "dtype":
            h[name]["dtype"] = rng.choice(["F64", "I8", "XX", 5, "BOOL", "F8_E4M3", "U64", "F4"])
        elif key == "shape":
            h[name]["shape"] = rng.choice([[2**62], [-1], [3, 3, 3], "x", [1.5], [], [2**64], [0, 2**63]])
        elif key == "data_offsets":
            s, e = h[name]["data_offsets"]
            h[name]["data_offsets"] = rng.choice([[-1, e], [0, 2**64], [e, s], [s], "x", [s, 2**62], [0, e - s],
                                                   [s + 1, e + 1], [s, e + 8]])
        elif key == "meta":
            h["__metadata__"] = rng.choice([[1], {"a": 1}, "x", {"format": None}])
        elif key == "drop":
            del h[name]
        else:
            json_edit(rng, h)
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        return {"m.safetensors": struct.pack("<Q", len(hb)) + hb + raw[8 + hn:]}

    return [Seed({"m.safetensors": blob}, "m.safetensors", {"m.safetensors": sorted(bounds)},
                 {"m.safetensors": [(0, 8)]}, [header_edit, header_edit])]


def load_safetensors(path: Path) -> str:
    import torch

    from qkit.model.safetensors_io import WeightStore

    st = WeightStore(path)
    parts = []
    for k in sorted(st.keys()):
        t = st.get(k)
        if tuple(t.shape) != st.shape(k):
            raise AssertionError(f"tensor {k}: header shape {st.shape(k)}, read {tuple(t.shape)}")
        parts += [k, st.dtype(k), t.contiguous().reshape(-1).view(torch.uint8).numpy()]
    return digest(*parts)
