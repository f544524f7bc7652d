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
from qkit.runtime.linear import QuantLinear, RuntimeOptions

HEAD_CHOICES = ("int8", "float")


ROWS_PER_CHUNK = 1024  # rows quantized at a time: the chunk and its float64 temporaries stay a few MB


def int8_rows(weight, *, bias=None, options: RuntimeOptions | None = None) -> QuantLinear:
    """W (out, in) on the 8-bit asymmetric per-row grid, as a QuantLinear in GPTQ's 8-bit layout, quantized and
    packed a chunk of rows at a time: nothing of the size of the float matrix is ever allocated (a float32
    49152 x 576 head is 113 MB, its codes 28 MB), only the packed words and one chunk. `weight`: anything
    sliceable by rows with a .shape (a tensor, an array, the loader's row reader)."""
    out, inp = weight.shape
    if inp % 4:
        raise ValueError("the 8-bit layout needs in-features divisible by 4")
    words = np.empty((inp // 4, out, 4), np.uint8)  # GPTQ 8-bit: word [k, o] holds inputs 4k..4k+3 of row o
    scale = np.empty((1, out), np.float32)
    zero = np.empty((1, out), np.uint8)
    for r0 in range(0, out, ROWS_PER_CHUNK):
        w = weight[r0:r0 + ROWS_PER_CHUNK]
        w = (w.detach().to(torch.float32).numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32))
        q = quantize_affine(w, bits=8, block_size=(1, -1))
        n = len(w)
        words[:, r0:r0 + n] = np.asarray(q.codes, np.uint8).reshape(n, inp // 4, 4).transpose(1, 0, 2)
        scale[0, r0:r0 + n] = np.asarray(q.scale, np.float32).reshape(-1)
        zero[0, r0:r0 + n] = np.asarray(q.zero).reshape(-1)
    return QuantLinear(words.view("<i4").reshape(inp // 4, out), zero, scale, bits=8, group_size=inp,
                       in_features=inp, out_features=out, bias=bias, options=options)


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


def head_names(model) -> tuple[str | None, str | None, bool]:
    """(head module name, embedding module name, tied) of a transformers causal LM; a name is None when that
    module cannot go to 8 bits here (not a plain Linear / Embedding, or a width not a multiple of 4)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)
    h = names.get(id(head)) if isinstance(head, torch.nn.Linear) and head.in_features % 4 == 0 else None
    e = names.get(id(emb)) if isinstance(emb, torch.nn.Embedding) and emb.weight.shape[1] % 4 == 0 and \
        emb.padding_idx is None and emb.max_norm is None else None
    if tied and (h is None or e is None):
        h = e = None  # a tied pair goes to 8 bits together or not at all
    return h, e, tied


def quantize_head(model, options: RuntimeOptions, weights, names=None) -> dict:
    """Replace the model's LM head and its embedding (tied: one matrix for both) by 8-bit ones built from
    `weights(module_name)` (the float weight, read from the checkpoint, never placed in the model); what was
    done."""
    h, e, tied = names or head_names(model)
    done = {}

    def checked(name):
        w, want = weights(name), tuple(model.get_submodule(name).weight.shape)
        if tuple(w.shape) != want:
            from qkit.errors import FormatError

            raise FormatError(f"tensor {name}.weight has shape {tuple(w.shape)} in the checkpoint but {want} in the "
                              "config's model")
        return w

    if h is not None:
        head = model.get_submodule(h)
        bias = head.bias if head.bias is not None and not head.bias.is_meta else None
        q = int8_rows(checked(h if not tied else e), bias=bias, options=options)
        model.set_output_embeddings(q)
        done["head"] = "int8 per row"
        if tied:
            model.set_input_embeddings(Int8Embedding(q))
            done["embedding"] = "int8 per row (the head's codes)"
    if e is not None and not tied:
        q = int8_rows(checked(e), options=options)
        model.set_input_embeddings(Int8Embedding(q))
        model._qkit_embedding_codes = q  # keeps its bytes alive
        done["embedding"] = "int8 per row"
    return done
