"""qkit.ann: an HNSW index over quantized vector codes (faiss-style search, hnswlib-style parameters).

    from qkit.ann import Index
    index = Index(dim, metric="l2", codec="sq8", M=16, ef_construction=200)
    index.add(x); D, I = index.search(xq, k=10, ef=64, rerank=32)
"""
from qkit.ann.codecs import CODECS, METRICS, Codec, make_codec
from qkit.ann.index import Index, vectors_path

__all__ = ["CODECS", "METRICS", "Codec", "Index", "make_codec", "vectors_path"]
