"""Write a GGUF that llama.cpp loads: llama.cpp's mixes over qkit's byte-exact GGML blocks.

Tensor names and the Q/K row permutation are those of llama.cpp's converter
(gguf_convert holds the mapping; here it runs backwards). Metadata, the
tokenizer above all, is carried over unchanged from the GGUF the model came
from (``source.gguf`` beside its weights); a model that never was a GGUF (an HF
directory or safetensors file with config.json and tokenizer.json) gets the
hyperparameters and ``tokenizer.ggml.*`` keys llama.cpp's converter would write
(qkit.gguf.hf_meta). ``general.file_type`` is set to the mix. Writing
streams: tensor infos first, then one tensor at a time is read, quantized and
appended, into a temporary file renamed into place.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkit import ggml
from qkit.errors import InputError, UsageError
from qkit.fileio import atomic_path
from qkit.ggml import mixes
from qkit.gguf import read as gguf_read
from qkit.model import loader
from qkit.model.arch import gguf_arch

log = logging.getLogger("qkit.model")
GGML_QNT_VERSION = 2
# general.alignment is not copied: the writer pads to its own (default) alignment, which the file then declares
SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
             "general.alignment")


@dataclass
class GGUFSummary:
    output: str
    mix: str
    tensors: int
    types: dict
    bits_per_weight: float  # over all tensors, as llama.cpp reports it
    output_bytes: int
    seconds: float


def hf_to_gguf_names(config) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name for the Llama family."""
    out = {f"{v}.weight": f"{k}.weight" for k, v in gguf_read.GLOBAL_NAMES.items()}
    for i in range(config.num_hidden_layers):
        for g, h in gguf_read.BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"model.layers.{i}.{h}.{kind}"] = f"blk.{i}.{g}.{kind}"
    return out


def _gguf_type(t: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        t, getattr(gguf.GGMLQuantizationType, t.upper(), None))


def _copy_metadata(reader, writer) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(SKIP_KEYS):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=gguf.GGUFValueType(field.types[-1]))
        else:
            writer.add_key_value(key, value, vtype)


def check_writable(ref: loader.ModelRef) -> None:
    """Everything write_gguf refuses about a model itself (architecture, tokenizer, tensor names), checked from
    its config, tokenizer files and tensor names alone: a calibrated run calls it before any calibration."""
    config = loader.load_config(ref)
    arch = gguf_arch(config).name
    if not (ref.dir / gguf_read.SOURCE_GGUF).is_file():
        from qkit.gguf import hf_meta

        hf_meta.model_metadata(config, arch, ref.name)
        hf_meta.tokenizer_metadata(ref.dir, config.vocab_size)
    names = hf_to_gguf_names(config)
    store = ref.store()
    try:
        unknown = [n for n in store.keys() if n not in names]
    finally:
        store.close()
    if unknown:
        raise UsageError(f"tensors without a GGUF name: {', '.join(unknown[:4])}")


def write_gguf(ref: loader.ModelRef, out: str | os.PathLike, mix: str, imatrix: dict | None = None,
               progress: bool = False, inputs=(), blocks: dict | None = None,
               overrides: dict | None = None) -> GGUFSummary:
    """Quantize `ref` with llama.cpp's mix `mix` (Q4_K_M, ...) and write it as GGUF to `out`.

    blocks: {GGUF name: (GGML type, uint8 rows in the model's row order)} already quantized by a
    calibrated chooser (qkit.gptq_ggml); written as given (Q/K rows permuted like the weights) instead
    of llama.cpp's rounding. Each must have the type the mix gives its tensor. overrides: {HF name: tensor}
    read instead of the store's (what a calibrated chooser changed besides its blocks: AWQ's folded norms).
    """
    import gguf
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    mix = mixes.mix_name(mix)
    src = ref.dir / gguf_read.SOURCE_GGUF
    config = loader.load_config(ref)
    garch = gguf_arch(config)
    arch = garch.name
    if src.is_file():   # converted from a GGUF (the default model too): its metadata travels unchanged
        reader, items = gguf_read.open_gguf(src), None
    else:   # checked before anything is quantized or written
        from qkit.gguf import hf_meta

        reader = None
        items = hf_meta.model_metadata(config, arch, ref.name) + \
            hf_meta.tokenizer_metadata(ref.dir, config.vocab_size)
    store = ref.store()
    if overrides:
        store = OverlayStore(store, overrides)
    names = hf_to_gguf_names(config)
    present = {names[n]: n for n in store.keys() if n in names}
    unknown = [n for n in store.keys() if n not in names]
    if unknown:
        raise UsageError(f"tensors without a GGUF name: {', '.join(unknown[:4])}")
    shapes = {g: tuple(reversed(store.shape(h))) for g, h in present.items()}  # GGML order: ne0 = row length
    shape = mixes.ModelShape(config.num_hidden_layers, config.num_attention_heads,
                             getattr(config, "num_key_value_heads", None) or config.num_attention_heads, arch)
    types = mixes.choose_types(shapes, mix, shape, has_imatrix=imatrix is not None)
    order = mixes.visit_order(list(shapes))
    ftype = mixes.FTYPES[mix][0]
    total_bits = 0
    out = Path(out)
    with atomic_path(out, inputs=(src, *ref.input_files(), *inputs)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        if reader is not None:
            _copy_metadata(reader, w)
        else:
            for key, value, vtype, *sub in items:
                w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
        w.add_file_type(ftype)
        w.add_quantization_version(GGML_QNT_VERSION)
        for g in order:
            t = types[g]
            ne = shapes[g]
            rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
            if t in ("f32", "f16"):
                dtype = np.float32 if t == "f32" else np.float16
                nbytes = int(np.prod(ne)) * np.dtype(dtype).itemsize
                w.add_tensor_info(g, tuple(reversed(ne)), np.dtype(dtype), nbytes)
            else:
                bt = ggml.get_type(t)
                byte_shape = (rows, ne[0] // bt.block_size * bt.type_size)
                nbytes = byte_shape[0] * byte_shape[1]
                w.add_tensor_info(g, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=_gguf_type(t))
            total_bits += nbytes * 8
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        n_elems = 0
        for g in tqdm(order, desc=f"quantize {mix}", unit="tensor", disable=not progress):
            x = store.get(present[g]).to(torch.float32).numpy()
            kind = g.split(".")[-2] if g.startswith("blk.") else ""
            if kind == "attn_q" and garch.permute_qk:
                x = gguf_read.permute_qk(x, config.num_attention_heads)
            elif kind == "attn_k" and garch.permute_qk:
                x = gguf_read.permute_qk(x, shape.n_head_kv)
            n_elems += x.size
            t = types[g]
            if t == "f32":
                data = np.ascontiguousarray(x, np.float32)
            elif t == "f16":
                data = x.astype(np.float16)
            elif blocks and g in blocks:
                bt, data = blocks[g]
                bt_ = ggml.get_type(t)
                if bt != t or data.shape != (x.size // x.shape[-1], x.shape[-1] // bt_.block_size * bt_.type_size):
                    raise InputError(f"tensor {g}: given {bt} blocks of shape {data.shape}, the mix needs {t}")
                if kind in ("attn_q", "attn_k") and garch.permute_qk:  # the rows' permutation, on whole rows
                    data = gguf_read.permute_qk(data, config.num_attention_heads if kind == "attn_q"
                                                   else shape.n_head_kv)
            else:
                im = imatrix.get(g) if imatrix else None
                try:
                    data = ggml.quantize(x.reshape(-1, x.shape[-1]), t, imatrix=im)
                    ggml.validate(data, t)
                except InputError as e:
                    raise InputError(f"tensor {g}: {e}") from None
            w.write_tensor_data(data)
        w.close()
        store.close()
    from collections import Counter

    return GGUFSummary(str(out), mix, len(order), dict(Counter(types.values())), total_bits / max(n_elems, 1),
                       out.stat().st_size, time.perf_counter() - t0)


class OverlayStore:
    """A WeightStore with some tensors replaced by in-memory ones (same names and shapes)."""

    def __init__(self, store, overrides: dict):
        unknown = [n for n in overrides if n not in store]
        if unknown:
            raise InputError(f"override {unknown[0]!r} names no tensor of the model")
        for n, t in overrides.items():
            if tuple(t.shape) != tuple(store.shape(n)):
                raise InputError(f"override {n!r} has shape {tuple(t.shape)}, the model's is {tuple(store.shape(n))}")
        self.store, self.overrides = store, overrides

    def keys(self) -> list[str]:
        return self.store.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def shape(self, name: str) -> tuple[int, ...]:
        return self.store.shape(name)

    def get(self, name: str):
        return self.overrides[name] if name in self.overrides else self.store.get(name)

    def close(self) -> None:
        self.store.close()
