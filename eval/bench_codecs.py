"""Vector codecs by brute force: bytes, encode speed, recall@10 before and after exact re-ranking.

    qkit bench codecs [--datasets fashion-mnist,glove-50] [--json PATH] [--plot PNG]

For every dataset and codec: encode the base, scan ALL codes for each query
with the codec's estimator (no graph: this isolates the code's accuracy),
keep the 100 best, and report recall@10 of the estimate alone (rerank 0) and
after exact re-ranking of the best 50 and 100. In the same run, faiss's own
codes: IndexRaBitQ with the same total bits (qb = 4 query bits, behind a
random rotation "RR" seeded like ours), and its TurboQuant scalar-quantizer
types "RR,SQtqmse{b}" on unit vectors with the norms kept beside the codes
(faiss's TurboQuant assumes unit vectors: the L2 datasets need the norm to
rebuild x).

GloVe is a cosine set: vectors and queries are L2-normalized and ranked by
inner product. Recall counts ties (qkit.eval.datasets.recall_at_k). Seeds:
codecs with a random rotation are run with ``--seeds`` seeds and the table
gives the mean (the issue's "mean of 3 seeds" for RaBitQ at 1 and 4 bits).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

DEFAULT_QKIT = ("sq8", "sq4", "rabitq1", "rabitq2", "rabitq3", "rabitq4", "rabitq5", "rabitq7", "rabitq9",
                "tq1", "tq2", "tq3", "tq4", "tq5", "tq6", "tq7", "tq8", "tqp2", "tqp3", "tqp4", "qjl")
# faiss 1.15.1 has TurboQuant MSE types for b = 1..4 and 8 only (SQtqmse5..7 do not exist)
DEFAULT_FAISS = ("rabitq1", "rabitq2", "rabitq3", "rabitq4", "rabitq5", "rabitq7", "rabitq9",
                 "tq1", "tq2", "tq3", "tq4", "tq8")
RERANKS = (0, 50, 100)
TOP = 100


def _topk(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest per row, sorted."""
    k = min(k, dist.shape[1])
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(dist, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def _exact(base, Q, I, metric):
    """Exact distances (smaller is nearer) of candidates I (nq, R)."""
    X = base[I]                                                  # (nq, R, d)
    if metric == "l2":
        return ((X - Q[:, None, :]) ** 2).sum(-1)
    return -(X * Q[:, None, :]).sum(-1)


def _recalls(ds, base, Q, I, metric):
    from qkit.eval import datasets

    out = {}
    for rr in RERANKS:
        if rr == 0:
            top = I[:, :10]
        else:
            cand = I[:, :rr]
            ex = _exact(base, Q, cand, metric)
            top = np.take_along_axis(cand, np.argsort(ex, axis=1, kind="stable")[:, :10], 1)
        D = datasets.true_distances(ds.base, ds.queries, top, ds.metric) if ds.gt_D is not None else None
        out[rr] = datasets.recall_at_k(top, ds.gt, 10, D=D, gt_D=ds.gt_D if D is not None else None)
    return out


def scan_qkit(codec, codes, Q, chunk=256):
    """Top-100 ids per query by the codec's estimate, scanning every code."""
    out = np.empty((len(Q), TOP), np.int64)
    many = getattr(codec, "distances_many", None)
    for s in range(0, len(Q), chunk):
        q = Q[s: s + chunk]
        if many is not None:
            d = many(q, codes)
        else:
            d = np.stack([codec.distances(x, codes) for x in q])
        out[s: s + len(q)] = _topk(d, TOP)
    return out


def run_qkit(ds, base, Q, metric, name, seed):
    from qkit.ann.codecs import make_codec

    codec = make_codec(name, base.shape[1], metric, seed=seed)
    t0 = time.perf_counter()
    codec.fit(base)
    codes = codec.encode(base)
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    I = scan_qkit(codec, codes, Q)
    scan = time.perf_counter() - t0
    return codec.bytes_per_vector, enc, scan, I


def run_faiss(ds, base, Q, metric, name, seed):
    import faiss

    d = base.shape[1]
    fm = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    rr = faiss.RandomRotationMatrix(d, d)
    rr.init(seed + 1234)
    if name.startswith("rabitq"):
        bits = int(name[len("rabitq"):])
        inner = faiss.IndexRaBitQ(d, fm, bits)
        inner.qb = 4
        index = faiss.IndexPreTransform(rr, inner)
        t0 = time.perf_counter()
        index.train(base)
        index.add(base)
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, I = index.search(Q, TOP)
        scan = time.perf_counter() - t0
        return inner.code_size, enc, scan, I
    if name.startswith("tq"):
        bits = int(name[2:])
        sq = faiss.index_factory(d, f"SQtqmse{bits}", fm)
        index = faiss.IndexPreTransform(rr, sq)
        norms = np.linalg.norm(base, axis=1).astype(np.float32)
        unit = base / np.maximum(norms, 1e-30)[:, None]
        t0 = time.perf_counter()
        index.train(unit)
        codes = index.sa_encode(unit)
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        recon = index.sa_decode(codes) * norms[:, None]      # the norm rebuilt beside faiss's unit-vector code
        I = np.empty((len(Q), TOP), np.int64)
        for s in range(0, len(Q), 256):
            q = Q[s: s + 256]
            dist = ((recon ** 2).sum(1)[None, :] - 2 * q @ recon.T) if metric == "l2" else -(q @ recon.T)
            I[s: s + len(q)] = _topk(dist, TOP)
        scan = time.perf_counter() - t0
        return codes.shape[1] + 4, enc, scan, I
    raise ValueError(f"no faiss counterpart for {name}")


def per_rerank(records) -> list[dict]:
    """One JSON record per (dataset, impl, codec, rerank), recall_at_10 being that setting's recall."""
    out = []
    for r in records:
        base = {k: v for k, v in r.items() if not k.startswith("recall_")}
        for rr in RERANKS:
            key = "recall_at_10" if rr == 0 else f"recall_rerank_{rr}"
            out.append(dict(base, rerank=rr, recall_at_10=r[key], recall_at_10_per_seed=r[key + "_per_seed"]))
    return out


def table(records) -> str:
    head = f"{'dataset':14s} {'impl':6s} {'codec':8s} {'B/vec':>6s} {'enc Kvec/s':>10s} " \
           f"{'R@10':>7s} {'rr50':>7s} {'rr100':>7s} {'seeds':>5s}"
    rows = [head, "-" * len(head)]
    for r in records:
        rows.append(f"{r['dataset']:14s} {r['impl']:6s} {r['codec']:8s} {r['bytes_per_vector']:6d} "
                    f"{r['encode_vec_per_s'] / 1e3:10.1f} {r['recall_at_10']:7.4f} {r['recall_rerank_50']:7.4f} "
                    f"{r['recall_rerank_100']:7.4f} {r['seeds']:5d}")
    return "\n".join(rows)


def run_dataset(ds, names, fnames, seeds: int, echo=None) -> list[dict]:
    """One record per codec on dataset ds (all its queries): qkit codecs `names`, faiss counterparts `fnames`.

    Codecs with a random rotation run with seeds 0..seeds-1 and report the mean; echo(line), when
    given, receives a progress line per codec.
    """
    base, Q = np.ascontiguousarray(ds.base, np.float32), np.ascontiguousarray(ds.queries, np.float32)
    metric = "l2"
    if ds.metric == "cosine":
        from qkit.ann.index import normalize_rows

        base, Q, metric = normalize_rows(base), normalize_rows(Q), "ip"
    if echo:
        echo(f"# {ds.name}: {len(base)} x {base.shape[1]} ({ds.metric}), {len(Q)} queries")
    records = []
    for impl, entries, fn in (("qkit", names, run_qkit), ("faiss", fnames, run_faiss)):
        for name in entries:
            seeded = name.startswith(("rabitq", "tq", "qjl"))
            runs = []
            for seed in range(seeds if seeded else 1):
                bpv, enc, scan, I = fn(ds, base, Q, metric, name, seed)
                runs.append((bpv, enc, scan, _recalls(ds, base, Q, I, metric)))
            rec = {"dataset": ds.name, "impl": impl, "codec": name,
                   "bits": int("".join(ch for ch in name if ch.isdigit()) or 1) if name != "flat" else 32,
                   "bytes_per_vector": int(runs[0][0]), "seeds": len(runs),
                   "encode_vec_per_s": len(base) / float(np.mean([r[1] for r in runs])),
                   "scan_s": float(np.mean([r[2] for r in runs])), "n_queries": len(Q)}
            for rr in RERANKS:
                vals = [r[3][rr] for r in runs]
                key = "recall_at_10" if rr == 0 else f"recall_rerank_{rr}"
                rec[key] = round(float(np.mean(vals)), 4)
                rec[key + "_per_seed"] = [round(v, 4) for v in vals]
            rec["rerank"] = 0
            records.append(rec)
            if echo:
                echo(f"#   {impl} {name}: R@10 {rec['recall_at_10']:.4f}")
    return records


def main(argv=None) -> int:
    from qkit.eval import datasets
    from qkit.eval.machine import describe

    ap = argparse.ArgumentParser(prog="qkit bench codecs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=",".join(datasets.DATASETS))
    ap.add_argument("--codecs", default=",".join(DEFAULT_QKIT), help="qkit codec names")
    ap.add_argument("--faiss", default=",".join(DEFAULT_FAISS), help="faiss counterparts (rabitqB, tqB); '' for none")
    ap.add_argument("--nq", type=int, default=1000, help="queries scanned (the first NQ; default 1000)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for rotated codecs (mean reported)")
    ap.add_argument("--json", dest="json_path", default=None)
    a = ap.parse_args(argv)
    from qkit.ann.codecs import make_codec

    names = [c for c in a.codecs.split(",") if c]
    for n in names:
        make_codec(n, 8)   # unknown names fail before any work
    fnames = [c for c in a.faiss.split(",") if c]
    machine = describe()
    print(f"# machine: {machine.get('cpu')} ({', '.join(machine.get('flags', []))}), {machine.get('cores')} cores")
    records = []
    for dname in [d for d in a.datasets.split(",") if d]:
        ds = datasets.load_dataset(dname)
        ds = dataclasses.replace(ds, queries=ds.queries[: a.nq], gt=ds.gt[: a.nq],
                                 gt_D=None if ds.gt_D is None else ds.gt_D[: a.nq])
        records += run_dataset(ds, names, fnames, a.seeds, echo=lambda m: print(m, file=sys.stderr))
    print(table(records))
    if a.json_path:
        from qkit.fileio import atomic_write

        with atomic_write(a.json_path, "w") as f:
            json.dump({"machine": machine, "records": per_rerank(records)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
