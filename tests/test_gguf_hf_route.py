"""GGUF from an HF directory (config.json, safetensors, tokenizer.json): the metadata llama.cpp's converter writes.

Oracles: the default model's own GGUF (written by llama.cpp's converter from the
published SmolLM2 checkpoint), and llama.cpp itself through llama-cpp-python (opt-in:
skipped when it is not installed): its tokenizer on our GGUF against HF's on the
source directory, its llama_model_quantize on the same weights.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from llm_models import make_model  # noqa: E402
from test_gguf_load import TEXT, train_tokenizer, write_tiny_gguf  # noqa: E402

from qkit.errors import UsageError  # noqa: E402
from qkit.ggml import mixes  # noqa: E402
from qkit.gguf import hf_meta as gguf_hf_meta  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.gguf.write import write_gguf  # noqa: E402

TEXTS = ["Hello world", "  two  spaces\t\ttabs\n\n\nlines  ", "1911: 22,000 émigrés — ünïcode ☃ 我想在apple工作 🦙",
         "def f(x):\n    return x**2 + 3.14159  # comment\n", "12345678901234567890 3..3 0.5e-7", " " * 7 + "x",
         "x" + " " * 7, "'s 've 're 'll don't I'M We'Ve", TEXT[:300]]
DESCRIPTIVE = ("general.name", "general.organization", "general.finetune", "general.basename", "general.size_label",
               "general.license", "general.languages", "general.file_type", "GGUF.kv_count")


def fields(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: (f.contents(), [int(t) for t in f.types]) for k, f in r.fields.items()}


@pytest.fixture(scope="module")
def default_as_hf(tmp_path_factory):
    """The default model as an HF directory: its tokenizer save_pretrained'd, its fp32 safetensors, config.json."""
    ref = loader.resolve(None)
    root = tmp_path_factory.mktemp("hfroute")
    d = root / "smollm2-hf"
    d.mkdir()
    for p in ref.dir.iterdir():   # the weights and config only: no source.gguf, so the HF route is taken
        if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json"):
            os.symlink(p, d / p.name)
    loader.load_tokenizer(ref).save_pretrained(str(d))
    out = root / "q8.gguf"
    write_gguf(loader.resolve(str(d)), out, "Q8_0")
    return ref, d, out


@pytest.mark.data
def test_default_model_from_hf_dir_has_the_source_metadata(default_as_hf):
    """Every llama.* and tokenizer.* key (tokens, types, merges, ids, flags, chat template) equals the source's."""
    ref, _, out = default_as_hf
    ours, src = fields(out), fields(ref.dir / "source.gguf")
    assert src["tokenizer.ggml.pre"][0] == "smollm" and ours["tokenizer.ggml.model"][0] == "gpt2"
    keep = [k for k in src if not k.startswith(DESCRIPTIVE)]
    assert sorted(k for k in ours if not k.startswith(DESCRIPTIVE)) == sorted(keep)
    for k in keep:
        assert ours[k] == src[k], k   # value and GGUF value type


@pytest.mark.data
def test_llama_cpp_tokenizes_our_gguf_like_hf(default_as_hf):
    """Opt-in: llama.cpp on our GGUF gives HF's token ids on the HF directory (special tokens included)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")
    _, d, out = default_as_hf
    tok = loader.load_tokenizer(loader.resolve(str(d)))
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for t in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        # add_bos=True asks llama.cpp to add what the vocabulary says (add_bos_token false here), as HF does
        assert llm.tokenize(t.encode(), add_bos=True, special=True) == tok(t).input_ids, t[:40]


def hf_dir_with_trained_tokenizer(root, pre="smollm", **model_kw):
    """A random Llama saved by transformers, plus a byte-level BPE trained here, saved by save_pretrained."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_model("llama", root, **model_kw)
    tk = train_tokenizer(model.config.vocab_size)
    if pre == "gpt-2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "unknown":   # digits in runs of any length, then GPT-2: no llama.cpp splitter is that
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(str(root))
    return model, tk


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_trained_tokenizer_metadata(tmp_path, pre, monkeypatch):
    """A tokenizer with no published hash: recognized from tokenizer.json; tokens, merges, types from it."""
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    model, tk = hf_dir_with_trained_tokenizer(tmp_path / "hf", pre)
    out = tmp_path / "q8.gguf"
    write_gguf(loader.resolve(str(tmp_path / "hf")), out, "Q8_0")
    f = fields(out)
    vocab = tk.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), model.config.vocab_size)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tk.to_str())["model"]["merges"]]
    assert f["tokenizer.ggml.pre"][0] == pre and f["tokenizer.ggml.tokens"][0] == tokens
    assert f["tokenizer.ggml.merges"][0] == merges
    types = f["tokenizer.ggml.token_type"][0]
    assert [i for i, t in enumerate(types) if t == 3] == [vocab["<|endoftext|>"], vocab["<|im_start|>"]]
    assert set(types[len(vocab):]) <= {5} and set(types[:len(vocab)]) <= {1, 3}   # padding ids are UNUSED
    assert f["tokenizer.ggml.bos_token_id"][0] == vocab["<|im_start|>"]
    assert f["tokenizer.ggml.eos_token_id"][0] == vocab["<|endoftext|>"]
    assert f["tokenizer.ggml.add_bos_token"][0] is False and "tokenizer.ggml.add_eos_token" not in f
    assert f["tokenizer.chat_template"][0].startswith("{% for m in messages %}")
    cfg = model.config
    assert f["llama.rope.freq_base"][0] == np.float32(cfg.rope_parameters["rope_theta"])
    assert (f["llama.block_count"][0], f["llama.attention.head_count_kv"][0]) == (2, cfg.num_key_value_heads)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    back = loader.load_tokenizer(loader.resolve(str(out)))   # qkit reads its own GGUF back (gguf_tokenizer)
    for t in TEXTS:
        assert back(t).input_ids == hf(t).input_ids, t[:40]
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for t in TEXTS:
        assert llm.tokenize(t.encode(), add_bos=True, special=True) == hf(t).input_ids, t[:40]


def test_refusals_are_one_line_usage_errors(tmp_path):
    make_model("llama", tmp_path / "bare")
    with pytest.raises(UsageError, match="needs tokenizer.json"):
        write_gguf(loader.resolve(str(tmp_path / "bare")), tmp_path / "x.gguf", "Q8_0")
    hf_dir_with_trained_tokenizer(tmp_path / "odd", "unknown")
    with pytest.raises(UsageError, match="pre-tokenizer is not one qkit knows"):
        write_gguf(loader.resolve(str(tmp_path / "odd")), tmp_path / "x.gguf", "Q8_0")
    hf_dir_with_trained_tokenizer(tmp_path / "rope", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 10000.0})
    with pytest.raises(UsageError, match="RoPE scaling"):
        write_gguf(loader.resolve(str(tmp_path / "rope")), tmp_path / "x.gguf", "Q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_quantize_hf_dir(tmp_path, monkeypatch, capsys):
    """qkit quantize HF_DIR --type MIX -o out.gguf (the CLI's main, in this process)."""
    from qkit.cli.main import main

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    hf_dir_with_trained_tokenizer(tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), "--type", "q4_k_m", "-o", str(tmp_path / "out.gguf")]) == 0
    f = fields(tmp_path / "out.gguf")
    assert f["tokenizer.ggml.pre"][0] == "smollm" and f["general.file_type"][0] == mixes.FTYPES["Q4_K_M"][0]
    make_model("llama", tmp_path / "bare")   # no tokenizer: refused in one line before anything is written
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "bare"), "--type", "q8_0", "-o", str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tokenizer.json" in err and "Traceback" not in err
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_S", "Q8_0"])
def test_hf_route_bytes_equal_llama_cpp(tmp_path, monkeypatch, mix):
    """Opt-in: the HF directory through qkit and its F32 GGUF through llama_model_quantize: same types, bytes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")
    import ctypes

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    model, tk = hf_dir_with_trained_tokenizer(tmp_path / "hf", vocab_size=512, hidden_size=256,
                                              intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=64)
    f32 = tmp_path / "f32.gguf"
    write_tiny_gguf(f32, model, tk, q8_tensor=None)
    ref = tmp_path / "ref.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = mixes.FTYPES[mix][0]
    p.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref).encode(), ctypes.byref(p)) == 0
    ours = tmp_path / "ours.gguf"
    write_gguf(loader.resolve(str(tmp_path / "hf")), ours, mix)
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    assert set(a) == set(b)
    for n in a:
        assert a[n].tensor_type == b[n].tensor_type, n
        assert np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)), n
    if mix != "Q8_0":
        return
    # llama.cpp runs it: logits close to transformers' on the same (Q8_0-dequantized) weights; llama.cpp's
    # on-the-fly activation quantization is the one difference. A wrong hyperparameter key (rope.freq_base
    # 1e6, tried) gives a correlation near 0.5 and a max error above 100%.
    ids = tk.encode(TEXT[:200]).ids[:32]
    deq = loader.load_model(loader.resolve(str(ours)))
    with torch.no_grad():
        want = deq(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < 0.06
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
