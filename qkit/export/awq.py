"""AWQ GEMM checkpoints (AutoAWQ's ``WQLinear_GEMM``, ``awq/modules/linear/gemm.py``).

Per linear `name` with weight (out, in) and group size g (-1: g = in):

    name.qweight  int32 (in, out / 8)       codes packed along the output dimension
    name.qzeros   int32 (in / g, out / 8)   zeros, packed the same way
    name.scales   fp16  (in / g, out)
    name.bias     as the source, when the linear has one

Within each int32 the eight 4-bit slots hold output columns 8c + [0, 2, 4, 6, 1, 3, 5, 7]
(AutoAWQ's ``order_map``; qkit.packing.pack_awq). W[o, i] = scales[i // g, o] * (q[i, o] - z[i // g, o]).

What the format cannot hold, refused at export time: bits other than 4 (``WQLinear_GEMM``
raises "Only 4-bit are supported"), an input width that is not a multiple of the group
size (it asserts ``in_features % group_size == 0``: no ragged last group, so SmolLM2's
576 columns need g = 64, 32 or -1), an output width not a multiple of 8, and act-order
with dynamic groups (there is no g_idx: groups are always i // g).
qkit's symmetric grid is written with its zeros (2^(bits-1)) stored, so the config says
``zero_point: true`` for every export: the kernels subtract the stored zeros either way.
"""
from __future__ import annotations

import numpy as np

from qkit import packing
from qkit.errors import FormatError, UsageError
from qkit.export.common import (AffineTensors, ExportSpec, as_numpy, check_groups, check_result, contiguous_groups,
                                fp16_scales, int_zeros, shape_error)

PARTS = (".qweight", ".qzeros", ".scales")
CONSUMER = "AutoAWQ's WQLinear_GEMM asserts in_features % group_size == 0"


class AWQFormat:
    name = "awq"
    marker = ".qweight"

    def __init__(self, group_size: int | None = None):
        self.group_size = group_size

    def check(self, spec: ExportSpec) -> None:
        if spec.bits != 4:
            raise UsageError(f"AWQ GEMM checkpoints hold 4-bit codes only, not {spec.bits} "
                             "(use --format gptq_v2 or compressed-tensors for other widths)")
        if spec.dynamic_groups:
            raise UsageError("AWQ GEMM has no g_idx, so act-order's permuted groups cannot be stored; "
                             "add --static-groups or use --format gptq_v2")

    def check_shape(self, name: str, out: int, inp: int, spec: ExportSpec) -> None:
        check_groups("AWQ GEMM", name, inp, spec.group_size, CONSUMER)
        if out % 8:
            raise UsageError(f"{name}: AWQ GEMM packs 8 output columns per int32; {out} outputs is not a multiple of 8")

    def pack(self, name: str, res, spec: ExportSpec) -> dict:
        check_result(name, res, spec)
        self.check_shape(name, *res.codes.shape, spec)
        if not contiguous_groups(res.g_idx, spec.group_size):
            raise UsageError(f"{name}: groups are not contiguous (act-order); AWQ GEMM has no g_idx")
        zero = int_zeros(name, res.zero, 4)
        return {
            name + ".qweight": packing.pack_awq(res.codes.T, 4),
            name + ".qzeros": packing.pack_awq(zero.T, 4),
            name + ".scales": np.ascontiguousarray(fp16_scales(name, res.scale).T),
        }

    def quantization_config(self, spec: ExportSpec, ignore: list[str]) -> dict:
        return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": spec.group_size or -1,
                "zero_point": True, "modules_to_not_convert": ignore or None}

    # ------------------------------------------------------------------ reading
    @staticmethod
    def matches(qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "awq"

    def for_reading(self, qcfg: dict) -> AWQFormat:
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise FormatError(f"config.json: AWQ version {qcfg.get('version')!r} is not readable (qkit reads gemm)")
        bits = qcfg.get("bits", qcfg.get("w_bit"))
        if bits != 4:
            raise FormatError(f"config.json: AWQ GEMM holds 4-bit codes, the config says bits {bits!r}")
        g = qcfg.get("group_size", qcfg.get("q_group_size", 128))
        if not isinstance(g, int) or g == 0 or g < -1:
            raise FormatError(f"config.json: AWQ group_size {g!r} is not a positive number or -1")
        return AWQFormat(group_size=None if g == -1 else g)

    def parts(self, base: str) -> list[str]:
        return [base + p for p in PARTS]

    def shape(self, base: str, st) -> tuple[int, int]:
        inp, words = st.shape(base + ".qweight")
        return words * 8, inp

    def dequantize(self, base: str, st):
        return self.affine(base, st).dequantize()

    def affine(self, base: str, st) -> AffineTensors:
        get = st.get
        qweight, qzeros = as_numpy(get(base + ".qweight")), as_numpy(get(base + ".qzeros"))
        scales = get(base + ".scales")
        for n, t in (("qweight", qweight), ("qzeros", qzeros)):
            if t.dtype != np.int32 or t.ndim != 2:
                raise shape_error(base, f"{n} must be 2-D int32, got {t.dtype} {t.shape}")
        inp, out = qweight.shape[0], qweight.shape[1] * 8
        if scales.ndim != 2 or scales.shape[1] != out:
            raise shape_error(base, f"scales {tuple(scales.shape)} vs qweight {qweight.shape}: {out} outputs")
        g = self.group_size or inp
        n_groups = scales.shape[0]
        if inp % g or n_groups != inp // g:
            raise shape_error(base, f"scales {tuple(scales.shape)}: {inp} input rows in groups of {g} need "
                                    f"{inp / g:g} groups")
        if qzeros.shape != (n_groups, out // 8):
            raise shape_error(base, f"qzeros {qzeros.shape}, expected ({n_groups}, {out // 8})")
        codes = packing.unpack_awq(qweight, 4)  # (in, out)
        zeros = packing.unpack_awq(qzeros, 4)  # (n_groups, out)
        s = as_numpy(scales.float())
        return AffineTensors(codes.T, s.T, zeros.T, np.arange(inp) // g, 4)
