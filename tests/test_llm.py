"""LLM foundation: loading, streaming quantization, perplexity, on tiny random models of four families."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_models import make_model  # noqa: E402

from qkit import affine, pipeline  # noqa: E402
from qkit.affine import AffineConfig  # noqa: E402
from qkit.errors import FormatError, UsageError  # noqa: E402
from qkit.eval.perplexity import perplexity  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.rtn import RTN  # noqa: E402

KINDS = ["llama", "qwen2", "gemma3", "gpt2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: (root / k, make_model(k, root / k)) for k in KINDS}


def rtn_reference(model, cfg: affine.AffineConfig):
    """Apply RTN to every linear of an in-memory model directly (no streaming, no files)."""
    import copy

    m = copy.deepcopy(model)
    prefix, layers = pipeline.decoder_layers(m, m.config)
    for layer in layers:
        for _, mod, transposed in pipeline.linear_modules(layer):
            W = mod.weight.detach().numpy()
            W = W.T if transposed else W
            q = affine.quantize_affine(np.ascontiguousarray(W), cfg.bits, cfg.block_size(W.shape),
                                       symmetric=cfg.symmetric, zero_domain=cfg.zero_domain).dequantize()
            mod.weight.data = torch.from_numpy(np.ascontiguousarray(q.T if transposed else q))
    return m


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def files_digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
def test_load_matches_transformers(models, kind):
    d, model = models[kind]
    x = torch.randint(0, 300, (2, 24))
    assert torch.equal(logits(loader.load_model(loader.resolve(str(d))), x), logits(model, x))


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_rtn_equals_in_memory_rtn(models, kind, tmp_path):
    d, model = models[kind]
    before = files_digest(d)
    cfg = affine.AffineConfig(bits=3, group_size=32)
    s = pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "out", RTN(cfg))
    assert files_digest(d) == before  # the input is never modified
    q = loader.load_model(loader.resolve(str(tmp_path / "out")))
    x = torch.randint(0, 300, (2, 24))
    torch.testing.assert_close(logits(q, x), logits(rtn_reference(model, cfg), x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(q, x), logits(model, x), atol=1e-3)  # 3 bits really changed it
    n_lin = {"gpt2": 4}.get(kind, 7) * 2
    assert s.linears == n_lin and s.layers == 2
    # 3-bit codes + fp16 scale + 3-bit zero per group of 32 (the last group of 96-wide rows is full)
    assert 3 + 19 / 32 - 0.01 < s.bits_per_weight < 3 + 19 / 32 + 0.1
    rec = json.loads((tmp_path / "out" / "qkit_quantization.json").read_text())
    assert rec["method"] == "rtn"


def test_float_zero_reproduces_a_grid_exactly(models, tmp_path):
    """Quantizing an already-quantized model onto the same grid changes nothing (KL 0): the pipeline is lossless."""
    d, model = models["llama"]
    cfg = affine.AffineConfig(bits=4, group_size=32, zero_domain="float")
    pipeline.quantize_model(loader.resolve(str(d)), tmp_path / "a", RTN(cfg))
    pipeline.quantize_model(loader.resolve(str(tmp_path / "a")), tmp_path / "b", RTN(cfg))
    a = loader.load_model(loader.resolve(str(tmp_path / "a")))
    b = loader.load_model(loader.resolve(str(tmp_path / "b")))
    ids = torch.randint(0, 300, (4 * 32,))
    r = perplexity(b, ids, 32, base=a)
    assert abs(r.kl) < 1e-6 and r.top1 == 1.0


class Recorder(RTN):
    """A calibrated chooser for the test: RTN that also keeps every input it is shown."""

    name = "recorder"
    needs_calibration = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.inputs = {}

    def add_batch(self, name, x):
        self.inputs.setdefault(name, []).append(x.clone())


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("gemma3", {"num_hidden_layers": 7, "sliding_window": 4})])
def test_sequential_inputs_come_from_quantized_layers(kind, extra, tmp_path):
    """Each layer's calibration inputs equal the quantized model's own activations, layer by layer, with the
    layer's own attention mask and RoPE (Gemma 3 mixes sliding and full attention)."""
    model = make_model(kind, tmp_path / "m", **extra)
    samples = torch.randint(0, 300, (6, 16))
    rec = Recorder(affine.AffineConfig(bits=2, group_size=32))
    pipeline.quantize_model(loader.resolve(str(tmp_path / "m")), tmp_path / "q", rec, samples=samples)
    q = loader.load_model(loader.resolve(str(tmp_path / "q")))
    n = q.config.num_hidden_layers
    with torch.no_grad():
        hs = q(samples, output_hidden_states=True).hidden_states
        for i in range(n):
            want = q.model.layers[i].input_layernorm(hs[i])
            got = torch.cat(rec.inputs[f"model.layers.{i}.self_attn.q_proj"])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # layer 1 really saw layer 0's quantized output, not the float one
        float_hs = model(samples, output_hidden_states=True).hidden_states
        assert not torch.allclose(float_hs[1], hs[1], atol=1e-3)


class FloatRecorder(Recorder):
    """Recorder that also asks for the float model's inputs (as GPTAQ does) and keeps them."""

    needs_float_inputs = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.float_inputs = {}

    def add_batch(self, name, x, x_float):
        super().add_batch(name, x)
        self.float_inputs.setdefault(name, []).append(x_float.clone())


def test_float_inputs_beside_the_quantized_ones_come_from_the_float_model(tmp_path):
    """A chooser with needs_float_inputs (GPTAQ) gets, batch for batch, each linear's input in the float model
    beside its input in the quantized model."""
    model = make_model("llama", tmp_path / "m", num_hidden_layers=3)
    samples = torch.randint(0, 300, (10, 16))  # two batches of 8 and 2
    rec = FloatRecorder(affine.AffineConfig(bits=2, group_size=32))
    pipeline.quantize_model(loader.resolve(str(tmp_path / "m")), tmp_path / "q", rec, samples=samples)
    q = loader.load_model(loader.resolve(str(tmp_path / "q")))
    with torch.no_grad():
        fh = model(samples, output_hidden_states=True).hidden_states
        qh = q(samples, output_hidden_states=True).hidden_states
        for i in range(3):
            name = f"model.layers.{i}.self_attn.q_proj"
            torch.testing.assert_close(torch.cat(rec.float_inputs[name]), model.model.layers[i].input_layernorm(fh[i]),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.cat(rec.inputs[name]), q.model.layers[i].input_layernorm(qh[i]),
                                       rtol=1e-4, atol=1e-5)
            down = f"model.layers.{i}.mlp.down_proj"
            assert len(rec.float_inputs[down]) == len(rec.inputs[down]) == 2
        assert not torch.allclose(torch.cat(rec.float_inputs["model.layers.2.self_attn.q_proj"]),
                                  torch.cat(rec.inputs["model.layers.2.self_attn.q_proj"]), atol=1e-3)


def linear_inputs(model, samples) -> dict:
    """{linear name: its input} in one forward of model, by forward hooks (an independent capture)."""
    got, hooks = {}, []

    def keep(name, x):
        got.setdefault(name, x.clone())  # returns None: the hook leaves the output alone

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            hooks.append(mod.register_forward_hook(lambda m, i, o, _n=name: keep(_n, i[0])))
    with torch.no_grad():
        model(samples)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_linear_groups_follow_the_data_flow(models, kind):
    path, model = models[kind]
    _, layers = pipeline.decoder_layers(model, model.config)
    lins = pipeline.linear_modules(layers[0])
    x = torch.randn(2, 8, model.config.hidden_size)
    _, kws = pipeline.capture_layer_inputs(model, layers, torch.randint(0, 300, (1, 8)))
    groups = pipeline.linear_groups(layers[0], lins, x, kws[0])
    want = {"llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
            "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]}[kind]
    assert groups == want


class SequentialRecorder(Recorder):
    true_sequential = True


class SequentialFloatRecorder(FloatRecorder):
    true_sequential = True


@pytest.mark.parametrize("float_inputs", [False, True])
def test_true_sequential_inputs_are_the_quantized_models_own(tmp_path, float_inputs):
    """--true-sequential: every linear is calibrated on exactly what it sees in the quantized model (o_proj on
    the quantized q/k/v's attention, down_proj on the quantized gate/up), over two batches; without it, o_proj
    sees the float q/k/v's. With float inputs (GPTAQ), each linear's float-model input is the float model's own
    (the float weights swapped back in for the float pass)."""
    model = make_model("llama", tmp_path / "m", num_hidden_layers=3)
    samples = torch.randint(0, 300, (10, 16))  # two batches of 8 and 2
    ref = loader.resolve(str(tmp_path / "m"))
    cfg = affine.AffineConfig(bits=2, group_size=32)
    rec = (SequentialFloatRecorder if float_inputs else SequentialRecorder)(cfg)
    pipeline.quantize_model(ref, tmp_path / "q", rec, samples=samples)
    q = loader.load_model(loader.resolve(str(tmp_path / "q")))
    want = linear_inputs(q, samples)
    assert set(rec.inputs) == set(want)
    for name, x in want.items():
        assert len(rec.inputs[name]) == 2
        torch.testing.assert_close(torch.cat(rec.inputs[name]), x, rtol=1e-4, atol=1e-5)
    if float_inputs:
        fwant = linear_inputs(model, samples)
        for name, x in fwant.items():
            torch.testing.assert_close(torch.cat(rec.float_inputs[name]), x, rtol=1e-4, atol=1e-5)
    # the same model without true-sequential: o_proj's inputs came through the float q/k/v
    plain = Recorder(cfg)
    pipeline.quantize_model(ref, tmp_path / "p", plain, samples=samples)
    o = "model.layers.0.self_attn.o_proj"
    assert not torch.allclose(torch.cat(plain.inputs[o]), linear_inputs(loader.load_model(
        loader.resolve(str(tmp_path / "p"))), samples)[o], atol=1e-4)


def test_true_sequential_refused_with_a_layer_transform(models, tmp_path):
    class Transforming(SequentialRecorder):
        def transform_layer(self, layer, inputs, prefix):
            pass

    path, _ = models["llama"]
    with pytest.raises(UsageError, match="true-sequential"):
        pipeline.quantize_model(loader.resolve(str(path)), tmp_path / "q", Transforming(affine.AffineConfig()),
                                samples=torch.randint(0, 300, (2, 8)))


def test_gptaq_through_the_pipeline_fits_the_float_model_better(tmp_path):
    """End to end on a tiny model: GPTAQ's last-layer output is closer to the float model's than GPTQ's."""
    from qkit.gptq import GPTQ, GPTQConfig

    model = make_model("llama", tmp_path / "m", num_hidden_layers=3)
    samples = torch.randint(0, 300, (16, 32))
    ref = loader.resolve(str(tmp_path / "m"))
    errs = {}
    for gptaq in (False, True):
        out = tmp_path / f"q{gptaq}"
        pipeline.quantize_model(ref, out, GPTQ(GPTQConfig(grid=AffineConfig(bits=2, group_size=32),
                                                          gptaq=gptaq)), samples=samples)
        q = loader.load_model(loader.resolve(str(out)))
        with torch.no_grad():
            want = model(samples, output_hidden_states=True).hidden_states[-1]
            errs[gptaq] = torch.linalg.norm(q(samples, output_hidden_states=True).hidden_states[-1] - want).item()
    assert errs[True] < errs[False], errs


def plain_loop_ppl(model, ids, ctx):
    """Perplexity the plain transformers way: labels = inputs, mean loss per window, weighted."""
    total, n = 0.0, 0
    for w in range(len(ids) // ctx):
        x = ids[w * ctx:(w + 1) * ctx][None]
        with torch.no_grad():
            loss = model(x, labels=x).loss.item()
        total += loss * (ctx - 1)
        n += ctx - 1
    return float(np.exp(total / n))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_perplexity_matches_plain_transformers_loop(models, kind):
    _, model = models[kind]
    ids = torch.randint(0, 300, (5 * 40 + 7,))
    r = perplexity(model, ids, 40)
    assert r.windows == 5 and r.tokens == 5 * 39
    assert abs(r.ppl / plain_loop_ppl(model, ids, 40) - 1) < 1e-4


def test_llamacpp_protocol_scores_second_half(models):
    _, model = models["llama"]
    ids = torch.randint(0, 300, (3 * 40,))
    r = perplexity(model, ids, 40, llamacpp=True)
    assert r.tokens == 3 * 19
    with torch.no_grad():
        nll = 0.0
        for w in range(3):
            x = ids[w * 40:(w + 1) * 40][None]
            lp = torch.log_softmax(model(x).logits[0], -1)
            nll -= sum(lp[t, x[0, t + 1]].item() for t in range(20, 39))
    assert abs(r.ppl / np.exp(nll / 57) - 1) < 1e-5


def test_kl_and_top1_against_an_independent_computation(models, tmp_path):
    """KL(p_base || p_model) per scored token, by torch.nn.functional.kl_div, and argmax agreement."""
    _, base = models["llama"]
    other = make_model("llama", tmp_path / "other", seed=1)
    ids = torch.randint(0, 300, (3 * 32,))
    r = perplexity(other, ids, 32, base=base)
    kl, agree, nb = 0.0, 0, 0.0
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 32:(w + 1) * 32][None]
            lp = torch.log_softmax(other(x).logits[0, :31].double(), -1)
            lb = torch.log_softmax(base(x).logits[0, :31].double(), -1)
            kl += torch.nn.functional.kl_div(lp, lb, log_target=True, reduction="sum").item()
            agree += int((lp.argmax(-1) == lb.argmax(-1)).sum())
            nb -= lb.gather(1, x[0, 1:, None]).sum().item()
    assert abs(r.kl / (kl / 93) - 1) < 1e-4 and r.kl > 0.01
    assert r.top1 == agree / 93
    assert abs(r.base_ppl / np.exp(nb / 93) - 1) < 1e-5


def test_kl_against_itself_is_zero(models):
    _, model = models["qwen2"]
    r = perplexity(model, torch.randint(0, 300, (64,)), 32, base=model)
    assert abs(r.kl) < 1e-7 and r.top1 == 1.0


class TestBadInput:
    def test_text_shorter_than_a_window(self, models):
        with pytest.raises(UsageError, match="fewer than one window of ctx=200"):
            perplexity(models["llama"][1], torch.arange(100), 200)

    def test_ctx_longer_than_the_model_and_mismatched_base(self, models):
        with pytest.raises(UsageError, match="ctx=512 is longer than the model's 256 positions"):
            perplexity(models["gpt2"][1], torch.arange(2000) % 300, 512)
        import copy

        other = copy.deepcopy(models["llama"][1])
        other.config.vocab_size = 301
        with pytest.raises(UsageError, match="vocabulary"):
            perplexity(models["llama"][1], torch.arange(100) % 300, 50, base=other)

    def test_output_directory_safety(self, models, tmp_path):
        d, _ = models["llama"]
        ref = loader.resolve(str(d))
        foreign = tmp_path / "notes"
        foreign.mkdir()
        (foreign / "thesis.txt").write_text("years of work")
        with pytest.raises(UsageError, match="not empty and is not a qkit output"):
            pipeline.quantize_model(ref, foreign, RTN(affine.AffineConfig()))
        assert (foreign / "thesis.txt").read_text() == "years of work"
        with pytest.raises(UsageError, match="refusing to write over the input"):
            pipeline.quantize_model(ref, d.parent, RTN(affine.AffineConfig()))
        with pytest.raises(UsageError, match="is not empty and is not a qkit output"):  # "-o ." = the cwd
            pipeline.quantize_model(ref, tmp_path / ".", RTN(affine.AffineConfig()))
        out = tmp_path / "q"
        pipeline.quantize_model(ref, out, RTN(affine.AffineConfig(group_size=32)))
        pipeline.quantize_model(ref, out, RTN(affine.AffineConfig(bits=3, group_size=32)))  # a qkit output: replaced
        assert json.loads((out / "qkit_quantization.json").read_text())["method"] == "rtn"

    def test_only_config_and_tokenizer_travel_with_the_weights(self, models, tmp_path):
        d, _ = models["llama"]
        src = tmp_path / "src"
        src.mkdir()
        for f in d.iterdir():
            os.link(f, src / f.name)
        (src / "pytorch_model.bin").write_bytes(b"float weights")
        (src / "notes.md").write_text("x")
        pipeline.quantize_model(loader.resolve(str(src)), tmp_path / "q", RTN(affine.AffineConfig(group_size=32)))
        names = {p.name for p in (tmp_path / "q").iterdir()}
        assert "pytorch_model.bin" not in names and "notes.md" not in names and "config.json" in names

    def test_no_decoder_layers(self):
        class NoLayers(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(4, 4)

        class Cfg:
            num_hidden_layers = 2

        with pytest.raises(UsageError, match="no list of 2 decoder layers"):
            pipeline.decoder_layers(NoLayers(), Cfg())

    def test_missing_model(self):
        with pytest.raises(UsageError, match="model not found"):
            loader.resolve("/nonexistent/model")

    def test_truncated_and_corrupt_safetensors(self, models, tmp_path):
        d, _ = models["llama"]
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_bytes((d / "config.json").read_bytes())
        blob = (d / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        with pytest.raises(FormatError, match="lies outside the file"):
            loader.load_model(loader.resolve(str(bad)))
        (bad / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
        with pytest.raises(FormatError, match="corrupt safetensors header"):
            loader.load_model(loader.resolve(str(bad)))
        (bad / "model.safetensors").write_bytes(b"abc")
        with pytest.raises(FormatError, match="not a safetensors file"):
            loader.load_model(loader.resolve(str(bad)))

    def test_config_that_does_not_match_the_weights(self, models, tmp_path):
        d, _ = models["llama"]
        bad = tmp_path / "mismatch"
        bad.mkdir()
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 128
        (bad / "config.json").write_text(json.dumps(cfg))
        os.link(d / "model.safetensors", bad / "model.safetensors")
        with pytest.raises(FormatError, match=r"has shape \(96, 64\) in the checkpoint but \(128, 64\)"):
            loader.load_model(loader.resolve(str(bad)))
        cfg["intermediate_size"] = 96
        cfg["num_hidden_layers"] = 3
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(FormatError, match="no tensor 'model.layers.2"):
            pipeline.quantize_model(loader.resolve(str(bad)), tmp_path / "o", RTN(affine.AffineConfig()))
        assert not (tmp_path / "o").exists()  # a failed run leaves no output behind
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []

    def test_nan_weights(self, models, tmp_path):
        from safetensors.torch import load_file, save_file

        d, _ = models["llama"]
        bad = tmp_path / "nan"
        bad.mkdir()
        (bad / "config.json").write_bytes((d / "config.json").read_bytes())
        t = load_file(str(d / "model.safetensors"))
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        save_file(t, str(bad / "model.safetensors"))
        with pytest.raises(FormatError, match=r"'model.layers.1.mlp.up_proj.weight' holds NaN or Inf"):
            pipeline.quantize_model(loader.resolve(str(bad)), tmp_path / "o", RTN(affine.AffineConfig()))

    def test_single_safetensors_file_needs_config_beside_it(self, models, tmp_path):
        d, model = models["llama"]
        lone = tmp_path / "lone"
        lone.mkdir()
        os.link(d / "model.safetensors", lone / "weights.safetensors")
        with pytest.raises(UsageError, match="needs config.json beside it"):
            loader.resolve(str(lone / "weights.safetensors"))
        (lone / "config.json").write_bytes((d / "config.json").read_bytes())
        m = loader.load_model(loader.resolve(str(lone / "weights.safetensors")))
        x = torch.randint(0, 300, (1, 9))
        assert torch.equal(logits(m, x), logits(model, x))

    def test_refuses_to_write_over_input(self, models):
        d, _ = models["llama"]
        with pytest.raises(UsageError, match="refusing to write over the input"):
            pipeline.quantize_model(loader.resolve(str(d)), d, RTN(affine.AffineConfig()))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-P", "-m", "qkit.cli.main", *args], capture_output=True, text=True, env=env)


def test_cli_quantize_then_eval(models, tmp_path):
    d, _ = models["gpt2"]
    text = tmp_path / "t.txt"
    text.write_text("irrelevant: the tiny model has no tokenizer")
    out = tmp_path / "q"
    r = run_cli("quantize", str(d), "-o", str(out), "--bits", "4", "--group-size", "32", "--json",
                str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and json.loads((tmp_path / "s.json").read_text())["layers"] == 2
    r = run_cli("quantize", str(d), "-o", str(tmp_path / "x"), "--method", "magic")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("qkit: error: unknown method 'magic'")
    r = run_cli("eval", "ppl", str(out), "--text", str(text))
    assert r.returncode == 1 and "cannot load a tokenizer" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("quantize", "/no/such/model", "-o", str(tmp_path / "y"))
    assert r.returncode == 2 and "model not found" in r.stderr


@pytest.mark.slow
def test_quantization_streams_layer_by_layer(tmp_path):
    """Peak RSS of an 8-layer model exceeds a 2-layer one by less than one layer + 100 MB (layers of 64 MB)."""
    from qkit.eval import bench_stream

    res = bench_stream.run(1024, 4096, [2, 8], workdir=str(tmp_path))
    assert res["layer_mb"] >= 64
    assert res["growth_mb"] < res["limit_mb"], res
