"""llama.cpp's legacy imatrix.dat: read by content, the same importance (and bytes) as the equivalent GGUF.

The .dat files are written here field by field with `struct`, following llama.cpp's
save_imatrix_legacy (tools/imatrix/imatrix.cpp): the independent reference for the layout.
"""
import struct

import numpy as np
import pytest

from qkit import ggml
from qkit.errors import FormatError
from qkit.imatrix import read_imatrix, write_imatrix


def dat_bytes(entries, chunks=None, dataset=None) -> bytes:
    """entries: (name, ncall, stored values); stored = mean of squares * ncall, as llama.cpp writes them."""
    b = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        raw = name.encode()
        vals = np.asarray(vals, "<f4")
        b += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size) + vals.tobytes()
    if chunks is not None:
        b += struct.pack("<i", chunks)
        if dataset is not None:
            b += struct.pack("<i", len(dataset)) + dataset
    return b


@pytest.fixture()
def stats():
    """Sums of squares and token counts for three weights of different widths (one never activated)."""
    rng = np.random.default_rng(1)
    return {"blk.0.attn_q.weight": (rng.random(256) * 40, 64),
            "blk.0.ffn_down.weight": (rng.gamma(0.5, 3, 512) * 64, 64),
            "output.weight": (rng.random(256), 64)}


def test_dat_equals_gguf_importance_and_quantized_bytes(stats, tmp_path):
    write_imatrix(tmp_path / "im.gguf", stats, ["calib.txt"], 16)
    ncall = 4   # chunks of 16 tokens: ceil(64 / 16); a power of two, so (mean * 4) / 4 is exact in float32
    entries = [(k, ncall, (s / c).astype(np.float32) * np.float32(ncall)) for k, (s, c) in sorted(stats.items())]
    (tmp_path / "im.dat").write_bytes(dat_bytes(entries, chunks=4, dataset=b"calib.txt"))
    g = read_imatrix(tmp_path / "im.gguf")
    d = read_imatrix(tmp_path / "im.dat")
    assert set(g) == set(d) == set(stats)
    for k in g:
        assert np.array_equal(g[k], d[k]), k
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    for t in ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q5_1"):
        a = ggml.quantize(w, t, imatrix=g["blk.0.attn_q.weight"])
        b = ggml.quantize(w, t, imatrix=d["blk.0.attn_q.weight"])
        assert np.array_equal(a, b), t
        plain = ggml.quantize(w, t)
        assert not np.array_equal(a, plain) or t == "q6_K", t   # the importance does reach the quantizer


def test_importance_is_value_over_ncall(tmp_path):
    """llama-quantize's legacy branch: value / ncall in float32; ncall <= 0 keeps the values as stored."""
    v = np.array([3.0, 1.0, 0.0, 7.5, 1e-3], np.float32)
    (tmp_path / "a.dat").write_bytes(dat_bytes([("x", 3, v), ("y", 0, v), ("z", -2, v)]))
    im = read_imatrix(tmp_path / "a.dat")
    assert np.allclose(im["x"], v.astype(np.float64) / 3, rtol=1e-7, atol=0) and im["x"].dtype == np.float32
    assert np.array_equal(im["y"], v) and np.array_equal(im["z"], v)
    # the trailer is optional: chunk count alone, and a dataset name of length 0, both read
    for tail in ((5, None), (5, b"")):
        (tmp_path / "b.dat").write_bytes(dat_bytes([("x", 3, v)], *tail))
        assert np.array_equal(read_imatrix(tmp_path / "b.dat")["x"], im["x"])


def test_extension_does_not_decide(stats, tmp_path):
    write_imatrix(tmp_path / "im.dat", stats, ["t"], 16)   # a GGUF named .dat
    (tmp_path / "legacy.gguf").write_bytes(dat_bytes([("x", 1, [2.0])]))   # a .dat named .gguf
    assert set(read_imatrix(tmp_path / "im.dat")) == set(stats)
    assert read_imatrix(tmp_path / "legacy.gguf")["x"].tolist() == [2.0]


def test_corrupt_dat_files_fail_with_one_line(tmp_path):
    good = dat_bytes([("blk.0.attn_q.weight", 2, np.ones(16, np.float32)), ("b", 2, [1.0])], 1, b"d")
    p = tmp_path / "x.dat"
    cases = {
        "empty": b"",
        "no entries": struct.pack("<i", 0),
        "a billion entries": struct.pack("<i", 10**9) + good[4:],
        "negative name length": good[:4] + struct.pack("<i", -5) + good[8:],
        "huge value count": good[:4 + 4 + 19 + 4] + struct.pack("<i", 2**31 - 1) + good[4 + 4 + 19 + 8:],
        "stray bytes": good + b"\0",
        "NaN": good.replace(struct.pack("<f", 1.0), struct.pack("<f", float("nan")), 1),
        "negative": good.replace(struct.pack("<f", 1.0), struct.pack("<f", -1.0), 1),
        "repeated name": dat_bytes([("a", 1, [1.0]), ("a", 1, [1.0])]),
        "text": b"this is not an importance matrix\n" * 4,
    }
    for n in range(len(good)):   # every truncation that is not at the (optional) trailer's edges
        if n not in (len(good) - 9, len(good) - 5):
            cases[f"truncated at {n}"] = good[:n]
    for what, content in cases.items():
        p.write_bytes(content)
        with pytest.raises(FormatError) as e:
            read_imatrix(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value), what


def test_whole_gguf_from_dat_equals_from_gguf_imatrix(tmp_path, monkeypatch):
    """write_gguf (qkit quantize --imatrix) with OLD.dat writes the same file as with the equivalent imatrix GGUF."""
    pytest.importorskip("torch")
    from test_gguf_hf_route import hf_dir_with_trained_tokenizer

    from qkit.model import loader
    from qkit.gguf.write import write_gguf

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    hf_dir_with_trained_tokenizer(tmp_path / "hf", hidden_size=256, intermediate_size=512, head_dim=64)
    rng = np.random.default_rng(3)
    names = [f"blk.{i}.{t}.weight" for i in range(2) for t in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    stats = {n: (rng.random(512 if "down" in n else 256) * 8, 32) for n in names}
    write_imatrix(tmp_path / "im.gguf", stats, ["t"], 32)
    (tmp_path / "im.dat").write_bytes(dat_bytes([(n, 1, (s / c).astype(np.float32)) for n, (s, c) in stats.items()]))
    ref = loader.resolve(str(tmp_path / "hf"))
    outs = []
    for src in ("im.gguf", "im.dat"):
        out = tmp_path / f"{src}.q4km.gguf"
        write_gguf(ref, out, "Q4_K_M", imatrix=read_imatrix(tmp_path / src))
        outs.append(out.read_bytes())
    write_gguf(ref, tmp_path / "plain.gguf", "Q4_K_M")
    assert outs[0] == outs[1] and outs[0] != (tmp_path / "plain.gguf").read_bytes()
