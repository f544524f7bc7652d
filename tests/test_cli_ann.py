"""`qkit ann build / search / bench`: files in, index and JSON out, one-line errors for bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qkit.ann import Index
from qkit.cli.main import main
from qkit.eval import datasets

from test_ann import brute_force, clustered


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ann")
    x = clustered(3000, 24, seed=21)
    rng = np.random.default_rng(22)
    q = (x[rng.integers(0, len(x), 50)] + 0.3 * rng.normal(size=(50, 24))).astype(np.float32)
    np.save(d / "x.npy", x)
    datasets.write_fvecs(d / "q.fvecs", q)
    gt = brute_force(x, q, 20, "l2")
    np.save(d / "gt.npy", gt)
    datasets.write_ivecs(d / "gt.ivecs", gt.astype(np.int32))
    return d


def _err_lines(capsys):
    err = capsys.readouterr().err
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("build", "\r"))]


def test_build_then_search_with_gt_json_and_results(files, capsys):
    idx = files / "x.qkit"
    assert main(["ann", "build", str(files / "x.npy"), "--codec", "sq8", "--M", "12", "--ef-construction", "80",
                 "--threads", "2", "-o", str(idx), "--json", str(files / "build.json")]) == 0
    b = json.loads((files / "build.json").read_text())
    assert b["n"] == 3000 and b["codec"] == "sq8" and b["index_bytes_on_disk"] > 0 and b["build_s"] > 0
    assert b["store"] == "float"
    assert Index.load(idx).ntotal == 3000
    for gt in ("gt.npy", "gt.ivecs"):
        out = files / "res.npz"
        assert main(["ann", "search", str(idx), str(files / "q.fvecs"), "-k", "10", "--ef", "64", "--rerank", "32",
                     "--gt", str(files / gt), "-o", str(out), "--json", str(files / "s.json")]) == 0
        s = json.loads((files / "s.json").read_text())
        for key in ("qps", "recall_at_k", "k", "ef", "rerank", "index_bytes_in_ram", "index_bytes_on_disk"):
            assert key in s
        assert s["recall_at_k"] >= 0.95 and s["k"] == 10 and s["rerank"] == 32 and s["qps"] > 0
        # the re-rank store is read by search, so it is counted
        assert s["index_bytes_in_ram"] >= 3000 * 24 * 4
        r = np.load(out)
        assert r["I"].shape == (50, 10) and r["D"].dtype == np.float32
    assert "recall@10" in capsys.readouterr().out
    assert main(["ann", "search", str(idx), str(files / "q.fvecs"), "-k", "5", "-o", str(files / "ids.npy")]) == 0
    assert np.load(files / "ids.npy").shape == (50, 5)


def test_build_tq4_reordered_and_search(files, capsys):
    """A TurboQuant codec in the graph, nodes renumbered after the build: same recall as brute force says."""
    idx = files / "tq.qkit"
    assert main(["ann", "build", str(files / "x.npy"), "--codec", "tq4", "--reorder", "bfs", "--ef-construction",
                 "80", "-o", str(idx), "--json", str(files / "tq.json")]) == 0
    assert json.loads((files / "tq.json").read_text())["reorder"] == "bfs"
    assert main(["ann", "search", str(idx), str(files / "q.fvecs"), "-k", "10", "--ef", "64", "--rerank", "32",
                 "--gt", str(files / "gt.npy"), "--json", str(files / "tqs.json")]) == 0
    assert json.loads((files / "tqs.json").read_text())["recall_at_k"] >= 0.95


@pytest.mark.parametrize("args,code,msg", [
    (["build", "{d}/missing.npy", "-o", "{d}/m.qkit"], 1, "no such file"),
    (["build", "{d}/x.npy", "--codec", "pq", "-o", "{d}/m.qkit"], 2, "unknown codec 'pq'"),
    (["build", "{d}/x.npy", "-o", "{d}/nodir/m.qkit"], 2, "does not exist"),
    (["build", "{d}/x.npy", "-o", "{d}"], 2, "is a directory"),
    (["search", "{d}/none.qkit", "{d}/q.fvecs"], 1, "no such index"),
    (["search", "{d}/x.npy", "{d}/q.fvecs"], 1, "not a qkit index"),
    (["search", "{d}/y.qkit", "{d}/q8.npy"], 1, "dimensions"),
    (["search", "{d}/y.qkit", "{d}/q.fvecs", "-k", "5000"], 2, "larger than the index"),
    (["search", "{d}/y.qkit", "{d}/qnan.npy"], 1, "NaN"),
    (["search", "{d}/y.qkit", "{d}/q.fvecs", "-k", "30", "--gt", "{d}/gt.npy"], 1, "fewer than k=30"),
    (["search", "{d}/y.qkit", "{d}/q.fvecs", "--gt", "{d}/x.npy"], 1, "integer ids"),
    (["search", "{d}/trunc.qkit", "{d}/q.fvecs"], 1, "truncated|checksum"),
    (["search", "{d}/y.qkit", "{d}/q.fvecs", "-o", "{d}/r.txt"], 2, ".npy"),
    (["build", "{d}/x.npy", "-o", "{d}/x.npy"], 2, "overwrite the input"),
    (["search", "{d}/y.qkit", "{d}/q8.npy", "-o", "{d}/q8.npy"], 2, "overwrite an input"),
    (["search", "{d}/y.qkit", "{d}/q.fvecs", "--json", "{d}"], 2, "is a directory"),
])
def test_bad_input_is_one_line(files, capsys, args, code, msg):
    d = files
    if not (d / "y.qkit").exists():
        assert main(["ann", "build", str(d / "x.npy"), "--codec", "flat", "--ef-construction", "40",
                     "-o", str(d / "y.qkit")]) == 0
        np.save(d / "q8.npy", np.zeros((3, 8), np.float32))
        qn = np.zeros((3, 24), np.float32)
        qn[1, 2] = np.nan
        np.save(d / "qnan.npy", qn)
        raw = (d / "y.qkit").read_bytes()
        (d / "trunc.qkit").write_bytes(raw[: len(raw) - 1000])
        capsys.readouterr()
    rc = main(["ann"] + [a.format(d=d) for a in args])
    lines = _err_lines(capsys)
    assert rc == code, lines
    assert len(lines) == 1 and lines[0].startswith("qkit: error:"), lines
    import re

    assert re.search(msg, lines[0]), lines


def test_bench_help_and_bad_dataset(capsys):
    assert main(["ann", "bench", "--help"]) == 0
    assert "hnswlib" in capsys.readouterr().out
    assert main(["ann", "bench", "sift-1m"]) == 2


@pytest.mark.data
@pytest.mark.slow
def test_fashion_mnist_end_to_end(tmp_path, capsys):
    """The issue's workflow on real data: build sq4 with 2 threads, search the held-out queries by name."""
    idx = tmp_path / "fm.qkit"
    assert main(["ann", "build", "fashion-mnist", "--codec", "sq4", "--threads", "2", "-o", str(idx)]) == 0
    assert main(["ann", "search", str(idx), "fashion-mnist", "-k", "10", "--ef", "64", "--rerank", "32",
                 "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n_queries"] == 10_000 and s["recall_at_k"] >= 0.97
    # 4-bit codes + norm (396 B), the pixels' own bytes as the exact re-rank store (784 B), links (~140 B)
    assert s["store"] == "u8"
    assert 1100 * 60_000 < s["index_bytes_in_ram"] < 1600 * 60_000
