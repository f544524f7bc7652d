"""Every codec name behind one interface: shapes, state round trips, batch = single, ranking quality."""
import numpy as np
import pytest

from qkit.ann.codecs import GRAPH_CODECS, codec_class, codec_names, make_codec
from qkit.errors import UsageError

from test_ann import brute_force, clustered

NAMES = codec_names()


@pytest.fixture(scope="module")
def data():
    x = clustered(2000, 40, n_clusters=20, seed=31)
    rng = np.random.default_rng(32)
    q = (x[rng.integers(0, len(x), 30)] + 0.5 * rng.normal(size=(30, 40))).astype(np.float32)
    return x, q


def test_names_follow_the_issue():
    want = ["flat", "sq8", "sq4"] + [f"rabitq{b}" for b in range(1, 10)] + [f"tq{b}" for b in range(1, 9)] + \
        [f"tqp{b}" for b in range(2, 9)] + ["qjl"]
    assert sorted(NAMES) == sorted(want)
    for bad in ("rabitq0", "rabitq10", "tq9", "tqp1", "qjl2", "pq"):
        with pytest.raises(UsageError, match="unknown codec"):
            make_codec(bad, 8)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codec_contract(name, metric, data):
    x, q = data
    c = make_codec(name, 40, metric).fit(x)
    codes = c.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (len(x), c.bytes_per_vector)
    assert c.decode(codes).shape == x.shape
    d1 = c.distances(q[0], codes)
    dm = c.distances_many(q[:3], codes)
    assert d1.dtype == np.float32 and d1.shape == (len(x),)
    if name == "rabitq1":   # one query at a time it is quantized to 4 bits (AND-popcount); batches stay float
        assert np.mean(np.abs(dm[0] - d1)) < 0.15 * d1.std() and np.corrcoef(dm[0], d1)[0, 1] > 0.98
    else:
        np.testing.assert_allclose(dm[0], d1, rtol=1e-3, atol=1e-3 * (np.abs(d1).max() + 1))
    params, arrays = c.state()
    c2 = codec_class(name).from_state(40, metric, params, arrays)
    np.testing.assert_array_equal(c2.encode(x), codes)   # same batch: BLAS blocking may differ by batch size
    # the estimate ranks well enough to be a codec at all: recall@10 after re-ranking the best 100 exactly
    gt = brute_force(x, q, 10, "l2" if metric == "l2" else "ip")
    top = np.argsort(c.distances_many(q, codes), axis=1)[:, :100]
    ex = ((x[top] - q[:, None]) ** 2).sum(-1) if metric == "l2" else -(x[top] * q[:, None]).sum(-1)
    I = np.take_along_axis(top, np.argsort(ex, axis=1)[:, :10], 1)
    rec = np.mean([len(set(I[i]) & set(gt[i])) / 10 for i in range(len(q))])
    assert rec >= (0.8 if name in ("qjl", "rabitq1", "tq1") else 0.95), rec


def test_every_codec_enters_the_index_inner_product_ones_for_ip_only():
    from qkit.ann import Index

    assert set(GRAPH_CODECS) == set(NAMES)
    for name in ("tqp3", "qjl"):
        with pytest.raises(UsageError, match="use it with metric ip or cosine"):
            Index(16, "l2", codec=name)
        Index(16, "cosine", codec=name)
    with pytest.raises(UsageError, match="needs a re-rank store"):
        Index(16, codec="rabitq4", store=None)


def _walk_distances(c, x, q, metric):
    """The compiled walk distance (both ISAs) of each query to every code: list of (nq, n) arrays."""
    from qkit.ext import _hnsw, cpu_flags

    walk = c.walk_encode(x)
    assert walk.dtype == np.uint8 and walk.shape == (len(x), c.walk_bytes)
    p0, p1 = c.c_params()
    Qw = c.walk_queries(q)
    assert Qw.shape == (len(q), c.walk_dim)
    return [np.stack([_hnsw.codec_distances(c.c_kind, 0 if metric == "l2" else 1, c.walk_dim, walk, p0, p1, isa,
                                            Qw[i]) for i in range(len(q))])
            for isa in [0] + ([1] if cpu_flags().get("avx2") else [])]


@pytest.mark.parametrize("name,metric", [(f"tq{b}", m) for b in range(1, 9) for m in ("l2", "ip")]
                         + [(f"tqp{b}", "ip") for b in range(2, 9)] + [("qjl", "ip"), ("rabitq9", "l2"),
                                                                        ("rabitq9", "ip")])
def test_walk_distance_equals_the_codec_estimator(name, metric, data):
    """The graph's integer walk (int8 query, codes re-laid on uint8 grids) against the codec's float estimator.

    The walk differs by the query's int8 rounding and, for TurboQuant, by each centroid's move to the nearest
    point of a 255-step grid (u8_grid): mean errors of 0.5-2.5% of the estimates' spread (measured on this
    data), rankings correlated at > 0.9999."""
    x, q = data
    c = make_codec(name, 40, metric).fit(x)
    ref = c.distances_many(q[:6], c.encode(x))
    got = _walk_distances(c, x, q[:6], metric)
    if len(got) == 2:   # scalar and AVX2 kernels agree up to float summation order
        np.testing.assert_allclose(got[0], got[1], rtol=1e-4, atol=1e-4 * np.abs(got[0]).max())
    for i in range(6):
        spread = ref[i].std()
        assert np.abs(got[0][i] - ref[i]).mean() < 0.035 * spread + 1e-6, name
        assert np.corrcoef(got[0][i], ref[i])[0, 1] > 0.9999


def test_u8_grid_keeps_symmetric_codebooks_symmetric():
    from qkit.ann.codecs import u8_grid
    from qkit.turboquant import codebook

    for b in range(1, 9):
        c = codebook(64, b)[0]
        T, alpha = u8_grid(c)
        assert T.dtype == np.uint8 and np.all(T.astype(int) + T[::-1] == 255)
        assert np.abs(alpha * (T - 127.5) - c).max() <= alpha / 2 + 1e-12


@pytest.mark.parametrize("name,metric,ef,rerank", [("tq4", "l2", 64, 32), ("tq1", "l2", 128, 128),
                                                   ("tq8", "ip", 64, 0), ("tqp4", "ip", 64, 64),
                                                   ("qjl", "ip", 64, 64), ("rabitq9", "l2", 64, 0)])
def test_vector_quantizers_in_the_graph(name, metric, ef, rerank, data, tmp_path):
    from qkit.ann import Index

    x, q = data
    idx = Index(40, metric, name, ef_construction=80)
    idx.add(x)
    _, I = idx.search(q, 10, ef=ef, rerank=rerank)
    gt = brute_force(x, q, 10, metric)
    assert np.mean([len(set(I[i]) & set(gt[i])) / 10 for i in range(len(q))]) >= 0.95
    idx.save(tmp_path / "v.qkit")
    np.testing.assert_array_equal(Index.load(tmp_path / "v.qkit").search(q, 10, ef=ef, rerank=rerank)[1], I)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rabitq_walk_distance_equals_the_estimator(bits, metric, data):
    """The graph's compiled RaBitQ distance (int8 query over u codes) against qkit.rabitq's float estimator."""
    from qkit.ext import _hnsw, cpu_flags

    x, q = data
    c = make_codec(f"rabitq{bits}", 40, metric).fit(x)
    walk = c.walk_encode(x)
    assert walk.shape == (len(x), c.walk_bytes)
    p0, p1 = c.c_params()
    ref = c.q.distances_many(q[:4], c.encode(x), metric)
    for isa in [0] + ([1] if cpu_flags().get("avx2") else []):
        for i in range(4):
            d = _hnsw.codec_distances(c.c_kind, 0 if metric == "l2" else 1, c.walk_dim, walk, p0, p1, isa,
                                      c.walk_queries(q[i: i + 1])[0])
            # the only difference is the query's int8 rounding (coarser for ip: the query is not centred)
            tol = 0.01 if metric == "l2" else 0.03
            assert np.abs(d - ref[i]).mean() < tol * np.abs(ref[i]).mean() + 1e-3
            assert np.corrcoef(d, ref[i])[0, 1] > 0.999


@pytest.mark.parametrize("name,rerank,want", [("rabitq4", 32, 0.95), ("rabitq8", 0, 0.95), ("rabitq2", 64, 0.95)])
def test_rabitq_in_the_graph(name, rerank, want, data, tmp_path):
    from qkit.ann import Index

    x, q = data
    idx = Index(40, "l2", name, ef_construction=80)
    idx.add(x)
    _, I = idx.search(q, 10, ef=64, rerank=rerank)
    gt = brute_force(x, q, 10, "l2")
    assert np.mean([len(set(I[i]) & set(gt[i])) / 10 for i in range(len(q))]) >= want
    idx.save(tmp_path / "r.qkit")
    np.testing.assert_array_equal(Index.load(tmp_path / "r.qkit").search(q, 10, ef=64, rerank=rerank)[1], I)
