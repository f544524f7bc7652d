"""libggml's bytes for seeded inputs, as SHA-256 digests committed in data/libggml_digests.json.

The oracle tests in test_ggml.py need llama-cpp-python (an opt-in build of libggml); these digests let
the default suite check every GGML type's bytes against libggml without it. The inputs are drawn from
PCG64's raw 64-bit stream (a fixed algorithm, unlike numpy's distribution samplers, which may change
between numpy releases) by Box-Muller in float64 and rounded to float32, and their own digest is stored,
so a changed input is told apart from a changed quantizer.

Regenerate (only when llama.cpp's quantizers change): install llama-cpp-python==0.3.36 and run
``python tests/ggml_digests.py``; test_ggml.py checks the committed file against the oracle when present.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

PATH = Path(__file__).parent / "data" / "libggml_digests.json"
TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
N = 512  # two K-quant super-blocks per row


def _uniform(seed: int, size: int) -> np.ndarray:
    """Uniform (0, 1) doubles from the top 53 bits of PCG64's raw output."""
    raw = np.random.PCG64(seed).random_raw(size)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def _gaussian(seed: int, shape) -> np.ndarray:
    n = int(np.prod(shape))
    u = _uniform(seed, 2 * n)
    z = np.sqrt(-2.0 * np.log(u[:n])) * np.cos(2.0 * np.pi * u[n:])
    return z.reshape(shape)


def inputs() -> dict[str, np.ndarray]:
    """Named float32 matrices (rows of N): typical, heavy-tailed, and the edge cases of a block's scale."""
    g = _gaussian(1, (8, N))
    t = _gaussian(2, (8, N)) / np.sqrt((_gaussian(3, (8, N, 3)) ** 2).mean(-1))  # Student-t, 3 d.o.f.
    outlier = _gaussian(4, (2, N)) * 0.01
    outlier[:, 77] = 50.0
    half = _gaussian(5, (2, N))
    half[:, : N // 2] = 0.0  # one all-zero super-block beside a live one
    cases = {
        "gaussian": g, "student-t3": t, "all-zero": np.zeros((2, N)), "constant": np.full((2, N), -0.37),
        "tiny": _gaussian(6, (2, N)) * 1e-8, "huge": _gaussian(7, (2, N)) * 1e4, "one-outlier": outlier,
        "half-zero": half,
    }
    return {k: np.ascontiguousarray(v, np.float32) for k, v in cases.items()}


def importance() -> np.ndarray:
    """A seeded importance matrix (per-column mean squares), with some columns never activated."""
    im = (_gaussian(8, (16, N)) ** 2).mean(0)
    im[::97] = 0.0
    return im.astype(np.float32)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def libggml_bytes(lib, t: str, X: np.ndarray, im: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk: the reference quantizer without an imatrix, the importance-weighted one with."""
    import gguf

    bt = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t.upper())]
    out = np.zeros((X.shape[0], X.shape[1] // bt[0] * bt[1]), np.uint8)
    if im is None:
        f = getattr(lib, f"quantize_row_{t}_ref")
        f.restype, f.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        for r in range(X.shape[0]):
            row = np.ascontiguousarray(X[r])
            f(row.ctypes.data, out[r].ctypes.data, X.shape[1])
        return out
    ch = lib.ggml_quantize_chunk
    ch.restype = ctypes.c_size_t
    ch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    ch(int(getattr(gguf.GGMLQuantizationType, t.upper())), X.ctypes.data, out.ctypes.data, 0, X.shape[0], X.shape[1],
       im.ctypes.data)
    return out


def load_libggml():
    import llama_cpp

    return ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))


def from_oracle(lib) -> dict:
    """{inputs: {case: digest}, bytes: {"type/case" or "type/case/imatrix": digest}} from libggml."""
    xs, im = inputs(), importance()
    out = {"inputs": {k: digest(v) for k, v in xs.items()}, "importance": digest(im), "bytes": {}}
    for t in TYPES:
        for name, X in xs.items():
            out["bytes"][f"{t}/{name}"] = digest(libggml_bytes(lib, t, X, None))
            out["bytes"][f"{t}/{name}/imatrix"] = digest(libggml_bytes(lib, t, X, im))
    return out


def main() -> None:
    import llama_cpp

    rec = from_oracle(load_libggml())
    rec = {"source": f"llama-cpp-python {llama_cpp.__version__} (libggml-base): quantize_row_<type>_ref, and "
                     "ggml_quantize_chunk with the imatrix", "n": N, **rec}
    PATH.parent.mkdir(exist_ok=True)
    tmp = PATH.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, PATH)
    print(f"{len(rec['bytes'])} digests -> {PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
