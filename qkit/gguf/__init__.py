"""GGUF, llama.cpp's file format, read and written in one place.

    check.py      structure check of a GGUF before any byte is trusted (counts, sizes, offsets; no code runs)
    read.py       a GGUF to a transformers model: tensors dequantized, Q/K un-permuted, metadata to config.json
    tokenizer.py  a GGUF's vocabulary rebuilt as a `tokenizers` tokenizer that splits text as llama.cpp does
    hf_meta.py    an HF directory's config and tokenizer as GGUF metadata (what convert_hf_to_gguf.py writes)
    write.py      a model written as a GGUF in one of llama.cpp's mixes (qkit.ggml's blocks, byte-identical)

The GGML block types themselves (the grids: q4_0 .. q6_K, their quantizers and the mixes' rules) are
qkit.ggml; the GGUF architecture names come from the one architecture table, qkit.model.arch.
"""
