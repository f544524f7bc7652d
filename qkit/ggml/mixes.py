"""llama.cpp's quantization mixes: which GGML type each tensor gets.

A transcription of ``src/llama-quant.cpp`` in the llama.cpp vendored by
llama-cpp-python 0.3.36 (``llama_tensor_get_type``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``, ``tensor_allows_quantization``), for dense (non-MoE)
models and the mixes below; the IQ and MXFP4 families are not covered.

The decisions depend on the order tensors are visited, because the attn_v and
ffn_down rules count layers: llama.cpp visits them sorted by layer number,
then by name, with the non-layer tensors first (``weight_name_comparer``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from qkit.errors import UsageError

# mix name -> (LLAMA_FTYPE_MOSTLY_* value, default type) (llama.h; llama_ftype_get_default_type)
FTYPES = {
    "Q4_0": (2, "q4_0"), "Q4_1": (3, "q4_1"), "Q8_0": (7, "q8_0"), "Q5_0": (8, "q5_0"), "Q5_1": (9, "q5_1"),
    "Q2_K": (10, "q2_K"), "Q3_K_S": (11, "q3_K"), "Q3_K_M": (12, "q3_K"), "Q3_K_L": (13, "q3_K"),
    "Q4_K_S": (14, "q4_K"), "Q4_K_M": (15, "q4_K"), "Q5_K_S": (16, "q5_K"), "Q5_K_M": (17, "q5_K"),
    "Q6_K": (18, "q6_K"),
}
BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
         "q2_K": 256, "q3_K": 256, "q4_K": 256, "q5_K": 256, "q6_K": 256, "f16": 1, "f32": 1}
# tensor_type_fallback: a 256-block type whose rows do not divide falls back to a 32-block type
FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}


def mix_name(name: str) -> str:
    key = name.upper().replace("-", "_")
    if key not in FTYPES:
        raise UsageError(f"unknown GGML mix {name!r}; available: {', '.join(FTYPES)}")
    return key


@dataclass
class ModelShape:
    """What the rules look at besides tensor names: layer count, GQA ratio, architecture."""

    n_layer: int
    n_head: int
    n_head_kv: int
    arch: str = "llama"

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(self.n_head_kv, 1)

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (load_hparams): llama with 80 layers and GQA; qwen2 with 80 layers."""
        if self.n_layer != 80:
            return False
        return self.arch == "qwen2" or (self.arch == "llama" and self.n_head != self.n_head_kv)


def category(name: str) -> str:
    """tensor_get_category: the first match in llama.cpp's order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, n_dims: int) -> bool:
    """tensor_allows_quantization for dense llama-family tensors: 2-D weights that are not norms."""
    return n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name and \
        "ffn_gate_inp.weight" not in name and name not in ("position_embd.weight", "token_types.weight")


def visit_order(names: list[str]) -> list[str]:
    """weight_name_comparer: by layer number (non-layer tensors as -1), then by name."""
    def key(n):
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def choose_types(tensors: dict[str, tuple[int, ...]], mix: str, shape: ModelShape,
                 has_imatrix: bool = False) -> dict[str, str]:
    """GGML type per tensor. tensors: GGUF name -> shape in GGML order (ne0 = row length first)."""
    mix = mix_name(mix)
    _, default = FTYPES[mix]
    names = visit_order(list(tensors))
    n_attention_wv = sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names)
    tied = "output.weight" not in tensors
    i_attention_wv = i_ffn_down = 0
    n_ffn = shape.n_layer
    out = {}
    for name in names:
        ne = tensors[name]
        if not allows_quantization(name, len(ne)):
            out[name] = "f32"
            continue
        cat = category(name)
        t = default
        if cat == "output" or (tied and cat == "token_embd"):
            if shape.arch == "falcon" or ne[0] % BLOCK[t] != 0:
                t = "q8_0"
            elif t != "q8_0":
                t = "q6_K"
        elif cat == "token_embd":
            pass  # no --token-embedding-type: the mix's default
        elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if mix == "Q2_K":
                t = "q4_K" if shape.n_gqa >= 4 else "q3_K"
            elif mix == "Q3_K_M":
                t = "q5_K" if i_attention_wv < 2 else "q4_K"
            elif mix == "Q3_K_L":
                t = "q5_K"
            elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attention_wv, n_attention_wv):
                t = "q6_K"
            elif mix == "Q4_K_S" and i_attention_wv < 4:
                t = "q5_K"
            if shape.is_70b and t in ("q3_K", "q4_K"):
                t = "q5_K"
            i_attention_wv += 1
        elif cat == "ffn_down":
            i_layer = i_ffn_down
            if mix == "Q2_K":
                t = "q3_K"
            elif mix == "Q3_K_M":
                t = "q5_K" if i_layer < n_ffn // 16 else \
                    ("q4_K" if shape.arch != "falcon" or use_more_bits(i_layer, n_ffn) else "q3_K")
            elif mix == "Q3_K_L":
                t = "q4_K" if shape.arch == "falcon" else "q5_K"
            elif mix == "Q4_K_M":
                if shape.arch == "falcon":
                    t = "q6_K" if i_layer < n_ffn // 16 else ("q5_K" if use_more_bits(i_layer, n_ffn) else "q4_K")
                elif use_more_bits(i_layer, n_ffn):
                    t = "q6_K"
            elif mix == "Q5_K_M" and use_more_bits(i_layer, n_ffn):
                t = "q6_K"
            elif mix == "Q4_K_S" and shape.arch != "falcon" and i_layer < n_ffn // 8:
                t = "q5_K"
            elif mix in ("Q4_0", "Q5_0") and has_imatrix and i_layer < n_ffn // 8:
                t = "q4_1" if mix == "Q4_0" else "q5_1"
            i_ffn_down += 1
        elif cat == "attn_output":
            if shape.arch != "falcon":
                t = {"Q2_K": "q3_K", "Q3_K_M": "q4_K", "Q3_K_L": "q5_K"}.get(mix, t)
            elif mix == "Q3_K_L":
                t = "q4_K"
        elif cat == "attn_qkv":
            pass  # handled with attn_v above (category_is_attn_v), as in llama.cpp's branch order
        if ne[0] % BLOCK[t] != 0:  # tensor_type_fallback
            t = FALLBACK.get(t, t)
            if ne[0] % BLOCK[t] != 0:
                t = "f16"
        out[name] = t
    return out
