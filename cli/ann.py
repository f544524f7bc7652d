"""`qkit ann build` and `qkit ann search`: thin shells over qkit.ann.Index and qkit.ann.vectors (the built-in
sets and their ground truth: qkit.eval.datasets)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click
import numpy as np

from qkit.errors import InputError, UsageError

log = logging.getLogger("qkit.cli")


def _codecs() -> str:
    from qkit.ann import CODECS

    return ", ".join(CODECS)


def _check_out_dir(path: str | None, opt: str) -> None:
    """Fail before the work, not after it, when an output cannot be written."""
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"{opt} {path}: directory {Path(path).resolve().parent} does not exist")


def _write_json(path: str, record: dict) -> None:
    from qkit.fileio import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


@click.group("ann")
def ann_group() -> None:
    """Vector search: an HNSW graph over quantized codes, exact re-ranking from a stored copy.

    Codecs: flat, sq8, sq4 (affine grid per dimension), rabitq1..9 (RaBitQ, extended), tq1..8 (TurboQuant MSE),
    tqp2..8 (TurboQuant inner product) and qjl (QJL sign sketch), the last two for ip/cosine only.
    Commands: build, search (faiss-style D, I), bench (qkit vs hnswlib and faiss on one data set)."""


@ann_group.command("build")
@click.argument("vectors")
@click.option("-o", "--output", required=True, type=click.Path(), help="Index file to write (one file, the re-rank store included).")
@click.option("--metric", type=click.Choice(["l2", "ip", "cosine"]), default=None,
              help="Distance (default: the dataset's own, else l2).")
@click.option("--codec", default="sq8", show_default=True,
              help="Vector codec: flat, sq8, sq4, rabitq1..9, tq1..8; tqp2..8 and qjl for ip/cosine.")
@click.option("--M", "M", type=click.IntRange(2, 1024), default=16, show_default=True,
              help="Neighbours per node and layer (layer 0 keeps 2M).")
@click.option("--ef-construction", type=click.IntRange(1, None), default=200, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True, help="Insertion threads.")
@click.option("--store", type=click.Choice(["auto", "float", "u8", "sq8", "none"]), default="auto", show_default=True,
              help="Re-rank store kept in the index (the graph is built on it): float32, the data's own uint8 "
                   "values, an 8-bit grid, or none; auto = u8 for integer 0..255 data, else float.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random levels.")
@click.option("--reorder", type=click.Choice(["none", "bfs", "rcm", "kmeans"]), default="none", show_default=True,
              help="Renumber nodes after the build so layer-0 neighbours sit near each other in memory.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the build summary as JSON.")
def build_cmd(vectors, output, metric, codec, M, ef_construction, threads, store, seed, reorder, json_path):
    """Build an index over VECTORS (.npy, .fvecs, .bvecs, ann-benchmarks .hdf5, or fashion-mnist / glove-50)."""
    from qkit.ann import CODECS, Index
    from qkit.ann import vectors as vector_files
    from qkit.eval import datasets

    if codec not in CODECS:
        raise UsageError(f"unknown codec {codec!r}: expected one of {_codecs()}")
    _check_out_dir(output, "-o")
    _check_out_dir(json_path, "--json")
    if Path(output).is_dir():
        raise UsageError(f"-o {output}: is a directory; give the index file's name")
    inputs = (vectors,) if Path(vectors).exists() else ()
    out = Path(output)
    if any(out.exists() and Path(i).exists() and out.resolve() == Path(i).resolve() for i in inputs):
        raise UsageError(f"-o {output}: would overwrite the input {vectors}")
    X = vector_files.read_vectors(vectors, role="base")
    if metric is None:
        metric = datasets.load_dataset(vectors).metric if vectors in datasets.DATASETS else "l2"
    if X.ndim != 2 or len(X) == 0:
        raise InputError(f"{vectors}: no vectors to index (shape {X.shape})")
    index = Index(X.shape[1], metric, codec, M, ef_construction, store=None if store == "none" else store,
                  seed=seed)
    click.echo(f"{vectors}: {len(X)} x {X.shape[1]} ({metric}); codec {codec}, M={M}, "
               f"ef_construction={ef_construction}, {threads} thread(s)", err=True)
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(X), unit="vec", desc="build", disable=None, leave=False) as bar:
        def progress(done, total):
            bar.update(done - bar.n)
        index.add(X, threads=threads, progress=progress)
    if reorder != "none":
        index.reorder(reorder)
    build_s = time.perf_counter() - t0
    disk = index.save(output, inputs=inputs)
    rec = {"vectors": str(vectors), "n": int(len(X)), "dim": int(X.shape[1]), "metric": metric, "codec": codec,
           "store": index.store.name if index.store is not None else None,
           "M": M, "ef_construction": ef_construction, "threads": threads, "reorder": reorder,
           "build_s": round(build_s, 3),
           "index_bytes_on_disk": disk, "index_bytes_in_ram": index.bytes_in_ram(rerank=False),
           "index_bytes_in_ram_rerank": index.bytes_in_ram(rerank=True), "output": str(output)}
    click.echo(f"built in {build_s:.2f} s; {disk / 2**20:.1f} MiB on disk "
               f"({index.bytes_in_ram() / len(X):.1f} bytes/vector in RAM without re-ranking) -> {output}")
    if json_path:
        _write_json(json_path, rec)


def _read_gt(path: str, nq: int, k: int) -> np.ndarray:
    from qkit.ann import vectors

    p = Path(path)
    if p.suffix not in (".npy", ".ivecs"):
        raise UsageError(f"--gt {path}: expected a .npy or .ivecs file of ids")
    gt = np.asarray(vectors.read_vectors(path))
    if gt.ndim != 2 or not np.issubdtype(gt.dtype, np.integer):
        raise InputError(f"--gt {path}: expected a 2-D array of integer ids, got {gt.dtype} {gt.shape}")
    if len(gt) != nq:
        raise InputError(f"--gt {path}: {len(gt)} rows for {nq} queries")
    if gt.shape[1] < k:
        raise InputError(f"--gt {path}: {gt.shape[1]} columns, fewer than k={k}")
    return gt.astype(np.int64)


@ann_group.command("search")
@click.argument("index_path", metavar="INDEX")
@click.argument("queries")
@click.option("-k", "k", type=click.IntRange(1, None), default=10, show_default=True)
@click.option("--ef", type=click.IntRange(1, None), default=64, show_default=True, help="Search beam (raised to k).")
@click.option("--rerank", type=click.IntRange(0, None), default=0, show_default=True,
              help="Re-score this many codec candidates exactly from the re-rank store.")
@click.option("--gt", "gt_path", default=None,
              help="Ground-truth ids (.npy or .ivecs, one row per query); automatic for a dataset name.")
@click.option("-o", "--output", default=None, type=click.Path(),
              help="Write ids (.npy) or distances and ids (.npz).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write qps, recall and bytes as JSON.")
def search_cmd(index_path, queries, k, ef, rerank, gt_path, output, json_path):
    """Search INDEX with QUERIES (a vector file, or a dataset name for its held-out queries); report QPS and recall.

    QPS counts the search call alone, one thread, every query handed over at once."""
    from qkit.ann import Index, vectors, vectors_path
    from qkit.eval import datasets

    _check_out_dir(output, "-o")
    _check_out_dir(json_path, "--json")
    if output and Path(output).suffix not in (".npy", ".npz"):
        raise UsageError(f"-o {output}: expected a .npy (ids) or .npz (distances and ids) file")
    for opt, out in (("-o", output), ("--json", json_path)):
        if out and Path(out).is_dir():
            raise UsageError(f"{opt} {out}: is a directory")
        if out and any(Path(i).exists() and Path(out).exists() and Path(out).resolve() == Path(i).resolve()
                       for i in (index_path, queries, gt_path or "", str(index_path) + ".vectors")):
            raise UsageError(f"{opt} {out}: would overwrite an input")
    index = Index.load(index_path, mmap=True)   # the checksum pass reads every page once: search starts warm
    Q = vectors.read_vectors(queries, role="queries")
    gt, gt_d = None, None
    if gt_path:
        gt = _read_gt(gt_path, len(Q), k)
    elif queries in datasets.DATASETS:
        ds = datasets.load_dataset(queries)
        gt, gt_d = ds.gt, ds.gt_D
    if Q.ndim != 2 or Q.shape[1] != index.dim:
        raise InputError(f"{queries}: queries have {Q.shape[-1] if Q.ndim else 0} dimensions, "
                         f"the index has {index.dim}")
    t0 = time.perf_counter()
    D, I = index.search(Q, k, ef=ef, rerank=rerank)
    search_s = time.perf_counter() - t0
    qps = len(Q) / search_s if search_s > 0 else float("inf")
    reranked = rerank > 0 and index.store is not None and index.codec_name != "flat"
    disk = Path(index_path).stat().st_size
    if vectors_path(index_path).exists():   # a file from before 2026-11-23: the store beside it (a save removes it)
        disk += vectors_path(index_path).stat().st_size
    rec = {"index": str(index_path), "queries": str(queries), "n_queries": int(len(Q)), "k": k,
           "ef": max(ef, k, rerank if reranked else 0), "rerank": rerank if reranked else 0,
           "store": index.store.name if index.store is not None else None,
           "codec": index.codec_name, "metric": index.metric, "ntotal": index.ntotal, "dim": index.dim,
           "qps": round(qps, 1), "search_s": round(search_s, 4), "threads": 1,
           "index_bytes_in_ram": index.bytes_in_ram(rerank=reranked), "index_bytes_on_disk": disk,
           "recall_at_k": None}
    if gt is not None:
        # ties at the k-th distance count (the dataset's true distances of the returned ids, not estimates)
        true_d = datasets.true_distances(ds.base, Q, I, ds.metric) if gt_d is not None else None
        rec["recall_at_k"] = round(float(datasets.recall_at_k(I, gt, k, D=true_d, gt_D=gt_d)), 5)
    line = f"{len(Q)} queries, k={k}, ef={rec['ef']}, rerank={rec['rerank']}: {qps:,.0f} QPS (1 thread)"
    if rec["recall_at_k"] is not None:
        line += f", recall@{k} {rec['recall_at_k']:.4f}"
    click.echo(line + f"; {rec['index_bytes_in_ram'] / 2**20:.1f} MiB read by search")
    if output:
        from qkit.fileio import atomic_path

        with atomic_path(output, inputs=(index_path, queries)) as tmp:
            with open(tmp, "wb") as f:
                if output.endswith(".npz"):
                    np.savez(f, D=D, I=I)
                else:
                    np.save(f, I)
    if json_path:
        _write_json(json_path, rec)


@ann_group.command("bench", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cmd(args: tuple[str, ...]) -> None:
    """qkit against hnswlib and faiss on a dataset: recall@10 vs QPS, bytes, build time (--help for options)."""
    from qkit.eval import bench_ann

    bench_ann.main(list(args))
