"""qkit.runtime: packed checkpoints run on the A8 kernels, against the dequantized float model of the same file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from llm_models import make_model  # noqa: E402
from test_export import chooser_for, export, run_cli, char_tokenizer  # noqa: E402

from qkit import pipeline, runtime
from qkit.errors import FormatError, UsageError
from qkit.eval.perplexity import perplexity
from qkit.model import loader
from qkit.runtime.generate import generate
from qkit.runtime.head import Int8Embedding
from qkit.runtime.linear import DequantLinear, QuantLinear


@pytest.fixture(autouse=True)
def _no_heap_trim(monkeypatch):
    monkeypatch.setattr(pipeline, "trim_heap", lambda: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    model = make_model("llama", root / "llama")
    return root / "llama", model


IDS = torch.randint(0, 300, (4 * 64,), generator=torch.Generator().manual_seed(3))

# (format, bits, method, act_order, kernel the linears get)
CASES = [("gptq", 4, "rtn", False, QuantLinear), ("gptq_v2", 8, "rtn", False, QuantLinear),
         ("gptq", 4, "gptq", True, QuantLinear), ("awq", 4, "rtn", False, QuantLinear),
         ("compressed-tensors", 4, "rtn", False, QuantLinear), ("compressed-tensors", 8, "rtn", False, QuantLinear),
         ("gptq_v2", 3, "rtn", False, DequantLinear), ("gptq", 2, "rtn", False, DequantLinear)]


@pytest.mark.parametrize("fmt,bits,method,act_order,kind", CASES)
def test_runtime_perplexity_is_the_dequantized_one(tiny, tmp_path, fmt, bits, method, act_order, kind):
    """Every packed format: the runtime builds its linears from the packed bytes (no float weight anywhere), and
    its perplexity is within 0.5% of the dequantized float model of the same file (the A8 kernels quantize each
    linear's input per block of 32; the fallback is float and matches to 1e-5)."""
    d, _ = tiny
    ch = chooser_for(fmt, bits, method=method, act_order=act_order)
    export(d, tmp_path / "q", fmt, ch)
    ref = loader.resolve(str(tmp_path / "q"))
    dense = loader.load_model(ref)
    model, info = runtime.load(ref, head="float")
    lins = [m for m in model.modules() if isinstance(m, (QuantLinear, DequantLinear))]
    assert len(lins) == 14 and all(isinstance(m, kind) for m in lins)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n)
    if act_order:
        assert all(m.perm is not None for m in lins) and info.repacked == 14
    if fmt == "gptq" and not act_order and kind is QuantLinear:
        assert info.repacked == 0  # the file's qweight words, as they are
    r, want = perplexity(model, IDS, 64), perplexity(dense, IDS, 64)
    tol = 5e-3 if kind is QuantLinear else 1e-5
    assert abs(r.ppl / want.ppl - 1) < tol, (r.ppl, want.ppl)
    with torch.inference_mode():  # and each linear against the float one on the same input
        x = torch.randn(3, lins[0].in_features, generator=torch.Generator().manual_seed(0))
        name = next(n for n, m in model.named_modules() if m is lins[0])
        y, y_ref = lins[0](x), dense.get_submodule(name)(x)
        rel = float((y - y_ref).norm() / y_ref.norm())
        assert rel < (2e-2 if kind is QuantLinear else 1e-5), rel


def test_quant_linear_is_the_a8_formula(tiny, tmp_path):
    """One QuantLinear output against plain numpy: W from the reader's grid, x through q8_0's blocks, float64."""
    from qkit import ext
    from qkit.export.registry import reader_for

    d, _ = tiny
    export(d, tmp_path / "q", "gptq", chooser_for("gptq", 4, method="gptq", act_order=True))
    ref = loader.resolve(str(tmp_path / "q"))
    model, _ = runtime.load(ref, head="float")
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    store = ref.store()
    aff = reader_for(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]).affine(
        name, store.store)
    W = aff.scale[:, aff.g_idx].astype(np.float64) * (aff.codes - aff.zero[:, aff.g_idx].astype(np.float64))
    x = np.random.default_rng(0).standard_normal(lin.in_features).astype(np.float32)
    xp = x[lin.perm.numpy()]  # the kernel's order: groups contiguous
    xq, xs = ext.quantize_q8(xp, backend="numpy")
    xd = np.empty(lin.in_features)
    xd[lin.perm.numpy()] = xq * np.repeat(xs, 32)[: lin.in_features]
    with torch.inference_mode():
        y = lin(torch.from_numpy(x)).numpy()
    assert np.allclose(y, W @ xd, rtol=1e-4, atol=1e-5 * np.abs(W).sum(1).max())


def test_int8_head_and_embedding_share_one_matrix(tiny, tmp_path):
    d, _ = tiny
    export(d, tmp_path / "q", "gptq", chooser_for("gptq", 4))
    ref = loader.resolve(str(tmp_path / "q"))
    model, info = runtime.load(ref)  # head="int8" is the default
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, QuantLinear) and head.bits == 8 and isinstance(emb, Int8Embedding)
    assert emb.head[0] is head and "embedding" in info.head
    dense = loader.load_model(ref)
    w = dense.get_input_embeddings().weight
    ids = torch.tensor([[0, 5, 299, 5]])
    with torch.inference_mode():
        rows = emb(ids)[0]
    # 8-bit asymmetric per row: every entry within half a step of the float row
    step = (w.max(1).values.clamp(min=0) - w.min(1).values.clamp(max=0)) / 255
    assert ((rows - w[ids[0]]).abs() <= step[ids[0], None] * 0.5 + 1e-6).all()
    r, want = perplexity(model, IDS, 64), perplexity(dense, IDS, 64)
    assert abs(r.ppl / want.ppl - 1) < 1e-2, (r.ppl, want.ppl)


def test_untied_head_gets_its_own_embedding(tmp_path):
    make_model("qwen2", tmp_path / "m")
    export(tmp_path / "m", tmp_path / "q", "gptq_v2", chooser_for("gptq_v2", 4))
    model, info = runtime.load(loader.resolve(str(tmp_path / "q")))
    assert info.head == {"head": "int8 per row", "embedding": "int8 per row"}
    assert model.get_input_embeddings().head[0] is not model.get_output_embeddings()
    assert np.isfinite(perplexity(model, IDS, 64).ppl)


def test_generate_with_the_cache_is_the_full_recomputation(tiny, tmp_path):
    """Greedy decoding through the KV cache picks, at every step, the argmax of a fresh forward over the whole
    sequence; sampling is reproducible by seed; a prompt past the context is refused."""
    d, _ = tiny
    export(d, tmp_path / "q", "gptq", chooser_for("gptq", 4))
    model, _ = runtime.load(loader.resolve(str(tmp_path / "q")), threads=2)
    prompt = [1, 17, 42, 99, 7]
    r = generate(model, None, prompt_ids=prompt, n=12, stop_at_eos=False, split=True)
    assert r.new_tokens == 12 and r.prompt_tokens == 5 and set(r.split_ms) == {"linears", "attention", "head", "other"}
    seq = list(prompt)
    with torch.inference_mode():
        for t in r.token_ids:
            assert int(model(torch.tensor([seq])).logits[0, -1].argmax()) == t
            seq.append(t)
    a = generate(model, None, prompt_ids=prompt, n=8, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                 stop_at_eos=False)
    b = generate(model, None, prompt_ids=prompt, n=8, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                 stop_at_eos=False)
    assert a.token_ids == b.token_ids
    with pytest.raises(UsageError, match="exceed the model's context of 256"):
        generate(model, None, prompt_ids=list(range(250)), n=10)
    runtime.set_threads(model, 1)
    assert generate(model, None, prompt_ids=prompt, n=12, stop_at_eos=False).token_ids == r.token_ids


def _logits_through(model, cache, chunks):
    from qkit.runtime.generate import cache_kwarg

    out, pos, kw = [], 0, cache_kwarg(model)
    with torch.inference_mode():
        for c in chunks:
            ids = torch.tensor([c])
            out.append(model(input_ids=ids, **{kw: cache}, use_cache=True,
                             cache_position=torch.arange(pos, pos + len(c))).logits)
            pos += len(c)
    return torch.cat(out, 1)


@pytest.mark.parametrize("capacity", [0, 3, 64])
def test_in_place_cache_is_dynamic_cache_bit_for_bit(tiny, capacity):
    """InPlaceCache writes each step into a reserved buffer (growing by doubling past `capacity`): the logits
    of a prefill and then single steps are DynamicCache's exactly, and crop rewinds it like DynamicCache."""
    from transformers import DynamicCache

    from qkit.runtime.cache import InPlaceCache

    d, _ = tiny
    model = loader.load_model(loader.resolve(str(d)))
    chunks = [[5, 9, 200, 3], [17], [42], [8, 8], [1]]
    ref_cache, cache = DynamicCache(), InPlaceCache(capacity)
    want = _logits_through(model, ref_cache, chunks)
    got = _logits_through(model, cache, chunks)
    assert torch.equal(want, got)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 9
    for a, b in zip(ref_cache.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    ref_cache.crop(-3)
    cache.crop(-3)
    assert cache.get_seq_length() == 6
    assert torch.equal(_logits_through(model, ref_cache, [[77], [78]]), _logits_through(model, cache, [[77], [78]]))


def test_pool_spin_setting():
    from qkit.ext import _kernels as native

    was = native.pool_spin_us()
    try:
        assert native.pool_spin_us(0) == 0 and native.pool_spin_us(1500) == 1500
        with pytest.raises(ValueError, match="spin must lie in"):
            native.pool_spin_us(-1)
    finally:
        native.pool_spin_us(was)


def test_inconsistent_layout_is_one_clear_error(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = tiny
    export(d, tmp_path / "q", "gptq", chooser_for("gptq", 4))
    key = "model.layers.0.mlp.up_proj.g_idx"
    f = next(p for p in (tmp_path / "q").glob("*.safetensors") if key in load_file(str(p)))
    t = load_file(str(f))
    t[key] = t[key] + 50
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"up_proj: inconsistent packed tensors \(g_idx values outside"):
        runtime.load(loader.resolve(str(tmp_path / "q")))


def test_float_model_runs_on_torch(tiny):
    d, _ = tiny
    model, info = runtime.load(loader.resolve(str(d)))
    assert info.runtime == "torch" and info.describe() == "torch float32 (dense)"


def test_cli_generate_and_eval_ppl_runtimes(tiny, tmp_path, capsys):
    d, _ = tiny
    m = tmp_path / "m"
    shutil.copytree(d, m)
    char_tokenizer(m)
    r = run_cli(capsys, "quantize", str(m), "-o", str(tmp_path / "q"), "--group-size", "32", "--format", "gptq")
    assert r.returncode == 0, r.stderr
    r = run_cli(capsys, "generate", str(tmp_path / "q"), "--prompt", "To be", "-n", "6", "--ignore-eos",
                "--json", str(tmp_path / "g.json"))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("To be") and any(ln.startswith("ran on: qkit runtime on gptq: 14 W4A8") for ln in out)
    assert any(ln.startswith("per decode token: linears") for ln in out)
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["new_tokens"] == 6 and g["prefill_tps"] > 0
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8)
    ppl = {}
    for rt in ("qkit", "torch"):
        r = run_cli(capsys, "eval", "ppl", str(tmp_path / "q"), "--text", str(text), "--ctx", "64", "--runtime", rt,
                    "--head", "float", "--json", str(tmp_path / f"{rt}.json"))
        assert r.returncode == 0, r.stderr
        ppl[rt] = json.loads((tmp_path / f"{rt}.json").read_text())
    assert ppl["qkit"]["runtime"].startswith("qkit runtime") and ppl["torch"]["runtime"].startswith("torch")
    assert abs(ppl["qkit"]["ppl"] / ppl["torch"]["ppl"] - 1) < 5e-3
    r = run_cli(capsys, "generate", str(tmp_path / "q"), "--prompt", "x" * 300, "-n", "4")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("qkit: error: the prompt's 300 tokens plus 4 new ones exceed")


def test_default_output_is_packed_gptq_and_says_when_it_is_not():
    from qkit.recipe import Recipe

    assert Recipe.from_options(output="out").format == "gptq"
    assert Recipe.from_options(output="out", method="smoothquant").format == "compressed-tensors"
    assert Recipe.from_options(output="out.gguf", type="q4_k_m").format == "gguf"
    r = Recipe.from_options(output="out", bits=6)
    assert r.format == "safetensors" and any("no packed format holds 6-bit codes" in n for n in r.notes)
    r = Recipe.from_options(output="out", rotate=True, online_hadamard=True)
    assert r.format == "safetensors" and any("online" in n for n in r.notes)
    assert Recipe.from_options(output="out", format="safetensors").notes == ()


def test_bench_runtime_child_and_table(tiny, tmp_path, capsys, monkeypatch):
    """The benchmark's per-process row on a tiny packed model (in this process), then its table and plot."""
    import argparse

    from qkit.eval import bench_runtime as br

    d, _ = tiny
    m = tmp_path / "m"
    shutil.copytree(d, m)
    char_tokenizer(m)
    export(m, tmp_path / "q", "gptq", chooser_for("gptq", 4))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(m / f, tmp_path / "q" / f)
    monkeypatch.setattr("qkit.text.load_text", lambda text, default=None: ("To be or not to be. " * 20, "t"))
    rec = br.child(argparse.Namespace(path=str(tmp_path / "q"), threads=1, prompt=40, decode=8))
    assert rec["decode"] == 8 and rec["prompt"] == 40 and rec["prefill_tps"] > 0 and rec["gemv_gbps"] > 0
    assert rec["gemv_bytes"] > 0 and set(rec["split_ms"]) == {"linears", "attention", "head", "other"}
    dense = {**rec, "row": "torch fp32 (dense)", "runtime": "torch float32 (dense)"}
    for k in ("gemv_gbps", "gemv_bytes", "gemv_ms", "read_gbps_1core"):
        dense.pop(k)
    recs = [dense, {**rec, "row": "qkit W4 g128 (gptq)"}]
    br.print_table(recs, {"cpu": "test", "torch": torch.__version__, "prompt": 40, "decode": 8})
    out = capsys.readouterr().out
    assert "qkit W4 g128 (gptq)" in out and "per decode token" in out
    br.plot(recs, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 1000
