"""Memory bounds: peak resident memory of qkit's long jobs, each in its own process.

    qkit bench memory [--dataset glove-50] [--codec sq8] [--quant-cache DIR] [--json PATH]

Rows:
  * ``qkit quantize`` per method on the default model: the peak RSS that
    ``qkit bench quant`` recorded for each row (each row there is
    one ``qkit quantize`` process); read from its cache, not re-run, since a GPTQ
    or AWQ row takes 10-20 minutes. Compared with the fp32 model's size.
  * ``qkit ann build DATASET`` (2 threads) and ``qkit ann search`` on the index
    it wrote, each in a fresh interpreter that runs the CLI and then reports its
    own VmHWM (the high-water mark of that address space: a forked parent's
    memory is not counted, unlike ru_maxrss).
  * ``Index.load(path, mmap=True)``: resident memory right after loading and
    after a search, against the index file's size: a memory-mapped index
    costs pages only once a search touches them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from qkit.fileio import atomic_write

_CHILD = r"""
import json, sys
from qkit.cli.main import main
rc = main(sys.argv[2:])
hwm = rss = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"): hwm = int(line.split()[1]) / 1024
    if line.startswith("VmRSS:"): rss = int(line.split()[1]) / 1024
with open(sys.argv[1], "w") as f: json.dump({"rc": rc, "peak_rss_mb": hwm, "rss_mb": rss}, f)
"""

_LOAD = r"""
import json, sys, numpy as np
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
from qkit.ann import Index
if sys.argv[3].endswith(".npy"):
    queries = np.load(sys.argv[3], allow_pickle=False)
else:
    from qkit.eval import datasets
    queries = datasets.load_dataset(sys.argv[3]).queries
before = rss()
idx = Index.load(sys.argv[2], mmap=True)
loaded = rss()
idx.search(queries[:1000], 10, ef=64)
searched = rss()
idx.search(queries[:1000], 10, ef=64, rerank=32)
reranked = rss()
with open(sys.argv[1], "w") as f:
    json.dump({"rss_before_mb": before, "rss_loaded_mb": loaded - before, "rss_searched_mb": searched - before,
               "rss_reranked_mb": reranked - before}, f)
"""


def run_child(script: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        r = subprocess.run([sys.executable, "-c", script, str(out), *args], capture_output=True, text=True)
        if r.returncode or not out.exists():
            last = (r.stderr or r.stdout or "").strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            raise RuntimeError(f"{' '.join(args[:3])} failed: {last[0]}")
        return json.loads(out.read_text())


def quant_rows(cache: Path | None) -> list[dict]:
    """bench_quant's per-row records (peak RSS of each `qkit quantize` process), newest setup first."""
    if cache is None:
        root = Path(".qkit-run/bench_quant")
        dirs = sorted(root.glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
        cache = dirs[0] if dirs else None
    if cache is None or not cache.is_dir():
        return []
    rows = []
    for p in sorted(cache.glob("*.json")):
        if p.name.count(".") > 1:   # .ppl.json / .quant.json: the parts of a row
            continue
        r = json.loads(p.read_text())
        if r.get("peak_rss_mb"):
            rows.append({"job": "qkit quantize", "what": r["id"], "peak_rss_mb": round(r["peak_rss_mb"], 1),
                         "seconds": round(r.get("seconds") or 0, 1)})
    return rows


def model_mb() -> float:
    """The default model's fp32 weights, in MB (what "the whole model in memory" would cost)."""
    from qkit.model import loader

    ref = loader.resolve("default")
    files = [ref.weights] if ref.weights.is_file() else sorted(ref.weights.glob("*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / 2**20, 1)


def ann_rows(dataset: str, codec: str, threads: int, work: Path, queries: str | None = None) -> list[dict]:
    """dataset: a registry name (its queries are used) or a vector file, then with `queries` (.npy)."""
    idx = work / "index.qkit"
    queries = queries or dataset
    b = run_child(_CHILD, ["ann", "build", dataset, "--codec", codec, "--threads", str(threads), "-o", str(idx)])
    s = run_child(_CHILD, ["ann", "search", str(idx), queries, "--ef", "64", "--rerank", "32"])
    size = idx.stat().st_size / 2**20   # one file: graph, codes and the re-rank store
    l = run_child(_LOAD, [str(idx), queries])
    return [
        {"job": "qkit ann build", "what": f"{dataset} {codec}, {threads} threads", "peak_rss_mb": round(b["peak_rss_mb"], 1),
         "file_mb": round(size, 1)},
        {"job": "qkit ann search", "what": f"{dataset} all queries, ef 64, rerank 32",
         "peak_rss_mb": round(s["peak_rss_mb"], 1), "file_mb": round(size, 1)},
        {"job": "Index.load(mmap=True)", "what": "resident after load (above the interpreter)",
         "rss_mb": round(l["rss_loaded_mb"], 1), "file_mb": round(size, 1)},
        {"job": "Index.load(mmap=True)", "what": "after searching 1,000 queries (codes + graph touched)",
         "rss_mb": round(l["rss_searched_mb"], 1), "file_mb": round(size, 1)},
        {"job": "Index.load(mmap=True)", "what": "after also re-ranking them (re-rank store touched)",
         "rss_mb": round(l["rss_reranked_mb"], 1), "file_mb": round(size, 1)},
    ]


def table(rows: list[dict]) -> str:
    head = f"{'job':24s} {'what':52s} {'peak/RSS MB':>11s} {'file MB':>8s}"
    out = [head, "-" * len(head)]
    for r in rows:
        mb = r.get("peak_rss_mb", r.get("rss_mb"))
        out.append(f"{r['job']:24s} {r['what']:52s} {mb:11.1f} {r.get('file_mb', float('nan')):8.1f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qkit bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="glove-50")
    ap.add_argument("--codec", default="sq8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant-cache", type=Path, default=None, help="bench_quant's row cache (default: newest)")
    ap.add_argument("--no-ann", action="store_true", help="only the quantization rows")
    ap.add_argument("--json", dest="json_path", default=None)
    a = ap.parse_args(argv)
    rows = quant_rows(a.quant_cache)
    fp32 = model_mb() if rows else None
    if not a.no_ann:
        with tempfile.TemporaryDirectory(prefix="qkit-mem-") as d:
            rows += ann_rows(a.dataset, a.codec, a.threads, Path(d))
    if fp32:
        print(f"# default model fp32 weights: {fp32} MB")
    print(table(rows))
    if a.json_path:
        with atomic_write(a.json_path, "w") as f:
            json.dump({"model_fp32_mb": fp32, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
