"""No code execution on load: pickle payloads in every file qkit reads are refused, never unpickled."""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from qkit.ann import Index
from qkit.ann import fileformat as ff
from qkit.errors import FormatError, QkitError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("qkit", "ann", "cli", "eval", "ext") for p in (ROOT / d).rglob("*.py")]


class Trap:
    """Unpickling this creates a directory: the proof that something ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture()
def payload(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(Trap(marker))

    def refuse(*a, **k):
        raise AssertionError("a loader unpickled")

    # belt and braces: the marker proves nothing ran; these prove nothing even tried
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    return blob, marker


def test_sources_never_unpickle():
    """np.load always with allow_pickle=False; no pickle, torch.load, joblib or marshal in library code."""
    bad = []
    for p in SOURCES:
        tree = ast.parse(p.read_text(), str(p))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") for n in names):
                    bad.append(f"{p.name}:{node.lineno} imports a pickle module")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                base = node.func.value
                owner = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if node.func.attr == "load" and owner in ("np", "numpy"):
                    kw = {k.arg: k.value for k in node.keywords}
                    v = kw.get("allow_pickle")
                    if not (isinstance(v, ast.Constant) and v.value is False):
                        bad.append(f"{p.name}:{node.lineno} np.load without allow_pickle=False")
                if node.func.attr == "load" and owner == "torch":
                    bad.append(f"{p.name}:{node.lineno} torch.load (pickle)")
    assert SOURCES and not bad, bad


def test_npy_with_pickled_objects_is_refused(tmp_path, payload):
    from qkit.eval.datasets import read_vectors

    blob, marker = payload
    buf = io.BytesIO()
    np.save(buf, np.array([[None]], dtype=object), allow_pickle=True)
    raw = buf.getvalue()
    (tmp_path / "x.npy").write_bytes(raw[: raw.index(b"\n") + 1] + blob)
    for mmap in (False, True):
        with pytest.raises(FormatError, match="Python objects"):
            read_vectors(tmp_path / "x.npy", mmap=mmap)
    assert not marker.exists()


def _resigned(blob: bytes, meta_bytes: bytes) -> bytes:
    """An index container whose JSON table is replaced, with a valid header checksum."""
    _, _, _, header_len, meta_len, _, _ = ff._PRE.unpack_from(blob)
    start = 32 + ff.INDEX_FIELDS.size
    new_len = -(-(start + len(meta_bytes)) // 64) * 64
    head = bytearray(blob[:start]) + meta_bytes
    head += b"\0" * (new_len - len(head))
    struct.pack_into("<II", head, 16, new_len, len(meta_bytes))
    struct.pack_into("<I", head, 12, zlib.crc32(bytes(head[16:new_len])))
    return bytes(head) + blob[header_len:]


def test_index_with_pickle_in_table_or_arrays_is_refused(tmp_path, payload):
    blob, marker = payload
    idx = Index(8, codec="sq8", ef_construction=16, store=None)
    idx.add(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32))
    p = tmp_path / "i.qkit"
    idx.save(p)
    raw = p.read_bytes()
    bad = tmp_path / "bad.qkit"
    bad.write_bytes(_resigned(raw, blob))                       # the JSON table is a pickle
    with pytest.raises(FormatError, match="header table is corrupt"):
        Index.load(bad)
    _, _, _, header_len, meta_len, _, _ = ff._PRE.unpack_from(raw)
    start = 32 + ff.INDEX_FIELDS.size
    meta = json.loads(raw[start: start + meta_len])
    meta["arrays"][0]["dtype"] = "|O"                           # an object dtype: would need pickle
    bad.write_bytes(_resigned(raw, json.dumps(meta).encode()))
    with pytest.raises(FormatError, match="header table is corrupt"):
        Index.load(bad)
    data = bytearray(raw)                                       # array bytes replaced by the pickle
    data[header_len: header_len + len(blob)] = blob
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        Index.load(bad)
    assert not marker.exists()


def test_pickled_checkpoints_are_not_read(tmp_path, payload):
    """A torch pickle (pytorch_model.bin, or one named .safetensors) is refused; config.json is JSON only."""
    from qkit.model import loader
    from qkit.model.safetensors_io import WeightStore

    blob, marker = payload
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (d / "pytorch_model.bin").write_bytes(blob)
    with pytest.raises(FormatError, match="no \\*.safetensors"):
        WeightStore(d)
    (d / "model.safetensors").write_bytes(blob)
    with pytest.raises(FormatError, match="safetensors"):
        WeightStore(d / "model.safetensors")
    (d / "config.json").write_bytes(blob)
    with pytest.raises(FormatError, match="not valid JSON"):
        loader.load_config(loader.ModelRef(d, d, "m"))
    assert not marker.exists()


def test_hdf5_with_pickled_bytes_is_refused(tmp_path, payload):
    h5py = pytest.importorskip("h5py")
    from qkit.eval.datasets import read_hdf5

    blob, marker = payload
    p = tmp_path / "p.hdf5"
    with h5py.File(p, "w") as f:
        f.attrs["distance"] = "euclidean"
        f["train"] = np.frombuffer(blob, dtype=f"V{len(blob)}").reshape(1, 1)   # opaque bytes
        f["test"] = np.zeros((1, 2), np.float32)
        f["neighbors"] = np.zeros((1, 1), np.int32)
        f["distances"] = np.zeros((1, 1), np.float32)
    with pytest.raises(QkitError, match="dtype"):
        read_hdf5(p)
    assert not marker.exists()
