"""Quantized linears for torch that hold only packed bytes and call qkit's kernels.

QuantLinear (4 and 8 bits): the weight stays in GPTQ's qweight layout, int32 (in * bits / 32, out), as a
GPTQ checkpoint stores it; zero points as uint8 and scales as float32 per (group, output), unpacked once at
load (2-6% of the weight bytes). Each call quantizes its input per block of 32 to int8 (llama.cpp's q8_0
rule, ext.quantize_q8) and runs the integer kernels: one token through the GEMV, many (prefill) through the
GEMM, which reads each weight line once for all of them (ext/csrc/kernels_w4a8.c, kernels_w8a8.c).

What is repacked at load, once, and why:
- act-order checkpoints (GPTQ desc_act: g_idx not i // g): the input columns are sorted by group, so every
  group is contiguous again and the kernel needs no gather; the permutation is applied to the activation
  (one gather of `in` floats per token), the codes are repacked in the sorted order.
- AWQ GEMM (qweight (in, out / 8), codes interleaved along the output) and compressed-tensors
  (weight_packed (out, in / 8)): their codes are repacked into GPTQ's layout, the one layout the kernels
  read. The bytes are the same count; the time it takes is reported by `qkit bench runtime`.

DequantLinear (2 and 3 bits, or a layout the kernels cannot take: groups that are not a multiple of 32,
in-features not a multiple of the word): the documented fallback. It holds the GPTQ-packed codes and, per
call, dequantizes tiles of 1024 input rows to float32 and multiplies them by torch's GEMM: the memory of
the packed model, the speed of float (slower than dense fp32 for decode: every call decodes the matrix).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qkit import packing
from qkit.export.common import AffineTensors

KERNEL_BITS = (4, 8)
TILE_INPUTS = 1024  # the fallback's tile: 1024 inputs is a whole number of words at 2, 3, 4 and 8 bits


@dataclass
class RuntimeOptions:
    """Shared by every quantized module of one model: the kernels' thread count and instruction set."""

    threads: int = 1
    isa: str | None = None  # None: the best the CPU has (ext.best_isa_w4a8)
    _code: tuple | None = field(default=None, repr=False, compare=False)  # (isa, its kernel code), once per isa

    def isa_code(self) -> int:
        if self._code is None or self._code[0] != self.isa:
            from qkit import ext

            self._code = (self.isa, ext._isa_code(self.isa or ext.best_isa_w4a8(), ext.W4A8_ISAS))
        return self._code[1]


def contiguous_order(g_idx: np.ndarray, n_groups: int) -> tuple[np.ndarray | None, int | None]:
    """(perm, group size) such that g_idx[perm] == arange(in) // group, perm None when it is the identity;
    (None, None) when no such order exists (groups of unequal size)."""
    n = g_idx.shape[0]
    if n_groups == 1:
        return None, n
    perm = np.argsort(g_idx, kind="stable")
    g = int(np.count_nonzero(g_idx == 0))
    if g == 0 or -(-n // g) != n_groups or not np.array_equal(g_idx[perm], np.arange(n) // g):
        return None, None
    return (None if np.array_equal(perm, np.arange(n)) else perm), g


def _param_layout(aff: AffineTensors):
    """zeros uint8 and scales float32 (n_groups, out), as the kernels take them."""
    zeros = np.ascontiguousarray(aff.zero.T).astype(np.uint8)
    scales = np.ascontiguousarray(aff.scale.T, dtype=np.float32)
    return zeros, scales


class QuantLinear(torch.nn.Module):
    """y = x W^T + b for a 4- or 8-bit affine W in GPTQ's packed layout, on the A8 kernels."""

    def __init__(self, qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray, *, bits: int, group_size: int,
                 in_features: int, out_features: int, perm: np.ndarray | None = None, bias=None,
                 options: RuntimeOptions | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        # numpy arrays the kernels read, and the same memory as buffers so the module's size and state show
        self._qweight = np.ascontiguousarray(qweight, dtype=np.int32)
        self._zeros = np.ascontiguousarray(zeros, dtype=np.uint8)
        self._scales = np.ascontiguousarray(scales, dtype=np.float32)
        self.register_buffer("qweight", torch.from_numpy(self._qweight), persistent=False)
        self.register_buffer("zeros", torch.from_numpy(self._zeros), persistent=False)
        self.register_buffer("scales", torch.from_numpy(self._scales), persistent=False)
        self.perm = None if perm is None else torch.as_tensor(perm, dtype=torch.long)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self.options = options or RuntimeOptions()

    @classmethod
    def from_affine(cls, aff: AffineTensors, *, bias=None, options=None, qweight: np.ndarray | None = None):
        """From a reader's decoded grid; `qweight`: the file's own GPTQ words, used as they are when the groups
        are already contiguous. None when the kernels cannot take this layout (DequantLinear then)."""
        out, inp = aff.codes.shape
        if aff.bits not in KERNEL_BITS or inp % (32 // aff.bits) or aff.zero.size and (
                aff.zero.min() < 0 or aff.zero.max() > 255):
            return None
        perm, g = contiguous_order(aff.g_idx, aff.scale.shape[1])
        if g is None or (g % 32 and g < inp):
            return None
        zeros, scales = _param_layout(aff)
        if qweight is None or perm is not None:
            codes = aff.codes if perm is None else aff.codes[:, perm]
            qweight = packing.pack_gptq_qweight(np.ascontiguousarray(codes.T), aff.bits)
        return cls(qweight, zeros, scales, bits=aff.bits, group_size=g, in_features=inp, out_features=out,
                   perm=perm, bias=bias, options=options)

    def packed_bytes(self) -> int:
        return self._qweight.nbytes + self._zeros.nbytes + self._scales.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qkit.ext import _kernels as native

        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        xn = x2.detach().to(torch.float32).contiguous().numpy()
        xq, xs = native.quantize_q8_rows(xn)
        y = native.gemm_a8(xq, xs, self._qweight, self._zeros, self._scales, self.group_size, self.bits,
                           self.options.isa_code(), self.options.threads)
        y = torch.from_numpy(y)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}, kernel=A8")


class DequantLinear(torch.nn.Module):
    """The fallback: GPTQ-packed codes of any of 2, 3, 4, 8 bits and any g_idx, decoded per tile each call."""

    def __init__(self, aff: AffineTensors, *, bias=None):
        super().__init__()
        out, inp = aff.codes.shape
        self.in_features, self.out_features, self.bits = inp, out, aff.bits
        per = TILE_INPUTS
        pad = -inp % per if inp > per else -inp % 32
        codes = np.zeros((inp + pad, out), np.uint8)
        codes[:inp] = aff.codes.T
        self._qweight = packing.pack_gptq_qweight(codes, aff.bits)  # (rows, out), padded to whole tiles
        self._zeros = np.ascontiguousarray(aff.zero.T, dtype=np.float32)
        self._scales = np.ascontiguousarray(aff.scale.T, dtype=np.float32)
        self._g_idx = np.asarray(aff.g_idx, np.int64)
        self.register_buffer("qweight", torch.from_numpy(self._qweight), persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)

    def packed_bytes(self) -> int:
        return self._qweight.nbytes + self._zeros.nbytes + self._scales.nbytes + self._g_idx.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        y = torch.zeros(x2.shape[0], self.out_features)
        rows = TILE_INPUTS * self.bits // 32
        for r0 in range(0, self._qweight.shape[0], rows):
            i0 = r0 * 32 // self.bits
            i1 = min(i0 + TILE_INPUTS, self.in_features)
            if i0 >= i1:
                break
            codes = packing.unpack_gptq_qweight(self._qweight[r0:r0 + rows], self.bits)[: i1 - i0]
            gi = self._g_idx[i0:i1]
            w = self._scales[gi] * (codes.astype(np.float32) - self._zeros[gi])  # (tile, out)
            y.addmm_(x2[:, i0:i1], torch.from_numpy(w))
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, kernel=dequant"


def quant_linear(aff: AffineTensors, *, bias=None, options=None, qweight=None) -> torch.nn.Module:
    """The kernel-backed linear where the layout allows, else the dequantizing fallback."""
    m = QuantLinear.from_affine(aff, bias=bias, options=options, qweight=qweight)
    return m if m is not None else DequantLinear(aff, bias=bias)
