"""GPTQ in GGML grids (qkit.ggml.grid, qkit.gptq_ggml): a float64 reference, error vs llama.cpp's rounding,
bit-valid blocks under the gguf package's dequantizer, the GGUF written, and the CLI."""
import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from llm_models import make_model  # noqa: E402
from test_gguf_load import TEXT, train_tokenizer, write_tiny_gguf  # noqa: E402

from qkit import ggml  # noqa: E402
from qkit.affine import AffineConfig  # noqa: E402
from qkit.errors import UsageError  # noqa: E402
from qkit.ggml.grid import CODES, GGMLGrid, levels  # noqa: E402
from qkit.gptq import GPTQConfig, gptq_quantize, hessian_update  # noqa: E402
from qkit.gptq_ggml import GGMLGPTQ  # noqa: E402

ALL_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]


def correlated(rows, cols, n=1024, seed=0):
    """Weights and inputs with strongly correlated, unequally scaled input channels (as in a real layer)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.05, (rows, cols))
    mix = rng.normal(0, 1, (cols, cols)) / np.sqrt(cols) + 2 * np.eye(cols)
    X = rng.normal(0, 1, (n, cols)) @ mix * rng.uniform(0.2, 3, cols)
    return W, X


def reference_gptq_grid(W, X, qtype, static, act_order=False, damp=0.01, imatrix=None):
    """GPTQ unbatched in float64 numpy (paper eq. 3 with an explicit H^-1, eliminated column by column),
    on a fixed per-block grid: the levels a * (c - z) - m of a block come from llama.cpp's search
    (GGMLGrid.search) on the original weights (static) or on the weights as they stand when the
    block's first column is reached; each weight goes to its nearest level."""
    W = W.astype(np.float64).copy()
    rows, cols = W.shape
    H = 2 * X.T @ X / X.shape[0]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grid = GGMLGrid(qtype, cols, imatrix, row_sigma2=None if imatrix is None else
                    (W.astype(np.float32) ** 2).mean(1, dtype=np.float32))
    bs = grid.block_size
    z, lo, hi, _ = CODES[qtype]
    A = np.zeros_like(W)
    M = np.zeros_like(W)

    def fix(s, Wnow):
        a, m = levels(qtype, grid.search(Wnow[:, s:s + bs].astype(np.float32), s))
        A[:, s:s + bs], M[:, s:s + bs] = a, m

    if static:
        for s in range(0, cols, bs):
            fix(s, W)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    Hinv = np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(cols))
    Q = np.zeros_like(W)
    C = np.zeros_like(W)
    todo = list(order)
    for pos, j in enumerate(order):
        if not static and j % bs == 0:
            fix(j, W)
        a, m = A[:, j], M[:, j]
        c = np.where(a != 0, np.round((W[:, j] + m) / np.where(a != 0, a, 1)) + z, z)
        c = np.clip(c, lo, hi)
        Q[:, j], C[:, j] = a * (c - z) - m, c
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        todo.remove(j)
        W[:, todo] -= np.outer(err, Hinv[j, todo])
        # eliminate column j from H^-1 (the inverse of H restricted to the remaining columns)
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q, C


@pytest.mark.parametrize("qtype,static,act_order,use_im", [
    ("q4_K", False, False, False), ("q4_0", False, False, False), ("q5_1", False, False, True),
    ("q2_K", True, True, False), ("q4_K", True, True, True)])
def test_matches_float64_reference(qtype, static, act_order, use_im):
    bs = ggml.get_type(qtype).block_size
    W, X = correlated(24, 2 * bs if bs == 256 else 96, n=600, seed=1)
    im = (X ** 2).mean(0).astype(np.float32) if use_im else None
    Qr, Cr = reference_gptq_grid(W, X, qtype, static, act_order, imatrix=im)
    H = torch.from_numpy(2 * X.T @ X / X.shape[0])  # float64 (hessian_update accumulates in float32)
    # qkit in float64 too, with lazy batches (block_size 64 < 256: a super-block spans batches)
    cfg = GPTQConfig(grid=AffineConfig(group_size=bs), static_groups=static, act_order=act_order, block_size=64)
    sig = None if im is None else (W.astype(np.float32) ** 2).mean(1, dtype=np.float32)
    Q, C, *_ = gptq_quantize(torch.from_numpy(W), H, cfg, GGMLGrid(qtype, W.shape[1], im, sig))
    # the searches run in float32 on float64 weights that differ in the last bits (summation order), so a
    # block's search may rarely flip; everything else is the same
    assert (C.numpy() == Cr).mean() > 0.995
    assert np.isclose(Q.numpy(), Qr, rtol=0, atol=1e-9).mean() > 0.995


@pytest.mark.parametrize("qtype", ["q4_K", "q3_K", "q4_0"])
def test_beats_llama_cpp_rounding_on_layer_output(qtype):
    W, X = correlated(64, 512, seed=2)
    W32 = W.astype(np.float32)
    H, _ = hessian_update(None, 0, torch.from_numpy(X.astype(np.float32)))
    ch = GGMLGPTQ({"lin": qtype})
    ch.H["lin"], ch.n["lin"] = H, X.shape[0]
    Q = ch.quantize("lin", W32).weight
    rtn = ggml.dequantize(ggml.quantize(W32, qtype), qtype, W.shape)

    def err(Wq):
        return float(np.sum(((Wq.astype(np.float64) - W) @ X.T) ** 2))

    assert err(Q) < 0.8 * err(rtn), (err(Q), err(rtn))


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("use_im", [False, True])
def test_blocks_are_valid_ggml_equal_to_q(qtype, use_im):
    """The packed rows decode, under the gguf package's own dequantizer, to exactly GPTQ's Q (float32)."""
    bs = ggml.get_type(qtype).block_size
    W, X = correlated(8, 2 * bs, n=300, seed=3)
    W[0] = 0  # an all-zero row: zero scales
    W[1, :bs] = 0.3  # a constant block
    W32 = W.astype(np.float32)
    H, _ = hessian_update(None, 0, torch.from_numpy(X.astype(np.float32)))
    ch = GGMLGPTQ({"lin": qtype}, GPTQConfig(act_order=use_im),
                  {"lin": (X ** 2).mean(0).astype(np.float32)} if use_im else None)
    ch.H["lin"], ch.n["lin"] = H, X.shape[0]
    res = ch.quantize("lin", W32)
    t, blocks = ch.blocks["lin"]
    theirs = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype.upper()))
    assert theirs.shape == W.shape
    assert np.array_equal(theirs, res.weight)
    # a result of its own: the type, the very bytes the GGUF gets, and what they occupy
    assert (res.qtype, res.blocks is blocks, res.stored_bits) == (qtype, True, blocks.size * 8)
    assert np.isfinite(res.weight).all()


def test_without_correlation_it_is_llama_cpp_rounding():
    """H = I: no error feedback, so every block gets llama.cpp's grid from the original weights and each
    weight its nearest level: the K types' bytes equal llama.cpp's (its codes are re-fitted to the stored
    scales too); the legacy types code against the fp32 scale before its fp16 rounding, so there only the
    grid is the same and ours is never farther from the weight."""
    rng = np.random.default_rng(4)
    W = rng.normal(0, 0.05, (16, 512)).astype(np.float32)
    for qtype in ("q4_K", "q3_K", "q6_K", "q4_0", "q5_1"):
        ch = GGMLGPTQ({"lin": qtype}, GPTQConfig(damp=0.0), hessian_importance=False)
        ch.H["lin"], ch.n["lin"] = torch.eye(512), 1
        Q = ch.quantize("lin", W).weight
        bt = ggml.get_type(qtype)
        ours = ch.blocks["lin"][1].reshape(-1, bt.type_size)
        ref = ggml.quantize(W, qtype).reshape(-1, bt.type_size)
        assert all(np.array_equal(x, y) for x, y in zip(levels(qtype, ours), levels(qtype, ref))), qtype
        rtn = ggml.dequantize(ref, qtype, W.shape)
        assert (np.abs(Q - W) <= np.abs(rtn - W) + 1e-7).all(), qtype
        if qtype.endswith("K"):
            assert (ours == ref).all(axis=1).mean() >= 0.97, qtype


@pytest.mark.parametrize("qtype", ["q4_K", "q3_K", "q5_0"])
def test_without_an_imatrix_the_search_is_weighted_by_diag_h(qtype):
    """No importance matrix: the grid search is weighted by diag(H), the per-column sum of x^2 (llama-imatrix's
    mean of x^2 times the token count); the unweighted search gives other weights."""
    from qkit.gptq_ggml import hessian_importance

    W, X = correlated(16, 512, seed=5)
    W32 = W.astype(np.float32)
    H, _ = hessian_update(None, 0, torch.from_numpy(X.astype(np.float32)))
    d = np.diag(H.double().numpy())
    assert np.allclose(hessian_importance(H), d + 1e-6 * d.mean(), rtol=1e-6)
    assert np.allclose(d / d.mean(), (X ** 2).mean(0) / (X ** 2).mean(), rtol=1e-4)  # imatrix up to a factor

    def run(**kw):
        ch = GGMLGPTQ({"lin": qtype}, **kw)
        ch.H["lin"], ch.n["lin"] = H.clone(), X.shape[0]
        return ch.quantize("lin", W32).weight

    default = run()
    assert np.array_equal(default, run(imatrix={"lin": hessian_importance(H)}))
    assert not np.array_equal(default, run(hessian_importance=False))
    dead = H.clone()
    dead[:, :32] = 0
    dead[:32, :] = 0  # a block no calibration token reached: still a defined search, finite weights
    ch = GGMLGPTQ({"lin": qtype})
    ch.H["lin"], ch.n["lin"] = dead, X.shape[0]
    assert np.isfinite(ch.quantize("lin", W32).weight).all()


def test_act_order_without_static_groups_is_refused_for_positional_grids():
    W = torch.zeros(4, 256)
    with pytest.raises(UsageError, match="needs static groups"):
        gptq_quantize(W, torch.eye(256), GPTQConfig(grid=AffineConfig(group_size=256),
                                                    act_order=True), GGMLGrid("q4_K", 256))


# ------------------------------------------------------------------ whole models, GGUF, CLI
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny random Llama whose rows are multiples of 256 (every K type applies), as an F32 GGUF."""
    root = tmp_path_factory.mktemp("wide")
    tk = train_tokenizer(320)
    model = make_model("llama", root / "hf", vocab_size=tk.get_vocab_size(), hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    path = root / "wide-f32.gguf"
    write_tiny_gguf(path, model, tk, q8_tensor=None)
    calib = root / "calib.txt"
    calib.write_text(TEXT * 4)
    return path, calib, root / "cache"


@pytest.fixture
def cache_env(wide, monkeypatch):
    """One qkit cache for the module: the GGUF is converted once."""
    monkeypatch.setenv("QKIT_CACHE", str(wide[2]))


def run_cli(capsys, *args):
    """The CLI's main in this process: (exit code, stdout, stderr)."""
    from qkit.cli.main import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _tensors(path):
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}


def test_gguf_holds_gptq_weights_and_rtn_elsewhere(wide, tmp_path, cache_env, monkeypatch):
    from qkit import gptq_ggml
    from qkit.gguf import read as gguf_convert
    from qkit.model import loader
    from qkit.gguf.write import write_gguf
    from qkit.text import calibration_samples

    path, calib, _ = wide
    ref = loader.resolve(str(path))
    got = {}
    orig = gptq_ggml.GGMLGPTQ.quantize

    def spy(self, name, W):
        res = orig(self, name, W)
        got[name] = res.weight
        return res
    monkeypatch.setattr(gptq_ggml.GGMLGPTQ, "quantize", spy)
    cfgs = []
    init = gptq_ggml.GGMLGPTQ.__init__

    def spy_init(self, *a, **kw):
        init(self, *a, **kw)
        cfgs.append(self.cfg)
    monkeypatch.setattr(gptq_ggml.GGMLGPTQ, "__init__", spy_init)
    ids = loader.load_tokenizer(ref)(TEXT * 4).input_ids
    out = tmp_path / "gptq.gguf"
    s = gptq_ggml.quantize_gguf(ref, out, "Q4_K_M", "gptq", calibration_samples(ids, 4, 64, 0))
    assert [(c.act_order, c.static_groups) for c in cfgs] == [(True, True)]  # the library's default, as the CLI's
    rtn = tmp_path / "rtn.gguf"
    write_gguf(ref, rtn, "Q4_K_M")
    ours, theirs = _tensors(out), _tensors(rtn)
    assert set(s.types) <= {"q4_K", "q6_K", "f32"} and "q4_K" in s.types
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    n_lin = 0
    for name, t in ours.items():
        if name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type != gguf.GGMLQuantizationType.F32:
            deq = gguf.quants.dequantize(t.data, t.tensor_type)
            i, kind = int(name.split(".")[1]), name.split(".")[2]
            hf = gguf_convert.BLOCK_NAMES[kind]
            want = got[f"model.layers.{i}.{hf}"]
            if kind in ("attn_q", "attn_k"):
                want = gguf_convert.permute_qk(want, 4 if kind == "attn_q" else 2)
            assert np.array_equal(deq, want), name
            assert not np.array_equal(t.data, theirs[name].data), name  # GPTQ changed the codes
            n_lin += 1
        else:  # token embedding, norms: exactly the RTN path's bytes
            assert np.array_equal(np.asarray(t.data), np.asarray(theirs[name].data)), name
    assert n_lin == 2 * 7


def test_cli_gptq_with_imatrix_end_to_end(wide, tmp_path, cache_env, capsys):
    from qkit.imatrix import collect, write_imatrix
    from qkit.model import loader
    from qkit.text import calibration_samples

    path, calib, _ = wide
    ref = loader.resolve(str(path))
    samples = calibration_samples(loader.load_tokenizer(ref)(calib.read_text()).input_ids, 4, 64, 0)
    im = tmp_path / "im.gguf"
    write_imatrix(im, collect(ref, samples), ["test"], 64)
    out = tmp_path / "q3km.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", str(path), "--method", "gptq", "--type", "Q3_K_M",  # act-order: default
                              "--imatrix", str(im), "--calib", str(calib), "--nsamples", "4", "--seqlen", "64",
                              "-o", str(out), "--json", str(tmp_path / "s.json"))
    assert rc == 0, err
    rec = json.loads((tmp_path / "s.json").read_text())
    assert (rec["desc_act"], rec["static_groups"], rec["mix"]) == (True, True, "Q3_K_M")
    assert "gptq in its grids, act-order, static groups" in stdout and "done:" in stdout
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {"Q3_K", "Q5_K"} <= types  # Q3_K_M: q3_K, attn_v of the first layers q5_K
    m = loader.load_model(loader.resolve(str(out)))  # the GGUF reads back as a model
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_awq_into_the_mix(wide, tmp_path, cache_env):
    from qkit.awq import AWQConfig
    from qkit.gptq_ggml import quantize_gguf
    from qkit.model import loader
    from qkit.gguf.write import write_gguf
    from qkit.text import calibration_samples

    path, calib, _ = wide
    ref = loader.resolve(str(path))
    samples = calibration_samples(loader.load_tokenizer(ref)(calib.read_text()).input_ids, 4, 64, 0)
    out, rtn = tmp_path / "awq.gguf", tmp_path / "rtn.gguf"
    quantize_gguf(ref, out, "Q4_K_M", "awq", samples, awq=AWQConfig(n_grid=4))
    write_gguf(ref, rtn, "Q4_K_M")
    ours, theirs = _tensors(out), _tensors(rtn)
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    # the scales moved into the norms (AWQ's fold), and the linears changed accordingly
    assert not np.array_equal(ours["blk.0.attn_norm.weight"].data, theirs["blk.0.attn_norm.weight"].data)
    assert np.array_equal(ours["token_embd.weight"].data, theirs["token_embd.weight"].data)


def test_calibrated_gguf_streams_without_a_temporary_model(wide, tmp_path, cache_env, monkeypatch):
    """The calibrated GGUF path writes no model to disk on the way (no safetensors writer is made), and every
    norm AWQ folded its scales into is written as the layer walk left it: the same values as the fake-quantized
    safetensors output of the same chooser on the same samples."""
    from qkit import pipeline
    from qkit.awq import AWQConfig
    from qkit.gptq_ggml import awq_chooser, plan_types, quantize_gguf
    from qkit.model import loader
    from qkit.text import calibration_samples

    path, calib, _ = wide
    ref = loader.resolve(str(path))
    samples = calibration_samples(loader.load_tokenizer(ref)(calib.read_text()).input_ids, 4, 64, 0)
    types, _ = plan_types(ref, "Q4_K_M")
    fake = tmp_path / "fake"
    pipeline.quantize_model(ref, fake, awq_chooser(types, AWQConfig(n_grid=4), None), samples=samples)
    want = loader.resolve(str(fake)).store()

    def no_writer(*a, **k):
        raise AssertionError("the GGUF path made a safetensors writer")

    monkeypatch.setattr(pipeline, "ShardedWriter", no_writer)
    out = tmp_path / "awq.gguf"
    quantize_gguf(ref, out, "Q4_K_M", "awq", samples, awq=AWQConfig(n_grid=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq.gguf", "fake"]  # nothing left beside it
    got = _tensors(out)
    n = 0
    for i in range(2):
        for g, h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            assert np.array_equal(np.asarray(got[f"blk.{i}.{g}.weight"].data),
                                  want.get(f"model.layers.{i}.{h}.weight").numpy()), (i, g)
            n += 1
    assert n == 4


@pytest.mark.parametrize("args,want", [([], True), (["--act-order"], True), (["--no-act-order"], False)])
def test_gptq_into_a_mix_defaults_to_act_order(wide, tmp_path, cache_env, capsys, monkeypatch, args, want):
    """--type with gptq: act-order unless --no-act-order (GGML blocks are positional: static groups)."""
    from qkit import gptq_ggml
    from qkit.errors import UsageError

    got = []

    def stop(*a, gptq=None, **kw):
        got.append(gptq.act_order)
        raise UsageError("stopped before the work")
    monkeypatch.setattr(gptq_ggml, "quantize_gguf", stop)
    path, _, _ = wide
    rc, stdout, err = run_cli(capsys, "quantize", str(path), "--method", "gptq", "--type", "Q4_K_M", *args,
                              "-o", str(tmp_path / "x.gguf"))
    assert rc == 2 and "stopped before the work" in err and got == [want]
    assert ("act-order, static groups" in stdout) == want


@pytest.mark.parametrize("args,msg,out", [
    (["--method", "gptq", "--type", "Q4_K_M", "--bits", "3"], "--bits do not apply to --type", "x.gguf"),
    (["--method", "smoothquant", "--type", "Q4_K_M"], "smoothquant", "x.gguf"),
    (["--method", "awq", "--type", "Q4_K_M", "--round", "gptq"], "--round gptq", "x.gguf"),
    (["--method", "awq", "--type", "Q4_K_M", "--act-order"], "--act-order do not apply", "x.gguf"),
    (["--method", "rtn", "--type", "Q4_K_M", "--no-act-order"], "--no-act-order do not apply", "x.gguf"),
    (["--method", "rtn", "--type", "Q4_K_M", "--nsamples", "4"], "--nsamples do not apply", "x.gguf"),
    (["--method", "awq", "--type", "Q4_K_M", "--true-sequential"], "--true-sequential do not apply", "x.gguf"),
    (["--method", "awq", "--type", "Q4_K_M", "--gptaq"], "--gptaq do not apply", "x.gguf"),
    # GPTQ-only options on the affine path
    (["--method", "rtn", "--true-sequential"], "--true-sequential applies to --method gptq", "x"),
    (["--method", "awq", "--gptaq"], "--gptaq applies to --method gptq", "x"),
    (["--method", "gptq", "--no-gptaq", "--gptaq-alpha", "0.5"], "--gptaq-alpha applies with --gptaq", "x"),
])
def test_bad_combinations_are_one_line_errors(wide, tmp_path, cache_env, capsys, args, msg, out):
    path, _, _ = wide
    rc, _, err = run_cli(capsys, "quantize", str(path), *args, "-o", str(tmp_path / out))
    assert rc == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / out).exists()


def test_bench_f32_gguf_and_llama_cpp_perplexity(wide, tmp_path, cache_env):
    """bench_gguf's helpers: the F32 rewrite of a GGUF decodes to the same weights, and llama.cpp's perplexity
    of it equals qkit's evaluator on the same token ids and windows (F32 weights: no weight rounding)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in oracle: pip install llama-cpp-python==0.3.36")  # noqa: F841
    from qkit.eval.bench_gguf import llamacpp_perplexity, write_f32_gguf
    from qkit.eval.perplexity import perplexity

    from qkit.model import loader
    from qkit.gguf.write import write_gguf

    path, calib, _ = wide
    q8, f32 = tmp_path / "q8.gguf", tmp_path / "f32.gguf"
    write_gguf(loader.resolve(str(path)), q8, "Q8_0")
    write_f32_gguf(q8, f32)
    a, b = _tensors(q8), _tensors(f32)
    for name, t in a.items():
        assert b[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), np.asarray(b[name].data)), name
    ref = loader.resolve(str(f32))
    ids = loader.load_tokenizer(ref)(calib.read_text()).input_ids
    ours = perplexity(loader.load_model(ref), ids, 64, max_windows=4)
    theirs = llamacpp_perplexity(f32, ids, 64, max_windows=4)
    assert theirs["tokens"] == ours.tokens and abs(theirs["ppl"] / ours.ppl - 1) < 2e-3, (theirs, ours.ppl)
