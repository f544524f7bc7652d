"""The evaluation report: the benchmarks' results as Markdown tables and PNG plots, in one directory.

    qkit eval report [--full] -o DIR [--sections weights,vectors,kernels] [--datasets fashion-mnist,glove-50]
                     [--quant-json P] [--heldout-json P] [--ann-json P ...] [--codecs-json P] [--kernels-json P]
                     [--bandwidth-json P]

Every number comes from a benchmark module, run here or read from its JSON;
nothing is measured twice:

- weights: ``bench_quant`` (ppl, KL and top-1 against the base, quantization
  time, peak RSS, bits per weight per row) and ``bench_heldout`` (every
  calibrated method's perplexity on three held-out texts of different domains,
  and the share of the data-free row's gap it closes on each);
- vectors: ``bench_ann`` (HNSW recall@10 vs QPS vs bytes, qkit against hnswlib
  and faiss in one run) and ``bench_codecs`` (every codec by brute force);
- kernels: ``bench_kernels`` (GB/s per kernel and backend) against
  ``bandwidth`` (one core's streaming copy and read).

Quick (the default) runs small configurations (QUICK_ARGS): the default model
on 4 evaluation windows with RTN and a small-calibration GPTQ, dataset subsets,
small kernel buffers; minutes, not hours. Full (``--full``) runs the modules'
own defaults and resumes: bench_quant keeps its per-row cache, and each
finished full section is kept as JSON under CACHE/report/. A section whose
JSON is given is read from it instead of run.

DIR receives report.md, the PNGs, data/*.json (the exact inputs of every
table, so the report can be checked against them) and report.json (date,
machine, mode, sources), built in a temporary directory and renamed into place.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
from pathlib import Path

from qkit.errors import InputError, UsageError

SECTIONS = ("weights", "vectors", "kernels")
HERE = Path(__file__).resolve().parent
COMMITTED = HERE / "report"  # the committed full report the README shows (a source checkout only)

# Quick configurations: each finishes in seconds to a few minutes on 2 cores.
QUICK_ARGS = {
    "quant": ["--rows", "base", "rtn-w4g128", "rtn-w3g128", "gptq-w3g128", "--windows", "4", "--nsamples", "8",
              "--seqlen", "128"],
    "heldout": ["--rows", "base", "rtn-w4g128", "gptq-ao-w4g128@mix", "--windows", "4", "--nsamples", "8"],
    "ann": {"n_base": 3000, "n_queries": 100, "efs": [16, 32, 64], "reranks": [0, 16], "codecs": ["sq8", "sq4"],
            "M": 16, "ef_construction": 100, "threads": 2, "repeats": 1},
    "codecs": {"n_base": 3000, "n_queries": 100, "qkit": ["sq8", "sq4", "rabitq1", "rabitq4", "tq4"],
               "faiss": ["rabitq1", "rabitq4", "tq4"], "seeds": 1},
    "kernels": ["--rows", "200000", "--repeat", "3", "--many-queries", "16", "--many-rows", "5000",
                "--lowbit-mb", "8"],
    "bandwidth": ["--mb", "64", "--repeat", "3"],
}
# --------------------------------------------------------------------------- reading benchmark JSON

def read_json(path):
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None


def _need(records, keys, path, what):
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path}: expected a non-empty list of {what} records")
    for r in records:
        missing = [k for k in keys if k not in r]
        if missing:
            raise InputError(f"{path}: not {what} output (a record lacks {missing[0]!r})")
    return records


def _order_quant(recs: list[dict]) -> list[dict]:
    """bench_quant's row order for the rows it defines, then any other rows by id."""
    from qkit.eval import bench_quant

    rank = {r["id"]: i for i, r in enumerate(bench_quant.all_rows())}
    return sorted(recs, key=lambda r: (rank.get(r["id"], len(rank)), r["id"]))


def load_quant(path) -> list[dict]:
    """bench_quant records from its --json file, or from its per-row cache directory (finished rows only)."""
    p = Path(path)
    if p.is_dir():
        recs = []
        for f in sorted(p.glob("*.json")):
            r = read_json(f)   # the cache also holds each row's .ppl.json and .quant.json: no "id" key
            if isinstance(r, dict) and "id" in r and "ppl" in r:
                recs.append(r)
        if not recs:
            raise InputError(f"{path}: no finished bench_quant rows in this directory")
    else:
        recs = read_json(p)
        recs = recs.get("records") if isinstance(recs, dict) else recs
    return _order_quant(_need(recs, ("id", "method", "ppl", "bits_per_weight"), path, "bench_quant"))


def load_heldout(path) -> dict:
    """bench_heldout's --json output: {'rows': [...], 'gap_closed': {...}}."""
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("rows"), list):
        raise InputError(f"{path}: not a bench_heldout JSON (no 'rows' list)")
    _need(d["rows"], ("id", "ppl", "seconds", "bits_per_weight"), path, "bench_heldout")
    if any(not isinstance(r["ppl"], dict) for r in d["rows"]):
        raise InputError(f"{path}: bench_heldout rows need a perplexity per held-out text")
    return d


def load_ann(path) -> dict:
    """{'machine', 'records'} of bench_ann --json (records of one or more datasets)."""
    d = read_json(path)
    recs = d.get("records") if isinstance(d, dict) else None
    _need(recs, ("dataset", "impl", "codec", "ef", "rerank", "recall_at_10", "qps", "bytes_in_ram", "n"), path,
          "bench_ann")
    return {"machine": d.get("machine", {}), "records": recs}


def load_codecs(path) -> dict:
    d = read_json(path)
    recs = d.get("records") if isinstance(d, dict) else None
    _need(recs, ("dataset", "impl", "codec", "bytes_per_vector", "recall_at_10", "rerank"), path, "bench_codecs")
    return {"machine": d.get("machine", {}), "records": recs}


def load_kernels(path) -> list[dict]:
    return _need(read_json(path), ("kernel", "backend", "gbps", "vectors_per_s", "ms"), path, "bench_kernels")


def load_bandwidth(path) -> dict:
    d = read_json(path)
    if not isinstance(d, dict) or not {"copy_gbps", "read_gbps"} <= d.keys():
        raise InputError(f"{path}: not bandwidth output (needs copy_gbps and read_gbps)")
    return d


# --------------------------------------------------------------------------- running the benchmarks

def _section(name: str, keep: bool, cache: Path, rerun: bool, run, load):
    """load(path) of the JSON that run(path) writes; kept runs (full mode) are saved under cache/report/ and
    reused unless rerun, so an interrupted full report resumes with the sections it has not finished."""
    if keep:
        path = Path(cache) / "report" / f"full-{name}.json"
        if not path.is_file() or rerun:
            path.parent.mkdir(parents=True, exist_ok=True)
            run(str(path))
        return load(path)
    with tempfile.TemporaryDirectory(prefix="qkit-report-") as tmp:
        run(str(Path(tmp) / f"{name}.json"))
        return load(Path(tmp) / f"{name}.json")


def run_weights(full: bool = False, cache=".qkit-run", rerun: bool = False) -> list[dict]:
    """bench_quant rows on the default model: all rows (full, resumable) or QUICK_ARGS['quant']."""
    from qkit.eval import bench_quant

    cache = Path(cache)
    args = ["--cache", str(cache / "bench_quant")] + ([] if full else QUICK_ARGS["quant"])
    # never kept: bench_quant resumes from its own per-row cache, and picks up rows added since the last run
    return _section("quant", False, cache, rerun, lambda p: bench_quant.main(args + ["--json", p]), load_quant)


def run_heldout(full: bool = False, cache=".qkit-run", rerun: bool = False) -> dict:
    """bench_heldout on the default model: all rows (full, resumable per row) or QUICK_ARGS['heldout']."""
    from qkit.eval import bench_heldout

    cache = Path(cache)
    args = ["--cache", str(cache / "bench_heldout")] + ([] if full else QUICK_ARGS["heldout"])
    return _section("heldout", False, cache, rerun, lambda p: bench_heldout.main(args + ["--json", p]),
                    load_heldout)


def subset(name: str, n_base: int, n_queries: int):
    """The first n_base base vectors and n_queries queries of a registry dataset, exact top-10 recomputed."""
    from qkit.eval import datasets

    if name not in datasets.DATASETS:
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(datasets.DATASETS)}")
    base, queries, metric = datasets._split(name)   # the split alone: the full set's ground truth is not needed
    base = base[:n_base]
    queries = queries[:n_queries]
    gt, gt_D = datasets.exact_knn(base, queries, 10, metric)
    return datasets.VectorDataset(f"{name}[:{len(base)}]", metric, base, queries, gt, gt_D)


def run_ann(dataset: str, full: bool = False, cache=".qkit-run", rerun: bool = False) -> dict:
    """bench_ann on a dataset: its defaults (full) or every implementation on a subset (QUICK_ARGS['ann'])."""
    from qkit.eval import bench_ann

    if full:
        return _section(f"ann-{dataset}", True, cache, rerun, lambda p: bench_ann.main([dataset, "--json", p]),
                        load_ann)
    from qkit.eval.machine import describe

    q = QUICK_ARGS["ann"]
    ds = subset(dataset, q["n_base"], q["n_queries"])
    common = dict(M=q["M"], efc=q["ef_construction"], threads=q["threads"], repeats=q["repeats"])
    recs = []
    for impl in bench_ann.IMPLS:
        if impl == "qkit":
            for c in q["codecs"]:
                recs += bench_ann.bench_qkit(ds, c, q["efs"], q["reranks"], **common)
        elif impl == "hnswlib":
            recs += bench_ann.bench_hnswlib(ds, q["efs"], **common)
        elif impl == "faiss-ivfrabitq":
            recs += bench_ann.bench_faiss_ivfrabitq(ds, q["efs"], **common)
        else:
            recs += bench_ann.bench_faiss(ds, impl, q["efs"], **common)
    for r in recs:  # the keys bench_ann.main adds to every record
        r.update(dataset=dataset, n=len(ds.base), dim=int(ds.base.shape[1]), n_queries=len(ds.queries), M=q["M"],
                 ef_construction=q["ef_construction"], build_threads=q["threads"])
    return {"machine": describe(), "records": recs}


def run_codecs(datasets_: list[str], full: bool = False, cache=".qkit-run", rerun: bool = False) -> dict:
    """bench_codecs: its defaults on the datasets (full) or QUICK_ARGS['codecs'] on subsets."""
    from qkit.eval import bench_codecs

    if full:
        name = "codecs-" + "+".join(datasets_)
        return _section(name, True, cache, rerun, lambda p: bench_codecs.main(
            ["--datasets", ",".join(datasets_), "--json", p]), load_codecs)
    from qkit.eval.machine import describe

    q = QUICK_ARGS["codecs"]
    recs = []
    for d in datasets_:
        ds = subset(d, q["n_base"], q["n_queries"])
        for r in bench_codecs.run_dataset(ds, q["qkit"], q["faiss"], q["seeds"]):
            recs.append(dict(r, dataset=d))
    return {"machine": describe(), "records": bench_codecs.per_rerank(recs)}


def run_kernels(full: bool = False, cache=".qkit-run", rerun: bool = False) -> list[dict]:
    """bench_kernels records: its defaults (full) or QUICK_ARGS['kernels']."""
    from qkit.eval import bench_kernels

    args = [] if full else QUICK_ARGS["kernels"]
    return _section("kernels", full, cache, rerun, lambda p: bench_kernels.main(args + ["--json", p]), load_kernels)


def run_bandwidth(full: bool = False, cache=".qkit-run", rerun: bool = False) -> dict:
    """One core's streaming copy and read bandwidth: bandwidth's defaults (full) or QUICK_ARGS['bandwidth']."""
    from qkit.eval import bandwidth

    args = [] if full else QUICK_ARGS["bandwidth"]
    return _section("bandwidth", full, cache, rerun, lambda p: bandwidth.main(args + ["--json", p]), load_bandwidth)


# --------------------------------------------------------------------------- the report directory

@dataclasses.dataclass
class ReportData:
    """What a report is made of: each section's benchmark records (None: section absent)."""

    quant: list[dict] | None = None
    heldout: dict | None = None               # bench_heldout: {'rows', 'gap_closed'}
    ann: dict[str, dict] | None = None        # dataset -> {'machine', 'records'}
    codecs: dict | None = None                # {'machine', 'records'}
    kernels: list[dict] | None = None
    bandwidth: dict | None = None

    def files(self) -> dict[str, object]:
        """data/ file name -> JSON content."""
        out = {}
        if self.quant is not None:
            out["quant.json"] = self.quant
        if self.heldout is not None:
            out["heldout.json"] = self.heldout
        for ds, d in (self.ann or {}).items():
            out[f"ann-{ds}.json"] = d
        if self.codecs is not None:
            out["codecs.json"] = self.codecs
        if self.kernels is not None:
            out["kernels.json"] = self.kernels
        if self.bandwidth is not None:
            out["bandwidth.json"] = self.bandwidth
        return out


def load_report(directory) -> tuple[ReportData, dict]:
    """(data, meta) of a report directory written by write_report."""
    d = Path(directory)
    meta = read_json(d / "report.json")
    data = d / "data"
    rd = ReportData()
    if (data / "quant.json").is_file():
        rd.quant = load_quant(data / "quant.json")
    if (data / "heldout.json").is_file():
        rd.heldout = load_heldout(data / "heldout.json")
    for f in sorted(data.glob("ann-*.json")):
        rd.ann = rd.ann or {}
        rd.ann[f.stem[len("ann-"):]] = load_ann(f)
    if (data / "codecs.json").is_file():
        rd.codecs = load_codecs(data / "codecs.json")
    if (data / "kernels.json").is_file():
        rd.kernels = load_kernels(data / "kernels.json")
    if (data / "bandwidth.json").is_file():
        rd.bandwidth = load_bandwidth(data / "bandwidth.json")
    return rd, meta


def _check_out_dir(out: Path, inputs: list) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        # the whole directory is replaced: never one that holds something other than a report
        raise UsageError(f"-o {out}: not empty and not a qkit report directory (no report.json); choose another")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"-o {out}: directory {out.resolve().parent} does not exist")
    for p in inputs:
        if p and out.resolve() in Path(p).resolve().parents:
            raise UsageError(f"input {p} lies inside the output directory {out}, which is replaced")


def write_report(out, data: ReportData, meta: dict) -> Path:
    """Write report.md, PNGs, data/*.json and report.json into out, atomically (temp dir, then rename)."""
    from qkit.eval import report_md, report_plots
    from qkit.fileio import make_tmp_dir, replace_dir

    out = Path(out)
    tmp = make_tmp_dir(out)
    try:
        (tmp / "data").mkdir()
        for name, content in data.files().items():
            (tmp / "data" / name).write_text(json.dumps(content, indent=1) + "\n")
        for name, fig in report_plots.figures(data).items():
            fig.savefig(tmp / name, format="png", dpi=110)
        (tmp / "report.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "report.md").write_text(report_md.render(data, meta))
        replace_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_meta(full: bool, sources: dict) -> dict:
    from qkit.eval.machine import describe

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "full" if full else "quick", "machine": describe(), "sources": sources}


def build(out, *, full=False, sections=SECTIONS, datasets_=None, quant_json=None, ann_json=(), codecs_json=None,
          kernels_json=None, bandwidth_json=None, heldout_json=None, cache=".qkit-run", rerun=False) -> Path:
    """Run (or read) each section's benchmarks and write the report directory; returns its path."""
    from qkit.eval import datasets

    out = Path(out)
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise UsageError(f"unknown section {bad[0] if bad else ''!r}; choose from {', '.join(SECTIONS)}")
    datasets_ = list(datasets_ or datasets.DATASETS)
    unknown = [d for d in datasets_ if d not in datasets.DATASETS]
    if unknown:
        raise UsageError(f"unknown dataset {unknown[0]!r}; known: {', '.join(datasets.DATASETS)}")
    _check_out_dir(out, [quant_json, heldout_json, *ann_json, codecs_json, kernels_json, bandwidth_json])
    # read every given file before any long run, so a bad path fails at once
    given_ann = {}
    for p in ann_json:
        d = load_ann(p)
        for ds in sorted({r["dataset"] for r in d["records"]}):
            given_ann[ds] = {"machine": d["machine"], "records": [r for r in d["records"] if r["dataset"] == ds],
                             "source": str(p)}
    rd, src = ReportData(), {}
    given = {"quant": quant_json and load_quant(quant_json), "heldout": heldout_json and load_heldout(heldout_json),
             "codecs": codecs_json and load_codecs(codecs_json),
             "kernels": kernels_json and load_kernels(kernels_json),
             "bandwidth": bandwidth_json and load_bandwidth(bandwidth_json)}
    how = "run (full)" if full else "run (quick)"
    if "weights" in sections:
        rd.quant = given["quant"] or run_weights(full, cache, rerun)
        src["quant"] = str(quant_json) if quant_json else how
        rd.heldout = given["heldout"] or run_heldout(full, cache, rerun)
        src["heldout"] = str(heldout_json) if heldout_json else how
    if "vectors" in sections:
        rd.ann = {}
        for ds in datasets_:
            if ds in given_ann:
                g = given_ann[ds]
                rd.ann[ds], src[f"ann-{ds}"] = {"machine": g["machine"], "records": g["records"]}, g["source"]
            else:
                rd.ann[ds], src[f"ann-{ds}"] = run_ann(ds, full, cache, rerun), how
        if given["codecs"]:
            keep = [r for r in given["codecs"]["records"] if r["dataset"] in datasets_]
            rd.codecs, src["codecs"] = dict(given["codecs"], records=keep), str(codecs_json)
        else:
            rd.codecs, src["codecs"] = run_codecs(datasets_, full, cache, rerun), how
    if "kernels" in sections:
        rd.kernels = given["kernels"] or run_kernels(full, cache, rerun)
        rd.bandwidth = given["bandwidth"] or run_bandwidth(full, cache, rerun)
        src["kernels"] = str(kernels_json) if kernels_json else how
        src["bandwidth"] = str(bandwidth_json) if bandwidth_json else how
    return write_report(out, rd, make_meta(full, src))
