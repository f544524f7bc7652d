"""Packed exports (GPTQ v1/v2, AWQ GEMM, compressed-tensors): round trips, consumers written by others, bad input.

Tiny random Llama models (tests/llm_models.py): hidden 64, MLP 96, two layers. The
in-memory reference is what the chooser returned (QuantResult.weight, recorded as the
pipeline runs); the export, read back by qkit's reader, must give those weights bit
for bit, and so must the consumers (compressed-tensors' decompressor, an AWQ unpacker
written from AutoAWQ's layout, llama.cpp's convert_hf_to_gguf.py when its source is at
hand: QKIT_LLAMACPP_SRC=/path/to/llama-cpp-python-0.3.36/vendor/llama.cpp).
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_models import make_model  # noqa: E402

from qkit import affine, pipeline  # noqa: E402
from qkit.affine import AffineConfig  # noqa: E402
from qkit.chooser import ChooserBase  # noqa: E402
from qkit.errors import FormatError, InputError, UsageError  # noqa: E402
from qkit.eval.perplexity import perplexity  # noqa: E402
from qkit.export import grid_requirements  # noqa: E402
from qkit.gptq import GPTQ, GPTQConfig  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.rtn import RTN  # noqa: E402


@pytest.fixture(autouse=True)
def _no_heap_trim(monkeypatch):
    """The pipeline's per-layer gc.collect + malloc_trim keeps real runs small; on a 2-layer model inside a test
    process full of objects it is most of the run time, and changes no output."""
    monkeypatch.setattr(pipeline, "trim_heap", lambda: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = make_model("llama", root / "llama")
    return root / "llama", model


class Recording(ChooserBase):
    """Wraps a chooser and keeps every QuantResult it returns: qkit's in-memory quantized weights."""

    def __init__(self, chooser):
        self.inner = chooser
        self.name, self.cfg, self.needs_calibration = chooser.name, chooser.cfg, chooser.needs_calibration
        self.true_sequential = chooser.true_sequential
        self.results = {}

    @property
    def affine_grid(self):
        return self.inner.affine_grid

    def export_spec(self, fmt, act_bits=None):
        return self.inner.export_spec(fmt, act_bits)

    def add_batch(self, name, X):
        self.inner.add_batch(name, X)

    def quantize(self, name, W):
        res = self.inner.quantize(name, W)
        self.results[name] = res
        return res


def chooser_for(fmt, bits, group_size=32, sym=False, method="rtn", act_order=False, static_groups=False):
    grid = grid_requirements(fmt)
    if method == "gptq":
        return Recording(GPTQ(GPTQConfig(grid=AffineConfig(bits=bits, group_size=group_size, symmetric=sym, **grid),
                                         act_order=act_order, static_groups=static_groups)))
    return Recording(RTN(affine.AffineConfig(bits=bits, group_size=group_size, symmetric=sym, **grid)))


SAMPLES = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def export(d, out, fmt, ch):
    samples = SAMPLES if ch.needs_calibration else None
    return pipeline.quantize_model(loader.resolve(str(d)), out, ch, fmt=fmt, samples=samples)


def in_memory_model(model, results):
    m = copy.deepcopy(model)
    for name, res in results.items():
        m.get_submodule(name).weight.data = torch.from_numpy(res.weight)
    return m


CASES = [(f, b, "rtn", False, False, False) for f in ("gptq", "gptq_v2", "compressed-tensors") for b in (2, 3, 4, 8)]
CASES += [("awq", 4, "rtn", False, False, False),
          ("gptq", 3, "gptq", False, True, False), ("gptq_v2", 4, "gptq", False, True, False),
          ("compressed-tensors", 4, "gptq", False, True, False), ("awq", 4, "gptq", False, True, True),
          ("gptq", 4, "rtn", True, False, False), ("compressed-tensors", 3, "rtn", True, False, False),
          ("awq", 4, "rtn", True, False, False)]


@pytest.mark.parametrize("fmt,bits,method,sym,act_order,static", CASES)
def test_round_trip_is_exact(tiny, tmp_path, fmt, bits, method, sym, act_order, static):
    """export -> qkit's reader gives the chooser's in-memory weights bit for bit; every other tensor as stored;
    perplexity of the reloaded model equals the in-memory one's."""
    d, model = tiny
    ch = chooser_for(fmt, bits, sym=sym, method=method, act_order=act_order, static_groups=static)
    s = export(d, tmp_path / "q", fmt, ch)
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == {"gptq_v2": "gptq"}.get(fmt, fmt)
    assert (tmp_path / "q" / "qkit_quantization.json").is_file()
    store = loader.resolve(str(tmp_path / "q")).store()
    assert len(ch.results) == 14
    for name, res in ch.results.items():
        assert torch.equal(store.get(name + ".weight"), torch.from_numpy(res.weight)), name
    src = loader.resolve(str(d)).store()
    for k in src.keys():
        if k not in {n + ".weight" for n in ch.results}:
            assert torch.equal(store.get(k), src.get(k)), k
    if act_order and not static:
        assert any(not np.array_equal(r.g_idx, np.arange(r.g_idx.size) // 32) for r in ch.results.values())
    reloaded = loader.load_model(loader.resolve(str(tmp_path / "q")))
    ids = torch.randint(0, 300, (3 * 32,), generator=torch.Generator().manual_seed(1))
    r = perplexity(reloaded, ids, 32)
    ref = perplexity(in_memory_model(model, ch.results), ids, 32)
    assert abs(r.ppl / ref.ppl - 1) < 1e-5
    assert s.extra["stored_bits_per_weight"] > bits


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_group_aware_act_order_round_trip(tiny, tmp_path, fmt):
    """Group-aware act-order keeps g_idx = i // g, so even AWQ GEMM (no g_idx) stores it; exact round trip."""
    d, _ = tiny
    grid = grid_requirements(fmt)
    ch = Recording(GPTQ(GPTQConfig(grid=AffineConfig(bits=4, group_size=32, **grid), act_order=True, group_aware=True)))
    export(d, tmp_path / "q", fmt, ch)
    store = loader.resolve(str(tmp_path / "q")).store()
    for name, res in ch.results.items():
        assert np.array_equal(res.g_idx, np.arange(res.g_idx.size) // 32), name
        assert torch.equal(store.get(name + ".weight"), torch.from_numpy(res.weight)), name
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert qcfg["desc_act"] is False and qcfg["act_group_aware"] is True


def test_true_sequential_gptq_round_trip_and_config(tiny, tmp_path):
    """True-sequential GPTQ packs exactly as computed, and the GPTQ config says true_sequential."""
    d, _ = tiny
    ch = Recording(GPTQ(GPTQConfig(grid=AffineConfig(bits=4, group_size=32, **grid_requirements("gptq")),
                                   true_sequential=True)))
    export(d, tmp_path / "q", "gptq", ch)
    store = loader.resolve(str(tmp_path / "q")).store()
    for name, res in ch.results.items():
        assert torch.equal(store.get(name + ".weight"), torch.from_numpy(res.weight)), name
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["true_sequential"] is True


@pytest.mark.parametrize("fmt", ["gptq_v2", "awq", "compressed-tensors"])
def test_per_channel_round_trip(tiny, tmp_path, fmt):
    """group size -1: one scale per output row (config group_size -1; compressed-tensors strategy 'channel')."""
    d, _ = tiny
    ch = chooser_for(fmt, 4, group_size=None)
    export(d, tmp_path / "q", fmt, ch)
    store = loader.resolve(str(tmp_path / "q")).store()
    for name, res in ch.results.items():
        assert res.scale.shape[1] == 1
        assert torch.equal(store.get(name + ".weight"), torch.from_numpy(res.weight)), name


def test_gptq_v1_stores_zero_minus_one_and_clamps(tiny, tmp_path):
    """v1 and v2 of one run hold the same codes and scales; v1's qzeros are v2's minus one, its zeros all >= 1."""
    from safetensors import safe_open

    from qkit import packing

    d, _ = tiny
    ch1 = chooser_for("gptq", 4)
    export(d, tmp_path / "v1", "gptq", ch1)
    ch2 = chooser_for("gptq_v2", 4)
    ch2.inner.cfg = ch1.cfg  # the same (clamped) grid written both ways
    ch2.cfg = ch1.cfg
    export(d, tmp_path / "v2", "gptq_v2", ch2)
    n = "model.layers.0.mlp.down_proj"

    def qzeros(sub):
        idx = json.loads((tmp_path / sub / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(tmp_path / sub / idx[n + ".qzeros"]), "np") as f:
            return packing.unpack_gptq_qzeros(f.get_tensor(n + ".qzeros"), 4).astype(int)

    z1, z2 = qzeros("v1"), qzeros("v2")
    assert np.array_equal(z1 + 1, z2) and z2.min() >= 1
    assert np.array_equal(ch1.results[n].zero.T, z2)
    # without min_zero the plain grid has zeros of 0 somewhere (random weights with one-signed groups are rare:
    # force one), which v1 cannot hold
    W = np.random.default_rng(0).normal(size=(8, 32)).astype(np.float32)
    W[0] = np.abs(W[0])
    plain = affine.choose_qparams(W, 4, (1, 32))[1]
    clamped_s, clamped_z = affine.choose_qparams(W, 4, (1, 32), min_zero=1, scale_dtype="float16")
    assert plain[0, 0] == 0 and clamped_z[0, 0] == 1 and clamped_z.min() >= 1
    q = affine.quantize(W, clamped_s, clamped_z, 4, (1, 32))
    err = np.abs(affine.dequantize(q, clamped_s, clamped_z, (1, 32)) - W)
    assert np.all(err <= clamped_s / 2 + 1e-6)  # the widened grid still covers each group's range


def test_fp16_scales_are_the_in_memory_grid():
    W = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32) * 0.03
    s, z = affine.choose_qparams(W, 3, (1, 32), scale_dtype="float16")
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)
    s32, _ = affine.choose_qparams(W, 3, (1, 32))
    assert not np.array_equal(s, s32) and np.allclose(s, s32, rtol=1e-3)
    with pytest.raises(InputError, match="exceeds float16's range"):
        affine.choose_qparams(np.full((1, 8), 1e6, np.float32), 4, (1, 8), scale_dtype="float16")


def test_ragged_groups(tiny, tmp_path):
    """MLP width 96 in groups of 64 leaves a last group of 32: GPTQ's g_idx holds it, AWQ and
    compressed-tensors cannot, and say so before quantizing anything."""
    d, _ = tiny
    ch = chooser_for("gptq_v2", 4, group_size=64)
    export(d, tmp_path / "g", "gptq_v2", ch)
    store = loader.resolve(str(tmp_path / "g")).store()
    n = "model.layers.1.mlp.down_proj"
    assert ch.results[n].scale.shape == (64, 2)
    assert torch.equal(store.get(n + ".weight"), torch.from_numpy(ch.results[n].weight))
    for fmt in ("awq", "compressed-tensors"):
        with pytest.raises(UsageError, match=r"96 input columns leave a last group of 32 .* cannot represent a "
                                             r"ragged group"):
            export(d, tmp_path / fmt, fmt, chooser_for(fmt, 4, group_size=64))
        assert not (tmp_path / fmt).exists()


def test_awq_agrees_with_a_reference_unpacker(tiny, tmp_path):
    """A plain-loop reader written from AutoAWQ's WQLinear_GEMM (awq/modules/linear/gemm.py): qweight (in, out/8),
    eight 4-bit slots per int32, slot i holding output column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; qzeros alike;
    scales (in/g, out); W = (q - z) * s."""
    from safetensors import safe_open

    d, _ = tiny
    ch = chooser_for("awq", 4)
    export(d, tmp_path / "a", "awq", ch)
    idx = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"]
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(words):
        rows, cols = words.shape
        out = np.zeros((rows, cols * 8), dtype=np.int64)
        for r in range(rows):
            for c in range(cols):
                w = int(words[r, c]) & 0xFFFFFFFF
                for i in range(8):
                    out[r, c * 8 + order_map[i]] = (w >> (4 * i)) & 0xF
        return out

    for n in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        with safe_open(str(tmp_path / "a" / idx[n + ".qweight"]), "np") as f:
            qweight, qzeros, scales = (f.get_tensor(n + s) for s in (".qweight", ".qzeros", ".scales"))
        assert qweight.dtype == np.int32 and scales.dtype == np.float16
        q, z = unpack(qweight), unpack(qzeros)
        g = q.shape[0] // scales.shape[0]
        W = np.empty(q.shape, np.float32)
        for i in range(q.shape[0]):
            W[i] = scales[i // g].astype(np.float32) * (q[i] - z[i // g]).astype(np.float32)
        assert np.array_equal(W.T, ch.results[n].weight)


def test_gptq_3bit_qweight_is_the_reference_packing(tiny, tmp_path):
    """llama.cpp does not read 3-bit GPTQ: hold qkit's qweight to the GPTQ reference's QuantLinear.pack instead."""
    from safetensors import safe_open
    from test_packing import gptq_reference_pack

    d, _ = tiny
    ch = chooser_for("gptq_v2", 3)
    export(d, tmp_path / "g3", "gptq_v2", ch)
    idx = json.loads((tmp_path / "g3" / "model.safetensors.index.json").read_text())["weight_map"]
    n = "model.layers.0.mlp.up_proj"
    with safe_open(str(tmp_path / "g3" / idx[n + ".qweight"]), "np") as f:
        qweight = f.get_tensor(n + ".qweight")
    assert np.array_equal(qweight.view(np.uint32), gptq_reference_pack(ch.results[n].codes.T, 3).view(np.uint32))


# ------------------------------------------------------------------ compressed-tensors, the package itself
CT_CASES = [(b, False, False) for b in (2, 3, 4, 8)] + [(4, True, False), (3, True, False), (4, False, True)]


@pytest.mark.parametrize("bits,sym,act_order", CT_CASES)
def test_compressed_tensors_package_decompresses_the_same_weights(tiny, tmp_path, bits, sym, act_order):
    ct = pytest.importorskip("compressed_tensors", minversion="0.18")  # 0.18: the dense 3-bit layout qkit writes
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    if act_order and tuple(int(v) for v in ct.__version__.split(".")[:2]) >= (0, 19):
        pytest.skip("compressed-tensors >= 0.19 removed actorder='group' (weight_g_idx)")
    d, _ = tiny
    ch = chooser_for("compressed-tensors", bits, sym=sym, method="gptq" if act_order else "rtn", act_order=act_order)
    export(d, tmp_path / "c", "compressed-tensors", ch)
    qcfg = QuantizationConfig.model_validate(
        json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"])
    scheme = qcfg.config_groups["group_0"]
    tensors = {}
    for f in sorted((tmp_path / "c").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name, res in ch.results.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        assert ("g_idx" in " ".join(sd)) == act_order and ("weight_zero_point" in sd) == (not sym)
        w16 = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]  # computed in the stored fp16
        assert w16.dtype == torch.float16
        assert torch.equal(w16, torch.from_numpy(res.weight).half()), name
        sd32 = {**sd, "weight_scale": sd["weight_scale"].float()}  # fp32 arithmetic: qkit's weights exactly
        assert torch.equal(PackedQuantizationCompressor.decompress(sd32, scheme)["weight"],
                           torch.from_numpy(res.weight)), name


def test_transformers_loads_a_symmetric_compressed_tensors_export(tiny, tmp_path):
    """transformers' own loader (compressed-tensors quantizer) decompresses qkit's export to qkit's weights.

    Symmetric only: with transformers 5.23 + compressed-tensors 0.18 an asymmetric pack-quantized checkpoint does not
    load (the loader allocates weight_zero_point unpacked, (out, groups), while compressed-tensors' own compress()
    writes it packed along the output dimension, as qkit does)."""
    pytest.importorskip("compressed_tensors", minversion="0.18")
    from transformers import AutoModelForCausalLM

    d, _ = tiny
    ch = chooser_for("compressed-tensors", 4, sym=True)
    export(d, tmp_path / "c", "compressed-tensors", ch)
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "c"), dtype=torch.float32)
    m.hf_quantizer.compressor.decompress_model(m)
    for name, res in ch.results.items():
        assert torch.equal(m.get_submodule(name).weight.data, torch.from_numpy(res.weight)), name


# ------------------------------------------------------------------ llama.cpp's converter (opt-in)
def llamacpp_src():
    src = os.environ.get("QKIT_LLAMACPP_SRC")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file() or not (Path(src) / "conversion").is_dir():
        pytest.skip("set QKIT_LLAMACPP_SRC to llama.cpp's source (llama-cpp-python 0.3.36 sdist: vendor/llama.cpp, "
                    "with convert_hf_to_gguf.py and conversion/)")
    pytest.importorskip("sentencepiece")  # convert_hf_to_gguf imports it before looking for a tokenizer.model
    return Path(src)


@pytest.fixture(scope="module")
def lcpp(tmp_path_factory):
    """llama.cpp's source, and a tiny model with a tokenizer convert_hf_to_gguf recognises: the default model's
    (SmolLM2's, fetched into the qkit cache if needed), on a tiny Llama of its vocabulary size."""
    import shutil

    lc = llamacpp_src()
    root = tmp_path_factory.mktemp("lcpp")
    make_model("llama", root / "m", vocab_size=49152)
    src = loader.resolve(None).dir
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, root / "m" / f)
    return lc, root / "m"


LCPP_CASES = [("gptq", b, False, 32) for b in (2, 4, 8)] + [("gptq_v2", b, False, 32) for b in (2, 4, 8)]
LCPP_CASES += [("gptq", 4, True, 32),  # act-order: g_idx
               ("gptq_v2", 4, False, 64),  # ragged: the MLP's 96 columns in groups of 64 + 32
               ("compressed-tensors", 2, False, 32), ("compressed-tensors", 4, False, 32),
               ("compressed-tensors", 8, False, 32)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt,bits,act_order,group_size", LCPP_CASES)
def test_llamacpp_convert_reads_the_export(lcpp, tmp_path, fmt, bits, act_order, group_size):
    """convert_hf_to_gguf.py --outtype f32 on qkit's export: every dequantized linear equals qkit's in memory
    (Q and K rows compared through llama.cpp's permutation), the embedding equals the source.

    Not 3 bits: llama.cpp dequantizes no 3-bit GPTQ ("not yet implemented"), and reads pack-quantized with
    floor(32 / bits) codes per word (compressed-tensors <= 0.17), not the dense 3-bit layout of 0.18."""
    import gguf

    from qkit.gguf import read as gguf_convert
    from qkit.gguf.write import hf_to_gguf_names

    src, d = lcpp
    ch = chooser_for(fmt, bits, group_size=group_size, method="gptq" if act_order else "rtn", act_order=act_order)
    export(d, tmp_path / "q", fmt, ch)
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(tmp_path / "q"), "--outfile",
                        str(tmp_path / "q.gguf"), "--outtype", "f32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    got = {t.name: np.asarray(t.data).reshape([int(v) for v in reversed(t.shape)]) for t in reader.tensors}
    config = loader.load_config(loader.resolve(str(d)))
    names = hf_to_gguf_names(config)
    for name, res in ch.results.items():
        g = names[name + ".weight"]
        w = res.weight
        if ".attn_q." in g:
            w = gguf_convert.permute_qk(w, config.num_attention_heads)
        elif ".attn_k." in g:
            w = gguf_convert.permute_qk(w, config.num_key_value_heads)
        assert np.array_equal(got[g], w), g
    embd = loader.resolve(str(d)).store().get("model.embed_tokens.weight").numpy()
    assert np.array_equal(got["token_embd.weight"], embd)


# ------------------------------------------------------------------ bad input
class TestBadInput:
    def test_unknown_method_inconsistent_shapes_and_bits(self, tiny, tmp_path):
        import shutil

        from safetensors.torch import load_file, save_file

        d, _ = tiny
        export(d, tmp_path / "g", "gptq", chooser_for("gptq", 4))
        cfg = json.loads((tmp_path / "g" / "config.json").read_text())

        def variant(name, edit_cfg=None, edit_tensors=None):
            v = tmp_path / name
            shutil.copytree(tmp_path / "g", v)
            c = copy.deepcopy(cfg)
            if edit_cfg:
                edit_cfg(c["quantization_config"])
            (v / "config.json").write_text(json.dumps(c))
            if edit_tensors:
                f = v / "model-00002.safetensors"
                t = load_file(str(f))
                edit_tensors(t)
                save_file(t, str(f), metadata={"format": "pt"})
            return loader.resolve(str(v))

        with pytest.raises(FormatError, match="unknown quantization method 'magic'"):
            loader.load_model(variant("m", lambda q: q.update(quant_method="magic")))
        with pytest.raises(FormatError, match="GPTQ bits 5 cannot be held by the format"):
            loader.load_model(variant("b", lambda q: q.update(bits=5)))
        with pytest.raises(FormatError, match="checkpoint_format 'marlin' is not readable"):
            loader.load_model(variant("f", lambda q: q.update(checkpoint_format="marlin")))
        n = "model.layers.0.self_attn.q_proj"

        def drop_scale_row(t):
            t[n + ".scales"] = t[n + ".scales"][:1].contiguous()
        with pytest.raises(FormatError, match=r"q_proj: inconsistent packed tensors \(qzeros \(2, 8\), expected"):
            loader.load_model(variant("s", edit_tensors=drop_scale_row))

        def short_qweight(t):
            t[n + ".qweight"] = t[n + ".qweight"][:, :32].contiguous()
        with pytest.raises(FormatError, match=r"q_proj: inconsistent packed tensors \(scales \(2, 64\) vs qweight"):
            loader.load_model(variant("w", edit_tensors=short_qweight))

    def test_awq_and_compressed_tensors_shapes(self, tiny, tmp_path):
        import shutil

        from safetensors.torch import load_file, save_file

        d, _ = tiny
        n = "model.layers.0.mlp.up_proj"
        for fmt, key, match in (("awq", ".qzeros", r"qzeros \(2, 8\), expected \(2, 12\)"),
                                ("compressed-tensors", ".weight_zero_point", r"weight_zero_point int32 \(4, 2\), "
                                                                             r"expected int32 \(12, 2\)")):
            export(d, tmp_path / fmt, fmt, chooser_for(fmt, 4))
            f = tmp_path / fmt / "model-00002.safetensors"
            t = load_file(str(f))
            other = "model.layers.0.self_attn.q_proj" if fmt == "awq" else "model.layers.0.self_attn.k_proj"
            t[n + key] = t[other + key].clone()  # another linear's zeros: the wrong shape for this one
            save_file(t, str(f), metadata={"format": "pt"})
            with pytest.raises(FormatError, match=match):
                loader.load_model(loader.resolve(str(tmp_path / fmt)))
        shutil.rmtree(tmp_path / "awq")

    def test_what_a_format_cannot_hold_is_refused_up_front(self, tiny, tmp_path):
        d, _ = tiny
        with pytest.raises(UsageError, match="AWQ GEMM checkpoints hold 4-bit codes only, not 3"):
            export(d, tmp_path / "a", "awq", chooser_for("awq", 3))
        with pytest.raises(UsageError, match="GPTQ checkpoints hold 2, 3, 4, 8 bits, not 6"):
            export(d, tmp_path / "b", "gptq_v2", chooser_for("gptq_v2", 6))
        with pytest.raises(UsageError, match="AWQ GEMM has no g_idx"):
            export(d, tmp_path / "c", "awq", chooser_for("awq", 4, method="gptq", act_order=True))
        with pytest.raises(UsageError, match="store fp16 scales"):
            export(d, tmp_path / "d", "gptq_v2", Recording(RTN(affine.AffineConfig(bits=4, group_size=32))))
        with pytest.raises(UsageError, match="GPTQ v1 checkpoints store zero - 1"):
            export(d, tmp_path / "e", "gptq", chooser_for("gptq_v2", 4))
        with pytest.raises(UsageError, match="unknown export format 'exl2'"):
            export(d, tmp_path / "f", "exl2", chooser_for("gptq_v2", 4))
        g = make_model("gpt2", tmp_path / "gpt2")
        del g
        with pytest.raises(UsageError, match="transposed Conv1D"):
            export(tmp_path / "gpt2", tmp_path / "g", "gptq_v2", chooser_for("gptq_v2", 4))
        assert not any(p.name[0] in "abcdefg" and p.is_dir() and p.name != "gpt2" for p in tmp_path.iterdir())

    def test_requantizing_an_export_writes_float_config(self, tiny, tmp_path):
        """An export is a model like any other: quantizing it again to safetensors drops its quantization_config."""
        d, _ = tiny
        export(d, tmp_path / "g", "compressed-tensors", chooser_for("compressed-tensors", 4))
        pipeline.quantize_model(loader.resolve(str(tmp_path / "g")), tmp_path / "f",
                                RTN(affine.AffineConfig(bits=8, group_size=32)))
        assert "quantization_config" not in json.loads((tmp_path / "f" / "config.json").read_text())
        loader.load_model(loader.resolve(str(tmp_path / "f")))


# ------------------------------------------------------------------ CLI
def run_cli(capsys, *args):
    """The CLI in this process (its contract, exit status and one-line errors, is main()'s; no 5 s torch import)."""
    from qkit.cli.main import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def char_tokenizer(directory: Path) -> None:
    """A character-level tokenizer (ids < 300) so `qkit eval ppl` can run on a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(directory))


def test_cli_export_then_eval(tiny, tmp_path, capsys):
    """qkit quantize --format gptq -o DIR copies config and tokenizer; qkit eval ppl DIR gives the perplexity of the
    safetensors output of the same settings (the same model: fp16 scales in both)."""
    import shutil

    d, _ = tiny
    m = tmp_path / "m"
    shutil.copytree(d, m)
    char_tokenizer(m)
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8)
    ppl = {}
    for fmt in ("safetensors", "gptq"):
        r = run_cli(capsys, "quantize", str(m), "-o", str(tmp_path / fmt), "--bits", "4", "--group-size", "32",
                    "--format", fmt)
        assert r.returncode == 0, r.stderr
        assert ("stores zero - 1" in r.stdout) == (fmt == "gptq")
        r = run_cli(capsys, "eval", "ppl", str(tmp_path / fmt), "--text", str(text), "--ctx", "64",
                    "--runtime", "torch", "--json", str(tmp_path / f"{fmt}.json"))
        assert r.returncode == 0, r.stderr
        ppl[fmt] = json.loads((tmp_path / f"{fmt}.json").read_text())["ppl"]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in (tmp_path / "gptq").iterdir()}
    assert abs(ppl["gptq"] / ppl["safetensors"] - 1) < 1e-5
    r = run_cli(capsys, "quantize", str(m), "-o", str(tmp_path / "x"), "--bits", "3", "--format", "awq")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "qkit: error: AWQ GEMM checkpoints hold 4-bit codes only, not 3 (use --format gptq_v2 or compressed-tensors "
        "for other widths)"]
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "magic"
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(cfg))
    r = run_cli(capsys, "eval", "ppl", str(tmp_path / "gptq"), "--text", str(text))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("qkit: error: config.json: unknown quantization method 'magic' "
                                                 "(qkit reads gptq, awq, compressed-tensors)")


# ------------------------------------------------------------------ W8A8: compressed-tensors int-quantized
@pytest.mark.parametrize("bits,group_size,sym", [(8, None, True), (8, 32, False), (4, 32, True)])
def test_int_quantized_w8a8_round_trip_and_package(tiny, tmp_path, bits, group_size, sym):
    """act_bits=8 writes int-quantized: int8 codes under .weight, fp16 scales, int8 zero points when asymmetric,
    input_activations {int 8, symmetric, token, dynamic}; compressed-tensors' own compressor decompresses each linear
    to qkit's in-memory weights, and so does qkit's reader."""
    pytest.importorskip("compressed_tensors", minversion="0.18")
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    d, _ = tiny
    ch = Recording(RTN(affine.AffineConfig(bits=bits, group_size=group_size, symmetric=sym, scale_dtype="float16")))
    pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "w", ch, fmt="compressed-tensors", act_bits=8)
    raw = json.loads((tmp_path / "w" / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "int-quantized"
    acts = raw["config_groups"]["group_0"]["input_activations"]
    assert {k: acts[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    scheme = QuantizationConfig.model_validate(raw).config_groups["group_0"]
    assert IntQuantizationCompressor.can_compress(torch.nn.Linear, scheme)
    tensors = {}
    for f in sorted((tmp_path / "w").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    store = loader.resolve(str(tmp_path / "w")).store()
    assert store.activations is not None and store.activations.bits == 8
    for name, res in ch.results.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight")}
        assert sd["weight"].dtype == torch.int8 and ("weight_zero_point" in sd) == (not sym)
        sd["weight_scale"] = sd["weight_scale"].float()  # fp32 arithmetic: qkit's weights exactly
        w = IntQuantizationCompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(w, torch.from_numpy(res.weight)), name
        assert torch.equal(store.get(name + ".weight"), torch.from_numpy(res.weight)), name
        assert store.dtype(name + ".weight") == "F32"


def test_int_quantized_refuses_act_order_and_bad_tensors(tiny, tmp_path):
    d, _ = tiny
    with pytest.raises(UsageError, match="act-order needs --static-groups"):
        pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "a", chooser_for(
            "compressed-tensors", 8, method="gptq", act_order=True), samples=SAMPLES, fmt="compressed-tensors",
            act_bits=8)
    with pytest.raises(UsageError, match="fake-quantized safetensors output has no place for it"):
        pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "b", chooser_for("gptq_v2", 8), act_bits=8)
    ch = chooser_for("compressed-tensors", 8, group_size=None, sym=True)
    pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "w", ch, fmt="compressed-tensors", act_bits=8)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["strategy"] = "tensor"
    (tmp_path / "w" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="input_activations .* is not readable"):
        loader.load_model(loader.resolve(str(tmp_path / "w")))


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_awq_export_carries_the_folded_norms(tiny, tmp_path, fmt):
    """AWQ folds 1/s into the norms: a packed export writes the layer's norms as they now are, so the reloaded
    checkpoint is the in-memory quantized model (logits equal)."""
    from qkit.awq import AWQ, AWQConfig

    d, model = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny matmuls in the search: a second OpenMP thread only waits (test_awq)
    try:
        awq = AWQ(AWQConfig(grid=AffineConfig(bits=4, group_size=32, scale_dtype="float16"), search_samples=2))
        _awq_export_check(d, model, tmp_path, fmt, awq)
    finally:
        torch.set_num_threads(threads)


def _awq_export_check(d, model, tmp_path, fmt, awq):
    ch = Recording(awq)
    ch.prepare, ch.transform_layer = ch.inner.prepare, ch.inner.transform_layer
    pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "q", ch, samples=SAMPLES, fmt=fmt)
    pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "f", ch, samples=SAMPLES)  # fake-quantized float
    q = loader.load_model(loader.resolve(str(tmp_path / "q")))
    f = loader.load_model(loader.resolve(str(tmp_path / "f")))
    n = "model.layers.0.input_layernorm.weight"
    assert torch.equal(q.state_dict()[n], f.state_dict()[n]) and not torch.equal(q.state_dict()[n],
                                                                                  model.state_dict()[n])
    for name, res in ch.results.items():
        assert torch.equal(q.get_submodule(name).weight.data, torch.from_numpy(res.weight)), name
    ids = SAMPLES[:2]
    with torch.no_grad():
        assert torch.equal(q(ids).logits, f(ids).logits)


# ------------------------------------------------------------------ every method x every format, from the CLI
METHOD_ARGS = {
    "rtn": [],
    "gptq": ["--method", "gptq"],  # qkit's defaults: act-order, GPTAQ, true-sequential
    "gptq-plain": ["--method", "gptq", "--no-act-order", "--no-gptaq", "--no-true-sequential"],
    "gptq-ao": ["--method", "gptq", "--act-order"],
    "awq": ["--method", "awq", "--n-grid", "2", "--search-samples", "2"],
    "awq-gptq-ao": ["--method", "awq", "--n-grid", "2", "--search-samples", "2", "--round", "gptq", "--act-order"],
    "smoothquant": ["--method", "smoothquant", "--bits", "8"],
}
# (method, format) -> the start of the one-line refusal; every other pair is written
REFUSED = {
    ("gptq-ao", "awq"): "AWQ GEMM has no g_idx",
    ("awq-gptq-ao", "awq"): "AWQ GEMM has no g_idx",
    ("smoothquant", "safetensors"): "activation quantization (--act-bits, smoothquant) is written as compressed-tensors",
    ("smoothquant", "gptq"): "activation quantization (--act-bits, smoothquant) is written as compressed-tensors",
    ("smoothquant", "gptq_v2"): "activation quantization (--act-bits, smoothquant) is written as compressed-tensors",
    ("smoothquant", "awq"): "activation quantization (--act-bits, smoothquant) is written as compressed-tensors",
}


@pytest.fixture(scope="module")
def tiny_tok(tiny, tmp_path_factory):
    import shutil

    d, _ = tiny
    root = tmp_path_factory.mktemp("matrix")
    shutil.copytree(d, root / "m")
    char_tokenizer(root / "m")
    (root / "calib.txt").write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 40)
    return root / "m", root / "calib.txt"


def _linear_weights(d: Path, names=None) -> dict:
    """The linears' weights as qkit's reader decodes them (a packed linear's under its .weight name)."""
    store = loader.resolve(str(d)).store()
    names = names or [n for n in store.keys() if n.endswith("proj.weight")]
    return {n: store.get(n) for n in names}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_every_method_into_every_format_is_written_or_refused_up_front(tiny_tok, tmp_path, capsys, monkeypatch,
                                                                       method):
    """`qkit quantize` for each method x format: either a checkpoint that records how it was made (desc_act over
    a permuted g_idx, damp_percent whenever GPTQ rounded, AWQ + GPTQ included) and decodes to the very weights
    of the fake-quantized output, or one line refusing it before calibration starts."""
    m, calib = tiny_tok
    calibrated = []
    real = pipeline.capture_layer_inputs
    monkeypatch.setattr(pipeline, "capture_layer_inputs", lambda *a, **k: calibrated.append(1) or real(*a, **k))
    common = ["quantize", str(m), "--group-size", "32", "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    common = common if method != "rtn" else common[:4]
    fake = None
    for fmt in ("safetensors", "gptq", "gptq_v2", "awq", "compressed-tensors"):
        calibrated.clear()
        out = tmp_path / fmt
        r = run_cli(capsys, *common, *METHOD_ARGS[method], "--format", fmt, "-o", str(out))
        want = REFUSED.get((method, fmt))
        if want:
            assert r.returncode == 2, (fmt, r.stdout)
            err = r.stderr.strip().splitlines()
            assert len(err) == 1 and want in err[0], (fmt, err)
            assert not calibrated and not out.exists(), fmt
            continue
        assert r.returncode == 0, (fmt, r.stderr)
        # act-order from the defaults (not asked for) into a format without g_idx: static groups, said once
        switched = "stores no g_idx: act-order runs with static groups" in r.stderr
        assert switched is (method == "gptq" and fmt == "awq"), (fmt, r.stderr)
        if fmt == "safetensors":
            fake = _linear_weights(out)
            assert len(fake) == 14
        elif fmt != "gptq" and fake is not None and not switched:  # gptq (v1) keeps every zero >= 1, a grid of its own
            w = _linear_weights(out, list(fake))
            assert all(torch.equal(w[n], fake[n]) for n in fake), fmt
        if fmt in ("gptq", "gptq_v2"):
            q = json.loads((out / "config.json").read_text())["quantization_config"]
            assert q["desc_act"] is (method.endswith("-ao") or method == "gptq"), fmt
            assert ("damp_percent" in q) == ("gptq" in method), fmt
            assert q["true_sequential"] is (method in ("gptq", "gptq-ao")), fmt
            assert q["meta"]["qkit_method"] == method.split("-")[0]
