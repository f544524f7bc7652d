"""ANN benchmark: qkit's HNSW (flat/sq8/sq4) next to hnswlib and faiss, same data, same run.

    qkit bench ann fashion-mnist [--json out.json] [--plot out.png]
    qkit ann bench glove-50 --ef 32,64,128

For every implementation: build once (``--threads`` build threads, 2 by
default for everyone), then sweep ef with ONE search thread, all queries
handed over in one call; QPS counts that call alone (the best of
``--repeats`` runs). Recall@10 is against the dataset's exact ground truth,
ties counted (qkit.eval.datasets.recall_at_k with true distances).

bytes_in_ram is what a search reads: qkit's codes + graph + id map (+ the
full-precision vectors when it re-ranks); hnswlib's index (its serialized
size: level-0 block of links, vectors and labels, plus upper links); faiss's
index as serialized. For faiss-ivfrabitq (IVF, 4-bit RaBitQ codes, qb = 4,
exact refinement of 4k candidates) the "ef" column is nprobe.

Reference points, read off ann-benchmarks' published plots (one thread),
fashion-mnist-784 at recall 0.95: hnswlib ~8.4k QPS, faiss HNSW ~5.8k.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

log = logging.getLogger("qkit.eval.bench_ann")

IMPLS = ("qkit", "hnswlib", "faiss-hnsw", "faiss-hnswsq8", "faiss-ivfrabitq")
QKIT_CODECS = ("flat", "sq8", "sq4")


def load_queries_subset(name: str, nq: int | None):
    """A registry dataset (qkit.eval.datasets.load_dataset), keeping only its first nq queries when nq is given."""
    import dataclasses

    from qkit.eval import datasets

    ds = datasets.load_dataset(name)
    if nq:
        ds = dataclasses.replace(ds, queries=ds.queries[:nq], gt=ds.gt[:nq],
                                 gt_D=None if ds.gt_D is None else ds.gt_D[:nq])
    return ds


def _timed_search(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _recall(ds, I, k=10):
    from qkit.eval import datasets

    I = np.asarray(I, np.int64)
    D = datasets.true_distances(ds.base, ds.queries, I, ds.metric) if ds.gt_D is not None else None
    return datasets.recall_at_k(I, ds.gt, k, D=D, gt_D=ds.gt_D if D is not None else None)


def _churn_and_filter(ds, idx, ef, rr, nq, k=10, seed=0):
    """Recall@k at one setting (ef, rr) after removing a random 10% of the ids, and under a filter
    passing a random 10%: ground truth recomputed by brute force over what may be returned, on the
    first nq queries. The filter runs first (it does not change the index); removal mutates idx."""
    from qkit.eval import datasets

    rng = np.random.default_rng(seed)
    n = len(ds.base)
    Q = ds.queries[:nq]
    _, I = idx.search(Q, k, ef=ef, rerank=rr)   # the baseline: the same queries, nothing removed or filtered
    D = datasets.true_distances(ds.base, Q, np.asarray(I, np.int64), ds.metric)
    out = {"churn_queries": len(Q), "before": round(datasets.recall_at_k(
        I, ds.gt[:nq], k, D=D, gt_D=None if ds.gt_D is None else ds.gt_D[:nq]), 4)}
    for what in ("filter_10pct", "removed_10pct"):
        pick = rng.choice(n, n // 10, replace=False)
        keep = np.sort(pick) if what == "filter_10pct" else np.setdiff1d(np.arange(n), pick)
        if what == "removed_10pct":
            t0 = time.perf_counter()
            idx.remove(pick, threads=2)
            out["remove_s"] = round(time.perf_counter() - t0, 2)
        gt, gt_D = datasets.exact_knn(ds.base[keep], Q, k, ds.metric)
        gt = keep[gt]
        t0 = time.perf_counter()
        _, I = idx.search(Q, k, ef=ef, rerank=rr, filter=keep if what == "filter_10pct" else None)
        qps = len(Q) / (time.perf_counter() - t0)
        if what == "removed_10pct" and np.isin(I, pick).any():
            raise AssertionError("a removed id was returned")
        D = datasets.true_distances(ds.base, Q, np.asarray(I, np.int64), ds.metric)
        out[what] = round(datasets.recall_at_k(I, gt, k, D=D, gt_D=gt_D), 4)
        out[what + "_qps"] = round(qps, 1)
    return out


def bench_qkit(ds, codec, efs, reranks, M, efc, threads, repeats, k=10, store="auto", churn_nq=0, target=0.95):
    from qkit.ann import Index

    metric = ds.metric
    idx = Index(ds.base.shape[1], metric, codec, M, efc, store=store)
    t0 = time.perf_counter()
    idx.add(ds.base, threads=threads)
    build_s = time.perf_counter() - t0
    out = []
    for rr in sorted({r if codec != "flat" else 0 for r in reranks}):
        idx.search(ds.queries[:200], k, ef=efs[0], rerank=rr)   # warm-up
        done = set()
        for ef in efs:
            ef = max(ef, k, rr)     # search raises ef to rerank: do not time the same setting twice
            if ef in done:
                continue
            done.add(ef)
            (D, I), s = _timed_search(lambda: idx.search(ds.queries, k, ef=ef, rerank=rr), repeats)
            out.append({"impl": "qkit", "codec": codec, "ef": ef, "rerank": rr,
                        "recall_at_10": round(_recall(ds, I), 4), "qps": round(len(ds.queries) / s, 1),
                        "bytes_in_ram": idx.bytes_in_ram(rerank=rr > 0), "build_s": round(build_s, 2),
                        "store": idx.store.name if idx.store is not None else None})
    if churn_nq:
        # the cheapest setting that reached the target before: the issue asks that recall stays >= 0.9 there
        ok = [r for r in out if r["recall_at_10"] >= target]
        if ok:
            best = max(ok, key=lambda r: r["qps"])
            best.update(_churn_and_filter(ds, idx, best["ef"], best["rerank"], churn_nq, k))
    return out


def bench_hnswlib(ds, efs, M, efc, threads, repeats, k=10):
    import hnswlib

    space = {"l2": "l2", "cosine": "cosine", "ip": "ip"}[ds.metric]
    h = hnswlib.Index(space=space, dim=ds.base.shape[1])
    h.init_index(max_elements=len(ds.base), M=M, ef_construction=efc, random_seed=100)
    h.set_num_threads(threads)
    t0 = time.perf_counter()
    h.add_items(ds.base)
    build_s = time.perf_counter() - t0
    h.set_num_threads(1)
    out = []
    for ef in efs:
        h.set_ef(max(ef, k))
        (I, _), s = _timed_search(lambda: h.knn_query(ds.queries, k=k, num_threads=1), repeats)
        out.append({"impl": "hnswlib", "codec": "flat", "ef": max(ef, k), "rerank": 0,
                    "recall_at_10": round(_recall(ds, I), 4), "qps": round(len(ds.queries) / s, 1),
                    "bytes_in_ram": int(h.index_file_size()), "build_s": round(build_s, 2)})
    return out


def _faiss_inputs(ds):
    """(dim, faiss metric, base, queries): cosine becomes inner product on L2-normalized copies."""
    import faiss

    metric = faiss.METRIC_L2 if ds.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    X, Q = ds.base, ds.queries
    if ds.metric == "cosine":
        X, Q = X.copy(), Q.copy()
        faiss.normalize_L2(X)
        faiss.normalize_L2(Q)
    return ds.base.shape[1], metric, X, Q


def bench_faiss(ds, kind, efs, M, efc, threads, repeats, k=10):
    import faiss

    d, metric, X, Q = _faiss_inputs(ds)
    if kind == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, M, metric)
        codec = "flat"
    else:
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, M, metric)
        codec = "sq8"
    index.hnsw.efConstruction = efc
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    if not index.is_trained:
        index.train(X)
    index.add(X)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    nbytes = len(faiss.serialize_index(index))
    out = []
    for ef in efs:
        params = faiss.SearchParametersHNSW(efSearch=max(ef, k))
        (_, I), s = _timed_search(lambda: index.search(Q, k, params=params), repeats)
        out.append({"impl": kind, "codec": codec, "ef": max(ef, k), "rerank": 0,
                    "recall_at_10": round(_recall(ds, I), 4), "qps": round(len(Q) / s, 1),
                    "bytes_in_ram": nbytes, "build_s": round(build_s, 2)})
    return out


def bench_faiss_ivfrabitq(ds, efs, M, efc, threads, repeats, k=10):
    """faiss IVF + 4-bit RaBitQ codes (qb = 4) with exact refinement of 4k candidates; ef sweeps nprobe."""
    import faiss

    d, metric, X, Q = _faiss_inputs(ds)
    nlist = int(4 * np.sqrt(len(X)))
    index = faiss.index_factory(d, f"IVF{nlist},RaBitQ4,Refine(Flat)", metric)
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    index.train(X)
    index.add(X)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    nbytes = len(faiss.serialize_index(index))
    out = []
    for nprobe in efs:
        params = faiss.IndexRefineSearchParameters(
            k_factor=4, base_index_params=faiss.IVFRaBitQSearchParameters(nprobe=nprobe, qb=4))
        (_, I), s = _timed_search(lambda: index.search(Q, k, params=params), repeats)
        out.append({"impl": "faiss-ivfrabitq", "codec": "rabitq4", "ef": nprobe, "rerank": 4 * k,
                    "recall_at_10": round(_recall(ds, I), 4), "qps": round(len(Q) / s, 1),
                    "bytes_in_ram": nbytes, "build_s": round(build_s, 2)})
    return out


def table(records) -> str:
    head = f"{'impl':14s} {'codec':6s} {'ef':>5s} {'rerank':>6s} {'recall@10':>9s} {'QPS':>9s} " \
           f"{'MiB':>7s} {'B/vec':>7s} {'build s':>8s}"
    rows = [head, "-" * len(head)]
    for r in records:
        rows.append(f"{r['impl']:14s} {r['codec']:6s} {r['ef']:5d} {r['rerank']:6d} {r['recall_at_10']:9.4f} "
                    f"{r['qps']:9.0f} {r['bytes_in_ram'] / 2**20:7.1f} {r['bytes_in_ram'] / r['n']:7.1f} "
                    f"{r['build_s']:8.1f}")
    return "\n".join(rows)


def plot(records, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    groups = {}
    for r in records:
        groups.setdefault((r["impl"], r["codec"], r["rerank"]), []).append(r)
    for (impl, codec, rr), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["recall_at_10"])
        label = f"{impl} {codec}" + (f" rerank {rr}" if rr else "")
        ax.plot([r["recall_at_10"] for r in rs], [r["qps"] for r in rs], marker="o",
                linestyle="-" if impl == "qkit" else "--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (1 thread)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from qkit.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _ints(s: str, lowest: int = 1) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or min(v) < lowest:
        raise argparse.ArgumentTypeError(f"expected integers >= {lowest}, got {s!r}")
    return v


def _ints0(s: str) -> list[int]:
    return _ints(s, 0)


def main(argv=None) -> int:
    from qkit.eval import datasets
    from qkit.eval.machine import describe

    ap = argparse.ArgumentParser(prog="qkit ann bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=datasets.DATASETS)
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {', '.join(IMPLS)}")
    ap.add_argument("--codecs", default=",".join(QKIT_CODECS), help="qkit codecs")
    ap.add_argument("--ef", type=_ints, default=[16, 32, 64, 128, 256], help="ef values to sweep")
    ap.add_argument("--rerank", type=_ints0, default=[0, 32],
                    help="qkit re-rank depths to sweep for sq codecs (0: none)")
    ap.add_argument("--store", default="auto", choices=["auto", "float", "u8", "sq8"],
                    help="qkit re-rank store (the graph is built on it)")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--qkit-M", type=int, default=None, help="qkit's M (default: --M)")
    ap.add_argument("--qkit-ef-construction", type=int, default=None, help="qkit's ef_construction")
    ap.add_argument("--churn-queries", type=int, default=1000,
                    help="after each qkit sweep, recall at its fastest setting with recall >= 0.95 after "
                         "removing 10%% of the ids and under a 10%% filter, on this many queries (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="build threads (search always uses one)")
    ap.add_argument("--nq", type=int, default=None, help="use the first NQ queries (default: all)")
    ap.add_argument("--repeats", type=int, choices=range(1, 11), default=2, metavar="1..10",
                    help="search runs per setting; the fastest counts")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--plot", dest="plot_path", default=None)
    a = ap.parse_args(argv)
    impls = [i for i in a.impls.split(",") if i]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        ap.error(f"unknown impl {bad[0]!r}; choose from {', '.join(IMPLS)}")
    codecs = [c for c in a.codecs.split(",") if c]
    from qkit.ann import CODECS

    if any(c not in CODECS for c in codecs):
        ap.error(f"unknown codec in {a.codecs!r}; choose from {', '.join(CODECS)}")
    ds = load_queries_subset(a.dataset, a.nq)
    machine = describe()
    print(f"# {a.dataset}: {len(ds.base)} x {ds.base.shape[1]} ({ds.metric}), {len(ds.queries)} queries; "
          f"M={a.M}, ef_construction={a.ef_construction}, build threads {a.threads}, search 1 thread")
    print(f"# machine: {machine.get('cpu')} ({', '.join(machine.get('flags', []))}), {machine.get('cores')} cores")
    records = []
    common = dict(M=a.M, efc=a.ef_construction, threads=a.threads, repeats=a.repeats)
    for impl in impls:
        if impl == "qkit":
            for c in codecs:
                qc = dict(common, M=a.qkit_M or a.M, efc=a.qkit_ef_construction or a.ef_construction)
                records += bench_qkit(ds, c, a.ef, a.rerank, store=a.store, churn_nq=a.churn_queries, **qc)
                print(f"# qkit {c} done", file=sys.stderr)
        elif impl == "hnswlib":
            records += bench_hnswlib(ds, a.ef, **common)
        elif impl == "faiss-ivfrabitq":
            records += bench_faiss_ivfrabitq(ds, a.ef, **common)
        else:
            records += bench_faiss(ds, impl, a.ef, **common)
        print(f"# {impl} done", file=sys.stderr)
    for r in records:
        qk = r["impl"] == "qkit"
        r.update(dataset=a.dataset, n=len(ds.base), dim=int(ds.base.shape[1]), n_queries=len(ds.queries),
                 M=(a.qkit_M or a.M) if qk else a.M, build_threads=a.threads,
                 ef_construction=(a.qkit_ef_construction or a.ef_construction) if qk else a.ef_construction)
    print(table(records))
    for r in records:
        if "removed_10pct" in r:
            print(f"# qkit {r['codec']} ef={r['ef']} rerank={r['rerank']} (recall {r['recall_at_10']}; "
                  f"{r['before']} on the first {r['churn_queries']} queries): under a 10% filter {r['filter_10pct']} ({r['filter_10pct_qps']:.0f} QPS); after removing "
                  f"10% ({r['remove_s']} s) {r['removed_10pct']} ({r['removed_10pct_qps']:.0f} QPS)")
    if a.json_path:
        from qkit.fileio import atomic_write

        with atomic_write(a.json_path, "w") as f:
            json.dump({"machine": machine, "records": records}, f, indent=1)
    if a.plot_path:
        plot(records, a.plot_path, f"{a.dataset}: recall@10 vs QPS (1 search thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
