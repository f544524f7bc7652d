"""The export formats by name (writing) and by config.json entry (reading).

A module of its own so the formats import the shared checks (qkit.export.common)
and the registry imports the formats, with no import circle between them.
"""
from __future__ import annotations

from qkit.errors import FormatError, UsageError
from qkit.export import awq, compressed_tensors, gptq
from qkit.export.common import FORMATS


def get_format(name: str):
    table = {"gptq": gptq.GPTQFormat(v2=False), "gptq_v2": gptq.GPTQFormat(v2=True), "awq": awq.AWQFormat(),
             "compressed-tensors": compressed_tensors.CompressedTensorsFormat()}
    if name not in table:
        raise UsageError(f"unknown export format {name!r}; available: {', '.join(FORMATS)}")
    return table[name]


def reader_for(qcfg) -> object:
    """The format a config.json ``quantization_config`` names; FormatError for anything qkit cannot read."""
    if not isinstance(qcfg, dict):
        raise FormatError("config.json: quantization_config is not an object")
    method = qcfg.get("quant_method")
    for fmt in (gptq.GPTQFormat(v2=False), awq.AWQFormat(), compressed_tensors.CompressedTensorsFormat()):
        if fmt.matches(qcfg):
            try:
                return fmt.for_reading(qcfg)
            except (AttributeError, TypeError, ValueError, KeyError) as e:  # a nested field of the wrong JSON type
                raise FormatError(f"config.json: malformed {method} quantization_config ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
    raise FormatError(f"config.json: unknown quantization method {method!r} (qkit reads gptq, awq, compressed-tensors)")
