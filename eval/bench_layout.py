"""Graph layout experiment: neighbour codes by id, copied beside each layer-0 list, or ids renumbered for locality.

    qkit bench layout fashion-mnist [--codecs sq4,rabitq1,rabitq4] [--ef 16,32,64] [--json P]

Layout "ids" (qkit's default): the codes are one array in id order; expanding a node reads
its M0 neighbours' codes from M0 scattered rows (the walk prefetches them all before it
computes). Layout "beside" (glass, SymphonyQG): node i's list is followed by a copy of its
neighbours' codes, so an expansion reads one contiguous block of M0 x code bytes; the
price is M0 copies of every code (x32 the code memory at M = 16).

Renumbering ("bfs", "rcm", "kmeans": Index.reorder) keeps the id layout but puts layer-0 neighbours
near each other in memory (Coleman et al., NeurIPS 2022), at no memory cost.

Each codec's index is built once; every ef is searched in every layout, alternating, with
ONE search thread and the best of --repeats runs. Results are identical by construction
(tests/test_ann.py checks it), so only QPS and bytes differ, except for "fastscan".

Layout "fastscan" (sq4 only; SymphonyQG, Gou et al. SIGMOD 2025, with Andre et al.'s FastScan):
node i's neighbours' 4-bit codes are stored beside its list as FastScan blocks of 32, and
expanding i estimates all of them in one pass of 16-entry uint8 tables per dimension
(qk_fastscan). The tables are rounded to uint8, so its walk distances (and recall, shown
in its own column) differ slightly from the per-code kernel's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from qkit.eval.bench_ann import _ints, _ints0, _recall, _timed_search, load_queries_subset


def run(ds, codecs, efs, rerank, M, efc, threads, repeats, orders=("bfs", "kmeans"), k=10):
    import tempfile

    from qkit.ann import Index

    out = []
    for codec in codecs:
        idx = Index(ds.base.shape[1], ds.metric, codec, M, efc)
        t0 = time.perf_counter()
        idx.add(ds.base, threads=threads)
        build_s = time.perf_counter() - t0
        variants = {"ids": idx, "beside": idx}
        if codec == "sq4":   # FastScan over each neighbour block: 4-bit per-dimension codes only
            variants["fastscan"] = idx
        with tempfile.TemporaryDirectory() as tmp:   # independent copies, renumbered
            idx.save(f"{tmp}/i.qkit")
            for m in orders:
                variants[m] = Index.load(f"{tmp}/i.qkit", mmap=False)
                t0 = time.perf_counter()
                variants[m].reorder(m)
                log_s = time.perf_counter() - t0
                print(f"# {codec}: reorder {m} took {log_s:.1f} s", file=sys.stderr)
        rr = 0 if codec == "flat" else rerank
        for ef in efs:
            ef = max(ef, k, rr)
            for layout in list(variants) * 2:   # alternate: drift hits every layout alike
                v = variants[layout]
                v.layout = layout if layout in ("beside", "fastscan") else "ids"
                v.search(ds.queries[:200], k, ef=ef, rerank=rr)   # warm-up (builds the beside copy)
                (_, I), s = _timed_search(lambda: v.search(ds.queries, k, ef=ef, rerank=rr), repeats)
                rec = {"codec": codec, "layout": layout, "ef": ef, "rerank": rr, "qps": len(ds.queries) / s,
                       "recall_at_10": round(_recall(ds, I), 4), "bytes_in_ram": v.bytes_in_ram(rr > 0),
                       "build_s": round(build_s, 2)}
                prev = next((r for r in out if all(r[f] == rec[f] for f in ("codec", "layout", "ef"))), None)
                if prev is None:
                    out.append(rec)
                else:
                    prev["qps"] = max(prev["qps"], rec["qps"])
        idx.layout = "ids"
        print(f"# {codec} done", file=sys.stderr)
    for r in out:
        r["qps"] = round(r["qps"], 1)
    return out


def table(records) -> str:
    layouts = list(dict.fromkeys(r["layout"] for r in records))
    fs = "fastscan" in layouts
    lines = [f"{'codec':8s} {'ef':>4s} {'rr':>4s} {'recall@10':>9s} " + (f"{'recall fs':>9s} " if fs else "")
             + " ".join(f"{'QPS ' + l:>11s}" for l in layouts) + " " + " ".join(f"{'MiB ' + l:>11s}" for l in layouts)]
    for r in records:
        if r["layout"] != "ids":
            continue
        row = {x["layout"]: x for x in records if x["codec"] == r["codec"] and x["ef"] == r["ef"]}
        lines.append(f"{r['codec']:8s} {r['ef']:4d} {r['rerank']:4d} {r['recall_at_10']:9.4f} "
                     + ((f"{row['fastscan']['recall_at_10']:9.4f} " if "fastscan" in row else f"{'':9s} ") if fs else "")
                     + " ".join(f"{row[l]['qps']:11.0f}" if l in row else f"{'':>11s}" for l in layouts) + " "
                     + " ".join(f"{row[l]['bytes_in_ram'] / 2**20:11.1f}" if l in row else f"{'':>11s}"
                                for l in layouts))
    return "\n".join(lines)


def main(argv=None) -> int:
    from qkit.ann import CODECS
    from qkit.eval import datasets
    from qkit.eval.machine import describe

    ap = argparse.ArgumentParser(prog="qkit bench layout", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=datasets.DATASETS)
    ap.add_argument("--codecs", default="sq4,rabitq1,rabitq4")
    ap.add_argument("--orders", default="bfs,kmeans", help="node renumberings to compare (bfs, rcm, kmeans)")
    ap.add_argument("--ef", type=_ints, default=[16, 32, 64])
    ap.add_argument("--rerank", type=_ints0, default=[32], help="one re-rank depth for the quantized codecs")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="build threads (search uses one)")
    ap.add_argument("--nq", type=int, default=None)
    ap.add_argument("--repeats", type=int, choices=range(1, 11), default=3, metavar="1..10")
    ap.add_argument("--json", dest="json_path", default=None)
    a = ap.parse_args(argv)
    codecs = [c for c in a.codecs.split(",") if c]
    if any(c not in CODECS for c in codecs):
        ap.error(f"unknown codec in {a.codecs!r}; choose from {', '.join(CODECS)}")
    ds = load_queries_subset(a.dataset, a.nq)
    machine = describe()
    print(f"# {a.dataset}: {len(ds.base)} x {ds.base.shape[1]}, {len(ds.queries)} queries; M={a.M}, "
          f"ef_construction={a.ef_construction}; one search thread; machine: {machine.get('cpu')}")
    orders = [o for o in a.orders.split(",") if o]
    recs = run(ds, codecs, a.ef, a.rerank[0], a.M, a.ef_construction, a.threads, a.repeats, orders)
    print(table(recs))
    if a.json_path:
        from qkit.fileio import atomic_write

        with atomic_write(a.json_path, "w") as f:
            json.dump({"machine": machine, "dataset": a.dataset, "records": recs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
