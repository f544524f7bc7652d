"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout), v1 ("gptq") and v2 ("gptq_v2").

Per linear `name` with weight (out, in), group size g, n_groups = ceil(in / g):

    name.qweight  int32 (in * bits / 32, out)        codes packed along the input dimension
    name.qzeros   int32 (n_groups, out * bits / 32)  zeros packed along the output dimension
    name.scales   fp16  (n_groups, out)
    name.g_idx    int32 (in,)                        group of each input column
    name.bias     as the source, when the linear has one

W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]). For 2/4/8 bits each
int32 holds 32 / bits codes, code k of a word in bits [k*bits, (k+1)*bits); for 3
bits 32 codes span three words (qkit.packing's docstring draws both). The
scales are ceil(in / g) rows (AutoGPTQ's ``QuantLinear`` allocates
``math.ceil(infeatures / group_size)``), so g_idx = i // g carries a ragged last
group, and act-order's permuted groups likewise.

Zeros: v1 (``checkpoint_format: gptq``) stores zero - 1, as AutoGPTQ's
``QuantLinear.pack`` does (``zeros -= 1``) and its readers add 1 back; a zero of
0 cannot be stored, so a v1 export is quantized with every zero >= 1
(AffineConfig.min_zero = 1). v2 (GPTQModel's ``gptq_v2``) stores the zero itself.
llama.cpp's converter (``conversion/base.py``, ``dequant_gptq``) reads both, 2/4/8 bits.

Readers here: the inverse, with every shape checked against the others.
"""
from __future__ import annotations

import numpy as np

from qkit import packing
from qkit.errors import FormatError, UsageError
from qkit.export.common import (AffineTensors, ExportSpec, as_numpy, check_g_idx, check_result, fp16_scales,
                                int_zeros, shape_error)

BITS = (2, 3, 4, 8)
PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


class GPTQFormat:
    marker = ".qweight"

    def __init__(self, v2: bool, bits: int | None = None):
        self.v2 = v2
        self.name = "gptq_v2" if v2 else "gptq"
        self.bits = bits

    # ------------------------------------------------------------------ writing
    def check(self, spec: ExportSpec) -> None:
        if spec.bits not in BITS:
            raise UsageError(f"GPTQ checkpoints hold {', '.join(map(str, BITS))} bits, not {spec.bits}")

    def check_shape(self, name: str, out: int, inp: int, spec: ExportSpec) -> None:
        """qweight packs whole int32 words along the input, qzeros along the output (no padding in the format)."""
        bits = spec.bits
        if (inp * bits) % 32 or (out * bits) % 32:
            per = 32 // np.gcd(32, bits)
            raise UsageError(f"{name}: GPTQ packs {per} codes per {bits * per // 32} int32 word(s) along both "
                             f"dimensions; a {out} x {inp} weight is not a multiple of {per} in both")

    def pack(self, name: str, res, spec: ExportSpec) -> dict:
        check_result(name, res, spec)
        bits = spec.bits
        self.check_shape(name, *res.codes.shape, spec)
        zero = int_zeros(name, res.zero, bits)
        if not self.v2:
            if zero.size and zero.min() < 1:
                raise UsageError(f"{name}: a zero of 0 cannot be stored in a GPTQ v1 checkpoint (it stores zero - 1); "
                                 "quantize with min_zero=1 or write gptq_v2")
            zero = zero - 1
        return {
            name + ".qweight": packing.pack_gptq_qweight(res.codes.T, bits),
            name + ".qzeros": packing.pack_gptq_qzeros(zero.T, bits),
            name + ".scales": np.ascontiguousarray(fp16_scales(name, res.scale).T),
            name + ".g_idx": np.asarray(res.g_idx, dtype=np.int32),
        }

    def quantization_config(self, spec: ExportSpec, ignore: list[str]) -> dict:
        from qkit import __version__

        cfg = {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size or -1,
               # group-aware act-order leaves g_idx = i // g: the layout of desc_act False, which kernels read
               # without a g_idx gather; act_group_aware says how the columns were processed
               "desc_act": spec.act_order and not spec.group_aware, "sym": spec.symmetric, "static_groups": spec.static_groups,
               # False: a layer's linears all calibrated on the layer's inputs through the float layer
               "true_sequential": spec.true_sequential,
               "checkpoint_format": self.name, "pack_dtype": "int32",
               "meta": {"quantizer": [f"qkit:{__version__}"], "qkit_method": spec.method}}
        if spec.damp is not None:
            cfg["damp_percent"] = spec.damp
        if spec.group_aware:  # GPTQModel's name for act-order inside contiguous groups (g_idx = i // g)
            cfg["act_group_aware"] = True
        return cfg

    # ------------------------------------------------------------------ reading
    @staticmethod
    def matches(qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "gptq"

    def for_reading(self, qcfg: dict) -> GPTQFormat:
        fmt = qcfg.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise FormatError(f"config.json: GPTQ checkpoint_format {fmt!r} is not readable (qkit reads gptq, gptq_v2)")
        bits = qcfg.get("bits")
        if bits not in BITS:
            raise FormatError(f"config.json: GPTQ bits {bits!r} cannot be held by the format (2, 3, 4 or 8)")
        return GPTQFormat(v2=fmt == "gptq_v2", bits=bits)

    def parts(self, base: str) -> list[str]:
        return [base + p for p in PARTS]

    def shape(self, base: str, st) -> tuple[int, int]:
        rows, out = st.shape(base + ".qweight")
        return out, rows * 32 // self.bits

    def dequantize(self, base: str, st):
        return self.affine(base, st).dequantize()

    def affine(self, base: str, st) -> AffineTensors:
        get = st.get
        bits = self.bits
        qweight, qzeros = as_numpy(get(base + ".qweight")), as_numpy(get(base + ".qzeros"))
        scales, g_idx = get(base + ".scales"), as_numpy(get(base + ".g_idx"))
        for n, t in (("qweight", qweight), ("qzeros", qzeros)):
            if t.dtype != np.int32 or t.ndim != 2:
                raise shape_error(base, f"{n} must be 2-D int32, got {t.dtype} {t.shape}")
        if scales.ndim != 2:
            raise shape_error(base, f"scales must be 2-D, got {tuple(scales.shape)}")
        if (qweight.shape[0] * 32) % bits:
            raise shape_error(base, f"{qweight.shape[0]} qweight rows do not hold whole {bits}-bit codes")
        inp, out = qweight.shape[0] * 32 // bits, qweight.shape[1]
        n_groups = scales.shape[0]
        if scales.shape[1] != out:
            raise shape_error(base, f"scales {tuple(scales.shape)} vs qweight {qweight.shape}: {out} outputs")
        if qzeros.shape != (n_groups, out * bits // 32):
            raise shape_error(base, f"qzeros {qzeros.shape}, expected ({n_groups}, {out * bits // 32}) for scales "
                                    f"{tuple(scales.shape)} at {bits} bits")
        gi = check_g_idx(base, g_idx, n_groups, inp)
        codes = packing.unpack_gptq_qweight(qweight, bits)  # (in, out)
        zeros = packing.unpack_gptq_qzeros(qzeros, bits).astype(np.int32)  # (n_groups, out)
        if not self.v2:
            zeros = zeros + 1
        s = as_numpy(scales.float())
        return AffineTensors(codes.T, s.T, zeros.T, gi, bits)
