"""GGUF out: llama.cpp's mix rules, write/read round trip, and (opt-in) whole files equal to llama.cpp's."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from llm_models import make_model  # noqa: E402
from test_gguf_load import TEXT, train_tokenizer, write_tiny_gguf  # noqa: E402

from qkit.errors import UsageError  # noqa: E402
from qkit.ggml import mixes  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.gguf.write import write_gguf  # noqa: E402


def llama_tensors(n_layer, hidden=576, ff=1536, vocab=49152, kv=192, tied=True):
    t = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    if not tied:
        t["output.weight"] = (hidden, vocab)
    for i in range(n_layer):
        t.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                  f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (hidden, kv),
                  f"blk.{i}.attn_v.weight": (hidden, kv), f"blk.{i}.attn_output.weight": (hidden, hidden),
                  f"blk.{i}.ffn_gate.weight": (hidden, ff), f"blk.{i}.ffn_up.weight": (hidden, ff),
                  f"blk.{i}.ffn_down.weight": (ff, hidden)})
    return t


def test_q4_k_m_rules_on_rows_of_256():
    n = 32
    types = mixes.choose_types(llama_tensors(n, hidden=4096, ff=11008, kv=1024), "Q4_K_M", mixes.ModelShape(n, 32, 8))
    more = [i for i in range(n) if mixes.use_more_bits(i, n)]
    assert more[:6] == [0, 1, 2, 3, 6, 9] and more[-4:] == [28, 29, 30, 31]  # i < n/8, i >= 7n/8, (i - n/8) % 3 == 2
    for i in range(n):
        assert types[f"blk.{i}.attn_v.weight"] == ("q6_K" if i in more else "q4_K")
        assert types[f"blk.{i}.attn_q.weight"] == "q4_K"
    assert {types[f"blk.{i}.ffn_down.weight"] for i in more} == {"q6_K"}  # rows of 11008 = 43 x 256
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(n) if i not in more} == {"q4_K"}
    assert types["token_embd.weight"] == "q6_K"  # tied embeddings take the output rule
    assert types["output_norm.weight"] == "f32" and types["blk.3.attn_norm.weight"] == "f32"


def test_fallbacks_for_rows_of_576_and_visit_order():
    t = mixes.choose_types(llama_tensors(30), "Q2_K", mixes.ModelShape(30, 9, 3))
    assert t["blk.0.attn_q.weight"] == "q4_0" and t["token_embd.weight"] == "q8_0"
    assert t["blk.0.ffn_down.weight"] == "q3_K"  # rows of 1536 = 6 x 256: no fallback
    t = mixes.choose_types(llama_tensors(30), "Q3_K_M", mixes.ModelShape(30, 9, 3))
    # attn_v counted in layer order (blk.2 before blk.10): only layers 0 and 1 get q5_K, which falls back to q5_1
    assert [t[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2, 10)] == ["q5_1", "q5_1", "q5_0", "q5_0"]
    assert mixes.visit_order(["blk.10.a", "blk.2.a", "token_embd.weight", "blk.2.b"]) == \
        ["token_embd.weight", "blk.2.a", "blk.2.b", "blk.10.a"]
    with pytest.raises(UsageError, match="unknown GGML mix 'Q7'"):
        mixes.choose_types({}, "Q7", mixes.ModelShape(1, 1, 1))


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """A random Llama whose rows are multiples of 256 (every K type applies), written as an F32 GGUF."""
    root = tmp_path_factory.mktemp("wide")
    model = make_model("llama", root / "hf", vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    tk = train_tokenizer(512)
    path = root / "wide-f32.gguf"
    write_tiny_gguf(path, model, tk, q8_tensor=None)
    return path, model


def test_write_read_round_trip(wide_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, model = wide_gguf
    out = tmp_path / "q8.gguf"
    s = write_gguf(loader.resolve(str(path)), out, "Q8_0")
    assert s.types["q8_0"] == 8 * 7 + 1 and 8.5 < s.bits_per_weight < 9.5
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == 7
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"  # tokenizer carried over unchanged
    back = loader.load_model(loader.resolve(str(out)))
    from qkit import ggml

    # every linear read back is exactly q8_0(original): names, Q/K permutation and bytes all line up
    for name, p in back.named_parameters():
        orig = dict(model.named_parameters())[name].detach().numpy()
        if p.dim() == 2:
            want = ggml.dequantize(ggml.quantize(orig, "q8_0"), "q8_0")
            assert np.array_equal(p.detach().numpy(), want), name
        else:
            assert np.array_equal(p.detach().numpy(), orig), name


def test_gguf_from_hf_dir_needs_a_tokenizer(tmp_path):
    make_model("llama", tmp_path / "hf")   # the HF route (tests/test_gguf_hf_route.py) reads tokenizer.json
    with pytest.raises(UsageError, match="needs tokenizer.json"):
        write_gguf(loader.resolve(str(tmp_path / "hf")), tmp_path / "x.gguf", "Q4_K_M")


ALL_MIXES = list(mixes.FTYPES)


@pytest.mark.parametrize("mix", ALL_MIXES)
def test_whole_file_equals_llama_cpp(wide_gguf, tmp_path, monkeypatch, mix):
    """Opt-in: the same F32 GGUF through llama_model_quantize and through qkit: same types, same bytes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")
    import ctypes

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, _ = wide_gguf
    ref = tmp_path / "ref.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = mixes.FTYPES[mix][0]
    p.nthread = 1
    assert llama_cpp.llama_model_quantize(str(path).encode(), str(ref).encode(), ctypes.byref(p)) == 0
    ours = tmp_path / "ours.gguf"
    write_gguf(loader.resolve(str(path)), ours, mix)
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    assert set(a) == set(b)
    for n in a:
        assert a[n].tensor_type == b[n].tensor_type, (n, a[n].tensor_type.name, b[n].tensor_type.name)
        assert np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)), n


def test_imatrix_is_the_mean_squared_activation(wide_gguf, tmp_path, monkeypatch):
    """collect() streamed layer by layer equals forward hooks on the whole float model."""
    from qkit.imatrix import collect, read_imatrix, write_imatrix

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, model = wide_gguf
    ref = loader.resolve(str(path))
    samples = torch.randint(0, 512, (5, 24))
    stats = collect(ref, samples)
    m = loader.load_model(ref)
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod_, inp, out, n=n: seen.setdefault(n, []).append(inp[0].detach()))
             for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers.")]
    with torch.no_grad():
        m(samples)
    for h in hooks:
        h.remove()
    x = torch.cat(seen["model.layers.3.mlp.down_proj"]).reshape(-1, 512).double()
    s, c = stats["blk.3.ffn_down.weight"]
    assert c == 5 * 24 and np.allclose(s, (x * x).sum(0).numpy(), rtol=1e-5)
    assert len(stats) == 8 * 7
    write_imatrix(tmp_path / "im.gguf", stats, ["test"], 24)
    back = read_imatrix(tmp_path / "im.gguf")
    assert np.allclose(back["blk.3.ffn_down.weight"], (x * x).mean(0).numpy(), rtol=1e-5)


def test_imatrix_process_output_is_the_final_norms_output(tmp_path, monkeypatch, capsys):
    """--process-output: output.weight's importance is the mean x^2 of the head's input, which HF's model returns
    as the last hidden state (after the final norm); a tied head is refused in one line."""
    from transformers import PreTrainedTokenizerFast

    from qkit.cli.main import main
    from qkit.imatrix import collect, read_imatrix

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    model = make_model("llama", tmp_path / "untied", tie_word_embeddings=False)
    ref = loader.resolve(str(tmp_path / "untied"))
    samples = torch.randint(0, model.config.vocab_size, (3, 16))
    stats = collect(ref, samples, process_output=True)
    with torch.no_grad():
        h = model.model(samples).last_hidden_state.reshape(-1, model.config.hidden_size).double()
    s, c = stats["output.weight"]
    assert c == 3 * 16 and np.allclose(s, (h * h).sum(0).numpy(), rtol=1e-5)
    assert "output.weight" not in collect(ref, samples)  # off by default, as in llama-imatrix
    make_model("llama", tmp_path / "tied")
    with pytest.raises(UsageError, match="ties its head"):
        collect(loader.resolve(str(tmp_path / "tied")), samples, process_output=True)
    PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(300), eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path / "untied"))
    calib = tmp_path / "c.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "im.gguf"
    rc = main(["imatrix", str(tmp_path / "untied"), "--calib", str(calib), "--nsamples", "2", "--seqlen", "16",
               "--process-output", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    back = read_imatrix(out)
    assert "output.weight" in back and back["output.weight"].shape == (model.config.hidden_size,)


def test_read_imatrix_rejects_other_files(wide_gguf, tmp_path):
    from qkit.errors import FormatError
    from qkit.imatrix import read_imatrix

    with pytest.raises(FormatError, match="not an imatrix file"):
        read_imatrix(wide_gguf[0])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(FormatError):
        read_imatrix(bad)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M", "Q4_0"])
def test_imatrix_quantization_equals_llama_cpp(wide_gguf, tmp_path, monkeypatch, mix):
    """Opt-in: qkit's imatrix given to llama_model_quantize and to qkit: the same types and bytes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")
    import ctypes

    from qkit.imatrix import collect

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, _ = wide_gguf
    ref_model = loader.resolve(str(path))
    stats = collect(ref_model, torch.randint(0, 512, (4, 32)))
    im = {k: (s / c).astype(np.float32) for k, (s, c) in stats.items()}

    ptr_type = dict(llama_cpp.llama_model_quantize_params._fields_)["imatrix"]
    Entry = ptr_type._type_  # llama_model_imatrix_data {const char *name; const float *data; size_t size;}
    keep = list(im.items())
    arr = (Entry * (len(keep) + 1))()
    for i, (k, v) in enumerate(keep):
        arr[i] = Entry(k.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size)
    arr[len(keep)] = Entry(None, None, 0)  # the list ends at a NULL name
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = mixes.FTYPES[mix][0]
    p.nthread = 1
    p.imatrix = ctypes.cast(arr, ptr_type)
    ref = tmp_path / "ref.gguf"
    assert llama_cpp.llama_model_quantize(str(path).encode(), str(ref).encode(), ctypes.byref(p)) == 0
    ours = tmp_path / "ours.gguf"
    write_gguf(ref_model, ours, mix, imatrix=im)
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    for n in b:
        assert a[n].tensor_type == b[n].tensor_type, n
        assert np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)), n


def test_outputs_never_replace_inputs(wide_gguf, tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model.gguf"
    shutil.copyfile(wide_gguf[0], src)
    before = src.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite the input file"):
        write_gguf(loader.resolve(str(src)), src, "Q8_0")
    assert src.read_bytes() == before

    def cli(*a):
        return subprocess.run([sys.executable, "-P", "-m", "qkit.cli.main", *a], capture_output=True, text=True,
                              env={**__import__("os").environ, "QKIT_CACHE": str(tmp_path / "cache")})

    r = cli("quantize", str(src), "--type", "q8_0", "-o", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = cli("quantize", str(src), "--type", "q4_k_m", "--bits", "3", "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "--bits do not apply to --type" in r.stderr
    r = cli("imatrix", str(src), "-o", str(src), "--nsamples", "2", "--seqlen", "16", "--calib", str(src))
    assert r.returncode != 0 and src.read_bytes() == before
