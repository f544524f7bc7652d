"""GGUF in: a tiny Llama written as llama.cpp would (permuted Q/K, GGUF names, BPE tokenizer metadata) loads back exactly."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from llm_models import make_model  # noqa: E402

from qkit.errors import FormatError, UsageError  # noqa: E402
from qkit.gguf import read as gguf_convert  # noqa: E402
from qkit.model import loader  # noqa: E402

TEXT = ("It was the best of times, it was the worst of times, in the year 1775; "
        "tabs\tand  double  spaces,\n\nnewlines and numbers 12345 678 9.") * 20


def train_tokenizer(vocab_size=300):
    """A byte-level BPE with SmolLM2's pre-tokenizer (digits split, then GPT-2's regex), trained offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT], trainer)
    return tk


def write_tiny_gguf(path, model, tk, q8_tensor="blk.1.ffn_up.weight"):
    import json

    cfg = model.config
    vocab = tk.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tk.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    sd = model.state_dict()
    inv = {}
    for g in ["token_embd", "output_norm"]:
        inv[gguf_convert.GLOBAL_NAMES[g] + ".weight"] = g + ".weight"
    for i in range(cfg.num_hidden_layers):
        for g, h in gguf_convert.BLOCK_NAMES.items():
            inv[f"model.layers.{i}.{h}.weight"] = f"blk.{i}.{g}.weight"
    for hf, name in inv.items():
        t = sd[hf].numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            t = gguf_convert.permute_qk(t, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = gguf_convert.permute_qk(t, cfg.num_key_value_heads)
        if q8_tensor is not None and name == q8_tensor:
            data = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = make_model("llama", root / "hf")
    tk = train_tokenizer(model.config.vocab_size)
    path = root / "tiny.gguf"
    write_tiny_gguf(path, model, tk)
    return path, model, tk


def test_gguf_loads_to_the_same_model(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, model, tk = tiny_gguf
    ref = loader.resolve(str(path))
    m = loader.load_model(ref)
    ids = torch.tensor([tk.encode(TEXT[:200]).ids])
    with torch.no_grad():
        a, b = m(ids).logits, model(ids).logits
    # exact except through the one Q8_0 tensor (blk.1.ffn_up): Q/K un-permuted, names mapped, tied head
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (ref.dir / gguf_convert.SOURCE_GGUF).is_file()  # source kept for a later GGUF writer
    cfg = loader.load_config(ref)
    assert cfg.tie_word_embeddings and cfg.num_key_value_heads == 2


def test_gguf_qk_unpermute_is_exact(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, model, _ = tiny_gguf
    m = loader.load_model(loader.resolve(str(path)))
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a = getattr(m.model.layers[i].self_attn, p).weight
            assert torch.equal(a, getattr(model.model.layers[i].self_attn, p).weight), (i, p)


def test_permute_round_trip():
    w = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    for heads in (1, 2, 6):
        assert np.array_equal(gguf_convert.unpermute_qk(gguf_convert.permute_qk(w, heads), heads), w)


def test_gguf_tokenizer_matches_the_source_tokenizer(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, _, tk = tiny_gguf
    tok = loader.load_tokenizer(loader.resolve(str(path)))
    for text in [TEXT, "  leading spaces", "trailing   ", "1911 and 22,000\n\n\n  x", "<|im_start|>hi", "émigré ünïcode"]:
        assert tok(text).input_ids == tk.encode(text).ids, text
        assert tok.decode(tok(text).input_ids) == text


def test_second_resolve_reuses_the_conversion(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    path, _, _ = tiny_gguf
    d1 = loader.resolve(str(path)).dir
    stamp = (d1 / "config.json").stat().st_mtime_ns
    assert loader.resolve(str(path)).dir == d1 and (d1 / "config.json").stat().st_mtime_ns == stamp


class TestBadGGUF:
    def test_not_gguf(self, tmp_path):
        p = tmp_path / "x.gguf"
        p.write_bytes(b"NOPE" + b"\0" * 100)
        with pytest.raises(FormatError, match="bad magic"):
            loader.resolve(str(p))

    def test_truncated(self, tiny_gguf, tmp_path, monkeypatch):
        monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
        path, _, _ = tiny_gguf
        p = tmp_path / "cut.gguf"
        p.write_bytes(path.read_bytes()[:5000])
        with pytest.raises(FormatError):
            loader.resolve(str(p))

    def test_unknown_architecture(self, tmp_path, monkeypatch):
        monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
        p = tmp_path / "falcon.gguf"
        w = gguf.GGUFWriter(str(p), "falcon")
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(UsageError, match="architecture 'falcon' has no tensor mapping"):
            loader.resolve(str(p))
