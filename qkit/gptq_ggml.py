"""GPTQ and AWQ into llama.cpp's GGML mixes, written as GGUF (`qkit quantize --method gptq|awq --type Q4_K_M`).

The mix (qkit.ggml.mixes, llama.cpp's llama-quant.cpp rules) gives every tensor its
GGML type. The linears of the decoder layers are then quantized by a calibrated
chooser running in qkit's sequential pipeline (qkit.pipeline, the GPTQ paper's
layer-by-layer scheme); every other tensor (token embedding, output head, norms)
is written exactly as the RTN path writes it (qkit.gguf.write: llama.cpp's
own rounding, with the importance matrix when one is given).

* gptq: GPTQ (qkit.gptq) on the GGML grid of the linear's type (qkit.ggml.grid):
  each (super-)block's scales and mins from llama.cpp's search on the weights as
  GPTQ has left them when it reaches the block, then column-by-column rounding
  inside that grid with GPTQ's error feedback. The search is llama.cpp's
  importance-weighted one (quantize_row_<type>_impl), weighted by the given
  importance matrix or, without one, by the diagonal of GPTQ's own Hessian: the
  per-column sum of x^2 over the same calibration tokens, which is what an
  imatrix holds (hessian_importance).
  Act-order (the default here: on the default model it beats GPTQ without it at
  both Q4_K_M and Q3_K_M, eval/report) implies static groups: the blocks are
  searched up front on the original weights, and only the processing order
  follows decreasing diag(H); GGML blocks stay positional, so nothing changes
  at run time.
* awq: AWQ's scales (qkit.awq), searched with the GGML type's own rounding as the
  quantizer (llama.cpp's reference search, no importance matrix, during the alpha
  search), folded into norms and linears; then the scaled linears are rounded by
  llama.cpp's quantizer of their type. An importance matrix enters that final
  rounding divided by s^2 per input channel (the scaled linear sees x / s, so its
  mean squared input is E[x^2] / s^2). AWQ's clip search is off: llama.cpp's
  searches already choose each block's range.

The chosen blocks are kept in memory (about the GGUF's size) and handed to the
GGUF writer; the pipeline's float output goes to a temporary directory (it holds
the folded norms of AWQ) and is removed afterwards.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from qkit import ggml
from qkit.errors import QkitError, UsageError
from qkit.ggml import mixes
from qkit.ggml.grid import GGMLGrid
from qkit.gptq import GPTQ, GPTQConfig, gptq_quantize
from qkit.chooser import BlockResult, ChooserBase

log = logging.getLogger("qkit.gptq_ggml")
FLOAT_TYPES = ("f32", "f16")


def plan_types(ref, mix: str, has_imatrix: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """({HF linear name: GGML type}, {HF linear name: GGUF tensor name}) for the decoder layers' weights,
    as qkit.gguf.write will choose them (the same mixes.choose_types on the same shapes)."""
    from qkit.model import loader
    from qkit.gguf.write import hf_to_gguf_names
    from qkit.model.arch import gguf_arch

    config = loader.load_config(ref)
    arch = gguf_arch(config).name
    names = hf_to_gguf_names(config)
    store = ref.store()
    try:
        present = {names[n]: n for n in store.keys() if n in names}
        shapes = {g: tuple(reversed(store.shape(h))) for g, h in present.items()}
    finally:
        store.close()
    shape = mixes.ModelShape(config.num_hidden_layers, config.num_attention_heads,
                             getattr(config, "num_key_value_heads", None) or config.num_attention_heads, arch)
    types = mixes.choose_types(shapes, mix, shape, has_imatrix=has_imatrix)
    lin = {h[: -len(".weight")]: g for g, h in present.items()
           if g.startswith("blk.") and h.endswith(".weight") and len(shapes[g]) == 2}
    return {h: types[g] for h, g in lin.items()}, lin


def _float_result(W: np.ndarray, t: str) -> BlockResult:
    """A linear the mix leaves in F32/F16: what the GGUF will hold."""
    Q = W.astype(np.float16).astype(np.float32) if t == "f16" else W.astype(np.float32)
    return BlockResult(Q, t, None)


def hessian_importance(H) -> np.ndarray:
    """diag(H) as an importance matrix: H = sum_t x_t x_t^T (up to a constant), so its diagonal is the per-column sum
    of x^2 that llama.cpp's imatrix holds (llama-imatrix: the mean of x^2 over the calibration tokens, so the
    two differ by the token count, a factor the weighted searches barely see). GPTQ minimises tr(dW H dW^T),
    whose diagonal part weighs a column's error by exactly this; a column no calibration token reached gets a tiny weight, not zero, so a
    block of such columns still has a defined search."""
    d = np.asarray(H.diagonal().double().cpu().numpy() if hasattr(H, "double") else np.diagonal(H), np.float64)
    d = np.where(np.isfinite(d) & (d > 0), d, 0.0)
    return (d + 1e-6 * (d.mean() or 1.0)).astype(np.float32)


class GGMLGPTQ(GPTQ):
    """GPTQ with each linear's GGML grid; keeps {name: (type, GGML rows)} in `blocks`."""

    affine_grid = None  # GGML blocks (BlockResult): no packed affine format holds them

    def __init__(self, types: dict[str, str], cfg: GPTQConfig = GPTQConfig(), imatrix: dict | None = None,
                 hessian_importance: bool = True):
        # act-order needs the blocks fixed up front (qkit.gptq: a positional grid): static groups
        super().__init__(replace(cfg, static_groups=cfg.static_groups or cfg.act_order))
        self.types = types
        self.imatrix = imatrix or {}
        self.hessian_importance = hessian_importance  # False: llama.cpp's unweighted search where no imatrix
        self.blocks: dict[str, tuple[str, np.ndarray]] = {}

    def quantize(self, name: str, W: np.ndarray) -> BlockResult:
        import torch

        t = self.types.get(name)
        if t is None:
            raise UsageError(f"{name}: the mix gives this linear no GGML type")
        H = self.H.pop(name, None)
        D = self.D.pop(name, None)  # GPTAQ's cross term, when cfg.gptaq
        self.n.pop(name, None)
        self._last = None
        if t in FLOAT_TYPES:
            return _float_result(W, t)
        if H is None:
            raise UsageError(f"GPTQ got no calibration inputs for {name}")
        im = self.imatrix.get(name)
        if im is None and self.hessian_importance:  # no --imatrix: the calibration's own, diag(H)
            im = hessian_importance(H)
        # llama.cpp's legacy _impl searches weight by sqrt(sigma2 + x^2), sigma2 = mean x^2 of the row
        sigma2 = (W.astype(np.float32) ** 2).mean(axis=1, dtype=np.float32) if im is not None else None
        grid = GGMLGrid(t, W.shape[1], im, row_sigma2=sigma2)
        cfg = replace(self.cfg, grid=replace(self.cfg.grid, group_size=grid.block_size))
        Q, codes, a, m, _ = gptq_quantize(torch.from_numpy(W), H, cfg, grid, D)
        Q = Q.numpy().astype(np.float32)
        blocks = grid.pack(codes.numpy())
        ggml.validate(blocks, t)
        if not np.array_equal(ggml.dequantize(blocks, t, W.shape), Q):
            raise QkitError(f"{name}: the packed {t} blocks do not decode to GPTQ's weights (a qkit bug)")
        self.blocks[name] = (t, blocks)
        return BlockResult(Q, t, blocks)


class LlamaCppRounding(ChooserBase):
    """llama.cpp's quantizer of each linear's GGML type (its searched scales, qkit.ggml) as a calibration-free
    chooser: AWQ's rounding inside a mix.

    An importance matrix is used only for names in `input_scale` (set for the final rounding),
    divided by s^2 there: the scaled linear sees x / s.
    """

    name = "llama.cpp"
    needs_calibration = False
    affine_grid = None  # GGML blocks (BlockResult)

    def __init__(self, types: dict[str, str], imatrix: dict | None = None):
        self.types = types
        self.imatrix = imatrix or {}
        self.input_scale: dict = {}
        self.blocks: dict[str, tuple[str, np.ndarray]] = {}

    def quantize(self, name: str, W: np.ndarray) -> BlockResult:
        t = self.types.get(name)
        if t is None:
            raise UsageError(f"{name}: the mix gives this linear no GGML type")
        if t in FLOAT_TYPES:
            return _float_result(W, t)
        im = None
        if name in self.input_scale and self.imatrix.get(name) is not None:
            s = self.input_scale.pop(name)
            im = self.imatrix[name] if s is None else (self.imatrix[name] / (np.asarray(s, np.float64) ** 2)
                                                       ).astype(np.float32)
        blocks = ggml.quantize(W, t, imatrix=im)
        ggml.validate(blocks, t)
        Q = ggml.dequantize(blocks, t, W.shape)
        self.blocks[name] = (t, blocks)
        return BlockResult(Q, t, blocks)


def awq_chooser(types: dict[str, str], cfg, imatrix: dict | None = None):
    """AWQ (qkit.awq) whose quantizer is LlamaCppRounding; the final rounding sees the folded scales."""
    from qkit.awq import AWQ

    class AWQGGML(AWQ):
        def quantize(self, name: str, W: np.ndarray) -> BlockResult:
            s = self.input_scale.get(name)
            self.rounding.input_scale[name] = None if s is None else s.numpy()
            return super().quantize(name, W)

    return AWQGGML(replace(cfg, clip=False), rounding=LlamaCppRounding(types, imatrix))


def quantize_gguf(ref, out: str | os.PathLike, mix: str, method: str, samples, *, calibration: str | None = None,
                  imatrix: dict | None = None, gptq: GPTQConfig | None = None, awq=None, progress: bool = False,
                  inputs=()):
    """Quantize `ref` with a calibrated chooser into llama.cpp's mix `mix`; write the GGUF `out`.

    method "gptq" (config `gptq`; default act-order, as `qkit quantize --type` has it) or "awq" (config `awq`, an
    AWQConfig); samples: calibration token ids (n, seqlen); imatrix: {GGUF name: importance}
    (qkit.imatrix.read_imatrix). Returns the GGUFSummary.
    """
    from qkit import pipeline
    from qkit.gguf.write import check_writable, write_gguf

    t0 = time.perf_counter()
    mix = mixes.mix_name(mix)
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; give a .gguf file name")
    for f in (*ref.input_files(), *inputs):
        if f is not None and Path(f).exists() and Path(f).resolve() == out.resolve():
            raise UsageError(f"refusing to overwrite the input file {f}")
    check_writable(ref)  # the tokenizer and names, before any calibration
    types, gnames = plan_types(ref, mix, has_imatrix=imatrix is not None)
    im = {h: imatrix[g] for h, g in gnames.items() if imatrix and g in imatrix} if imatrix else None
    if method == "gptq":
        chooser = GGMLGPTQ(types, gptq or GPTQConfig(act_order=True), im)
        blocks_of = chooser
    elif method == "awq":
        from qkit.awq import AWQConfig

        chooser = awq_chooser(types, awq or AWQConfig(), im)
        blocks_of = chooser.rounding
    else:
        raise UsageError(f"--method {method} into GGML grids is not available; --type takes rtn, gptq or awq")
    # No temporary model: the layer walk hands each layer to a sink that keeps only what the chooser may have
    # changed and holds no GGML blocks for (norms AWQ folded its scales into, biases); the GGUF writer reads
    # everything else from the source store and takes the linears' blocks from the chooser.
    sink = KeepUnblocked(blocks_of.blocks)
    pipeline.quantize_layers(ref, chooser, sink, samples=samples, progress=progress)
    blocks = {gnames[h]: b for h, b in blocks_of.blocks.items()}
    missing = [gnames[h] for h, t in types.items() if t not in FLOAT_TYPES and gnames[h] not in blocks]
    if missing:
        raise QkitError(f"{method} left {len(missing)} linears unquantized (first: {missing[0]})")
    summary = write_gguf(ref, out, mix, imatrix=imatrix, progress=progress, inputs=(*ref.input_files(), *inputs),
                         blocks=blocks, overrides=sink.tensors)
    summary.seconds = time.perf_counter() - t0  # the calibrated quantization included
    return summary


class KeepUnblocked:
    """pipeline.quantize_layers' sink for the GGUF path: each layer's tensors except the linears whose GGML
    blocks the chooser holds (keyed by linear name, without ".weight"); the shard outside the layers is
    dropped (embeddings, final norm and head are not changed by a layer's chooser: the writer reads them
    from the store). What it keeps is a few vectors per layer."""

    def __init__(self, blocks: dict):
        self.blocks = blocks
        self.tensors: dict = {}
        self._outer = True

    def write_shard(self, tensors: dict) -> None:
        if self._outer:
            self._outer = False
            return
        for n, t in tensors.items():
            if not (n.endswith(".weight") and n[: -len(".weight")] in self.blocks):
                self.tensors[n] = t.detach().clone()
