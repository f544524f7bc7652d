"""qkit's CPU runtime: transformers models whose packed linears run on qkit's int8-activation kernels.

- qkit.runtime.linear: QuantLinear (W4A8 / W8A8 kernels on GPTQ's packed layout) and DequantLinear (the
  documented fallback for 2/3-bit grids and layouts the kernels do not take);
- qkit.runtime.head: the LM head and embedding as one 8-bit matrix;
- qkit.runtime.load: a packed checkpoint -> a model on those modules;
- qkit.runtime.cache: the KV cache generate() uses (DynamicCache's API, written in place);
- qkit.runtime.generate: prefill + decode with a KV cache, timed per part.
"""
from qkit.runtime.linear import DequantLinear, QuantLinear, RuntimeOptions
from qkit.runtime.load import RuntimeInfo, load, set_threads, torch_beside_kernels

__all__ = ["DequantLinear", "QuantLinear", "RuntimeOptions", "RuntimeInfo", "load", "set_threads",
           "torch_beside_kernels"]
