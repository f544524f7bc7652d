"""A KV cache that writes in place: transformers' DynamicCache with each layer's keys and values in a buffer
reserved up front, instead of a torch.cat of the whole cache per token.

DynamicLayer.update concatenates: at decode step t every layer copies its t cached positions (SmolLM2-135M
after a 512-token prompt: 30 layers x K and V x 3 heads x 64 x ~600 x 4 bytes, ~28 MB copied and freshly
allocated per token, more than the 4-bit decoder linears read). Here a layer reserves `capacity` positions
at its first update (generate() knows prompt + new tokens), copies only the new positions, and returns views
of the filled prefix; past the capacity it grows by doubling (one copy per doubling). The views are what
attention reads, the same values DynamicCache returns, so the logits are bit-identical (tested).

It is a Cache of CacheLayerMixin layers (transformers' API), so a quantized KV cache plugs in the same way.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """DynamicLayer whose buffers hold `capacity` positions; keys / values are views of the filled part."""

    def __init__(self, capacity: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.capacity = max(int(capacity), 0)
        self.length = 0
        self._k = self._v = None

    def _reserve(self, like: torch.Tensor, need: int) -> None:
        cap = max(need, self.capacity, 2 * (self._k.shape[-2] if self._k is not None else 0))
        b, h, _, d = like.shape
        k = torch.empty(b, h, cap, d, dtype=like.dtype, device=like.device)
        v = torch.empty(b, h, cap, d, dtype=like.dtype, device=like.device)
        if self._k is not None and self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if self._k is None or end > self._k.shape[-2] or self._k.shape[:2] != key_states.shape[:2]:
            self._reserve(key_states, end)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.keys is not None and self.is_initialized:
            self.length = self.keys.shape[-2]

    def _rebind(self) -> None:
        """After an operation that replaced keys / values (beam reorder, batch repeat): they become the buffer."""
        if self.keys is not None and self.keys.numel():
            self._k, self._v = self.keys.contiguous(), self.values.contiguous()
            self.length = self._k.shape[-2]

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._rebind()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rebind()

    def batch_select_indices(self, indices) -> None:
        super().batch_select_indices(indices)
        self._rebind()


class InPlaceCache(DynamicCache):
    """DynamicCache over InPlaceLayer: reserve `capacity` positions per layer (prompt + tokens to generate)."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self.layer_class_to_replicate = self._layer

    def _layer(self):
        return InPlaceLayer(self.capacity)
