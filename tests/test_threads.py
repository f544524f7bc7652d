"""Thread safety of qkit.ann.Index: concurrent searches equal serial ones; add/remove during search stay valid."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from qkit.ann import Index

N_THREADS = 8


def clustered(n, d, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(32, d)) * 4
    return (centers[rng.integers(0, 32, n)] + rng.normal(size=(n, d))).astype(np.float32)


def run_threads(fn, n=N_THREADS):
    errors, results = [], [None] * n

    def wrap(t):
        try:
            results[t] = fn(t)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(t,)) for t in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def index():
    x = clustered(4000, 24, seed=1)
    idx = Index(24, "l2", "sq8", M=12, ef_construction=60, store="float")
    idx.add(x)
    idx.remove(np.arange(0, 4000, 7))
    return idx, x


@pytest.mark.parametrize("kw", [{}, {"rerank": 30}, {"filter": np.arange(0, 4000, 3)},
                                {"filter": np.arange(4000) % 2 == 0, "rerank": 20}, {"ef": 16}])
def test_concurrent_searches_equal_serial(index, kw):
    idx, x = index
    q = x[::40] + 0.1
    want = idx.search(q, 10, **kw)
    for D, I in run_threads(lambda t: idx.search(q, 10, **kw)):
        np.testing.assert_array_equal(I, want[1])
        np.testing.assert_array_equal(D, want[0])
    # the index's own thread pool splits the queries: the same answers
    D, I = idx.search(q, 10, threads=4, **kw)
    np.testing.assert_array_equal(I, want[1])


def test_add_and_remove_during_search_return_only_live_ids():
    """Writers take the index exclusively (the reader-writer lock in qkit.ann.index): every search sees the
    index between two writes, so it never returns an id removed before it started, nor one never added."""
    x = clustered(6000, 16, seed=2)
    idx = Index(16, "l2", "sq8", M=8, ef_construction=40, store="float")
    idx.add(x[:2000])
    added = set(range(2000))
    removed_done: list[int] = []       # ids whose remove() has returned, in order
    lock = threading.Lock()
    stop = threading.Event()

    def writer():
        rng = np.random.default_rng(5)
        for s in range(2000, 6000, 500):
            idx.add(x[s: s + 500], ids=np.arange(s, s + 500))
            with lock:
                added.update(range(s, s + 500))
            victims = rng.choice(sorted(added - set(removed_done)), 150, replace=False)
            idx.remove(victims)
            with lock:
                removed_done.extend(int(v) for v in victims)
        stop.set()

    def searcher(t):
        q = x[t::97][:20] + 0.05
        rounds = 0
        while not stop.is_set() or rounds < 3:
            with lock:
                gone_before = set(removed_done)
            _, I = idx.search(q, 5, rerank=10 if t % 2 else 0, filter=None if t % 3 else np.arange(0, 6000, 2))
            with lock:
                ever = set(added)
            got = set(I[I >= 0].tolist())
            assert got <= ever, f"ids never added: {sorted(got - ever)[:5]}"
            assert not got & gone_before, f"ids removed before the search began: {sorted(got & gone_before)[:5]}"
            if t % 3:
                assert (I >= 0).all()   # k = 5 of thousands live: always found
            rounds += 1
        return rounds

    w = threading.Thread(target=writer)
    w.start()
    rounds = run_threads(searcher)
    w.join()
    assert min(rounds) >= 3
    live = sorted(added - set(removed_done))
    assert idx.n_live == len(live)
    _, I = idx.search(x[live[:50]], 1, rerank=10)
    assert np.mean(I[:, 0] == np.array(live[:50])) > 0.9
