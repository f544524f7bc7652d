"""Vector-set readers, registry datasets, exact ground truth and recall (qkit.eval.datasets).

Unit tests use small synthetic files under tmp_path; the `data` tests load the real
Fashion-MNIST and GloVe-50 (fetched into the qkit cache; ground truth cached after the first run)
and check the ground truth's first column against a plain numpy brute force, independent of faiss.
"""
import dataclasses
import gzip
import struct

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qkit.errors import FormatError, InputError, UsageError
from qkit.eval import datasets as ds

TEXMEX = {  # suffix: (writer, reader, dtype on disk)
    "fvecs": (ds.write_fvecs, ds.read_fvecs, np.float32),
    "ivecs": (ds.write_ivecs, ds.read_ivecs, np.int32),
    "bvecs": (ds.write_bvecs, ds.read_bvecs, np.uint8),
}


# ----------------------------------------------------------------------------- TEXMEX

@pytest.mark.parametrize("kind", TEXMEX)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_texmex_round_trip(kind, data, tmp_path_factory):
    write, read, dt = TEXMEX[kind]
    shape = data.draw(st.tuples(st.integers(0, 12), st.integers(0, 9)), label="shape")
    X = data.draw(hnp.arrays(dt, shape), label="X")  # floats include nan, inf and -0.0
    path = tmp_path_factory.mktemp(kind) / f"x.{kind}"
    write(path, X)
    assert path.stat().st_size == shape[0] * (4 + shape[1] * np.dtype(dt).itemsize)
    got = read(path)
    if shape[0] == 0:  # an empty file records no dimension: it reads back as (0, 0)
        assert got.shape == (0, 0) and got.dtype == dt
        return
    assert got.dtype == dt and got.shape == shape and got.flags.c_contiguous
    assert got.tobytes() == X.tobytes()  # bit-exact, nan payloads and -0.0 included
    mapped = read(path, mmap=True)
    assert mapped.tobytes() == X.tobytes() and not mapped.flags.writeable


def test_texmex_layout_is_little_endian_header_then_values(tmp_path):
    ds.write_fvecs(tmp_path / "a.fvecs", np.array([[1.5, -2.0]], dtype=np.float32))
    assert (tmp_path / "a.fvecs").read_bytes() == struct.pack("<iff", 2, 1.5, -2.0)
    ds.write_bvecs(tmp_path / "a.bvecs", np.array([[7, 255, 0]]))
    assert (tmp_path / "a.bvecs").read_bytes() == struct.pack("<i3B", 3, 7, 255, 0)


@pytest.mark.parametrize("kind", TEXMEX)
def test_truncated_texmex_is_a_format_error(kind, tmp_path):
    write, read, dt = TEXMEX[kind]
    path = tmp_path / f"x.{kind}"
    write(path, np.arange(15).reshape(5, 3).astype(dt))
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(FormatError, match="not a whole number of .*truncated"):
        read(path)
    path.write_bytes(raw[:2])
    with pytest.raises(FormatError, match="shorter than one row header"):
        read(path)


def test_inconsistent_dimensions_are_a_format_error(tmp_path):
    path = tmp_path / "x.fvecs"
    # row 0 has d=2 (12 bytes), row 1 claims d=5 (24 bytes): 36 bytes, a whole number of 12-byte rows
    path.write_bytes(struct.pack("<iff", 2, 1, 2) + struct.pack("<i5f", 5, 1, 2, 3, 4, 5))
    with pytest.raises(FormatError, match="row 1 has dimension 5, row 0 has 2"):
        ds.read_fvecs(path)
    with pytest.raises(FormatError, match="row 1 has dimension 5"):
        ds.read_fvecs(path, mmap=True)
    path.write_bytes(struct.pack("<iff", 2, 1, 2) + struct.pack("<if", 1, 1))  # 20 bytes
    with pytest.raises(FormatError, match="differ in dimension"):
        ds.read_fvecs(path)
    path.write_bytes(struct.pack("<if", -1, 0))
    with pytest.raises(FormatError, match="dimension -1"):
        ds.read_fvecs(path)


def test_missing_file_is_an_input_error(tmp_path):
    for read in (ds.read_fvecs, ds.read_ivecs, ds.read_bvecs, ds.read_npy, ds.read_idx, ds.read_hdf5):
        with pytest.raises(InputError, match="no such file"):
            read(tmp_path / "nope")
    with pytest.raises(InputError, match="not a regular file"):
        ds.read_fvecs(tmp_path)


def test_writers_refuse_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(InputError, match="2-D"):
        ds.write_fvecs(tmp_path / "a.fvecs", np.zeros(3))
    with pytest.raises(InputError, match="integers"):
        ds.write_ivecs(tmp_path / "a.ivecs", np.zeros((2, 2)))
    with pytest.raises(InputError, match=r"\[0, 255\]"):
        ds.write_bvecs(tmp_path / "a.bvecs", np.array([[256]]))
    with pytest.raises(InputError, match="int32|2147483647"):
        ds.write_ivecs(tmp_path / "a.ivecs", np.array([[2**31]]))
    with pytest.raises(InputError, match="real numbers"):
        ds.write_fvecs(tmp_path / "a.fvecs", np.array([["x"]]))
    assert not list(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- npy, IDX, HDF5

def test_npy(tmp_path):
    X = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    np.testing.assert_array_equal(ds.read_npy(tmp_path / "x.npy"), X)
    m = ds.read_vectors(tmp_path / "x.npy", mmap=True)
    assert isinstance(m, np.memmap) and not m.flags.writeable
    np.testing.assert_array_equal(m, X)

    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(FormatError, match="2-D numeric"):
        ds.read_npy(tmp_path / "one.npy")
    np.save(tmp_path / "obj.npy", np.array([[{}]], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="not a readable .npy"):
        ds.read_npy(tmp_path / "obj.npy")
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-5])
    for mmap in (False, True):
        with pytest.raises(FormatError, match="not a readable .npy"):
            ds.read_npy(tmp_path / "cut.npy", mmap=mmap)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(FormatError):
        ds.read_npy(tmp_path / "junk.npy")
    np.savez(tmp_path / "z.npz", X)
    (tmp_path / "z.npz").rename(tmp_path / "z.npy")
    with pytest.raises(FormatError, match="npz"):
        ds.read_npy(tmp_path / "z.npy")


def idx_bytes(X: np.ndarray, code: int) -> bytes:
    head = struct.pack(">BBBB", 0, 0, code, X.ndim) + struct.pack(f">{X.ndim}I", *X.shape)
    return head + X.astype(X.dtype.newbyteorder(">")).tobytes()


def test_idx(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (4, 3, 2), dtype=np.uint8)
    raw = idx_bytes(imgs, 0x08)
    assert raw[:4] == b"\x00\x00\x08\x03" and len(raw) == 16 + imgs.size  # the 16-byte image header
    (tmp_path / "i.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(ds.read_idx(tmp_path / "i.gz"), imgs)
    ints = np.array([[1, -2], [70000, 3]], dtype=np.int32)  # multi-byte values are big-endian on disk
    (tmp_path / "n.idx").write_bytes(idx_bytes(ints, 0x0C))
    got = ds.read_idx(tmp_path / "n.idx")
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, ints)

    (tmp_path / "bad.idx").write_bytes(b"\x00\x01\x08\x03" + raw[4:])
    with pytest.raises(FormatError, match="bad IDX magic 00010803"):
        ds.read_idx(tmp_path / "bad.idx")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(FormatError, match=r"shape \(4, 3, 2\) needs 24 bytes of data, the file has 23"):
        ds.read_idx(tmp_path / "cut.gz")
    (tmp_path / "fake.gz").write_bytes(raw)
    with pytest.raises(FormatError, match="cannot decompress"):
        ds.read_idx(tmp_path / "fake.gz")


def write_ann_benchmarks(path, distance, train, test, neighbors, distances):
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        f.attrs["point_type"] = "float"
        f["train"], f["test"] = train, test
        f["neighbors"], f["distances"] = neighbors, distances


def test_hdf5_ann_benchmarks_layout(tmp_path):
    rng = np.random.default_rng(2)
    train, test = rng.standard_normal((20, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    nb = np.argsort(((test[:, None] - train[None]) ** 2).sum(-1), axis=1)[:, :5].astype(np.int32)
    dist = np.sqrt(((test[:, None] - train[nb]) ** 2).sum(-1)).astype(np.float32)  # ann-benchmarks: not squared
    path = tmp_path / "tiny-4-euclidean.hdf5"
    write_ann_benchmarks(path, "euclidean", train, test, nb, dist)

    v = ds.read_hdf5(path)
    assert (v.name, v.metric) == ("tiny-4-euclidean", "l2")
    np.testing.assert_array_equal(v.base, train)
    np.testing.assert_array_equal(v.queries, test)
    assert v.gt.dtype == np.int64 and np.array_equal(v.gt, nb)
    np.testing.assert_allclose(v.gt_D, ds.true_distances(train, test, nb, "l2"), rtol=1e-5)  # squared now
    np.testing.assert_array_equal(ds.read_vectors(path, role="queries"), test)
    np.testing.assert_array_equal(ds.read_vectors(str(path), role="gt"), nb)
    np.testing.assert_array_equal(ds.read_vectors(path), train)

    write_ann_benchmarks(tmp_path / "a.h5", "angular", train, test, nb, dist)
    assert ds.read_hdf5(tmp_path / "a.h5").metric == "cosine"
    write_ann_benchmarks(tmp_path / "d.hdf5", "dot", train, test, nb, dist)
    assert ds.read_hdf5(tmp_path / "d.hdf5").gt_D is None
    write_ann_benchmarks(tmp_path / "h.hdf5", "hamming", train, test, nb, dist)
    with pytest.raises(FormatError, match="distance attribute 'hamming'"):
        ds.read_hdf5(tmp_path / "h.hdf5")
    write_ann_benchmarks(tmp_path / "s.hdf5", "euclidean", train, test, nb[:2], dist[:2])
    with pytest.raises(FormatError, match="inconsistent shapes"):
        ds.read_hdf5(tmp_path / "s.hdf5")

    with h5py.File(tmp_path / "no-gt.hdf5", "w") as f:
        f["train"] = train
    np.testing.assert_array_equal(ds.read_vectors(tmp_path / "no-gt.hdf5"), train)
    with pytest.raises(FormatError, match="no dataset 'neighbors'"):
        ds.read_vectors(tmp_path / "no-gt.hdf5", role="gt")

    (tmp_path / "junk.hdf5").write_bytes(b"\x89HDF junk" * 10)
    with pytest.raises(FormatError, match="not a readable HDF5"):
        ds.read_vectors(tmp_path / "junk.hdf5")
    raw = path.read_bytes()
    (tmp_path / "cut.hdf5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError):
        ds.read_hdf5(tmp_path / "cut.hdf5")


def test_read_vectors_dispatch(tmp_path):
    X = np.arange(6, dtype=np.float32).reshape(2, 3)
    ds.write_fvecs(tmp_path / "x.fvecs", X)
    np.testing.assert_array_equal(ds.read_vectors(tmp_path / "x.fvecs", role="queries"), X)  # role ignored
    ds.write_ivecs(tmp_path / "x.IVECS", X.astype(np.int32))
    assert ds.read_vectors(tmp_path / "x.IVECS").dtype == np.int32
    (tmp_path / "x.txt").write_text("1 2 3\n")
    with pytest.raises(UsageError, match=r"supported files are \.npy, \.fvecs, \.ivecs, \.bvecs, \.hdf5, \.h5"):
        ds.read_vectors(tmp_path / "x.txt")
    with pytest.raises(UsageError, match="datasets are fashion-mnist, glove-50"):
        ds.read_vectors("sift-1m")
    with pytest.raises(UsageError, match="role must be one of base, queries, gt"):
        ds.read_vectors(tmp_path / "x.fvecs", role="train")
    with pytest.raises(InputError, match="no such file"):
        ds.read_vectors(tmp_path / "missing.bvecs")
    with pytest.raises(UsageError, match="unknown dataset"):
        ds.load_dataset("sift-1m")


# ----------------------------------------------------------------------------- splits and ground truth

def test_holdout_split_is_seeded_disjoint_ordered_and_drops_zero_rows():
    X = np.random.default_rng(3).standard_normal((50, 4)).astype(np.float32)
    X[:, 0] = np.arange(50)  # column 0 names the row, to trace where each row went
    X[[4, 17]] = 0  # two all-zero rows: cosine is undefined for them
    base, queries = ds.holdout_split(X, 10, seed=0)
    assert base.shape == (38, 4) and queries.shape == (10, 4)
    ids_b, ids_q = base[:, 0].astype(int), queries[:, 0].astype(int)
    assert not set(ids_b) & set(ids_q)
    assert set(ids_b) | set(ids_q) == set(range(50)) - {4, 17}
    assert (np.diff(ids_q) > 0).all() and (np.diff(ids_b) > 0).all()  # original order kept
    again = ds.holdout_split(X, 10, seed=0)
    assert np.array_equal(again[1], queries) and np.array_equal(again[0], base)
    assert not np.array_equal(ds.holdout_split(X, 10, seed=1)[1], queries)
    assert ds.holdout_split(X, 10, drop_zero=False)[0].shape == (40, 4)
    with pytest.raises(UsageError, match="cannot hold out 48 queries from 48 rows"):
        ds.holdout_split(X, 48)


def numpy_knn(base, queries, k, metric):
    """The slow twin: every distance in float64, stable sort (ties to the smaller id)."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        d = ((q[:, None, :] - b[None]) ** 2).sum(-1)
    elif metric == "ip":
        d = -(q @ b.T)
    else:
        d = 1 - (q @ b.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(b, axis=1))
    I = np.argsort(d, axis=1, kind="stable")[:, :k]
    return I, np.take_along_axis(d, I, 1)


@pytest.mark.parametrize("metric", ds.METRICS)
def test_exact_knn_matches_numpy_including_ties(metric):
    rng = np.random.default_rng(4)
    base = rng.integers(-3, 4, (300, 6)).astype(np.float32)  # small integers: many exact ties
    base[200:] = base[:100]  # and exact duplicates
    base[np.all(base == 0, axis=1)] = 1
    queries = rng.integers(-3, 4, (25, 6)).astype(np.float32)
    queries[np.all(queries == 0, axis=1)] = 1
    I, D = ds.exact_knn(base, queries, 20, metric)
    rI, rD = numpy_knn(base, queries, 20, metric)
    assert I.dtype == np.int64 and D.dtype == np.float32
    np.testing.assert_allclose(D, rD, rtol=1e-6, atol=1e-6)
    if metric != "cosine":  # integer arithmetic: float64 distances are exact, so ids match tie for tie
        np.testing.assert_array_equal(I, rI)
    else:  # cosine divides: equal angles may round apart, so compare through the ties rule
        assert ds.recall_at_k(I, rI, 20, D=ds.true_distances(base, queries, I, metric), gt_D=rD) == 1.0
    with pytest.raises(UsageError, match="k=301"):
        ds.exact_knn(base, queries, 301, metric)


def test_exact_knn_cosine_refuses_zero_vectors():
    with pytest.raises(InputError, match="row 1 is zero"):
        ds.exact_knn(np.array([[1.0, 0], [0, 0]], np.float32), np.ones((1, 2), np.float32), 1, "cosine")


def test_true_distances():
    rng = np.random.default_rng(5)
    base, queries = rng.standard_normal((30, 5)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    I = rng.integers(0, 30, (4, 6))
    I[1, 2] = -1
    for metric in ds.METRICS:
        d = ds.true_distances(base, queries, I, metric)
        _, full = numpy_knn(base, queries, 30, metric)
        order = numpy_knn(base, queries, 30, metric)[0]
        ref = np.empty((4, 30))
        np.put_along_axis(ref, order, full, 1)
        want = np.take_along_axis(ref, np.where(I < 0, 0, I), 1)
        assert d[1, 2] == np.inf
        mask = I >= 0
        np.testing.assert_allclose(d[mask], want[mask], rtol=1e-6, atol=1e-6)


def test_ground_truth_is_cached_atomically_and_keyed_by_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(6)
    base, queries = rng.standard_normal((200, 8)).astype(np.float32), rng.standard_normal((9, 8)).astype(np.float32)
    I, D = ds.ground_truth(base, queries, 10, "l2", tag="toy")
    files = sorted(p.name for p in (tmp_path / "cache" / "gt").iterdir())
    assert len(files) == 2 and all(f.startswith("toy-l2-k10-") for f in files)  # no temporaries left

    def no_faiss(*a, **k):
        raise AssertionError("a cached ground truth must not be recomputed")

    real = ds.exact_knn
    monkeypatch.setattr(ds, "exact_knn", no_faiss)
    I2, D2 = ds.ground_truth(base, queries, 10, "l2", tag="toy")
    assert np.array_equal(I, I2) and np.array_equal(D, D2)
    with pytest.raises(AssertionError):  # other queries: another file
        ds.ground_truth(base, queries[:5], 10, "l2", tag="toy")

    monkeypatch.setattr(ds, "exact_knn", real)
    ids_file = next((tmp_path / "cache" / "gt").glob("*.ids.npy"))
    ids_file.write_bytes(b"garbage")  # a corrupt cache is recomputed, not trusted
    I3, _ = ds.ground_truth(base, queries, 10, "l2", tag="toy")
    assert np.array_equal(I, I3) and np.load(ids_file).shape == (9, 10)


def test_vector_dataset_checks_and_is_frozen():
    b, q = np.zeros((5, 3), np.float32), np.zeros((2, 3), np.float32)
    v = ds.VectorDataset("t", "l2", b, q, np.zeros((2, 4), np.int64))
    assert repr(v) == "VectorDataset('t', 'l2', base=(5, 3), queries=(2, 3), gt=(2, 4))"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.metric = "ip"
    with pytest.raises(InputError, match="metric must be one of l2, cosine, ip"):
        ds.VectorDataset("t", "euclidean", b, q, np.zeros((2, 4), np.int64))
    with pytest.raises(InputError, match="same dimension"):
        ds.VectorDataset("t", "l2", b, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.int64))
    with pytest.raises(InputError, match="integer ids"):
        ds.VectorDataset("t", "l2", b, q, np.zeros((3, 4), np.int64))


# ----------------------------------------------------------------------------- recall

def test_recall_at_k_by_hand():
    gt = np.array([[0, 1, 2], [3, 4, 5]])
    gt_D = np.array([[0.0, 1.0, 2.0], [1.0, 2.0, 2.0]])  # query 1: ids 4 and 5 tie at the 3rd distance
    I = np.array([[0, 2, -1], [3, 6, 7]])  # id 6 ties with 4 and 5 too (2.0); 7 is farther
    D = np.array([[0.0, 2.0, -np.inf], [1.0, 2.0, 3.0]])
    # without distances: {0, 2} of 3, {3} of 3
    assert ds.recall_at_k(I, gt, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    # with the ties rule: id 6 at the 3rd distance counts; -1 never does, whatever its D says
    assert ds.recall_at_k(I, gt, 3, D=D, gt_D=gt_D) == pytest.approx((2 / 3 + 2 / 3) / 2)
    # k=1 looks at the first column only; the ties threshold becomes gt_D[:, 0]
    assert ds.recall_at_k(I, gt, 1) == 1.0
    assert ds.recall_at_k(I, gt, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert ds.recall_at_k(I, gt, 2, D=D, gt_D=gt_D) == pytest.approx((1 / 2 + 2 / 2) / 2)
    # tolerance: just above the k-th distance counts within rtol, not beyond
    assert ds.recall_at_k([[9]], [[1]], 1, D=[[1.0 + 1e-7]], gt_D=[[1.0]]) == 1.0
    assert ds.recall_at_k([[9]], [[1]], 1, D=[[1.001]], gt_D=[[1.0]]) == 0.0


def test_recall_at_k_edge_cases():
    gt = np.array([[0, 1, 2]])
    assert ds.recall_at_k([[0, 0, 0]], gt, 3) == pytest.approx(1 / 3)  # a repeated id counts once
    assert ds.recall_at_k([[-1, -1, -1]], gt, 3) == 0.0
    assert ds.recall_at_k([[2, 1, 0, 7]], gt, 3) == 1.0  # order inside the top-k does not matter
    assert ds.recall_at_k([[1, 0, 9]], [[0, -1, 1]], 3) == pytest.approx(2 / 3)  # -1 in gt matches nothing
    # ids from different queries never match each other
    assert ds.recall_at_k([[5], [0]], [[0], [5]], 1) == 0.0
    with pytest.raises(UsageError, match="both D"):
        ds.recall_at_k(gt, gt, 3, D=np.zeros((1, 3)))
    with pytest.raises(UsageError, match="k=4"):
        ds.recall_at_k(gt, gt, 4)
    with pytest.raises(UsageError, match="one row per query"):
        ds.recall_at_k(np.zeros((2, 3), int), gt, 3)


# ----------------------------------------------------------------------------- the real datasets

def numpy_top1(base, queries, metric):
    """Brute force with one float64 matmul, no faiss: argmin, ties to the smaller id."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        return np.argmin((b * b).sum(1)[None] - 2 * q @ b.T, axis=1)
    return np.argmax((q @ b.T) / np.linalg.norm(b, axis=1)[None], axis=1)


def check_dataset(v, n_base, n_queries, dim, metric):
    assert (v.metric, v.base.shape, v.queries.shape) == (metric, (n_base, dim), (n_queries, dim))
    assert v.base.dtype == v.queries.dtype == np.float32
    assert v.gt.shape == v.gt_D.shape == (n_queries, 100) and v.gt.dtype == np.int64
    assert v.gt.min() >= 0 and v.gt.max() < n_base
    assert (np.diff(v.gt_D, axis=1) >= 0).all()
    assert not v.base.flags.writeable and not v.gt.flags.writeable
    sub = np.random.default_rng(0).choice(n_queries, 50, replace=False)
    np.testing.assert_array_equal(v.gt[sub, 0], numpy_top1(v.base, v.queries[sub], metric))
    assert ds.recall_at_k(v.gt, v.gt, 100, D=v.gt_D, gt_D=v.gt_D) == 1.0


@pytest.mark.data
def test_fashion_mnist():
    v = ds.load_dataset("fashion-mnist")
    check_dataset(v, 60_000, 10_000, 784, "l2")
    assert v.base.max() == 255 and np.array_equal(v.base, np.round(v.base))  # uint8 pixels as float32
    # squared L2 of integer pixels: the exact distances are integers
    assert np.array_equal(v.gt_D[:, 0], np.round(v.gt_D[:, 0]))


@pytest.mark.data
def test_glove_50():
    v = ds.load_dataset("glove-50")
    check_dataset(v, 390_000, 10_000, 50, "cosine")  # no zero rows in GloVe 6B 50-d: 400,000 - 10,000
    np.testing.assert_array_equal(ds.read_vectors("glove-50", role="queries"), v.queries)
    np.testing.assert_array_equal(ds.read_vectors("glove-50", role="gt"), v.gt)
    assert np.all(v.gt_D >= -1e-6) and np.all(v.gt_D <= 2 + 1e-6)
