"""Read a packed checkpoint back as float weights: a WeightStore whose quantized linears dequantize on access.

QuantizedStore wraps the checkpoint's WeightStore and the ``quantization_config`` of its
config.json: every packed linear (``name.qweight`` ... or ``name.weight_packed`` ...)
appears as one float32 ``name.weight`` of shape (out, in), computed when asked (for
compressed-tensors int-quantized, whose int8 codes are stored under ``name.weight`` itself, the
name then means the dequantized weight);
everything else (embeddings, norms, biases, the LM head) passes through as stored.
So qkit.model.loader, the pipeline, imatrix and the GGUF writer read a GPTQ, AWQ or
compressed-tensors directory exactly like a float one, one tensor at a time.
"""
from __future__ import annotations

from qkit.errors import FormatError
from qkit.export.registry import reader_for


class QuantizedStore:
    def __init__(self, store, qcfg: dict):
        self.store = store
        self.format = reader_for(qcfg)
        keys = store.keys()
        m = self.format.marker
        self.bases = sorted(k[: -len(m)] for k in keys if k.endswith(m))
        if not self.bases:
            raise FormatError(f"config.json names quant_method {qcfg.get('quant_method')!r} but the checkpoint "
                              f"holds no packed linear (no tensor ending in {m!r})")
        hidden = set()
        for b in self.bases:
            parts = self.format.parts(b)
            hidden.update(parts)
            if b + ".weight" in store and b + ".weight" not in parts:  # int-quantized: .weight holds int8 codes
                raise FormatError(f"the checkpoint holds both {b}.weight and packed tensors for {b}")
        self._plain = [k for k in keys if k not in hidden]
        self._plain_set = set(self._plain)
        self._deq = {b + ".weight": b for b in self.bases}
        self.files = store.files
        # the activation scheme the model runs with (compressed-tensors input_activations), or None
        self.activations = getattr(self.format, "activations", None)

    def keys(self) -> list[str]:
        return self._plain + list(self._deq)

    def __contains__(self, name: str) -> bool:
        return name in self._deq or name in self._plain_set

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._deq:
            return tuple(self.format.shape(self._deq[name], self.store))
        return self.store.shape(name)

    def dtype(self, name: str) -> str:
        return "F32" if name in self._deq else self.store.dtype(name)

    def get(self, name: str):
        """A float32 (out, in) weight for a packed linear; any other tensor as stored."""
        if name in self._deq:
            return self.format.dequantize(self._deq[name], self.store)
        if name not in self:
            raise FormatError(f"tensor {name!r} is not in the checkpoint ({len(self.keys())} tensors)")
        return self.store.get(name)

    def close(self) -> None:
        self.store.close()
