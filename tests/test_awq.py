"""AWQ: the paper's scale formula and grid search against a plain transcription, the clip search against
llm-awq's loop, folds that leave the float model unchanged (Llama, Qwen2 with biases and v->o, Gemma 3's
(1 + w) norms and post-norms), and the architecture table's refusal of unknown families."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_models import make_model  # noqa: E402

from qkit import affine, pipeline  # noqa: E402
from qkit.affine import AffineConfig  # noqa: E402
from qkit.chooser import ChooserBase  # noqa: E402
from qkit.awq import AWQ, AWQConfig, awq_scales, clip_ranges, group_grams, subset_indices  # noqa: E402
from qkit.errors import UsageError  # noqa: E402
from qkit.model import arch as archs  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.rtn import QuantResult  # noqa: E402


@pytest.fixture(autouse=True)
def _small_runs(monkeypatch):
    """Tiny models: no per-layer heap trim, and one torch thread (on 2 shared cores a second OpenMP thread turns
    each 0.03 ms matmul of these sizes into ~50 ms of synchronisation; the search runs hundreds)."""
    monkeypatch.setattr(pipeline, "trim_heap", lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rtn_np(W, bits=3, g=16):
    """Asymmetric min-max grid, fp16 scales: the grid AWQ's search quantizes with (qkit.affine)."""
    return affine.quantize_affine(W, bits, (1, g), scale_dtype="float16").dequantize()


# ------------------------------------------------------------------ formulas
def test_scales_are_the_papers_formula():
    x = torch.rand(40, dtype=torch.float64) * 3 + 0.01
    for alpha in (0.0, 0.35, 0.95):
        s_ref = np.maximum(x.numpy() ** alpha, 1e-4)
        s_ref = s_ref / np.sqrt(s_ref.max() * s_ref.min())
        assert np.allclose(awq_scales(x, alpha).numpy(), s_ref, rtol=1e-12)
    assert torch.equal(awq_scales(x, 0.0), torch.ones_like(x))


def test_subset_is_spread_over_the_set():
    assert subset_indices(128, 4) == [0, 42, 85, 127]
    assert subset_indices(3, 8) == [0, 1, 2]


class Toy(torch.nn.Module):
    """One norm feeding one linear: the smallest layer the search runs on."""

    def __init__(self, W):
        super().__init__()
        self.norm = torch.nn.LayerNorm(W.shape[1], elementwise_affine=True, bias=False)
        self.fc = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        self.fc.weight.data = W.clone()


def test_search_picks_the_alpha_of_a_plain_transcription():
    """alpha over {0, 0.05, ..., 0.95} minimising mean (X W^T - X Q(W diag s)^T diag(s)^-1 ...)^2, written in numpy."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(24, 48)).astype(np.float32)
    X = rng.normal(size=(2, 30, 48)).astype(np.float32) * np.exp(rng.normal(size=48) * 1.5).astype(np.float32)
    layer = Toy(torch.from_numpy(W))
    g = archs.ScaleGroup("norm", ("fc",), "fc")
    ch = AWQ(AWQConfig(grid=AffineConfig(bits=3, group_size=16, scale_dtype="float16"), clip=False))
    ch.add_batch("fc", torch.from_numpy(X))
    s = ch.search_scale(layer, pipeline.LayerInputs(torch.from_numpy(X), {}), g, torch.from_numpy(X), "")

    x_mean = np.abs(X.reshape(-1, 48).astype(np.float64)).mean(0)
    Xf = X.reshape(-1, 48).astype(np.float64)
    losses = []
    for i in range(20):
        sc = np.maximum(x_mean ** (i / 20), 1e-4)
        sc = sc / np.sqrt(sc.max() * sc.min())
        Wq = rtn_np((W * sc).astype(np.float32)).astype(np.float64) / sc
        losses.append(np.mean((Xf @ W.T.astype(np.float64) - Xf @ Wq.T) ** 2))
    best = int(np.argmin(losses))
    assert ch.alphas["fc"] == best / 20
    sc = np.maximum(x_mean ** (best / 20), 1e-4)
    assert np.allclose(s.numpy(), sc / np.sqrt(sc.max() * sc.min()))
    assert losses[best] <= losses[0]  # never worse than round-to-nearest (alpha 0) on its tokens
    assert torch.equal(layer.fc.weight.data, torch.from_numpy(W))  # the search restores the weights


def test_clip_search_matches_llm_awq_loop():
    """llm-awq auto_clip: per (row, group) the max_val = amax (1 - k/20), k < 10, minimising the mean over tokens of
    (x_g . (Q(clamp(w_g)) - w_g))^2, computed here token by token as the reference does."""
    rng = np.random.default_rng(1)
    W = rng.normal(size=(12, 40)).astype(np.float32)
    W[:, 3] *= 6  # an outlier column: clipping pays in its group
    X = rng.normal(size=(64, 40)).astype(np.float32)
    g = 16
    fake = lambda w: torch.from_numpy(rtn_np(w.numpy(), 3, g))  # noqa: E731
    m = clip_ranges(torch.from_numpy(W), group_grams(torch.from_numpy(X), g), g, fake).numpy()

    starts = range(0, 40, g)
    amax = np.stack([np.abs(W[:, a:a + g]).max(1) for a in starts], 1)
    best_err = np.full(amax.shape, np.inf)
    best = amax.copy()
    for k in range(10):
        mv = amax * (1 - k / 20)
        Wc = np.concatenate([np.clip(W[:, a:a + g], -mv[:, [j]], mv[:, [j]]) for j, a in enumerate(starts)], 1)
        Q = rtn_np(Wc, 3, g)
        for j, a in enumerate(starts):
            org = X[:, a:a + g].astype(np.float64) @ W[:, a:a + g].T.astype(np.float64)  # (tokens, out)
            cur = X[:, a:a + g].astype(np.float64) @ Q[:, a:a + g].T.astype(np.float64)
            err = ((cur - org) ** 2).sum(0)
            better = err < best_err[:, j]
            best_err[better, j] = err[better]
            best[better, j] = mv[better, j]
    assert np.allclose(m, best, rtol=1e-6)
    assert (m < amax).any()


# ------------------------------------------------------------------ folds keep the float model
class FloatOut(ChooserBase):
    """Wraps AWQ: searches and folds as AWQ does, but writes the folded *float* weights (no rounding)."""

    def __init__(self, awq):
        self.inner = awq
        self.name, self.cfg, self.needs_calibration = awq.name, awq.cfg, True

    def prepare(self, config):
        self.inner.prepare(config)

    def add_batch(self, name, X):
        self.inner.add_batch(name, X)

    def transform_layer(self, layer, inputs, prefix):
        self.inner.transform_layer(layer, inputs, prefix)

    def quantize(self, name, W):
        res = self.inner.quantize(name, W)
        return QuantResult(W, res.codes, res.scale, res.zero, res.g_idx, res.bits, res.symmetric)


SAMPLES = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
KINDS = [("llama", {}), ("qwen2", {"num_key_value_heads": 4}), ("gemma3", {})]


def randomise_norms(model, directory):
    """Norm weights away from their initial 1 (or 0 for Gemma) so that a wrong fold shows."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in n else torch.randn(p.shape, generator=g))
    model.save_pretrained(str(directory))


@pytest.mark.parametrize("kind,overrides", KINDS)
def test_folded_scales_leave_logits_unchanged(kind, overrides, tmp_path):
    """AWQ's searched scales folded into norms and linears (v->o where shapes allow, with v's bias on Qwen2):
    the float model computes the same logits; Gemma 3's post-norms are never touched."""
    model = make_model(kind, tmp_path / "m", **overrides)
    randomise_norms(model, tmp_path / "m")
    ch = AWQ(AWQConfig(grid=AffineConfig(bits=3, group_size=32, scale_dtype="float16"), clip=False))
    pipeline.quantize_model(loader.resolve(str(tmp_path / "m")), tmp_path / "f", FloatOut(ch), samples=SAMPLES)
    folded = loader.load_model(loader.resolve(str(tmp_path / "f")))
    with torch.no_grad():
        ref, got = model(IDS).logits, folded(IDS).logits
    assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), float((got - ref).abs().max())
    assert any(a > 0 for a in ch.alphas.values())  # non-trivial scales were folded
    sd, sd0 = folded.state_dict(), model.state_dict()
    changed = {n for n in sd if not torch.equal(sd[n], sd0[n])}
    assert "model.layers.0.input_layernorm.weight" in changed
    if overrides.get("num_key_value_heads") == 4:  # v and o of one shape: v's rows (and bias) carry 1/s
        assert {"model.layers.0.self_attn.v_proj.bias", "model.layers.0.self_attn.o_proj.weight"} <= changed
    if kind == "gemma3":
        assert "model.layers.0.pre_feedforward_layernorm.weight" in changed
        assert not any("post_attention_layernorm" in n or "post_feedforward_layernorm" in n for n in changed)
    else:
        assert "model.layers.0.post_attention_layernorm.weight" in changed


def test_gemma_norm_fold_is_one_plus_w():
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.tensor([0.5, -0.2, 0.0]))
    s = torch.tensor([2.0, 0.5, 4.0], dtype=torch.float64)
    archs.fold_into_prev(norm, s, is_norm=True, norm_offset=1.0)
    assert torch.allclose(1 + norm.weight.data, torch.tensor([1.5, 0.8, 1.0]) / s.float())


def test_awq_beats_rtn_on_a_layer_with_salient_channels(tmp_path):
    """A tiny Llama whose hidden states have a few large channels: AWQ W3's logits are closer to the float model's
    than RTN's (the scales protect the columns those channels multiply)."""
    from qkit.rtn import RTN

    model = make_model("llama", tmp_path / "m")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :4] *= 8
    model.save_pretrained(str(tmp_path / "m"))
    ref = loader.resolve(str(tmp_path / "m"))
    cfg = dict(bits=3, group_size=32, scale_dtype="float16")
    pipeline.quantize_model(ref, tmp_path / "rtn", RTN(affine.AffineConfig(**cfg)))
    pipeline.quantize_model(ref, tmp_path / "awq", AWQ(AWQConfig(grid=AffineConfig(**cfg))), samples=SAMPLES)

    def err(d):
        with torch.no_grad():
            return float((loader.load_model(loader.resolve(str(d)))(SAMPLES).logits - model(SAMPLES).logits)
                         .pow(2).mean())

    assert err(tmp_path / "awq") < err(tmp_path / "rtn")


def test_unknown_architecture_is_refused_up_front(tmp_path):
    make_model("gpt2", tmp_path / "g")
    with pytest.raises(UsageError, match=r"model_type 'gpt2' is not in qkit's architecture table "
                                         r"\(supported: gemma3_text, llama, mistral, qwen2, qwen3\)"):
        pipeline.quantize_model(loader.resolve(str(tmp_path / "g")), tmp_path / "o", AWQ(AWQConfig()),
                                samples=SAMPLES)
    assert not (tmp_path / "o").exists()


def test_awq_needs_a_calibration_free_grid():
    from qkit.gptq import GPTQ, GPTQConfig

    with pytest.raises(UsageError, match="calibration-free chooser"):
        AWQ(AWQConfig(), rounding=GPTQ(GPTQConfig()))


def test_cli_awq_then_eval(tmp_path, capsys):
    """qkit quantize --method awq --format awq writes an AWQ GEMM checkpoint that qkit eval ppl reads; the
    options of other methods are refused in one line."""
    from test_export import char_tokenizer, run_cli

    make_model("llama", tmp_path / "m")
    char_tokenizer(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8)
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--method", "awq", "--bits", "4", "--group-size", "32",
                "--format", "awq", "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--search-samples", "2",
                "-o", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "q" / "qkit_quantization.json").read_text())
    assert rec["method"] == "awq" and rec["clip_search"] and rec["search_samples"] == 2 and rec["n_grid"] == 20
    r = run_cli(capsys, "eval", "ppl", str(tmp_path / "q"), "--text", str(text), "--ctx", "64")
    assert r.returncode == 0 and "ppl" in r.stdout, r.stderr
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--method", "awq", "--alpha", "0.5", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "qkit: error: --alpha does not apply to --method awq"]


def test_awq_then_gptq_uses_the_scaled_inputs_hessian():
    """AWQ's quantize with --round gptq, given H of the float inputs and the folded s, equals GPTQ run directly
    on W diag(s) with the Hessian accumulated from the actually scaled inputs x / s (independent path)."""
    from qkit.gptq import GPTQ, GPTQConfig

    rng = np.random.default_rng(3)
    X = torch.from_numpy(rng.normal(size=(2, 64, 48)) * np.exp(rng.normal(size=48))).float()
    W = rng.normal(size=(24, 48)).astype(np.float32)
    s = torch.from_numpy(np.exp(rng.normal(size=48) * 0.5))
    gcfg = GPTQConfig(grid=AffineConfig(bits=3, group_size=16, scale_dtype="float16"))
    awq = AWQ(AWQConfig(grid=AffineConfig(bits=3, group_size=16, scale_dtype="float16"), clip=False), gptq=gcfg)
    awq.add_batch("l.x", X)
    awq.input_scale["l.x"] = s
    Ws = (W.astype(np.float64) * s.numpy()).astype(np.float32)
    got = awq.quantize("l.x", Ws)
    ref = GPTQ(gcfg)
    ref.add_batch("l.x", (X.double() / s).float())
    want = ref.quantize("l.x", Ws)
    np.testing.assert_allclose(got.weight, want.weight, rtol=0, atol=1e-5 * np.abs(Ws).max())
    assert (got.codes != want.codes).mean() < 1e-3   # ties aside
    assert not awq.input_scale and not awq.gptq.H   # state released per linear


def test_cli_awq_round_gptq(tmp_path, capsys):
    """--round gptq runs end to end and records it; --act-order is accepted with it and refused with rtn."""
    from test_export import char_tokenizer, run_cli

    make_model("llama", tmp_path / "m")
    char_tokenizer(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 8)
    common = ["--method", "awq", "--bits", "4", "--group-size", "32", "--calib", str(text), "--nsamples", "4",
              "--seqlen", "32", "--search-samples", "2", "--format", "safetensors"]
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), *common, "--round", "gptq", "--act-order",
                "-o", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "q" / "qkit_quantization.json").read_text())
    assert rec["round"] == "gptq" and rec["desc_act"] and not rec["clip_search"]
    # --clip-search with --round gptq is GPTQ's MSE grid: recorded, and other weights than the min-max grid's
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), *common, "--round", "gptq", "--act-order", "--clip-search",
                "-o", str(tmp_path / "qm"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "qm" / "qkit_quantization.json").read_text())["clip_search"]
    from safetensors.numpy import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    a, b = weights(tmp_path / "q"), weights(tmp_path / "qm")
    differ = [k for k in a if k.endswith("proj.weight") and not np.array_equal(a[k], b[k])]
    assert differ
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), *common, "--act-order", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "apply to --method gptq (or awq with --round gptq)" in r.stderr
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--round", "gptq", "-o", str(tmp_path / "y"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "qkit: error: --round does not apply to --method rtn"]
