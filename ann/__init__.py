"""qkit.ann: an HNSW index over quantized vector codes (faiss-style search, hnswlib-style parameters)."""
