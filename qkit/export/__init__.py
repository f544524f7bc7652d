"""Packed checkpoints other tools load: GPTQ (v1, v2), AWQ GEMM, compressed-tensors pack-quantized.

Writing happens inside qkit.pipeline.quantize_model(..., fmt=...), one decoder layer at a
time; reading through qkit.export.reader.QuantizedStore, which qkit.model.loader uses
whenever a model's config.json holds a ``quantization_config``.
"""
from qkit.export.common import FORMATS, ExportSpec, check_chooser, grid_requirements
from qkit.export.registry import get_format, reader_for

__all__ = ["FORMATS", "ExportSpec", "check_chooser", "get_format", "grid_requirements", "reader_for"]
