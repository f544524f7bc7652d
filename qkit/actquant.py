"""Dynamic per-token activation quantization (the "A8" of W8A8), applied in the forward pass.

For each token (a row x of a linear's input), symmetric int8 (compressed-tensors'
``calculate_qparams`` with strategy "token", dynamic; SmoothQuant's per-token
dynamic scheme):

    scale = max|x| / ((2^bits - 1) / 2)      (127.5 for 8 bits; a zero scale -> float eps, as there)
    x_hat = clamp(round(x / scale), -2^(bits-1), 2^(bits-1) - 1) * scale

A checkpoint whose ``quantization_config`` declares such ``input_activations``
(qkit's W8A8 compressed-tensors export) gets a forward pre-hook on every
targeted linear when qkit loads it, so `qkit eval ppl` measures the W8A8 model.
"""
from __future__ import annotations

from dataclasses import dataclass

from qkit.errors import FormatError


@dataclass(frozen=True)
class ActivationScheme:
    bits: int = 8
    # the only scheme qkit applies; the config must say exactly this
    strategy: str = "token"
    symmetric: bool = True
    dynamic: bool = True

    def config(self) -> dict:
        """compressed-tensors' QuantizationArgs for the scheme."""
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "strategy": self.strategy,
                "dynamic": self.dynamic, "group_size": None, "block_structure": None, "observer": None,
                "observer_kwargs": {}}

    @classmethod
    def from_config(cls, args) -> ActivationScheme | None:
        """The scheme of a config group's ``input_activations`` (None: weights only); FormatError if unsupported."""
        if args is None:
            return None
        if not isinstance(args, dict):
            raise FormatError("config.json: input_activations is not an object")
        bits = args.get("num_bits")
        got = (args.get("type", "int"), args.get("symmetric", True), args.get("strategy"), args.get("dynamic"))
        if got != ("int", True, "token", True) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise FormatError(f"config.json: input_activations {args} is not readable; qkit applies dynamic "
                              "per-token symmetric int activations (type int, symmetric, strategy token, dynamic)")
        return cls(bits)


def quantize_per_token(x, bits: int = 8):
    """Fake-quantize x (..., features) per token: every row on its own symmetric grid (float math of x's dtype)."""
    import torch

    half = (2**bits - 1) / 2
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / half
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def attach(model, scheme: ActivationScheme, names) -> list:
    """A forward pre-hook quantizing the input of each named linear (the checkpoint's quantized ones); the handles."""
    handles = []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda m, args: (quantize_per_token(args[0], scheme.bits), *args[1:])))
    return handles
