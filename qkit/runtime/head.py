"""The LM head and the token embedding at 8 bits, one matrix for both when they are tied.

On the default model the tied 49152 x 576 embedding/head is 21% of the weights, and in float32 the head
alone reads 113 MB per decoded token: more than all 4-bit decoder linears together. The runtime therefore
quantizes it at load (unless asked not to, `--head float`): RTN on qkit's affine grid, 8 bits, asymmetric,
one group per row (qkit.affine), stored in GPTQ's 8-bit layout so the W8A8 GEMV computes the logits. The
same codes serve the embedding lookup: row t of the embedding is column t of that layout,
E[t, i] = scale[t] * (code[i, t] - zero[t]), gathered from the 4-byte words of each input quadruple. Its cost
in perplexity is measured by `qkit eval ppl --head int8|float` and reported in `qkit bench runtime`.
"""
from __future__ import annotations

import numpy as np
import torch

from qkit.affine import quantize_affine
from qkit.export.common import AffineTensors
from qkit.runtime.linear import QuantLinear, RuntimeOptions

HEAD_CHOICES = ("int8", "float")


def int8_rows(weight: torch.Tensor) -> AffineTensors:
    """W (out, in) on the 8-bit asymmetric per-row grid, as a reader's AffineTensors."""
    w = weight.detach().to(torch.float32).numpy()
    q = quantize_affine(w, bits=8, block_size=(1, -1))
    out, inp = w.shape
    return AffineTensors(q.codes, np.asarray(q.scale, np.float32).reshape(out, 1),
                         np.asarray(q.zero, np.int64).reshape(out, 1), np.zeros(inp, np.int64), 8)


class Int8Embedding(torch.nn.Module):
    """nn.Embedding's lookup over an 8-bit QuantLinear's codes (the tied head's), float32 rows out."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        if head.bits != 8 or head.perm is not None or head.group_size != head.in_features:
            raise ValueError("the embedding reads an 8-bit per-row head")
        self.head = [head]  # not a submodule: the head is the model's, this only reads its bytes
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        words = head._qweight.view(np.uint8).reshape(head.in_features // 4, head.out_features, 4)
        self._codes = torch.from_numpy(words)  # [k, t, j] = code of input 4k + j of row t
        self._scale = torch.from_numpy(head._scales[0])
        self._zero = torch.from_numpy(head._zeros[0].astype(np.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = self._codes.index_select(1, flat).permute(1, 0, 2).reshape(flat.numel(), self.embedding_dim)
        rows = (codes.to(torch.float32) - self._zero[flat, None]) * self._scale[flat, None]
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows of the head"


def quantize_head(model, options: RuntimeOptions) -> dict:
    """Replace the model's LM head (and its embedding, tied or not) by 8-bit ones; what was done."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    done = {}
    if isinstance(head, torch.nn.Linear) and head.in_features % 4 == 0:
        tied = emb is not None and emb.weight is head.weight
        q = QuantLinear.from_affine(int8_rows(head.weight), bias=head.bias, options=options)
        model.set_output_embeddings(q)
        done["head"] = "int8 per row"
        if tied:
            model.set_input_embeddings(Int8Embedding(q))
            done["embedding"] = "int8 per row (the head's codes)"
        head = q
    if "embedding" not in done and isinstance(emb, torch.nn.Embedding) and emb.weight.shape[1] % 4 == 0 \
            and emb.padding_idx is None and emb.max_norm is None:
        q = QuantLinear.from_affine(int8_rows(emb.weight), options=options)
        model.set_input_embeddings(Int8Embedding(q))
        model._qkit_embedding_codes = q  # keeps its bytes alive
        done["embedding"] = "int8 per row"
    return done
