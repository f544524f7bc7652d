"""GGML blocks: gguf-py's dequantizer agrees with ours on every type; simple types byte-equal gguf-py's
quantizer; with llama-cpp-python installed, every type byte-equals libggml's reference quantizer."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from qkit import ggml  # noqa: E402
from qkit.errors import InputError, UsageError  # noqa: E402

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
SIMPLE = TYPES[:5]


def gguf_type(t):
    return getattr(gguf.GGMLQuantizationType, t.upper())


def inputs(seed=0, n=1024):
    rng = np.random.default_rng(seed)
    return {
        "gaussian": rng.standard_normal((24, n)).astype(np.float32),
        "student-t3": rng.standard_t(3, (24, n)).astype(np.float32),
        "all-zero": np.zeros((2, n), np.float32),
        "constant": np.full((2, n), -0.37, np.float32),
        "tiny": (rng.standard_normal((4, n)) * 1e-8).astype(np.float32),
        "huge": (rng.standard_normal((4, n)) * 1e4).astype(np.float32),
        "one-outlier": np.where(np.arange(n) == 77, 50.0, rng.standard_normal((4, n)) * 0.01).astype(np.float32),
    }


@pytest.mark.parametrize("t", TYPES)
def test_gguf_dequantizes_our_bytes_to_our_values(t):
    for name, X in inputs().items():
        b = ggml.quantize(X, t)
        ours = ggml.dequantize(b, t)
        theirs = gguf.quants.dequantize(b, gguf_type(t)).reshape(ours.shape)
        assert np.array_equal(ours, theirs), name
        assert ours.shape == X.shape


@pytest.mark.parametrize("t", SIMPLE)
def test_simple_types_equal_gguf_quantize(t):
    for name, X in inputs(1).items():
        assert np.array_equal(ggml.quantize(X, t), gguf.quants.quantize(X, gguf_type(t))), name


@pytest.mark.parametrize("t", TYPES)
def test_reconstruction_is_sane(t):
    X = inputs(2)["gaussian"]
    err = np.abs(ggml.dequantize(ggml.quantize(X, t), t) - X).mean() / np.abs(X).mean()
    limit = {"q8_0": 0.01, "q6_K": 0.05, "q5_0": 0.06, "q5_1": 0.06, "q2_K": 0.35, "q3_K": 0.2}.get(t, 0.12)
    assert err < limit, err
    for name in ("all-zero", "constant"):
        Y = inputs()[name]
        assert np.allclose(ggml.dequantize(ggml.quantize(Y, t), t), Y, atol=2e-3), name


def test_block_sizes_match_gguf():
    for t in TYPES:
        bs, ts = gguf.constants.GGML_QUANT_SIZES[gguf_type(t)]
        assert (ggml.get_type(t).block_size, ggml.get_type(t).type_size) == (bs, ts)


class TestBadInput:
    def test_row_length(self):
        with pytest.raises(InputError, match="multiple of 256"):
            ggml.quantize(np.zeros((2, 576), np.float32), "q4_K")
        with pytest.raises(InputError, match="multiple of 34 bytes"):
            ggml.dequantize(np.zeros((2, 35), np.uint8), "q8_0")

    def test_unknown_type_and_nan(self):
        with pytest.raises(UsageError, match="unknown GGML type 'q3_X'"):
            ggml.quantize(np.zeros(32, np.float32), "q3_X")
        x = np.zeros(32, np.float32)
        x[3] = np.nan
        with pytest.raises(InputError, match="NaN"):
            ggml.quantize(x, "q4_0")


def libggml():
    pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")
    from ggml_digests import load_libggml

    return load_libggml()


def ggml_ref(lib, t, X, im=None):
    """libggml's bytes: its reference quantizer, or ggml_quantize_chunk with an importance matrix."""
    from ggml_digests import libggml_bytes

    return libggml_bytes(lib, t, np.ascontiguousarray(X, np.float32), im)


@pytest.mark.parametrize("t", TYPES)
def test_bytes_equal_libggml_reference(t):
    lib = libggml()
    bt = ggml.get_type(t)
    for name, X in inputs(3).items():
        ours = ggml.quantize(X, t).reshape(-1, bt.type_size)
        ref = ggml_ref(lib, t, X).reshape(-1, bt.type_size)
        share = (ours == ref).all(axis=1).mean()
        assert share == 1.0, f"{t} {name}: {share:.4%} of blocks identical"


@pytest.mark.data
@pytest.mark.parametrize("t", TYPES)
def test_bytes_equal_libggml_on_default_model_weights(t):
    lib = libggml()
    from qkit.model import loader

    store = loader.resolve(None).store()
    W = np.concatenate([store.get(f"model.layers.{i}.mlp.down_proj.weight").numpy()[:64] for i in (0, 15, 29)])
    W = W[:, : W.shape[1] // 256 * 256]  # rows of 1536: six super-blocks
    bt = ggml.get_type(t)
    assert ((ggml.quantize(W, t).reshape(-1, bt.type_size) == ggml_ref(lib, t, W).reshape(-1, bt.type_size))
            .all(axis=1).mean()) == 1.0
    # and with an importance matrix (a made-up one: per-column mean squares of random activations)
    im = (np.random.default_rng(0).standard_normal((64, W.shape[1])) ** 2).mean(0).astype(np.float32)
    ours = ggml.quantize(W, t, imatrix=im)
    ref = ggml_ref(lib, t, W, im)
    assert (ours.reshape(-1, bt.type_size) == ref.reshape(-1, bt.type_size)).all(axis=1).mean() == 1.0


IMATRIX_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]


@pytest.mark.parametrize("t", IMATRIX_TYPES)
def test_importance_weighted_bytes_equal_ggml_quantize_chunk(t):
    lib = libggml()
    rng = np.random.default_rng(7)
    bt = ggml.get_type(t)
    for name, X in inputs(4).items():
        im = (rng.random(X.shape[1]) * 3).astype(np.float32)
        im[::97] = 0  # columns never activated
        ours = ggml.quantize(X, t, imatrix=im)
        ref = ggml_ref(lib, t, X, im)
        share = (ours.reshape(-1, bt.type_size) == ref.reshape(-1, bt.type_size)).all(axis=1).mean()
        assert share == 1.0, f"{t} {name}: {share:.4%} of blocks identical"


def test_importance_matrix_changes_the_choice_and_is_checked():
    X = inputs(5)["student-t3"]
    im = np.ones(X.shape[1], np.float32)
    im[:256] = 100.0  # the first super-block's columns matter far more
    a, b = ggml.quantize(X, "q4_K"), ggml.quantize(X, "q4_K", imatrix=im)
    assert not np.array_equal(a, b)
    err = lambda q: (((ggml.dequantize(q, "q4_K") - X) ** 2) * im).sum()  # noqa: E731
    assert err(b) < err(a)
    with pytest.raises(InputError, match=r"expected \(1024,\)"):
        ggml.quantize(X, "q4_K", imatrix=np.ones(10, np.float32))
    with pytest.raises(InputError, match="non-negative"):
        ggml.quantize(X, "q6_K", imatrix=-im)


def test_type_names_are_case_insensitive_and_scales_are_validated():
    assert ggml.get_type("Q4_K") is ggml.get_type("q4_k") is ggml.get_type("q4_K")
    with pytest.raises(InputError, match="overflows fp16"):
        ggml.validate(ggml.quantize(np.full((1, 32), 1e9, np.float32), "q4_0"), "q4_0")
    ggml.validate(ggml.quantize(inputs()["gaussian"], "q6_K"), "q6_K")  # ordinary weights pass


# --- libggml's bytes without the oracle: committed digests (tests/ggml_digests.py) ---------------------------

def _committed():
    import json

    from ggml_digests import PATH

    return json.loads(PATH.read_text())


def test_digest_inputs_are_the_committed_ones():
    """The seeded inputs are bit-identical to those the digests were made from (else the next test means nothing)."""
    import ggml_digests as gd

    rec = _committed()
    assert rec["n"] == gd.N
    assert {k: gd.digest(v) for k, v in gd.inputs().items()} == rec["inputs"]
    assert gd.digest(gd.importance()) == rec["importance"]


@pytest.mark.parametrize("t", TYPES)
def test_bytes_equal_committed_libggml_digests(t):
    """Every type, every case, plain and importance-weighted: qkit's bytes hash to libggml's."""
    import ggml_digests as gd

    rec = _committed()["bytes"]
    im = gd.importance()
    bad = []
    for name, X in gd.inputs().items():
        if gd.digest(ggml.quantize(X, t)) != rec[f"{t}/{name}"]:
            bad.append(name)
        if gd.digest(ggml.quantize(X, t, imatrix=im)) != rec[f"{t}/{name}/imatrix"]:
            bad.append(name + " (imatrix)")
    assert not bad, f"{t}: bytes differ from libggml's on {', '.join(bad)}"


def test_committed_digests_match_the_oracle():
    """With llama-cpp-python installed: the committed file is what libggml gives today."""
    import ggml_digests as gd

    lib = libggml()
    fresh = gd.from_oracle(lib)
    rec = _committed()
    assert fresh["inputs"] == rec["inputs"] and fresh["bytes"] == rec["bytes"]
