"""Importance matrices in llama.cpp's sense: per input column of each linear, the mean of squared activations.

llama.cpp's ``llama-imatrix`` runs the model over calibration text and, for every
matrix multiplication, accumulates sum x_j^2 over the tokens that reach input
column j (``in_sum2``) and the token count (``counts``); llama-quantize then uses
in_sum2 / counts as the weights of its importance-weighted quantizers. We do the
same, streaming the float model one decoder layer at a time, and store the result
in llama.cpp's imatrix GGUF layout (tools/imatrix/imatrix.cpp, ``save_imatrix``):
``general.type = "imatrix"``, ``imatrix.datasets``, ``imatrix.chunk_count``,
``imatrix.chunk_size``, and per weight two F32 tensors ``<name>.in_sum2`` (ne0 =
input columns) and ``<name>.counts``. Names are GGUF tensor names.

``read_imatrix`` also reads llama.cpp's older binary ``imatrix.dat`` layout
(qkit.imatrix_legacy), which many published imatrix files still use.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qkit.errors import FormatError, UsageError
from qkit.fileio import atomic_path
from qkit.model import loader


def collect(ref: loader.ModelRef, samples, progress: bool = False,
            process_output: bool = False) -> dict[str, tuple[np.ndarray, int]]:
    """{gguf name: (sum of squares per input column (float64), token count)} over `samples` (n, seqlen).

    process_output adds ``output.weight``, the head, as llama-imatrix's ``--process-output`` does (off by
    default there too): its input is the final norm's output. A head tied to the token embedding is refused:
    its GGUF has no output.weight (llama.cpp multiplies by token_embd, which its imatrix never collects).
    """
    from qkit import pipeline
    from qkit.gguf.write import hf_to_gguf_names

    config = loader.load_config(ref)
    model = loader.empty_model(config)
    store = ref.store()
    prefix, layers = pipeline.decoder_layers(model, config)
    tied = loader.tied_names(model)
    outer = [n for n in loader.persistent_names(model) if n not in tied and not n.startswith(prefix)]
    names = hf_to_gguf_names(config)
    final_norm = _final_norm(model) if process_output else None
    loader.place(model, outer, store)
    states, kws = pipeline.capture_layer_inputs(model, layers, samples)
    stats: dict[str, list] = {}
    walk = pipeline.LayerWalk(layers, prefix, store, states, kws, desc="imatrix", progress=progress)
    for step in walk:  # the hooks see the walk's forward of each layer, which gives the next layer its inputs
        for name, mod, transposed in pipeline.linear_modules(step.layer):
            key = names.get(step.prefix + name + ".weight", step.prefix + name + ".weight")

            def hook(m, inp, _out, _key=key):
                _accumulate(stats, _key, inp[0])
            step.hooks.append(mod.register_forward_hook(hook))
    if final_norm is not None:  # the head's input: the final norm of the last layer's output
        _accumulate(stats, "output.weight", pipeline.run_module(final_norm, walk.states, {}, layer_kwargs=False))
    return {k: (v[0].numpy(), int(v[1])) for k, v in stats.items()}


def merge(*parts: dict[str, tuple[np.ndarray, int]]) -> dict[str, tuple[np.ndarray, int]]:
    """collect's statistics of several slices of the calibration set (several workers) as one: sums of squares
    and token counts add up, so the result is collect's on all the slices' sequences (to float summation order)."""
    out: dict[str, tuple[np.ndarray, int]] = {}
    for part in parts:
        for k, (s2, n) in part.items():
            if k in out:
                if out[k][0].shape != s2.shape:
                    raise UsageError(f"imatrix statistics of {k} disagree in width: {out[k][0].shape} vs {s2.shape}")
                out[k] = (out[k][0] + s2, out[k][1] + n)
            else:
                out[k] = (np.asarray(s2, np.float64).copy(), int(n))
    return out


def _accumulate(stats: dict, key: str, x) -> None:
    """Add x's per-column sum of squares (float64) and token count to stats[key] (llama-imatrix: in_sum2, counts)."""
    import torch

    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    s = stats.setdefault(key, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
    s[0] += (x * x).sum(0)
    s[1] += x.shape[0]


def _final_norm(model):
    """The module whose output the LM head reads (its GGUF name output_norm), for --process-output."""
    from qkit.gguf.read import GLOBAL_NAMES

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None:
        raise UsageError(f"--process-output: {type(model).__name__} has no LM head that GGUF names output.weight")
    if emb is not None and head.weight is emb.weight:
        raise UsageError("--process-output: this model ties its head to the token embedding, so its GGUF has no "
                         "output.weight to weight (llama.cpp multiplies by token_embd.weight)")
    norm = dict(model.named_modules()).get(GLOBAL_NAMES["output_norm"])
    if norm is None:
        raise UsageError(f"--process-output: no final norm (output_norm) found in {type(model).__name__}")
    return norm


def write_imatrix(path: str | os.PathLike, stats: dict, datasets: list[str], chunk_size: int, inputs=()) -> None:
    import gguf

    with atomic_path(path, inputs=tuple(inputs)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        w.kv_data[0].pop("general.architecture", None)  # an imatrix file names no architecture
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", list(datasets))
        chunks = max((c for _, c in stats.values()), default=0) // max(chunk_size, 1)
        w.add_uint32("imatrix.chunk_count", chunks)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(stats):
            s, c = stats[name]
            w.add_tensor(f"{name}.in_sum2", np.asarray(s, np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[c]], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{gguf weight name: per-column importance (float32)} from an imatrix file (qkit's or llama.cpp's).

    The format is told by content, not by extension: a file that starts with the GGUF magic is an
    imatrix GGUF (importance = in_sum2 / counts), anything else is tried as the legacy
    ``imatrix.dat`` layout (qkit.imatrix_legacy; importance = stored value / ncall). The GGUF is
    structure-checked first (qkit.gguf.check: every count and size against the file's
    length); each ``in_sum2`` / ``counts`` tensor must be F32, as llama.cpp writes them.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"imatrix file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        from qkit.imatrix_legacy import read_legacy

        return read_legacy(path)
    return _read_gguf(path)


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    from qkit.gguf.check import open_reader

    r = open_reader(path)
    kind = r.fields.get("general.type")
    try:
        kind = kind.contents() if kind is not None else None
    except Exception:  # noqa: BLE001 - a field gguf-py cannot decode
        kind = None
    if kind != "imatrix":
        raise FormatError(f"{path}: not an imatrix file (general.type is not 'imatrix')")
    import gguf

    tens = {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise FormatError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; imatrix tensors are F32")
        tens[t.name] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    out = {}
    for name, s in tens.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = tens.get(base + ".counts")
        if c is None or c.size != 1:
            raise FormatError(f"{path}: {base} has in_sum2 but no single count")
        if not np.isfinite(c[0]) or not np.isfinite(s).all() or (s < 0).any():
            raise FormatError(f"{path}: {base} holds non-finite or negative sums")
        if c[0] <= 0:  # never activated: llama.cpp's loader uses weights of 1 (tools/quantize)
            out[base] = np.ones_like(s, dtype=np.float32)
            continue
        with np.errstate(over="ignore"):
            v = (s / c[0]).astype(np.float32)
        if not np.isfinite(v).all():
            raise FormatError(f"{path}: {base} holds non-finite values")
        out[base] = v
    return out
