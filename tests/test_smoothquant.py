"""SmoothQuant and W8A8: the paper's migration formula, folds that keep the float model, per-token dynamic int8
activations equal to compressed-tensors' own, and W8A8 checkpoints that `qkit eval ppl` runs with those activations."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llm_models import make_model  # noqa: E402
from test_awq import FloatOut, randomise_norms  # noqa: E402

from qkit import actquant, affine, pipeline  # noqa: E402
from qkit.errors import FormatError  # noqa: E402
from qkit.eval.perplexity import perplexity  # noqa: E402
from qkit.model import loader  # noqa: E402
from qkit.rtn import RTN  # noqa: E402
from qkit.smoothquant import SmoothQuant, SmoothQuantConfig, smooth_scales, weight_max  # noqa: E402


@pytest.fixture(autouse=True)
def _small_runs(monkeypatch):
    """Tiny models: no heap trim, one torch thread (see test_awq)."""
    monkeypatch.setattr(pipeline, "trim_heap", lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SAMPLES = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))


def test_scales_are_the_papers_formula_and_balance_the_maxima():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 16)) * np.exp(rng.normal(size=16) * 2)
    Ws = [rng.normal(size=(8, 16)), rng.normal(size=(4, 16)) * 3]
    a_max = np.abs(X).max(0)
    w_max = np.max([np.abs(W).max(0) for W in Ws], axis=0)
    for alpha in (0.5, 0.8):
        s = smooth_scales(torch.from_numpy(a_max), weight_max([torch.from_numpy(W) for W in Ws]), alpha).numpy()
        assert np.allclose(s, a_max ** alpha / w_max ** (1 - alpha))
    s = smooth_scales(torch.from_numpy(a_max), torch.from_numpy(w_max), 0.5).numpy()
    # at alpha 0.5 the smoothed activations and weights share each channel's maximum: sqrt(max|X| max|W|)
    assert np.allclose(np.abs(X / s).max(0), np.abs(np.concatenate(Ws) * s).max(0))


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("qwen2", {}), ("gemma3", {})])
def test_smoothing_leaves_logits_unchanged(kind, overrides, tmp_path):
    model = make_model(kind, tmp_path / "m", **overrides)
    randomise_norms(model, tmp_path / "m")
    ch = SmoothQuant(SmoothQuantConfig(alpha=0.7))
    pipeline.quantize_model(loader.resolve(str(tmp_path / "m")), tmp_path / "f", FloatOut(ch), samples=SAMPLES)
    folded = loader.load_model(loader.resolve(str(tmp_path / "f")))
    with torch.no_grad():
        ref, got = model(IDS).logits, folded(IDS).logits
    assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), float((got - ref).abs().max())
    sd, sd0 = folded.state_dict(), model.state_dict()
    changed = {n for n in sd if not torch.equal(sd[n], sd0[n])}
    mlp_norm = "pre_feedforward_layernorm" if kind == "gemma3" else "post_attention_layernorm"
    assert {f"model.layers.1.input_layernorm.weight", f"model.layers.1.{mlp_norm}.weight"} <= changed
    assert not any("o_proj" in n or "down_proj" in n or "post_feedforward" in n for n in changed)


def test_per_token_activations_equal_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors", minversion="0.18")  # noqa: F841
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    x = torch.randn(3, 17, 40) * torch.exp(torch.randn(40) * 2)
    x[0, 3] = 0  # an all-zero token
    args = QuantizationArgs.model_validate(actquant.ActivationScheme(8).config())
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    ref = fake_quantize(x, scale, zp, args)
    assert torch.equal(actquant.quantize_per_token(x, 8), ref)
    assert torch.equal(actquant.quantize_per_token(x, 8)[0, 3], torch.zeros(40))


def test_unsupported_activation_schemes_are_refused():
    for bad in ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False},
                {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}, [8]):
        with pytest.raises(FormatError, match="input_activations"):
            actquant.ActivationScheme.from_config(bad)
    assert actquant.ActivationScheme.from_config(None) is None


def outlier_model(directory):
    """A tiny Llama whose hidden states carry two channels 30x larger than the rest (as LLM activations do)."""
    model = make_model("llama", directory)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :2] *= 30
    model.save_pretrained(str(directory))
    return model


def test_w8a8_checkpoint_runs_with_quantized_activations(tmp_path):
    """The int-quantized export, loaded by qkit, runs every quantized linear on per-token int8 inputs: its perplexity
    equals the in-memory W8 model with compressed-tensors' own activation fake-quantization hooked in by hand."""
    from test_export import Recording, in_memory_model

    model = outlier_model(tmp_path / "m")
    ch = Recording(SmoothQuant(SmoothQuantConfig()))
    ch.prepare = ch.inner.prepare
    ch.transform_layer = ch.inner.transform_layer
    pipeline.quantize_model(loader.resolve(str(tmp_path / "m")), tmp_path / "q", ch, samples=SAMPLES,
                            fmt="compressed-tensors", act_bits=8)
    q = loader.load_model(loader.resolve(str(tmp_path / "q")))
    ids = torch.randint(0, 300, (3 * 32,), generator=torch.Generator().manual_seed(3))
    got = perplexity(q, ids, 32)
    assert got.activations == "int8 per-token dynamic"

    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    args = QuantizationArgs.model_validate(
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
        ["input_activations"])
    ref_model = in_memory_model(q, ch.results)  # weights: the chooser's; norms: folded (from the checkpoint)
    for h in list(ref_model.modules()):
        h._forward_pre_hooks.clear()

    def ct_hook(m, a):
        scale, zp = compute_dynamic_scales_and_zp(a[0], args, module=m)
        return (fake_quantize(a[0], scale, zp, args),)

    for name in ch.results:
        ref_model.get_submodule(name).register_forward_pre_hook(ct_hook)
    ref = perplexity(ref_model, ids, 32)
    assert abs(got.ppl / ref.ppl - 1) < 1e-6
    for h in list(ref_model.modules()):
        h._forward_pre_hooks.clear()
    assert abs(perplexity(ref_model, ids, 32).ppl / got.ppl - 1) > 1e-4  # the activations do change the result


def test_smoothquant_beats_naive_w8a8_with_outlier_channels(tmp_path):
    model = outlier_model(tmp_path / "m")
    ref = loader.resolve(str(tmp_path / "m"))
    naive = RTN(affine.AffineConfig(bits=8, group_size=None, symmetric=True, scale_dtype="float16"))
    pipeline.quantize_model(ref, tmp_path / "naive", naive, fmt="compressed-tensors", act_bits=8)
    pipeline.quantize_model(ref, tmp_path / "sq", SmoothQuant(SmoothQuantConfig()), samples=SAMPLES,
                            fmt="compressed-tensors", act_bits=8)

    def err(d):
        with torch.no_grad():
            return float((loader.load_model(loader.resolve(str(d)))(IDS).logits - model(IDS).logits).pow(2).mean())

    assert err(tmp_path / "sq") < 0.5 * err(tmp_path / "naive")


def test_cli_smoothquant_defaults_and_refusals(tmp_path, capsys):
    from test_export import char_tokenizer, run_cli

    make_model("llama", tmp_path / "m")
    char_tokenizer(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8)
    r = run_cli(capsys, "quantize", str(tmp_path / "m"), "--method", "smoothquant", "--calib", str(text),
                "--nsamples", "4", "--seqlen", "32", "-o", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    assert "W8A8 g-1 sym alpha 0.5" in r.stdout
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "int-quantized"
    r = run_cli(capsys, "eval", "ppl", str(tmp_path / "q"), "--text", str(text), "--ctx", "64", "--runtime", "torch")
    assert r.returncode == 0 and "activations int8 per-token dynamic" in r.stdout, r.stderr
    r = run_cli(capsys, "eval", "ppl", str(tmp_path / "q"), "--text", str(text), "--ctx", "64")
    assert r.returncode == 0 and "activations int8 per block of 32 (qkit's A8 kernels" in r.stdout, r.stderr
    for args, msg in ((["--method", "rtn", "--act-bits", "8", "--format", "safetensors"],
                       "activation quantization (--act-bits, smoothquant) is written as compressed-tensors "
                       "int-quantized; drop --format safetensors"),
                      (["--method", "rtn", "--alpha", "0.3"], "--alpha does not apply to --method rtn"),
                      (["--method", "gptq", "--act-bits", "8"], "--act-bits does not apply to --method gptq")):
        r = run_cli(capsys, "quantize", str(tmp_path / "m"), *args, "-o", str(tmp_path / "x"))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"qkit: error: {msg}"], r.stderr
