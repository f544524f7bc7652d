"""qkit.recipe: the one value behind `qkit quantize` (defaults, refusals, what a checkpoint records, --recipe)."""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import torch

from qkit import pipeline
from qkit.affine import AffineConfig
from qkit.errors import UsageError
from qkit.gptq import CLI_DEFAULTS, GPTQConfig
from qkit.model import loader
from qkit.recipe import Calibration, GGUFMix, Recipe, load_recipe
from tests.llm_models import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.test_export import char_tokenizer

    root = tmp_path_factory.mktemp("recipe")
    make_model("llama", root / "m")
    char_tokenizer(root / "m")
    (root / "calib.txt").write_text("Whether 'tis nobler in the mind to suffer the slings and arrows. " * 30)
    return root / "m", root / "calib.txt"


def run_cli(capsys, *args):
    from qkit.cli.main import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


# ------------------------------------------------------------------ defaults and refusals, before any model is read
def test_gptq_defaults_are_the_measured_ones():
    r = Recipe.from_options(method="gptq")
    c = r.config
    assert (c.act_order, c.gptaq, c.gptaq_alpha, c.true_sequential) == (
        CLI_DEFAULTS["act_order"], CLI_DEFAULTS["gptaq"], CLI_DEFAULTS["gptaq_alpha"], CLI_DEFAULTS["true_sequential"])
    assert r.calibration == Calibration(None, CLI_DEFAULTS["nsamples"], 512, 0)
    # packed GPTQ (v1) by default: scales fp16 and zeros >= 1, as the format stores them
    assert r.format == "gptq" and c.grid is r.grid
    assert r.grid == AffineConfig(bits=4, group_size=128, scale_dtype="float16", min_zero=1)
    # every flag overrides its own default; the GGUF path keeps its measured settings
    p = Recipe.from_options(method="gptq", act_order=False, gptaq=False, true_sequential=False, nsamples=128)
    assert not (p.config.act_order or p.config.gptaq or p.config.true_sequential) and p.calibration.nsamples == 128
    g = Recipe.from_options(method="gptq", type="q4_k_m")
    assert g.format == "gguf" and g.grid == GGUFMix("Q4_K_M") and g.config.act_order and not g.config.gptaq
    assert g.calibration.nsamples == 128


def test_smoothquant_and_awq_defaults():
    s = Recipe.from_options(method="smoothquant")
    assert (s.grid.bits, s.grid.group_size, s.grid.symmetric, s.act_bits, s.format) == (8, None, True, 8,
                                                                                       "compressed-tensors")
    a = Recipe.from_options(method="awq")
    assert a.config.clip and a.grid.method == "minmax" and a.rounding is None  # AWQ's own clip search
    ag = Recipe.from_options(method="awq", rounding="gptq", act_order=True, clip_search=True, format="gptq_v2")
    assert not ag.config.clip and ag.rounding.act_order and ag.rounding.grid.method == "mse"
    spec = ag.chooser().export_spec("gptq_v2")  # AWQ states its rounding's spec
    assert (spec.act_order, spec.damp, spec.method) == (True, 0.01, "awq")


def test_default_act_order_into_awq_gemm_switches_to_static_groups_with_a_note():
    r = Recipe.from_options(method="gptq", format="awq")
    assert r.config.act_order and r.config.static_groups and any("static groups" in n for n in r.notes)
    with pytest.raises(UsageError, match="AWQ GEMM has no g_idx"):
        Recipe.from_options(method="gptq", act_order=True, format="awq")


@pytest.mark.parametrize("opts,msg", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": "rtn", "alpha": 0.3}, "--alpha does not apply to --method rtn"),
    ({"method": "awq", "gptaq": True}, "--gptaq applies to --method gptq"),
    ({"method": "gptq", "gptaq": False, "gptaq_alpha": 0.5}, "--gptaq-alpha applies with --gptaq"),
    ({"method": "rtn", "act_order": True}, "--act-order and --static-groups apply"),
    ({"method": "rtn", "format": "parquet"}, "unknown format 'parquet'"),
    ({"method": "rtn", "group_size": 0}, "--group-size must be a positive number"),
    ({"method": "rtn", "rotate_seed": 3}, "--rotate-seed applies only with --rotate"),
    ({"method": "rtn", "type": "Q4_K_M", "bits": 3}, "--bits do not apply to --type"),
    ({"method": "rtn", "type": "Q4_K_M", "sym": False}, "--asym do not apply to --type"),
    ({"method": "smoothquant", "type": "Q4_K_M"}, "smoothquant) is written as compressed-tensors"),
    ({"method": "rtn", "type": "Q9_Z"}, "unknown GGML mix 'Q9_Z'"),
    ({"method": "rtn", "imatrix": "x.gguf"}, "--type and --imatrix write GGUF"),
    ({"method": "rtn", "bits": 3, "format": "awq"}, "AWQ GEMM checkpoints hold 4-bit codes only"),
    ({"method": "rtn", "rotate": True, "online_hadamard": True, "format": "gptq"}, "online Hadamard"),
    ({"method": "rtn", "colour": "red"}, "unknown quantize option"),
])
def test_refusals_are_usage_errors(opts, msg):
    with pytest.raises(UsageError, match=re.escape(msg)):
        Recipe.from_options(output="out", **opts)


# ------------------------------------------------------------------ the record and its reading back
@pytest.mark.parametrize("opts", [
    {"method": "rtn"}, {"method": "rtn", "format": "gptq", "bits": 3, "sym": True},
    {"method": "gptq", "format": "awq"}, {"method": "gptq", "rotate": True, "rotate_seed": 5, "online_hadamard": True},
    {"method": "awq", "rounding": "gptq", "act_order": True, "format": "gptq_v2", "calib": "x.txt", "seed": 3},
    {"method": "smoothquant", "alpha": 0.7}, {"method": "gptq", "type": "Q3_K_M", "imatrix": "im.gguf"},
    {"method": "awq", "type": "Q4_K_M", "n_grid": 4},
])
def test_as_dict_is_json_and_reads_back_equal(opts, tmp_path):
    r = Recipe.from_options(output="out", **opts)
    d = json.loads(json.dumps(r.as_dict()))
    assert Recipe.from_dict(d) == r
    (tmp_path / "r.json").write_text(json.dumps({"method": "x", "recipe": d}))  # as a checkpoint's record holds it
    assert load_recipe(tmp_path / "r.json") == r


def test_from_dict_checks_what_it_reads():
    d = Recipe.from_options(method="gptq").as_dict()
    with pytest.raises(UsageError, match="version"):
        Recipe.from_dict({**d, "version": 99})
    with pytest.raises(UsageError, match="grid differs"):
        Recipe.from_dict({**d, "config": {**d["config"], "grid": {**d["config"]["grid"], "bits": 3}}})
    with pytest.raises(UsageError, match="malformed"):
        Recipe.from_dict({**d, "config": {**d["config"], "act_ordr": True}})
    with pytest.raises(UsageError, match="needs calibration"):
        Recipe.from_dict({**d, "calibration": None})
    with pytest.raises(UsageError, match="takes a GPTQConfig"):
        Recipe("gptq", AffineConfig(), None, calibration=Calibration()).validate()
    assert Recipe("gptq", AffineConfig(), GPTQConfig(), calibration=Calibration()).validate().method == "gptq"


@pytest.mark.parametrize("args", [["--method", "rtn", "--format", "gptq_v2", "--bits", "3"],
                                  ["--method", "gptq", "--nsamples", "3", "--seqlen", "24", "--no-true-sequential"]])
def test_a_checkpoint_records_its_recipe_and_recipe_repeats_it(tiny, tmp_path, capsys, args):
    m, calib = tiny
    extra = ["--calib", str(calib)] if "gptq" in args else []
    r = run_cli(capsys, "quantize", str(m), *args, *extra, "--group-size", "32", "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "a" / pipeline.RECORD).read_text())
    recipe = Recipe.from_dict(rec["recipe"])
    assert (recipe.method, recipe.grid.group_size) == (args[1], 32)
    assert recipe.calibration is None or (recipe.calibration.nsamples, recipe.calibration.text) == (3, str(calib))
    assert rec["bits"] == recipe.grid.bits  # the flat fields earlier checkpoints carry stay
    r = run_cli(capsys, "quantize", str(m), "--recipe", str(tmp_path / "a"), "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    a, b = loader.resolve(str(tmp_path / "a")).store(), loader.resolve(str(tmp_path / "b")).store()
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.keys())
    assert json.loads((tmp_path / "b" / pipeline.RECORD).read_text())["recipe"] == rec["recipe"]


def test_recipe_with_other_options_or_a_bad_file_is_one_line(tiny, tmp_path, capsys):
    m, _ = tiny
    (tmp_path / "bad.json").write_text("{not json")
    for args, msg in ((["--recipe", str(tmp_path / "bad.json")], "not a JSON recipe"),
                      (["--recipe", str(tmp_path / "none.json")], "recipe file not found"),
                      (["--recipe", str(tmp_path / "bad.json"), "--bits", "3"], "--recipe gives every quantization "
                                                                                  "option; drop --bits")):
        r = run_cli(capsys, "quantize", str(m), *args, "-o", str(tmp_path / "o"))
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and msg in err[0], err
        assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the shared walk and mergeable statistics
def test_imatrix_of_two_slices_merges_into_the_whole(tiny):
    from qkit import imatrix

    m, _ = tiny
    ref = loader.resolve(str(m))
    samples = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(2))
    whole = imatrix.collect(ref, samples)
    merged = imatrix.merge(imatrix.collect(ref, samples[:2]), imatrix.collect(ref, samples[2:]))
    assert sorted(whole) == sorted(merged) and len(whole) == 14
    for k, (s2, n) in whole.items():
        assert merged[k][1] == n == 6 * 16
        assert np.allclose(merged[k][0], s2, rtol=1e-5), k


def test_hessians_of_two_slices_merge_into_the_whole():
    from qkit.gptq import hessian_update, merge_hessians

    X = torch.randn(500, 24, generator=torch.Generator().manual_seed(0))
    H, n = hessian_update(None, 0, X)
    a = hessian_update(None, 0, X[:123])
    b = hessian_update(*hessian_update(None, 0, X[123:300]), X[300:])
    Hm, nm = merge_hessians([a, b])
    assert nm == n == 500 and torch.allclose(Hm, H, rtol=1e-5, atol=1e-6)


def test_layer_walk_propagates_through_the_layer_as_left_and_releases_it(tiny):
    m, _ = tiny
    ref = loader.resolve(str(m))
    config = loader.load_config(ref)
    model = loader.empty_model(config)
    prefix, layers = pipeline.decoder_layers(model, config)
    store = ref.store()
    tied = loader.tied_names(model)
    outer = [n for n in loader.persistent_names(model) if n not in tied and not n.startswith(prefix)]
    loader.place(model, outer, store)
    states, kws = pipeline.capture_layer_inputs(model, layers, torch.randint(0, 300, (2, 8)))
    seen, calls = [], []
    walk = pipeline.LayerWalk(layers, prefix, store, states, kws)
    for step in walk:
        assert step.prefix == f"{prefix}{step.index}." and step.layer.self_attn.q_proj.weight.device.type == "cpu"
        if step.index == 0:
            expect = pipeline.run_layer(step.layer, step.states, step.kw)
        step.hooks.append(step.layer.register_forward_hook(lambda *a: calls.append(1)))
        seen.append(step.layer)
        if step.index == 0:
            step.next_states = expect * 0 + 1  # the caller's own next inputs replace the walk's forward
    assert all(lay.self_attn.q_proj.weight.device.type == "meta" for lay in seen)  # released
    assert len(calls) == 1  # only layer 1 ran the walk's forward; its hook is gone after it
    assert walk.states.shape == states.shape


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_gguf_the_writer_would_refuse_is_refused_before_calibration(tiny, tmp_path, capsys, monkeypatch, method):
    """The tiny model's character-level (WordLevel) tokenizer has no GGUF form: said in one line before the
    calibration text is read, not after every layer is quantized."""
    from qkit import recipe

    m, calib = tiny
    loaded = []
    real = recipe.Calibration.load
    monkeypatch.setattr(recipe.Calibration, "load", lambda self, tok: loaded.append(1) or real(self, tok))
    r = run_cli(capsys, "quantize", str(m), "--method", method, "--type", "Q8_0", "--calib", str(calib),
                "--nsamples", "2", "--seqlen", "16", "-o", str(tmp_path / "x.gguf"))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "is not written to GGUF yet" in err[0], err
    assert not loaded and not (tmp_path / "x.gguf").exists()
