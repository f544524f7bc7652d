"""compressed-tensors ``pack-quantized`` checkpoints, targeting compressed-tensors 0.18.0.

Per linear `name` with weight (out, in), group size g (strategy "group"; per-channel: "channel"):

    name.weight_packed      int32 (out, ceil(in * bits / 32))     codes along the input dimension
    name.weight_scale       fp16  (out, in / g)
    name.weight_zero_point  int32 (ceil(out * bits / 32), in / g) asymmetric only; packed along the output dimension
    name.weight_shape       int64 [out, in]
    name.weight_g_idx       int32 (in,)                           act-order with dynamic groups (actorder "group")

Packing (``compressors/pack_quantized/helpers.py``, ``pack_to_int32``, 0.18.0 and later):
one dense little-endian bit stream per row, code k in stream bits [k*bits, (k+1)*bits),
cut into int32 words, codes straddling a word boundary split across the two; rows are
zero-padded to a multiple of 32 codes, then the words beyond ceil(n * bits / 32) dropped.
Up to 0.17 a word held floor(32 / bits) codes and wasted the rest: the same bytes for
2, 4 and 8 bits, different ones for 3 (and 5, 6, 7), which is why the version is pinned
(and recorded as ``version`` in the config). compressed-tensors quantizes to signed
q in [-2^(bits-1), 2^(bits-1) - 1] and packs q + 2^(bits-1); its zero point is shifted
alike, so the stored numbers are qkit's unsigned codes and zeros, and
W = scale * (q - zero) either way. A symmetric scheme stores no zero point (zero 2^(bits-1)).

``int-quantized`` (W8A8, SmoothQuant's format; compressors/naive_quantized/base.py,
``IntQuantizationCompressor``, chosen when a scheme has input activations): written when
the export declares activation bits. One int8 tensor per linear, no packing:

    name.weight             int8  (out, in)        q - 2^(bits-1), the signed code
    name.weight_scale       fp16  (out, n_groups)  (out, 1) per channel
    name.weight_zero_point  int8  (out, n_groups)  zero - 2^(bits-1); asymmetric only

W = scale * (weight - zero_point) (``dequantize``), the same numbers as qkit's unsigned
codes and zeros. The config group's ``input_activations`` holds the activation scheme
(qkit.actquant: int, symmetric, strategy "token", dynamic), which qkit's loader applies.

What the format cannot hold, refused at export time: an input width that is not a
multiple of the group size (``_process_group`` raises "tensor column shape must be
divisible by the given group_size", and llama.cpp's ``dequant_packed`` reshapes rows into
whole groups). act-order's g_idx (``actorder: group``) is read by 0.18 (deprecated there)
and by vLLM; compressed-tensors 0.19 removed it, so for those readers quantize with
--static-groups (contiguous groups, ``actorder: weight``, no g_idx).
"""
from __future__ import annotations

import numpy as np

from qkit import packing
from qkit.errors import FormatError, UsageError
from qkit.export.common import (AffineTensors, ExportSpec, as_numpy, check_g_idx, check_groups, check_result,
                                contiguous_groups, fp16_scales, int_zeros, shape_error)

CT_VERSION = "0.18.0"
PARTS = ("_packed", "_scale", "_zero_point", "_shape", "_g_idx")
CONSUMER = "compressed-tensors' _process_group and llama.cpp's dequant_packed need in_features % group_size == 0"


def pack_dense(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """compressed-tensors' dense int32 packing of unsigned codes along `axis` (padded to 32 codes, then trimmed)."""
    c = np.moveaxis(np.asarray(codes, dtype=np.uint8), axis, -1)
    n = c.shape[-1]
    pad = -n % 32
    if pad:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), np.uint8)], axis=-1)
    words = packing.pack_int32(c, bits, axis=-1)[..., : -(-n * bits // 32)]
    return np.ascontiguousarray(np.moveaxis(words, -1, axis))


def unpack_dense(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    w = np.moveaxis(np.asarray(words), axis, -1)
    full = -(-count // 32) * bits  # words of the padded rows
    if w.shape[-1] != -(-count * bits // 32):
        raise FormatError(f"{count} codes of {bits} bits pack into {-(-count * bits // 32)} int32 words, "
                          f"got {w.shape[-1]}")
    if full > w.shape[-1]:
        w = np.concatenate([w, np.zeros((*w.shape[:-1], full - w.shape[-1]), w.dtype)], axis=-1)
    return np.moveaxis(packing.unpack_int32(w, bits, axis=-1)[..., :count], -1, axis)


class CompressedTensorsFormat:
    name = "compressed-tensors"

    def __init__(self, weights: dict | None = None, kind: str = "pack-quantized", activations=None):
        self.weights = weights or {}
        self.kind = kind  # "pack-quantized" or "int-quantized" (read from the config; a write decides by spec)
        self.activations = activations  # qkit.actquant.ActivationScheme of the config group, or None

    @property
    def marker(self) -> str:
        """The tensor that marks a quantized linear (int-quantized keeps the name .weight, for int8 codes)."""
        return ".weight_packed" if self.kind == "pack-quantized" else ".weight_scale"

    def check(self, spec: ExportSpec) -> None:
        if not 2 <= spec.bits <= 8:
            raise UsageError(f"pack-quantized holds 1..8-bit integer codes; qkit's grid has 2..8, not {spec.bits}")
        if spec.act_bits is not None and spec.dynamic_groups:
            raise UsageError("qkit's int-quantized (W8A8) export writes no g_idx: act-order needs --static-groups")

    def check_shape(self, name: str, out: int, inp: int, spec: ExportSpec) -> None:
        check_groups("compressed-tensors", name, inp, spec.group_size, CONSUMER)

    def pack(self, name: str, res, spec: ExportSpec) -> dict:
        check_result(name, res, spec)
        if spec.act_bits is not None:
            return self._pack_int(name, res, spec)
        bits = spec.bits
        out, inp = res.codes.shape
        self.check_shape(name, out, inp, spec)
        zero = int_zeros(name, res.zero, bits)
        tensors = {name + ".weight_packed": pack_dense(res.codes, bits, axis=1),
                   name + ".weight_scale": fp16_scales(name, res.scale),
                   name + ".weight_shape": np.array([out, inp], dtype=np.int64)}
        if spec.symmetric:
            if np.any(zero != 2 ** (bits - 1)):
                raise UsageError(f"{name}: a symmetric scheme stores no zero point, but the zeros are not "
                                 f"{2 ** (bits - 1)}")
        else:
            tensors[name + ".weight_zero_point"] = pack_dense(zero, bits, axis=0)
        if spec.dynamic_groups:
            tensors[name + ".weight_g_idx"] = np.asarray(res.g_idx, dtype=np.int32)
        elif not contiguous_groups(res.g_idx, spec.group_size):
            raise UsageError(f"{name}: groups are not contiguous, but the export was not declared act-order")
        return tensors

    def _pack_int(self, name: str, res, spec: ExportSpec) -> dict:
        """int-quantized: signed int8 codes as the weight, scales, and signed zero points unless symmetric."""
        bits = spec.bits
        out, inp = res.codes.shape
        self.check_shape(name, out, inp, spec)
        if not contiguous_groups(res.g_idx, spec.group_size):
            raise UsageError(f"{name}: groups are not contiguous (act-order); qkit's int-quantized export writes "
                             "no g_idx")
        zero = int_zeros(name, res.zero, bits)
        half = 2 ** (bits - 1)
        tensors = {name + ".weight": (res.codes.astype(np.int16) - half).astype(np.int8),
                   name + ".weight_scale": fp16_scales(name, res.scale)}
        if spec.symmetric:
            if np.any(zero != half):
                raise UsageError(f"{name}: a symmetric scheme stores no zero point, but the zeros are not {half}")
        else:
            tensors[name + ".weight_zero_point"] = (zero - half).astype(np.int8)
        return tensors

    def quantization_config(self, spec: ExportSpec, ignore: list[str]) -> dict:
        if spec.act_bits is not None:
            return self._int_config(spec, ignore)
        weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
                   "strategy": "group" if spec.group_size else "channel", "group_size": spec.group_size,
                   "block_structure": None, "dynamic": False, "observer": "minmax", "observer_kwargs": {}}
        if spec.act_order:
            weights["actorder"] = "group" if spec.dynamic_groups else "weight"
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}, "version": CT_VERSION}

    def _int_config(self, spec: ExportSpec, ignore: list[str]) -> dict:
        from qkit.actquant import ActivationScheme

        weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
                   "strategy": "group" if spec.group_size else "channel", "group_size": spec.group_size,
                   "block_structure": None, "dynamic": False, "observer": "minmax", "observer_kwargs": {}}
        acts = ActivationScheme(spec.act_bits).config()
        return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                              "output_activations": None, "format": "int-quantized"}},
                "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}, "version": CT_VERSION}

    # ------------------------------------------------------------------ reading
    @staticmethod
    def matches(qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "compressed-tensors"

    def for_reading(self, qcfg: dict) -> CompressedTensorsFormat:
        groups = qcfg.get("config_groups")
        if not isinstance(groups, dict) or len(groups) != 1:
            raise FormatError("config.json: qkit reads compressed-tensors checkpoints with exactly one config group, "
                              f"found {len(groups) if isinstance(groups, dict) else 'none'}")
        group = next(iter(groups.values()))
        fmt = group.get("format") or qcfg.get("format")
        if fmt not in ("pack-quantized", "int-quantized"):
            raise FormatError(f"config.json: compressed-tensors format {fmt!r} is not readable "
                              "(qkit reads pack-quantized, int-quantized)")
        w = group.get("weights") or {}
        bits = w.get("num_bits")
        if w.get("type", "int") != "int" or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise FormatError(f"config.json: pack-quantized holds 1..8-bit integer weights, the config says "
                              f"type {w.get('type')!r}, num_bits {bits!r}")
        if w.get("strategy") not in ("group", "channel"):
            raise FormatError(f"config.json: compressed-tensors strategy {w.get('strategy')!r} is not readable "
                              "(qkit reads group, channel)")
        if w.get("strategy") == "group" and not (isinstance(w.get("group_size"), int) and w["group_size"] > 0):
            raise FormatError(f"config.json: strategy 'group' with group_size {w.get('group_size')!r}")
        from qkit.actquant import ActivationScheme

        return CompressedTensorsFormat(w, fmt, ActivationScheme.from_config(group.get("input_activations")))

    def parts(self, base: str) -> list[str]:
        if self.kind == "int-quantized":
            return [base + ".weight" + p for p in ("", "_scale", "_zero_point", "_g_idx")]
        return [base + ".weight" + p for p in PARTS]

    def shape(self, base: str, st) -> tuple[int, int]:
        if self.kind == "int-quantized":
            shape = tuple(st.shape(base + ".weight"))
            if len(shape) != 2:
                raise shape_error(base, f"weight of shape {shape} is not (out, in)")
            return shape
        shape = as_numpy(st.get(base + ".weight_shape")).reshape(-1)
        if shape.size != 2:
            raise shape_error(base, f"weight_shape {shape.tolist()} is not [out, in]")
        return int(shape[0]), int(shape[1])

    def _groups(self, base: str, scale, out: int, inp: int) -> tuple[int, int]:
        """(group size, n_groups), checked against the scale's shape."""
        w = self.weights
        g = w.get("group_size") if w.get("strategy") == "group" else inp
        if scale.ndim != 2 or scale.shape[0] != out or inp % g or scale.shape[1] != inp // g:
            raise shape_error(base, f"weight_scale {tuple(scale.shape)}, expected ({out}, {inp / g:g}) for "
                                    f"[{out}, {inp}] in groups of {g}")
        return g, scale.shape[1]

    def _affine_int(self, base: str, st) -> AffineTensors:
        w = self.weights
        bits, sym = w["num_bits"], w.get("symmetric", True)
        q, scale = as_numpy(st.get(base + ".weight")), st.get(base + ".weight_scale")
        out, inp = q.shape if q.ndim == 2 else (0, 0)
        if q.dtype != np.int8 or q.ndim != 2:
            raise shape_error(base, f"weight {q.dtype} {q.shape}, expected int8 (out, in)")
        half = 2 ** (bits - 1)
        if q.size and (q.min() < -half or q.max() > half - 1):
            raise shape_error(base, f"codes outside [{-half}, {half - 1}] for {bits} bits")
        g, n_groups = self._groups(base, scale, out, inp)
        if sym:
            zeros = np.full((out, n_groups), half, dtype=np.int32)
        else:
            zp = as_numpy(st.get(base + ".weight_zero_point"))
            if zp.dtype != np.int8 or zp.shape != (out, n_groups):
                raise shape_error(base, f"weight_zero_point {zp.dtype} {zp.shape}, expected int8 ({out}, {n_groups})")
            zeros = zp.astype(np.int32) + half
        if base + ".weight_g_idx" in st:
            gi = check_g_idx(base, as_numpy(st.get(base + ".weight_g_idx")), n_groups, inp)
        else:
            gi = np.arange(inp) // g
        codes = (q.astype(np.int32) + half).astype(np.uint8)
        return AffineTensors(codes, as_numpy(scale.float()), zeros, gi, bits)

    def dequantize(self, base: str, st):
        return self.affine(base, st).dequantize()

    def affine(self, base: str, st) -> AffineTensors:
        if self.kind == "int-quantized":
            return self._affine_int(base, st)
        get = st.get
        w = self.weights
        bits, sym = w["num_bits"], w.get("symmetric", True)
        packed, scale = as_numpy(get(base + ".weight_packed")), get(base + ".weight_scale")
        out, inp = self.shape(base, st)
        if packed.dtype != np.int32 or packed.shape != (out, -(-inp * bits // 32)):
            raise shape_error(base, f"weight_packed {packed.dtype} {packed.shape}, expected int32 "
                                    f"({out}, {-(-inp * bits // 32)}) for weight_shape [{out}, {inp}] at {bits} bits")
        g = w.get("group_size") if w.get("strategy") == "group" else inp
        if scale.ndim != 2 or scale.shape[0] != out or inp % g or scale.shape[1] != inp // g:
            raise shape_error(base, f"weight_scale {tuple(scale.shape)}, expected ({out}, {inp / g:g}) for "
                                    f"[{out}, {inp}] in groups of {g}")
        n_groups = scale.shape[1]
        if sym:
            zeros = np.full((out, n_groups), 2 ** (bits - 1), dtype=np.int32)
        else:
            zp = as_numpy(get(base + ".weight_zero_point"))
            if zp.dtype != np.int32 or zp.shape != (-(-out * bits // 32), n_groups):
                raise shape_error(base, f"weight_zero_point {zp.dtype} {zp.shape}, expected int32 "
                                        f"({-(-out * bits // 32)}, {n_groups})")
            zeros = unpack_dense(zp, bits, out, axis=0)
        if base + ".weight_g_idx" in st:
            gi = check_g_idx(base, as_numpy(get(base + ".weight_g_idx")), n_groups, inp)
        else:
            gi = np.arange(inp) // g
        codes = unpack_dense(packed, bits, inp, axis=1)
        return AffineTensors(codes, as_numpy(scale.float()), zeros, gi, bits)
