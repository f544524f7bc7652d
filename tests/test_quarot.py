"""QuaRot rotation (qkit.quarot): the rotated float model computes the same logits (Llama tied and untied, Qwen2
with biases, Qwen3, a hidden size that needs a Kronecker Hadamard, the default model); every rotated tensor equals
a dense-matrix transcription of the paper's formulas; an injected outlier channel is spread by the rotation;
architectures that cannot be rotated are refused in one line; --rotate through the CLI with GPTQ and a packed
export."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_models import make_model  # noqa: E402
from test_awq import randomise_norms  # noqa: E402

from qkit import affine, pipeline, quarot  # noqa: E402
from qkit.chooser import ChooserBase  # noqa: E402
from qkit.errors import UsageError  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.rotation import make_rotation  # noqa: E402
from qkit.rtn import RTN, QuantResult  # noqa: E402


@pytest.fixture(autouse=True)
def _small_runs(monkeypatch):
    """Tiny models: no per-layer heap trim, one torch thread (see test_awq)."""
    monkeypatch.setattr(pipeline, "trim_heap", lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IDS = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))


class Unrounded(ChooserBase):
    """A chooser that keeps every weight as it is: the pipeline then writes the rotated float model."""

    name, needs_calibration = "float", False

    def __init__(self):
        self.grid = RTN(affine.AffineConfig(bits=8, group_size=16))
        self.seen = {}

    def quantize(self, name, W):
        self.seen[name] = W.copy()
        r = self.grid.quantize(name, W)
        return QuantResult(W, r.codes, r.scale, r.zero, r.g_idx, r.bits, r.symmetric)


def rotated_float(src, out, seed=1):
    ch = Unrounded()
    s = pipeline.quantize_model(loader.resolve(str(src)), out, ch, rotate=quarot.RotateConfig(seed=seed))
    return loader.load_model(loader.resolve(str(out))), ch, s


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def qwen3(directory):
    """A tiny Qwen3 (per-head q/k norms after q_proj/k_proj, which the rotation leaves alone), tied head."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    m.save_pretrained(str(directory))
    return m


CASES = [("llama", {}), ("qwen2", {}), ("llama", {"hidden_size": 96, "head_dim": 24}), ("qwen3", {})]


@pytest.mark.parametrize("kind,overrides", CASES, ids=["llama-tied", "qwen2-bias", "llama-d96-kron", "qwen3"])
def test_rotated_float_model_computes_the_same_logits(kind, overrides, tmp_path):
    """Norm weights away from 1 (so a missing fold shows), then the streamed rotation: relative logit error <= 1e-4;
    the head is untied in the output, the weights really changed, and the record names the rotation."""
    model = qwen3(tmp_path / "m") if kind == "qwen3" else make_model(kind, tmp_path / "m", **overrides)
    randomise_norms(model, tmp_path / "m")
    rot, _, summary = rotated_float(tmp_path / "m", tmp_path / "r")
    with torch.no_grad():
        ref, got = model(IDS).logits, rot(IDS).logits
    assert rel_err(got, ref) <= 1e-4, rel_err(got, ref)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["tie_word_embeddings"] is False
    assert rot.lm_head.weight.data_ptr() != rot.model.embed_tokens.weight.data_ptr()
    rec = json.loads((tmp_path / "r" / pipeline.RECORD).read_text())
    assert rec["rotate"] == {"kind": "hadamard", "seed": 1} and summary.extra["rotate"] == rec["rotate"]
    q0, q1 = model.model.layers[0].self_attn.q_proj.weight, rot.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, q1, atol=1e-2)
    assert torch.equal(rot.model.layers[1].input_layernorm.weight, torch.ones(model.config.hidden_size))
    if kind == "qwen2":  # q/k/v biases are outputs, untouched by the rotation of the inputs
        assert torch.equal(rot.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)


def test_every_tensor_matches_a_dense_transcription(tmp_path):
    """Q = R^T as a dense matrix, and the paper's formulas (QuaRot 4, stage 1a) written out in torch: E Q,
    (W diag(alpha)) Q for readers and the head, Q^T W for writers, ones for norms."""
    model = make_model("llama", tmp_path / "m", attention_bias=True)  # o_proj has a bias too: Q^T b
    randomise_norms(model, tmp_path / "m")
    rot, _, _ = rotated_float(tmp_path / "m", tmp_path / "r", seed=5)
    Q = torch.from_numpy(make_rotation("hadamard", 64, 5).matrix().T)
    assert torch.allclose(Q @ Q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    sd0 = {k: v.double() for k, v in model.state_dict().items()}
    sd = rot.state_dict()
    expect = {"model.embed_tokens.weight": sd0["model.embed_tokens.weight"] @ Q,
              "lm_head.weight": sd0["model.embed_tokens.weight"] * sd0["model.norm.weight"] @ Q,
              "model.norm.weight": torch.ones(64, dtype=torch.float64)}
    for i in range(2):
        p = f"model.layers.{i}."
        for norm, lins in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                           ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            expect[p + norm + ".weight"] = torch.ones(64, dtype=torch.float64)
            for lin in lins:
                expect[p + lin + ".weight"] = sd0[p + lin + ".weight"] * sd0[p + norm + ".weight"] @ Q
        for w in ("self_attn.o_proj", "mlp.down_proj"):
            expect[p + w + ".weight"] = Q.T @ sd0[p + w + ".weight"]
        expect[p + "self_attn.o_proj.bias"] = Q.T @ sd0[p + "self_attn.o_proj.bias"]
        expect[p + "self_attn.q_proj.bias"] = sd0[p + "self_attn.q_proj.bias"]
    for name, want in expect.items():
        assert torch.allclose(sd[name].double(), want, atol=1e-5), name
    assert set(expect) < set(sd)


def test_rotation_spreads_an_outlier_channel(tmp_path):
    """Input channel 3 of q/k/v/gate/up made 25x larger (a 'massive activation' channel that the weights amplify):
    what the quantizer is handed has a much lower max/RMS after rotation, and RTN W3 g32 then loses less."""
    model = make_model("llama", tmp_path / "m")
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj):
                lin.weight[:, 3] *= 25
    model.save_pretrained(str(tmp_path / "m"))
    ref = loader.resolve(str(tmp_path / "m"))
    plain, rotated = Unrounded(), Unrounded()
    pipeline.quantize_model(ref, tmp_path / "p", plain)
    pipeline.quantize_model(ref, tmp_path / "r", rotated, rotate=quarot.RotateConfig(seed=0))

    def peak(W):
        return float(np.abs(W).max() / np.sqrt((W.astype(np.float64) ** 2).mean()))

    for name in plain.seen:
        if name.endswith(("o_proj", "down_proj")):
            continue
        assert peak(rotated.seen[name]) < 0.5 * peak(plain.seen[name]), name

    cfg = affine.AffineConfig(bits=3, group_size=32, scale_dtype="float16")
    pipeline.quantize_model(ref, tmp_path / "p3", RTN(cfg))
    pipeline.quantize_model(ref, tmp_path / "r3", RTN(cfg), rotate=quarot.RotateConfig(seed=0))

    def err(d):
        with torch.no_grad():
            return float((loader.load_model(loader.resolve(str(d)))(IDS).logits - model(IDS).logits).pow(2).mean())

    assert err(tmp_path / "r3") < err(tmp_path / "p3")


def test_unrotatable_architectures_are_refused(tmp_path):
    """Gemma 3 (post-norms inside the residual branches) and a family outside the table: one UsageError naming the
    supported model types, before any output is written."""
    for kind, why in (("gemma3", "post_feedforward_layernorm normalise the branch outputs"),
                      ("gpt2", "not in qkit's architecture table")):
        make_model(kind, tmp_path / kind)
        with pytest.raises(UsageError, match=r"--rotate \(QuaRot\) supports model types llama, mistral, qwen2, "
                                             r"qwen3; model_type '\w+' cannot be rotated.*" + why):
            pipeline.quantize_model(loader.resolve(str(tmp_path / kind)), tmp_path / "o", Unrounded(),
                                    rotate=quarot.RotateConfig())
        assert not (tmp_path / "o").exists()


def test_cli_rotate_with_gptq_exports_and_refusals(tmp_path, capsys):
    """qkit quantize --rotate --method gptq into a packed GPTQ v2 checkpoint: qkit eval ppl reads it back, and it is
    the same model as the safetensors output of the same run; misuse gets one line and exit 2."""
    from test_export import char_tokenizer, run_cli

    make_model("llama", tmp_path / "m")
    char_tokenizer(tmp_path / "m")
    make_model("gemma3", tmp_path / "g")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8)
    common = [str(tmp_path / "m"), "--rotate", "--rotate-seed", "7", "--method", "gptq", "--bits", "4",
              "--group-size", "32", "--calib", str(text), "--nsamples", "4", "--seqlen", "32"]
    r = run_cli(capsys, "quantize", *common, "--format", "gptq_v2", "-o", str(tmp_path / "q"),
                "--json", str(tmp_path / "q.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "q.json").read_text())["extra"]["rotate"] == {"kind": "hadamard", "seed": 7}
    assert json.loads((tmp_path / "q" / pipeline.RECORD).read_text())["rotate"]["seed"] == 7
    r = run_cli(capsys, "quantize", *common, "-o", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    packed = loader.load_model(loader.resolve(str(tmp_path / "q")))
    fake = loader.load_model(loader.resolve(str(tmp_path / "s")))
    with torch.no_grad():
        assert torch.allclose(packed(IDS).logits, fake(IDS).logits, atol=1e-4)
    r = run_cli(capsys, "eval", "ppl", str(tmp_path / "q"), "--text", str(text), "--ctx", "64")
    assert r.returncode == 0 and "ppl" in r.stdout, r.stderr
    r = run_cli(capsys, "quantize", str(tmp_path / "g"), "--rotate", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "gemma3_text" in r.stderr
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--rotate-seed", "3", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["qkit: error: --rotate-seed applies only with "
                                                                   "--rotate"]
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--rotate", "--online-hadamard", "--method", "awq",
                "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "does not combine with --method awq" in r.stderr
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--rotate", "--online-hadamard", "--format", "gptq",
                "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot apply the online Hadamard" in r.stderr
    r = run_cli(capsys, "quantize", *common, "--online-hadamard", "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    r = run_cli(capsys, "eval", "ppl", str(tmp_path / "o"), "--text", str(text), "--ctx", "64")
    assert r.returncode == 0 and "ppl" in r.stdout, r.stderr
    r = run_cli(capsys, "quantize", str(tmp_path / "o"), "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot be quantized, rotated or converted again" in r.stderr


@pytest.mark.data
def test_default_model_rotated_logits(tmp_path):
    """SmolLM2-135M (576 = 16 x 36, tied head): the rotated float model's logits on 64 tokens of the evaluation
    text, max|logits_rotated - logits| / max|logits| <= 1e-4."""
    from qkit.text import load_text

    ref = loader.resolve(None)
    ids = torch.tensor(loader.load_tokenizer(ref)(load_text(None)[0][:2000]).input_ids[:64])[None]
    with torch.no_grad():
        want = loader.load_model(ref)(ids).logits
        got = quarot.load_rotated_model(ref, quarot.RotateConfig(seed=0))(ids).logits
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)


def test_cli_rotate_into_gguf(tmp_path, capsys, monkeypatch):
    """qkit quantize MODEL.gguf --rotate --type Q8_0: the GGUF carries the rotated weights and its own output.weight
    (the tied head untied); read back, its logits stay about as close to the float model's as plain Q8_0's."""
    gguf = pytest.importorskip("gguf")
    from test_export import run_cli
    from test_gguf_load import train_tokenizer, write_tiny_gguf

    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    model = make_model("llama", tmp_path / "hf")  # tied head, rows of 64 and 96: Q8_0 blocks of 32 fit
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    write_tiny_gguf(tmp_path / "m.gguf", model, train_tokenizer(300), q8_tensor=None)
    errs = {}
    for rot in ("", "--rotate"):
        out = tmp_path / f"q8{rot}.gguf"
        r = run_cli(capsys, "quantize", str(tmp_path / "m.gguf"), *([rot] if rot else []), "--type", "Q8_0",
                    "-o", str(out))
        assert r.returncode == 0, r.stderr
        names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
        assert ("output.weight" in names) == bool(rot)
        back = loader.load_model(loader.resolve(str(out)))
        with torch.no_grad():
            errs[rot] = rel_err(back(IDS).logits, model(IDS).logits)
        if rot:
            assert not torch.allclose(back.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=1e-2)
    assert errs["--rotate"] < 2 * errs[""] < 0.2, errs  # a head left as E Q would give errors near 1


@pytest.mark.parametrize("d", [64, 96, 1536])
def test_online_hadamard_in_torch_equals_the_rotation(d):
    """The run-time hook's torch transform is RandomizedHadamard.apply (z -> z R^T), for powers of two and for
    Kronecker sizes (96 = 8 x 12, SmolLM2's intermediate 1536 = 128 x 12), on (batch, seq, d) activations."""
    rot = make_rotation("hadamard", d, 4)
    z = np.random.default_rng(0).standard_normal((2, 5, d))
    got = quarot.OnlineHadamard(rot).apply(torch.from_numpy(z)).numpy()
    assert np.allclose(got, rot.apply(z.reshape(-1, d)).reshape(z.shape), atol=1e-12)


class Recorder(Unrounded):
    """Unrounded, calibrated: keeps every linear's calibration inputs."""

    needs_calibration = True

    def __init__(self):
        super().__init__()
        self.inputs = {}

    def add_batch(self, name, X):
        self.inputs.setdefault(name, []).append(X.clone())


def test_online_hadamard_before_down_proj(tmp_path):
    """--online-hadamard: W_down -> Q^T W_down Q2 and a pre-hook z -> z Q2 that the loader attaches from config.json;
    same logits; calibration saw the rotated inputs of down_proj; a model needing the hook is refused wherever it
    would be dropped (quantized again, packed formats)."""
    model = make_model("llama", tmp_path / "m")
    randomise_norms(model, tmp_path / "m")
    ref = loader.resolve(str(tmp_path / "m"))
    rc = quarot.RotateConfig(seed=2, online=True)
    ch = Recorder()
    samples = IDS[:, :16]
    pipeline.quantize_model(ref, tmp_path / "r", ch, samples=samples, rotate=rc)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg[quarot.ONLINE_KEY] == {"kind": "hadamard", "seed": 2, "dim": 96, "layers": "model.layers",
                                      "modules": ["mlp.down_proj"]}
    rot = loader.load_model(loader.resolve(str(tmp_path / "r")))
    with torch.no_grad():
        ref_logits, got = model(IDS).logits, rot(IDS).logits
    assert rel_err(got, ref_logits) <= 1e-4
    for h in list(rot.model.layers[0].mlp.down_proj._forward_pre_hooks):  # without the hook: another model
        del rot.model.layers[0].mlp.down_proj._forward_pre_hooks[h]
    with torch.no_grad():
        assert rel_err(rot(IDS).logits, ref_logits) > 1e-2
    # down_proj's calibration inputs are (act(gate x) * up x) Q2, with x the MLP's (rotated) input
    mlp = loader.load_model(loader.resolve(str(tmp_path / "r"))).model.layers[1].mlp
    x = torch.cat(ch.inputs["model.layers.1.mlp.up_proj"])
    with torch.no_grad():
        z = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).double().numpy()
    Q2 = make_rotation("hadamard", 96, 2)
    want = Q2.apply(z.reshape(-1, 96)).reshape(z.shape)
    assert np.allclose(torch.cat(ch.inputs["model.layers.1.mlp.down_proj"]).numpy(), want, atol=1e-5)
    with pytest.raises(UsageError, match="rotates down_proj's inputs at run time"):
        pipeline.quantize_model(loader.resolve(str(tmp_path / "r")), tmp_path / "again", Unrounded())
    with pytest.raises(UsageError, match="cannot apply the online Hadamard"):
        rtn = RTN(affine.AffineConfig(bits=4, group_size=32, scale_dtype="float16"))
        pipeline.quantize_model(ref, tmp_path / "p", rtn, fmt="gptq_v2", rotate=rc)


def test_damped_norms_warn_rotate_with_rtn(tmp_path, capsys):
    """A norm weight that nearly switches its channel off is named: --rotate with rtn warns (one stderr line, exit 0),
    into GGUF too; gptq and runs without --rotate do not; a model without such norms gets no warning."""
    from test_export import run_cli
    from test_gguf_load import train_tokenizer
    from transformers import PreTrainedTokenizerFast

    make_model("llama", tmp_path / "m")
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--rotate", "-o", str(tmp_path / "a"))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    model = make_model("llama", tmp_path / "d")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = 1e-6
        model.model.norm.weight[5] = 1e-7  # the final norm is folded into the head: checked too
    model.save_pretrained(str(tmp_path / "d"))
    PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(300), eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path / "d"))  # the GGUF writer needs tokenizer.json
    ref = loader.resolve(str(tmp_path / "d"))
    store = ref.store()
    found = quarot.damped_norms(store, loader.load_config(ref))
    store.close()
    assert [n for n, _ in found] == ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"]
    assert found[0][1] < 5e-7 < found[1][1] < 5e-6
    r = run_cli(capsys, "quantize", str(tmp_path / "d"), "--rotate", "-o", str(tmp_path / "b"))
    warn = [line for line in r.stderr.splitlines() if "warning" in line]
    assert r.returncode == 0 and len(warn) == 1 and "2 norms" in warn[0] and "(model.norm.weight: 1.0e-07)" in warn[0]
    r = run_cli(capsys, "quantize", str(tmp_path / "d"), "--rotate", "--type", "Q8_0", "-o", str(tmp_path / "b.gguf"))
    assert r.returncode == 0 and "(model.norm.weight: 1.0e-07)" in r.stderr, r.stderr
    r = run_cli(capsys, "quantize", str(tmp_path / "d"), "-o", str(tmp_path / "c"))
    assert r.returncode == 0 and "warning" not in r.stderr
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    r = run_cli(capsys, "quantize", str(tmp_path / "d"), "--rotate", "--method", "gptq", "--calib", str(text),
                "--nsamples", "2", "--seqlen", "16", "-o", str(tmp_path / "g"))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
